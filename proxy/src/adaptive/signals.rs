//! The agents' signals, as the proxy receives them over OTLP (HTTP `POST /v1/metrics` on the
//! admin listener, or gRPC on `[signals] otlp_grpc_listen`): per agent and MySQL port, the
//! server-side request latency (histogram deltas between two reports), requests in flight,
//! connections, errors, retransmits and the server's cgroup load.
//!
//! Matching a series to a backend server (documented in the README):
//! 1. `[signals.agent_hosts]` names the agent (its resource `host.name`) for a server
//!    "host:port", where the names differ; the series' `server.port` must equal the port.
//! 2. Otherwise a series feeds the server whose port equals its `server.port` and whose host
//!    is the agent's `host.name`, or the address the agent sent from (no collector in
//!    between), loopback matching loopback.
//!
//! A series is fresh while it is younger than three of its own export intervals (bounded by
//! `[signals] max_age_ms`); an older one is ignored and the proxy falls back to what it sees
//! itself. Nothing in a payload can panic or block the proxy: bad payloads are refused with
//! an error the receiver turns into a 400, and are counted.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, NumberDataPoint};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most series kept (agents × ports); beyond it new ones are refused.
const MAX_SERIES: usize = 4096;

/// Cumulative values of one report (what deltas are taken from).
#[derive(Debug, Clone, Default)]
struct Cumulative {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    errors: u64,
    retransmits: u64,
    cpu_seconds: f64,
    throttled_seconds: f64,
    /// The agent's own time of the report (the points' time_unix_nano): rates are taken over
    /// the agent's interval, not the receiving times (two reports can arrive close together).
    at_ns: u64,
}

/// What the last two reports of one series say about the recent past.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Recent {
    /// Server-side latency of the requests between the two reports.
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    pub requests_per_s: f64,
    pub errors_per_s: f64,
    pub retransmits_per_s: f64,
    /// CPU cores used, and the share of time throttled by a CPU limit.
    pub cpu_cores: f64,
    pub throttled_ratio: f64,
}

/// One agent's view of one MySQL port.
#[derive(Debug, Clone)]
pub struct Series {
    pub agent: String,
    pub peer: IpAddr,
    pub port: u16,
    pub received: Instant,
    /// Between the last two reports.
    pub interval: Option<Duration>,
    pub active: u64,
    pub in_flight: u64,
    /// PSI "some" avg10 (0..1) of the server's cgroup: cpu, memory, io.
    pub pressure: [Option<f64>; 3],
    /// Memory charged to the server's cgroup, and its limits (None: none, or not reported).
    pub memory_bytes: Option<u64>,
    pub memory_limit: Option<u64>,
    /// CPU limit in cores.
    pub cpu_limit: Option<f64>,
    pub recent: Recent,
    /// The report the rates are taken from, and when it came.
    last: Cumulative,
    last_received: Instant,
}

impl Series {
    /// Fresh: younger than three of its export intervals, and than `max_age`.
    pub fn is_fresh(&self, now: Instant, max_age: Duration) -> bool {
        let limit = self.interval.map(|i| (i * 3).max(Duration::from_secs(1)).min(max_age)).unwrap_or(max_age);
        now.saturating_duration_since(self.received) <= limit
    }
}

#[derive(Default)]
pub struct Signals {
    series: Mutex<HashMap<(String, u16), Series>>,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
}

fn attr<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    kvs.iter().find(|k| k.key == key).and_then(|k| k.value.as_ref()).and_then(|v| v.value.as_ref())
}

