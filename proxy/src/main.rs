//! breakwater-proxy: a MySQL-protocol proxy with capped pools, multiplexing and read/write split.

use breakwater_proxy::config::Config;
use breakwater_proxy::runtime::{Proxy, Runtime};
use breakwater_proxy::{admin, backend, failover, listener};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BalanceArg {
    Adaptive,
    Weighted,
}

#[derive(Parser, Debug)]
#[command(name = "breakwater-proxy", version, about)]
struct Cli {
    /// TOML configuration file (default: the embedded configuration for the local lab).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Client listener address (overrides [proxy] listen).
    #[arg(long)]
    listen: Option<String>,
    /// Client connection limit (overrides [proxy] max_client_connections).
    #[arg(long)]
    max_client_connections: Option<usize>,
    /// Per-server connection cap for every server (overrides each [[servers]] max_connections).
    #[arg(long)]
    max_connections: Option<usize>,
    /// How long a client waits for a pooled connection, in ms.
    #[arg(long)]
    queue_timeout_ms: Option<u64>,
    /// Health check interval in ms.
    #[arg(long)]
    monitor_interval_ms: Option<u64>,
    /// Dead-backend bound in ms (overrides [proxy] backend_read_timeout_ms).
    #[arg(long)]
    backend_read_timeout_ms: Option<u64>,
    /// Statement time limit in ms, 0 = none (overrides [proxy] default_query_timeout_ms).
    #[arg(long)]
    default_query_timeout_ms: Option<u64>,
    /// Client write timeout in ms (overrides [proxy] client_write_timeout_ms).
    #[arg(long)]
    client_write_timeout_ms: Option<u64>,
    /// Transaction time limit in ms, 0 = none (overrides [proxy] max_transaction_time_ms).
    #[arg(long)]
    max_transaction_time_ms: Option<u64>,
    /// Idle-in-transaction limit in ms, 0 = none (overrides [proxy] max_transaction_idle_time_ms).
    #[arg(long)]
    max_transaction_idle_time_ms: Option<u64>,
    /// Consecutive failed health checks before a server is SHUNNED (overrides [monitor] shun_after_failures).
    #[arg(long)]
    shun_after_failures: Option<u32>,
    /// Reader choice in every hostgroup without its own setting (overrides [proxy] balance).
    #[arg(long, value_enum)]
    balance: Option<BalanceArg>,
    /// The adaptive concurrency limit per server on or off (overrides [proxy] adaptive_limit).
    #[arg(long)]
    adaptive_limit: Option<bool>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or breakwater_proxy=debug.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Admin HTTP interface address (overrides [admin] listen; "" disables it).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Bearer token of the admin HTTP API (overrides [admin] token; also from the
    /// environment variable BREAKWATER_ADMIN_TOKEN).
    #[arg(long, env = "BREAKWATER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// PEM certificate chain for client TLS (overrides [proxy] tls_cert).
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key for client TLS (overrides [proxy] tls_key).
    #[arg(long)]
    tls_key: Option<String>,
    /// CA file that issued the certificates of servers with use_ssl (overrides [proxy] ssl_p2s_ca).
    #[arg(long)]
    ssl_p2s_ca: Option<String>,
    /// MySQL-protocol admin address (overrides [admin] mysql_listen; "" disables it).
    #[arg(long)]
    admin_mysql_listen: Option<String>,
    /// SQLite file for SAVE ... TO DISK (overrides [admin] db_file).
    #[arg(long)]
    admin_db: Option<String>,
    /// Ignore a configuration saved in the admin db file: start from the TOML.
    #[arg(long)]
    initial: bool,
    /// Run the failover controller (overrides [failover] enabled).
    #[arg(long, value_name = "on|off")]
    failover: Option<OnOff>,
    /// OTLP/gRPC endpoint for traces and metrics (overrides [telemetry] otlp_endpoint).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// OTLP/HTTP base URL (overrides [telemetry] otlp_http_endpoint).
    #[arg(long)]
    otlp_http_endpoint: Option<String>,
    /// Fraction of queries traced (overrides [telemetry] trace_sample_ratio).
    #[arg(long)]
    trace_sample_ratio: Option<f64>,
    /// Cooldown after a recovery, in seconds (overrides [failover] recovery_block_seconds).
    #[arg(long)]
    recovery_block_seconds: Option<u64>,
    /// Failover policy (overrides [failover] policy): breakwater (load-aware) or orchestrator.
    #[arg(long, value_name = "breakwater|orchestrator")]
    failover_policy: Option<String>,
    /// Bearer token the agents must send with their OTLP metrics (overrides [signals] token;
    /// also from the environment variable BREAKWATER_SIGNALS_TOKEN).
    #[arg(long, env = "BREAKWATER_SIGNALS_TOKEN", hide_env_values = true)]
    signals_token: Option<String>,
    /// etcd endpoints for the leader election of several proxies, comma-separated
    /// (overrides [cluster] etcd_endpoints; "" turns coordination off).
    #[arg(long, value_name = "URL[,URL…]")]
    etcd: Option<String>,
    /// This proxy's name in the election (overrides [cluster] name).
    #[arg(long)]
    cluster_name: Option<String>,
    /// The etcd user's password (overrides [cluster] etcd_password).
    #[arg(long, env = "BREAKWATER_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// The leader's etcd lease in seconds (overrides [cluster] lease_ttl_s).
    #[arg(long)]
    etcd_lease_ttl: Option<u64>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Temporary access: expiring database users (through a running proxy's admin interface).
    Access {
        #[arg(long, global = true)]
        admin: Option<String>,
        #[command(subcommand)]
        action: AccessCmd,
    },
    /// Talk to the failover controller of a running proxy (its admin interface).
    Failover {
        /// Admin interface address (default: [admin] listen of --config, or 127.0.0.1:6070).
        #[arg(long, global = true)]
        admin: Option<String>,
        #[command(subcommand)]
        action: FailoverCmd,
    },
}

#[derive(Subcommand, Debug)]
enum AccessCmd {
    /// Create a temporary user; prints the password once.
    Grant {
        #[arg(long)]
        user: String,
        /// e.g. 30m, 4h (at most [access] max_ttl_seconds).
        #[arg(long)]
        ttl: String,
        /// read_only, read_write, or a privilege list like "SELECT, INSERT" (schema-level
        /// privileges only: never SUPER, FILE, PROCESS, CREATE USER, GRANT OPTION, ALL).
        #[arg(long, default_value = "read_only")]
        role: String,
        /// The one schema the grant is on (required; never mysql or another system schema).
        #[arg(long)]
        schema: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
        /// text or json (one object: user, password, expires_at).
        #[arg(long, default_value = "text")]
        output: String,
    },
    /// Grants with who, why, granted at, expires at.
    List {
        #[arg(long, default_value = "text")]
        output: String,
    },
    /// End a grant now.
    Revoke {
        #[arg(long)]
        user: String,
    },
    /// Move the expiry to now + ttl (within max_ttl_seconds of the grant).
    Extend {
        #[arg(long)]
        user: String,
        #[arg(long)]
        ttl: String,
    },
}

#[derive(Subcommand, Debug)]
enum FailoverCmd {
    /// Topology, problems, cooldown and recent events.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Graceful switchover while the primary is alive (no acknowledged write is lost).
    Switchover {
        /// The replica to promote (default: the best candidate).
        #[arg(long)]
        to: Option<String>,
    },
    /// Manual failover of a dead primary; ignores the cooldown.
    Failover {
        #[arg(long)]
        to: Option<String>,
    },
    /// Acknowledge the last recovery: ends the cooldown block.
    Ack {
        /// Who acknowledges (kept in the event log).
        #[arg(long, default_value_t = whoami())]
        by: String,
    },
    /// Make a fenced former primary replicate from the current primary again.
    Rejoin { addr: String },
}

fn whoami() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "cli".into())
}

