//! Names a request from its first bytes (MySQL packet header + command + statement start):
//! the `db.operation.name` its latency is broken down by.

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_STATISTICS: u8 = 0x09;
const COM_PING: u8 = 0x0e;
const COM_CHANGE_USER: u8 = 0x11;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_SET_OPTION: u8 = 0x1b;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_RESET_CONNECTION: u8 = 0x1f;

/// `db.operation.name` for a request prefix (`head` = packet header + payload start).
pub fn operation(head: &[u8]) -> &'static str {
    let Some(&cmd) = head.get(4) else { return "UNKNOWN" };
    match cmd {
        COM_QUERY => statement_kind(head.get(5..).unwrap_or(&[])),
        COM_STMT_EXECUTE => "COM_STMT_EXECUTE",
        COM_STMT_PREPARE => "COM_STMT_PREPARE",
        COM_STMT_FETCH => "COM_STMT_FETCH",
        COM_STMT_RESET => "COM_STMT_RESET",
        COM_STMT_CLOSE => "COM_STMT_CLOSE",
        COM_PING => "COM_PING",
        COM_INIT_DB => "COM_INIT_DB",
        COM_QUIT => "COM_QUIT",
        COM_FIELD_LIST => "COM_FIELD_LIST",
        COM_STATISTICS => "COM_STATISTICS",
        COM_CHANGE_USER => "COM_CHANGE_USER",
        COM_SET_OPTION => "COM_SET_OPTION",
        COM_RESET_CONNECTION => "COM_RESET_CONNECTION",
        _ => "COM_OTHER",
    }
}

/// The kind of a prepared statement from its COM_STMT_PREPARE request prefix.
pub fn prepared_kind(head: &[u8]) -> &'static str {
    statement_kind(head.get(5..).unwrap_or(&[]))
}

/// The first keyword of a statement, skipping whitespace, comments and parentheses.
fn statement_kind(sql: &[u8]) -> &'static str {
    let mut i = 0;
    loop {
        while i < sql.len() && (sql[i].is_ascii_whitespace() || sql[i] == b'(') {
            i += 1;
        }
        if sql[i..].starts_with(b"/*") {
            match sql[i + 2..].windows(2).position(|w| w == b"*/") {
                Some(n) => i += n + 4,
                None => return "OTHER",
            }
        } else if sql[i..].starts_with(b"#") || sql[i..].starts_with(b"-- ") {
            match sql[i..].iter().position(|&b| b == b'\n') {
                Some(n) => i += n + 1,
                None => return "OTHER",
            }
        } else {
            break;
        }
    }
    let rest = &sql[i..];
    let len = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &rest[..len];
    let is = |k: &str| word.eq_ignore_ascii_case(k.as_bytes());
    if is("SELECT") || is("WITH") {
        "SELECT"
    } else if is("INSERT") {
        "INSERT"
    } else if is("UPDATE") {
        "UPDATE"
    } else if is("DELETE") {
        "DELETE"
    } else if is("REPLACE") {
        "REPLACE"
    } else if is("BEGIN") || is("START") {
        "BEGIN"
    } else if is("COMMIT") {
        "COMMIT"
    } else if is("ROLLBACK") {
        "ROLLBACK"
    } else if is("SET") {
        "SET"
    } else if is("SHOW") {
        "SHOW"
    } else if is("CALL") {
        "CALL"
    } else {
        "OTHER"
    }
}

#[cfg(test)]
mod tests {
    use super::operation;

    fn q(sql: &str) -> Vec<u8> {
        let mut v = vec![0, 0, 0, 0, 0x03];
        v.extend_from_slice(sql.as_bytes());
        v.truncate(32);
        v
    }

    #[test]
    fn names_statements_and_commands() {
        assert_eq!(operation(&q("SELECT 1")), "SELECT");
        assert_eq!(operation(&q("  /* c */ insert into t values (1)")), "INSERT");
        assert_eq!(operation(&q("update t set a=1")), "UPDATE");
        assert_eq!(operation(&q("DELETE FROM t")), "DELETE");
        assert_eq!(operation(&q("(SELECT 1) UNION (SELECT 2)")), "SELECT");
        assert_eq!(operation(&q("/* unterminated")), "OTHER");
        assert_eq!(operation(&[0, 0, 0, 0, 0x17, 1, 0, 0, 0]), "COM_STMT_EXECUTE");
        assert_eq!(operation(&[0, 0, 0, 0, 0x0e]), "COM_PING");
        assert_eq!(operation(&[0, 0, 0]), "UNKNOWN");
    }
}
