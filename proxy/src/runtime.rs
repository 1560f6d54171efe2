//! The running configuration, built from [`Config`]: users with decoded password hashes,
//! compiled query rules, and hostgroups of servers with their pools. Shared by every session.

use crate::backend::hostgroup::{Gate, Hostgroup, Routing};
use crate::backend::server::{Server, Status};
use crate::config::{Config, ConfigError, ServerConfig};
use crate::protocol::auth;
use crate::cache::QueryCache;
use crate::router::rules::Rules;
use crate::stats::digests::Digests;
use crate::telemetry::Telemetry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A proxy user (ProxySQL's mysql_users row), with hashes ready for verification.
#[derive(Debug)]
pub struct User {
    pub name: String,
    pub native: Option<[u8; 20]>,
    pub sha2: Option<[u8; 32]>,
    pub plugin: &'static str,
    pub backend_user: Arc<str>,
    pub backend_password: String,
    pub default_hostgroup: u32,
    pub default_schema: Option<String>,
    /// A temporary user (see `access`): audited, and refused writes when `read_only`.
    pub temporary: bool,
    pub read_only: bool,
}

impl User {
    pub fn can_verify(&self, plugin: &str) -> bool {
        match plugin {
            auth::NATIVE => self.native.is_some(),
            auth::CACHING_SHA2 => self.sha2.is_some(),
            _ => false,
        }
    }

    pub fn verify(&self, plugin: &str, token: &[u8], scramble: &[u8]) -> bool {
        match (plugin, &self.native, &self.sha2) {
            (auth::NATIVE, Some(h), _) => auth::verify_native(token, scramble, h),
            (auth::CACHING_SHA2, _, Some(h)) => auth::verify_sha2(token, scramble, h),
            _ => false,
        }
    }
}

fn decode_native(s: &str) -> Option<[u8; 20]> {
    auth::from_hex(s.strip_prefix('*')?)?.try_into().ok()
}

fn decode_sha2(s: &str) -> Option<[u8; 32]> {
    auth::from_hex(s)?.try_into().ok()
}

pub struct Runtime {
    pub cfg: Config,
    users: RwLock<Arc<HashMap<String, Arc<User>>>>,
    /// Temporary users (the access manager adds and removes them).
    temp_users: RwLock<HashMap<String, Arc<User>>>,
    rules: RwLock<Arc<Rules>>,
    routing: RwLock<Arc<Routing>>,
    /// Every server entry ever built (one per hostgroup and address); the failover
    /// controller adds entries when it moves a server into another hostgroup.
    registry: RwLock<Vec<Arc<Server>>>,
    /// One pool per server address, shared by its entries in every hostgroup.
    pools: Mutex<HashMap<String, Arc<crate::backend::pool::Pool>>>,
    /// TLS to servers with use_ssl (`[proxy] ssl_p2s_*`).
    pub backend_tls: crate::backend::tls::BackendTls,
    /// Sheddable traffic refused now (the failover controller's cascading-risk response).
    pub shedding: Shedding,
}

/// While set, statements whose query rule has `shed_priority` >= `min_priority` and that are
/// bound for `hostgroup` are refused at once (error 9001 with `reason`).
#[derive(Debug, Default)]
pub struct Shedding {
    state: RwLock<Option<(u32, u32, Arc<str>)>>,
    /// Statements refused so far.
    pub shed: std::sync::atomic::AtomicU64,
}

impl Shedding {
    pub fn start(&self, hostgroup: u32, min_priority: u32, reason: &str) {
        if let Ok(mut s) = self.state.write() {
            *s = Some((hostgroup, min_priority.max(1), reason.into()));
        }
    }

    pub fn stop(&self) {
        if let Ok(mut s) = self.state.write() {
            *s = None;
        }
    }

    pub fn active(&self) -> Option<(u32, u32)> {
        self.state.read().ok().and_then(|s| s.as_ref().map(|(h, p, _)| (*h, *p)))
    }

    /// The refusal for a statement of `priority` bound for `hostgroup`, if it is shed now.
    pub fn check(&self, hostgroup: u32, priority: u32) -> Option<Arc<str>> {
        if priority == 0 {
            return None;
        }
        let s = self.state.read().ok()?;
        let (h, min, reason) = s.as_ref()?;
        if *h != hostgroup || priority < *min {
            return None;
        }
        self.shed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(reason.clone())
    }
}

/// The pool of `addr`, made with cap `max` when there is none.
fn pool_for(pools: &Mutex<HashMap<String, Arc<crate::backend::pool::Pool>>>, addr: &str, max: usize, p: &crate::config::ProxyConfig) -> Arc<crate::backend::pool::Pool> {
    let mut m = match pools.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    m.entry(addr.to_string()).or_insert_with(|| Arc::new(crate::backend::pool::Pool::new(max, p.max_queue_waiters, p.limit_config()))).clone()
}

impl Runtime {
    pub fn build(cfg: Config) -> Result<Self, ConfigError> {
        cfg.validate()?;
        cfg.validate_cluster()?;
        let users = build_users(&cfg.users)?;
        let rules = Rules::new(&cfg.query_rules).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut hostgroups: HashMap<u32, Hostgroup> = HashMap::new();
        let mut servers = Vec::new();
        let pools = Mutex::new(HashMap::new());
        for s in &cfg.servers {
            // The smallest cap configured for an address is the one its pool keeps.
            let cap = cfg.servers.iter().filter(|o| o.address() == s.address()).map(|o| o.max_connections).min().unwrap_or(s.max_connections);
            let server = Server::new(s.clone(), pool_for(&pools, &s.address(), cap, &cfg.proxy));
            servers.push(server.clone());
            let hg = hostgroups.entry(s.hostgroup).or_default();
            hg.id = s.hostgroup;
            hg.servers.push(server);
        }
        let routing = Routing { hostgroups: hostgroups.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(), version: 0 };
        let backend_tls = crate::backend::tls::BackendTls::new(&cfg.proxy);
        if let Some(s) = cfg.servers.iter().find(|s| s.use_ssl) {
            // A CA file that cannot be read stops the proxy now, not each connection later.
            backend_tls.config().map_err(|e| ConfigError::Invalid(format!("server {} has use_ssl: {e}", s.address())))?;
            crate::backend::tls::server_name(&s.host).map_err(|e| ConfigError::Invalid(format!("server {}: {e}", s.address())))?;
        }
        Ok(Self {
            cfg,
            users: RwLock::new(Arc::new(users)),
            temp_users: RwLock::new(HashMap::new()),
            rules: RwLock::new(Arc::new(rules)),
            routing: RwLock::new(Arc::new(routing)),
            registry: RwLock::new(servers),
            pools,
            backend_tls,
            shedding: Shedding::default(),
        })
    }

    /// The query rules in force (swapped whole by LOAD MYSQL QUERY RULES TO RUNTIME).
    pub fn rules(&self) -> Arc<Rules> {
        match self.rules.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_rules(&self, rules: Rules) {
        match self.rules.write() {
            Ok(mut r) => *r = Arc::new(rules),
            Err(p) => *p.into_inner() = Arc::new(rules),
        }
    }

    /// A proxy user by name (new logins see LOAD MYSQL USERS TO RUNTIME at once).
    pub fn user(&self, name: &str) -> Option<Arc<User>> {
        let found = match self.users.read() {
            Ok(u) => u.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        };
        found.or_else(|| match self.temp_users.read() {
            Ok(u) => u.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        })
    }

    pub fn add_temp_user(&self, u: Arc<User>) {
        match self.temp_users.write() {
            Ok(mut m) => m.insert(u.name.clone(), u),
            Err(p) => p.into_inner().insert(u.name.clone(), u),
        };
    }

    pub fn remove_temp_user(&self, name: &str) {
        match self.temp_users.write() {
            Ok(mut m) => m.remove(name),
            Err(p) => p.into_inner().remove(name),
        };
    }

    pub fn user_names(&self) -> Vec<Arc<User>> {
        match self.users.read() {
            Ok(u) => u.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    pub fn set_users(&self, users: HashMap<String, Arc<User>>) {
        match self.users.write() {
            Ok(mut u) => *u = Arc::new(users),
            Err(p) => *p.into_inner() = Arc::new(users),
        }
    }

    /// The current hostgroups (a cheap snapshot: one Arc clone under a read lock).
    pub fn routing(&self) -> Arc<Routing> {
        match self.routing.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Every server entry known (for health checks and stats).
    pub fn servers(&self) -> Vec<Arc<Server>> {
        match self.registry.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The entry for `addr` in `hostgroup`, created from `template` when there is none.
    pub fn entry(&self, hostgroup: u32, addr: &str, template: impl FnOnce() -> ServerConfig) -> Arc<Server> {
        let find = |reg: &[Arc<Server>]| reg.iter().find(|s| s.cfg.hostgroup == hostgroup && &*s.addr == addr).cloned();
        if let Some(s) = find(&self.servers()) {
            return s;
        }
        // Built outside the lock: the template may itself look at the registry.
        let mut cfg = template();
        cfg.hostgroup = hostgroup;
        let mut reg = match self.registry.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        if let Some(s) = find(&reg) {
            return s;
        }
        let pool = pool_for(&self.pools, addr, cfg.max_connections, &self.cfg.proxy);
        let s = Server::new(cfg, pool);
        reg.push(s.clone());
        s
    }

    /// Give each address's pool the smallest cap of its routed entries.
    fn apply_caps(&self) {
        let routing = self.routing();
        let mut caps: HashMap<String, usize> = HashMap::new();
        for s in routing.hostgroups.values().flat_map(|h| h.servers.iter()) {
            let c = caps.entry(s.addr.to_string()).or_insert(usize::MAX);
            *c = (*c).min(s.max_connections());
        }
        let pools = match self.pools.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for (addr, cap) in caps {
            if let Some(p) = pools.get(&addr) {
                if p.max() != cap && cap > 0 {
                    tracing::info!(server = %addr, from = p.max(), to = cap, "server connection cap changed");
                    p.set_max(cap);
                }
            }
        }
    }

    /// Replace the listed hostgroups in one step. Entries that leave routing go
    /// OFFLINE_HARD (their idle connections are closed; pinned sessions get an error on
    /// their next statement); entries that join go ONLINE (the health monitor shuns them
    /// again if they fail a check).
    pub fn switch(&self, changes: Vec<Hostgroup>, reason: &str) {
        let mut guard = match self.routing.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut next: Routing = (**guard).clone();
        let before: Vec<Arc<Server>> = next.hostgroups.values().flat_map(|h| h.servers.iter().cloned()).collect();
        for hg in changes {
            next.hostgroups.insert(hg.id, Arc::new(hg));
        }
        next.version += 1;
        let after: Vec<Arc<Server>> = next.hostgroups.values().flat_map(|h| h.servers.iter().cloned()).collect();
        for s in &before {
            if !after.iter().any(|a| Arc::ptr_eq(a, s)) {
                s.set_status(Status::OfflineHard, reason);
            }
        }
        for s in &after {
            if !before.iter().any(|b| Arc::ptr_eq(b, s)) {
                s.set_status(Status::Online, "");
            }
        }
        *guard = Arc::new(next);
        drop(guard);
        self.apply_caps();
    }

    /// Replace every hostgroup with the servers of `rows` (LOAD MYSQL SERVERS TO RUNTIME).
    /// An entry that stays (same hostgroup, address and socket) is changed in place:
    /// weight, lag limit, cap and operator status take effect without a new pool, a closed
    /// connection or an aborted transaction. Gates (failover holds/blocks) are kept.
    pub fn load_servers(&self, rows: Vec<ServerConfig>) {
        let routing = self.routing();
        let mut groups: BTreeMap<u32, Vec<Arc<Server>>> = BTreeMap::new();
        for cfg in rows {
            let existing = self.servers().into_iter().find(|s| s.same_entry(&cfg));
            let s = match existing {
                Some(s) => {
                    s.update(&cfg);
                    s
                }
                None => {
                    let pool = pool_for(&self.pools, &cfg.address(), cfg.max_connections, &self.cfg.proxy);
                    let s = Server::new(cfg.clone(), pool);
                    match self.registry.write() {
                        Ok(mut r) => r.push(s.clone()),
                        Err(p) => p.into_inner().push(s.clone()),
                    }
                    s
                }
            };
            groups.entry(cfg.hostgroup).or_default().push(s);
        }
        let mut changes: Vec<Hostgroup> = routing
            .hostgroups
            .keys()
            .filter(|id| !groups.contains_key(id))
            .map(|id| Hostgroup { id: *id, servers: Vec::new(), gate: Gate::Open })
            .collect();
        for (id, servers) in groups {
            let gate = routing.hostgroups.get(&id).map(|h| h.gate.clone()).unwrap_or_default();
            changes.push(Hostgroup { id, servers, gate });
        }
        self.switch(changes, "removed by LOAD MYSQL SERVERS TO RUNTIME");
    }

    /// Change only the gate of one hostgroup.
    pub fn set_gate(&self, hostgroup: u32, gate: Gate) {
        let mut guard = match self.routing.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let Some(hg) = guard.hostgroups.get(&hostgroup) else { return };
        if hg.gate == gate {
            return;
        }
        let mut next: Routing = (**guard).clone();
        let mut h: Hostgroup = (**hg).clone();
        h.gate = gate;
        next.hostgroups.insert(hostgroup, Arc::new(h));
        next.version += 1;
        *guard = Arc::new(next);
    }
}

/// Users with decoded hashes, from configuration rows.
pub fn build_users(rows: &[crate::config::UserConfig]) -> Result<HashMap<String, Arc<User>>, ConfigError> {
    let mut users = HashMap::new();
    for u in rows {
        if u.password_hash.is_none() && u.sha2_password_hash.is_none() && u.password.is_none() {
            return Err(ConfigError::Invalid(format!("user {} has no password, password_hash or sha2_password_hash", u.username)));
        }
        let bad = |what: &str| ConfigError::Invalid(format!("user {}: malformed {what}", u.username));
        let mut native = u.password_hash.as_deref().filter(|h| !h.is_empty()).map(|h| decode_native(h).ok_or_else(|| bad("password_hash"))).transpose()?;
        let mut sha2 = u.sha2_password_hash.as_deref().filter(|h| !h.is_empty()).map(|h| decode_sha2(h).ok_or_else(|| bad("sha2_password_hash"))).transpose()?;
        if let Some(pw) = u.password.as_deref().filter(|p| !p.is_empty()) {
            native.get_or_insert(auth::native_stage2(pw.as_bytes()));
            sha2.get_or_insert(auth::sha2_stage2(pw.as_bytes()));
        }
        let plugin = if u.auth_plugin == auth::CACHING_SHA2 { auth::CACHING_SHA2 } else { auth::NATIVE };
        users.insert(
            u.username.clone(),
            Arc::new(User {
                name: u.username.clone(),
                native,
                sha2,
                plugin,
                backend_user: u.backend_username.clone().unwrap_or_else(|| u.username.clone()).into(),
                backend_password: u.backend_password.clone(),
                default_hostgroup: u.default_hostgroup,
                default_schema: u.default_schema.clone(),
                temporary: false,
                read_only: false,
            }),
        );
    }
    Ok(users)
}

/// What other sessions may know of a session: for KILL [QUERY|CONNECTION] <id>.
pub struct SessionHandle {
    /// The session's user (COM_CHANGE_USER changes it).
    pub user: Mutex<String>,
    /// Turns true to close the session.
    pub killed: tokio::sync::watch::Sender<bool>,
    /// The backend connection running this session's statement now.
    pub running: Mutex<Option<Running>>,
    /// Set by the query-timeout reaper when it killed this session's statement.
    pub timed_out: std::sync::atomic::AtomicBool,
}

/// A statement in flight on a backend connection.
#[derive(Clone)]
pub struct Running {
    pub server: Arc<Server>,
    pub thread: u32,
    pub started: std::time::Instant,
    /// The reaper has sent KILL QUERY for it.
    pub killed: bool,
}

/// Process-wide counters.
#[derive(Default)]
pub struct Stats {
    /// Statements killed by default_query_timeout_ms.
    pub query_timeouts: AtomicU64,
    /// Clients disconnected by max_transaction_time_ms / max_transaction_idle_time_ms.
    pub transaction_timeouts: AtomicU64,
    pub client_connections: AtomicU64,
    pub client_connections_refused: AtomicU64,
    pub queries: AtomicU64,
    pub backend_errors: AtomicU64,
    pub retries: AtomicU64,
    /// How often clients were pinned, by reason.
    pub pins: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn pinned(&self, reason: &str) {
        if let Ok(mut m) = self.pins.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }
}

pub struct Proxy {
    pub rt: Arc<Runtime>,
    pub stats: Stats,
    pub cache: Arc<QueryCache>,
    pub digests: Digests,
    pub telemetry: Telemetry,
    /// The span queue's receiving end, taken once by the exporter.
    pub telemetry_rx: Mutex<Option<crate::telemetry::Receivers>>,
    /// Temporary access (set at start when a store is configured).
    pub access: std::sync::OnceLock<Arc<crate::access::Access>>,
    /// What the agents on the database hosts report (OTLP).
    pub signals: crate::adaptive::signals::Signals,
    /// TLS for clients that ask for it (`[proxy] tls_cert` / `tls_key`).
    pub tls: std::sync::OnceLock<tokio_rustls::TlsAcceptor>,
    /// Logged-in client sessions by the id clients see (KILL targets).
    pub sessions: Mutex<HashMap<u32, Arc<SessionHandle>>>,
    next_conn_id: AtomicU32,
}

impl Proxy {
    pub fn new(rt: Runtime) -> Arc<Self> {
        let cache = QueryCache::new(rt.cfg.cache.max_bytes, rt.cfg.cache.max_entry_bytes);
        let digests = Digests::new(rt.cfg.digests.max_digests);
        let (telemetry, rx) = Telemetry::new(&rt.cfg.telemetry);
        Arc::new(Self {
            rt: Arc::new(rt),
            stats: Stats::default(),
            cache,
            digests,
            telemetry,
            telemetry_rx: Mutex::new(rx),
            access: std::sync::OnceLock::new(),
            signals: Default::default(),
            sessions: Mutex::new(HashMap::new()),
            tls: std::sync::OnceLock::new(),
            next_conn_id: AtomicU32::new(1),
        })
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.rt.clone()
    }

    pub fn next_conn_id(&self) -> u32 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}
