//! Names a request from its first bytes (MySQL packet header + command + statement start):
//! the `db.operation.name` its latency is broken down by. Runs in the kernel for every
//! request, so it is written for the BPF verifier: fixed-bound loops over a fixed-size
//! array, no slices, no panics.

/// Operation codes: indexes in [`OP_NAMES`] and in a port's block of aggregates.
pub const OP_UNKNOWN: u32 = 0;
pub const OP_SELECT: u32 = 1;
pub const OP_INSERT: u32 = 2;
pub const OP_UPDATE: u32 = 3;
pub const OP_DELETE: u32 = 4;
pub const OP_REPLACE: u32 = 5;
pub const OP_BEGIN: u32 = 6;
pub const OP_COMMIT: u32 = 7;
pub const OP_ROLLBACK: u32 = 8;
pub const OP_SET: u32 = 9;
pub const OP_SHOW: u32 = 10;
pub const OP_CALL: u32 = 11;
pub const OP_OTHER: u32 = 12;
pub const OP_STMT_EXECUTE: u32 = 13;
pub const OP_STMT_PREPARE: u32 = 14;
pub const OP_STMT_FETCH: u32 = 15;
pub const OP_STMT_RESET: u32 = 16;
pub const OP_STMT_CLOSE: u32 = 17;
pub const OP_PING: u32 = 18;
pub const OP_INIT_DB: u32 = 19;
pub const OP_QUIT: u32 = 20;
pub const OP_FIELD_LIST: u32 = 21;
pub const OP_STATISTICS: u32 = 22;
pub const OP_CHANGE_USER: u32 = 23;
pub const OP_SET_OPTION: u32 = 24;
pub const OP_RESET_CONNECTION: u32 = 25;
pub const OP_COM_OTHER: u32 = 26;
/// Operation codes per port.
pub const OPS: usize = 27;

/// `db.operation.name` of each operation code.
pub const OP_NAMES: [&str; OPS] = [
    "UNKNOWN",
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "REPLACE",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SET",
    "SHOW",
    "CALL",
    "OTHER",
    "COM_STMT_EXECUTE",
    "COM_STMT_PREPARE",
    "COM_STMT_FETCH",
    "COM_STMT_RESET",
    "COM_STMT_CLOSE",
    "COM_PING",
    "COM_INIT_DB",
    "COM_QUIT",
    "COM_FIELD_LIST",
    "COM_STATISTICS",
    "COM_CHANGE_USER",
    "COM_SET_OPTION",
    "COM_RESET_CONNECTION",
    "COM_OTHER",
];

pub const COM_QUERY: u8 = 0x03;
pub const COM_CHANGE_USER: u8 = 0x11;
pub const COM_STMT_PREPARE: u8 = 0x16;
pub const COM_STMT_EXECUTE: u8 = 0x17;
pub const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
pub const COM_STMT_CLOSE: u8 = 0x19;

/// The operation of a request from its command byte (`req[4]`). COM_QUERY and
/// COM_STMT_PREPARE need [`statement_kind`] as well; COM_STMT_EXECUTE is named by its
/// prepared statement's kind where the kernel knows it.
#[inline(always)]
pub fn command_op(cmd: u8) -> u32 {
    match cmd {
        0x01 => OP_QUIT,
        0x02 => OP_INIT_DB,
        0x04 => OP_FIELD_LIST,
        0x09 => OP_STATISTICS,
        0x0e => OP_PING,
        0x11 => OP_CHANGE_USER,
        0x16 => OP_STMT_PREPARE,
        0x17 => OP_STMT_EXECUTE,
        0x19 => OP_STMT_CLOSE,
        0x1a => OP_STMT_RESET,
        0x1b => OP_SET_OPTION,
        0x1c => OP_STMT_FETCH,
        0x1f => OP_RESET_CONNECTION,
        _ => OP_COM_OTHER,
    }
}

/// Up to 8 letters of a keyword, upper case, packed big-endian into a u64.
const fn kw(s: &[u8]) -> u64 {
    let mut v = 0u64;
    let mut i = 0;
    while i < s.len() {
        v = (v << 8) | s[i] as u64;
        i += 1;
    }
    v
}

const SKIP: u8 = 0;
const BLOCK_COMMENT: u8 = 1;
const LINE_COMMENT: u8 = 2;
const WORD: u8 = 3;
const DONE: u8 = 4;

