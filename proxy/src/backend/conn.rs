//! One connection from the proxy to a MySQL server: login, session-state sync, and
//! forwarding a command's response to a client packet by packet.

use crate::frontend::state::SessionVars;
use crate::protocol::either::Either;
use crate::protocol::packet::{PacketError, PacketReader, PacketWriter};
use crate::protocol::response::{Kind, Walker};
use crate::protocol::{auth, caps, charset, cmd, codec, handshake};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use super::stream::{BackendRead, BackendWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;

/// Connections are shared between clients that log in to backends the same way: the same
/// backend user and the capabilities that change what the server answers (CLIENT_FOUND_ROWS
/// changes affected-row counts; without CLIENT_MULTI_RESULTS / PS_MULTI_RESULTS a server
/// refuses a CALL that returns result sets, as it must for such a client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub user: Arc<str>,
    /// The client's FOUND_ROWS, MULTI_RESULTS and PS_MULTI_RESULTS bits ([`KEY_CAPS`]).
    pub caps: u32,
}

/// The client capabilities that become part of a backend connection's key.
pub const KEY_CAPS: u32 = caps::FOUND_ROWS | caps::MULTI_RESULTS | caps::PS_MULTI_RESULTS;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {err}")]
    Connect { addr: String, err: std::io::Error },
    #[error("timed out connecting to {0}")]
    ConnectTimeout(String),
    #[error("login to {addr} refused: {msg}")]
    Login { addr: String, code: u16, msg: String },
    #[error("connection to {addr} lost: {err}")]
    Lost { addr: String, err: PacketError },
    #[error("unexpected reply from {0}")]
    Protocol(String),
    /// use_ssl: the TLS configuration, the server's offer or the handshake failed.
    #[error("TLS to {addr}: {msg}")]
    Tls { addr: String, msg: String },
    /// The server answered a proxy-issued command (state sync, re-prepare) with an error.
    #[error("{}", .0.message)]
    Sql(codec::Err),
}

/// Where forwarding a response failed.
#[derive(Debug)]
pub enum ForwardError {
    /// The backend failed. `started` says whether any of the response reached the client;
    /// `last_seq` is the sequence id of the last packet the client got.
    Backend { err: BackendError, started: bool, last_seq: u8 },
    /// Writing to the client failed: the client is gone.
    Client(std::io::Error),
}

/// Protocol-level state a connection must match before a client's command runs on it.
#[derive(Debug, Clone, Copy)]
pub struct SyncExtra {
    /// The client's CLIENT_MULTI_STATEMENTS, as changed by COM_SET_OPTION.
    pub multi_statements: bool,
    /// The client's LAST_INSERT_ID(), when the command reads it.
    pub last_insert_id: Option<u64>,
}

/// A statement prepared on this backend connection.
#[derive(Debug, Clone)]
pub struct BackendStmt {
    pub id: u32,
    pub params: u16,
    /// Parameter types this statement last received (an EXECUTE without types reuses them).
    pub types: Option<Vec<u8>>,
}

/// Most statements one connection keeps prepared before it closes the oldest.
const MAX_STMTS_PER_CONN: usize = 512;

/// A statement prepared on a backend connection is reused only for the same text in the
/// same context: a server resolves table names in the schema the statement was prepared in,
/// and parses it under that sql_mode (ANSI_QUOTES turns "v" from a string into a column)
/// and character set. The context is a hash of the connection's whole replayed state at
/// prepare time (schema, character set, collation, every session variable): a statement
/// is shared only between clients for whom it means the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StmtKey {
    pub sql: Arc<str>,
    pub context: u64,
}

/// The context a statement is prepared in (see [`StmtKey`]).
pub fn prepare_context(v: &SessionVars) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x5eed).build_hasher();
    v.schema.hash(&mut h);
    v.charset.hash(&mut h);
    v.collation.hash(&mut h);
    v.vars.hash(&mut h);
    h.finish()
}

