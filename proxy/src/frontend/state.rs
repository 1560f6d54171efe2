//! Session state that the proxy replays on whichever backend connection serves a client
//! next, and the reasons that pin a client to one connection.

use crate::protocol::charset;
use crate::router::classify::PinReason;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Replayable session state: default schema, character set, and session variables.
/// A backend connection carries the same structure describing what is applied on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionVars {
    pub schema: Option<String>,
    pub charset: String,
    pub collation: Option<String>,
    /// Variables set away from the server default: lowercase name -> value as written.
    pub vars: BTreeMap<String, String>,
}

const CHARSET_VARS: &[&str] = &[
    "character_set_client",
    "character_set_connection",
    "character_set_results",
    "collation_connection",
];

impl SessionVars {
    pub fn new(schema: Option<String>, collation_id: u8) -> Self {
        let (cs, coll) = charset::by_id(collation_id);
        Self { schema, charset: cs.into(), collation: Some(coll.into()), vars: BTreeMap::new() }
    }

    pub fn set_var(&mut self, name: &str, value: &str) {
        if name == "autocommit" {
            let on = matches!(value.to_ascii_uppercase().trim_matches('\''), "1" | "ON" | "TRUE" | "DEFAULT");
            if on {
                self.vars.remove("autocommit");
            } else {
                self.vars.insert("autocommit".into(), "0".into());
            }
            return;
        }
        if value.eq_ignore_ascii_case("DEFAULT") {
            self.vars.remove(name);
        } else {
            self.vars.insert(name.to_string(), value.to_string());
        }
    }

    pub fn set_names(&mut self, charset: &str, collation: Option<&str>) {
        self.charset = charset.trim_matches('\'').to_string();
        self.collation = collation.map(|c| c.trim_matches('\'').to_string());
        for v in CHARSET_VARS {
            self.vars.remove(*v);
        }
    }

    /// The SET statement that makes a connection in state `current` match `self`
    /// (schema excluded: that is COM_INIT_DB). None when nothing differs.
    pub fn sync_statement(&self, current: &SessionVars) -> Option<String> {
        let mut parts: Vec<String> = Vec::new();
        if self.charset != current.charset || self.collation != current.collation {
            let mut s = format!("NAMES {}", self.charset);
            if let Some(c) = &self.collation {
                let _ = write!(s, " COLLATE {c}");
            }
            parts.push(s);
        }
        for (name, cur) in &current.vars {
            if !self.vars.contains_key(name) {
                let default = if name == "autocommit" { "1" } else { "DEFAULT" };
                parts.push(format!("{name} = {default}"));
            } else if self.vars.get(name) != Some(cur) {
                parts.push(format!("{name} = {}", self.vars[name]));
            }
        }
        for (name, v) in &self.vars {
            if !current.vars.contains_key(name) {
                parts.push(format!("{name} = {v}"));
            }
        }
        (!parts.is_empty()).then(|| format!("SET {}", parts.join(", ")))
    }
}

/// What the response to a statement says about the session, as far as the session state
/// needs it (a [`crate::protocol::response::Walker`]'s summary).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub ok: bool,
    /// Status flags of the last OK/EOF (IN_TRANS, AUTOCOMMIT).
    pub status: u16,
    pub warnings: u16,
    /// The statement was SELECT SQL_CALC_FOUND_ROWS.
    pub calc_found_rows: bool,
    /// The text held several statements.
    pub multi: bool,
}

/// Where the connection goes after a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The client stays on it (transaction, locks, state that cannot be replayed).
    Pin,
    /// Kept for the client's next command only (its diagnostics are on it).
    Hold,
    /// Back to the pool.
    Release,
}

