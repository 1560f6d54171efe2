//! Configuration: one TOML file (serde), an embedded default that works against the lab,
//! and clap flags that override single settings (see main.rs).

use crate::protocol::auth;
use serde::Deserialize;
use std::path::Path;

pub const DEFAULT_TOML: &str = include_str!("../breakwater.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub monitor: MonitorConfig,
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub query_rules: Vec<QueryRule>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub digests: DigestConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub signals: SignalsConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// Several proxies of one replication cluster, one failover controller: the proxies elect a
/// leader through an etcd lease; only the leader detects and recovers, every proxy applies
/// the leader's decisions from etcd. Without endpoints (the default) a proxy runs its
/// controller alone, with its state in the admin db file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd v3 client URLs (http://host:port); empty: no coordination.
    pub etcd_endpoints: Vec<String>,
    /// This proxy's name in the election (default: `<hostname>:<listen port>`).
    pub name: String,
    /// The leader's lease: a dead leader is replaced within this long.
    pub lease_ttl_s: u64,
    /// Keys live under `<prefix>/<failover cluster>/`.
    pub prefix: String,
    /// Bound of every etcd request.
    pub timeout_ms: u64,
    /// An etcd user (with auth enabled on etcd: read-write on `<prefix>/`), and its password
    /// (better from the environment variable BREAKWATER_ETCD_PASSWORD than in this file).
    pub etcd_user: String,
    pub etcd_password: String,
    /// For https:// endpoints: the CA that issued etcd's certificate, and this proxy's
    /// client certificate and key when etcd checks them (--client-cert-auth).
    pub etcd_ca_file: String,
    pub etcd_cert_file: String,
    pub etcd_key_file: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            etcd_endpoints: Vec::new(),
            name: String::new(),
            lease_ttl_s: 5,
            prefix: "/breakwater".into(),
            timeout_ms: 1000,
            etcd_user: String::new(),
            etcd_password: String::new(),
            etcd_ca_file: String::new(),
            etcd_cert_file: String::new(),
            etcd_key_file: String::new(),
        }
    }
}

/// The admin interfaces: HTTP (JSON API, Prometheus /metrics, the topology page) and
/// MySQL protocol (ProxySQL-style tables).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The HTTP interface; empty disables it.
    pub listen: String,
    /// The MySQL-protocol admin interface (ProxySQL-style tables); empty disables it.
    /// Loopback only.
    pub mysql_listen: String,
    pub username: String,
    pub password: String,
    /// SQLite file behind SAVE ... TO DISK. When it holds a saved configuration, that
    /// configuration is used at start instead of the TOML's servers, users and rules
    /// (start with --initial to ignore it). Empty: SAVE ... TO DISK is refused.
    pub db_file: String,
    /// Bearer token for the HTTP API's state-changing requests and for what returns secrets
    /// (`--admin-token`, or BREAKWATER_ADMIN_TOKEN, which the CLI reads too). Empty: the
    /// proxy makes one at start and writes it to `token_file` (mode 0600), where the CLI
    /// finds it. A config file that holds a token should be 0600 (a warning says so).
    pub token: String,
    /// Where a generated token is kept. Empty: `<db_file>.admin-token`, or without a
    /// db_file `$XDG_RUNTIME_DIR/breakwater-admin-<port>.token` (else under
    /// /tmp/breakwater-<uid>/, a 0700 directory).
    pub token_file: String,
    /// Host header values accepted besides IP literals and localhost (DNS rebinding: a
    /// page served from another name must not reach the API through this proxy's address).
    pub allowed_hosts: Vec<String>,
}

impl AdminConfig {
    /// Where the generated token is kept (see `token_file`).
    pub fn token_path(&self) -> std::path::PathBuf {
        if !self.token_file.is_empty() {
            return self.token_file.clone().into();
        }
        if !self.db_file.is_empty() {
            return format!("{}.admin-token", self.db_file).into();
        }
        let port = self.listen.rsplit_once(':').map(|(_, p)| p).unwrap_or("6070");
        let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => std::path::PathBuf::from(d),
            None => std::path::PathBuf::from(format!("/tmp/breakwater-{}", current_uid())),
        };
        dir.join(format!("breakwater-admin-{port}.token"))
    }
}

