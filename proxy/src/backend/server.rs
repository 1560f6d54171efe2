//! A backend server as the proxy sees it (ProxySQL's mysql_servers row): address, hostgroup,
//! weight, caps, its health status, counters, and its connection pool.
//!
//! One server can sit in several hostgroups (an entry each). The entries of one address
//! share one [`Pool`]: a server's `max_connections` caps its connections across all its
//! hostgroups, since the database's own limit is per server (ProxySQL caps each entry
//! separately). Weight, lag limit and cap change in place at runtime (LOAD MYSQL SERVERS
//! TO RUNTIME): the pool, its connections and the transactions on them stay.

use super::pool::Pool;
use crate::config::{AdminStatus, PromotionRule, ServerConfig};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
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
    /// Draining (set by an operator): no new statements; open transactions and pinned
    /// sessions finish on it; its connections close as they come back.
    OfflineSoft = 3,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "ONLINE",
            Status::Shunned => "SHUNNED",
            Status::OfflineHard => "OFFLINE_HARD",
            Status::OfflineSoft => "OFFLINE_SOFT",
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
    /// The entry as configured when it was made. Its identity (hostgroup, host, port,
    /// socket) never changes; weight, lag limit, cap and operator status are live below.
    pub cfg: ServerConfig,
    pub addr: Arc<str>,
    /// Health (ONLINE / SHUNNED) or OFFLINE_HARD when the entry left routing.
    status: AtomicU8,
    /// What the operator set: an OFFLINE_* here wins over the health status.
    admin: AtomicU8,
    pub reason: Mutex<String>,
    /// Seconds_Behind_Master from the last check; -1 when unknown or not a replica.
    pub lag: AtomicI64,
    pub counters: Counters,
    /// Shared by every entry of this address.
    pub pool: Arc<Pool>,
    weight: AtomicU32,
    max_lag: AtomicU64,
    max_connections: AtomicU64,
    promotion_rule: Mutex<PromotionRule>,
    /// TLS for new connections (live: a change closes the idle ones, and busy ones close
    /// when they come back, so every connection soon matches).
    use_ssl: AtomicBool,
}

fn admin_code(s: AdminStatus) -> u8 {
    match s {
        AdminStatus::Online => Status::Online as u8,
        AdminStatus::OfflineSoft => Status::OfflineSoft as u8,
        AdminStatus::OfflineHard => Status::OfflineHard as u8,
    }
}

impl Server {
    /// A new entry on the address's shared `pool`.
    pub fn new(cfg: ServerConfig, pool: Arc<Pool>) -> Arc<Self> {
        let addr: Arc<str> = cfg.address().into();
        Arc::new(Self {
            addr,
            status: AtomicU8::new(Status::Online as u8),
            admin: AtomicU8::new(admin_code(cfg.status)),
            reason: Mutex::new(String::new()),
            lag: AtomicI64::new(-1),
            counters: Counters::default(),
            pool,
            weight: AtomicU32::new(cfg.weight),
            max_lag: AtomicU64::new(cfg.max_replication_lag),
            max_connections: AtomicU64::new(cfg.max_connections as u64),
            promotion_rule: Mutex::new(cfg.promotion_rule),
            use_ssl: AtomicBool::new(cfg.use_ssl),
            cfg,
        })
    }

