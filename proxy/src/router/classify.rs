//! What a statement does to its connection: the session state it changes (which the proxy
//! replays on other backend connections) and the state it creates that cannot be replayed
//! (which pins the client to its backend connection).

use super::lexer::{eq_ci, Lexer, Tok};
use std::fmt;

/// Why a client is pinned to one backend connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinReason {
    Transaction,
    AutocommitOff,
    LockTables,
    NamedLock,
    TemporaryTable,
    UserVariable,
    SessionVariable(String),
    SqlPrepare,
    FoundRows,
    NextTransactionSettings,
    Cursor,
    LongData,
    Other(&'static str),
}

impl fmt::Display for PinReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinReason::Transaction => write!(f, "transaction"),
            PinReason::AutocommitOff => write!(f, "autocommit=0"),
            PinReason::LockTables => write!(f, "LOCK TABLES"),
            PinReason::NamedLock => write!(f, "GET_LOCK"),
            PinReason::TemporaryTable => write!(f, "temporary table"),
            PinReason::UserVariable => write!(f, "user variable"),
            PinReason::SessionVariable(v) => write!(f, "session variable {v}"),
            PinReason::SqlPrepare => write!(f, "SQL PREPARE"),
            PinReason::FoundRows => write!(f, "SQL_CALC_FOUND_ROWS"),
            PinReason::NextTransactionSettings => write!(f, "SET TRANSACTION"),
            PinReason::Cursor => write!(f, "cursor"),
            PinReason::LongData => write!(f, "long data"),
            PinReason::Other(s) => write!(f, "{s}"),
        }
    }
}

/// The pin reason of CALL (`[proxy] multiplex_after_call = true` drops it).
pub const CALL_PIN: &str = "CALL (a procedure may change session state)";

/// One effect of a statement on its session, applied once the backend says OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A replayable session variable: name (lowercase) and value as written.
    SetVar(String, String),
    /// SET NAMES / CHARACTER SET: charset and optional collation.
    SetNames(String, Option<String>),
    Use(String),
    Pin(PinReason),
    UnlockTables,
    ReleaseLock,
    ReleaseAllLocks,
}

/// Session variables that can be replayed on another connection with `SET name = value`.
const REPLAYABLE: &[&str] = &[
    "autocommit",
    "sql_mode",
    "time_zone",
    "character_set_client",
    "character_set_connection",
    "character_set_results",
    "collation_connection",
    "tx_isolation",
    "transaction_isolation",
    "tx_read_only",
    "transaction_read_only",
    "sql_auto_is_null",
    "sql_safe_updates",
    "sql_select_limit",
    "sql_big_selects",
    "sql_quote_show_create",
    "group_concat_max_len",
    "max_execution_time",
    "max_statement_time",
    "innodb_lock_wait_timeout",
    "lock_wait_timeout",
    "wait_timeout",
    "net_read_timeout",
    "net_write_timeout",
    "foreign_key_checks",
    "unique_checks",
    "div_precision_increment",
    "sql_notes",
    "sql_warnings",
    "big_tables",
    "join_buffer_size",
    "sort_buffer_size",
    "tmp_table_size",
    "max_heap_table_size",
    "optimizer_search_depth",
    "long_query_time",
    "sql_log_bin",
];

/// The statement kind, by its first keyword: `db.operation.name` and the read/write decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    Replace,
    Set,
    Use,
    Begin,
    Commit,
    Rollback,
    Show,
    Call,
    Other,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Select => "SELECT",
            Kind::Insert => "INSERT",
            Kind::Update => "UPDATE",
            Kind::Delete => "DELETE",
            Kind::Replace => "REPLACE",
            Kind::Set => "SET",
            Kind::Use => "USE",
            Kind::Begin => "BEGIN",
            Kind::Commit => "COMMIT",
            Kind::Rollback => "ROLLBACK",
            Kind::Show => "SHOW",
            Kind::Call => "CALL",
            Kind::Other => "OTHER",
        }
    }
}