pub struct BackendConn {
    rd: PacketReader<BackendRead>,
    wr: PacketWriter<BackendWrite>,
    pub addr: Arc<str>,
    pub key: ConnKey,
    pub thread_id: u32,
    /// Session state applied on this connection.
    pub vars: SessionVars,
    /// Status flags of the last OK/EOF.
    pub status: u16,
    /// Statements prepared here, by SQL text and the context they were prepared in.
    pub stmts: HashMap<StmtKey, BackendStmt>,
    /// The connection cannot be trusted any more (I/O error, half-read response).
    pub broken: bool,
    /// Holds state the pool cannot reset by itself (temporary tables, user variables, locks).
    pub dirty: bool,
    pub last_used: Instant,
    /// Whether the server runs multi-statement queries on this connection (COM_SET_OPTION).
    pub multi_statements: bool,
    /// LAST_INSERT_ID() on this connection: what its last id-generating statement reported
    /// (or what the proxy set).
    pub last_insert_id: u64,
    scratch: Vec<u8>,
    /// For a TLS connection: a duplicate of its socket, for the idle liveness check.
    tls_peek: Option<socket2::Socket>,
    _permit: OwnedSemaphorePermit,
}

/// Where a new connection goes: the server's address, its unix socket when it is on this
/// host, and the TLS client configuration and expected name when it has `use_ssl`.
pub struct Target<'a> {
    pub addr: Arc<str>,
    pub socket: Option<&'a str>,
    pub tls: Option<(Arc<tokio_rustls::rustls::ClientConfig>, tokio_rustls::rustls::pki_types::ServerName<'static>)>,
}