/// The process's real uid (from /proc/self/status; 0 when unreadable).
pub fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok())))
        .unwrap_or(0)
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6070".into(),
            mysql_listen: "127.0.0.1:6032".into(),
            username: "admin".into(),
            password: "admin".into(),
            db_file: String::new(),
            token: String::new(),
            token_file: String::new(),
            allowed_hosts: Vec::new(),
        }
    }
}

/// The query cache (rules with cache_ttl put results in it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory bound for cached result sets (raw packets plus keys), in bytes.
    pub max_bytes: usize,
    /// Larger results are not cached.
    pub max_entry_bytes: usize,
    /// How long a client waits for another client's fetch of the same missing key.
    pub fill_wait_ms: u64,
    /// After a write to a table passes through the proxy, cache misses on that table are
    /// filled from the writer for this long (so a replica's lag cannot put the pre-write
    /// result back in the cache).
    pub fill_from_writer_after_write_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, max_entry_bytes: 4 << 20, fill_wait_ms: 5000, fill_from_writer_after_write_ms: 2000 }
    }
}

/// OTLP export of the proxy's traces (one span per sampled client query) and metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint, e.g. http://127.0.0.1:4317. Empty: not used.
    pub otlp_endpoint: String,
    /// OTLP/HTTP base URL (protobuf), e.g. http://127.0.0.1:4318 (/v1/traces and
    /// /v1/metrics are appended). Empty: not used.
    pub otlp_http_endpoint: String,
    /// Fraction of client queries traced (0.0 to 1.0).
    pub trace_sample_ratio: f64,
    pub export_interval_ms: u64,
    /// Spans waiting for export beyond this are dropped (and counted).
    pub max_queued_spans: usize,
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_http_endpoint: String::new(),
            trace_sample_ratio: 0.01,
            export_interval_ms: 1000,
            max_queued_spans: 8192,
            service_name: "breakwater-proxy".into(),
        }
    }
}

/// Temporary access: expiring database users (needs `[admin] db_file` as its store).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Account used to CREATE/DROP the temporary MariaDB users (empty: the monitor account).
    pub admin_username: String,
    pub admin_password: String,
    /// Longest TTL a grant (or an extension) may reach, in seconds.
    pub max_ttl_seconds: u64,
    pub read_only_hostgroup: u32,
    pub read_write_hostgroup: u32,
    /// Every temporary MariaDB account starts with this marker; the reconciler removes
    /// marked accounts that no active grant owns (and never touches others).
    pub account_prefix: String,
    /// JSON-lines audit log (empty: `<db_file>.audit.jsonl`).
    pub audit_log: String,
    pub expiry_check_ms: u64,
    pub reconcile_interval_ms: u64,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            admin_username: String::new(),
            admin_password: String::new(),
            max_ttl_seconds: 86_400,
            read_only_hostgroup: 20,
            read_write_hostgroup: 10,
            account_prefix: "bw_tmp_".into(),
            audit_log: String::new(),
            expiry_check_ms: 500,
            reconcile_interval_ms: 10_000,
        }
    }
}

/// The agents' signals (OTLP metrics from breakwater-agent on the database hosts). OTLP/HTTP
/// is received at `POST /v1/metrics` on the admin HTTP listener; OTLP/gRPC on
/// `otlp_grpc_listen` when set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// OTLP/gRPC listener (e.g. 127.0.0.1:4317); empty: none.
    pub otlp_grpc_listen: String,
    /// A series older than three of its export intervals, or than this, is stale: the
    /// proxy falls back to its own observations.
    pub max_age_ms: u64,
    /// Largest OTLP request body accepted.
    pub max_request_bytes: usize,
    /// "host:port" of a server -> the `host.name` of the agent that reports it, where the
    /// proxy's name for a server is not the agent's.
    pub agent_hosts: std::collections::BTreeMap<String, String>,
    /// Bearer token the agents send with their OTLP exports (`--otlp-token`): their signals
    /// change routing and promotions, so without it only loopback senders are accepted.
    pub token: String,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        Self { otlp_grpc_listen: String::new(), max_age_ms: 30_000, max_request_bytes: 8 << 20, agent_hosts: Default::default(), token: String::new() }
    }
}

/// Query digest statistics (stats_mysql_query_digest).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DigestConfig {
    /// Most (digest, hostgroup) rows kept; the least used row is evicted beyond it.
    pub max_digests: usize,
}