/// How a statement uses LAST_INSERT_ID() (or @@identity / @@last_insert_id).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LastInsertId {
    #[default]
    No,
    /// Reads it: the connection must hold this client's value.
    Reads,
    /// LAST_INSERT_ID(expr) sets it on the connection it runs on.
    Sets,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub kind: Option<Kind>,
    pub effects: Vec<Effect>,
    /// More than one statement in the text.
    pub multi: bool,
    /// A plain read: every statement is a SELECT without locking clauses.
    pub read_only: bool,
    pub last_insert_id: LastInsertId,
    /// Refers to the previous statement's diagnostics: ROW_COUNT(), FOUND_ROWS(),
    /// @@warning_count, @@error_count, SHOW WARNINGS / ERRORS / COUNT(*), GET DIAGNOSTICS.
    pub diagnostics: bool,
    /// SELECT SQL_CALC_FOUND_ROWS: the next FOUND_ROWS() needs this statement's connection.
    pub calc_found_rows: bool,
    /// The text was longer than the analysis cap: only its first bytes were analysed (the
    /// rest was scanned for statement boundaries and session-state tokens).
    pub truncated: bool,
}

fn kind_of(w: &[u8]) -> Kind {
    let k = |s| eq_ci(w, s);
    if k("SELECT") {
        Kind::Select
    } else if k("INSERT") {
        Kind::Insert
    } else if k("UPDATE") {
        Kind::Update
    } else if k("DELETE") {
        Kind::Delete
    } else if k("REPLACE") {
        Kind::Replace
    } else if k("SET") {
        Kind::Set
    } else if k("USE") {
        Kind::Use
    } else if k("BEGIN") || k("START") {
        Kind::Begin
    } else if k("COMMIT") {
        Kind::Commit
    } else if k("ROLLBACK") {
        Kind::Rollback
    } else if k("SHOW") {
        Kind::Show
    } else if k("CALL") {
        Kind::Call
    } else {
        Kind::Other
    }
}

/// Analyse a query's text (all statements of a multi-statement query).
pub fn analyze(sql: &[u8]) -> Analysis {
    analyze_capped(sql, usize::MAX)
}

/// Like [`analyze`], with tokens kept for the first `cap` bytes only (ProxySQL's
/// query_digests_max_query_length): a 20 MiB multi-row INSERT is not turned into millions
/// of tokens. The rest is lexed as a stream (strings and comments stay strings and
/// comments) and only what changes how the client must be served is looked for: another
/// statement, user variables, named locks, LAST_INSERT_ID and diagnostics functions.
pub fn analyze_capped(sql: &[u8], cap: usize) -> Analysis {
    let mut a = Analysis { read_only: true, ..Default::default() };
    let mut lx = Lexer::new(sql);
    let mut toks: Vec<Tok> = Vec::new();
    let mut tail = false;
    while let Some(t) = lx.next() {
        toks.push(t);
        if lx.pos() >= cap {
            tail = true;
            break;
        }
    }
    if tail {
        a.truncated = true;
        scan_tail(&mut lx, &mut a);
    }
    let statements = toks.split(|t| *t == Tok::Punct(b';')).filter(|s| !s.is_empty()).peekable();
    let mut count = 0;
    for stmt in statements {
        count += 1;
        analyze_statement(stmt, &mut a);
    }
    a.multi = a.multi || count > 1;
    if a.kind.is_none() {
        a.read_only = false;
    }
    a
}

