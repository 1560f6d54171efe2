//! A backend server as the proxy sees it (ProxySQL's mysql_servers row): address, hostgroup,
//! weight, caps, its health status, counters, and its connection pool.

use super::pool::Pool;
use crate::config::ServerConfig;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Serving traffic.
    Online = 0,
    /// Temporarily out of rotation (unreachable, or lagging); the monitor brings it back.
    Shunned = 1,
    /// Out of rotation by an operator or the failover controller.
    OfflineHard = 2,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "ONLINE",
            Status::Shunned => "SHUNNED",
            Status::OfflineHard => "OFFLINE_HARD",
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub queries: AtomicU64,
    pub errors: AtomicU64,
    pub conn_ok: AtomicU64,
    pub conn_err: AtomicU64,
}

pub struct Server {
    pub cfg: ServerConfig,
    pub addr: Arc<str>,
    status: AtomicU8,
    pub reason: Mutex<String>,
    /// Seconds_Behind_Master from the last check; -1 when unknown or not a replica.
    pub lag: AtomicI64,
    pub counters: Counters,
    pub pool: Pool,
}

impl Server {
    pub fn new(cfg: ServerConfig, max_waiters: usize) -> Arc<Self> {
        let addr: Arc<str> = cfg.address().into();
        let pool = Pool::new(cfg.max_connections, max_waiters);
        Arc::new(Self {
            cfg,
            addr,
            status: AtomicU8::new(Status::Online as u8),
            reason: Mutex::new(String::new()),
            lag: AtomicI64::new(-1),
            counters: Counters::default(),
            pool,
        })
    }

    pub fn status(&self) -> Status {
        match self.status.load(Ordering::Relaxed) {
            0 => Status::Online,
            1 => Status::Shunned,
            _ => Status::OfflineHard,
        }
    }

    pub fn is_online(&self) -> bool {
        self.status() == Status::Online
    }

    /// Change status; returns true when it changed. Leaving ONLINE empties the idle pool.
    pub fn set_status(&self, st: Status, reason: &str) -> bool {
        let old = self.status.swap(st as u8, Ordering::Relaxed);
        if let Ok(mut r) = self.reason.lock() {
            *r = reason.to_string();
        }
        if old != st as u8 {
            if st != Status::Online {
                self.pool.drain_idle();
            }
            tracing::warn!(server = %self.addr, hostgroup = self.cfg.hostgroup, status = st.as_str(), reason, "server status changed");
            true
        } else {
            false
        }
    }
}