impl Default for DigestConfig {
    fn default() -> Self {
        Self { max_digests: 10_000 }
    }
}

/// The failover controller (Orchestrator's job): one replication cluster made of the servers
/// of the writer and reader hostgroups.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    pub enabled: bool,
    /// A name for the cluster in events, metrics and the topology page.
    pub cluster: String,
    pub writer_hostgroup: u32,
    pub reader_hostgroup: u32,
    /// Topology discovery interval.
    pub poll_interval_ms: u64,
    /// Per-server timeout of one discovery probe (connect + queries).
    pub probe_timeout_ms: u64,
    /// Orchestrator's RecoveryPeriodBlockSeconds: after a recovery, further automated
    /// recoveries of this cluster are blocked this long (a person can `ack` to end it).
    pub recovery_block_seconds: u64,
    /// How long the chosen replica may take to apply its relay log before promotion.
    pub relay_apply_timeout_ms: u64,
    /// Graceful switchover: how long the chosen replica may take to catch up.
    pub switchover_timeout_ms: u64,
    /// Credentials replicas use to replicate from a newly promoted primary.
    pub replication_user: String,
    pub replication_password: String,
    /// Commands run with `sh -c` before and after a promotion. Environment:
    /// BREAKWATER_CLUSTER, BREAKWATER_RECOVERY_KIND, BREAKWATER_FAILED_HOST/PORT,
    /// BREAKWATER_PROMOTED_HOST/PORT. A non-zero pre hook vetoes the promotion.
    pub pre_promotion_hook: Option<String>,
    pub post_promotion_hook: Option<String>,
    pub hook_timeout_ms: u64,
    /// Events kept in memory (oldest dropped first).
    pub max_events: usize,
    /// "breakwater" (default): promotion gated on load, catch-up, write ramp, cascade watch.
    /// "orchestrator": what Orchestrator and ProxySQL do (the most advanced replica, writes
    /// switched at once, no gate, no clamp), for comparison in `cargo xtask drill cascade`.
    pub policy: FailoverPolicy,
    /// A fit candidate behind the most advanced replica is caught up from it within this long.
    pub catchup_timeout_ms: u64,
    /// Semi-synchronous replication managed by the controller: a promoted primary gets the
    /// master side (AFTER_SYNC, `semi_sync_timeout_ms`), repointed replicas the replica
    /// side; a primary that fell back to asynchronous replication is a SemiSyncFallback.
    pub semi_sync: bool,
    pub semi_sync_timeout_ms: u64,
    pub gate: crate::failover::gate::GateConfig,
    pub cascade: crate::failover::cascade::CascadeConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverPolicy {
    #[default]
    Breakwater,
    Orchestrator,
}

impl FailoverPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverPolicy::Breakwater => "breakwater",
            FailoverPolicy::Orchestrator => "orchestrator",
        }
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cluster: "main".into(),
            writer_hostgroup: 10,
            reader_hostgroup: 20,
            poll_interval_ms: 1000,
            probe_timeout_ms: 800,
            recovery_block_seconds: 300,
            relay_apply_timeout_ms: 10_000,
            switchover_timeout_ms: 10_000,
            replication_user: "repl".into(),
            replication_password: "repl".into(),
            pre_promotion_hook: None,
            post_promotion_hook: None,
            hook_timeout_ms: 30_000,
            max_events: 200,
            policy: FailoverPolicy::Breakwater,
            catchup_timeout_ms: 10_000,
            semi_sync: true,
            semi_sync_timeout_ms: 10_000,
            gate: Default::default(),
            cascade: Default::default(),
        }
    }
}

/// Orchestrator's promotion rules.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionRule {
    Prefer,
    #[default]
    Neutral,
    PreferNot,
    MustNot,
}