/// Apply a finished statement's effects to the client's state and to the state of the
/// connection it ran on, and decide where that connection goes. Pure: no I/O, so every
/// combination is unit-tested below. Returns (disposition, whether the connection holds
/// state no other client may see, whether the client just became pinned).
pub fn apply(pins: &mut Pins, client: &mut SessionVars, conn: &mut SessionVars, effects: &[crate::router::classify::Effect], out: Outcome) -> (Disposition, bool, bool) {
    use crate::protocol::status;
    use crate::router::classify::Effect;
    let was_pinned = pins.any();
    // A multi-statement that failed part-way ran only some of its state changes, and which
    // is not known: the connection has the truth, the client stays on it.
    if out.multi && !out.ok && effects.iter().any(|e| matches!(e, Effect::SetVar(..) | Effect::SetNames(..) | Effect::Use(_))) {
        pins.add(crate::router::classify::PinReason::Other("multi-statement failed part-way (session state unknown)"));
    }
    for e in effects {
        match e {
            Effect::SetVar(n, v) if out.ok => {
                client.set_var(n, v);
                conn.set_var(n, v);
            }
            Effect::SetNames(cs, coll) if out.ok => {
                client.set_names(cs, coll.as_deref());
                conn.set_names(cs, coll.as_deref());
            }
            Effect::Use(db) if out.ok => {
                client.schema = Some(db.clone());
                conn.schema = Some(db.clone());
            }
            Effect::Pin(r) => pins.add(r.clone()),
            Effect::UnlockTables => pins.lock_tables = false,
            Effect::ReleaseLock => pins.named_locks = pins.named_locks.saturating_sub(1),
            Effect::ReleaseAllLocks => pins.named_locks = 0,
            _ => {}
        }
    }
    pins.transaction = out.status & status::IN_TRANS != 0;
    pins.autocommit_off = out.status & status::AUTOCOMMIT == 0;
    let dirty = pins.lock_tables || pins.named_locks > 0 || !pins.sticky.is_empty() || pins.long_data;
    let d = if pins.any() {
        Disposition::Pin
    } else if out.warnings > 0 || !out.ok || out.calc_found_rows {
        Disposition::Hold
    } else {
        Disposition::Release
    };
    (d, dirty, d == Disposition::Pin && !was_pinned)
}

/// What keeps a client on its current backend connection.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    pub transaction: bool,
    pub autocommit_off: bool,
    pub lock_tables: bool,
    pub named_locks: u32,
    /// Pins that last until the session ends or is reset (state that cannot be replayed).
    pub sticky: Vec<PinReason>,
    pub cursor: bool,
    pub long_data: bool,
}

impl Pins {
    pub fn any(&self) -> bool {
        self.transaction
            || self.autocommit_off
            || self.lock_tables
            || self.named_locks > 0
            || !self.sticky.is_empty()
            || self.cursor
            || self.long_data
    }

    /// The first reason, for logs and stats.
    pub fn reason(&self) -> Option<PinReason> {
        if self.transaction {
            Some(PinReason::Transaction)
        } else if self.autocommit_off {
            Some(PinReason::AutocommitOff)
        } else if self.lock_tables {
            Some(PinReason::LockTables)
        } else if self.named_locks > 0 {
            Some(PinReason::NamedLock)
        } else if let Some(r) = self.sticky.first() {
            Some(r.clone())
        } else if self.cursor {
            Some(PinReason::Cursor)
        } else if self.long_data {
            Some(PinReason::LongData)
        } else {
            None
        }
    }

    /// Whether the backend connection holds state that a pool must not hand to another client.
    pub fn dirty(&self) -> bool {
        self.lock_tables || self.named_locks > 0 || !self.sticky.is_empty() || self.transaction
    }

