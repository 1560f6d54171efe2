//! Cascading-risk detection: after a promotion, the new primary is watched for the signature
//! that preceded the old one's death. Four signs, each from the samples the controller takes
//! every poll ([`super::gate::Sample`]) against the old primary's load before it failed:
//!
//! - latency rising fast: the proxy's latency over `latency_ratio` × the old primary's (and
//!   over `min_latency_ms`), and higher than two polls before;
//! - in flight pinned at the concurrency limit two polls in a row while the limit stopped
//!   growing (a ramp in progress keeps it at the limit by design), or statements shed;
//! - pressure rising: CPU or memory PSI over `pressure`, over the old primary's by more than
//!   `pressure_margin` (a host that is merely busy stalls the old and the new alike), and not
//!   falling; or memory over `memory_ratio` of the cgroup's limit;
//! - a reconnect storm: the server's connections (the agent's count) over
//!   `reconnect_ratio` × what it should have now (the old primary's plus its own before the
//!   promotion: it keeps serving reads) and still rising.
//!
//! `signs_needed` signs in `polls_needed` polls in a row raise the risk, one of them a sign of
//! degradation (latency rising, or memory: a server at its limit and stalling on CPU while
//! its latency holds is busy, not dying: in the drill on the 2-core lab, the healthy new
//! primary took writes several times faster than the old one and stalled on CPU that way);
//! it clears after
//! `clear_after_s` without any sign. Once raised, in flight at the limit is no longer a sign
//! (the clamp puts it there). A pure state machine: the controller acts on its steps
//! (clamp the limit, shed sheddable traffic, hold promotions until a person acknowledges).

use super::gate::{PrimaryLoad, Sample};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// How long after a promotion the new primary is watched (a raised risk is watched
    /// until it clears).
    pub watch_seconds: u64,
    pub latency_ratio: f64,
    pub min_latency_ms: f64,
    pub pressure: f64,
    pub pressure_margin: f64,
    pub memory_ratio: f64,
    pub reconnect_ratio: f64,
    pub signs_needed: usize,
    pub polls_needed: u32,
    pub clear_after_s: u64,
    /// The new primary's concurrency limit is cut to this share of itself when the risk is
    /// raised, and again every `clamp_every_s` while signs persist.
    pub clamp: f64,
    pub clamp_every_s: u64,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        Self {
            watch_seconds: 300,
            latency_ratio: 4.0,
            min_latency_ms: 20.0,
            pressure: 0.30,
            pressure_margin: 0.15,
            memory_ratio: 0.90,
            reconnect_ratio: 2.0,
            signs_needed: 2,
            polls_needed: 2,
            clear_after_s: 15,
            clamp: 0.5,
            clamp_every_s: 3,
        }
    }
}

/// Which of the four a sign is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignKind {
    Latency,
    Limit,
    Pressure,
    Memory,
    Reconnects,
}

impl SignKind {
    /// A sign that the server is getting worse, not only busy.
    pub fn degrading(self) -> bool {
        matches!(self, SignKind::Latency | SignKind::Memory)
    }
}

/// The signs in the newest samples (oldest first) of the new primary; `expected_conns` is
/// the connection count it should have after taking the old primary's load.
pub fn signs(recent: &[Sample], old: &PrimaryLoad, expected_conns: Option<u64>, cfg: &CascadeConfig) -> Vec<(SignKind, String)> {
    let mut out = Vec::new();
    let Some(last) = recent.last() else { return out };
    let back = |n: usize| recent.len().checked_sub(1 + n).and_then(|i| recent.get(i));
    let lat_limit = (old.latency_ms * cfg.latency_ratio).max(cfg.min_latency_ms);
    if last.latency_ms > lat_limit && back(2).is_some_and(|b| last.latency_ms > b.latency_ms) {
        out.push((SignKind::Latency, format!(
            "latency rising: {:.1} ms (was {:.1} ms two polls before; the old primary's {:.1} ms)",
            last.latency_ms,
            back(2).map(|b| b.latency_ms).unwrap_or(0.0),
            old.latency_ms
        )));
    }
    let at_limit = |s: &Sample| s.limit.is_some_and(|l| s.in_flight >= l);
    if last.shed > 0 {
        out.push((SignKind::Limit, format!("{} statements shed by its concurrency limit {}", last.shed, last.limit.unwrap_or(0))));
    } else if at_limit(last) && back(1).is_some_and(|b| at_limit(b) && b.limit >= last.limit) {
        out.push((SignKind::Limit, format!("in flight pinned at its concurrency limit {}", last.limit.unwrap_or(0))));
    }
    if let Some(a) = &last.agent {
        let prev = back(1).and_then(|b| b.agent.as_ref());
        for (i, name) in [(0, "CPU"), (1, "memory")] {
            let floor = cfg.pressure.max(old.pressure[i].unwrap_or(0.0) + cfg.pressure_margin);
            if let Some(p) = a.pressure[i].filter(|p| *p > floor) {
                if prev.and_then(|b| b.pressure[i]).is_none_or(|q| p >= q) {
                    let kind = if i == 1 { SignKind::Memory } else { SignKind::Pressure };
                    out.push((kind, format!("{name} pressure {:.0}% and rising", p * 100.0)));
                }
            }
        }
        if let (Some(m), Some(l)) = (a.memory_bytes, a.memory_limit) {
            if m as f64 > l as f64 * cfg.memory_ratio {
                out.push((SignKind::Memory, format!("memory {} MiB of its {} MiB limit", m >> 20, l >> 20)));
            }
        }
        if let Some(base) = expected_conns.or(old.connections).filter(|b| *b > 0) {
            let rising = prev.is_none_or(|b| a.connections > b.connections);
            if a.connections as f64 > base as f64 * cfg.reconnect_ratio && rising {
                out.push((SignKind::Reconnects, format!("reconnect storm: {} connections (about {base} expected with the old primary's load)", a.connections)));
            }
        }
    }
    out
}