fn attr_str(kvs: &[KeyValue], key: &str) -> Option<String> {
    match attr(kvs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr_port(kvs: &[KeyValue]) -> Option<u16> {
    match attr(kvs, "server.port")? {
        any_value::Value::IntValue(i) => u16::try_from(*i).ok(),
        any_value::Value::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

fn number(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        Some(number_data_point::Value::AsDouble(d)) if d.is_finite() => d,
        _ => 0.0,
    }
}

/// One report's values for one port.
#[derive(Default)]
struct Report {
    cum: Cumulative,
    active: u64,
    in_flight: u64,
    pressure: [Option<f64>; 3],
    memory_bytes: Option<u64>,
    memory_limit: Option<u64>,
    cpu_limit: Option<f64>,
}

/// The `q` quantile (0..1) of a histogram with explicit bounds (bucket i counts
/// (bounds[i-1], bounds[i]]; the last one, above every bound, is taken at the last bound),
/// interpolated linearly inside its bucket.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || counts.len() != bounds.len() + 1 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0);
    let mut seen = 0.0;
    for (i, c) in counts.iter().enumerate() {
        let next = seen + *c as f64;
        if next >= rank && *c > 0 {
            let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
            let Some(hi) = bounds.get(i) else { return bounds.last().copied() };
            return Some(lo + (hi - lo) * ((rank - seen) / *c as f64));
        }
        seen = next;
    }
    bounds.last().copied()
}

impl Signals {
    /// Take one OTLP metrics request from `peer`. Returns the number of (agent, port) series
    /// it updated; an error (a 400 for the sender) when it holds nothing usable.
    pub fn ingest(&self, req: &ExportMetricsServiceRequest, peer: IpAddr) -> Result<usize, String> {
        let now = Instant::now();
        let mut updated = 0;
        let mut saw_agent = false;
        for rm in &req.resource_metrics {
            let res = rm.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]);
            if attr_str(res, "service.name").as_deref() != Some("breakwater-agent") {
                continue; // another service's metrics: not for routing
            }
            saw_agent = true;
            let agent = attr_str(res, "host.name").unwrap_or_else(|| peer.to_string());
            let mut ports: BTreeMap<u16, Report> = BTreeMap::new();
            for m in rm.scope_metrics.iter().flat_map(|s| s.metrics.iter()) {
                Self::metric(m, &mut ports)?;
            }
            let mut series = self.series.lock().map_err(|_| "internal error".to_string())?;
            for (port, r) in ports {
                let key = (agent.clone(), port);
                if !series.contains_key(&key) && series.len() >= MAX_SERIES {
                    return Err(format!("too many agent series (most {MAX_SERIES})"));
                }
                let prev = series.get(&key).cloned();
                let s = Series {
                    agent: agent.clone(),
                    peer,
                    port,
                    received: now,
                    interval: prev.as_ref().map(|p| now.saturating_duration_since(p.received)),
                    active: r.active,
                    in_flight: r.in_flight,
                    pressure: r.pressure,
                    memory_bytes: r.memory_bytes,
                    memory_limit: r.memory_limit,
                    cpu_limit: r.cpu_limit,
                    // Rates over at least RATE_SPAN: with reports closer together, counters the
                    // agent refreshes less often (its cgroup reads) alias into 0 and 2x.
                    recent: match &prev {
                        Some(p) if span(&p.last, &r.cum, now.saturating_duration_since(p.last_received)) >= RATE_SPAN => {
                            recent(&p.last, &r.cum, now.saturating_duration_since(p.last_received)).unwrap_or_else(|| p.recent.clone())
                        }
                        Some(p) => p.recent.clone(),
                        None => Recent::default(),
                    },
                    last: match &prev {
                        Some(p) if span(&p.last, &r.cum, now.saturating_duration_since(p.last_received)) < RATE_SPAN && p.last.count <= r.cum.count => p.last.clone(),
                        _ => r.cum.clone(),
                    },
                    last_received: match &prev {
                        Some(p) if span(&p.last, &r.cum, now.saturating_duration_since(p.last_received)) < RATE_SPAN && p.last.count <= r.cum.count => p.last_received,
                        _ => now,
                    },
                };
                series.insert(key, s);
                updated += 1;
            }
        }
        if !saw_agent {
            return Err("no breakwater-agent resource in the request (service.name)".into());
        }
        Ok(updated)
    }

    fn metric(m: &opentelemetry_proto::tonic::metrics::v1::Metric, ports: &mut BTreeMap<u16, Report>) -> Result<(), String> {
        let Some(data) = &m.data else { return Ok(()) };
        match (m.name.as_str(), data) {
            ("breakwater.agent.request.duration", metric::Data::Histogram(h)) => {
                for p in &h.data_points {
                    let Some(port) = attr_port(&p.attributes) else { continue };
                    if p.bucket_counts.len() != p.explicit_bounds.len() + 1 || p.explicit_bounds.len() > 256 {
                        return Err(format!("{}: bucket counts do not match the bounds", m.name));
                    }
                    let c = &mut ports.entry(port).or_default().cum;
                    if c.bounds.is_empty() {
                        c.bounds = p.explicit_bounds.clone();
                        c.counts = vec![0; p.bucket_counts.len()];
                    }
                    if c.bounds != p.explicit_bounds {
                        continue; // operations with other bounds: not summed
                    }
                    for (a, b) in c.counts.iter_mut().zip(&p.bucket_counts) {
                        *a = a.saturating_add(*b);
                    }
                    c.count = c.count.saturating_add(p.count);
                    c.at_ns = c.at_ns.max(p.time_unix_nano);
                    c.sum += p.sum.filter(|s| s.is_finite()).unwrap_or(0.0);
                }
            }
            (name, metric::Data::Sum(s)) => {
                for p in &s.data_points {
                    let Some(port) = attr_port(&p.attributes) else { continue };
                    let v = number(p);
                    let r = ports.entry(port).or_default();
                    r.cum.at_ns = r.cum.at_ns.max(p.time_unix_nano);
                    match name {
                        "breakwater.agent.request.errors" => r.cum.errors = r.cum.errors.saturating_add(v as u64),
                        "breakwater.agent.tcp.retransmits" => r.cum.retransmits = v as u64,
                        "breakwater.agent.connections.active" => r.active = v as u64,
                        "breakwater.agent.requests.in_flight" => r.in_flight = v as u64,
                        "breakwater.agent.server.cpu.time" => r.cum.cpu_seconds = v,
                        "breakwater.agent.server.cpu.throttled_time" => r.cum.throttled_seconds = v,
                        _ => {}
                    }
                }
            }
            ("breakwater.agent.server.memory.usage" | "breakwater.agent.server.memory.limit" | "breakwater.agent.server.cpu.limit", metric::Data::Gauge(g)) => {
                for p in &g.data_points {
                    let Some(port) = attr_port(&p.attributes) else { continue };
                    let v = number(p).max(0.0);
                    let r = ports.entry(port).or_default();
                    match m.name.as_str() {
                        "breakwater.agent.server.memory.usage" => r.memory_bytes = Some(v as u64),
                        "breakwater.agent.server.memory.limit" => r.memory_limit = Some(v as u64),
                        _ => r.cpu_limit = (v > 0.0).then_some(v),
                    }
                }
            }
            ("breakwater.agent.server.pressure", metric::Data::Gauge(g)) => {
                for p in &g.data_points {
                    let Some(port) = attr_port(&p.attributes) else { continue };
                    if attr_str(&p.attributes, "pressure.kind").as_deref() != Some("some") {
                        continue;
                    }
                    let i = match attr_str(&p.attributes, "pressure.resource").as_deref() {
                        Some("cpu") => 0,
                        Some("memory") => 1,
                        Some("io") => 2,
                        _ => continue,
                    };
                    ports.entry(port).or_default().pressure[i] = Some(number(p).clamp(0.0, 1.0));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The fresh series that feeds server `host:port` (see the module's matching rule), or
    /// the stale one with its age when there is no fresh one.
    pub fn for_server(&self, host: &str, port: u16, agent_host: Option<&str>, max_age: Duration) -> Option<(Series, bool)> {
        let now = Instant::now();
        let series = self.series.lock().ok()?;
        let host_ip: Option<IpAddr> = match host {
            "localhost" => Some(IpAddr::from([127, 0, 0, 1])),
            h => h.parse().ok(),
        };
        let matches = |s: &Series| {
            s.port == port
                && match agent_host {
                    Some(a) => s.agent == a,
                    None => {
                        s.agent == host
                            || host_ip.is_some_and(|ip| ip == s.peer || (ip.is_loopback() && s.peer.is_loopback()))
                    }
                }
        };
        series
            .values()
            .filter(|s| matches(s))
            .max_by_key(|s| s.received)
            .map(|s| (s.clone(), s.is_fresh(now, max_age)))
    }

    /// Every series (for the admin view of what was received).
    pub fn all(&self) -> Vec<Series> {
        self.series.lock().map(|s| s.values().cloned().collect()).unwrap_or_default()
    }
}

/// Rates are taken over at least this long.
const RATE_SPAN: Duration = Duration::from_millis(950);

/// The time between two reports: the agent's own clock when both carry it, else the
/// receiving times `dt` apart.
fn span(prev: &Cumulative, now: &Cumulative, dt: Duration) -> Duration {
    if prev.at_ns > 0 && now.at_ns > prev.at_ns {
        Duration::from_nanos(now.at_ns - prev.at_ns)
    } else {
        dt
    }
}

/// The recent past between two cumulative reports `dt` apart; None when the agent restarted
/// (a counter went down) or no time passed.
fn recent(prev: &Cumulative, now: &Cumulative, dt: Duration) -> Option<Recent> {
    let secs = span(prev, now, dt).as_secs_f64();
    if secs <= 0.0 || now.count < prev.count || now.errors < prev.errors {
        return None;
    }
    let mut r = Recent { requests_per_s: (now.count - prev.count) as f64 / secs, ..Default::default() };
    r.errors_per_s = (now.errors - prev.errors) as f64 / secs;
    r.retransmits_per_s = now.retransmits.saturating_sub(prev.retransmits) as f64 / secs;
    r.cpu_cores = (now.cpu_seconds - prev.cpu_seconds).max(0.0) / secs;
    r.throttled_ratio = ((now.throttled_seconds - prev.throttled_seconds).max(0.0) / secs).min(1.0);
    if now.bounds == prev.bounds && now.count > prev.count {
        let delta: Vec<u64> = now.counts.iter().zip(&prev.counts).map(|(a, b)| a.saturating_sub(*b)).collect();
        r.p99_ms = quantile(&now.bounds, &delta, 0.99).map(|s| s * 1e3);
        r.mean_ms = Some((now.sum - prev.sum).max(0.0) / (now.count - prev.count) as f64 * 1e3);
    } else if prev.bounds.is_empty() && now.count > 0 {
        r.p99_ms = quantile(&now.bounds, &now.counts, 0.99).map(|s| s * 1e3);
        r.mean_ms = Some(now.sum / now.count as f64 * 1e3);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let bounds = [0.001, 0.01, 0.1];
        // 90 requests in (0, 1 ms], 10 in (10, 100 ms].
        assert_eq!(quantile(&bounds, &[90, 0, 10, 0], 0.5), Some(0.001 * (50.0 / 90.0)));
        let p99 = quantile(&bounds, &[90, 0, 10, 0], 0.99).unwrap();
        assert!((p99 - (0.01 + 0.09 * 0.9)).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 5], 0.99), Some(0.1), "above every bound: the last bound");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.99), None);
        assert_eq!(quantile(&bounds, &[1, 2], 0.99), None, "malformed");
    }

    #[test]
    fn recent_is_the_delta_and_survives_agent_restarts() {
        let a = Cumulative { bounds: vec![0.001, 0.01], counts: vec![100, 0, 0], count: 100, sum: 0.05, ..Default::default() };
        let b = Cumulative { bounds: vec![0.001, 0.01], counts: vec![100, 50, 0], count: 150, sum: 0.3, errors: 0, ..Default::default() };
        let r = recent(&a, &b, Duration::from_secs(1)).unwrap();
        assert_eq!(r.requests_per_s, 50.0);
        assert!(r.p99_ms.unwrap() > 1.0, "only the 50 slow ones count: {:?}", r.p99_ms);
        assert!((r.mean_ms.unwrap() - 5.0).abs() < 1e-9);
        assert!(recent(&b, &a, Duration::from_secs(1)).is_none(), "counters went down: the agent restarted");
    }
}
