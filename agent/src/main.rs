//! breakwater-agent: traces MySQL server sockets on this host in the kernel (eBPF) and
//! exports connections, request latency by operation, bytes and errors as Prometheus metrics.

mod btf;
mod cgroup;
mod load;
mod loader;
mod otlp;
mod procfs;
mod prometheus;
mod stats;

use clap::Parser;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "breakwater-agent", version, about)]
struct Cli {
    /// TOML configuration file; flags override its settings.
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
    /// MySQL ports to watch on this host (default 3306).
    #[arg(long, value_delimiter = ',')]
    ports: Option<Vec<u16>>,
    /// Prometheus /metrics listener (default 127.0.0.1:9435).
    #[arg(long)]
    prometheus_listen: Option<String>,
    /// Print a live table every interval (for a person on the host).
    #[arg(long)]
    print: bool,
    /// Interval of --print, in ms (default 2000).
    #[arg(long)]
    interval_ms: Option<u64>,
    /// OTLP/gRPC collector endpoint, e.g. http://127.0.0.1:4317 (repeatable).
    #[arg(long)]
    otlp_endpoint: Vec<String>,
    /// OTLP/HTTP (protobuf) metrics URL, e.g. http://127.0.0.1:4318/v1/metrics (repeatable).
    #[arg(long)]
    otlp_http_endpoint: Vec<String>,
    /// OTLP export interval, in ms (default 10000).
    #[arg(long)]
    export_interval_ms: Option<u64>,
    /// Bearer token sent with every OTLP export (the proxy's `[signals] token`); also from
    /// the environment variable BREAKWATER_AGENT_OTLP_TOKEN.
    #[arg(long, env = "BREAKWATER_AGENT_OTLP_TOKEN", hide_env_values = true)]
    otlp_token: Option<String>,
    /// Most connections traced at once (the kernel's connection map; default 65536). Beyond
    /// it, new connections are not traced and are counted as drops.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Do not load eBPF programs: count connections by polling /proc/net/tcp (also used
    /// automatically when the programs cannot be loaded).
    #[arg(long)]
    procfs_only: bool,
    /// Hooks that see the servers' bytes: auto (cgroup where it attaches, else tracepoints),
    /// cgroup (cgroup_skb on the servers' cgroups) or tracepoints (sock_recv_length /
    /// sock_send_length).
    #[arg(long, value_enum)]
    hooks: Option<loader::Hooks>,
    /// For benchmarks: attach programs that do nothing to the recv/send hooks and serve an
    /// empty /metrics, to measure the kernel's cost of running any program there.
    #[arg(long, hide = true)]
    calibrate_noop: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// The agent's TOML configuration (every key optional).
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    ports: Option<Vec<u16>>,
    prometheus_listen: Option<String>,
    print: Option<bool>,
    print_interval_ms: Option<u64>,
    otlp_endpoints: Option<Vec<String>>,
    otlp_http_endpoints: Option<Vec<String>>,
    export_interval_ms: Option<u64>,
    /// A file holding the OTLP bearer token (kept out of the configuration itself).
    otlp_token_file: Option<String>,
    max_connections: Option<u32>,
    procfs_only: Option<bool>,
    hooks: Option<loader::Hooks>,
}

/// Effective settings: flags, then the file, then defaults.
#[derive(Debug)]
struct Settings {
    ports: Vec<u16>,
    prometheus_listen: String,
    print: bool,
    interval_ms: u64,
    otlp_endpoint: Vec<String>,
    otlp_http_endpoint: Vec<String>,
    export_interval_ms: u64,
    otlp_token: Option<String>,
    max_connections: u32,
    procfs_only: bool,
    hooks: loader::Hooks,
}