    pub fn add(&mut self, r: PinReason) {
        match r {
            PinReason::Transaction => self.transaction = true,
            PinReason::AutocommitOff => self.autocommit_off = true,
            PinReason::LockTables => self.lock_tables = true,
            PinReason::NamedLock => self.named_locks += 1,
            PinReason::Cursor => self.cursor = true,
            PinReason::LongData => self.long_data = true,
            other => {
                if !self.sticky.contains(&other) {
                    self.sticky.push(other)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_statement_restores_and_resets() {
        let base = SessionVars::new(Some("sbtest".into()), 45);
        assert_eq!(base.sync_statement(&base), None);
        let mut client = base.clone();
        client.set_var("sql_mode", "'ANSI'");
        client.set_names("latin1", None);
        assert_eq!(client.sync_statement(&base).as_deref(), Some("SET NAMES latin1, sql_mode = 'ANSI'"));
        // A connection left with another client's settings is put back to defaults.
        let mut conn = base.clone();
        conn.set_var("time_zone", "'+02:00'");
        conn.set_var("autocommit", "0");
        assert_eq!(base.sync_statement(&conn).as_deref(), Some("SET autocommit = 1, time_zone = DEFAULT"));
        let mut c2 = base.clone();
        c2.set_var("autocommit", "ON");
        assert_eq!(c2, base);
    }

    #[test]
    fn apply_decides_where_the_connection_goes() {
        use crate::protocol::status::{AUTOCOMMIT, IN_TRANS};
        use crate::router::classify::analyze;
        let base = SessionVars::new(Some("sbtest".into()), 45);
        let run = |pins: &mut Pins, sql: &str, out: Outcome| {
            let (mut c, mut k) = (base.clone(), base.clone());
            let r = apply(pins, &mut c, &mut k, &analyze(sql.as_bytes()).effects, out);
            (r, c, k)
        };
        let ok = Outcome { ok: true, status: AUTOCOMMIT, ..Default::default() };
        let mut p = Pins::default();
        // A replayable SET moves with the client; the connection goes back to the pool.
        let ((d, dirty, _), c, k) = run(&mut p, "SET time_zone = '+01:00'", ok);
        assert_eq!((d, dirty), (Disposition::Release, false));
        assert_eq!(c.vars.get("time_zone"), Some(&"'+01:00'".to_string()));
        assert_eq!(c, k, "the connection now has the client's state");
        // A failed SET changes nothing.
        let ((d, _, _), c, _) = run(&mut p, "SET time_zone = 'bogus'", Outcome { ok: false, ..ok });
        assert_eq!(d, Disposition::Hold, "its error is on that connection");
        assert_eq!(c, base);
        // BEGIN pins until the server says the transaction is over.
        let ((d, _, newly), _, _) = run(&mut p, "BEGIN", Outcome { status: AUTOCOMMIT | IN_TRANS, ..ok });
        assert_eq!((d, newly), (Disposition::Pin, true));
        let ((d, _, newly), _, _) = run(&mut p, "INSERT INTO t VALUES (1)", Outcome { status: AUTOCOMMIT | IN_TRANS, ..ok });
        assert_eq!((d, newly), (Disposition::Pin, false));
        let ((d, _, _), _, _) = run(&mut p, "COMMIT", ok);
        assert_eq!(d, Disposition::Release);
        // autocommit=0 keeps it; a named lock keeps it dirty until released.
        let ((d, _, _), _, _) = run(&mut p, "SET autocommit = 0", Outcome { status: 0, ..ok });
        assert_eq!(d, Disposition::Pin);
        let ((d, _, _), _, _) = run(&mut p, "SET autocommit = 1", ok);
        assert_eq!(d, Disposition::Release);
        let ((d, dirty, _), _, _) = run(&mut p, "SELECT GET_LOCK('a', 1)", ok);
        assert_eq!((d, dirty), (Disposition::Pin, true));
        let ((d, dirty, _), _, _) = run(&mut p, "SELECT RELEASE_LOCK('a')", ok);
        assert_eq!((d, dirty), (Disposition::Release, false));
        // Warnings and SQL_CALC_FOUND_ROWS: held for the next command.
        assert_eq!(run(&mut p, "INSERT INTO t VALUES (1)", Outcome { warnings: 1, ..ok }).0 .0, Disposition::Hold);
        assert_eq!(run(&mut p, "SELECT SQL_CALC_FOUND_ROWS a FROM t LIMIT 1", Outcome { calc_found_rows: true, ..ok }).0 .0, Disposition::Hold);
        // A multi-statement that fails after a SET: its state is unknown, the client stays.
        let ((d, dirty, _), c, _) = run(&mut p, "SET sql_mode = 'ANSI'; SELECT * FROM nope", Outcome { ok: false, multi: true, ..ok });
        assert_eq!((d, dirty, c), (Disposition::Pin, true, base.clone()));
        let mut p = Pins::default();
        // CALL pins (a procedure may SET anything).
        assert_eq!(run(&mut p, "CALL p()", ok).0 .0, Disposition::Pin);
        let mut p = Pins::default();
        // State that cannot be replayed pins for good and marks the connection dirty.
        let ((d, dirty, _), _, _) = run(&mut p, "SET @x = 1", ok);
        assert_eq!((d, dirty), (Disposition::Pin, true));
    }

    #[test]
    fn pins() {
        let mut p = Pins::default();
        assert!(!p.any());
        p.add(PinReason::UserVariable);
        p.add(PinReason::UserVariable);
        assert_eq!(p.sticky.len(), 1);
        assert!(p.any() && p.dirty());
        assert_eq!(p.reason(), Some(PinReason::UserVariable));
    }
}
