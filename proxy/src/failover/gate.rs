//! Load-aware promotion (the adaptive loop's part 2): can a replica carry the write load the
//! primary carried just before it failed? Judged from each server's recent samples, taken
//! every poll by the controller ([`Sample`]): the proxy's own view (statements, latency,
//! in-flight against the concurrency limit, shedding), the agent's server-side signals when
//! a fresh series feeds the server (CPU used and its cgroup limit, CPU throttling, PSI
//! pressure, memory and its limit, server-side p99, connections), and replication lag.
//!
//! Pure functions over recorded series, no I/O: the controller feeds them, the unit tests
//! feed recorded series. Every verdict carries its numbers, so the event log says why each
//! candidate was fit or not.
//!
//! The rules (thresholds in `[failover.gate]`):
//! - CPU capacity: a CPU limit below what the primary used for this load × `cpu_headroom`;
//! - CPU throttling already, as a replica, above `max_throttled_ratio` of the time;
//! - CPU, memory or IO pressure (PSI some avg10) above `max_pressure`;
//! - memory: a limit below what the primary used, or usage above `max_memory_ratio` of it;
//! - latency: slower than `max_latency_ratio` × the primary's before its failure (and more
//!   than `min_latency_ms`, so sub-millisecond noise decides nothing);
//! - saturation: statements shed by its concurrency limit, or in flight at the limit in most
//!   samples;
//! - replication: lag above `max_lag_seconds`, or growing by more than `max_lag_growth_s`
//!   over the window, or falling behind: its backlog (the primary's GTIDs it has not
//!   applied, at the same polls) grew in most polls of the window, by more than
//!   1 - `min_apply_ratio` of the primary's commit rate (it applies slower than the primary
//!   wrote; a one-off jump, a network blip caught up right after, is not that).
//!
//! A signal that is not there (no agent, no limit) decides nothing; the verdict says what
//! it was judged on.

use serde::{Deserialize, Serialize};

/// One poll's look at one server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    /// Statements the proxy ran there per second since the previous sample.
    pub statements_per_s: f64,
    /// The proxy's latency estimate (peak-EWMA, ms) and statements in flight.
    pub latency_ms: f64,
    pub in_flight: u64,
    /// The adaptive concurrency limit in force (None: limiter off).
    pub limit: Option<u64>,
    /// Statements shed by the limit since the previous sample.
    pub shed: u64,
    /// Seconds_Behind_Master (replicas).
    pub lag_s: Option<i64>,
    /// Transactions committed (the primary's gtid_binlog_pos) or applied (a replica's
    /// gtid_slave_pos), as the sum of their GTID sequence numbers: its deltas are rates.
    pub trx: Option<u64>,
    /// The agent's fresh signals, when a fresh series feeds the server.
    pub agent: Option<AgentSample>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentSample {
    pub cpu_cores: f64,
    pub cpu_limit: Option<f64>,
    pub throttled_ratio: f64,
    /// PSI some avg10 of the cgroup: cpu, memory, io.
    pub pressure: [Option<f64>; 3],
    pub memory_bytes: Option<u64>,
    pub memory_limit: Option<u64>,
    pub p99_ms: Option<f64>,
    pub requests_per_s: f64,
    pub connections: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// The window (ms) before the failure over which the primary's load and the candidates'
    /// signals are taken.
    pub window_ms: u64,
    pub cpu_headroom: f64,
    pub max_throttled_ratio: f64,
    pub max_pressure: f64,
    pub max_memory_ratio: f64,
    pub max_latency_ratio: f64,
    pub min_latency_ms: f64,
    pub max_lag_seconds: i64,
    pub max_lag_growth_s: i64,
    pub min_apply_ratio: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            window_ms: 10_000,
            cpu_headroom: 1.0,
            max_throttled_ratio: 0.25,
            max_pressure: 0.30,
            max_memory_ratio: 0.90,
            max_latency_ratio: 4.0,
            min_latency_ms: 5.0,
            max_lag_seconds: 30,
            max_lag_growth_s: 5,
            min_apply_ratio: 0.8,
        }
    }
}