fn settings(cli: Cli) -> anyhow::Result<Settings> {
    let file: FileConfig = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid configuration {}: {e}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let max_connections = cli.max_connections.or(file.max_connections).unwrap_or(65536);
    if !(1..=(1 << 22)).contains(&max_connections) {
        anyhow::bail!("max_connections must be between 1 and {} (got {max_connections})", 1 << 22);
    }
    let or_file = |flag: Vec<String>, file: Option<Vec<String>>| if flag.is_empty() { file.unwrap_or_default() } else { flag };
    let otlp_token = match (cli.otlp_token.filter(|t| !t.is_empty()), &file.otlp_token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => {
            let t = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("cannot read otlp_token_file {f}: {e}"))?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }
        (None, None) => None,
    };
    if otlp_token.as_ref().is_some_and(|t| t.contains(['\r', '\n'])) {
        anyhow::bail!("the OTLP token must be one line");
    }
    Ok(Settings {
        ports: cli.ports.or(file.ports).unwrap_or_else(|| vec![3306]),
        prometheus_listen: cli.prometheus_listen.or(file.prometheus_listen).unwrap_or_else(|| "127.0.0.1:9435".into()),
        print: cli.print || file.print.unwrap_or(false),
        interval_ms: cli.interval_ms.or(file.print_interval_ms).unwrap_or(2000),
        otlp_endpoint: or_file(cli.otlp_endpoint, file.otlp_endpoints),
        otlp_http_endpoint: or_file(cli.otlp_http_endpoint, file.otlp_http_endpoints),
        export_interval_ms: cli.export_interval_ms.or(file.export_interval_ms).unwrap_or(10_000),
        otlp_token,
        max_connections,
        procfs_only: cli.procfs_only || file.procfs_only.unwrap_or(false),
        hooks: cli.hooks.or(file.hooks).unwrap_or(loader::Hooks::Auto),
    })
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "info".into()))
        .with_target(false)
        // Logs on stderr; stdout is --print's table.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("breakwater-agent: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if cli.calibrate_noop {
        let listen = cli.prometheus_listen.clone().unwrap_or_else(|| "127.0.0.1:9435".into());
        let ports = cli.ports.clone().unwrap_or_else(|| vec![3306]);
        let result = loader::load_noop(&ports, cli.hooks.unwrap_or(loader::Hooks::Auto)).and_then(|(ebpf, hooks)| {
            tracing::info!(hooks, "empty programs attached");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(String::new);
                tokio::select! {
                    _ = prometheus::serve(listener, render) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                drop(ebpf);
                Ok(())
            })
        });
        if let Err(e) = result {
            eprintln!("breakwater-agent: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let result = settings(cli).and_then(|s| rt.block_on(run(s)));
    if let Err(e) = result {
        eprintln!("breakwater-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Settings) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("must run as root (loading eBPF programs needs CAP_BPF and CAP_PERFMON)");
    }
    let mut loaded = if cli.procfs_only {
        None
    } else {
        match loader::load(&cli.ports, cli.max_connections, cli.hooks) {
            Ok(l) => Some(l),
            Err(e) if cli.hooks != loader::Hooks::Auto => return Err(e),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "eBPF unavailable: falling back to polling /proc/net/tcp (connection counts only; no requests, latency, bytes, errors or retransmits)");
                None
            }
        }
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let stats: prometheus::Shared = Arc::new(Mutex::new(stats::Stats::default()));
    let listener = tokio::net::TcpListener::bind(&cli.prometheus_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cli.prometheus_listen))?;
    let drops = loaded.as_ref().map(|l| l.drops.clone());
    let mode = loaded.as_ref().map_or("procfs", |l| l.mode);
    {
        let stats = stats.clone();
        let host = host.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            let d = drops.as_ref().map(loader::read_drops).unwrap_or_default();
            match stats.lock() {
                Ok(s) => prometheus::render(&s, &d, &host, mode),
                Err(_) => String::new(),
            }
        });
        tokio::spawn(prometheus::serve(listener, render));
    }
    {
        // The servers' cgroup load, once a second or once per export if that is more often
        // (a report must not carry the previous read again: its CPU rate would alias into 0
        // and 2x); which cgroup serves a port is looked up again every 30 reads.
        let stats = stats.clone();
        let mut watcher = load::Watcher::new(&cli.ports, 30);
        let every = Duration::from_millis(cli.export_interval_ms.clamp(100, 1000));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let now = tokio::task::block_in_place(|| watcher.read());
                if let Ok(mut s) = stats.lock() {
                    s.load = now;
                }
            }
        });
    }
    if cli.print {
        let stats = stats.clone();
        let every = Duration::from_millis(cli.interval_ms.max(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Ok(s) = stats.lock() {
                    print_table(&s);
                }
            }
        });
    }
    let targets: Vec<otlp::Target> = cli
        .otlp_endpoint
        .iter()
        .map(|e| otlp::Target::Grpc(e.clone()))
        .chain(cli.otlp_http_endpoint.iter().map(|e| otlp::Target::Http(e.clone())))
        .collect();
    if !targets.is_empty() {
        let stats = stats.clone();
        let drops = loaded.as_ref().map(|l| l.drops.clone());
        let host = host.clone();
        let every = Duration::from_millis(cli.export_interval_ms.max(100));
        let start = otlp::now_ns();
        let token = cli.otlp_token.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let d = drops.as_ref().map(loader::read_drops).unwrap_or_default();
                let req = match stats.lock() {
                    Ok(s) => otlp::build_request(&s, &d, &host, start, otlp::now_ns()),
                    Err(_) => continue,
                };
                for t in &targets {
                    let res = match t {
                        otlp::Target::Grpc(e) => otlp::send_grpc(e, req.clone(), token.as_deref()).await,
                        otlp::Target::Http(e) => otlp::send_http(e, req.clone(), token.as_deref()).await,
                    };
                    if let Err(e) = res {
                        tracing::warn!(target = ?t, error = %e, "OTLP export failed");
                    }
                }
            }
        });
    }
    match loaded.as_mut() {
        Some(l) => {
            tracing::info!(ports = ?cli.ports, prometheus = %cli.prometheus_listen, hooks = %l.hooks, "breakwater-agent attached");
            tokio::select! {
                r = loader::pump_events(l, stats.clone()) => r,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
        None => {
            tracing::info!(ports = ?cli.ports, prometheus = %cli.prometheus_listen, "breakwater-agent polling /proc/net/tcp");
            tokio::select! {
                _ = procfs::poll(cli.ports.clone(), stats.clone(), Duration::from_millis(200)) => Ok(()),
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
    }
}

fn print_table(s: &stats::Stats) {
    println!("\n{:<6} {:>7} {:>8} {:>8} {:>8}   {:<18} {:>9} {:>6} {:>9} {:>9} {:>9}", "port", "active", "opened", "closed", "errors", "operation", "requests", "errs", "p50 ms", "p99 ms", "max ms");
    for (port, p) in &s.ports {
        println!("{:<6} {:>7} {:>8} {:>8} {:>8}", port, s.active(*port), p.opened, p.closed, p.errors);
        for ((_, op), o) in s.ops.range((*port, "")..(*port + 1, "")) {
            let ms = |v: u64| v as f64 / 1e6;
            println!(
                "{:<42}   {:<18} {:>9} {:>6} {:>9.3} {:>9.3} {:>9.3}",
                "",
                op,
                o.count,
                o.errors,
                ms(o.quantile_ns(0.5)),
                ms(o.quantile_ns(0.99)),
                ms(o.quantile_ns(1.0))
            );
        }
    }
}
