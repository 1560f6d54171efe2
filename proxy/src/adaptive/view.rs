//! One health and load view per backend server: the agent's server-side signals (when a fresh
//! series feeds it) joined with what the proxy sees itself. Read by the admin SQL table
//! `stats_breakwater_backends`, `/metrics`, `/api/backends` and the topology page.

use crate::runtime::Proxy;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendRow {
    pub hostgroup: u32,
    pub srv_host: String,
    pub srv_port: u16,
    pub status: &'static str,
    /// "agent+proxy" while a fresh agent series feeds the server, else "proxy".
    pub signal_source: &'static str,
    /// The agent (its host.name) whose series matched, fresh or not.
    pub agent: Option<String>,
    pub agent_age_ms: Option<u64>,
    pub server_latency_p99_ms: Option<f64>,
    pub server_latency_mean_ms: Option<f64>,
    pub server_requests_per_s: Option<f64>,
    pub server_in_flight: Option<u64>,
    pub server_connections: Option<u64>,
    pub cpu_pressure: Option<f64>,
    pub cpu_throttled_ratio: Option<f64>,
    pub proxy_latency_ms: f64,
    pub in_flight: u64,
    /// The adaptive concurrency limit (None with `[proxy] adaptive_limit = false`).
    pub concurrency_limit: Option<u64>,
    /// Statements waiting for the concurrency limit plus clients waiting for a connection.
    pub queued: u64,
    pub shed_total: u64,
    /// Out of adaptive reader choice after an error burst (outlier ejection), and how often.
    pub ejected: bool,
    pub ejections_total: u64,
    /// Share of its hostgroup's statements over the last few seconds (0..1).
    pub read_share: f64,
}

/// The agent series that feeds server `s` (see `signals` for the rule), and whether it is fresh.
fn agent_series(proxy: &Proxy, s: &crate::backend::server::Server, max_age: Duration) -> Option<(crate::adaptive::signals::Series, bool)> {
    agent_series_of(proxy, &s.cfg.host, s.cfg.port, max_age)
}

/// The same for a server known by host and port (the failover controller's members).
pub fn agent_series_of(proxy: &Proxy, host: &str, port: u16, max_age: Duration) -> Option<(crate::adaptive::signals::Series, bool)> {
    let cfg = &proxy.rt.cfg.signals;
    let name = if cfg.agent_hosts.is_empty() { None } else { cfg.agent_hosts.get(&format!("{host}:{port}")).map(String::as_str) };
    proxy.signals.for_server(host, port, name, max_age)
}

/// Every routed server entry, in hostgroup order.
pub fn backends(proxy: &Proxy) -> Vec<BackendRow> {
    let rt = proxy.runtime();
    let max_age = Duration::from_millis(rt.cfg.signals.max_age_ms);
    let now = Instant::now();
    let routing = rt.routing();
    let mut ids: Vec<u32> = routing.hostgroups.keys().copied().collect();
    ids.sort_unstable();
    let mut rows = Vec::new();
    for id in ids {
        let Some(hg) = routing.hostgroups.get(&id) else { continue };
        for s in &hg.servers {
            let load = &s.pool.load;
            let found = agent_series(proxy, s, max_age);
            let fresh = found.as_ref().is_some_and(|(_, f)| *f);
            let live = found.as_ref().filter(|(_, f)| *f).map(|(x, _)| x);
            rows.push(BackendRow {
                hostgroup: id,
                srv_host: s.cfg.host.clone(),
                srv_port: s.cfg.port,
                status: s.status().as_str(),
                signal_source: if fresh { "agent+proxy" } else { "proxy" },
                agent: found.as_ref().map(|(x, _)| x.agent.clone()),
                agent_age_ms: found.as_ref().map(|(x, _)| now.saturating_duration_since(x.received).as_millis() as u64),
                server_latency_p99_ms: live.and_then(|x| x.recent.p99_ms),
                server_latency_mean_ms: live.and_then(|x| x.recent.mean_ms),
                server_requests_per_s: live.map(|x| x.recent.requests_per_s),
                server_in_flight: live.map(|x| x.in_flight),
                server_connections: live.map(|x| x.active),
                cpu_pressure: live.and_then(|x| x.pressure[0]),
                cpu_throttled_ratio: live.map(|x| x.recent.throttled_ratio),
                proxy_latency_ms: load.latency_ms(),
                in_flight: load.in_flight.load(Ordering::Relaxed),
                concurrency_limit: rt.cfg.proxy.adaptive_limit.then(|| load.limit()),
                queued: s.pool.waiting() as u64 + load.waiting.load(Ordering::Relaxed),
                shed_total: load.shed.load(Ordering::Relaxed),
                ejected: load.is_ejected(),
                ejections_total: load.ejections.load(Ordering::Relaxed),
                read_share: load.share(),
            });
        }
    }
    rows
}

/// Once a second: each server's penalty from its agent's fresh signals, and its share of its
/// hostgroup's statements over the last 5 s.
pub async fn sample_shares(proxy: std::sync::Arc<Proxy>) {
    use std::collections::HashMap;
    const WINDOW: usize = 5;
    let mut history: HashMap<String, std::collections::VecDeque<u64>> = HashMap::new();
    let mut fed: HashMap<String, bool> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let rt = proxy.runtime();
        let routing = rt.routing();
        let max_age = Duration::from_millis(rt.cfg.signals.max_age_ms);
        for s in routing.hostgroups.values().flat_map(|h| h.servers.iter()) {
            let series = agent_series(&proxy, s, max_age);
            let (throttled, pressure) = match &series {
                Some((x, true)) => (x.recent.throttled_ratio, x.pressure[0].unwrap_or(0.0)),
                _ => (0.0, 0.0),
            };
            s.pool.load.set_penalty(throttled, pressure);
            // Say when a server's signal source changes (an agent starts or stops feeding it).
            let fresh = matches!(series, Some((_, true)));
            if fed.insert(s.addr.to_string(), fresh) != Some(fresh) && (fresh || series.is_some()) {
                match &series {
                    Some((x, true)) => tracing::info!(server = %s.addr, agent = %x.agent, "agent signals feed this server (signal_source agent+proxy)"),
                    Some((x, false)) => tracing::warn!(
                        server = %s.addr,
                        agent = %x.agent,
                        age_ms = x.received.elapsed().as_millis() as u64,
                        "agent signals are stale: the proxy's own observations only (signal_source proxy)"
                    ),
                    None => {}
                }
            }
        }
        for hg in routing.hostgroups.values() {
            let mut deltas = Vec::with_capacity(hg.servers.len());
            for s in &hg.servers {
                let h = history.entry(format!("{}/{}", hg.id, s.addr)).or_default();
                h.push_back(s.pool.load.statements.load(Ordering::Relaxed));
                if h.len() > WINDOW + 1 {
                    h.pop_front();
                }
                let d = match (h.front(), h.back()) {
                    (Some(a), Some(b)) => b.saturating_sub(*a),
                    _ => 0,
                };
                deltas.push(d);
            }
            let total: u64 = deltas.iter().sum();
            for (s, d) in hg.servers.iter().zip(deltas) {
                s.pool.load.set_share(if total == 0 { 0.0 } else { d as f64 / total as f64 });
            }
        }
    }
}
