//! The previous statement's diagnostics when its connection went back to the pool.
//!
//! ROW_COUNT(), FOUND_ROWS(), @@warning_count, @@error_count and SHOW WARNINGS / ERRORS
//! answer for the previous statement *on the connection they run on*; under multiplexing
//! that is usually another client's. The session keeps the previous statement's connection
//! for the next command when the statement left something only its server knows (warnings,
//! an error, SQL_CALC_FOUND_ROWS: see `Session::held`). Otherwise the answers are known to
//! the proxy (no warnings, no error, the affected-row count and row count it saw), and a
//! statement that asks is answered here or has the references replaced by those values
//! before it is sent, so that no other client's diagnostics can show through.

use crate::router::lexer::{eq_ci, Lexer, Tok};

/// What to do with a statement that refers to the previous statement's diagnostics.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// `SHOW WARNINGS` / `SHOW ERRORS` (any LIMIT): an empty list.
    EmptyList,
    /// `SHOW COUNT(*) WARNINGS|ERRORS`: one row, 0, under this column name.
    Count(&'static str),
    /// Run this statement text instead (the references replaced by their values).
    Rewrite(Vec<u8>),
    /// An OK with nothing changed: `GET DIAGNOSTICS CONDITION n …` when there is no
    /// condition (the server leaves the targets as they are; MariaDB also notes error 1758
    /// "Invalid condition number" in its diagnostics, which the proxy does not reproduce).
    Ok,
}

/// Token with its byte span in the statement.
fn spans(sql: &[u8]) -> Vec<(Tok<'_>, usize, usize)> {
    let base = sql.as_ptr() as usize;
    let mut lx = Lexer::new(sql);
    let mut out = Vec::new();
    while let Some(t) = lx.next() {
        let end = lx.pos();
        let start = match t {
            Tok::Word(w) | Tok::Num(w) | Tok::Str(w) => w.as_ptr() as usize - base,
            Tok::Quoted(w) | Tok::UserVar(w) => (w.as_ptr() as usize - base).saturating_sub(1),
            Tok::SysVar(w) => (w.as_ptr() as usize - base).saturating_sub(2),
            Tok::Placeholder | Tok::Punct(_) => end.saturating_sub(1),
        };
        out.push((t, start, end));
    }
    out
}

