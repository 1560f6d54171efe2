//! One client session: the command loop.
//!
//! For each command the session picks a hostgroup (query rules, or the pinned connection),
//! takes a backend connection from that server's pool, replays the client's session state on
//! it, forwards the command and streams the response back untouched. Afterwards the
//! connection goes back to the pool unless something pins the client to it (transaction,
//! autocommit=0, locks, temporary tables, user variables, …).

use super::executor::Command;
use super::intercept::{local_query, parse_kill, Local};
use super::login::{self, handshake_and_login, Login};
use super::state::{Disposition, Outcome, Pins, SessionVars};
use crate::backend::conn::ConnKey;
use crate::backend::pool::PooledConn;
use crate::backend::server::Server;
use crate::protocol::packet::{PacketError, PacketReader, PacketWriter};
use crate::protocol::response::{Kind, Walker};
use crate::protocol::{caps, cmd, codec, errcode, handshake, status};
use crate::router::classify::{self, Effect};
use crate::router::digest;
use crate::router::rules::Decision;
use crate::runtime::{Proxy, Runtime, SessionHandle, User};
use std::sync::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use super::stream::{ClientRead, ClientWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// An error for the client, as a MySQL ERR packet.
#[derive(Debug, Clone)]
pub struct SqlError {
    pub code: u16,
    pub state: &'static str,
    pub message: String,
}

impl SqlError {
    pub fn new(code: u16, state: &'static str, message: impl Into<String>) -> Self {
        Self { code, state, message: message.into() }
    }
}

/// The client is gone (or misbehaved and was disconnected): end the session.
#[derive(Debug)]
pub struct ClientGone;

/// A prepared statement as the client knows it.
#[derive(Debug, Clone)]
pub struct ClientStmt {
    pub sql: Arc<str>,
    pub params: u16,
    pub hostgroup: u32,
    pub read_only: bool,
    pub effects: Vec<Effect>,
    /// Parameter types from the last execute that sent them (2 bytes per parameter).
    pub types: Option<Vec<u8>>,
    /// The caching rule's decision, for reads under a rule with cache_ttl.
    pub cache: Option<Decision>,
    /// How the statement uses LAST_INSERT_ID() and whether it is SQL_CALC_FOUND_ROWS.
    pub last_insert_id: classify::LastInsertId,
    pub calc_found_rows: bool,
    /// A temporary user's statement: its digest, for the audit of each execute.
    pub audit_digest: Option<Arc<str>>,
}

pub struct Session {
    pub(super) proxy: Arc<Proxy>,
    pub(super) rt: Arc<Runtime>,
    pub(super) id: u32,
    pub(super) peer_ip: String,
    pub(super) wr: PacketWriter<ClientWrite>,
    pub(super) rd: PacketReader<ClientRead>,
    pub(super) buf: Vec<u8>,
    pub(super) user: Arc<User>,
    pub(super) caps: u32,
    pub(super) scramble: [u8; 20],
    pub(super) initial_collation: u8,
    pub(super) vars: SessionVars,
    pub(super) pinned: Option<PooledConn>,
    pub(super) pins: Pins,
    pub(super) stmts: HashMap<u32, ClientStmt>,
    pub(super) next_stmt_id: u32,
    pub(super) cursor_stmt: Option<u32>,
    pub(super) digest: String,
    /// Tables written inside the open transaction (Some(None): unknown, i.e. all), for the
    /// query cache to invalidate again when it ends.
    pub(super) txn_written: Option<Option<Vec<String>>>,
    /// The backend that served the last command, and the last error code sent (for spans).
    pub(super) last_backend: Option<Arc<str>>,
    pub(super) last_error: Option<u16>,
    /// Reused buffer for query cache keys.
    pub(super) cache_key: Vec<u8>,
    /// While a cached read with stale-if-error is fetched: the expired result to answer
    /// instead of an error when no backend can answer (see `executor::run`).
    pub(super) stale_if_error: Option<crate::cache::Cached>,
    /// For temporary users: turns true when their access ends.
    pub(super) revoked: Option<watch::Receiver<bool>>,
    pub(super) handle: Arc<SessionHandle>,
    /// Turns true when another client KILLs this session.
    pub(super) killed: watch::Receiver<bool>,
    /// The last AUTO_INCREMENT id an OK packet reported: `SELECT LAST_INSERT_ID()` is answered
    /// from it, since a multiplexed client's next statement may run on another connection;
    /// a statement that reads it elsewhere gets it set on its connection first.
    pub(super) last_insert_id: u64,
    /// The previous statement's connection, kept for this client's next command only, when
    /// that statement left diagnostics only its server can tell (warnings, an error,
    /// SQL_CALC_FOUND_ROWS): a following SHOW WARNINGS / FOUND_ROWS() runs there
    /// (ProxySQL's handle_warnings). Any other command gives it back to the pool first.
    pub(super) held: Option<PooledConn>,
    /// ROW_COUNT() and FOUND_ROWS() of the previous statement, for when it left nothing to hold.
    pub(super) row_count: i64,
    pub(super) found_rows: u64,
    /// CLIENT_MULTI_STATEMENTS as the client negotiated it and COM_SET_OPTION changes it.
    pub(super) multi_statements: bool,
    /// For the command being run: set LAST_INSERT_ID() on its connection to this first.
    pub(super) sync_lid: Option<u64>,
    /// The statement being run used SQL_CALC_FOUND_ROWS.
    pub(super) calc_found_rows: bool,
    /// The statement being run was a multi-statement text.
    pub(super) multi: bool,
    /// When the open transaction started (for max_transaction_time_ms).
    pub(super) txn_started: Option<Instant>,
    /// Sequence id of the proxy's own reply to the current command.
    pub(super) reply_seq: u8,
}

/// Resolves when another client KILLs this session.
async fn was_killed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|k| *k).await;
}