fn main() -> ExitCode {
    // One crypto provider for every TLS user in the process (client TLS, backend TLS,
    // mysql_async's side connections).
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Some(Cmd::Failover { admin, action }) = &cli.command {
        return failover_cli(cli.config.as_deref(), admin.clone(), action);
    }
    if let Some(Cmd::Access { admin, action }) = &cli.command {
        return access_cli(cli.config.as_deref(), admin.clone(), action);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "info".into()))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let mut cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(l) = cli.listen {
        cfg.proxy.listen = l;
    }
    if let Some(n) = cli.max_client_connections {
        cfg.proxy.max_client_connections = n;
    }
    if let Some(n) = cli.max_connections {
        cfg.servers.iter_mut().for_each(|s| s.max_connections = n);
    }
    if let Some(n) = cli.queue_timeout_ms {
        cfg.proxy.queue_timeout_ms = n;
    }
    if let Some(n) = cli.monitor_interval_ms {
        cfg.monitor.interval_ms = n;
    }
    if let Some(n) = cli.backend_read_timeout_ms {
        cfg.proxy.backend_read_timeout_ms = n;
    }
    if let Some(n) = cli.default_query_timeout_ms {
        cfg.proxy.default_query_timeout_ms = n;
    }
    if let Some(n) = cli.client_write_timeout_ms {
        cfg.proxy.client_write_timeout_ms = n;
    }
    if let Some(n) = cli.max_transaction_time_ms {
        cfg.proxy.max_transaction_time_ms = n;
    }
    if let Some(n) = cli.max_transaction_idle_time_ms {
        cfg.proxy.max_transaction_idle_time_ms = n;
    }
    if let Some(b) = cli.balance {
        cfg.proxy.balance = match b {
            BalanceArg::Adaptive => breakwater_proxy::config::Balance::Adaptive,
            BalanceArg::Weighted => breakwater_proxy::config::Balance::Weighted,
        };
    }
    if let Some(on) = cli.adaptive_limit {
        cfg.proxy.adaptive_limit = on;
    }
    if let Some(n) = cli.shun_after_failures {
        cfg.monitor.shun_after_failures = n;
    }
    if let Some(t) = cli.admin_token.filter(|t| !t.is_empty()) {
        cfg.admin.token = t;
    }
    if let Some(a) = cli.admin_listen {
        cfg.admin.listen = a;
    }
    if let Some(c) = cli.tls_cert {
        cfg.proxy.tls_cert = c;
    }
    if let Some(k) = cli.tls_key {
        cfg.proxy.tls_key = k;
    }
    if let Some(c) = cli.ssl_p2s_ca {
        cfg.proxy.ssl_p2s_ca = c;
    }
    if let Some(a) = cli.admin_mysql_listen {
        cfg.admin.mysql_listen = a;
    }
    if let Some(e) = cli.otlp_endpoint {
        cfg.telemetry.otlp_endpoint = e;
    }
    if let Some(e) = cli.otlp_http_endpoint {
        cfg.telemetry.otlp_http_endpoint = e;
    }
    if let Some(r) = cli.trace_sample_ratio {
        cfg.telemetry.trace_sample_ratio = r;
    }
    if let Some(a) = cli.admin_db {
        cfg.admin.db_file = a;
    }
    if let Some(t) = cli.signals_token.filter(|t| !t.is_empty()) {
        cfg.signals.token = t;
    }
    if let Some(e) = cli.etcd {
        cfg.cluster.etcd_endpoints = e.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
    }
    if let Some(n) = cli.cluster_name {
        cfg.cluster.name = n;
    }
    if let Some(p) = cli.etcd_password.filter(|p| !p.is_empty()) {
        cfg.cluster.etcd_password = p;
    }
    if let Some(t) = cli.etcd_lease_ttl {
        cfg.cluster.lease_ttl_s = t;
    }
    if let Err(e) = cfg.validate().and_then(|()| cfg.validate_cluster()) {
        eprintln!("breakwater-proxy: {e}");
        return ExitCode::from(2);
    }
    if let Some(f) = cli.failover {
        cfg.failover.enabled = matches!(f, OnOff::On);
    }
    if let Some(n) = cli.recovery_block_seconds {
        cfg.failover.recovery_block_seconds = n;
    }
    match cli.failover_policy.as_deref() {
        None => {}
        Some("breakwater") => cfg.failover.policy = breakwater_proxy::config::FailoverPolicy::Breakwater,
        Some("orchestrator") => cfg.failover.policy = breakwater_proxy::config::FailoverPolicy::Orchestrator,
        Some(other) => {
            eprintln!("breakwater-proxy: --failover-policy {other:?}: expected breakwater or orchestrator");
            return ExitCode::from(2);
        }
    }
    if cli.check_config {
        println!("{cfg:#?}");
        return ExitCode::SUCCESS;
    }
    let rt = match Runtime::build(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(n.max(1));
    }
    let tokio_rt = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("breakwater-proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio_rt.block_on(run(rt, cli.initial, cli.config.clone()))
}

