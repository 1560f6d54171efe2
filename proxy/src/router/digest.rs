//! Query digests: the query with literals replaced by `?`, comments dropped, whitespace
//! folded and IN/VALUES lists collapsed, so that `WHERE id=1` and `WHERE id = 2` share one
//! digest. Rules may match on it (match_digest) and statistics are kept per digest.

use super::lexer::{Lexer, Tok};

/// Normalise `sql` into `out` (cleared first).
pub fn digest_into(sql: &[u8], out: &mut String) {
    out.clear();
    let mut lx = Lexer::new(sql);
    let mut prev: Option<Tok> = None;
    let mut prev2: Option<Tok> = None;
    let mut prev_at = 0; // where the previous token's text (and its space) starts in `out`
    while let Some(tok) = lx.next() {
        if tok == Tok::Punct(b';') {
            break;
        }
        let space = match (prev, tok) {
            (None, _) => false,
            (_, Tok::Punct(b',' | b')' | b'.')) => false,
            (Some(Tok::Punct(b'(' | b'.' | b',')), _) => false,
            // f(x) stays f(x); IN (x) stays IN (x)
            (Some(Tok::Word(_) | Tok::Quoted(_)), Tok::Punct(b'(')) => lx.space_before,
            // multi-char operators: >=, <=, !=, :=, ||
            (Some(Tok::Punct(p)), Tok::Punct(_)) if p != b',' && p != b')' => lx.space_before,
            _ => true,
        };
        // A literal's sign belongs to it after an operator: "= -1" -> "= ?".
        if let (Tok::Num(_), Some(Tok::Punct(b'-' | b'+'))) = (tok, prev) {
            let sign_follows_operator = match prev2 {
                None => true,
                Some(Tok::Punct(p)) => p != b')',
                _ => false,
            };
            if sign_follows_operator && !lx.space_before {
                out.truncate(prev_at);
                out.push_str(if prev2.is_some() { " ?" } else { "?" });
                prev = Some(tok);
                continue;
            }
        }
        let at = out.len();
        if space {
            out.push(' ');
        }
        match tok {
            Tok::Word(w) => out.push_str(&String::from_utf8_lossy(w)),
            Tok::Quoted(q) => {
                out.push('`');
                out.push_str(&String::from_utf8_lossy(q));
                out.push('`');
            }
            Tok::Str(_) | Tok::Num(_) | Tok::Placeholder => out.push('?'),
            Tok::UserVar(v) => {
                out.push('@');
                out.push_str(&String::from_utf8_lossy(v));
            }
            Tok::SysVar(v) => {
                out.push_str("@@");
                out.push_str(&String::from_utf8_lossy(v));
            }
            Tok::Punct(p) => out.push(p as char),
        }
        prev2 = prev;
        prev = Some(tok);
        prev_at = at;
    }
    collapse_lists(out);
}

pub fn digest(sql: &[u8]) -> String {
    let mut s = String::with_capacity(sql.len());
    digest_into(sql, &mut s);
    s
}

/// "(?,?,?)" -> "(...)" and "(...),(...),(...)" -> "(...),..."
fn collapse_lists(s: &mut String) {
    if !s.contains("(?,") {
        return;
    }
    // Step 1: every parenthesised list of two or more literals becomes (...).
    let b = s.as_bytes();
    let mut one = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'(' && b.get(i + 1) == Some(&b'?') && b.get(i + 2) == Some(&b',') {
            let mut j = i + 2;
            while b.get(j) == Some(&b',') && b.get(j + 1) == Some(&b'?') {
                j += 2;
            }
            if b.get(j) == Some(&b')') {
                one.push_str("(...)");
                i = j + 1;
                continue;
            }
        }
        let ch_len = utf8_len(b[i]);
        one.push_str(&s[i..(i + ch_len).min(s.len())]);
        i += ch_len;
    }
    // Step 2: a run of (...) rows becomes "(...),...".
    const ROW: &str = "(...)";
    let mut out = String::with_capacity(one.len());
    let mut rest = one.as_str();
    while let Some(at) = rest.find("(...),(...)") {
        out.push_str(&rest[..at]);
        out.push_str("(...),...");
        rest = &rest[at + ROW.len()..];
        while let Some(r) = rest.strip_prefix(",(...)") {
            rest = r;
        }
    }
    out.push_str(rest);
    *s = out;
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::digest;

    #[test]
    fn literals_whitespace_and_comments() {
        assert_eq!(digest(b"SELECT c FROM sbtest1 WHERE id=1"), "SELECT c FROM sbtest1 WHERE id = ?");
        assert_eq!(digest(b"select  c from sbtest1\n where id = 2 /* x */"), "select c from sbtest1 where id = ?");
        assert_eq!(digest(b"SELECT * FROM t WHERE a = -5 AND b='x''y' -- c"), "SELECT * FROM t WHERE a = ? AND b = ?");
        assert_eq!(digest(b"SELECT a - 1 FROM t"), "SELECT a - ? FROM t");
        assert_eq!(digest(b"SELECT `db`.`t`.c FROM db.t"), "SELECT `db`.`t`.c FROM db.t");
        assert_eq!(digest(b"SELECT c FROM t WHERE id IN (1, 2,3)"), "SELECT c FROM t WHERE id IN (...)");
        assert_eq!(digest(b"SELECT c FROM t WHERE id IN (1)"), "SELECT c FROM t WHERE id IN (?)");
        assert_eq!(
            digest(b"INSERT INTO t VALUES (1,'a'),(2,'b'),(3,'c')"),
            "INSERT INTO t VALUES (...),..."
        );
        assert_eq!(digest(b"INSERT INTO t VALUES (1,'a')"), "INSERT INTO t VALUES (...)");
        assert_eq!(digest(b"SELECT f(1, 2) FROM t"), "SELECT f(...) FROM t");
        assert_eq!(digest(b"SELECT 1; SELECT 2"), "SELECT ?");
        assert_eq!(digest(b"SELECT a FROM t WHERE b>=2 AND c != 'x'"), "SELECT a FROM t WHERE b >= ? AND c != ?");
        assert_eq!(digest(b"SELECT c FROM t WHERE id=-1"), "SELECT c FROM t WHERE id = ?");
    }
}