impl BackendConn {
    /// Connect and log in. `permit` is the pool slot this connection occupies until dropped.
    pub async fn connect(
        target: Target<'_>,
        key: ConnKey,
        password: &str,
        timeout: Duration,
        read_timeout: Duration,
        permit: OwnedSemaphorePermit,
    ) -> Result<Self, BackendError> {
        let addr = target.addr.clone();
        let fut = Self::connect_inner(target, key, password, read_timeout, permit);
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::ConnectTimeout(addr.to_string())),
        }
    }

    async fn connect_inner(
        target: Target<'_>,
        key: ConnKey,
        password: &str,
        read_timeout: Duration,
        permit: OwnedSemaphorePermit,
    ) -> Result<Self, BackendError> {
        let addr = target.addr;
        let connect_err = |err| BackendError::Connect { addr: addr.to_string(), err };
        let lost = |err| BackendError::Lost { addr: addr.to_string(), err };
        let mut buf = Vec::new();
        // The greeting is read before the socket is split: with use_ssl the same socket
        // then carries the TLS handshake. The server sends nothing after its greeting until
        // it is answered, so nothing is left in the reader's buffer.
        let (r, w, seq, tls_peek) = match target.socket {
            Some(path) => {
                let mut stream = UnixStream::connect(path).await.map_err(connect_err)?;
                let seq = read_greeting(&mut stream, &mut buf, &addr).await?;
                let (r, w) = stream.into_split();
                (Either::Right(Either::Left(r)), Either::Right(Either::Left(w)), seq, None)
            }
            None => {
                let mut stream = TcpStream::connect(&*addr).await.map_err(connect_err)?;
                let _ = stream.set_nodelay(true);
                dead_peer_bound(&stream, read_timeout);
                let seq = read_greeting(&mut stream, &mut buf, &addr).await?;
                match target.tls {
                    None => {
                        let (r, w) = stream.into_split();
                        (Either::Left(r), Either::Left(w), seq, None)
                    }
                    Some((cfg, name)) => {
                        let tls_err = |msg: String| BackendError::Tls { addr: addr.to_string(), msg };
                        let g = handshake::parse_greeting(&buf).ok_or_else(|| BackendError::Protocol(addr.to_string()))?;
                        if g.capabilities & caps::SSL == 0 {
                            return Err(tls_err("use_ssl is set but the server does not offer TLS (have_ssl is not YES there)".into()));
                        }
                        // SSLRequest: the first 32 bytes of a handshake response.
                        let c = login_caps(&key) | caps::SSL;
                        let mut req = Vec::with_capacity(36);
                        req.extend_from_slice(&[32, 0, 0, seq.wrapping_add(1)]);
                        req.extend_from_slice(&c.to_le_bytes());
                        req.extend_from_slice(&(64u32 << 20).to_le_bytes());
                        req.push(charset::BACKEND_COLLATION);
                        req.extend_from_slice(&[0u8; 23]);
                        tokio::io::AsyncWriteExt::write_all(&mut stream, &req).await.map_err(|e| lost(e.into()))?;
                        // A duplicate of the socket, to peek at while the connection is
                        // idle (the TLS halves cannot be read past rustls).
                        let peek = socket2::SockRef::from(&stream).try_clone().map_err(connect_err)?;
                        let tls = tokio_rustls::TlsConnector::from(cfg)
                            .connect(name, stream)
                            .await
                            .map_err(|e| tls_err(format!("TLS handshake failed: {e}")))?;
                        let (r, w) = tokio::io::split(tls);
                        (Either::Right(Either::Right(r)), Either::Right(Either::Right(w)), seq.wrapping_add(1), Some(peek))
                    }
                }
            }
        };
        let mut rd = PacketReader::new(r);
        let mut wr = PacketWriter::new(w);
        let greeting = handshake::parse_greeting(&buf).ok_or_else(|| BackendError::Protocol(addr.to_string()))?;
        let tls = tls_peek.is_some();
        let c = login_caps(&key) | if tls { caps::SSL } else { 0 };
        let (plugin, token) = login_token(&greeting.plugin, password, &greeting.scramble);
        let resp = handshake::handshake_response(c, charset::BACKEND_COLLATION, &key.user, &token, None, plugin);
        wr.push(seq.wrapping_add(1), &resp);
        wr.flush().await.map_err(|e| lost(e.into()))?;
        loop {
            let seq = rd.read_payload(&mut buf, 1 << 20).await.map_err(lost)?;
            let next = seq.wrapping_add(1);
            match buf.first() {
                Some(0x00) => break,
                Some(0xff) => {
                    let e = codec::parse_err(&buf);
                    return Err(BackendError::Login {
                        addr: addr.to_string(),
                        code: e.as_ref().map(|e| e.code).unwrap_or(0),
                        msg: e.map(|e| e.message).unwrap_or_default(),
                    });
                }
                Some(0xfe) => {
                    let (plugin, data) =
                        handshake::parse_auth_switch(&buf).ok_or_else(|| BackendError::Protocol(addr.to_string()))?;
                    let (p, token) = login_token(&plugin, password, &data);
                    if p != plugin {
                        return Err(BackendError::Login {
                            addr: addr.to_string(),
                            code: 0,
                            msg: format!("backend asks for unsupported auth plugin {plugin}"),
                        });
                    }
                    wr.push(next, &token);
                    wr.flush().await.map_err(|e| lost(e.into()))?;
                }
                Some(0x01) if buf.get(1) == Some(&0x03) => continue, // caching_sha2 fast auth ok
                // caching_sha2 full authentication: over TLS the password itself is the
                // answer (what MySQL's own client sends on a secure connection).
                Some(0x01) if buf.get(1) == Some(&0x04) && tls && !password.starts_with(auth::STAGE1_PREFIX) => {
                    let mut p = Vec::with_capacity(password.len() + 1);
                    p.extend_from_slice(password.as_bytes());
                    p.push(0);
                    wr.push(next, &p);
                    wr.flush().await.map_err(|e| lost(e.into()))?;
                }
                _ => {
                    return Err(BackendError::Login {
                        addr: addr.to_string(),
                        code: 0,
                        msg: "unsupported authentication exchange (full caching_sha2 auth needs TLS)".into(),
                    })
                }
            }
        }
        let (cs, coll) = charset::by_id(charset::BACKEND_COLLATION);
        Ok(Self {
            rd,
            wr,
            addr,
            key,
            thread_id: greeting.connection_id,
            vars: SessionVars { schema: None, charset: cs.into(), collation: Some(coll.into()), vars: Default::default() },
            status: crate::protocol::status::AUTOCOMMIT,
            stmts: HashMap::new(),
            broken: false,
            dirty: false,
            last_used: Instant::now(),
            multi_statements: true,
            last_insert_id: 0,
            scratch: Vec::new(),
            tls_peek,
            _permit: permit,
        })
    }

    /// Whether this connection runs over TLS.
    pub fn tls(&self) -> bool {
        self.tls_peek.is_some()
    }

    /// Cheap liveness check for an idle connection: a closed or chatty socket is dead.
    pub fn looks_alive(&self) -> bool {
        if self.rd.buffered() > 0 {
            return false;
        }
        if let Some(sock) = &self.tls_peek {
            // Anything on an idle TLS socket (a close_notify, EOF) means it is going away.
            let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            return matches!(sock.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        }
        let mut b = [0u8; 1];
        matches!(self.rd.get_ref().try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    fn lost(&mut self, err: PacketError) -> BackendError {
        self.broken = true;
        BackendError::Lost { addr: self.addr.to_string(), err }
    }

    /// Run a proxy-issued command and discard its response (state sync, re-prepare, reset).
    pub async fn exec_discard(&mut self, payload: &[u8], kind: Kind) -> Result<Walker, BackendError> {
        self.exec_inspect(payload, kind, |_, _| {}).await
    }

    /// Like [`Self::exec_discard`], showing each packet payload (with its index) to `look`.
    async fn exec_inspect(&mut self, payload: &[u8], kind: Kind, mut look: impl FnMut(u32, &[u8])) -> Result<Walker, BackendError> {
        self.wr.push(0, payload);
        if let Err(e) = self.wr.flush().await {
            return Err(self.lost(e.into()));
        }
        let mut w = Walker::new(kind);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut i = 0u32;
        loop {
            scratch.clear();
            match self.rd.read_raw_into(&mut scratch).await {
                Ok(_) => {
                    look(i, &scratch[4..]);
                    i += 1;
                    if w.feed(&scratch[4..]) {
                        break;
                    }
                }
                Err(e) => {
                    self.scratch = scratch;
                    return Err(self.lost(e));
                }
            }
        }
        if scratch.capacity() > 1 << 20 {
            scratch = Vec::new();
        }
        self.scratch = scratch;
        if let Some(st) = w.status {
            self.status = st;
        }
        Ok(w)
    }

    pub async fn query_discard(&mut self, sql: &str) -> Result<Walker, BackendError> {
        let mut p = Vec::with_capacity(sql.len() + 1);
        p.push(cmd::QUERY);
        p.extend_from_slice(sql.as_bytes());
        let w = self.exec_discard(&p, Kind::ResultSet).await?;
        match w.error {
            Some(e) => Err(BackendError::Sql(e)),
            None => Ok(w),
        }
    }

    /// Bring this connection's schema, character set, variables and protocol options to the
    /// client's.
    pub async fn sync(&mut self, target: &SessionVars, extra: &SyncExtra) -> Result<(), BackendError> {
        if extra.multi_statements != self.multi_statements {
            self.set_multi_statements(extra.multi_statements).await?;
        }
        if let Some(id) = extra.last_insert_id {
            if id != self.last_insert_id {
                // `SET last_insert_id` is what LAST_INSERT_ID() returns next (MySQL and
                // MariaDB): the statement then sees this client's id, not the last user's.
                self.query_discard(&format!("SET last_insert_id = {id}")).await?;
                self.last_insert_id = id;
            }
        }
        if target.schema != self.vars.schema {
            if let Some(db) = &target.schema {
                let mut p = vec![cmd::INIT_DB];
                p.extend_from_slice(db.as_bytes());
                let w = self.exec_discard(&p, Kind::Single).await?;
                if let Some(e) = w.error {
                    return Err(BackendError::Sql(e));
                }
            }
            // A client without a default schema keeps whatever this connection has:
            // MySQL has no way to unset it, and fully qualified names still work.
            self.vars.schema = target.schema.clone();
        }
        if let Some(set) = target.sync_statement(&self.vars) {
            self.query_discard(&set).await?;
            let schema = self.vars.schema.clone();
            self.vars = target.clone();
            self.vars.schema = schema;
        }
        Ok(())
    }

    /// The key of `sql` prepared in this connection's current state.
    pub fn stmt_key(&self, sql: &Arc<str>) -> StmtKey {
        StmtKey { sql: sql.clone(), context: prepare_context(&self.vars) }
    }

    /// `sql` as prepared here in the connection's current state.
    pub fn stmt(&self, sql: &Arc<str>) -> Option<&BackendStmt> {
        self.stmts.get(&self.stmt_key(sql))
    }

    /// COM_SET_OPTION: multi-statements on or off, as the client has them. The server answers
    /// with an EOF packet (or an error).
    pub async fn set_multi_statements(&mut self, on: bool) -> Result<(), BackendError> {
        let opt: u16 = if on { 0 } else { 1 };
        let w = self.exec_discard(&[cmd::SET_OPTION, opt as u8, (opt >> 8) as u8], Kind::Single).await?;
        if let Some(e) = w.error {
            return Err(BackendError::Sql(e));
        }
        self.multi_statements = on;
        Ok(())
    }

    /// Run a query whose answer is one unsigned number (first column of the first row).
    pub async fn query_u64(&mut self, sql: &str) -> Result<Option<u64>, BackendError> {
        let mut p = Vec::with_capacity(sql.len() + 1);
        p.push(cmd::QUERY);
        p.extend_from_slice(sql.as_bytes());
        let mut columns = None;
        let mut value = None;
        let w = self
            .exec_inspect(&p, Kind::ResultSet, |i, payload| {
                if i == 0 {
                    columns = codec::read_lenenc(payload, &mut 0);
                } else if columns.is_some_and(|n| i as u64 == n + 2) && payload.first() != Some(&0xfe) {
                    // count, n definitions, EOF, then the first row.
                    value = codec::read_lenenc_str(payload, &mut 0)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<u64>().ok());
                }
            })
            .await?;
        match w.error {
            Some(e) => Err(BackendError::Sql(e)),
            None => Ok(value),
        }
    }

    /// Make sure `sql` is prepared here in the connection's current state (the caller has
    /// synced it to the client's); returns the backend statement id.
    pub async fn ensure_prepared(&mut self, sql: &Arc<str>) -> Result<u32, BackendError> {
        let key = self.stmt_key(sql);
        self.ensure_prepared_key(&key).await
    }

    /// [`Self::ensure_prepared`] with the key already made (one hash per execute).
    pub async fn ensure_prepared_key(&mut self, key: &StmtKey) -> Result<u32, BackendError> {
        if let Some(s) = self.stmts.get(key) {
            return Ok(s.id);
        }
        let sql = &key.sql;
        if self.stmts.len() >= MAX_STMTS_PER_CONN {
            self.close_all_stmts();
        }
        let mut p = Vec::with_capacity(sql.len() + 1);
        p.push(cmd::STMT_PREPARE);
        p.extend_from_slice(sql.as_bytes());
        let w = self.exec_discard(&p, Kind::Prepare).await?;
        match (w.prepare, w.error) {
            (Some(ok), _) => {
                let s = BackendStmt { id: ok.statement_id, params: ok.params, types: None };
                self.stmts.insert(key.clone(), s);
                Ok(ok.statement_id)
            }
            (None, Some(e)) => Err(BackendError::Sql(e)),
            (None, None) => Err(BackendError::Protocol(self.addr.to_string())),
        }
    }

    /// Record a statement the client prepared through this connection; an older copy of the
    /// same SQL is closed (COM_STMT_CLOSE has no response, so this costs no round trip).
    pub fn adopt_prepared(&mut self, sql: Arc<str>, id: u32, params: u16) {
        let key = self.stmt_key(&sql);
        if let Some(old) = self.stmts.insert(key, BackendStmt { id, params, types: None }) {
            let mut p = vec![cmd::STMT_CLOSE];
            p.extend_from_slice(&old.id.to_le_bytes());
            self.wr.push(0, &p);
        }
    }

    /// Queue COM_STMT_CLOSE for every statement (no response is sent for it).
    fn close_all_stmts(&mut self) {
        for (_, s) in self.stmts.drain() {
            let mut p = vec![cmd::STMT_CLOSE];
            p.extend_from_slice(&s.id.to_le_bytes());
            self.wr.push(0, &p);
        }
    }

    /// Send a command without a response (COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE).
    pub async fn send_no_reply(&mut self, payload: &[u8]) -> Result<(), BackendError> {
        self.wr.push(0, payload);
        match self.wr.flush().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.lost(e.into())),
        }
    }

    /// COM_RESET_CONNECTION: drops temporary tables, user variables, locks, prepared
    /// statements and session variables, so a dirty connection can serve another client.
    pub async fn reset(&mut self) -> Result<(), BackendError> {
        let w = self.exec_discard(&[cmd::RESET_CONNECTION], Kind::Single).await?;
        if let Some(e) = w.error {
            return Err(BackendError::Sql(e));
        }
        self.stmts.clear();
        let (cs, coll) = charset::by_id(charset::BACKEND_COLLATION);
        let schema = self.vars.schema.take();
        self.vars = SessionVars { schema, charset: cs.into(), collation: Some(coll.into()), vars: Default::default() };
        self.dirty = false;
        self.last_insert_id = 0;
        if !self.multi_statements {
            // Whether a reset keeps COM_SET_OPTION differs between servers: say it again.
            self.set_multi_statements(true).await?;
        }
        Ok(())
    }

    /// Send the client's command (already framed with sequence `seq`) and forward the whole
    /// response to `client`, packet by packet. `rewrite_stmt_id` replaces the statement id in
    /// a PREPARE_OK so the client sees the proxy's id.
    pub async fn forward<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        seq: u8,
        payload: &[u8],
        kind: Kind,
        client: &mut PacketWriter<W>,
        rewrite_stmt_id: Option<u32>,
        timeout: Option<(&std::sync::atomic::AtomicBool, u64)>,
    ) -> Result<Walker, ForwardError> {
        if let Err(e) = self.wr.send(seq, payload).await {
            let err = self.lost(e.into());
            return Err(ForwardError::Backend { err, started: false, last_seq: seq });
        }
        self.last_used = Instant::now();
        let mut w = Walker::new(kind);
        let mut started = false;
        let mut last_seq = seq;
        let base = client.pending();
        let mut first = true;
        loop {
            let out = client.buf_mut();
            let start = out.len();
            match self.rd.read_raw_into(out).await {
                Ok((s, _len)) => {
                    last_seq = s;
                    let done = w.feed(&out[start + 4..]);
                    if first {
                        first = false;
                        // PREPARE_OK: the client sees the proxy's statement id (the walker
                        // has already read the backend's).
                        if let (Some(id), Some(0x00)) = (rewrite_stmt_id, out.get(start + 4)) {
                            if out.len() >= start + 9 {
                                out[start + 5..start + 9].copy_from_slice(&id.to_le_bytes());
                            }
                        }
                    }
                    if done {
                        break;
                    }
                    if client.pending() >= 256 * 1024 {
                        client.flush().await.map_err(|e| {
                            self.broken = true;
                            ForwardError::Client(e)
                        })?;
                        started = true;
                    }
                }
                Err(e) => {
                    let err = self.lost(e);
                    if !started {
                        // Nothing of this response reached the client: drop what was buffered.
                        client.buf_mut().truncate(base);
                        return Err(ForwardError::Backend { err, started: false, last_seq: seq });
                    }
                    // Keep complete packets already buffered; the caller appends an ERR.
                    client.buf_mut().truncate(start);
                    return Err(ForwardError::Backend { err, started: true, last_seq });
                }
            }
        }
        if let Some(st) = w.status {
            self.status = st;
        }
        if w.last_insert_id != 0 {
            self.last_insert_id = w.last_insert_id;
        }
        // Killed by default_query_timeout: the client gets an error that says so, not the
        // server's bare "Query execution was interrupted" (when nothing else was sent yet).
        if let (Some((flag, ms)), Some(_), false) = (timeout, &w.error, started) {
            if flag.swap(false, std::sync::atomic::Ordering::Relaxed) {
                let msg = format!(
                    "Breakwater: the statement ran longer than default_query_timeout_ms ({ms} ms) and was killed on backend {}",
                    self.addr
                );
                let err = codec::err_packet(1969, "70100", &msg);
                client.buf_mut().truncate(base);
                client.push(seq.wrapping_add(1), &err);
                w.error = codec::parse_err(&err);
            }
        }
        client.flush().await.map_err(ForwardError::Client)?;
        Ok(w)
    }
}

