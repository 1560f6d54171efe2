//! A hostgroup is a set of servers that can serve the same queries; picking one balances by
//! measured cost (adaptive: latency, in-flight statements and the agents' view of the host)
//! or by weight and connections in use (weighted).
//!
//! Hostgroups are immutable: the failover controller switches writer and reader hostgroups
//! by publishing a new [`Routing`] snapshot in one step (see `Runtime::routing`).

use super::server::Server;
use crate::config::Balance;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Whether a hostgroup takes new work.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Gate {
    #[default]
    Open,
    /// A failover or switchover is in progress: new work waits (bounded by the queue
    /// timeout) for the next snapshot instead of failing.
    Hold(Arc<str>),
    /// New work fails at once with this message (e.g. the primary is dead and automated
    /// failover is in cooldown).
    Block(Arc<str>),
}

#[derive(Default, Clone)]
pub struct Hostgroup {
    pub id: u32,
    pub servers: Vec<Arc<Server>>,
    pub gate: Gate,
}

/// Every hostgroup, as one snapshot.
#[derive(Default, Clone)]
pub struct Routing {
    pub hostgroups: HashMap<u32, Arc<Hostgroup>>,
    /// Bumped by every switch, so sessions can tell a snapshot changed.
    pub version: u64,
}

impl Hostgroup {
    pub fn any_online(&self) -> bool {
        self.servers.iter().any(|s| s.is_online())
    }

    /// Pick an ONLINE server, skipping `exclude` (a server that just failed), as `balance`
    /// says (see `config::Balance`).
    pub fn pick(&self, exclude: Option<&Arc<Server>>, balance: Balance) -> Option<Arc<Server>> {
        let online: Vec<&Arc<Server>> = self
            .servers
            .iter()
            .filter(|s| s.is_online() && exclude.is_none_or(|e| !Arc::ptr_eq(s, e)))
            .collect();
        // Adaptive: servers ejected for an error burst are left out, unless that leaves
        // none (fail open to the plain choice).
        let mut online = online;
        if balance == Balance::Adaptive && online.iter().any(|s| s.pool.load.is_ejected()) {
            let healthy: Vec<&Arc<Server>> = online.iter().copied().filter(|s| !s.pool.load.is_ejected()).collect();
            if !healthy.is_empty() {
                online = healthy;
            }
        }
        match online.len() {
            0 => None,
            1 => Some(online[0].clone()),
            n => {
                let mut rng = rand::thread_rng();
                if balance == Balance::Adaptive {
                    // Power of two choices by cost (Finagle/Linkerd's peak-EWMA balancer).
                    let i = rng.gen_range(0..n);
                    let j = (i + rng.gen_range(1..n)) % n;
                    let (a, b) = (online[i], online[j]);
                    let (ca, cb) = (cost(a), cost(b));
                    // Costs within 15% are the same: the weights decide, so healthy servers
                    // keep their configured shares instead of flipping on noise.
                    if ca > cb * 1.15 {
                        return Some(b.clone());
                    }
                    if cb > ca * 1.15 {
                        return Some(a.clone());
                    }
                }
                let total: u64 = online.iter().map(|s| s.weight().max(1) as u64).sum();
                let mut weighted = || {
                    let mut x = rng.gen_range(0..total);
                    for s in &online {
                        let w = s.weight().max(1) as u64;
                        if x < w {
                            return *s;
                        }
                        x -= w;
                    }
                    online[0]
                };
                let (a, b) = (weighted(), weighted());
                let load = |s: &Server| s.pool.in_use.load(Ordering::Relaxed) as u64 * 1000 / s.weight().max(1) as u64;
                Some(if load(b) < load(a) { b.clone() } else { a.clone() })
            }
        }
    }
}

/// An adaptive pick's cost of a server: latency × (statements in flight + 1) / weight, times
/// the penalty from the agent's view of its host (CPU throttling, pressure).
fn cost(s: &Server) -> f64 {
    let l = &s.pool.load;
    let lat = l.latency_ms().max(0.001);
    let in_flight = l.in_flight.load(Ordering::Relaxed) as f64;
    lat * (in_flight + 1.0) * l.penalty() / s.weight().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::pool::Pool;
    use crate::config::ServerConfig;

    fn server(port: u16) -> Arc<Server> {
        let cfg: ServerConfig = toml::from_str(&format!("hostgroup = 20\nhost = \"127.0.0.1\"\nport = {port}\n")).expect("server row");
        Server::new(cfg, Arc::new(Pool::new(10, 10, Default::default())))
    }

    fn shares(hg: &Hostgroup, balance: Balance, n: usize) -> Vec<f64> {
        let mut count = vec![0usize; hg.servers.len()];
        for _ in 0..n {
            let s = hg.pick(None, balance).expect("a server");
            let i = hg.servers.iter().position(|x| Arc::ptr_eq(x, &s)).expect("one of them");
            count[i] += 1;
        }
        count.iter().map(|c| *c as f64 / n as f64).collect()
    }

    #[test]
    fn adaptive_prefers_the_faster_server_and_weights_decide_among_equals() {
        let hg = Hostgroup { id: 20, servers: vec![server(1), server(2)], gate: Gate::Open };
        hg.servers[0].pool.load.observe(1.0);
        hg.servers[1].pool.load.observe(1.0);
        let even = shares(&hg, Balance::Adaptive, 4000);
        assert!((even[0] - 0.5).abs() < 0.05, "equal costs: the weights decide: {even:?}");
        hg.servers[0].pool.load.observe(40.0); // server 1 turned slow (peak EWMA takes it at once)
        let skewed = shares(&hg, Balance::Adaptive, 4000);
        assert!(skewed[0] < 0.05, "the slow server gets (almost) nothing: {skewed:?}");
        let weighted = shares(&hg, Balance::Weighted, 4000);
        assert!((weighted[0] - 0.5).abs() < 0.05, "weighted ignores latency: {weighted:?}");
    }

    #[test]
    fn ejection_never_empties_a_hostgroup() {
        let hg = Hostgroup { id: 20, servers: vec![server(1), server(2)], gate: Gate::Open };
        for _ in 0..crate::adaptive::backend::EJECT_AFTER {
            hg.servers[0].pool.load.failed();
        }
        assert_eq!(shares(&hg, Balance::Adaptive, 500), vec![0.0, 1.0], "the ejected server is left out");
        for _ in 0..crate::adaptive::backend::EJECT_AFTER {
            hg.servers[1].pool.load.failed();
        }
        let both = shares(&hg, Balance::Adaptive, 2000);
        assert!(both[0] > 0.3 && both[1] > 0.3, "all ejected: fail open to the plain choice: {both:?}");
    }
}