/// Resolves when a temporary user's access ends (never for other users).
async fn access_ended(r: &mut Option<watch::Receiver<bool>>) {
    match r {
        Some(rx) => {
            while !*rx.borrow() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Serve one client until it quits, fails, or the proxy shuts down.
pub async fn serve(proxy: Arc<Proxy>, stream: TcpStream, conn_id: u32, mut shutdown: watch::Receiver<bool>) {
    let peer_ip = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_else(|_| "unknown".into());
    let _ = stream.set_nodelay(true);
    let rt = proxy.runtime();
    crate::backend::conn::client_keepalive(&stream, Duration::from_millis(rt.cfg.proxy.client_keepalive_ms));
    let tls = proxy.tls.get().cloned();
    let login = tokio::time::timeout(Duration::from_secs(10), handshake_and_login(stream, &rt, tls, conn_id, &peer_ip)).await;
    let (rd, mut wr, Login { user, capabilities, collation, database, scramble }) = match login {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            info!(conn_id, peer = %peer_ip, error = %e, "login failed");
            if let (login::LoginError::Denied(name), Some(a)) = (&e, proxy.access.get()) {
                if a.knows(name) {
                    a.audit.event("login_failed", name, &[("peer", &peer_ip)]);
                }
            }
            return;
        }
        Err(_) => {
            info!(conn_id, peer = %peer_ip, "login timed out");
            return;
        }
    };
    debug!(conn_id, user = %user.name, peer = %peer_ip, "client logged in");
    let wt = rt.cfg.proxy.client_write_timeout_ms;
    wr.set_write_timeout((wt > 0).then(|| Duration::from_millis(wt)));
    let revoked = if user.temporary {
        proxy.access.get().and_then(|a| {
            a.audit.event("login", &user.name, &[("peer", &peer_ip), ("session", &conn_id.to_string())]);
            a.session_signal(&user.name)
        })
    } else {
        None
    };
    let handle = Arc::new(SessionHandle {
        user: Mutex::new(user.name.clone()),
        killed: watch::channel(false).0,
        running: Mutex::new(None),
        timed_out: Default::default(),
    });
    let killed = handle.killed.subscribe();
    if let Ok(mut m) = proxy.sessions.lock() {
        m.insert(conn_id, handle.clone());
    }
    let registry = proxy.clone();
    let mut s = Session {
        proxy,
        rt,
        id: conn_id,
        peer_ip,
        wr,
        rd,
        buf: Vec::with_capacity(1024),
        vars: SessionVars::new(database, collation),
        user,
        caps: capabilities,
        scramble,
        initial_collation: collation,
        pinned: None,
        pins: Pins::default(),
        stmts: HashMap::new(),
        next_stmt_id: 1,
        cursor_stmt: None,
        digest: String::new(),
        txn_written: None,
        last_backend: None,
        last_error: None,
        cache_key: Vec::new(),
        stale_if_error: None,
        revoked,
        last_insert_id: 0,
        held: None,
        row_count: -1,
        found_rows: 0,
        multi_statements: capabilities & caps::MULTI_STATEMENTS != 0,
        sync_lid: None,
        calc_found_rows: false,
        multi: false,
        txn_started: None,
        reply_seq: 1,
        handle,
        killed,
    };
    let _ = s.command_loop(&mut shutdown).await;
    s.release_pinned().await;
    s.wr.shutdown().await;
    if let Ok(mut m) = registry.sessions.lock() {
        m.remove(&conn_id);
    };
}

impl Session {
    /// When the open transaction must end: (deadline, which limit).
    fn transaction_deadline(&self) -> Option<(tokio::time::Instant, &'static str, u64)> {
        let started = self.txn_started?;
        let p = &self.rt.cfg.proxy;
        let now = tokio::time::Instant::now();
        let total = (p.max_transaction_time_ms > 0).then(|| {
            let left = Duration::from_millis(p.max_transaction_time_ms).saturating_sub(started.elapsed());
            (now + left, "max_transaction_time_ms", p.max_transaction_time_ms)
        });
        let idle = (p.max_transaction_idle_time_ms > 0)
            .then(|| (now + Duration::from_millis(p.max_transaction_idle_time_ms), "max_transaction_idle_time_ms", p.max_transaction_idle_time_ms));
        match (total, idle) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// A transaction past its limit: its backend connection is closed (the server rolls
    /// it back and frees its locks) and the client is told why and disconnected.
    async fn end_transaction_over_limit(&mut self, seq: u8, limit: &str, ms: u64) -> ClientGone {
        self.proxy.stats.transaction_timeouts.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.pinned.take() {
            warn!(session = self.id, server = %c.server.addr, limit, ms, "transaction over its limit: rolled back, client disconnected");
            c.discard();
        }
        self.pins = Pins::default();
        let msg = format!("Breakwater: transaction exceeded {limit} ({ms} ms); it was rolled back and the connection closed");
        let _ = self.send_err(seq, &SqlError::new(errcode::CONNECTION_KILLED, "70100", msg)).await;
        ClientGone
    }

    async fn command_loop(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), ClientGone> {
        let max = self.rt.cfg.proxy.max_allowed_packet;
        loop {
            if *shutdown.borrow() {
                return Err(ClientGone);
            }
            let txn_deadline = self.transaction_deadline();
            let read = tokio::select! {
                r = self.rd.read_payload(&mut self.buf, max) => r,
                _ = async {
                    match txn_deadline {
                        Some((at, _, _)) => tokio::time::sleep_until(at).await,
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    // Unsolicited, as a server's wait_timeout error is: the client reads it
                    // when it next talks.
                    let (_, limit, ms) = txn_deadline.unwrap_or((tokio::time::Instant::now(), "max_transaction_time_ms", 0));
                    return Err(self.end_transaction_over_limit(0, limit, ms).await);
                }
                _ = shutdown.changed() => return Err(ClientGone),
                _ = was_killed(&mut self.killed) => {
                    self.send_err(0, &SqlError::new(errcode::CONNECTION_KILLED, "70100", "Connection was killed")).await?;
                    return Err(ClientGone);
                }
                _ = access_ended(&mut self.revoked) => {
                    let msg = format!("Breakwater: temporary access of '{}' has ended (expired or revoked); connection closed", self.user.name);
                    self.send_err(0, &SqlError::new(errcode::CONNECTION_KILLED, "70100", msg)).await?;
                    return Err(ClientGone);
                }
            };
            let seq = match read {
                Ok(seq) => seq,
                Err(PacketError::TooLarge(n, max)) => {
                    warn!(session = self.id, size = n, max, "client packet over max_allowed_packet");
                    let msg = format!("Got a packet bigger than 'max_allowed_packet' bytes ({n} > {max})");
                    self.send_err(1, &SqlError::new(errcode::NET_PACKET_TOO_LARGE, "08S01", msg)).await?;
                    return Err(ClientGone);
                }
                Err(PacketError::OutOfOrder { .. }) => {
                    self.send_err(1, &SqlError::new(errcode::NET_PACKETS_OUT_OF_ORDER, "08S01", "Got packets out of order")).await?;
                    return Err(ClientGone);
                }
                Err(e) => {
                    debug!(session = self.id, error = %e, "client connection ended");
                    return Err(ClientGone);
                }
            };
            // Replies follow the command's last packet (a command of 16 MiB or more comes
            // in several).
            self.reply_seq = seq.wrapping_add(1);
            if self.rd.first_seq() != 0 {
                self.send_err(self.reply_seq, &SqlError::new(errcode::NET_PACKETS_OUT_OF_ORDER, "08S01", "Got packets out of order")).await?;
                return Err(ClientGone);
            }
            // A transaction that was busy all along but is now past max_transaction_time_ms:
            // this command is answered with the error.
            if let (Some(started), max) = (self.txn_started, self.rt.cfg.proxy.max_transaction_time_ms) {
                if max > 0 && started.elapsed() >= Duration::from_millis(max) {
                    return Err(self.end_transaction_over_limit(1, "max_transaction_time_ms", max).await);
                }
            }
            let Some(&command) = self.buf.first() else {
                self.send_err(self.reply_seq, &SqlError::new(errcode::MALFORMED_PACKET, "HY000", "Malformed communication packet (empty command)")).await?;
                return Err(ClientGone);
            };
            self.proxy.stats.queries.fetch_add(1, Ordering::Relaxed);
            if !matches!(command, cmd::QUERY | cmd::PING | cmd::STATISTICS | cmd::SET_OPTION | cmd::STMT_CLOSE) {
                // A statement of another kind: the previous one's diagnostics are gone.
                self.held = None;
            }
            match command {
                cmd::QUIT => return Ok(()),
                cmd::QUERY => self.com_query().await?,
                cmd::PING => self.send_ok().await?,
                cmd::INIT_DB => self.com_init_db().await?,
                cmd::FIELD_LIST => self.forward_simple(Kind::FieldList).await?,
                cmd::STATISTICS => self.forward_simple(Kind::Single).await?,
                cmd::SET_OPTION => self.com_set_option().await?,
                cmd::RESET_CONNECTION => {
                    self.reset_session().await;
                    self.send_ok().await?;
                }
                cmd::CHANGE_USER => self.com_change_user().await?,
                cmd::STMT_PREPARE => self.com_stmt_prepare().await?,
                cmd::STMT_EXECUTE => self.com_stmt_execute().await?,
                cmd::STMT_SEND_LONG_DATA => self.com_stmt_send_long_data().await?,
                cmd::STMT_CLOSE => self.com_stmt_close(),
                cmd::STMT_RESET => self.com_stmt_reset().await?,
                cmd::STMT_FETCH => self.com_stmt_fetch().await?,
                other => {
                    let msg = format!("Unknown command 0x{other:02x}");
                    self.send_err(self.reply_seq, &SqlError::new(errcode::UNKNOWN_COM, "08S01", msg)).await?;
                }
            }
            if self.buf.capacity() > 1 << 20 {
                self.buf = Vec::with_capacity(1024);
            }
        }
    }

    /// COM_SET_OPTION: MYSQL_OPTION_MULTI_STATEMENTS_ON (0) / _OFF (1). Backend connections
    /// follow it before this client's next query runs on them, so the server itself refuses
    /// a multi-statement query exactly when it would for this client.
    async fn com_set_option(&mut self) -> Result<(), ClientGone> {
        match self.buf.get(1..3).map(|b| u16::from_le_bytes([b[0], b[1]])) {
            Some(0) => self.multi_statements = true,
            Some(1) => self.multi_statements = false,
            _ => {
                let e = SqlError::new(errcode::UNKNOWN_COM, "08S01", "Unknown command (COM_SET_OPTION with an unknown option)");
                return self.send_err(self.reply_seq, &e).await;
            }
        }
        let st = self.status_flags();
        self.wr.push(self.reply_seq, &codec::eof_packet(st, 0));
        self.flush().await
    }

    /// Queue a result set the proxy answers itself (it is this client's previous statement
    /// from now on: ROW_COUNT() -1, FOUND_ROWS() its row count, no warnings held).
    pub(super) fn push_local_result(&mut self, cols: &[codec::Column<'_>], rows: &[Vec<Option<String>>]) {
        let st = self.status_flags();
        codec::push_text_result_set(&mut self.wr, self.reply_seq, cols, rows, st);
        (self.row_count, self.found_rows) = (-1, rows.len() as u64);
    }

    pub(super) fn status_flags(&self) -> u16 {
        let mut st = 0;
        if self.pins.transaction {
            st |= status::IN_TRANS;
        }
        if !self.pins.autocommit_off {
            st |= status::AUTOCOMMIT;
        }
        st
    }

    pub(super) async fn flush(&mut self) -> Result<(), ClientGone> {
        self.wr.flush().await.map_err(|_| ClientGone)
    }

    pub(super) async fn send_ok(&mut self) -> Result<(), ClientGone> {
        let st = self.status_flags();
        self.wr.push(self.reply_seq, &codec::ok_packet(0, 0, st, 0));
        self.flush().await
    }

    pub(super) async fn send_err(&mut self, seq: u8, e: &SqlError) -> Result<(), ClientGone> {
        self.last_error = Some(e.code);
        self.wr.push(seq, &codec::err_packet(e.code, e.state, &e.message));
        self.flush().await
    }

    pub(super) fn conn_key(&self) -> ConnKey {
        ConnKey { user: self.user.backend_user.clone(), caps: self.caps & crate::backend::conn::KEY_CAPS }
    }

    /// The hostgroup for a query: query rules, then the user's default hostgroup.
    /// Statements that would pin the client go to the default (writer) hostgroup, so the
    /// pinned connection can also take the writes that usually follow.
    /// Also leaves the query's digest in `self.digest`.
    pub(super) fn route(&mut self, sql: &[u8], a: &classify::Analysis) -> Decision {
        // A huge statement is digested and matched on its first bytes only
        // (query_digests_max_query_length), like ProxySQL.
        let sql = &sql[..sql.len().min(self.rt.cfg.proxy.query_digests_max_query_length)];
        digest::digest_into(sql, &mut self.digest);
        let pinning = a.effects.iter().any(|e| matches!(e, Effect::Pin(_)));
        let text: Cow<str> = String::from_utf8_lossy(sql);
        let mut d = self
            .rt
            .rules()
            .route(&self.user.name, self.vars.schema.as_deref(), &text, Some(self.digest.as_str()))
            .unwrap_or_default();
        if pinning || d.hostgroup.is_none() {
            d.hostgroup = Some(self.user.default_hostgroup);
        }
        d
    }

    /// The backend connection died: whatever it held (transaction, locks, temporary tables)
    /// is gone, so the client is no longer pinned to anything.
    pub(super) fn connection_lost(&mut self, server: &Arc<Server>, err: &str) {
        if self.pins.any() {
            warn!(session = self.id, server = %server.addr, error = err, "pinned backend connection lost; transaction state discarded");
        }
        self.pins = Pins::default();
        self.txn_started = None;
        self.cursor_stmt = None;
    }

    /// Apply a finished statement's effects and decide whether the client stays pinned.
    pub(super) fn finish(&mut self, w: &Walker, mut conn: PooledConn, effects: &[Effect]) {
        if w.last_insert_id != 0 {
            self.last_insert_id = w.last_insert_id;
        }
        self.row_count = w.row_count;
        if w.result_set {
            self.found_rows = w.rows;
        }
        if let Some(e) = &w.error {
            // The server ended this connection (KILL, shutdown): it cannot be used again.
            if matches!(e.code, errcode::CONNECTION_KILLED | errcode::SERVER_SHUTDOWN) {
                conn.broken = true;
            }
        }
        if conn.broken {
            let server = conn.server.clone();
            conn.discard();
            self.calc_found_rows = false;
            self.connection_lost(&server, "backend connection closed by the server");
            return;
        }
        let out = Outcome {
            ok: w.error.is_none(),
            status: conn.status,
            warnings: w.warnings,
            calc_found_rows: std::mem::take(&mut self.calc_found_rows),
            multi: std::mem::take(&mut self.multi),
        };
        let call_pin = Effect::Pin(classify::PinReason::Other(classify::CALL_PIN));
        let (disposition, dirty, newly_pinned) = if self.rt.cfg.proxy.multiplex_after_call && effects.contains(&call_pin) {
            let kept: Vec<Effect> = effects.iter().filter(|e| **e != call_pin).cloned().collect();
            super::state::apply(&mut self.pins, &mut self.vars, &mut conn.vars, &kept, out)
        } else {
            super::state::apply(&mut self.pins, &mut self.vars, &mut conn.vars, effects, out)
        };
        conn.dirty = dirty;
        match (self.pins.transaction, self.txn_started) {
            (true, None) => self.txn_started = Some(Instant::now()),
            (false, Some(_)) => self.txn_started = None,
            _ => {}
        }
        match disposition {
            Disposition::Pin => {
                if newly_pinned {
                    if let Some(reason) = self.pins.reason() {
                        let reason = reason.to_string();
                        debug!(session = self.id, server = %conn.server.addr, backend_thread = conn.thread_id, %reason, "client pinned to backend connection");
                        self.proxy.stats.pinned(&reason);
                    }
                }
                self.pinned = Some(conn);
            }
            Disposition::Hold => self.held = Some(conn),
            Disposition::Release => drop(conn), // back to the pool
        }
    }

    /// Keep a connection pinned if the session is pinned, else return it to the pool.
    pub(super) fn keep_or_release(&mut self, conn: PooledConn) {
        if self.pins.any() {
            self.pinned = Some(conn);
        }
    }

    async fn com_query(&mut self) -> Result<(), ClientGone> {
        let buf = std::mem::take(&mut self.buf);
        if let Some(r) = self.cached_hit(&buf).await {
            self.buf = buf;
            return r;
        }
        let sql = &buf[1..];
        let cap = self.rt.cfg.proxy.query_digests_max_query_length;
        let a = classify::analyze_capped(sql, cap);
        if self.user.temporary {
            digest::digest_into(&sql[..sql.len().min(cap)], &mut self.digest);
            if let Some(a) = self.proxy.access.get() {
                a.audit.event("statement", &self.user.name, &[("digest", &self.digest), ("session", &self.id.to_string())]);
            }
        }
        use classify::Kind as K;
        let writes = a.multi || matches!(a.kind, Some(K::Insert | K::Update | K::Delete | K::Replace | K::Call | K::Other));
        // CONNECTION_ID() is always the proxy's session id (what KILL takes); LAST_INSERT_ID()
        // comes from this session's last OK packet unless it is pinned to one connection.
        let local = match local_query(sql) {
            Some((Local::ConnectionId, col)) => Some((col, self.id as u64)),
            Some((Local::LastInsertId, col)) => Some((col, self.last_insert_id)),
            _ => None,
        };
        let result = if let Some((col, value)) = local {
            let cols = [codec::Column { name: &col, kind: codec::TYPE_LONGLONG, flags: codec::FLAG_UNSIGNED }];
            self.push_local_result(&cols, &[vec![Some(value.to_string())]]);
            self.flush().await
        } else if let Some(kill) = parse_kill(sql) {
            self.kill(kill).await
        } else if self.user.read_only && writes {
            let e = SqlError::new(
                errcode::OPTION_PREVENTS_STATEMENT,
                "HY000",
                format!("Breakwater: '{}' has temporary read_only access; writes are refused", self.user.name),
            );
            self.send_err(self.reply_seq, &e).await
        } else {
            let t0 = Instant::now();
            let d = self.route(sql, &a);
            let hg = d.hostgroup.unwrap_or(self.user.default_hostgroup);
            // Sheddable traffic under a cascading risk (a client already pinned, e.g. in a
            // transaction holding locks, finishes what it started).
            if self.pinned.is_none() {
                if let Some(why) = self.rt.shedding.check(hg, d.shed_priority) {
                    let e = SqlError::new(
                        errcode::MAX_CONNECT_TIMEOUT,
                        "HY000",
                        format!("Breakwater: shed (query rule {} has shed_priority {}): {why}; the statement was not sent", d.rule_id, d.shed_priority),
                    );
                    return self.send_err(self.reply_seq, &e).await;
                }
            }
            // The previous statement's diagnostics: on its kept connection, or known here.
            let mut rewritten: Option<Vec<u8>> = None;
            let mut answered = false;
            if a.diagnostics && self.pinned.is_some() {
                // A pinned client's previous statement ran on its connection: the server
                // answers for it there.
                self.held = None;
            } else if a.diagnostics {
                match self.held.take() {
                    Some(h) if self.pinned.is_none() && (a.read_only || h.server.cfg.hostgroup == hg) => self.pinned = Some(h),
                    other => {
                        drop(other);
                        match super::diagnostics::answer(sql, self.row_count, self.found_rows) {
                            Some(super::diagnostics::Answer::EmptyList) => {
                                let cols = [
                                    codec::Column { name: "Level", kind: codec::TYPE_VAR_STRING, flags: 0 },
                                    codec::Column { name: "Code", kind: codec::TYPE_LONGLONG, flags: codec::FLAG_UNSIGNED },
                                    codec::Column { name: "Message", kind: codec::TYPE_VAR_STRING, flags: 0 },
                                ];
                                self.push_local_result(&cols, &[]);
                                answered = true;
                            }
                            Some(super::diagnostics::Answer::Count(col)) => {
                                let cols = [codec::Column { name: col, kind: codec::TYPE_LONGLONG, flags: codec::FLAG_UNSIGNED }];
                                self.push_local_result(&cols, &[vec![Some("0".into())]]);
                                answered = true;
                            }
                            Some(super::diagnostics::Answer::Ok) => {
                                let st = self.status_flags();
                                self.wr.push(self.reply_seq, &codec::ok_packet(0, 0, st, 0));
                                answered = true; // GET DIAGNOSTICS leaves the diagnostics as they were
                            }
                            Some(super::diagnostics::Answer::Rewrite(text)) => {
                                let mut p = Vec::with_capacity(text.len() + 1);
                                p.push(cmd::QUERY);
                                p.extend_from_slice(&text);
                                rewritten = Some(p);
                            }
                            None => {}
                        }
                    }
                }
            } else {
                self.held = None;
            }
            if answered {
                let r = self.flush().await;
                self.buf = buf;
                return r;
            }
            self.sync_lid = (a.last_insert_id == classify::LastInsertId::Reads).then_some(self.last_insert_id);
            self.calc_found_rows = a.calc_found_rows;
            let payload: &[u8] = rewritten.as_deref().unwrap_or(&buf);
            let cacheable = d.cache_ttl_ms > 0 && a.read_only && !a.multi && !self.pins.any() && !a.diagnostics && a.last_insert_id == classify::LastInsertId::No;
            let caches = self.rt.rules().caches();
            let (res, hg_used, rows, failed) = if cacheable {
                self.cached_query(&buf, &d, hg, a.kind.map(|k| k.name()).unwrap_or("OTHER")).await
            } else {
                let retryable = a.read_only && !self.pins.any();
                match self.run(hg, Command::Raw(payload), Kind::ResultSet, retryable).await {
                    Ok(Some((w, mut conn))) => {
                        let (rows, err) = (w.rows, w.error.is_some());
                        if let Some(e) = &w.error {
                            self.last_error = Some(e.code);
                        }
                        // LAST_INSERT_ID(expr) set it on that connection: learn the value.
                        let set_lid = if a.last_insert_id == classify::LastInsertId::Sets && !err {
                            conn.query_u64("SELECT LAST_INSERT_ID()").await.ok().flatten()
                        } else {
                            None
                        };
                        if let Some(v) = set_lid {
                            conn.last_insert_id = v;
                        }
                        self.multi = a.multi;
                        self.finish(&w, conn, &a.effects);
                        if let Some(v) = set_lid {
                            self.last_insert_id = v;
                        }
                        (Ok(()), hg as i64, rows, err)
                    }
                    Ok(None) => (Ok(()), hg as i64, 0, true),
                    Err(e) => (Err(e), hg as i64, 0, true),
                }
            };
            self.sync_lid = None;
            self.calc_found_rows = false;
            if caches && !a.read_only {
                self.invalidate_after_write(sql, &a);
            }
            let took = t0.elapsed();
            self.proxy.digests.record(&self.digest, hg_used, &self.user.name, self.vars.schema.as_deref(), took, rows, failed);
            if self.proxy.telemetry.sample() {
                let end = crate::telemetry::now_ns();
                self.proxy.telemetry.record(crate::telemetry::SpanRecord {
                    start_ns: end.saturating_sub(took.as_nanos() as u64),
                    end_ns: end,
                    operation: a.kind.map(|k| k.name()).unwrap_or("OTHER"),
                    schema: self.vars.schema.clone(),
                    summary: self.digest.clone(),
                    user: self.user.name.clone(),
                    hostgroup: hg_used,
                    backend: if hg_used < 0 { None } else { self.last_backend.clone() },
                    cache: if !cacheable { "none" } else if hg_used < 0 { "hit" } else { "miss" },
                    error: if failed { Some(self.last_error.unwrap_or(0)) } else { None },
                    rows,
                });
            }
            res
        };
        self.buf = buf;
        result
    }

    async fn com_init_db(&mut self) -> Result<(), ClientGone> {
        let buf = std::mem::take(&mut self.buf);
        let db = String::from_utf8_lossy(&buf[1..]).into_owned();
        let hg = self.user.default_hostgroup;
        let r = self.run(hg, Command::Raw(&buf), Kind::Single, true).await;
        self.buf = buf;
        if let Some((w, conn)) = r? {
            self.finish(&w, conn, &[Effect::Use(db)]);
        }
        Ok(())
    }

    async fn forward_simple(&mut self, kind: Kind) -> Result<(), ClientGone> {
        let buf = std::mem::take(&mut self.buf);
        let hg = self.user.default_hostgroup;
        let r = self.run(hg, Command::Raw(&buf), kind, true).await;
        self.buf = buf;
        if let Some((w, conn)) = r? {
            self.finish(&w, conn, &[]);
        }
        Ok(())
    }

    /// Give the pinned connection back, resetting it first when it holds client state.
    pub(super) async fn release_pinned(&mut self) {
        if let Some(mut conn) = self.pinned.take() {
            if conn.dirty || conn.status & status::IN_TRANS != 0 {
                match tokio::time::timeout(Duration::from_secs(2), conn.reset()).await {
                    Ok(Ok(())) => drop(conn),
                    _ => conn.discard(),
                }
            }
        }
        self.pins = Pins::default();
        self.cursor_stmt = None;
        self.txn_started = None;
        self.held = None;
    }

    async fn reset_session(&mut self) {
        self.release_pinned().await;
        let schema = self.vars.schema.clone();
        self.vars = SessionVars::new(schema, self.initial_collation);
        self.stmts.clear();
    }

    async fn com_change_user(&mut self) -> Result<(), ClientGone> {
        let Some(cu) = handshake::parse_change_user(&self.buf, self.caps) else {
            self.send_err(self.reply_seq, &SqlError::new(errcode::MALFORMED_PACKET, "08S01", "Malformed COM_CHANGE_USER")).await?;
            return Err(ClientGone);
        };
        let denied = SqlError::new(
            errcode::ACCESS_DENIED,
            "28000",
            format!("Access denied for user '{}'@'{}' (using password: YES)", cu.username, self.peer_ip),
        );
        let Some(user) = self.rt.user(&cu.username) else {
            self.send_err(self.reply_seq, &denied).await?;
            return Err(ClientGone);
        };
        let plugin = cu.plugin.clone().unwrap_or_else(|| crate::protocol::auth::NATIVE.into());
        let mut seq = self.reply_seq;
        let mut token = cu.auth_response.clone();
        let mut used = plugin.clone();
        if !user.can_verify(&plugin) || plugin != user.plugin {
            // Ask the client to answer a fresh scramble with the user's plugin.
            self.scramble = crate::protocol::auth::new_scramble();
            used = user.plugin.to_string();
            self.wr.push(seq, &handshake::auth_switch_request(user.plugin, &self.scramble));
            self.flush().await?;
            let max = self.rt.cfg.proxy.max_allowed_packet;
            let s = self.rd.read_payload(&mut self.buf, max).await.map_err(|_| ClientGone)?;
            seq = s.wrapping_add(1);
            token = self.buf.clone();
        }
        if !user.verify(&used, &token, &self.scramble) {
            self.send_err(seq, &denied).await?;
            return Err(ClientGone);
        }
        if used == crate::protocol::auth::CACHING_SHA2 {
            seq = self.wr.push(seq, &[0x01, 0x03]);
        }
        self.release_pinned().await;
        // Access checks, KILL ownership, temporary-access expiry and the audit follow the
        // new user from here on.
        let old = std::mem::replace(&mut self.user, user);
        if let Ok(mut u) = self.handle.user.lock() {
            *u = self.user.name.clone();
        }
        self.revoked = None;
        if let Some(a) = self.proxy.access.get() {
            if old.temporary || self.user.temporary {
                let session = self.id.to_string();
                a.audit.event("change_user", &old.name, &[("to", &self.user.name), ("session", &session), ("peer", &self.peer_ip)]);
            }
            if self.user.temporary {
                self.revoked = a.session_signal(&self.user.name);
            }
        }
        self.last_insert_id = 0;
        let collation = cu.collation.unwrap_or(self.initial_collation);
        self.initial_collation = collation;
        self.vars = SessionVars::new(cu.database.or_else(|| self.user.default_schema.clone()), collation);
        self.stmts.clear();
        let st = self.status_flags();
        self.wr.push(seq, &codec::ok_packet(0, 0, st, 0));
        self.flush().await
    }
}