/// The load the primary carried over the window before it failed.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct PrimaryLoad {
    pub samples: usize,
    pub statements_per_s: f64,
    pub latency_ms: f64,
    pub peak_in_flight: u64,
    /// From the agent: CPU cores used, memory, server-side p99, connections.
    pub cpu_cores: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub p99_ms: Option<f64>,
    pub connections: Option<u64>,
    /// PSI some avg10 (cpu, memory, io), the window's mean.
    pub pressure: [Option<f64>; 3],
    /// Transactions committed per second (GTIDs), and the primary's GTID sum per poll.
    pub commits_per_s: Option<f64>,
    #[serde(skip)]
    pub trx: Vec<(u64, u64)>,
}

impl std::fmt::Display for PrimaryLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} statements/s, {:.1} ms, up to {} in flight", self.statements_per_s, self.latency_ms, self.peak_in_flight)?;
        if let Some(c) = self.cpu_cores {
            write!(f, ", {c:.2} CPU cores")?;
        }
        if let Some(m) = self.memory_bytes {
            write!(f, ", {} MiB memory", m >> 20)?;
        }
        if let Some(c) = self.connections {
            write!(f, ", {c} connections")?;
        }
        write!(f, " (over {} samples)", self.samples)
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut n, mut s) = (0usize, 0.0);
    for x in xs {
        n += 1;
        s += x;
    }
    (n > 0).then(|| s / n as f64)
}

/// The primary's load from its samples before the failure. Samples after the failure (no
/// statements, the server gone) are the caller's to leave out.
pub fn primary_load(samples: &[Sample]) -> PrimaryLoad {
    let agent: Vec<&AgentSample> = samples.iter().filter_map(|s| s.agent.as_ref()).collect();
    PrimaryLoad {
        samples: samples.len(),
        statements_per_s: mean(samples.iter().map(|s| s.statements_per_s)).unwrap_or(0.0),
        latency_ms: mean(samples.iter().filter(|s| s.statements_per_s > 0.0).map(|s| s.latency_ms)).unwrap_or(0.0),
        peak_in_flight: samples.iter().map(|s| s.in_flight).max().unwrap_or(0),
        cpu_cores: mean(agent.iter().map(|a| a.cpu_cores)),
        memory_bytes: agent.iter().filter_map(|a| a.memory_bytes).max(),
        p99_ms: mean(agent.iter().filter_map(|a| a.p99_ms)),
        connections: agent.iter().map(|a| a.connections).max(),
        pressure: [0, 1, 2].map(|i| mean(agent.iter().filter_map(|a| a.pressure[i]))),
        commits_per_s: trx_rate(samples),
        trx: samples.iter().filter_map(|s| s.trx.map(|t| (s.at_ms, t))).collect(),
    }
}

/// Transactions per second over the samples (at least 2 s apart), from their GTID sums.
pub fn trx_rate(samples: &[Sample]) -> Option<f64> {
    let mut with = samples.iter().filter_map(|s| s.trx.map(|t| (s.at_ms, t)));
    let first = with.next()?;
    let last = with.last()?;
    let ms = last.0.checked_sub(first.0).filter(|ms| *ms >= 2000)?;
    Some(last.1.saturating_sub(first.1) as f64 * 1000.0 / ms as f64)
}

/// A replica's backlog against the primary at the polls both were sampled in: (polls in
/// which it grew, intervals, its growth per second over them). None with fewer than four.
pub fn backlog_growth(primary: &[(u64, u64)], cand: &[Sample]) -> Option<(usize, usize, f64)> {
    let backlog: Vec<(u64, i64)> = cand
        .iter()
        .filter_map(|s| {
            let p = primary.iter().find(|(at, _)| *at == s.at_ms)?.1;
            Some((s.at_ms, p as i64 - s.trx? as i64))
        })
        .collect();
    if backlog.len() < 5 {
        return None;
    }
    let grew = backlog.windows(2).filter(|w| w[1].1 > w[0].1).count();
    let (first, last) = (backlog[0], backlog[backlog.len() - 1]);
    let secs = (last.0.saturating_sub(first.0)) as f64 / 1000.0;
    (secs > 0.0).then(|| (grew, backlog.len() - 1, (last.1 - first.1) as f64 / secs))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    pub addr: String,
    pub fit: bool,
    /// Why it is unfit (empty when fit).
    pub reasons: Vec<String>,
    /// What it was judged on, with the numbers.
    pub basis: String,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.fit {
            write!(f, "{}: fit ({})", self.addr, self.basis)
        } else {
            write!(f, "{}: unfit: {} ({})", self.addr, self.reasons.join("; "), self.basis)
        }
    }
}

