//! Walks a backend's response packet by packet to find where it ends, without decoding rows.
//!
//! Only the first byte of each packet (and the status flags of the final OK/EOF) is read:
//! that is all the proxy needs to forward a response and to learn whether the backend
//! connection is now inside a transaction.

use super::codec::{self, read_lenenc};
use super::packet::MAX_PACKET;
use super::status;

/// What kind of command the response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// COM_QUERY, COM_STMT_EXECUTE: OK, ERR, or result sets (possibly several).
    ResultSet,
    /// COM_STMT_PREPARE: PREPARE_OK, parameter and column definitions.
    Prepare,
    /// COM_FIELD_LIST: column definitions up to EOF.
    FieldList,
    /// COM_STMT_FETCH: rows up to EOF.
    Fetch,
    /// COM_STATISTICS, COM_PING, COM_INIT_DB, …: exactly one packet.
    Single,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    First,
    Columns(u64),
    ColumnsEof,
    Rows,
    Params(u64),
    ParamsEof,
    Done,
}

/// PREPARE_OK fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepareOk {
    pub statement_id: u32,
    pub columns: u16,
    pub params: u16,
}

#[derive(Debug)]
pub struct Walker {
    kind: Kind,
    state: State,
    continuation: bool,
    prepare_cols: u64,
    /// Status flags of the last OK/EOF seen.
    pub status: Option<u16>,
    /// The ERR packet's code, when the response (or one of its statements) failed.
    pub error: Option<codec::Err>,
    pub prepare: Option<PrepareOk>,
    pub rows: u64,
    pub affected_rows: u64,
    pub last_insert_id: u64,
    /// Warnings of the last OK/EOF (the last statement's, for a multi-statement query).
    pub warnings: u16,
    /// Affected rows of the last statement: its OK's count, or -1 when it returned a result
    /// set or failed (what ROW_COUNT() then says).
    pub row_count: i64,
    /// Whether the response held a result set (FOUND_ROWS() then counts its rows).
    pub result_set: bool,
}