/// The part of a statement past the analysis cap: no tokens kept, one token of lookahead.
fn scan_tail(lx: &mut Lexer, a: &mut Analysis) {
    let mut prev: Option<Tok> = None;
    let mut after_semicolon = false;
    while let Some(t) = lx.next() {
        match (prev, t) {
            (_, Tok::Punct(b';')) => after_semicolon = true,
            (_, _) if after_semicolon => {
                // Another statement whose effects were not analysed: serve it like a
                // multi-statement write, on a connection of its own.
                after_semicolon = false;
                if !a.multi {
                    a.multi = true;
                    a.read_only = false;
                    a.effects.push(Effect::Pin(PinReason::Other("multi-statement longer than query_digests_max_query_length")));
                }
            }
            _ => {}
        }
        match (prev, t) {
            (_, Tok::UserVar(_)) if !a.effects.contains(&Effect::Pin(PinReason::UserVariable)) => {
                a.effects.push(Effect::Pin(PinReason::UserVariable));
            }
            (_, Tok::SysVar(v)) => sysvar_use(v, a),
            (Some(Tok::Word(w)), Tok::Punct(b'(')) => function_use(w, None, a),
            _ => {}
        }
        // LAST_INSERT_ID(expr) in the tail: a setter unless the next token closes it.
        if let (Some(Tok::Word(w)), Tok::Punct(b'(')) = (prev, t) {
            if eq_ci(w, "LAST_INSERT_ID") {
                if let Some(n) = lx.next() {
                    let use_ = if n == Tok::Punct(b')') { LastInsertId::Reads } else { LastInsertId::Sets };
                    a.last_insert_id = a.last_insert_id.max(use_);
                    prev = Some(n);
                    continue;
                }
            }
        }
        prev = Some(t);
    }
}

/// @@identity, @@last_insert_id, @@warning_count, @@error_count (session scope).
fn sysvar_use(v: &[u8], a: &mut Analysis) {
    let name = v
        .strip_prefix(b"session.")
        .or_else(|| v.strip_prefix(b"SESSION."))
        .or_else(|| v.strip_prefix(b"local."))
        .or_else(|| v.strip_prefix(b"LOCAL."))
        .unwrap_or(v);
    if eq_ci(name, "identity") || eq_ci(name, "last_insert_id") {
        a.last_insert_id = a.last_insert_id.max(LastInsertId::Reads);
    } else if eq_ci(name, "warning_count") || eq_ci(name, "error_count") {
        a.diagnostics = true;
    }
}

/// A function call `w(`; `next` is the token after the parenthesis when known.
fn function_use(w: &[u8], next: Option<&Tok>, a: &mut Analysis) {
    if eq_ci(w, "GET_LOCK") {
        a.effects.push(Effect::Pin(PinReason::NamedLock));
    } else if eq_ci(w, "RELEASE_LOCK") {
        a.effects.push(Effect::ReleaseLock);
    } else if eq_ci(w, "RELEASE_ALL_LOCKS") {
        a.effects.push(Effect::ReleaseAllLocks);
    } else if eq_ci(w, "ROW_COUNT") || eq_ci(w, "FOUND_ROWS") {
        a.diagnostics = true;
    } else if eq_ci(w, "LAST_INSERT_ID") {
        if let Some(n) = next {
            let use_ = if *n == Tok::Punct(b')') { LastInsertId::Reads } else { LastInsertId::Sets };
            a.last_insert_id = a.last_insert_id.max(use_);
        }
    }
}

fn first_word<'a>(stmt: &[Tok<'a>]) -> Option<(usize, &'a [u8])> {
    stmt.iter().enumerate().find_map(|(i, t)| match t {
        Tok::Word(w) => Some((i, *w)),
        _ => None,
    })
}

