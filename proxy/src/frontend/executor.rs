//! The executor: a command's trip to a backend. Checkout (the pinned connection, or one
//! from the routed hostgroup's pools, never a write detoured to another hostgroup), state
//! sync, forwarding, and the retry of a read whose backend failed before answering.

use super::session::{ClientGone, Session, SqlError};
use crate::protocol::errcode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;
use crate::backend::conn::{BackendError, ForwardError};
use crate::adaptive::backend::{InFlight, Shed};
use crate::backend::hostgroup::{Gate, Hostgroup};
use crate::backend::pool::{Checkout, PoolError, PooledConn};
use crate::backend::server::{Server, Status};
use crate::protocol::response::{Kind, Walker};
use crate::runtime::Running;

impl Session {
    /// The pinned connection, or one from a server of `hostgroup`. A read (`read`) whose
    /// hostgroup has no ONLINE server falls back to the user's default hostgroup; a write
    /// never does: it gets a clear error instead of landing on another hostgroup.
    ///
    /// Every statement also takes a slot under its server's adaptive concurrency limit (the
    /// returned [`InFlight`]); one over the limit waits in the server's bounded queue, then
    /// is refused with error 9001. A pinned client's statements are counted, not queued.
    pub(super) async fn acquire(&mut self, hostgroup: u32, exclude: Option<&Arc<Server>>, read: bool) -> Result<(PooledConn, InFlight), SqlError> {
        let admission = self.rt.cfg.proxy.admission();
        if let Some(c) = self.pinned.take() {
            if c.server.status() != Status::OfflineHard {
                // A pinned client (a transaction, locks, ...) was admitted when it started:
                // its statements are counted in flight but never queued or shed, since one
                // holding locks must not wait behind statements that wait for its locks.
                let load = c.server.pool.load.clone();
                let counted = crate::adaptive::backend::Admission { enabled: false, ..admission };
                return match load.admit(counted).await {
                    Ok(slot) => Ok((c, slot)),
                    Err(shed) => {
                        let e = shed_error(&c.server, &shed);
                        self.pinned = Some(c);
                        Err(e)
                    }
                };
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
        if self.user.temporary && self.rt.user(&self.user.name).is_none() {
            // Its grant ended: no new backend connection, not even to retry a read whose
            // connection the expiry killed (its account may live on a while on a server the
            // proxy could not reach).
            return Err(SqlError::new(
                errcode::CONNECTION_KILLED,
                "70100",
                format!("Breakwater: temporary access of '{}' has ended (expired or revoked)", self.user.name),
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
            tls: &rt.backend_tls,
        };
        let mut last_err = None;
        let mut full: Vec<String> = Vec::new();
        // The server that just failed is skipped on the next pick (no allocation on the
        // path where the first pick works).
        let mut failed: Option<Arc<Server>> = None;
        for _ in 0..hg.servers.len().max(1) {
            let Some(server) = hg.pick(failed.as_ref().or(exclude), p.balance_for(hg.id)) else { break };
            if failed.as_ref().is_some_and(|f| Arc::ptr_eq(f, &server)) {
                break;
            }
            let server = if admission.enabled { with_room(&hg, server, failed.as_ref().or(exclude)) } else { server };
            let slot = match server.pool.load.admit(admission).await {
                Ok(slot) => slot,
                Err(shed) => return Err(shed_error(&server, &shed)),
            };
            match server.checkout(&opts).await {
                Ok(c) => return Ok((c, slot)),
                Err(PoolError::Backend(BackendError::Login { addr, code: errcode::CON_COUNT, msg })) => {
                    // The server is alive but at its own max_connections: another server
                    // of the hostgroup may take it; if none can, the client gets 1040 too.
                    full.push(format!("{addr}: {msg}"));
                    server.pool.load.failed();
                    failed = Some(server);
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
                    server.pool.load.failed();
                    server.set_status(Status::Shunned, &e.to_string());
                    last_err = Some(e.to_string());
                    failed = Some(server);
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

    /// No backend answered, and nothing was sent yet: the expired cached result when the
    /// read's rule allows stale-if-error, else the error.
    async fn fail(&mut self, e: &SqlError) -> Result<(), ClientGone> {
        match self.stale_if_error.take() {
            Some(data) => {
                warn!(session = self.id, error = %e.message, "no backend answered: served an expired cached result (stale-if-error)");
                self.proxy.cache.served_stale_if_error();
                self.push_cached(&data);
                self.flush().await
            }
            None => self.send_err(self.reply_seq, e).await,
        }
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
            let (mut conn, in_flight) = match self.acquire(hostgroup, exclude.as_ref(), retryable).await {
                Ok(c) => c,
                Err(e) => {
                    self.fail(&e).await?;
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
                    server.pool.load.failed();
                    if !was_pinned && attempt < 3 {
                        exclude = Some(server);
                        continue;
                    }
                    self.connection_lost(&server, &e.to_string());
                    let msg = format!("Lost connection to backend {} (hostgroup {}): {e}", server.addr, server.cfg.hostgroup);
                    self.fail(&SqlError::new(errcode::SERVER_LOST, "HY000", msg)).await?;
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
            match &res {
                // The server itself says it is in trouble: counts toward ejection.
                Ok(w) if w.error.as_ref().is_some_and(|e| matches!(e.code, errcode::CON_COUNT | errcode::SERVER_SHUTDOWN)) => {
                    conn.server.pool.load.failed();
                }
                Ok(_) => in_flight.finish(),
                Err(ForwardError::Backend { .. }) => {
                    conn.server.pool.load.failed();
                }
                Err(_) => {}
            }
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
}

/// The picked server, or another ONLINE one of the hostgroup with room under its
/// concurrency limit when the picked one has none (so a statement queues only when every
/// server is at its limit).
fn with_room(hg: &Hostgroup, picked: Arc<Server>, exclude: Option<&Arc<Server>>) -> Arc<Server> {
    if picked.pool.load.has_room() {
        return picked;
    }
    hg.servers
        .iter()
        .filter(|s| s.is_online() && s.pool.load.has_room() && exclude.is_none_or(|e| !Arc::ptr_eq(s, e)))
        .min_by_key(|s| s.pool.load.in_flight.load(Ordering::Relaxed) * 1000 / s.weight().max(1) as u64)
        .cloned()
        .unwrap_or(picked)
}

fn shed_error(server: &Server, shed: &Shed) -> SqlError {
    SqlError::new(
        errcode::MAX_CONNECT_TIMEOUT,
        "HY000",
        format!("Breakwater: backend {} (hostgroup {}): adaptive {shed}; the statement was not sent", server.addr, server.cfg.hostgroup),
    )
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