impl Walker {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            state: State::First,
            continuation: false,
            prepare_cols: 0,
            status: None,
            error: None,
            prepare: None,
            rows: 0,
            affected_rows: 0,
            last_insert_id: 0,
            warnings: 0,
            row_count: -1,
            result_set: false,
        }
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Feed one physical packet payload (`len` is its length). Returns true when the response is complete.
    pub fn feed(&mut self, p: &[u8]) -> bool {
        let len = p.len();
        if self.continuation {
            // Part of a logical packet of 16 MiB or more: nothing to interpret.
            self.continuation = len == MAX_PACKET;
            return false;
        }
        self.continuation = len == MAX_PACKET;
        let first = p.first().copied().unwrap_or(0);
        let is_eof = first == 0xfe && len < 9;
        self.state = match (self.kind, self.state) {
            (_, State::Done) => State::Done,
            (Kind::Single, _) => {
                if is_eof {
                    // COM_SET_OPTION answers with an EOF packet.
                    self.status = Some(codec::eof_status(p));
                    self.warnings = codec::eof_warnings(p);
                } else {
                    self.on_ok_or_err(p);
                }
                State::Done
            }
            (Kind::ResultSet, State::First) => match first {
                0x00 => {
                    self.on_ok_or_err(p);
                    self.after_final()
                }
                0xff | 0xfb => {
                    self.on_ok_or_err(p);
                    State::Done
                }
                _ => {
                    let mut pos = 0;
                    self.result_set = true;
                    self.row_count = -1;
                    match read_lenenc(p, &mut pos) {
                        Some(n) if n > 0 => State::Columns(n),
                        _ => State::Done, // malformed: stop here rather than hang
                    }
                }
            },
            (Kind::ResultSet, State::Columns(n)) => {
                if n > 1 {
                    State::Columns(n - 1)
                } else {
                    State::ColumnsEof
                }
            }
            (Kind::ResultSet, State::ColumnsEof) => {
                if first == 0xff {
                    self.on_ok_or_err(p);
                    State::Done
                } else {
                    let st = codec::eof_status(p);
                    self.status = Some(st);
                    if st & status::CURSOR_EXISTS != 0 {
                        State::Done
                    } else {
                        State::Rows
                    }
                }
            }
            (Kind::ResultSet, State::Rows) | (Kind::Fetch, _) => {
                if is_eof {
                    self.status = Some(codec::eof_status(p));
                    self.warnings = codec::eof_warnings(p);
                    self.after_final()
                } else if first == 0xff {
                    self.on_ok_or_err(p);
                    State::Done
                } else {
                    self.rows += 1;
                    State::Rows
                }
            }
            (Kind::FieldList, _) => {
                if is_eof {
                    self.status = Some(codec::eof_status(p));
                    State::Done
                } else if first == 0xff {
                    self.on_ok_or_err(p);
                    State::Done
                } else {
                    State::Columns(u64::MAX)
                }
            }
            (Kind::Prepare, State::First) => {
                if first == 0x00 && len >= 9 {
                    let ok = PrepareOk {
                        statement_id: u32::from_le_bytes([p[1], p[2], p[3], p[4]]),
                        columns: u16::from_le_bytes([p[5], p[6]]),
                        params: u16::from_le_bytes([p[7], p[8]]),
                    };
                    self.prepare = Some(ok);
                    self.prepare_cols = ok.columns as u64;
                    if ok.params > 0 {
                        State::Params(ok.params as u64)
                    } else if ok.columns > 0 {
                        State::Columns(ok.columns as u64)
                    } else {
                        State::Done
                    }
                } else {
                    self.on_ok_or_err(p);
                    State::Done
                }
            }
            (Kind::Prepare, State::Params(n)) => {
                if n > 1 {
                    State::Params(n - 1)
                } else {
                    State::ParamsEof
                }
            }
            (Kind::Prepare, State::ParamsEof) => {
                if self.prepare_cols > 0 {
                    State::Columns(self.prepare_cols)
                } else {
                    State::Done
                }
            }
            (Kind::Prepare, State::Columns(n)) => {
                if n > 1 {
                    State::Columns(n - 1)
                } else {
                    State::ColumnsEof
                }
            }
            (Kind::Prepare, State::ColumnsEof) => State::Done,
            (_, _) => State::Done,
        };
        self.state == State::Done
    }

    fn on_ok_or_err(&mut self, p: &[u8]) {
        if let Some(ok) = codec::parse_ok(p) {
            self.status = Some(ok.status);
            self.affected_rows += ok.affected_rows;
            self.last_insert_id = ok.last_insert_id;
            self.warnings = ok.warnings;
            self.row_count = ok.affected_rows as i64;
        } else if let Some(e) = codec::parse_err(p) {
            self.error = Some(e);
            self.row_count = -1;
        }
    }

    fn after_final(&self) -> State {
        match self.status {
            Some(st) if st & status::MORE_RESULTS_EXISTS != 0 => State::First,
            _ => State::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::{eof_packet, err_packet, ok_packet};

    fn feed_all(kind: Kind, packets: &[Vec<u8>]) -> (Walker, usize) {
        let mut w = Walker::new(kind);
        for (i, p) in packets.iter().enumerate() {
            if w.feed(p) {
                return (w, i + 1);
            }
        }
        (w, usize::MAX)
    }

    #[test]
    fn result_set_with_rows_and_more_results() {
        let more = status::AUTOCOMMIT | status::MORE_RESULTS_EXISTS;
        let packets = vec![
            vec![2],                  // 2 columns
            vec![3, b'd', b'e', b'f'], // column def
            vec![3, b'd', b'e', b'f'],
            eof_packet(status::AUTOCOMMIT, 0),
            vec![1, b'1', 0xfb],       // row
            vec![0xfe, 1, 2, 3, 4, 5, 6, 7, 8, 9], // row starting with 0xfe, long: not EOF
            eof_packet(more, 0),
            ok_packet(1, 0, status::IN_TRANS, 0), // second result: OK, last
        ];
        let (w, n) = feed_all(Kind::ResultSet, &packets);
        assert_eq!(n, packets.len());
        assert_eq!(w.rows, 2);
        assert_eq!(w.status, Some(status::IN_TRANS));
    }

    #[test]
    fn error_ends_response() {
        let (w, n) = feed_all(Kind::ResultSet, &[err_packet(1064, "42000", "syntax"), vec![0]]);
        assert_eq!(n, 1);
        assert_eq!(w.error.map(|e| e.code), Some(1064));
        let (_, n) = feed_all(Kind::ResultSet, &[vec![1], vec![3], eof_packet(2, 0), err_packet(1317, "70100", "killed")]);
        assert_eq!(n, 4);
    }

    #[test]
    fn prepare_ok_with_params_and_columns() {
        let mut ok = vec![0, 7, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0];
        ok.truncate(12);
        let packets = vec![ok, vec![3], vec![3], eof_packet(2, 0), vec![3], eof_packet(2, 0)];
        let (w, n) = feed_all(Kind::Prepare, &packets);
        assert_eq!(n, packets.len());
        let p = w.prepare.unwrap();
        assert_eq!((p.statement_id, p.columns, p.params), (7, 1, 2));
        let (_, n) = feed_all(Kind::Prepare, &[vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]);
        assert_eq!(n, 1);
    }

    #[test]
    fn field_list_ends_at_eof() {
        let (_, n) = feed_all(Kind::FieldList, &[vec![3], vec![3], vec![3], eof_packet(2, 0), vec![0]]);
        assert_eq!(n, 4);
        let (w, n) = feed_all(Kind::FieldList, &[err_packet(1146, "42S02", "no table"), vec![0]]);
        assert_eq!((n, w.error.map(|e| e.code)), (1, Some(1146)));
    }

    #[test]
    fn cursor_result_ends_after_column_eof() {
        let packets = vec![vec![1], vec![3], eof_packet(status::AUTOCOMMIT | status::CURSOR_EXISTS, 0)];
        let (_, n) = feed_all(Kind::ResultSet, &packets);
        assert_eq!(n, 3);
    }

    #[test]
    fn continuation_packets_are_not_interpreted() {
        let big = vec![0xfeu8; MAX_PACKET];
        let packets = vec![vec![1], vec![3], eof_packet(2, 0), big, vec![0xfe, 0, 0], eof_packet(2, 0)];
        let (w, n) = feed_all(Kind::ResultSet, &packets);
        assert_eq!(n, packets.len());
        assert_eq!(w.rows, 1);
    }
}
