//! The /metrics endpoint (Prometheus text format), served with a minimal HTTP/1.1 responder.
//! Names follow Prometheus conventions; labels follow OpenTelemetry's semantic conventions
//! (server_port, client_address, db_operation_name, db_system_name="mysql").

use crate::stats::{Stats, BUCKETS, CONN_BUCKETS};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `hooks`: what sees the servers' bytes (cgroup_skb, tracepoints, or procfs when nothing
/// per request is measured).
pub fn render(stats: &Stats, drops: &crate::loader::Drops, host: &str, hooks: &str) -> String {
    let mut o = String::with_capacity(8192);
    let base = format!("db_system_name=\"mysql\",host_name=\"{host}\"");
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(&mut o, "breakwater_agent_hooks_info", "gauge", "The hooks the agent measures with (1): cgroup_skb, tracepoints or procfs.");
    let _ = writeln!(o, "breakwater_agent_hooks_info{{{base},hooks=\"{hooks}\"}} 1");
    family(&mut o, "breakwater_agent_connections_opened_total", "counter", "Connections accepted on a watched MySQL port.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_connections_opened_total{{{base},server_port=\"{port}\"}} {}", p.opened);
    }
    family(&mut o, "breakwater_agent_connections_closed_total", "counter", "Connections closed on a watched MySQL port.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_connections_closed_total{{{base},server_port=\"{port}\"}} {}", p.closed);
    }
    family(&mut o, "breakwater_agent_connections_active", "gauge", "Connections open now (since the agent started).");
    for port in stats.ports.keys() {
        let _ = writeln!(o, "breakwater_agent_connections_active{{{base},server_port=\"{port}\"}} {}", stats.active(*port));
    }
    family(&mut o, "breakwater_agent_connection_duration_seconds", "histogram", "Lifetime of closed connections.");
    for (port, p) in &stats.ports {
        let labels = format!("{base},server_port=\"{port}\"");
        let mut cumulative = 0;
        for (i, b) in CONN_BUCKETS.iter().enumerate() {
            cumulative += p.conn_le[i];
            let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", p.closed);
        let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_sum{{{labels}}} {:.6}", p.conn_seconds_sum);
        let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_count{{{labels}}} {}", p.closed);
    }
    family(&mut o, "breakwater_agent_connection_rtt_seconds", "summary", "Smoothed TCP RTT of connections when they closed.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_connection_rtt_seconds_sum{{{base},server_port=\"{port}\"}} {:.9}", p.rtt_seconds_sum);
        let _ = writeln!(o, "breakwater_agent_connection_rtt_seconds_count{{{base},server_port=\"{port}\"}} {}", p.rtt_count);
    }
    family(&mut o, "breakwater_agent_connection_rtt_max_seconds", "gauge", "Largest smoothed TCP RTT seen at close.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_connection_rtt_max_seconds{{{base},server_port=\"{port}\"}} {:.9}", p.rtt_seconds_max);
    }
    family(&mut o, "breakwater_agent_received_bytes_total", "counter", "Bytes received on watched connections.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_received_bytes_total{{{base},server_port=\"{port}\"}} {}", p.bytes_in);
    }
    family(&mut o, "breakwater_agent_sent_bytes_total", "counter", "Bytes sent on watched connections.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_sent_bytes_total{{{base},server_port=\"{port}\"}} {}", p.bytes_out);
    }
    family(&mut o, "breakwater_agent_tcp_retransmits_total", "counter", "Retransmitted TCP segments on watched connections.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_tcp_retransmits_total{{{base},server_port=\"{port}\"}} {}", p.retransmits);
    }
    family(&mut o, "breakwater_agent_peer_connections_opened_total", "counter", "Connections accepted, per client address.");
    for ((port, ip), p) in &stats.peers {
        let _ = writeln!(o, "breakwater_agent_peer_connections_opened_total{{{base},server_port=\"{port}\",client_address=\"{ip}\"}} {}", p.opened);
    }
    family(&mut o, "breakwater_agent_peer_connections_closed_total", "counter", "Connections closed, per client address.");
    for ((port, ip), p) in &stats.peers {
        let _ = writeln!(o, "breakwater_agent_peer_connections_closed_total{{{base},server_port=\"{port}\",client_address=\"{ip}\"}} {}", p.closed);
    }
    family(&mut o, "breakwater_agent_peer_requests_total", "counter", "Requests answered, per client address.");
    for ((port, ip), p) in &stats.peers {
        let _ = writeln!(o, "breakwater_agent_peer_requests_total{{{base},server_port=\"{port}\",client_address=\"{ip}\"}} {}", p.requests);
    }
    family(&mut o, "breakwater_agent_peer_request_errors_total", "counter", "Requests answered with a MySQL ERR packet, per client address.");
    for ((port, ip), p) in &stats.peers {
        let _ = writeln!(o, "breakwater_agent_peer_request_errors_total{{{base},server_port=\"{port}\",client_address=\"{ip}\"}} {}", p.errors);
    }
    family(&mut o, "breakwater_agent_request_errors_total", "counter", "Requests answered with a MySQL ERR packet.");
    for ((port, op), s) in &stats.ops {
        let _ = writeln!(o, "breakwater_agent_request_errors_total{{{base},server_port=\"{port}\",db_operation_name=\"{op}\"}} {}", s.errors);
    }
    family(&mut o, "breakwater_agent_request_duration_seconds", "histogram", "From a request's arrival to its response's departure.");
    for ((port, op), s) in &stats.ops {
        let labels = format!("{base},server_port=\"{port}\",db_operation_name=\"{op}\"");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "breakwater_agent_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}", s.cumulative(i));
        }
        let _ = writeln!(o, "breakwater_agent_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(o, "breakwater_agent_request_duration_seconds_sum{{{labels}}} {:.9}", s.sum_ns as f64 / 1e9);
        let _ = writeln!(o, "breakwater_agent_request_duration_seconds_count{{{labels}}} {}", s.count);
    }
    family(&mut o, "breakwater_agent_request_duration_quantile_seconds", "gauge", "p50/p95/p99/max of request latency since start.");
    for ((port, op), s) in &stats.ops {
        for (q, v) in [("0.5", s.quantile_ns(0.5)), ("0.95", s.quantile_ns(0.95)), ("0.99", s.quantile_ns(0.99)), ("1", s.quantile_ns(1.0))] {
            let _ = writeln!(o, "breakwater_agent_request_duration_quantile_seconds{{{base},server_port=\"{port}\",db_operation_name=\"{op}\",quantile=\"{q}\"}} {:.9}", v as f64 / 1e9);
        }
    }
    family(&mut o, "breakwater_agent_dropped_events_total", "counter", "Events lost because a fixed-size kernel map was full.");
    for (reason, n) in breakwater_agent_common::DROP_REASONS.iter().zip(drops) {
        let _ = writeln!(o, "breakwater_agent_dropped_events_total{{{base},reason=\"{reason}\"}} {n}");
    }
    o
}

/// Serve GET /metrics until the process ends.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            // Read the request head (up to 8 KiB, 5 s): it may arrive in several segments.
            let mut buf = Vec::with_capacity(1024);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render())
            } else if req.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

pub type Shared = Arc<Mutex<Stats>>;
