//! breakwater-proxy: a MySQL-protocol proxy with capped pools, multiplexing and read/write split.

use breakwater_proxy::config::Config;
use breakwater_proxy::runtime::{Proxy, Runtime};
use breakwater_proxy::{backend, listener};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::watch;

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
    /// Log filter (tracing EnvFilter syntax), e.g. info or breakwater_proxy=debug.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    tokio_rt.block_on(run(rt))
}

async fn run(rt: Runtime) -> ExitCode {
    let listen = rt.cfg.proxy.listen.clone();
    let monitor_cfg = rt.cfg.monitor.clone();
    let servers = rt.servers.clone();
    let proxy = Proxy::new(rt);
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("breakwater-proxy: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = watch::channel(false);
    backend::monitor::spawn(servers, monitor_cfg, rx.clone());
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