fn analyze_statement(stmt: &[Tok], a: &mut Analysis) {
    let Some((first_i, first)) = first_word(stmt) else {
        return;
    };
    let kind = kind_of(first);
    if a.kind.is_none() {
        a.kind = Some(kind);
    }
    if kind != Kind::Select {
        a.read_only = false;
    }
    let word = |i: usize, s: &str| matches!(stmt.get(i), Some(Tok::Word(w)) if eq_ci(w, s));
    // Things anywhere in the statement.
    let mut user_var = false;
    for (i, t) in stmt.iter().enumerate() {
        match t {
            Tok::UserVar(_) => user_var = true,
            Tok::SysVar(v) => sysvar_use(v, a),
            Tok::Word(w) if stmt.get(i + 1) == Some(&Tok::Punct(b'(')) => function_use(w, stmt.get(i + 2).or(Some(&Tok::Punct(b';'))), a),
            Tok::Word(w) if eq_ci(w, "SQL_CALC_FOUND_ROWS") => a.calc_found_rows = true,
            Tok::Word(w) if kind == Kind::Select && (eq_ci(w, "UPDATE") || eq_ci(w, "SHARE")) => {
                // SELECT … FOR UPDATE / LOCK IN SHARE MODE / FOR SHARE
                a.read_only = false;
            }
            Tok::Word(w) if kind == Kind::Select && eq_ci(w, "INTO") => a.read_only = false,
            _ => {}
        }
    }
    if user_var && kind != Kind::Set {
        a.effects.push(Effect::Pin(PinReason::UserVariable));
    }
    let i = first_i;
    if (kind == Kind::Show && (word(i + 1, "WARNINGS") || word(i + 1, "ERRORS") || word(i + 1, "COUNT")))
        || (eq_ci(first, "GET") && (word(i + 1, "DIAGNOSTICS") || word(i + 2, "DIAGNOSTICS")))
    {
        a.diagnostics = true;
    }
    match kind {
        Kind::Set => analyze_set(&stmt[i + 1..], a),
        // A procedure may SET anything, create temporary tables, set user variables: state
        // the proxy cannot see. The connection knows it: the client stays on it.
        Kind::Call => a.effects.push(Effect::Pin(PinReason::Other(CALL_PIN))),
        Kind::Use => {
            if let Some(db) = stmt.get(i + 1).and_then(ident) {
                a.effects.push(Effect::Use(db));
            }
        }
        Kind::Other => {
            if eq_ci(first, "LOCK") && (word(i + 1, "TABLES") || word(i + 1, "TABLE")) {
                a.effects.push(Effect::Pin(PinReason::LockTables));
            } else if eq_ci(first, "UNLOCK") {
                a.effects.push(Effect::UnlockTables);
            } else if eq_ci(first, "CREATE") && word(i + 1, "TEMPORARY") {
                a.effects.push(Effect::Pin(PinReason::TemporaryTable));
            } else if eq_ci(first, "PREPARE") || eq_ci(first, "EXECUTE") || eq_ci(first, "DEALLOCATE") {
                a.effects.push(Effect::Pin(PinReason::SqlPrepare));
            } else if eq_ci(first, "XA") {
                a.effects.push(Effect::Pin(PinReason::Other("XA transaction")));
            } else if eq_ci(first, "HANDLER") {
                a.effects.push(Effect::Pin(PinReason::Other("HANDLER")));
            }
        }
        _ => {}
    }
}

fn ident(t: &Tok) -> Option<String> {
    match t {
        Tok::Word(w) | Tok::Quoted(w) => Some(String::from_utf8_lossy(w).into_owned()),
        Tok::Str(s) if s.len() >= 2 => Some(String::from_utf8_lossy(&s[1..s.len() - 1]).into_owned()),
        _ => None,
    }
}

fn tok_text(t: &Tok) -> String {
    match t {
        Tok::Word(w) | Tok::Str(w) | Tok::Num(w) => String::from_utf8_lossy(w).into_owned(),
        Tok::Quoted(w) => format!("`{}`", String::from_utf8_lossy(w)),
        _ => String::new(),
    }
}