/// Can the replica whose recent samples are `cand` carry `primary`'s load?
pub fn judge(addr: &str, cand: &[Sample], primary: &PrimaryLoad, cfg: &GateConfig) -> Verdict {
    let mut reasons = Vec::new();
    let mut basis = Vec::new();
    let agent: Vec<&AgentSample> = cand.iter().filter_map(|s| s.agent.as_ref()).collect();
    if cand.is_empty() {
        basis.push("no samples yet".to_string());
    }
    if agent.is_empty() {
        basis.push("no agent signals: the proxy's view and replication only".into());
    } else {
        let cores = mean(agent.iter().map(|a| a.cpu_cores)).unwrap_or(0.0);
        let limit = agent.iter().rev().find_map(|a| a.cpu_limit);
        basis.push(match limit {
            Some(l) => format!("CPU {cores:.2} of {l:.2} cores"),
            None => format!("CPU {cores:.2} cores, no limit"),
        });
        if let (Some(l), Some(need)) = (limit, primary.cpu_cores) {
            let need = need * cfg.cpu_headroom;
            if l < need {
                reasons.push(format!("CPU limit {l:.2} cores is below the {need:.2} cores the primary used for this load"));
            }
        }
        let throttled = mean(agent.iter().map(|a| a.throttled_ratio)).unwrap_or(0.0);
        if throttled > cfg.max_throttled_ratio {
            reasons.push(format!(
                "throttled by its CPU limit {:.0}% of the time already as a replica (most {:.0}%)",
                throttled * 100.0,
                cfg.max_throttled_ratio * 100.0
            ));
        }
        for (i, name) in ["CPU", "memory", "IO"].iter().enumerate() {
            if let Some(p) = mean(agent.iter().filter_map(|a| a.pressure[i])) {
                if p > cfg.max_pressure {
                    reasons.push(format!("{name} pressure {:.0}% (most {:.0}%)", p * 100.0, cfg.max_pressure * 100.0));
                }
            }
        }
        let mem = agent.iter().rev().find_map(|a| a.memory_bytes);
        let mem_limit = agent.iter().rev().find_map(|a| a.memory_limit);
        if let Some(l) = mem_limit {
            basis.push(format!("memory {} of {} MiB", mem.unwrap_or(0) >> 20, l >> 20));
            if let Some(need) = primary.memory_bytes.filter(|n| *n > l) {
                reasons.push(format!("memory limit {} MiB is below the {} MiB the primary used", l >> 20, need >> 20));
            } else if let Some(m) = mem.filter(|m| *m as f64 > l as f64 * cfg.max_memory_ratio) {
                reasons.push(format!(
                    "memory {} MiB is {:.0}% of its limit {} MiB (most {:.0}%)",
                    m >> 20,
                    m as f64 * 100.0 / l as f64,
                    l >> 20,
                    cfg.max_memory_ratio * 100.0
                ));
            }
        }
        if let (Some(p99), Some(base)) = (mean(agent.iter().filter_map(|a| a.p99_ms)), primary.p99_ms) {
            basis.push(format!("server p99 {p99:.1} ms (primary {base:.1} ms)"));
        }
    }
    // The proxy's view: latency where it served statements, shedding, saturation.
    let served: Vec<&Sample> = cand.iter().filter(|s| s.statements_per_s > 0.0).collect();
    if let Some(lat) = mean(served.iter().map(|s| s.latency_ms)) {
        basis.push(format!("proxy latency {lat:.1} ms (primary {:.1} ms)", primary.latency_ms));
        let limit = (primary.latency_ms * cfg.max_latency_ratio).max(cfg.min_latency_ms);
        if lat > limit {
            reasons.push(format!("{lat:.1} ms per statement as a replica, over {limit:.1} ms ({:.0}× the primary's {:.1} ms)", cfg.max_latency_ratio, primary.latency_ms));
        }
    }
    let shed: u64 = cand.iter().map(|s| s.shed).sum();
    if shed > 0 {
        reasons.push(format!("its concurrency limit shed {shed} statements in the window"));
    }
    let at_limit = cand.iter().filter(|s| s.limit.is_some_and(|l| s.in_flight >= l)).count();
    if !cand.is_empty() && at_limit * 2 > cand.len() {
        reasons.push(format!("in flight at its concurrency limit in {at_limit} of {} samples", cand.len()));
    }
    if let (Some(c), Some((grew, n, per_s))) = (primary.commits_per_s.filter(|c| *c >= 5.0), backlog_growth(&primary.trx, cand)) {
        basis.push(format!("backlog {per_s:+.0} transactions/s (primary {c:.0} commits/s)"));
        if grew * 10 >= n * 8 && per_s > c * (1.0 - cfg.min_apply_ratio) {
            reasons.push(format!(
                "falls behind: its backlog grew in {grew} of {n} polls, by {per_s:.0} transactions/s while the primary committed {c:.0}/s \
                 (it applied less than {:.0}% of them)",
                cfg.min_apply_ratio * 100.0
            ));
        }
    }
    let lags: Vec<i64> = cand.iter().filter_map(|s| s.lag_s).collect();
    if let Some(last) = lags.last() {
        basis.push(format!("lag {last} s"));
        if *last > cfg.max_lag_seconds {
            reasons.push(format!("replication lag {last} s (most {} s)", cfg.max_lag_seconds));
        }
        let first = lags.first().copied().unwrap_or(*last);
        if last - first > cfg.max_lag_growth_s {
            reasons.push(format!("lag grew {first} s -> {last} s over the window: it applies slower than the primary wrote"));
        }
    }
    Verdict { addr: addr.into(), fit: reasons.is_empty(), reasons, basis: basis.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded series: `n` samples a second apart built by `f(i)`.
    fn series(n: usize, f: impl Fn(usize) -> Sample) -> Vec<Sample> {
        (0..n).map(|i| Sample { at_ms: i as u64 * 1000, ..f(i) }).collect()
    }

    fn agent(cores: f64, limit: Option<f64>, throttled: f64) -> Option<AgentSample> {
        Some(AgentSample { cpu_cores: cores, cpu_limit: limit, throttled_ratio: throttled, pressure: [Some(0.01), Some(0.0), Some(0.0)], connections: 40, ..Default::default() })
    }

    /// The seed's scenario, as recorded in the lab: the primary under a write load, a
    /// healthy replica, and a replica with a 0.2-core CPU limit that is throttled serving
    /// its share of reads and applying the primary's writes.
    fn primary() -> PrimaryLoad {
        primary_load(&series(10, |i| Sample {
            statements_per_s: 900.0 + i as f64,
            latency_ms: 1.2,
            in_flight: 6,
            limit: Some(64),
            agent: Some(AgentSample { cpu_cores: 0.62, memory_bytes: Some(310 << 20), connections: 48, p99_ms: Some(2.5), ..agent(0.62, None, 0.0).unwrap() }),
            ..Default::default()
        }))
    }

    #[test]
    fn the_primary_load_is_the_window_mean() {
        let p = primary();
        assert_eq!(p.samples, 10);
        assert!((p.statements_per_s - 904.5).abs() < 1e-9);
        assert_eq!(p.cpu_cores, Some(0.62));
        assert_eq!(p.memory_bytes, Some(310 << 20));
        assert_eq!(p.peak_in_flight, 6);
        assert_eq!(p.connections, Some(48));
    }

    #[test]
    fn a_healthy_replica_is_fit() {
        let s = series(10, |_| Sample { statements_per_s: 400.0, latency_ms: 0.6, in_flight: 3, limit: Some(64), lag_s: Some(0), agent: agent(0.3, None, 0.0), ..Default::default() });
        let v = judge("b:3309", &s, &primary(), &GateConfig::default());
        assert!(v.fit, "{v}");
        assert!(v.basis.contains("CPU 0.30 cores, no limit"), "{v}");
    }

    #[test]
    fn a_cpu_limited_throttled_replica_is_unfit_with_its_numbers() {
        let s = series(10, |_| Sample {
            statements_per_s: 120.0,
            latency_ms: 9.0,
            in_flight: 4,
            limit: Some(64),
            lag_s: Some(0),
            agent: Some(AgentSample { memory_bytes: Some(200 << 20), memory_limit: Some(240 << 20), ..agent(0.19, Some(0.2), 0.6).unwrap() }),
            ..Default::default()
        });
        let v = judge("a:3308", &s, &primary(), &GateConfig::default());
        assert!(!v.fit);
        let all = v.reasons.join(" | ");
        assert!(all.contains("CPU limit 0.20 cores is below the 0.62 cores"), "{all}");
        assert!(all.contains("throttled by its CPU limit 60%"), "{all}");
        assert!(all.contains("memory limit 240 MiB is below the 310 MiB"), "{all}");
        assert!(all.contains("9.0 ms per statement"), "{all}");
        assert!(v.to_string().starts_with("a:3308: unfit: "), "{v}");
    }

    #[test]
    fn pressure_memory_and_saturation_each_decide() {
        let cfg = GateConfig::default();
        let p = PrimaryLoad { latency_ms: 1.0, ..Default::default() };
        let base = |a: AgentSample| series(5, move |_| Sample { statements_per_s: 10.0, latency_ms: 1.0, agent: Some(a.clone()), ..Default::default() });
        let v = judge("x", &base(AgentSample { pressure: [Some(0.5), None, None], ..Default::default() }), &p, &cfg);
        assert!(v.reasons.iter().any(|r| r.starts_with("CPU pressure 50%")), "{v}");
        let v = judge("x", &base(AgentSample { pressure: [None, None, Some(0.4)], ..Default::default() }), &p, &cfg);
        assert!(v.reasons.iter().any(|r| r.starts_with("IO pressure 40%")), "{v}");
        let v = judge("x", &base(AgentSample { memory_bytes: Some(95 << 20), memory_limit: Some(100 << 20), ..Default::default() }), &p, &cfg);
        assert!(v.reasons.iter().any(|r| r.contains("95% of its limit")), "{v}");
        // Shed statements, or in flight at the limit most of the time.
        let s = series(4, |i| Sample { statements_per_s: 10.0, latency_ms: 1.0, in_flight: 8, limit: Some(8), shed: (i == 2) as u64, ..Default::default() });
        let v = judge("x", &s, &p, &cfg);
        assert!(v.reasons.iter().any(|r| r.contains("shed 1 statements")) && v.reasons.iter().any(|r| r.contains("at its concurrency limit in 4 of 4")), "{v}");
    }

    #[test]
    fn lag_and_falling_behind_are_unfit_without_an_agent() {
        let cfg = GateConfig::default();
        let p = PrimaryLoad { latency_ms: 1.0, ..Default::default() };
        let growing = series(10, |i| Sample { lag_s: Some(i as i64 * 2), ..Default::default() });
        let v = judge("x", &growing, &p, &cfg);
        assert!(!v.fit && v.reasons.iter().any(|r| r.contains("lag grew 0 s -> 18 s")), "{v}");
        assert!(v.basis.contains("no agent signals"), "{v}");
        let far = series(3, |_| Sample { lag_s: Some(45), ..Default::default() });
        assert!(judge("x", &far, &p, &cfg).reasons.iter().any(|r| r.contains("replication lag 45 s")));
        // Sub-millisecond noise decides nothing: 0.9 ms against a 0.1 ms primary is fit.
        let fast = series(3, |_| Sample { statements_per_s: 5.0, latency_ms: 0.9, ..Default::default() });
        assert!(judge("x", &fast, &PrimaryLoad { latency_ms: 0.1, ..Default::default() }, &cfg).fit);
        // No samples at all: nothing to hold against it.
        assert!(judge("x", &[], &p, &cfg).fit);
        // Applying 300 of the primary's 500 transactions/s: it falls behind, whatever its lag says.
        let primary = series(10, |i| Sample { trx: Some(10_000 + i as u64 * 500), ..Default::default() });
        let p = primary_load(&primary);
        assert_eq!(p.commits_per_s, Some(500.0));
        let slow = series(10, |i| Sample { lag_s: Some(0), trx: Some(9_000 + i as u64 * 300), ..Default::default() });
        let v = judge("x", &slow, &p, &cfg);
        assert!(v.reasons.iter().any(|r| r.contains("falls behind: its backlog grew in 9 of 9 polls, by 200 transactions/s")), "{v}");
        // Keeping up: the backlog goes up and down.
        let keeps_up = series(10, |i| Sample { trx: Some(9_000 + i as u64 * 500 - (i as u64 % 2) * 150), ..Default::default() });
        assert!(judge("x", &keeps_up, &p, &cfg).fit, "{}", judge("x", &keeps_up, &p, &cfg));
        // A replica whose IO thread stopped for the last two seconds (a blip): still fit.
        let blip = series(10, |i| Sample { trx: Some(9_000 + i.min(7) as u64 * 500), ..Default::default() });
        assert!(judge("x", &blip, &p, &cfg).fit, "{}", judge("x", &blip, &p, &cfg));
    }
}