    /// Same hostgroup, address and socket: the same entry (other fields may change in place).
    pub fn same_entry(&self, c: &ServerConfig) -> bool {
        self.cfg.hostgroup == c.hostgroup && self.cfg.host == c.host && self.cfg.port == c.port && self.cfg.socket == c.socket
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn max_replication_lag(&self) -> u64 {
        self.max_lag.load(Ordering::Relaxed)
    }

    /// This entry's configured cap (the pool enforces the smallest of the address's entries).
    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed) as usize
    }

    /// For the failover controller (changes in place with LOAD MYSQL SERVERS TO RUNTIME).
    pub fn promotion_rule(&self) -> PromotionRule {
        self.promotion_rule.lock().map(|r| *r).unwrap_or_default()
    }

    pub fn use_ssl(&self) -> bool {
        self.use_ssl.load(Ordering::Relaxed)
    }

    pub fn admin_status(&self) -> AdminStatus {
        match self.admin.load(Ordering::Relaxed) {
            3 => AdminStatus::OfflineSoft,
            2 => AdminStatus::OfflineHard,
            _ => AdminStatus::Online,
        }
    }

    /// The entry's configuration as it is now.
    pub fn config(&self) -> ServerConfig {
        let mut c = self.cfg.clone();
        c.weight = self.weight();
        c.max_replication_lag = self.max_replication_lag();
        c.max_connections = self.max_connections();
        c.status = self.admin_status();
        c.promotion_rule = self.promotion_rule();
        c.use_ssl = self.use_ssl();
        c
    }

    /// Apply a changed row in place: no new pool, no dropped connection, no aborted
    /// transaction. Returns true when anything changed.
    pub fn update(&self, c: &ServerConfig) -> bool {
        let before = self.config();
        self.weight.store(c.weight, Ordering::Relaxed);
        self.max_lag.store(c.max_replication_lag, Ordering::Relaxed);
        self.max_connections.store(c.max_connections as u64, Ordering::Relaxed);
        if let Ok(mut r) = self.promotion_rule.lock() {
            *r = c.promotion_rule;
        }
        if self.use_ssl.swap(c.use_ssl, Ordering::Relaxed) != c.use_ssl {
            tracing::warn!(server = %self.addr, hostgroup = self.cfg.hostgroup, use_ssl = c.use_ssl, "server TLS setting changed: connections are replaced as they come back");
            self.pool.drain_idle();
        }
        let old_admin = self.admin.swap(admin_code(c.status), Ordering::Relaxed);
        if old_admin != admin_code(c.status) {
            tracing::warn!(server = %self.addr, hostgroup = self.cfg.hostgroup, status = c.status.as_str(), "server status set by the operator");
            if c.status != AdminStatus::Online {
                self.pool.drain_idle();
            }
        }
        before != self.config()
    }

    /// mysql_async options for a side connection to this server (health checks, KILL
    /// QUERY): TCP to host:port, over TLS when the server has use_ssl.
    pub fn side_opts(&self, user: &str, password: &str, tls: &super::tls::BackendTls) -> mysql_async::OptsBuilder {
        let o = mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.cfg.host.clone())
            .tcp_port(self.cfg.port)
            .user(Some(user.to_string()))
            .pass(Some(password.to_string()))
            .prefer_socket(false);
        if self.use_ssl() {
            o.ssl_opts(Some(tls.mysql_async_opts()))
        } else {
            o
        }
    }

    pub fn status(&self) -> Status {
        let health = match self.status.load(Ordering::Relaxed) {
            0 => Status::Online,
            1 => Status::Shunned,
            _ => Status::OfflineHard,
        };
        match (health, self.admin.load(Ordering::Relaxed)) {
            (Status::OfflineHard, _) => Status::OfflineHard,
            (_, 2) => Status::OfflineHard,
            (_, 3) => Status::OfflineSoft,
            (h, _) => h,
        }
    }

    pub fn is_online(&self) -> bool {
        self.status() == Status::Online
    }

    /// Change the health status; returns true when it changed. Leaving ONLINE empties the
    /// idle pool. (An operator's OFFLINE_* stays in force over it.)
    pub fn set_status(&self, st: Status, reason: &str) -> bool {
        let st = if st == Status::OfflineSoft { Status::OfflineHard } else { st };
        let old = self.status.swap(st as u8, Ordering::Relaxed);
        if let Ok(mut r) = self.reason.lock() {
            *r = reason.to_string();
        }
        if old != st as u8 {
            if st != Status::Online {
                self.pool.drain_idle();
            } else {
                // Healthy again by the monitor's checks: the failures that ejected it from
                // adaptive choice are over.
                self.pool.load.uneject();
            }
            tracing::warn!(server = %self.addr, hostgroup = self.cfg.hostgroup, status = st.as_str(), reason, "server status changed");
            true
        } else {
            false
        }
    }
}