/// The kind of a statement (SELECT, INSERT, ...) from the first `len` bytes of a request
/// whose statement text starts at byte 5 (COM_QUERY, COM_STMT_PREPARE): its first keyword,
/// after whitespace, parentheses and comments. OTHER when it cannot tell.
#[inline(always)]
pub fn statement_kind(req: &[u8; super::REQ_PREFIX], len: u32) -> u32 {
    let mut state = SKIP;
    let mut word = 0u64;
    let mut letters = 0u32;
    let mut prev = 0u8;
    let mut i = 5;
    while i < super::REQ_PREFIX {
        if i as u32 >= len || state == DONE {
            break;
        }
        let b = req[i];
        match state {
            SKIP => {
                if (prev == b'/' && b != b'*') || (prev == b'-' && b != b'-') {
                    return OP_OTHER; // a lone '/' or '-' is not a comment
                }
                if b == b'*' && prev == b'/' {
                    state = BLOCK_COMMENT;
                    prev = 0; // "/*/" does not close the comment
                    i += 1;
                    continue;
                } else if (b == b'-' && prev == b'-') || b == b'#' {
                    state = LINE_COMMENT;
                } else if b.is_ascii_alphabetic() {
                    state = WORD;
                    word = (b & 0xdf) as u64;
                    letters = 1;
                } else if !(b == b' ' || b == b'\t' || b == b'\n' || b == b'\r' || b == b'(' || b == b'/' || b == b'-') {
                    return OP_OTHER;
                }
            }
            BLOCK_COMMENT => {
                if b == b'/' && prev == b'*' {
                    state = SKIP;
                    prev = 0;
                    i += 1;
                    continue;
                }
            }
            LINE_COMMENT => {
                if b == b'\n' {
                    state = SKIP;
                }
            }
            _ => {
                // WORD
                if b.is_ascii_alphabetic() {
                    word = (word << 8) | (b & 0xdf) as u64;
                    letters += 1;
                } else {
                    state = DONE;
                }
            }
        }
        prev = b;
        i += 1;
    }
    if state != WORD && state != DONE || letters > 8 {
        return OP_OTHER;
    }
    match word {
        w if w == kw(b"SELECT") || w == kw(b"WITH") => OP_SELECT,
        w if w == kw(b"INSERT") => OP_INSERT,
        w if w == kw(b"UPDATE") => OP_UPDATE,
        w if w == kw(b"DELETE") => OP_DELETE,
        w if w == kw(b"REPLACE") => OP_REPLACE,
        w if w == kw(b"BEGIN") || w == kw(b"START") => OP_BEGIN,
        w if w == kw(b"COMMIT") => OP_COMMIT,
        w if w == kw(b"ROLLBACK") => OP_ROLLBACK,
        w if w == kw(b"SET") => OP_SET,
        w if w == kw(b"SHOW") => OP_SHOW,
        w if w == kw(b"CALL") => OP_CALL,
        _ => OP_OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::REQ_PREFIX;

    fn q(sql: &str) -> ([u8; REQ_PREFIX], u32) {
        let mut v = [0u8; REQ_PREFIX];
        v[4] = COM_QUERY;
        let n = sql.len().min(REQ_PREFIX - 5);
        v[5..5 + n].copy_from_slice(&sql.as_bytes()[..n]);
        (v, (5 + n) as u32)
    }

    fn kind(sql: &str) -> &'static str {
        let (r, n) = q(sql);
        OP_NAMES[statement_kind(&r, n) as usize]
    }

    #[test]
    fn names_statements() {
        assert_eq!(kind("SELECT 1"), "SELECT");
        assert_eq!(kind("select c from sbtest1 where id=?"), "SELECT");
        assert_eq!(kind("  /* c */ insert into t values (1)"), "INSERT");
        assert_eq!(kind("/*/ x */update t set a=1"), "UPDATE");
        assert_eq!(kind("update t set a=1"), "UPDATE");
        assert_eq!(kind("DELETE FROM t"), "DELETE");
        assert_eq!(kind("(SELECT 1) UNION (SELECT 2)"), "SELECT");
        assert_eq!(kind("WITH x AS (SELECT 1) SELECT * FROM x"), "SELECT");
        assert_eq!(kind("-- note\nREPLACE INTO t VALUES (1)"), "REPLACE");
        assert_eq!(kind("# note\r\nBEGIN"), "BEGIN");
        assert_eq!(kind("START TRANSACTION"), "BEGIN");
        assert_eq!(kind("commit"), "COMMIT");
        assert_eq!(kind("ROLLBACK"), "ROLLBACK");
        assert_eq!(kind("SET autocommit=0"), "SET");
        assert_eq!(kind("SHOW TABLES"), "SHOW");
        assert_eq!(kind("CALL p()"), "CALL");
        assert_eq!(kind("/* unterminated"), "OTHER");
        assert_eq!(kind("/* a comment longer than the prefix */ SELECT 1"), "OTHER");
        assert_eq!(kind("SELECTED"), "OTHER");
        assert_eq!(kind("SEL"), "OTHER");
        assert_eq!(kind("ALTER TABLE t"), "OTHER");
        assert_eq!(kind("- SELECT"), "OTHER");
        assert_eq!(kind(""), "OTHER");
        assert_eq!(kind("123"), "OTHER");
        // The keyword may end exactly at the end of the prefix.
        assert_eq!(kind("                     DELETE"), "DELETE");
        assert_eq!(kind("                      DELETE"), "OTHER"); // cut to DELET
    }

    #[test]
    fn names_commands() {
        assert_eq!(OP_NAMES[command_op(0x17) as usize], "COM_STMT_EXECUTE");
        assert_eq!(OP_NAMES[command_op(0x0e) as usize], "COM_PING");
        assert_eq!(OP_NAMES[command_op(0x1f) as usize], "COM_RESET_CONNECTION");
        assert_eq!(OP_NAMES[command_op(0x42) as usize], "COM_OTHER");
    }
}