async fn run(rt: Runtime, initial: bool, config_file: Option<std::path::PathBuf>) -> ExitCode {
    let listen = rt.cfg.proxy.listen.clone();
    let monitor_cfg = rt.cfg.monitor.clone();
    let proxy = Proxy::new(rt);
    let (cert, key) = (&proxy.rt.cfg.proxy.tls_cert, &proxy.rt.cfg.proxy.tls_key);
    if !cert.is_empty() || !key.is_empty() {
        match breakwater_proxy::frontend::stream::acceptor(cert, key) {
            Ok(a) => {
                let _ = proxy.tls.set(a);
                tracing::info!(cert = %cert, "TLS enabled for clients that request it");
            }
            Err(e) => {
                eprintln!("breakwater-proxy: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let listener = match listener::bind(&listen, proxy.rt.cfg.proxy.listen_backlog).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("breakwater-proxy: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The admin tables: a configuration saved to disk wins over the TOML (as in ProxySQL).
    let admin_db = match admin::tables::AdminDb::open(&proxy, &proxy.rt.cfg.admin.db_file, initial) {
        Ok((db, from_disk)) => {
            if !from_disk.is_empty() {
                for m in from_disk.iter().copied() {
                    if let Err(e) = db.load_to_runtime(&proxy, m) {
                        eprintln!("breakwater-proxy: saved {} in {} cannot be used: {e}", m.table(), proxy.rt.cfg.admin.db_file);
                        return ExitCode::from(2);
                    }
                }
                let tables: Vec<&str> = from_disk.iter().map(|m| m.table()).collect();
                tracing::warn!(db = %proxy.rt.cfg.admin.db_file, ?tables, "these tables come from the admin db file (SAVE ... TO DISK), not the TOML; --initial ignores it");
            }
            db
        }
        Err(e) => {
            eprintln!("breakwater-proxy: admin tables: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = watch::channel(false);
    match breakwater_proxy::access::Access::open(proxy.runtime(), proxy.telemetry.log_sender()) {
        Ok(Some(a)) => {
            tracing::info!(audit = %a.audit.path(), "temporary access enabled");
            a.spawn(rx.clone());
            let _ = proxy.access.set(a);
        }
        Ok(None) => tracing::info!("temporary access disabled: it needs [admin] db_file (or --admin-db) as its store"),
        Err(e) => {
            eprintln!("breakwater-proxy: temporary access: {e}");
            return ExitCode::FAILURE;
        }
    }
    let span_rx = proxy.telemetry_rx.lock().ok().and_then(|mut r| r.take());
    breakwater_proxy::telemetry::spawn(&proxy, span_rx, rx.clone());
    backend::monitor::spawn(proxy.runtime(), monitor_cfg.clone(), rx.clone());
    breakwater_proxy::frontend::intercept::spawn_query_reaper(proxy.clone(), rx.clone());
    let failover = proxy.rt.cfg.failover.enabled.then(|| failover::spawn(proxy.clone(), &monitor_cfg, rx.clone()));
    let admin_listen = proxy.rt.cfg.admin.listen.clone();
    if !admin_listen.is_empty() {
        match tokio::net::TcpListener::bind(&admin_listen).await {
            Ok(l) => {
                tracing::info!(listen = %admin_listen, "admin interface listening (/topology, /api/failover, /metrics)");
                let token = match admin::http::token(&proxy.rt.cfg.admin, config_file.as_deref()) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("breakwater-proxy: admin token: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let a = std::sync::Arc::new(admin::http::Admin { proxy: proxy.clone(), failover: failover.clone(), token });
                tokio::spawn(admin::http::run(l, a, rx.clone()));
            }
            Err(e) => {
                eprintln!("breakwater-proxy: cannot listen on admin address {admin_listen}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let grpc_listen = proxy.rt.cfg.signals.otlp_grpc_listen.clone();
    if !grpc_listen.is_empty() {
        match tokio::net::TcpListener::bind(&grpc_listen).await {
            Ok(l) => {
                tracing::info!(listen = %grpc_listen, "OTLP/gRPC metrics receiver listening (the agents' signals)");
                tokio::spawn(admin::otlp_receiver::grpc(l, proxy.clone(), rx.clone()));
            }
            Err(e) => {
                eprintln!("breakwater-proxy: cannot listen on OTLP/gRPC address {grpc_listen}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    tokio::spawn(breakwater_proxy::adaptive::view::sample_shares(proxy.clone()));
    let mysql_admin = proxy.rt.cfg.admin.mysql_listen.clone();
    if !mysql_admin.is_empty() {
        match tokio::net::TcpListener::bind(&mysql_admin).await {
            Ok(l) => {
                tracing::info!(listen = %mysql_admin, "MySQL admin interface listening (mysql_servers, mysql_query_rules, stats_mysql_query_digest, ...)");
                if proxy.rt.cfg.admin.username == "admin" && proxy.rt.cfg.admin.password == "admin" {
                    // mysql_listen is loopback only (checked with the config); still, any local
                    // process knows these.
                    tracing::warn!(listen = %mysql_admin, "the MySQL admin interface uses the default admin/admin: set [admin] username and password");
                }
                let a = admin::mysql::AdminSql::new(proxy.clone(), failover.clone(), admin_db);
                tokio::spawn(admin::mysql::run(l, a, rx.clone()));
            }
            Err(e) => {
                eprintln!("breakwater-proxy: cannot listen on admin MySQL address {mysql_admin}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    tracing::info!(%listen, "breakwater-proxy listening");
    listener::run(proxy, listener, rx).await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The admin interface to talk to (`--admin`, else `[admin] listen`) and the token to send
/// (see `admin::client::cli_token`).
fn admin_addr(config: Option<&std::path::Path>, admin: Option<String>) -> Result<(String, Option<String>), String> {
    let cfg = match Config::load(config) {
        Ok(c) => Some(c),
        Err(e) if admin.is_none() => return Err(e.to_string()),
        Err(_) => None,
    };
    let token = admin::client::cli_token(cfg.as_ref().map(|c| &c.admin));
    let addr = match (admin, &cfg) {
        (Some(a), _) => a,
        (None, Some(c)) if !c.admin.listen.is_empty() => c.admin.listen.clone(),
        _ => "127.0.0.1:6070".into(),
    };
    Ok((addr, token))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.:*".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// One admin HTTP call from the command line: (status, parsed body).
fn admin_call(admin: &str, token: Option<&str>, method: &str, path: &str) -> Result<(u16, serde_json::Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (code, body) = rt.block_on(admin::client::call(admin, method, path, token, std::time::Duration::from_secs(120)))?;
    Ok((code, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))))
}

fn access_cli(config: Option<&std::path::Path>, admin: Option<String>, action: &AccessCmd) -> ExitCode {
    let (admin, token) = match admin_addr(config, admin) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let by = whoami();
    let (method, path, output) = match action {
        AccessCmd::Grant { user, ttl, role, schema, reason, output } => (
            "POST",
            format!(
                "/api/access/grant?user={}&ttl={}&role={}&reason={}&by={}{}",
                enc(user),
                enc(ttl),
                enc(role),
                enc(reason),
                enc(&by),
                schema.as_ref().map(|s| format!("&schema={}", enc(s))).unwrap_or_default()
            ),
            output.as_str(),
        ),
        AccessCmd::List { output } => ("GET", "/api/access".to_string(), output.as_str()),
        AccessCmd::Revoke { user } => ("POST", format!("/api/access/revoke?user={}&by={}", enc(user), enc(&by)), "text"),
        AccessCmd::Extend { user, ttl } => ("POST", format!("/api/access/extend?user={}&ttl={}&by={}", enc(user), enc(ttl), enc(&by)), "text"),
    };
    let (code, v) = match admin_call(&admin, token.as_deref(), method, &path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    if code != 200 {
        eprintln!("breakwater-proxy: {}", v["error"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        return ExitCode::FAILURE;
    }
    match (action, output) {
        (_, "json") => println!("{v}"),
        (AccessCmd::Grant { .. }, _) => {
            println!("user:       {}", v["user"].as_str().unwrap_or(""));
            println!("password:   {}   (shown once; not stored)", v["password"].as_str().unwrap_or(""));
            println!("role:       {} on {}", v["role"].as_str().unwrap_or(""), v["schema"].as_str().unwrap_or(""));
            println!("expires at: {}", v["expires_at"].as_str().unwrap_or(""));
        }
        (AccessCmd::List { .. }, _) => {
            println!("{:<4} {:<16} {:<10} {:<8} {:<10} {:<25} {:<25} {:<12} reason", "id", "user", "role", "schema", "state", "granted_at", "expires_at", "by");
            for g in v.as_array().into_iter().flatten() {
                let t = |k: &str| g[k].as_u64().map(|s| breakwater_proxy::failover::controller::rfc3339(s * 1000)).unwrap_or_default();
                println!(
                    "{:<4} {:<16} {:<10} {:<8} {:<10} {:<25} {:<25} {:<12} {}",
                    g["id"],
                    g["username"].as_str().unwrap_or(""),
                    g["role"].as_str().unwrap_or(""),
                    g["schema"].as_str().unwrap_or(""),
                    g["state"].as_str().unwrap_or(""),
                    t("granted_at"),
                    t("expires_at"),
                    g["granted_by"].as_str().unwrap_or(""),
                    g["reason"].as_str().unwrap_or("")
                );
            }
        }
        _ => println!("{}", v["message"].as_str().unwrap_or("")),
    }
    ExitCode::SUCCESS
}

fn failover_cli(config: Option<&std::path::Path>, admin: Option<String>, action: &FailoverCmd) -> ExitCode {
    let (admin, token) = match admin_addr(config, admin) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let (method, path) = match action {
        FailoverCmd::Status { .. } => ("GET", "/api/failover".to_string()),
        FailoverCmd::Switchover { to } => ("POST", format!("/api/failover/switchover{}", to.as_ref().map(|t| format!("?to={}", enc(t))).unwrap_or_default())),
        FailoverCmd::Failover { to } => ("POST", format!("/api/failover/failover{}", to.as_ref().map(|t| format!("?to={}", enc(t))).unwrap_or_default())),
        FailoverCmd::Ack { by } => ("POST", format!("/api/failover/ack?by={}", enc(by))),
        FailoverCmd::Rejoin { addr } => ("POST", format!("/api/failover/rejoin?addr={}", enc(addr))),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(admin::client::call(&admin, method, &path, token.as_deref(), std::time::Duration::from_secs(120)));
    let (code, body) = match res {
        Ok(x) => x,
        Err(e) => {
            eprintln!("breakwater-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body.clone()));
    match action {
        FailoverCmd::Status { json: false } if code == 200 => print!("{}", admin::client::format_status(&json)),
        FailoverCmd::Status { .. } => println!("{body}"),
        _ if code == 200 => println!("{}", json["message"].as_str().unwrap_or(&body)),
        _ => eprintln!("breakwater-proxy: {}", json["error"].as_str().unwrap_or(&body)),
    }
    if code == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