impl PromotionRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PromotionRule::Prefer => "prefer",
            PromotionRule::Neutral => "neutral",
            PromotionRule::PreferNot => "prefer_not",
            PromotionRule::MustNot => "must_not",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: String,
    /// Accept queue length of the client listener (capped by net.core.somaxconn).
    pub listen_backlog: u32,
    /// PEM certificate chain and private key: clients may then use TLS (SSLRequest).
    /// Without them a TLS request gets a clear error 1043.
    pub tls_cert: String,
    pub tls_key: String,
    pub max_client_connections: usize,
    pub server_version: String,
    pub max_allowed_packet: usize,
    pub queue_timeout_ms: u64,
    pub max_queue_waiters: usize,
    pub connect_timeout_ms: u64,
    pub shutdown_drain_ms: u64,
    pub retry_reads: bool,
    /// How a hostgroup picks a server: "adaptive" (the cheaper of two random servers by
    /// latency × (in flight + 1) / weight, with the agents' CPU throttling and pressure as a
    /// penalty: a slow server gets less traffic) or "weighted" (by weight and connections in
    /// use, as before). `balance_hostgroups` sets it per hostgroup ("20" = "weighted").
    pub balance: Balance,
    pub balance_hostgroups: std::collections::BTreeMap<String, Balance>,
    /// The adaptive concurrency limit per backend server on statements in flight (Gradient2:
    /// grows while latency holds under use, shrinks when it rises), between `limit_min` and
    /// `limit_max`, starting at `limit_initial`. A statement over it waits up to
    /// `queue_timeout_ms` (at most `max_queue_waiters` waiting per server), then gets error
    /// 9001 naming the server, its limit and the queue. `max_connections` stays the hard cap.
    pub adaptive_limit: bool,
    pub limit_initial: u32,
    pub limit_min: u32,
    pub limit_max: u32,
    /// Latency may rise this much over its long-term level before the limit shrinks.
    pub limit_tolerance: f64,
    /// ProxySQL's query_digests_max_query_length: a statement is lexed, digested and
    /// matched against the query rules on its first this many bytes only (it is still
    /// forwarded whole, without copies of its size).
    pub query_digests_max_query_length: usize,
    /// A backend that stops answering at the network level (host gone, packets dropped by
    /// a firewall: nothing acknowledged, keepalive probes unanswered) fails the statement
    /// waiting on it within this long: TCP keepalive on every backend socket (first probe
    /// at half of it) and TCP_USER_TIMEOUT. A read whose backend never answered is retried
    /// on another server. A statement that is merely slow is bounded by
    /// default_query_timeout_ms instead, so long reports are not cut off.
    pub backend_read_timeout_ms: u64,
    /// ProxySQL's default_query_timeout: a statement running longer is killed on its
    /// backend (KILL QUERY) and the client gets error 1969 naming the limit. 0: no limit.
    pub default_query_timeout_ms: u64,
    /// A client that stops reading its results for this long is disconnected (its backend
    /// connection, holding a half-sent result, is closed).
    pub client_write_timeout_ms: u64,
    /// TCP keepalive on client sockets: a client host that vanished is noticed after about
    /// this long plus 6 probes 10 s apart, and what it held (a transaction) is released.
    pub client_keepalive_ms: u64,
    /// ProxySQL's max_transaction_time: a transaction open longer is rolled back (its
    /// backend connection closed) and the client disconnected with an error. 0: no limit.
    pub max_transaction_time_ms: u64,
    /// A client idle this long inside a transaction is disconnected and its transaction
    /// rolled back (its locks and connection released). 0: no limit.
    pub max_transaction_idle_time_ms: u64,
    /// A stored procedure may change session state (SET, temporary tables, user variables)
    /// that the proxy cannot see: by default a client that ran CALL stays on its backend
    /// connection. true: keep multiplexing after CALL (for procedures known not to).
    pub multiplex_after_call: bool,
    /// TLS to servers with `use_ssl` (ProxySQL's mysql-ssl_p2s_*): the CA file that must
    /// have issued their certificates (empty: the system's CA bundle), an optional client
    /// certificate and key, and how much to verify: "identity" (the certificate must name
    /// the server's host, MySQL's VERIFY_IDENTITY) or "ca" (the chain only, VERIFY_CA).
    pub ssl_p2s_ca: String,
    pub ssl_p2s_cert: String,
    pub ssl_p2s_key: String,
    pub ssl_p2s_verify: TlsVerify,
}

/// How a backend's TLS certificate is verified (MySQL's --ssl-mode VERIFY_IDENTITY / VERIFY_CA).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsVerify {
    #[default]
    Identity,
    Ca,
}

impl TlsVerify {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVerify::Identity => "identity",
            TlsVerify::Ca => "ca",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    #[default]
    Adaptive,
    Weighted,
}

