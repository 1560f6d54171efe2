//! The connection pool of one server: a hard cap that is never exceeded, idle reuse, and a
//! bounded queue of waiting clients with a timeout.
//!
//! Every backend connection (idle, busy or still logging in) holds a semaphore permit, so the
//! number of connections can never pass `max_connections`. A checked-out connection is a
//! [`PooledConn`] guard: dropping it returns a clean connection to the idle list (or closes a
//! broken or dirty one, releasing its permit), so a leak is impossible by construction.

use super::conn::{BackendConn, BackendError, ConnKey};
use super::server::Server;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {waited_ms} ms waiting for a connection to {addr} (hostgroup {hostgroup}): max_connections={max} reached")]
    Timeout { addr: String, hostgroup: u32, max: usize, waited_ms: u64 },
    #[error("too many clients waiting for {addr} (hostgroup {hostgroup}, max_connections={max}, {waiters} waiting)")]
    QueueFull { addr: String, hostgroup: u32, max: usize, waiters: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub struct Pool {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<BackendConn>>,
    returned: Notify,
    waiters: AtomicUsize,
    max_waiters: usize,
    /// The cap now (permits outstanding + available, once a shrink has caught up).
    max: AtomicUsize,
    /// Connections checked out right now.
    pub in_use: AtomicUsize,
    /// What the proxy observes of this address (statements in flight, latency). It rides on
    /// the pool only because the pool is the one object per address; the policies that read
    /// it live in `adaptive`.
    pub load: Arc<crate::adaptive::backend::BackendLoad>,
}

impl Pool {
    pub fn new(max: usize, max_waiters: usize, limit: crate::adaptive::limit::LimitConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            waiters: AtomicUsize::new(0),
            max_waiters,
            max: AtomicUsize::new(max),
            in_use: AtomicUsize::new(0),
            load: Arc::new(crate::adaptive::backend::BackendLoad::new(limit)),
        }
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Change the cap at runtime. Growing adds slots at once; shrinking closes idle
    /// connections and takes the other slots away as their connections close, so the new
    /// cap holds without breaking a busy connection. Must run inside the tokio runtime.
    pub fn set_max(&self, new: usize) {
        let old = self.max.swap(new, Ordering::Relaxed);
        if new > old {
            self.permits.add_permits(new - old);
        } else if new < old {
            let sem = self.permits.clone();
            self.drain_idle();
            let freed = sem.forget_permits(old - new);
            let excess = (old - new - freed) as u32;
            if excess > 0 {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Ok(p) = sem.acquire_many_owned(excess).await {
                            p.forget();
                        }
                    });
                }
            }
        }
    }

    /// Connections that exist now (idle + busy + connecting).
    pub fn total(&self) -> usize {
        self.max().saturating_sub(self.permits.available_permits())
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    pub fn waiting(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }

    pub fn drain_idle(&self) {
        let drained: Vec<BackendConn> = match self.idle.lock() {
            Ok(mut v) => v.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        drop(drained);
    }

    fn take_idle(&self, key: &ConnKey, tls: bool) -> Option<BackendConn> {
        let mut idle = self.idle.lock().ok()?;
        // Most recently used first: warm connections, and old ones can time out.
        while let Some(i) = idle.iter().rposition(|c| &c.key == key && c.tls() == tls) {
            let c = idle.swap_remove(i);
            if c.looks_alive() {
                return Some(c);
            }
        }
        None
    }

    /// Close one idle connection of another key to make room under the cap.
    fn evict_other(&self) -> bool {
        let c = self.idle.lock().ok().and_then(|mut v| (!v.is_empty()).then(|| v.remove(0)));
        c.is_some()
    }

    fn give_back(&self, conn: BackendConn) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        self.returned.notify_one();
    }
}

