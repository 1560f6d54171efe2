//! One client session: the command loop.
//!
//! For each command the session picks a hostgroup (query rules, or the pinned connection),
//! takes a backend connection from that server's pool, replays the client's session state on
//! it, forwards the command and streams the response back untouched. Afterwards the
//! connection goes back to the pool unless something pins the client to it (transaction,
//! autocommit=0, locks, temporary tables, user variables, …).

use super::login::{self, Login};
use super::state::{Pins, SessionVars};
use crate::backend::conn::{BackendError, ConnKey, ForwardError};
use crate::backend::hostgroup::Gate;
use crate::backend::pool::{Checkout, PoolError, PooledConn};
use crate::backend::server::{Server, Status};
use crate::protocol::packet::{PacketError, PacketReader, PacketWriter};
use crate::protocol::response::{Kind, Walker};
use crate::protocol::{caps, cmd, codec, errcode, handshake, status};
use crate::router::classify::{self, Effect};
use crate::router::digest;
use crate::router::rules::Decision;
use crate::router::tables;
use crate::cache::{self, Lookup};
use crate::runtime::{Proxy, Running, Runtime, SessionHandle, User};
use std::sync::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use super::stream::{ClientRead, ClientWrite};
use crate::protocol::either::Either;
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
}

/// What a cached read runs on a miss.
pub enum CacheSrc<'a> {
    /// A COM_QUERY payload.
    Query(&'a [u8]),
    /// A COM_STMT_EXECUTE of a client statement.
    Stmt { stmt: ClientStmt, payload: &'a mut Vec<u8> },
}

pub struct Session {
    pub(super) proxy: Arc<Proxy>,
    pub(super) rt: Arc<Runtime>,
    pub(super) id: u32,
    peer_ip: String,
    pub(super) wr: PacketWriter<ClientWrite>,
    rd: PacketReader<ClientRead>,
    pub(super) buf: Vec<u8>,
    pub(super) user: Arc<User>,
    caps: u32,
    scramble: [u8; 20],
    initial_collation: u8,
    pub(super) vars: SessionVars,
    pub(super) pinned: Option<PooledConn>,
    pub(super) pins: Pins,
    pub(super) stmts: HashMap<u32, ClientStmt>,
    pub(super) next_stmt_id: u32,
    pub(super) cursor_stmt: Option<u32>,
    digest: String,
    /// Tables written inside the open transaction (Some(None): unknown, i.e. all), for the
    /// query cache to invalidate again when it ends.
    txn_written: Option<Option<Vec<String>>>,
    /// The backend that served the last command, and the last error code sent (for spans).
    last_backend: Option<Arc<str>>,
    last_error: Option<u16>,
    /// Reused buffer for query cache keys.
    pub(super) cache_key: Vec<u8>,
    /// For temporary users: turns true when their access ends.
    revoked: Option<watch::Receiver<bool>>,
    handle: Arc<SessionHandle>,
    /// Turns true when another client KILLs this session.
    killed: watch::Receiver<bool>,
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
    /// When the open transaction started (for max_transaction_time_ms).
    txn_started: Option<Instant>,
    /// Sequence id of the proxy's own reply to the current command.
    pub(super) reply_seq: u8,
}

/// Greeting, optional TLS upgrade (SSLRequest), handshake response and authentication.
/// The first packet is read with exact reads on the socket, so the TLS ClientHello that
/// follows an SSLRequest is left for rustls.
async fn handshake_and_login(
    mut stream: TcpStream,
    rt: &Runtime,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conn_id: u32,
    peer_ip: &str,
) -> Result<(PacketReader<ClientRead>, PacketWriter<ClientWrite>, Login), login::LoginError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scramble = crate::protocol::auth::new_scramble();
    let extra = if tls.is_some() { caps::SSL } else { 0 };
    let greeting = handshake::greeting(&rt.cfg.proxy.server_version, conn_id, &scramble, crate::protocol::auth::NATIVE, 45, extra);
    let mut out = Vec::with_capacity(greeting.len() + 4);
    out.extend_from_slice(&(greeting.len() as u32).to_le_bytes()[..3]);
    out.push(0);
    out.extend_from_slice(&greeting);
    stream.write_all(&out).await.map_err(PacketError::from)?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.map_err(PacketError::from)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    if len > 1 << 20 {
        return Err(login::LoginError::Malformed);
    }
    let mut first = vec![0u8; len];
    stream.read_exact(&mut first).await.map_err(PacketError::from)?;
    let users = |n: &str| rt.user(n);
    if login::is_ssl_request(&first) {
        let Some(acceptor) = tls else {
            let (_, w) = stream.into_split();
            let mut wr: PacketWriter<ClientWrite> = PacketWriter::new(Either::Left(w));
            login::send_err(&mut wr, head[3].wrapping_add(1), 1043, "08S01", "TLS was requested but this Breakwater listener has no TLS configured").await;
            return Err(login::LoginError::TlsRequested);
        };
        let tls_stream = acceptor.accept(stream).await.map_err(PacketError::from)?;
        let (r, w) = tokio::io::split(tls_stream);
        let mut rd = PacketReader::new(Either::Right(r));
        let mut wr = PacketWriter::new(Either::Right(w));
        let mut buf = Vec::new();
        let seq = rd.read_payload(&mut buf, 1 << 20).await?;
        let l = login::authenticate(&mut rd, &mut wr, buf, seq, scramble, &users, peer_ip).await?;
        return Ok((rd, wr, l));
    }
    let (r, w) = stream.into_split();
    let mut rd = PacketReader::new(Either::Left(r));
    let mut wr = PacketWriter::new(Either::Left(w));
    let l = login::authenticate(&mut rd, &mut wr, first, head[3], scramble, &users, peer_ip).await?;
    Ok((rd, wr, l))
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
        revoked,
        last_insert_id: 0,
        held: None,
        row_count: -1,
        found_rows: 0,
        multi_statements: capabilities & caps::MULTI_STATEMENTS != 0,
        sync_lid: None,
        calc_found_rows: false,
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

    /// The pinned connection, or one from a server of `hostgroup`. A read (`read`) whose
    /// hostgroup has no ONLINE server falls back to the user's default hostgroup; a write
    /// never does: it gets a clear error instead of landing on another hostgroup.
    pub(super) async fn acquire(&mut self, hostgroup: u32, exclude: Option<&Arc<Server>>, read: bool) -> Result<PooledConn, SqlError> {
        if let Some(c) = self.pinned.take() {
            if c.server.status() != Status::OfflineHard {
                return Ok(c);
            }
            // The failover controller moved the writer while this client held a
            // transaction (or other state) on the old one: that state is gone.
            let server = c.server.clone();
            c.discard();
            let why = server.reason.lock().map(|r| r.clone()).unwrap_or_default();
            self.connection_lost(&server, &why);
            return Err(SqlError::new(
                errcode::CONNECTION_KILLED,
                "70100",
                format!(
                    "Transaction aborted: backend {} left hostgroup {} ({why}); nothing after the last COMMIT was kept, start it again",
                    server.addr, server.cfg.hostgroup
                ),
            ));
        }
        let rt = self.rt.clone();
        let queue_timeout = Duration::from_millis(rt.cfg.proxy.queue_timeout_ms);
        let deadline = tokio::time::Instant::now() + queue_timeout;
        let hg = loop {
            let routing = rt.routing();
            let hg = match routing.hostgroups.get(&hostgroup) {
                Some(g) if g.any_online() || g.gate != Gate::Open => g.clone(),
                Some(g) if !read && hostgroup != self.user.default_hostgroup => {
                    let states: Vec<String> = g.servers.iter().map(|s| format!("{} {}", s.addr, s.status().as_str())).collect();
                    return Err(SqlError::new(
                        errcode::MAX_CONNECT_TIMEOUT,
                        "HY000",
                        format!(
                            "Breakwater: no ONLINE server in hostgroup {hostgroup} for this write ({}); it was not sent to another hostgroup",
                            states.join(", ")
                        ),
                    ));
                }
                _ => match routing.hostgroups.get(&self.user.default_hostgroup) {
                    Some(g) => g.clone(),
                    None => {
                        return Err(SqlError::new(errcode::MAX_CONNECT_TIMEOUT, "HY000", format!("Hostgroup {hostgroup} has no servers")))
                    }
                },
            };
            match &hg.gate {
                Gate::Open => break hg,
                Gate::Block(msg) => return Err(SqlError::new(errcode::OPTION_PREVENTS_STATEMENT, "HY000", msg.to_string())),
                Gate::Hold(msg) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(SqlError::new(
                            errcode::MAX_CONNECT_TIMEOUT,
                            "HY000",
                            format!("Hostgroup {} is on hold ({msg}) for longer than {} ms", hg.id, queue_timeout.as_millis()),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let key = self.conn_key();
        let p = &rt.cfg.proxy;
        let opts = Checkout {
            key: &key,
            password: &self.user.backend_password,
            connect_timeout: Duration::from_millis(p.connect_timeout_ms),
            queue_timeout: Duration::from_millis(p.queue_timeout_ms),
            read_timeout: Duration::from_millis(p.backend_read_timeout_ms),
        };
        let mut last_err = None;
        let mut full: Vec<String> = Vec::new();
        let mut tried: Vec<Arc<Server>> = Vec::new();
        for _ in 0..hg.servers.len().max(1) {
            let skip = tried.last().or(exclude);
            let Some(server) = hg.pick(skip) else { break };
            if tried.iter().any(|t| Arc::ptr_eq(t, &server)) {
                break;
            }
            tried.push(server.clone());
            match server.checkout(&opts).await {
                Ok(c) => return Ok(c),
                Err(PoolError::Backend(BackendError::Login { addr, code: errcode::CON_COUNT, msg })) => {
                    // The server is alive but at its own max_connections: another server
                    // of the hostgroup may take it; if none can, the client gets 1040 too.
                    full.push(format!("{addr}: {msg}"));
                }
                Err(PoolError::Backend(BackendError::Login { .. })) if self.user.temporary && self.rt.user(&self.user.name).is_none() => {
                    return Err(SqlError::new(
                        errcode::CONNECTION_KILLED,
                        "70100",
                        format!("Breakwater: temporary access of '{}' has ended (expired or revoked)", self.user.name),
                    ));
                }
                Err(PoolError::Backend(BackendError::Login { addr, code, msg })) => {
                    return Err(SqlError::new(
                        errcode::ACCESS_DENIED,
                        "28000",
                        format!("Backend {addr} (hostgroup {}) refused login for '{}': {msg} ({code})", hg.id, key.user),
                    ));
                }
                Err(PoolError::Backend(e)) => {
                    server.set_status(Status::Shunned, &e.to_string());
                    last_err = Some(e.to_string());
                }
                Err(e) => return Err(SqlError::new(errcode::MAX_CONNECT_TIMEOUT, "HY000", e.to_string())),
            }
        }
        if !full.is_empty() && last_err.is_none() {
            let msg = format!("Too many connections: hostgroup {} backend(s) refused a new connection ({})", hg.id, full.join("; "));
            return Err(SqlError::new(errcode::CON_COUNT, "08004", msg));
        }
        let msg = match last_err {
            Some(e) => format!("No backend available in hostgroup {}: {e}", hg.id),
            None => format!("No ONLINE server in hostgroup {} (all SHUNNED or OFFLINE)", hg.id),
        };
        Err(SqlError::new(errcode::CONN_HOST_ERROR, "HY000", msg))
    }

    /// Run one command on a backend and stream its response to the client.
    /// Returns the response summary and the connection, or None when an error was sent.
    pub(super) async fn run(
        &mut self,
        hostgroup: u32,
        mut cmd: Command<'_>,
        kind: Kind,
        retryable: bool,
    ) -> Result<Option<(Walker, PooledConn)>, ClientGone> {
        let mut exclude: Option<Arc<Server>> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let was_pinned = self.pinned.is_some();
            let mut conn = match self.acquire(hostgroup, exclude.as_ref(), retryable).await {
                Ok(c) => c,
                Err(e) => {
                    self.send_err(self.reply_seq, &e).await?;
                    return Ok(None);
                }
            };
            let rewrite = cmd.rewrite_id();
            let extra = crate::backend::conn::SyncExtra { multi_statements: self.multi_statements, last_insert_id: self.sync_lid };
            let prepared = match conn.sync(&self.vars, &extra).await {
                Ok(()) => cmd.build(&mut conn).await,
                Err(e) => Err(e),
            };
            let payload = match prepared {
                Ok(p) => p,
                Err(BackendError::Sql(e)) => {
                    // The server refused state sync or re-prepare (e.g. unknown database).
                    self.keep_or_release(conn);
                    self.send_err(self.reply_seq, &SqlError { code: e.code, state: "HY000", message: e.message }).await?;
                    return Ok(None);
                }
                Err(e) => {
                    let server = conn.server.clone();
                    conn.discard();
                    if !was_pinned && attempt < 3 {
                        exclude = Some(server);
                        continue;
                    }
                    self.connection_lost(&server, &e.to_string());
                    let msg = format!("Lost connection to backend {} (hostgroup {}): {e}", server.addr, server.cfg.hostgroup);
                    self.send_err(self.reply_seq, &SqlError::new(errcode::SERVER_LOST, "HY000", msg)).await?;
                    return Ok(None);
                }
            };
            let server = conn.server.clone();
            server.counters.queries.fetch_add(1, Ordering::Relaxed);
            self.last_backend = Some(server.addr.clone());
            if let Ok(mut r) = self.handle.running.lock() {
                *r = Some(Running { server: server.clone(), thread: conn.thread_id, started: Instant::now(), killed: false });
            }
            let limit = self.rt.cfg.proxy.default_query_timeout_ms;
            let timeout = (limit > 0).then_some((&self.handle.timed_out, limit));
            let res = conn.forward(0, payload, kind, &mut self.wr, rewrite, timeout).await;
            if let Ok(mut r) = self.handle.running.lock() {
                *r = None;
            }
            self.handle.timed_out.store(false, Ordering::Relaxed);
            match res {
                Ok(w) => {
                    cmd.after(&mut conn);
                    return Ok(Some((w, conn)));
                }
                Err(ForwardError::Client(_)) => {
                    conn.discard();
                    return Err(ClientGone);
                }
                Err(ForwardError::Backend { err, started, last_seq }) => {
                    let server = conn.server.clone();
                    conn.discard();
                    server.counters.errors.fetch_add(1, Ordering::Relaxed);
                    self.proxy.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                    if !started && retryable && !was_pinned && attempt < 3 && self.rt.cfg.proxy.retry_reads {
                        self.proxy.stats.retries.fetch_add(1, Ordering::Relaxed);
                        warn!(session = self.id, server = %server.addr, error = %err, "backend failed before answering a read; retrying elsewhere");
                        exclude = Some(server);
                        continue;
                    }
                    self.connection_lost(&server, &err.to_string());
                    let msg = format!(
                        "Lost connection to backend {} (hostgroup {}) during query: {err}",
                        server.addr, server.cfg.hostgroup
                    );
                    self.send_err(last_seq.wrapping_add(1), &SqlError::new(errcode::SERVER_LOST, "HY000", msg)).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// The backend connection died: whatever it held (transaction, locks, temporary tables)
    /// is gone, so the client is no longer pinned to anything.
    fn connection_lost(&mut self, server: &Arc<Server>, err: &str) {
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
        let hold = w.warnings > 0 || w.error.is_some() || std::mem::take(&mut self.calc_found_rows);
        if let Some(e) = &w.error {
            // The server ended this connection (KILL, shutdown): it cannot be used again.
            if matches!(e.code, errcode::CONNECTION_KILLED | errcode::SERVER_SHUTDOWN) {
                conn.broken = true;
            }
        }
        if conn.broken {
            let server = conn.server.clone();
            conn.discard();
            self.connection_lost(&server, "backend connection closed by the server");
            return;
        }
        let ok = w.error.is_none();
        let was_pinned = self.pins.any();
        for e in effects {
            match e {
                Effect::SetVar(n, v) if ok => {
                    self.vars.set_var(n, v);
                    conn.vars.set_var(n, v);
                }
                Effect::SetNames(cs, coll) if ok => {
                    self.vars.set_names(cs, coll.as_deref());
                    conn.vars.set_names(cs, coll.as_deref());
                }
                Effect::Use(db) if ok => {
                    self.vars.schema = Some(db.clone());
                    conn.vars.schema = Some(db.clone());
                }
                Effect::Pin(r) => self.pins.add(r.clone()),
                Effect::UnlockTables => self.pins.lock_tables = false,
                Effect::ReleaseLock => self.pins.named_locks = self.pins.named_locks.saturating_sub(1),
                Effect::ReleaseAllLocks => self.pins.named_locks = 0,
                _ => {}
            }
        }
        let st = conn.status;
        self.pins.transaction = st & status::IN_TRANS != 0;
        match (self.pins.transaction, self.txn_started) {
            (true, None) => self.txn_started = Some(Instant::now()),
            (false, Some(_)) => self.txn_started = None,
            _ => {}
        }
        self.pins.autocommit_off = st & status::AUTOCOMMIT == 0;
        conn.dirty = self.pins.lock_tables || self.pins.named_locks > 0 || !self.pins.sticky.is_empty() || self.pins.long_data;
        if self.pins.any() {
            if !was_pinned {
                if let Some(reason) = self.pins.reason() {
                    let reason = reason.to_string();
                    debug!(session = self.id, server = %conn.server.addr, backend_thread = conn.thread_id, %reason, "client pinned to backend connection");
                    self.proxy.stats.pinned(&reason);
                }
            }
            self.pinned = Some(conn);
        } else if hold {
            self.held = Some(conn);
        } else {
            drop(conn); // back to the pool
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
            let v = value.to_string();
            let st = self.status_flags();
            let cols = [codec::Column { name: &col, kind: codec::TYPE_LONGLONG, flags: codec::FLAG_UNSIGNED }];
            codec::push_text_result_set(&mut self.wr, self.reply_seq, &cols, &[vec![Some(v)]], st);
            (self.row_count, self.found_rows) = (-1, 1);
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
            // The previous statement's diagnostics: on its kept connection, or known here.
            let mut rewritten: Option<Vec<u8>> = None;
            let mut answered = false;
            if a.diagnostics {
                match self.held.take() {
                    Some(h) if self.pinned.is_none() && (a.read_only || h.server.cfg.hostgroup == hg) => self.pinned = Some(h),
                    other => {
                        drop(other);
                        match super::diagnostics::answer(sql, self.row_count, self.found_rows) {
                            Some(super::diagnostics::Answer::EmptyList) => {
                                let st = self.status_flags();
                                let cols = [
                                    codec::Column { name: "Level", kind: codec::TYPE_VAR_STRING, flags: 0 },
                                    codec::Column { name: "Code", kind: codec::TYPE_LONGLONG, flags: codec::FLAG_UNSIGNED },
                                    codec::Column { name: "Message", kind: codec::TYPE_VAR_STRING, flags: 0 },
                                ];
                                codec::push_text_result_set(&mut self.wr, self.reply_seq, &cols, &[], st);
                                answered = true;
                            }
                            Some(super::diagnostics::Answer::Count(col)) => {
                                let st = self.status_flags();
                                let cols = [codec::Column { name: col, kind: codec::TYPE_LONGLONG, flags: codec::FLAG_UNSIGNED }];
                                codec::push_text_result_set(&mut self.wr, self.reply_seq, &cols, &[vec![Some("0".into())]], st);
                                answered = true;
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
                (self.row_count, self.found_rows) = (-1, 0);
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
                        let state_change = |e: &Effect| matches!(e, Effect::SetVar(..) | Effect::SetNames(..) | Effect::Use(_));
                        let call = a.kind == Some(classify::Kind::Call) && !self.rt.cfg.proxy.multiplex_after_call;
                        let broken_multi = a.multi && err && a.effects.iter().any(state_change);
                        if call || broken_multi {
                            // State the proxy cannot follow: a procedure may SET anything; a
                            // multi-statement that failed part-way ran only some of its SETs.
                            // The connection knows the truth: the client stays on it.
                            let mut effects = a.effects.clone();
                            effects.retain(|e| !state_change(e));
                            let why = if call { "CALL (a procedure may change session state)" } else { "multi-statement failed part-way (session state unknown)" };
                            effects.push(Effect::Pin(classify::PinReason::Other(why)));
                            self.finish(&w, conn, &effects);
                        } else {
                            self.finish(&w, conn, &a.effects);
                        }
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

    /// KILL [QUERY|CONNECTION] <id> where id is a proxy session id (what CONNECTION_ID()
    /// and the handshake report): the target's running statement is killed on its backend
    /// (KILL QUERY <thread> there), and for CONNECTION the target session is closed.
    async fn kill(&mut self, (query_only, id): (bool, Option<u32>)) -> Result<(), ClientGone> {
        let Some(id) = id else {
            let e = SqlError::new(1235, "42000", "Breakwater supports KILL [CONNECTION | QUERY] <id> with a session id from CONNECTION_ID()");
            return self.send_err(self.reply_seq, &e).await;
        };
        let target = self.proxy.sessions.lock().ok().and_then(|m| m.get(&id).cloned());
        let Some(target) = target else {
            return self.send_err(self.reply_seq, &SqlError::new(1094, "HY000", format!("Unknown thread id: {id}"))).await;
        };
        if target.user.lock().map(|u| *u != self.user.name).unwrap_or(true) {
            return self.send_err(self.reply_seq, &SqlError::new(1095, "HY000", format!("You are not owner of thread {id}"))).await;
        }
        let running = target.running.lock().ok().and_then(|r| r.clone());
        if let Some(Running { server, thread, .. }) = running {
            let r = kill_query(&self.rt.cfg.monitor, &server, thread).await;
            if !matches!(r, Ok(Ok(()))) {
                let msg = format!("Could not kill the running statement of session {id} on {}: {r:?}", server.addr);
                return self.send_err(self.reply_seq, &SqlError::new(errcode::CONN_HOST_ERROR, "HY000", msg)).await;
            }
        }
        if !query_only {
            let _ = target.killed.send(true);
            if id == self.id {
                self.send_err(self.reply_seq, &SqlError::new(errcode::CONNECTION_KILLED, "70100", "Connection was killed")).await?;
                return Err(ClientGone);
            }
        }
        self.send_ok().await
    }

    /// A write went through: drop cached reads of its tables, now and, inside a
    /// transaction, again when it ends (a read between the write and COMMIT could have put
    /// the old rows back).
    pub(super) fn invalidate_after_write(&mut self, sql: &[u8], a: &classify::Analysis) {
        use classify::Kind as K;
        let writes = a.multi
            || matches!(a.kind, Some(K::Insert | K::Update | K::Delete | K::Replace | K::Call | K::Other));
        if writes {
            // A statement past the analysis cap: an INSERT/REPLACE names its table first;
            // for anything else the tables cannot be told (all entries go).
            let insert = matches!(a.kind, Some(K::Insert | K::Replace));
            let t = if a.multi || (a.truncated && !insert) {
                None
            } else {
                let cap = self.rt.cfg.proxy.query_digests_max_query_length;
                tables::tables(&sql[..sql.len().min(cap)], self.vars.schema.as_deref())
            };
            // `Other` without tables is DDL-ish text we cannot read (or harmless): drop all.
            self.proxy.cache.invalidate(t.as_deref());
            if self.pins.any() {
                match (&mut self.txn_written, t) {
                    (Some(Some(v)), Some(t)) => v.extend(t),
                    (slot, t) => *slot = Some(t),
                }
            }
        }
        if !self.pins.any() {
            if let Some(t) = self.txn_written.take() {
                self.proxy.cache.invalidate(t.as_deref());
            }
        }
    }

    /// The fast path of a query cache hit: a text query whose exact key was stored under the
    /// query rules in force is answered without lexing, digesting or routing it again (the
    /// rules decide on user, schema and text, all in the key). None, with nothing done, when
    /// the session is not in a cacheable state (pinned: a transaction, locks, ...; a
    /// temporary user, whose statements are audited) or there is no such fresh entry: the
    /// full path runs.
    async fn cached_hit(&mut self, buf: &[u8]) -> Option<Result<(), ClientGone>> {
        if self.pins.any() || self.user.temporary {
            return None;
        }
        // Only reads are stored: writes and transaction control (which cannot hit) skip the
        // key and the lookup. A miss here costs nothing else: the full path runs.
        let first = buf.get(1..)?.iter().find(|b| !b.is_ascii_whitespace());
        if !matches!(first, Some(b'S' | b's' | b'W' | b'w' | b'(' | b'/' | b'-' | b'#')) {
            return None;
        }
        let rules = self.rt.rules();
        if !rules.caches() {
            return None;
        }
        let t0 = Instant::now();
        let key = self.cache_key_for(&[], buf.get(1..)?);
        let hit = self.proxy.cache.hit(&key, rules.generation());
        self.cache_key = key;
        let (data, route) = hit?;
        self.held = None;
        self.row_count = -1;
        self.wr.buf_mut().extend_from_slice(&data);
        let res = self.flush().await;
        let took = t0.elapsed();
        self.digest.clear();
        self.digest.push_str(&route.digest);
        self.proxy.digests.record(&route.digest, -1, &self.user.name, self.vars.schema.as_deref(), took, 0, false);
        if self.proxy.telemetry.sample() {
            let end = crate::telemetry::now_ns();
            self.proxy.telemetry.record(crate::telemetry::SpanRecord {
                start_ns: end.saturating_sub(took.as_nanos() as u64),
                end_ns: end,
                operation: route.operation,
                schema: self.vars.schema.clone(),
                summary: self.digest.clone(),
                user: self.user.name.clone(),
                hostgroup: -1,
                backend: None,
                cache: "hit",
                error: None,
                rows: 0,
            });
        }
        Some(res)
    }

    /// A read under a caching rule: served from the cache, or fetched once (others wait)
    /// and stored. Returns (result, hostgroup for stats (-1 = cache), rows, failed).
    async fn cached_query(&mut self, buf: &[u8], d: &Decision, hg: u32, operation: &'static str) -> (Result<(), ClientGone>, i64, u64, bool) {
        let key = self.cache_key_for(&[], &buf[1..]);
        let cache = self.proxy.cache.clone();
        let r = self.cached_lookup(CacheSrc::Query(buf), d, hg, &cache, &key, Some(operation)).await;
        self.cache_key = key;
        r
    }

    /// The cache key of a read in this session's context (user, schema, character set,
    /// collation, protocol flags and every session variable the client set: sql_mode,
    /// time_zone, sql_select_limit, group_concat_max_len, character_set_results, …, since
    /// any of them may change a result), then `extra` parts and `body`.
    /// Reuses the session's key buffer: give it back with `self.cache_key = key`.
    pub(super) fn cache_key_for(&mut self, extra: &[&[u8]], body: &[u8]) -> Vec<u8> {
        let mut key = std::mem::take(&mut self.cache_key);
        let eof: &[u8] = if self.caps & caps::DEPRECATE_EOF != 0 { b"okeof" } else { b"" };
        let fixed: [&[u8]; 5] = [
            self.user.name.as_bytes(),
            self.vars.schema.as_deref().unwrap_or("").as_bytes(),
            self.vars.charset.as_bytes(),
            self.vars.collation.as_deref().unwrap_or("").as_bytes(),
            eof,
        ];
        cache::key(&mut key, &fixed, b"");
        for (name, value) in &self.vars.vars {
            key.extend_from_slice(name.as_bytes());
            key.push(b'=');
            key.extend_from_slice(value.as_bytes());
            key.push(0);
        }
        key.push(0);
        cache::key_append(&mut key, extra, body);
        key
    }

    pub(super) async fn cached_lookup(
        &mut self,
        mut src: CacheSrc<'_>,
        d: &Decision,
        hg: u32,
        cache: &Arc<cache::QueryCache>,
        key: &[u8],
        operation: Option<&'static str>,
    ) -> (Result<(), ClientGone>, i64, u64, bool) {
        fn tables_of(src: &CacheSrc<'_>, schema: Option<&str>) -> Vec<String> {
            let sql: &[u8] = match src {
                CacheSrc::Query(b) => b.get(1..).unwrap_or(&[]),
                CacheSrc::Stmt { stmt, .. } => stmt.sql.as_bytes(),
            };
            tables::tables(sql, schema).unwrap_or_default()
        }
        // Text queries record how they were routed, for the fast path of later hits.
        let route = |s: &Self| {
            operation.map(|op| {
                Arc::new(cache::Route { rules_generation: d.rules_generation, digest: Arc::from(s.digest.as_str()), operation: op })
            })
        };
        let wait = Duration::from_millis(self.rt.cfg.cache.fill_wait_ms);
        let ttl = Duration::from_millis(d.cache_ttl_ms);
        let stale = Duration::from_millis(d.cache_stale_ms);
        let mut waited = false;
        loop {
            match cache.lookup(key) {
                Lookup::Hit(data) => {
                    self.wr.buf_mut().extend_from_slice(&data);
                    return (self.flush().await, -1, 0, false);
                }
                Lookup::Wait(n) if !waited => {
                    waited = true;
                    let _ = tokio::time::timeout(wait, n.notified()).await;
                }
                Lookup::Wait(_) => {
                    // The filler is slow or failed twice: go to the backend without the cache.
                    let (r, rows, err) = self.fetch(&mut src, hg, false).await;
                    return (r, hg as i64, rows, err);
                }
                Lookup::Stale(data, mut fill) => {
                    let tables = tables_of(&src, self.vars.schema.as_deref());
                    fill.begin(&tables);
                    self.wr.buf_mut().extend_from_slice(&data);
                    if let Err(e) = self.flush().await {
                        return (Err(e), -1, 0, false);
                    }
                    // Refresh for the next clients; nothing of it reaches this one.
                    self.wr.start_capture(cache.max_entry_bytes, true);
                    let (r, _, err) = self.fetch(&mut src, hg, true).await;
                    if let (Some(data), false, Ok(())) = (self.wr.end_capture(), err, &r) {
                        cache.store(fill, &data, route(self), tables, ttl, stale);
                    }
                    return (r, -1, 0, false);
                }
                Lookup::Fill(mut fill) => {
                    let tables = tables_of(&src, self.vars.schema.as_deref());
                    fill.begin(&tables);
                    // Right after a write to these tables a replica may not have it yet.
                    let window = Duration::from_millis(self.rt.cfg.cache.fill_from_writer_after_write_ms);
                    let hg = if !tables.is_empty() && cache.written_within(&tables, window) { self.user.default_hostgroup } else { hg };
                    self.wr.start_capture(cache.max_entry_bytes, false);
                    let (r, rows, err) = self.fetch(&mut src, hg, true).await;
                    let data = self.wr.end_capture();
                    if let (Some(data), false, Ok(())) = (data, err, &r) {
                        cache.store(fill, &data, route(self), tables, ttl, stale);
                    }
                    return (r, hg as i64, rows, err);
                }
            }
        }
    }

    /// Run a read on a backend; (result, rows, failed).
    async fn fetch(&mut self, src: &mut CacheSrc<'_>, hg: u32, retryable: bool) -> (Result<(), ClientGone>, u64, bool) {
        let (r, effects) = match src {
            CacheSrc::Query(buf) => (self.run(hg, Command::Raw(buf), Kind::ResultSet, retryable).await, Vec::new()),
            CacheSrc::Stmt { stmt, payload } => {
                let cmd = super::prepared::StmtCommand {
                    payload,
                    sql: stmt.sql.clone(),
                    params: stmt.params,
                    known_types: stmt.types.clone(),
                    sent_types: None,
                    execute: true,
                };
                (self.run(hg, Command::Stmt(cmd), Kind::ResultSet, retryable).await, stmt.effects.clone())
            }
        };
        match r {
            Ok(Some((w, conn))) => {
                let (rows, err) = (w.rows, w.error.is_some());
                if let Some(e) = &w.error {
                    self.last_error = Some(e.code);
                }
                self.finish(&w, conn, &effects);
                (Ok(()), rows, err)
            }
            Ok(None) => (Ok(()), 0, true),
            Err(e) => (Err(e), 0, true),
        }
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

/// `KILL QUERY <thread>` on a server, over a connection of the monitor user (5 s bound).
pub async fn kill_query(
    m: &crate::config::MonitorConfig,
    server: &Server,
    thread: u32,
) -> Result<Result<(), mysql_async::Error>, tokio::time::error::Elapsed> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(server.cfg.host.clone())
        .tcp_port(server.cfg.port)
        .user(Some(m.username.clone()))
        .pass(Some(m.password.clone()))
        .prefer_socket(false);
    tokio::time::timeout(Duration::from_secs(5), async {
        use mysql_async::prelude::Queryable;
        let mut c = mysql_async::Conn::new(opts).await?;
        c.query_drop(format!("KILL QUERY {thread}")).await?;
        c.disconnect().await
    })
    .await
}

/// The default_query_timeout reaper: one task for the whole proxy (no timer per
/// statement on the hot path) looks at every session's running statement a few times a
/// second and kills those past the limit on their backend; the session then tells its
/// client why (error 1969).
pub fn spawn_query_reaper(proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let limit = proxy.runtime().cfg.proxy.default_query_timeout_ms;
            let tick = Duration::from_millis((limit / 4).clamp(50, 250));
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            if limit == 0 {
                continue;
            }
            let limit = Duration::from_millis(limit);
            let handles: Vec<Arc<SessionHandle>> = proxy.sessions.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
            for h in handles {
                let victim = match h.running.lock() {
                    Ok(mut r) => match r.as_mut() {
                        Some(run) if !run.killed && run.started.elapsed() >= limit => {
                            run.killed = true;
                            Some(run.clone())
                        }
                        _ => None,
                    },
                    Err(_) => None,
                };
                let Some(run) = victim else { continue };
                h.timed_out.store(true, Ordering::Relaxed);
                proxy.stats.query_timeouts.fetch_add(1, Ordering::Relaxed);
                let m = proxy.runtime().cfg.monitor.clone();
                tokio::spawn(async move {
                    warn!(server = %run.server.addr, thread = run.thread, "statement past default_query_timeout_ms: KILL QUERY");
                    if let Ok(Err(e)) | Err(e) = kill_query(&m, &run.server, run.thread).await.map_err(|e| mysql_async::Error::Other(e.to_string().into())) {
                        warn!(server = %run.server.addr, thread = run.thread, error = %e, "could not kill a statement past default_query_timeout_ms");
                    }
                });
            }
        }
    });
}

/// How the command payload is made for a particular backend connection.
pub enum Command<'a> {
    /// Forward the client's payload as it is.
    Raw(&'a [u8]),
    /// COM_STMT_PREPARE: forwarded as is; the PREPARE_OK's id becomes the proxy's id.
    Prepare(&'a [u8], u32),
    /// A statement command whose id must become this connection's statement id
    /// (and, for EXECUTE, whose parameter types may need to be re-sent).
    Stmt(super::prepared::StmtCommand<'a>),
}

impl<'a> Command<'a> {
    async fn build(&mut self, conn: &mut PooledConn) -> Result<&[u8], BackendError> {
        match self {
            Command::Raw(p) | Command::Prepare(p, _) => Ok(p),
            Command::Stmt(s) => s.build(conn).await,
        }
    }

    fn rewrite_id(&self) -> Option<u32> {
        match self {
            Command::Prepare(_, id) => Some(*id),
            _ => None,
        }
    }

    fn after(&mut self, conn: &mut PooledConn) {
        if let Command::Stmt(s) = self {
            s.after(conn);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Local {
    LastInsertId,
    ConnectionId,
}

/// `SELECT LAST_INSERT_ID()` / `@@IDENTITY` / `@@LAST_INSERT_ID` / `CONNECTION_ID()`
/// (optionally `AS alias`): what to answer and the column name. Looks only at short statements.
fn local_query(sql: &[u8]) -> Option<(Local, String)> {
    if sql.len() > 80 || !sql.get(..6).is_some_and(|p| p.eq_ignore_ascii_case(b"select")) {
        return None;
    }
    // Every form asked about has "@@" or "ID()": most short SELECTs stop here, unparsed.
    if !sql.windows(2).any(|w| w == b"@@") && !sql.windows(4).any(|w| w.eq_ignore_ascii_case(b"id()")) {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let (expr, alias) = match words.as_slice() {
        [_, e] => (*e, None),
        [_, e, a, name] if a.eq_ignore_ascii_case("as") => (*e, Some(*name)),
        [_, e, name] => (*e, Some(*name)),
        _ => return None,
    };
    let kind = match expr.to_ascii_uppercase().as_str() {
        "LAST_INSERT_ID()" | "@@IDENTITY" | "@@LAST_INSERT_ID" | "@@SESSION.IDENTITY" | "@@SESSION.LAST_INSERT_ID" => Local::LastInsertId,
        "CONNECTION_ID()" => Local::ConnectionId,
        _ => return None,
    };
    Some((kind, alias.unwrap_or(expr).trim_matches(|c| c == '`' || c == '"' || c == '\'').to_string()))
}

/// `KILL [CONNECTION | QUERY] <id>`: (query_only, id). Anything else starting with KILL
/// (KILL USER, KILL ... QUERY ID) gives Some with id None, answered with an error.
fn parse_kill(sql: &[u8]) -> Option<(bool, Option<u32>)> {
    use crate::router::lexer::{Lexer, Tok};
    // KILL statements are short: a long text (a bulk INSERT) is never lexed here.
    if sql.len() > 256 {
        return None;
    }
    let toks: Vec<Tok> = Lexer::new(sql).filter(|t| *t != Tok::Punct(b';')).collect();
    match toks.first() {
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"KILL") => {}
        _ => return None,
    }
    let num = |t: Option<&Tok>| match t {
        Some(Tok::Num(n)) => std::str::from_utf8(n).ok().and_then(|s| s.parse().ok()),
        _ => None,
    };
    Some(match toks.get(1) {
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"QUERY") && toks.len() == 3 => (true, num(toks.get(2))),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"CONNECTION") && toks.len() == 3 => (false, num(toks.get(2))),
        Some(Tok::Num(_)) if toks.len() == 2 => (false, num(toks.get(1))),
        _ => (false, None),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn last_insert_id_queries() {
        use super::{local_query as q, Local};
        assert_eq!(q(b"SELECT LAST_INSERT_ID()"), Some((Local::LastInsertId, "LAST_INSERT_ID()".into())));
        assert_eq!(q(b"select last_insert_id() as id;"), Some((Local::LastInsertId, "id".into())));
        assert_eq!(q(b"SELECT @@IDENTITY"), Some((Local::LastInsertId, "@@IDENTITY".into())));
        assert_eq!(q(b"SELECT CONNECTION_ID()"), Some((Local::ConnectionId, "CONNECTION_ID()".into())));
        assert_eq!(q(b"SELECT LAST_INSERT_ID(5)"), None);
        assert_eq!(q(b"SELECT c FROM t WHERE id = 1"), None);
        assert_eq!(super::parse_kill(b"KILL QUERY 12"), Some((true, Some(12))));
        assert_eq!(super::parse_kill(b"kill 7;"), Some((false, Some(7))));
        assert_eq!(super::parse_kill(b"KILL CONNECTION 3"), Some((false, Some(3))));
        assert_eq!(super::parse_kill(b"KILL USER app"), Some((false, None)));
        assert_eq!(super::parse_kill(b"SELECT 1"), None);
    }
}