impl ProxyConfig {
    pub fn limit_config(&self) -> crate::adaptive::limit::LimitConfig {
        let min = self.limit_min.max(1) as f64;
        let max = (self.limit_max as f64).max(min);
        crate::adaptive::limit::LimitConfig {
            initial: (self.limit_initial as f64).clamp(min, max),
            min,
            max,
            tolerance: self.limit_tolerance.max(1.0),
            ..Default::default()
        }
    }

    pub fn admission(&self) -> crate::adaptive::backend::Admission {
        crate::adaptive::backend::Admission {
            enabled: self.adaptive_limit,
            timeout: std::time::Duration::from_millis(self.queue_timeout_ms),
            max_queue: self.max_queue_waiters as u64,
        }
    }

    pub fn balance_for(&self, hostgroup: u32) -> Balance {
        self.balance_hostgroups.get(&hostgroup.to_string()).copied().unwrap_or(self.balance)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6033".into(),
            listen_backlog: 4096,
            tls_cert: String::new(),
            tls_key: String::new(),
            max_client_connections: 4096,
            server_version: "5.5.5-10.11.6-MariaDB-Breakwater".into(),
            max_allowed_packet: 64 << 20,
            queue_timeout_ms: 10_000,
            max_queue_waiters: 8192,
            connect_timeout_ms: 2000,
            shutdown_drain_ms: 10_000,
            retry_reads: true,
            balance: Balance::Adaptive,
            balance_hostgroups: Default::default(),
            adaptive_limit: true,
            limit_initial: 32,
            limit_min: 4,
            limit_max: 512,
            limit_tolerance: 1.5,
            query_digests_max_query_length: 65_000,
            backend_read_timeout_ms: 10_000,
            default_query_timeout_ms: 3_600_000,
            client_write_timeout_ms: 30_000,
            client_keepalive_ms: 60_000,
            max_transaction_time_ms: 14_400_000,
            max_transaction_idle_time_ms: 600_000,
            multiplex_after_call: false,
            ssl_p2s_ca: String::new(),
            ssl_p2s_cert: String::new(),
            ssl_p2s_key: String::new(),
            ssl_p2s_verify: TlsVerify::Identity,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    pub username: String,
    pub password: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// ProxySQL's monitor_ping_max_failures: this many consecutive failed checks (or lag
    /// or replication verdicts) before a server is SHUNNED; one passing check brings it back.
    pub shun_after_failures: u32,
    /// A replica whose replication is broken (SQL thread stopped, or IO thread stopped
    /// rather than reconnecting) serves ever older data: SHUNNED unless this is false.
    /// A replica whose IO thread is only reconnecting (its primary is down) stays ONLINE:
    /// its data is as fresh as any there is.
    pub shun_broken_replication: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            username: "monitor".into(),
            password: "monitor".into(),
            interval_ms: 1000,
            timeout_ms: 800,
            shun_after_failures: 3,
            shun_broken_replication: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub hostgroup: u32,
    pub host: String,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Seconds; 0 disables the lag check.
    #[serde(default)]
    pub max_replication_lag: u64,
    /// Unix socket path for a server on the proxy's own host: the data path connects
    /// there (cheaper than loopback TCP); host:port still names the server and is what the
    /// health checks use.
    #[serde(default)]
    pub socket: Option<String>,
    /// For the failover controller: may this server be promoted, and how eagerly.
    #[serde(default)]
    pub promotion_rule: PromotionRule,
    /// ProxySQL's mysql_servers.status as an operator sets it: ONLINE, OFFLINE_SOFT (takes
    /// no new statements; open transactions and pinned sessions finish: a drain) or
    /// OFFLINE_HARD (out of rotation at once). SHUNNED is the health monitor's, not set here.
    #[serde(default)]
    pub status: AdminStatus,
    /// ProxySQL's mysql_servers.use_ssl: the data path, the health checks and KILL QUERY
    /// reach this server over TLS, its certificate verified as `[proxy] ssl_p2s_*` say.
    /// A server that does not offer TLS is refused rather than used in clear.
    #[serde(default)]
    pub use_ssl: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum AdminStatus {
    #[default]
    #[serde(rename = "ONLINE")]
    Online,
    #[serde(rename = "OFFLINE_SOFT")]
    OfflineSoft,
    #[serde(rename = "OFFLINE_HARD")]
    OfflineHard,
}

impl AdminStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminStatus::Online => "ONLINE",
            AdminStatus::OfflineSoft => "OFFLINE_SOFT",
            AdminStatus::OfflineHard => "OFFLINE_HARD",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().as_str() {
            "" | "ONLINE" => Some(AdminStatus::Online),
            "OFFLINE_SOFT" => Some(AdminStatus::OfflineSoft),
            "OFFLINE_HARD" => Some(AdminStatus::OfflineHard),
            _ => None,
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max_conns() -> usize {
    100
}

impl ServerConfig {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// '*' + HEX(SHA1(SHA1(password))).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// HEX(SHA256(SHA256(password))).
    #[serde(default)]
    pub sha2_password_hash: Option<String>,
    /// Clear password: convenient for labs; both hashes are derived from it.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "native")]
    pub auth_plugin: String,
    #[serde(default)]
    pub backend_username: Option<String>,
    #[serde(default)]
    pub backend_password: String,
    pub default_hostgroup: u32,
    #[serde(default)]
    pub default_schema: Option<String>,
}

fn native() -> String {
    auth::NATIVE.into()
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct QueryRule {
    pub rule_id: u32,
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub schemaname: Option<String>,
    /// Regex on the query text (case-insensitive).
    #[serde(default)]
    pub match_pattern: Option<String>,
    /// Regex on the query's digest (literals replaced by ?, case-insensitive).
    #[serde(default)]
    pub match_digest: Option<String>,
    #[serde(default)]
    pub negate_match_pattern: bool,
    pub destination_hostgroup: Option<u32>,
    #[serde(default)]
    pub apply: bool,
    /// Cache results of matching reads for this many milliseconds (ProxySQL's cache_ttl).
    #[serde(default)]
    pub cache_ttl: Option<u64>,
    /// Serve an expired entry for up to this many more milliseconds while one client
    /// refreshes it (stale-while-revalidate).
    #[serde(default)]
    pub cache_stale_while_revalidate: Option<u64>,
    /// Serve an expired entry for up to this many more milliseconds when the read cannot be
    /// served by a backend (none ONLINE, the server is shedding or over its concurrency
    /// limit, the connection is lost before an answer): stale-if-error, counted apart.
    #[serde(default)]
    pub cache_stale_if_error_ms: Option<u64>,
    /// Sheddable traffic: while the failover controller sees a cascading risk on a freshly
    /// promoted primary, statements matching a rule with shed_priority > 0 bound for its
    /// hostgroup are refused at once (error 9001), so what is essential keeps the capacity.
    #[serde(default)]
    pub shed_priority: Option<u32>,
}

fn yes() -> bool {
    true
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml(DEFAULT_TOML),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|err| ConfigError::Read { path: p.display().to_string(), err })?;
                Self::from_toml(&text)
            }
        }
    }

