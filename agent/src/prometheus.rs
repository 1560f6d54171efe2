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
        let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", p.lifetimes);
        let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_sum{{{labels}}} {:.6}", p.conn_seconds_sum);
        let _ = writeln!(o, "breakwater_agent_connection_duration_seconds_count{{{labels}}} {}", p.lifetimes);
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
    family(&mut o, "breakwater_agent_requests_in_flight", "gauge", "Requests being served now: arrived, not yet answered.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_requests_in_flight{{{base},server_port=\"{port}\"}} {}", p.in_flight);
    }
    family(&mut o, "breakwater_agent_connections_encrypted", "gauge", "Open connections that negotiated TLS: their bytes count, their requests cannot be seen.");
    for (port, p) in &stats.ports {
        let _ = writeln!(o, "breakwater_agent_connections_encrypted{{{base},server_port=\"{port}\"}} {}", p.encrypted);
    }
    render_load(&mut o, &base, stats);
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

/// The servers' cgroup load (see `load`): CPU time and throttling, memory, pressure.
fn render_load(o: &mut String, base: &str, stats: &Stats) {
    use crate::load::{KINDS, RESOURCES};
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(o, "breakwater_agent_server_cgroup_info", "gauge", "The cgroup (v2) the server on a port runs in (1).");
    for (port, l) in &stats.load {
        let _ = writeln!(o, "breakwater_agent_server_cgroup_info{{{base},server_port=\"{port}\",cgroup=\"{}\"}} 1", l.cgroup);
    }
    family(o, "breakwater_agent_server_cpu_seconds_total", "counter", "CPU time used by the server's cgroup (cpu.stat usage_usec).");
    for (port, l) in &stats.load {
        let _ = writeln!(o, "breakwater_agent_server_cpu_seconds_total{{{base},server_port=\"{port}\"}} {:.6}", l.cpu_seconds);
    }
    family(o, "breakwater_agent_server_cpu_throttled_seconds_total", "counter", "Time the server's cgroup was throttled by its CPU limit (cpu.stat throttled_usec).");
    for (port, l) in &stats.load {
        let _ = writeln!(o, "breakwater_agent_server_cpu_throttled_seconds_total{{{base},server_port=\"{port}\"}} {:.6}", l.throttled_seconds);
    }
    family(o, "breakwater_agent_server_cpu_throttled_periods_total", "counter", "CPU periods in which the server's cgroup was throttled (cpu.stat nr_throttled).");
    for (port, l) in &stats.load {
        let _ = writeln!(o, "breakwater_agent_server_cpu_throttled_periods_total{{{base},server_port=\"{port}\"}} {}", l.throttled_periods);
    }
    family(o, "breakwater_agent_server_memory_bytes", "gauge", "Memory charged to the server's cgroup (memory.current).");
    for (port, l) in &stats.load {
        if let Some(m) = l.memory_bytes {
            let _ = writeln!(o, "breakwater_agent_server_memory_bytes{{{base},server_port=\"{port}\"}} {m}");
        }
    }
    family(o, "breakwater_agent_server_memory_limit_bytes", "gauge", "The memory limit of the server's cgroup (memory.max), where it has one.");
    for (port, l) in &stats.load {
        if let Some(m) = l.memory_limit_bytes {
            let _ = writeln!(o, "breakwater_agent_server_memory_limit_bytes{{{base},server_port=\"{port}\"}} {m}");
        }
    }
    family(o, "breakwater_agent_server_cpu_limit_cores", "gauge", "The CPU limit of the server's cgroup in cores (cpu.max), where it has one.");
    for (port, l) in &stats.load {
        if let Some(c) = l.cpu_limit_cores {
            let _ = writeln!(o, "breakwater_agent_server_cpu_limit_cores{{{base},server_port=\"{port}\"}} {c:.3}");
        }
    }
    family(o, "breakwater_agent_server_pressure_ratio", "gauge", "Share of the last 10 s in which the server's tasks stalled on a resource (PSI avg10, 0..1).");
    for (port, l) in &stats.load {
        for (i, r) in RESOURCES.iter().enumerate() {
            for (j, k) in KINDS.iter().enumerate() {
                if let Some(p) = l.pressure[i][j] {
                    let _ = writeln!(o, "breakwater_agent_server_pressure_ratio{{{base},server_port=\"{port}\",resource=\"{r}\",kind=\"{k}\"}} {:.4}", p.avg10);
                }
            }
        }
    }
    family(o, "breakwater_agent_server_pressure_stalled_seconds_total", "counter", "Time the server's tasks stalled on a resource (PSI total).");
    for (port, l) in &stats.load {
        for (i, r) in RESOURCES.iter().enumerate() {
            for (j, k) in KINDS.iter().enumerate() {
                if let Some(p) = l.pressure[i][j] {
                    let _ = writeln!(o, "breakwater_agent_server_pressure_stalled_seconds_total{{{base},server_port=\"{port}\",resource=\"{r}\",kind=\"{k}\"}} {:.6}", p.total_seconds);
                }
            }
        }
    }
}
