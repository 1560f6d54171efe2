//! Which tables a statement reads or writes, from its tokens: the names after FROM, JOIN,
//! INTO, UPDATE, TABLE (and comma lists after FROM). Used by the query cache to invalidate
//! cached reads when a write to one of their tables passes through the proxy. Names are
//! lowercased and qualified with the session's schema when unqualified.
//!
//! `None` means "cannot tell" (a statement that may write anything: CALL, a multi-statement
//! text, a statement naming no table): the cache then drops everything it holds.

use super::lexer::{Lexer, Tok};

fn eq_ci(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn ident<'a>(t: &Tok<'a>) -> Option<&'a [u8]> {
    match t {
        Tok::Word(w) if !is_keyword(w) => Some(w),
        Tok::Quoted(q) => Some(q),
        _ => None,
    }
}

fn is_keyword(w: &[u8]) -> bool {
    const KW: &[&str] = &[
        "SELECT", "WHERE", "SET", "VALUES", "VALUE", "ON", "USING", "GROUP", "ORDER", "LIMIT", "HAVING", "JOIN", "LEFT", "RIGHT",
        "INNER", "OUTER", "CROSS", "NATURAL", "STRAIGHT_JOIN", "AS", "WINDOW", "UNION", "FOR", "LOCK", "INTO", "FROM", "DUAL",
        "PARTITION", "IGNORE", "LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "QUICK", "IF", "EXISTS", "NOT", "TEMPORARY",
        "DEFAULT", "RETURNING", "WITH", "LATERAL", "TABLE",
    ];
    KW.iter().any(|k| eq_ci(w, k))
}

fn qualify(schema: Option<&str>, a: &[u8], b: Option<&[u8]>) -> String {
    let low = |x: &[u8]| String::from_utf8_lossy(x).to_ascii_lowercase();
    match b {
        Some(t) => format!("{}.{}", low(a), low(t)),
        None => format!("{}.{}", schema.unwrap_or("").to_ascii_lowercase(), low(a)),
    }
}

/// Tables named by `sql` (one statement). Reads and writes alike.
pub fn tables(sql: &[u8], schema: Option<&str>) -> Option<Vec<String>> {
    let toks: Vec<Tok> = Lexer::new(sql).collect();
    let first = toks.iter().find_map(|t| if let Tok::Word(w) = t { Some(*w) } else { None })?;
    if eq_ci(first, "CALL") || eq_ci(first, "LOAD") || eq_ci(first, "HANDLER") {
        return None;
    }
    let semis = toks.iter().filter(|t| **t == Tok::Punct(b';')).count();
    let trailing = toks.last() == Some(&Tok::Punct(b';'));
    if semis > usize::from(trailing) {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let starts_list = match toks[i] {
            Tok::Word(w) => {
                eq_ci(w, "FROM") || eq_ci(w, "JOIN") || eq_ci(w, "INTO") || eq_ci(w, "UPDATE") || eq_ci(w, "TABLE") || eq_ci(w, "TRUNCATE")
            }
            _ => false,
        };
        i += 1;
        if !starts_list {
            continue;
        }
        // name [[AS] alias] [, name [[AS] alias]]...  (FROM and UPDATE take lists)
        loop {
            // Skip modifiers such as IGNORE, LOW_PRIORITY, IF EXISTS.
            while let Some(Tok::Word(w)) = toks.get(i) {
                if is_keyword(w) && !eq_ci(w, "SELECT") {
                    i += 1;
                } else {
                    break;
                }
            }
            let Some(a) = toks.get(i).and_then(ident) else { break };
            i += 1;
            let mut b = None;
            if toks.get(i) == Some(&Tok::Punct(b'.')) {
                if let Some(t) = toks.get(i + 1).and_then(ident) {
                    b = Some(t);
                    i += 2;
                }
            }
            let name = qualify(schema, a, b);
            if !out.contains(&name) {
                out.push(name);
            }
            // alias
            if let Some(Tok::Word(w)) = toks.get(i) {
                if eq_ci(w, "AS") {
                    i += 2;
                } else if !is_keyword(w) {
                    i += 1;
                }
            } else if let Some(Tok::Quoted(_)) = toks.get(i) {
                i += 1;
            }
            if toks.get(i) == Some(&Tok::Punct(b',')) {
                i += 1;
                continue;
            }
            break;
        }
    }
    if out.is_empty() && !eq_ci(first, "SELECT") {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::tables;

    fn t(sql: &str) -> Option<Vec<String>> {
        tables(sql.as_bytes(), Some("Db"))
    }

    #[test]
    fn reads_and_writes() {
        assert_eq!(t("SELECT c FROM sbtest1 WHERE id=1"), Some(vec!["db.sbtest1".into()]));
        assert_eq!(t("select * from a x, other.c as z join `B` on x.id=B.id"), Some(vec!["db.a".into(), "other.c".into(), "db.b".into()]));
        assert_eq!(t("SELECT 1"), Some(vec![]));
        assert_eq!(t("SELECT * FROM (SELECT id FROM t1) d JOIN t2 USING (id)"), Some(vec!["db.t1".into(), "db.t2".into()]));
        assert_eq!(t("INSERT INTO s.t (a) VALUES (1)"), Some(vec!["s.t".into()]));
        assert_eq!(t("insert ignore into t select * from u"), Some(vec!["db.t".into(), "db.u".into()]));
        assert_eq!(t("UPDATE t1, t2 SET t1.a = t2.a"), Some(vec!["db.t1".into(), "db.t2".into()]));
        assert_eq!(t("DELETE FROM t WHERE id = 3"), Some(vec!["db.t".into()]));
        assert_eq!(t("REPLACE INTO t VALUES (1)"), Some(vec!["db.t".into()]));
        assert_eq!(t("TRUNCATE TABLE t"), Some(vec!["db.t".into()]));
        assert_eq!(t("TRUNCATE t"), Some(vec!["db.t".into()]));
        assert_eq!(t("DROP TABLE IF EXISTS t"), Some(vec!["db.t".into()]));
        assert_eq!(t("ALTER TABLE t ADD c INT"), Some(vec!["db.t".into()]));
        assert_eq!(t("CALL p()"), None);
        assert_eq!(t("INSERT INTO t VALUES (1); DELETE FROM u"), None);
        assert_eq!(t("SET @a = 1"), None);
        assert_eq!(t("SELECT 'from x' FROM y"), Some(vec!["db.y".into()]));
    }
}
