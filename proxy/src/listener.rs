//! The accept loop: a hard limit on client connections (error 1040 beyond it), one task per
//! client, and a graceful drain on shutdown.

use crate::frontend::session;
use crate::protocol::{codec, errcode, packet::PacketWriter};
use crate::runtime::Proxy;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

/// Bind the client listener with a deep accept queue: with the default (128) a burst of
/// connects overflows it, Linux drops the handshake's last ACK, and clients whose SYN-ACK
/// retries run out stay "connected" forever waiting for a greeting.
pub async fn bind(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        match sock.bind(a).and_then(|_| sock.listen(backlog)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr} resolves to no address"))))
}

pub async fn run(proxy: Arc<Proxy>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let rt = proxy.runtime();
    let max = rt.cfg.proxy.max_client_connections;
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let conn_id = proxy.next_conn_id();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                proxy.stats.client_connections.fetch_add(1, Ordering::Relaxed);
                let proxy = proxy.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    session::serve(proxy, stream, conn_id, shutdown).await;
                    drop(permit);
                });
            }
            Err(_) => {
                proxy.stats.client_connections_refused.fetch_add(1, Ordering::Relaxed);
                warn!(%peer, max, "too many client connections");
                tokio::spawn(async move {
                    let (_r, w) = stream.into_split();
                    let mut wr = PacketWriter::new(w);
                    wr.push(0, &codec::err_packet(errcode::CON_COUNT, "08004", "Too many connections"));
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.flush()).await;
                    wr.shutdown().await;
                });
            }
        }
    }
    drop(listener);
    // Drain: sessions finish the command they are running, then close.
    let drain = Duration::from_millis(rt.cfg.proxy.shutdown_drain_ms);
    let busy = max - slots.available_permits();
    info!(sessions = busy, drain_ms = drain.as_millis() as u64, "listener closed; draining sessions");
    let all = slots.clone().acquire_many_owned(max as u32);
    match tokio::time::timeout(drain, all).await {
        Ok(_) => info!("all sessions finished"),
        Err(_) => warn!(remaining = max - slots.available_permits(), "drain timeout; closing remaining sessions"),
    }
}