/// SET a = 1, @@session.b = 'x', NAMES utf8mb4 COLLATE c, SESSION TRANSACTION ISOLATION LEVEL …
fn analyze_set(toks: &[Tok], a: &mut Analysis) {
    // Split at top-level commas.
    let mut depth = 0i32;
    let mut parts: Vec<&[Tok]> = Vec::new();
    let mut start = 0;
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') => depth -= 1,
            Tok::Punct(b',') if depth == 0 => {
                parts.push(&toks[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&toks[start..]);
    for part in parts {
        set_one(part, a);
    }
}

fn set_one(mut p: &[Tok], a: &mut Analysis) {
    let w = |t: Option<&Tok>, s: &str| matches!(t, Some(Tok::Word(x)) if eq_ci(x, s));
    let mut global = false;
    if w(p.first(), "SESSION") || w(p.first(), "LOCAL") {
        p = &p[1..];
    } else if w(p.first(), "GLOBAL") {
        global = true;
        p = &p[1..];
    }
    if w(p.first(), "NAMES") || w(p.first(), "CHARSET") || (w(p.first(), "CHARACTER") && w(p.get(1), "SET")) {
        let at = if w(p.first(), "CHARACTER") { 2 } else { 1 };
        let Some(cs) = p.get(at).and_then(ident) else {
            a.effects.push(Effect::Pin(PinReason::SessionVariable("NAMES".into())));
            return;
        };
        let coll = if w(p.get(at + 1), "COLLATE") { p.get(at + 2).and_then(ident) } else { None };
        if eq_ci(cs.as_bytes(), "DEFAULT") {
            a.effects.push(Effect::Pin(PinReason::SessionVariable("NAMES DEFAULT".into())));
        } else {
            a.effects.push(Effect::SetNames(cs, coll));
        }
        return;
    }
    if w(p.first(), "TRANSACTION") {
        if global {
            return;
        }
        // Only SET SESSION TRANSACTION … lasts; without SESSION it is for the next transaction.
        a.effects.push(Effect::Pin(PinReason::NextTransactionSettings));
        return;
    }
    // name = value
    let (name, rest): (String, &[Tok]) = match p.first() {
        Some(Tok::UserVar(_)) => {
            a.effects.push(Effect::Pin(PinReason::UserVariable));
            return;
        }
        Some(Tok::SysVar(v)) => {
            let v = String::from_utf8_lossy(v).to_ascii_lowercase();
            if let Some(n) = v.strip_prefix("global.") {
                let _ = n;
                return;
            }
            let n = v.strip_prefix("session.").or_else(|| v.strip_prefix("local.")).unwrap_or(&v);
            (n.to_string(), &p[1..])
        }
        Some(Tok::Word(n)) => (String::from_utf8_lossy(n).to_ascii_lowercase(), &p[1..]),
        _ => return,
    };
    if global {
        return;
    }
    let rest = match rest {
        [Tok::Punct(b'='), r @ ..] => r,
        [Tok::Punct(b':'), Tok::Punct(b'='), r @ ..] => r,
        _ => {
            a.effects.push(Effect::Pin(PinReason::SessionVariable(name)));
            return;
        }
    };
    let simple = match rest {
        [t @ (Tok::Str(_) | Tok::Num(_) | Tok::Word(_))] => Some(tok_text(t)),
        [Tok::Punct(b'-'), Tok::Num(n)] => Some(format!("-{}", String::from_utf8_lossy(n))),
        _ => None,
    };
    match simple {
        Some(v) if REPLAYABLE.contains(&name.as_str()) => a.effects.push(Effect::SetVar(name, v)),
        _ => a.effects.push(Effect::Pin(PinReason::SessionVariable(name))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fx(sql: &str) -> Vec<Effect> {
        analyze(sql.as_bytes()).effects
    }

    #[test]
    fn reads_and_writes() {
        assert!(analyze(b"SELECT c FROM sbtest1 WHERE id=1").read_only);
        assert!(analyze(b"/* hint */ select 1").read_only);
        assert!(!analyze(b"SELECT c FROM t WHERE id=1 FOR UPDATE").read_only);
        assert!(!analyze(b"SELECT c FROM t LOCK IN SHARE MODE").read_only);
        assert!(!analyze(b"INSERT INTO t VALUES (1)").read_only);
        assert!(!analyze(b"SELECT 1; DELETE FROM t").read_only);
        assert!(analyze(b"SELECT 1; DELETE FROM t").multi);
        assert_eq!(analyze(b"update t set a=1").kind, Some(Kind::Update));
        assert!(fx("SELECT c FROM t WHERE email='a@b.c'").is_empty());
    }

    #[test]
    fn session_state() {
        assert_eq!(
            fx("SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci"),
            vec![Effect::SetNames("utf8mb4".into(), Some("utf8mb4_unicode_ci".into()))]
        );
        assert_eq!(
            fx("SET @@session.sql_mode = 'ANSI', time_zone='+00:00', autocommit=0"),
            vec![
                Effect::SetVar("sql_mode".into(), "'ANSI'".into()),
                Effect::SetVar("time_zone".into(), "'+00:00'".into()),
                Effect::SetVar("autocommit".into(), "0".into()),
            ]
        );
        assert_eq!(fx("USE `sbtest`"), vec![Effect::Use("sbtest".into())]);
        assert_eq!(fx("SET GLOBAL max_connections=10"), vec![]);
        assert_eq!(
            fx("SET sql_mode = CONCAT(@@sql_mode, ',ANSI')"),
            vec![Effect::Pin(PinReason::SessionVariable("sql_mode".into()))]
        );
        assert_eq!(fx("SET @x = 1"), vec![Effect::Pin(PinReason::UserVariable)]);
        assert_eq!(fx("SELECT @x"), vec![Effect::Pin(PinReason::UserVariable)]);
        assert!(fx("SELECT @@version").is_empty());
    }

    #[test]
    fn pins() {
        assert_eq!(fx("LOCK TABLES t WRITE"), vec![Effect::Pin(PinReason::LockTables)]);
        assert_eq!(fx("unlock tables"), vec![Effect::UnlockTables]);
        assert_eq!(fx("CREATE TEMPORARY TABLE t (a int)"), vec![Effect::Pin(PinReason::TemporaryTable)]);
        assert_eq!(fx("SELECT GET_LOCK('a', 1)"), vec![Effect::Pin(PinReason::NamedLock)]);
        assert_eq!(fx("SELECT RELEASE_LOCK('a')"), vec![Effect::ReleaseLock]);
        assert!(analyze(b"SELECT SQL_CALC_FOUND_ROWS * FROM t").calc_found_rows);
    }

    #[test]
    fn previous_statement_functions() {
        let lid = |s: &str| analyze(s.as_bytes()).last_insert_id;
        assert_eq!(lid("INSERT INTO c VALUES (LAST_INSERT_ID(), 'x')"), LastInsertId::Reads);
        assert_eq!(lid("SELECT @@identity"), LastInsertId::Reads);
        assert_eq!(lid("select @@session.last_insert_id + 1"), LastInsertId::Reads);
        assert_eq!(lid("UPDATE seq SET id = LAST_INSERT_ID(id + 1)"), LastInsertId::Sets);
        assert_eq!(lid("SELECT 'LAST_INSERT_ID()'"), LastInsertId::No);
        let diag = |s: &str| analyze(s.as_bytes()).diagnostics;
        assert!(diag("SHOW WARNINGS") && diag("show errors limit 1") && diag("SHOW COUNT(*) WARNINGS"));
        assert!(diag("SELECT ROW_COUNT()") && diag("SELECT FOUND_ROWS()") && diag("SELECT @@warning_count"));
        assert!(diag("GET DIAGNOSTICS @n = NUMBER"));
        assert!(!diag("SELECT row_count FROM t") && !diag("SHOW TABLES"));
    }

    #[test]
    fn capped_analysis_keeps_what_matters_past_the_cap() {
        let mut big = String::from("INSERT INTO t VALUES ");
        for i in 0..2000 {
            big.push_str(&format!("({i}, 'a;b @c'),"));
        }
        big.push_str("(0, 'end')");
        let a = analyze_capped(big.as_bytes(), 100);
        assert!(a.truncated && !a.multi && a.effects.is_empty() && a.kind == Some(Kind::Insert), "{a:?}");
        let a = analyze_capped(format!("{big}; SET @x = 1").as_bytes(), 100);
        assert!(a.multi && !a.read_only);
        let a = analyze_capped(format!("{big}, (LAST_INSERT_ID(), @v)").as_bytes(), 100);
        assert_eq!(a.last_insert_id, LastInsertId::Reads);
        assert!(a.effects.contains(&Effect::Pin(PinReason::UserVariable)));
        assert_eq!(analyze_capped(b"SELECT 1", 100), analyze(b"SELECT 1"));
    }
}