    /// The etcd settings as a whole, once flags and the environment are applied (a file may
    /// leave the password to BREAKWATER_ETCD_PASSWORD, the endpoints to --etcd).
    pub fn validate_cluster(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let c = &self.cluster;
        let tls = c.etcd_endpoints.iter().filter(|e| e.starts_with("https://")).count();
        for e in &c.etcd_endpoints {
            if !e.starts_with("http://") && !e.starts_with("https://") {
                return bad(format!("[cluster] etcd endpoint {e:?}: http://host:port or https://host:port"));
            }
        }
        if tls > 0 && tls < c.etcd_endpoints.len() {
            return bad("[cluster] etcd_endpoints: all https:// or all http://, not both".into());
        }
        if tls > 0 && c.etcd_ca_file.is_empty() {
            return bad("[cluster] https:// etcd endpoints need etcd_ca_file (the CA that issued etcd's certificate)".into());
        }
        if tls == 0 && !c.etcd_endpoints.is_empty() && !(c.etcd_ca_file.is_empty() && c.etcd_cert_file.is_empty()) {
            return bad("[cluster] etcd_ca_file / etcd_cert_file are for https:// endpoints".into());
        }
        if c.etcd_cert_file.is_empty() != c.etcd_key_file.is_empty() {
            return bad("[cluster] etcd_cert_file and etcd_key_file go together".into());
        }
        if c.etcd_user.is_empty() != c.etcd_password.is_empty() {
            return bad("[cluster] etcd_user needs etcd_password (or BREAKWATER_ETCD_PASSWORD) and the other way round".into());
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.cluster.etcd_endpoints.is_empty() && self.cluster.lease_ttl_s < 2 {
            return bad(format!("[cluster] lease_ttl_s = {}: at least 2", self.cluster.lease_ttl_s));
        }
        if self.servers.is_empty() {
            return bad("no [[servers]]".into());
        }
        for s in &self.servers {
            if s.max_connections == 0 {
                return bad(format!("server {} has max_connections = 0", s.address()));
            }
            if s.use_ssl && s.socket.is_some() {
                return bad(format!("server {}: use_ssl with a unix socket (a local socket needs no TLS; drop one of them)", s.address()));
            }
        }
        for u in &self.users {
            if u.password_hash.is_none() && u.sha2_password_hash.is_none() && u.password.is_none() {
                return bad(format!("user {} has no password, password_hash or sha2_password_hash", u.username));
            }
            if u.auth_plugin != auth::NATIVE && u.auth_plugin != auth::CACHING_SHA2 {
                return bad(format!("user {}: unsupported auth_plugin {}", u.username, u.auth_plugin));
            }
            if !self.servers.iter().any(|s| s.hostgroup == u.default_hostgroup) {
                return bad(format!("user {}: default_hostgroup {} has no servers", u.username, u.default_hostgroup));
            }
        }
        if !self.admin.mysql_listen.is_empty() {
            let ok = self.admin.mysql_listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
            if !ok {
                return bad(format!("admin mysql_listen {} must be a loopback address:port", self.admin.mysql_listen));
            }
        }
        if self.failover.enabled {
            let f = &self.failover;
            if !self.servers.iter().any(|s| s.hostgroup == f.writer_hostgroup) {
                return bad(format!("failover: writer_hostgroup {} has no servers", f.writer_hostgroup));
            }
            let writers: std::collections::BTreeSet<String> =
                self.servers.iter().filter(|s| s.hostgroup == f.writer_hostgroup).map(|s| s.address()).collect();
            if writers.len() != 1 {
                return bad(format!("failover: writer_hostgroup {} must hold exactly one server (has {})", f.writer_hostgroup, writers.len()));
            }
            if f.poll_interval_ms == 0 || f.probe_timeout_ms == 0 {
                return bad("failover: poll_interval_ms and probe_timeout_ms must be > 0".into());
            }
        }
        for r in &self.query_rules {
            for re in [&r.match_pattern, &r.match_digest].into_iter().flatten() {
                if let Err(e) = regex::Regex::new(re) {
                    return bad(format!("query rule {}: bad regex {re:?}: {e}", r.rule_id));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_settings_are_checked_as_a_whole() {
        let mut c = Config::from_toml(DEFAULT_TOML).unwrap();
        assert!(c.validate_cluster().is_ok(), "no etcd: nothing to check");
        c.cluster.etcd_endpoints = vec!["https://127.0.0.1:2379".into()];
        assert!(c.validate_cluster().unwrap_err().to_string().contains("need etcd_ca_file"));
        c.cluster.etcd_ca_file = "/ca.pem".into();
        assert!(c.validate_cluster().is_ok());
        c.cluster.etcd_endpoints.push("http://127.0.0.1:2380".into());
        assert!(c.validate_cluster().unwrap_err().to_string().contains("not both"));
        c.cluster.etcd_endpoints.pop();
        c.cluster.etcd_user = "bw".into();
        assert!(c.validate_cluster().unwrap_err().to_string().contains("BREAKWATER_ETCD_PASSWORD"));
        c.cluster.etcd_password = "pw".into();
        c.cluster.etcd_cert_file = "/c.pem".into();
        assert!(c.validate_cluster().unwrap_err().to_string().contains("go together"));
        c.cluster.etcd_key_file = "/k.pem".into();
        assert!(c.validate_cluster().is_ok());
        c.cluster.etcd_endpoints = vec!["etcd:2379".into()];
        assert!(c.validate_cluster().is_err());
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_toml(DEFAULT_TOML).unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:6033");
        assert_eq!(c.servers.len(), 3);
        assert!(c.users.iter().any(|u| u.username == "app"));
    }

    #[test]
    fn errors_are_clear() {
        let e = Config::from_toml("[[servers]]\nhostgroup=1\nhost='h'\nport=1\nmax_connections=0\n").unwrap_err();
        assert!(e.to_string().contains("max_connections = 0"), "{e}");
        let e = Config::from_toml("bogus = 1").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