/// `GET [CURRENT] DIAGNOSTICS` for a previous statement with no condition: the statement
/// items become a SET of their values (`@n = NUMBER` -> `@n = 0`, `ROW_COUNT` -> its value),
/// the CONDITION form an OK that changes nothing.
fn get_diagnostics(sql: &[u8], toks: &[(Tok<'_>, usize, usize)], row_count: i64) -> Option<Answer> {
    let word = |i: usize, s: &str| matches!(toks.get(i), Some((Tok::Word(w), _, _)) if eq_ci(w, s));
    let mut i = 1;
    if word(i, "CURRENT") {
        i += 1;
    }
    if !word(i, "DIAGNOSTICS") {
        return None; // STACKED (only inside a handler: the server says so) or not this
    }
    i += 1;
    if word(i, "CONDITION") {
        return Some(Answer::Ok);
    }
    let mut out = b"SET ".to_vec();
    loop {
        let (target, start, end) = *toks.get(i)?;
        if !matches!(target, Tok::UserVar(_) | Tok::Word(_)) || !matches!(toks.get(i + 1), Some((Tok::Punct(b'='), _, _))) {
            return None;
        }
        let value = match toks.get(i + 2) {
            Some((Tok::Word(w), _, _)) if eq_ci(w, "NUMBER") => "0".to_string(),
            Some((Tok::Word(w), _, _)) if eq_ci(w, "ROW_COUNT") => row_count.to_string(),
            _ => return None,
        };
        if out.len() > 4 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(&sql[start..end]);
        out.extend_from_slice(b" = ");
        out.extend_from_slice(value.as_bytes());
        match toks.get(i + 3) {
            None | Some((Tok::Punct(b';'), _, _)) => return Some(Answer::Rewrite(out)),
            Some((Tok::Punct(b','), _, _)) => i += 4,
            _ => return None,
        }
    }
}

fn session_sysvar(v: &[u8]) -> &[u8] {
    for p in [&b"session."[..], b"SESSION.", b"local.", b"LOCAL."] {
        if let Some(n) = v.strip_prefix(p) {
            return n;
        }
    }
    v
}

/// The answer for `sql` given the previous statement's ROW_COUNT() and FOUND_ROWS() and no
/// warnings or errors. None: nothing to change (no reference after all, or a form the
/// server must answer, such as GET STACKED DIAGNOSTICS).
pub fn answer(sql: &[u8], row_count: i64, found_rows: u64) -> Option<Answer> {
    let toks = spans(sql);
    let word = |i: usize, s: &str| matches!(toks.get(i), Some((Tok::Word(w), _, _)) if eq_ci(w, s));
    if word(0, "GET") {
        return get_diagnostics(sql, &toks, row_count);
    }
    if word(0, "SHOW") {
        let rest_ok = |from: usize| toks[from..].iter().all(|(t, _, _)| matches!(t, Tok::Word(_) | Tok::Num(_) | Tok::Punct(b',') | Tok::Punct(b';')));
        if (word(1, "WARNINGS") || word(1, "ERRORS")) && rest_ok(2) {
            return Some(Answer::EmptyList);
        }
        if word(1, "COUNT") && matches!(toks.get(3), Some((Tok::Punct(b'*'), _, _))) {
            if word(5, "WARNINGS") {
                return Some(Answer::Count("@@session.warning_count"));
            }
            if word(5, "ERRORS") {
                return Some(Answer::Count("@@session.error_count"));
            }
        }
        return None;
    }
    let mut out = Vec::with_capacity(sql.len() + 32);
    let mut copied = 0;
    let mut depth = 0i32;
    let mut changed = false;
    let mut i = 0;
    while i < toks.len() {
        let (t, start, end) = toks[i];
        let (value, last) = match t {
            Tok::Punct(b'(') => {
                depth += 1;
                (None, i)
            }
            Tok::Punct(b')') => {
                depth -= 1;
                (None, i)
            }
            Tok::Word(w)
                if (eq_ci(w, "ROW_COUNT") || eq_ci(w, "FOUND_ROWS"))
                    && matches!(toks.get(i + 1), Some((Tok::Punct(b'('), _, _)))
                    && matches!(toks.get(i + 2), Some((Tok::Punct(b')'), _, _))) =>
            {
                let v = if eq_ci(w, "ROW_COUNT") { row_count.to_string() } else { found_rows.to_string() };
                (Some(v), i + 2)
            }
            Tok::SysVar(v) if {
                let n = session_sysvar(v);
                eq_ci(n, "warning_count") || eq_ci(n, "error_count")
            } =>
            {
                (Some("0".to_string()), i)
            }
            _ => (None, i),
        };
        if let Some(v) = value {
            let stop = toks[last].2;
            // A select-list item keeps the column name the server would give it.
            let prev_ok = i == 0
                || matches!(toks[i - 1].0, Tok::Punct(b','))
                || matches!(toks[i - 1].0, Tok::Word(w) if eq_ci(w, "SELECT") || eq_ci(w, "DISTINCT"));
            let next_ok = match toks.get(last + 1).map(|t| t.0) {
                None | Some(Tok::Punct(b',')) | Some(Tok::Punct(b';')) => true,
                Some(Tok::Word(w)) => ["FROM", "WHERE", "LIMIT", "ORDER", "GROUP", "HAVING", "INTO", "UNION", "FOR", "WINDOW"]
                    .iter()
                    .any(|k| eq_ci(w, k)),
                _ => false,
            };
            out.extend_from_slice(&sql[copied..start]);
            out.extend_from_slice(v.as_bytes());
            if depth == 0 && prev_ok && next_ok {
                out.extend_from_slice(b" AS `");
                for &b in &sql[start..stop] {
                    if b == b'`' {
                        out.push(b'`');
                    }
                    out.push(b);
                }
                out.push(b'`');
            }
            copied = stop;
            changed = true;
        }
        let _ = end;
        i = last + 1;
    }
    if !changed {
        return None;
    }
    out.extend_from_slice(&sql[copied..]);
    Some(Answer::Rewrite(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(sql: &str) -> String {
        match answer(sql.as_bytes(), 3, 7) {
            Some(Answer::Rewrite(v)) => String::from_utf8_lossy(&v).into_owned(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn get_diagnostics_without_conditions() {
        let rw = |s: &str| match answer(s.as_bytes(), 3, 0) {
            Some(Answer::Rewrite(t)) => String::from_utf8(t).unwrap(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(rw("GET DIAGNOSTICS @n = NUMBER"), "SET @n = 0");
        assert_eq!(rw("get current diagnostics @n = NUMBER, @`r` = ROW_COUNT;"), "SET @n = 0, @`r` = 3");
        assert_eq!(answer(b"GET DIAGNOSTICS CONDITION 1 @e = MYSQL_ERRNO", 3, 0), Some(Answer::Ok));
        assert_eq!(answer(b"GET STACKED DIAGNOSTICS @n = NUMBER", 3, 0), None, "the server's to refuse");
        assert_eq!(answer(b"GET DIAGNOSTICS @n = SOMETHING", 3, 0), None);
        assert_eq!(answer(b"GET DIAGNOSTICS @n NUMBER", 3, 0), None);
    }

    #[test]
    fn answers_and_rewrites() {
        assert_eq!(answer(b"SHOW WARNINGS", 0, 0), Some(Answer::EmptyList));
        assert_eq!(answer(b"show errors limit 5", 0, 0), Some(Answer::EmptyList));
        assert_eq!(answer(b"SHOW COUNT(*) WARNINGS", 0, 0), Some(Answer::Count("@@session.warning_count")));
        assert_eq!(rw("SELECT ROW_COUNT()"), "SELECT 3 AS `ROW_COUNT()`");
        assert_eq!(rw("SELECT found_rows() AS n, @@warning_count"), "SELECT 7 AS n, 0 AS `@@warning_count`");
        assert_eq!(rw("INSERT INTO log VALUES (ROW_COUNT(), 'x')"), "INSERT INTO log VALUES (3, 'x')");
        assert_eq!(rw("SELECT a FROM t WHERE b = ROW_COUNT()"), "SELECT a FROM t WHERE b = 3");
        assert_eq!(rw("SELECT 'ROW_COUNT()', ROW_COUNT() FROM t"), "SELECT 'ROW_COUNT()', 3 AS `ROW_COUNT()` FROM t");
        assert_eq!(rw("SELECT @@session.error_count"), "SELECT 0 AS `@@session.error_count`");
        assert_eq!(answer(b"GET DIAGNOSTICS @n = NUMBER", 0, 0), Some(Answer::Rewrite(b"SET @n = 0".to_vec())));
        assert_eq!(rw("SELECT ROW_COUNT() - 1"), "SELECT 3 - 1");
        assert_eq!(answer("SELECT ROW_COUNT()".as_bytes(), -1, 0), Some(Answer::Rewrite(b"SELECT -1 AS `ROW_COUNT()`".to_vec())));
    }
}
