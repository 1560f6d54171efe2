//! breakwater-agent: traces MySQL server sockets on this host in the kernel (eBPF) and
//! exports connections, request latency by operation, bytes and errors as Prometheus metrics.

mod btf;
mod classify;
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
    /// MySQL ports to watch on this host.
    #[arg(long, value_delimiter = ',', default_value = "3306")]
    ports: Vec<u16>,
    /// Prometheus /metrics listener.
    #[arg(long, default_value = "127.0.0.1:9435")]
    prometheus_listen: String,
    /// Print a live table every interval (for a person on the host).
    #[arg(long)]
    print: bool,
    /// Interval of --print, in ms.
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// OTLP/gRPC collector endpoint, e.g. http://127.0.0.1:4317 (repeatable).
    #[arg(long)]
    otlp_endpoint: Vec<String>,
    /// OTLP/HTTP (protobuf) metrics URL, e.g. http://127.0.0.1:4318/v1/metrics (repeatable).
    #[arg(long)]
    otlp_http_endpoint: Vec<String>,
    /// OTLP export interval, in ms.
    #[arg(long, default_value_t = 10000)]
    export_interval_ms: u64,
    /// Do not load eBPF programs: count connections by polling /proc/net/tcp (also used
    /// automatically when the programs cannot be loaded).
    #[arg(long)]
    procfs_only: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "info".into()))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("breakwater-agent: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("breakwater-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("must run as root (loading eBPF programs needs CAP_BPF and CAP_PERFMON)");
    }
    let mut loaded = if cli.procfs_only {
        None
    } else {
        match loader::load(&cli.ports) {
            Ok(l) => Some(l),
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
    {
        let stats = stats.clone();
        let host = host.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            let d = drops.as_ref().map(loader::read_drops).unwrap_or([0, 0]);
            match stats.lock() {
                Ok(s) => prometheus::render(&s, &d, &host),
                Err(_) => String::new(),
            }
        });
        tokio::spawn(prometheus::serve(listener, render));
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
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let d = drops.as_ref().map(loader::read_drops).unwrap_or([0, 0]);
                let req = match stats.lock() {
                    Ok(s) => otlp::build_request(&s, &d, &host, start, otlp::now_ns()),
                    Err(_) => continue,
                };
                for t in &targets {
                    let res = match t {
                        otlp::Target::Grpc(e) => otlp::send_grpc(e, req.clone()).await,
                        otlp::Target::Http(e) => otlp::send_http(e, req.clone()).await,
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
                ms(o.hist.value_at_quantile(0.5)),
                ms(o.hist.value_at_quantile(0.99)),
                ms(o.hist.max())
            );
        }
    }
}