/// Make a TCP connection fail within about `t` once its peer stops answering: keepalive
/// probes from `t`/2 on while it is idle (a statement in flight is idle at the TCP level),
/// and TCP_USER_TIMEOUT for data left unacknowledged. A live server that is only slow keeps
/// answering probes, so this never cuts a long statement off. Zero leaves the kernel's.
pub fn dead_peer_bound(stream: &TcpStream, t: Duration) {
    if t.is_zero() {
        return;
    }
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time((t / 2).max(Duration::from_secs(1)))
        .with_interval((t / 10).max(Duration::from_secs(1)))
        .with_retries(10);
    if let Err(e) = sock.set_tcp_keepalive(&ka).and_then(|_| sock.set_tcp_user_timeout(Some(t))) {
        tracing::warn!(error = %e, "cannot set TCP keepalive / TCP_USER_TIMEOUT on a backend socket");
    }
}

/// TCP keepalive for a client socket: a vanished client host is noticed after `idle` plus
/// six probes 10 s apart.
pub fn client_keepalive(stream: &TcpStream, idle: Duration) {
    if idle.is_zero() {
        return;
    }
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new().with_time(idle.max(Duration::from_secs(1))).with_interval(Duration::from_secs(10)).with_retries(6);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a client socket");
    }
}