/// What the controller should do after one poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Quiet,
    /// The risk is raised now, with its signs.
    Raise(Vec<String>),
    /// Still raised; signs seen in this poll (maybe none).
    Persist(Vec<String>),
    /// No sign for `clear_after_s`: the risk is over.
    Clear,
    /// The watch period ended without a risk.
    Done,
}

#[derive(Debug, Clone)]
pub struct Watch {
    pub addr: String,
    pub promoted_ms: u64,
    pub old: PrimaryLoad,
    /// Connections it should have with the old primary's load (see `signs`).
    pub expected_conns: Option<u64>,
    pub raised_ms: Option<u64>,
    strikes: u32,
    last_sign_ms: u64,
}

impl Watch {
    pub fn new(addr: &str, promoted_ms: u64, old: PrimaryLoad, own_conns: Option<u64>) -> Self {
        let expected_conns = match (old.connections, own_conns) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        Self { addr: addr.into(), promoted_ms, old, expected_conns, raised_ms: None, strikes: 0, last_sign_ms: promoted_ms }
    }

    /// One poll: the new primary's samples since its promotion (oldest first).
    pub fn step(&mut self, now_ms: u64, recent: &[Sample], cfg: &CascadeConfig) -> Step {
        let mut found = signs(recent, &self.old, self.expected_conns, cfg);
        if self.raised_ms.is_some() {
            found.retain(|(k, _)| *k != SignKind::Limit); // the clamp itself keeps it at the limit
        }
        let degrading = found.iter().any(|(k, _)| k.degrading());
        let s: Vec<String> = found.into_iter().map(|(_, t)| t).collect();
        if !s.is_empty() {
            self.last_sign_ms = now_ms;
        }
        if self.raised_ms.is_some() {
            if s.is_empty() && now_ms.saturating_sub(self.last_sign_ms) >= cfg.clear_after_s * 1000 {
                self.raised_ms = None;
                self.strikes = 0;
                return Step::Clear;
            }
            return Step::Persist(s);
        }
        if s.len() >= cfg.signs_needed.max(1) && degrading {
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
        if self.strikes >= cfg.polls_needed.max(1) {
            self.raised_ms = Some(now_ms);
            return Step::Raise(s);
        }
        if now_ms.saturating_sub(self.promoted_ms) >= cfg.watch_seconds * 1000 {
            return Step::Done;
        }
        Step::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::gate::AgentSample;

    fn old() -> PrimaryLoad {
        PrimaryLoad { samples: 10, statements_per_s: 900.0, latency_ms: 2.0, peak_in_flight: 8, connections: Some(40), ..Default::default() }
    }

    fn sample(lat: f64, in_flight: u64, limit: u64, cpu_p: f64, conns: u64) -> Sample {
        Sample {
            statements_per_s: 300.0,
            latency_ms: lat,
            in_flight,
            limit: Some(limit),
            agent: Some(AgentSample { pressure: [Some(cpu_p), Some(0.0), Some(0.0)], connections: conns, ..Default::default() }),
            ..Default::default()
        }
    }

    /// A recorded series of a promoted replica going the way the old primary went: latency
    /// climbing, in flight pinned at the limit, CPU pressure rising, connections piling up.
    fn dying() -> Vec<Sample> {
        vec![
            sample(3.0, 4, 16, 0.05, 40),
            sample(8.0, 12, 16, 0.20, 55),
            sample(30.0, 16, 16, 0.45, 90),
            sample(80.0, 16, 16, 0.70, 140),
            sample(200.0, 16, 16, 0.85, 210),
        ]
    }

    #[test]
    fn the_dying_primary_shows_every_sign() {
        let s: Vec<String> = signs(&dying(), &old(), None, &CascadeConfig::default()).into_iter().map(|x| x.1).collect();
        assert_eq!(s.len(), 4, "{s:?}");
        assert!(s[0].starts_with("latency rising: 200.0 ms"), "{s:?}");
        assert!(s[1].contains("pinned at its concurrency limit 16"), "{s:?}");
        assert!(s[2].starts_with("CPU pressure 85%"), "{s:?}");
        assert!(s[3].contains("210 connections (about 40 expected"), "{s:?}");
        // A new primary that keeps its readers' connections is expected to have more.
        let s = signs(&dying(), &old(), Some(120), &CascadeConfig::default());
        assert!(!s.iter().any(|x| x.0 == SignKind::Reconnects), "{s:?}");
    }

    #[test]
    fn raised_after_two_bad_polls_then_cleared_when_quiet() {
        let cfg = CascadeConfig::default();
        let mut w = Watch::new("b:3309", 0, old(), None);
        let d = dying();
        let mut steps = Vec::new();
        for i in 1..=d.len() {
            steps.push(w.step(i as u64 * 1000, &d[..i], &cfg));
        }
        // Polls 1-2: too few signs; poll 3: latency, limit and pressure (one strike); 4: raised.
        assert_eq!(steps[..3], [Step::Quiet, Step::Quiet, Step::Quiet], "{steps:?}");
        assert!(matches!(&steps[3], Step::Raise(s) if s.len() >= 2), "{steps:?}");
        assert!(matches!(&steps[4], Step::Persist(s) if !s.is_empty()));
        // Healthy again (in flight at the clamped limit does not keep it raised): persists
        // until clear_after_s without a sign.
        let calm = vec![sample(2.0, 16, 16, 0.01, 40); 3];
        assert_eq!(w.step(10_000, &calm, &cfg), Step::Persist(vec![]));
        assert_eq!(w.step(5_000 + 15_000, &calm, &cfg), Step::Clear);
    }

    #[test]
    fn a_busy_host_and_a_stalled_ramp_alone_raise_nothing() {
        // The old primary stalled on CPU as much (a busy host): no pressure sign.
        let cfg = CascadeConfig::default();
        let busy = PrimaryLoad { pressure: [Some(0.45), None, None], ..old() };
        let s = signs(&[sample(2.0, 4, 16, 0.5, 40), sample(2.0, 4, 16, 0.5, 40)], &busy, None, &cfg);
        assert!(s.is_empty(), "{s:?}");
        // Pinned at a stalled limit with CPU pressure, latency holding: busy, not dying.
        let mut w = Watch::new("b:3309", 0, old(), None);
        let busy_new = vec![sample(2.0, 8, 8, 0.65, 40); 3];
        assert_eq!(signs(&busy_new, &old(), None, &cfg).len(), 2);
        for i in 1..=3 {
            assert_eq!(w.step(i * 1000, &busy_new, &cfg), Step::Quiet);
        }
        // Pinned at a limit that stopped growing: one sign, not a risk.
        let mut w = Watch::new("b:3309", 0, old(), None);
        let stalled = vec![sample(2.0, 8, 8, 0.05, 40); 3];
        for i in 1..=3 {
            assert_eq!(w.step(i * 1000, &stalled, &cfg), Step::Quiet);
        }
        assert_eq!(signs(&stalled, &old(), None, &cfg).len(), 1);
    }

    #[test]
    fn a_healthy_ramp_raises_nothing() {
        // The limit starts low (slow start) and is used fully while it doubles: in flight
        // at the limit alone is one sign, not a risk; latency holds.
        let cfg = CascadeConfig::default();
        let mut w = Watch::new("b:3309", 0, old(), None);
        let ramp: Vec<Sample> = [4u64, 8, 16, 32, 64, 64, 64].iter().map(|l| sample(2.5, *l, *l, 0.05, 42)).collect();
        for i in 1..=ramp.len() {
            assert_eq!(w.step(i as u64 * 1000, &ramp[..i], &cfg), Step::Quiet, "poll {i}");
        }
        assert_eq!(w.step(301_000, &ramp, &cfg), Step::Done);
    }

    #[test]
    fn memory_near_its_limit_and_shedding_are_signs() {
        let cfg = CascadeConfig::default();
        let mut s = sample(1.0, 1, 16, 0.0, 10);
        s.shed = 7;
        if let Some(a) = s.agent.as_mut() {
            a.memory_bytes = Some(95 << 20);
            a.memory_limit = Some(100 << 20);
        }
        let out: Vec<String> = signs(&[s], &old(), None, &cfg).into_iter().map(|x| x.1).collect();
        assert_eq!(out, vec!["7 statements shed by its concurrency limit 16".to_string(), "memory 95 MiB of its 100 MiB limit".to_string()]);
    }
}