/// Options for one checkout.
pub struct Checkout<'a> {
    pub key: &'a ConnKey,
    pub password: &'a str,
    pub connect_timeout: Duration,
    pub queue_timeout: Duration,
    /// The dead-peer bound of new connections (see `conn::dead_peer_bound`).
    pub read_timeout: Duration,
    /// TLS settings for servers with use_ssl.
    pub tls: &'a super::tls::BackendTls,
}

impl Server {
    /// Get a connection: an idle one with the same key, a new one under the cap, or wait.
    pub async fn checkout(self: &Arc<Self>, opts: &Checkout<'_>) -> Result<PooledConn, PoolError> {
        let pool = &self.pool;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + opts.queue_timeout;
        let mut waiting = false;
        let result = loop {
            let notified = pool.returned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = pool.take_idle(opts.key, self.use_ssl()) {
                break Ok(c);
            }
            if let Ok(permit) = pool.permits.clone().try_acquire_owned() {
                break self.connect(opts, permit).await;
            }
            if pool.evict_other() {
                continue;
            }
            if !waiting {
                let n = pool.waiters.fetch_add(1, Ordering::Relaxed);
                waiting = true;
                if n >= pool.max_waiters {
                    pool.waiters.fetch_sub(1, Ordering::Relaxed);
                    return Err(PoolError::QueueFull {
                        addr: self.addr.to_string(),
                        hostgroup: self.cfg.hostgroup,
                        max: pool.max(),
                        waiters: n,
                    });
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                p = pool.permits.clone().acquire_owned() => {
                    if let Ok(permit) = p {
                        break self.connect(opts, permit).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(PoolError::Timeout {
                        addr: self.addr.to_string(),
                        hostgroup: self.cfg.hostgroup,
                        max: pool.max(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
            }
        };
        if waiting {
            pool.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        let conn = result?;
        pool.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn { conn: ManuallyDrop::new(conn), server: self.clone(), keep: true })
    }

    async fn connect(&self, opts: &Checkout<'_>, permit: tokio::sync::OwnedSemaphorePermit) -> Result<BackendConn, PoolError> {
        let tls = match self.use_ssl() {
            false => Ok(None),
            true => opts
                .tls
                .config()
                .and_then(|cfg| Ok(Some((cfg, super::tls::server_name(&self.cfg.host)?))))
                .map_err(|msg| BackendError::Tls { addr: self.addr.to_string(), msg }),
        };
        let r = match tls {
            Ok(tls) => {
                let target = super::conn::Target { addr: self.addr.clone(), socket: self.cfg.socket.as_deref(), tls };
                BackendConn::connect(target, opts.key.clone(), opts.password, opts.connect_timeout, opts.read_timeout, permit).await
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(c) => {
                self.counters.conn_ok.fetch_add(1, Ordering::Relaxed);
                Ok(c)
            }
            Err(e) => {
                self.counters.conn_err.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }
}

/// A checked-out connection. Dropping it gives it back to its pool when it is reusable.
pub struct PooledConn {
    conn: ManuallyDrop<BackendConn>,
    pub server: Arc<Server>,
    /// false: close instead of returning to the pool.
    keep: bool,
}

impl PooledConn {
    /// Close the connection instead of returning it (it is broken or holds foreign state).
    pub fn discard(mut self) {
        self.keep = false;
    }
}

impl Deref for PooledConn {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        &self.conn
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut BackendConn {
        &mut self.conn
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        // SAFETY: `conn` is taken exactly once, here, and never used afterwards.
        let c = unsafe { ManuallyDrop::take(&mut self.conn) };
        self.server.pool.in_use.fetch_sub(1, Ordering::Relaxed);
        let reusable = self.keep
            && !c.broken
            && !c.dirty
            && c.status & crate::protocol::status::IN_TRANS == 0
            && c.tls() == self.server.use_ssl()
            && self.server.is_online();
        if reusable {
            self.server.pool.give_back(c);
        }
        // else: dropped here; its permit frees a slot for a waiter.
    }
}