/// The capabilities the proxy logs in to a backend with, for a connection of `key`.
fn login_caps(key: &ConnKey) -> u32 {
    (caps::PROXY_BACKEND & !(caps::MULTI_RESULTS | caps::PS_MULTI_RESULTS)) | (key.caps & KEY_CAPS)
}

/// Read the server's greeting (or the error it sends instead: too many connections, host
/// blocked) from the unsplit socket; returns its sequence id.
async fn read_greeting<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>, addr: &str) -> Result<u8, BackendError> {
    let mut rd = PacketReader::new(stream);
    let seq = rd.read_payload(buf, 1 << 20).await.map_err(|err| BackendError::Lost { addr: addr.to_string(), err })?;
    if buf.first() == Some(&0xff) {
        let e = codec::parse_err(buf);
        return Err(BackendError::Login {
            addr: addr.to_string(),
            code: e.as_ref().map(|e| e.code).unwrap_or(0),
            msg: e.map(|e| e.message).unwrap_or_default(),
        });
    }
    if rd.buffered() > 0 {
        return Err(BackendError::Protocol(addr.to_string()));
    }
    Ok(seq)
}

/// The auth token for a backend login, for the plugin the server asks for.
fn login_token(plugin: &str, password: &str, scramble: &[u8]) -> (&'static str, Vec<u8>) {
    // A stored SHA1(password) (temporary users) can only answer mysql_native_password.
    if let Some(stage1) = password.strip_prefix(auth::STAGE1_PREFIX).and_then(auth::from_hex).and_then(|v| <[u8; 20]>::try_from(v).ok()) {
        let scramble = scramble.get(..20).unwrap_or(scramble);
        return (auth::NATIVE, auth::native_token_from_stage1(&stage1, scramble));
    }
    let scramble = scramble.get(..20).unwrap_or(scramble);
    if plugin == auth::CACHING_SHA2 {
        (auth::CACHING_SHA2, auth::sha2_token(password.as_bytes(), scramble))
    } else {
        (auth::NATIVE, auth::native_token(password.as_bytes(), scramble))
    }
}
