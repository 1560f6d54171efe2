//! What the agent knows, built from two sources:
//! - connection events from the ring buffer (open, close with the connection's totals,
//!   retransmit): counters per server port and per peer;
//! - the kernel's request aggregates per (port, operation), summed over CPUs, and the live
//!   counters of open connections, read together on every refresh.
//!
//! Every counter is cumulative since the agent started and never goes down: a connection's
//! live counters are remembered until its close event brings the final ones.
//! Fixed memory per key; the number of keys is bounded (peers beyond MAX_PEERS are folded
//! into "::" = other).

use breakwater_agent_common::{
    hist_bucket_range, ConnState, Event, OpAgg, EVENT_CLOSE, EVENT_FLAG_ADOPTED, EVENT_OPEN, EVENT_RETRANSMIT, FLAG_INFILE, FLAG_LOGIN,
    FLAG_SYNC, FLAG_TLS, HIST_BUCKETS, LE_NS, PHASE_REQUEST,
};
use hdrhistogram::Histogram;
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};

pub const MAX_PEERS: usize = 1024;

/// Latency bucket bounds (seconds) exposed as a Prometheus histogram: the kernel counts
/// exactly these (agent-common's LE_NS).
pub const BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const _: () = assert!(BUCKETS.len() == LE_NS.len());

/// Connection lifetime bucket bounds (seconds): one-query connections, application pools
/// that recycle their connections, long-lived ones.
pub const CONN_BUCKETS: &[f64] = &[0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0];

#[derive(Default, Clone, Debug)]
pub struct PortStats {
    pub opened: u64,
    pub closed: u64,
    /// Bytes of closed connections plus the live counters of open ones.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub retransmits: u64,
    pub conn_seconds_sum: f64,
    /// Closed connections whose lifetime is known (not those adopted mid-life).
    pub lifetimes: u64,
    /// Closed connections per lifetime bucket: `conn_le[i]` counts (CONN_BUCKETS[i-1],
    /// CONN_BUCKETS[i]], the last one those above all bounds.
    pub conn_le: [u64; CONN_BUCKETS.len() + 1],
    /// Smoothed RTT at close: sum and count of connections with a known RTT, and the max.
    pub rtt_seconds_sum: f64,
    pub rtt_count: u64,
    pub rtt_seconds_max: f64,
    /// Open connections that negotiated TLS (their requests cannot be seen), as of the
    /// last refresh.
    pub encrypted: u64,
    /// Requests being served now (arrived, not yet answered), as of the last refresh.
    pub in_flight: u64,
    closed_bytes_in: u64,
    closed_bytes_out: u64,
}

#[derive(Default, Clone, Debug)]
pub struct PeerStats {
    pub opened: u64,
    pub closed: u64,
    /// Requests answered (closed connections plus the live counters of open ones).
    pub requests: u64,
    pub errors: u64,
    closed_requests: u64,
    closed_errors: u64,
}

pub struct OpStats {
    pub count: u64,
    pub errors: u64,
    pub sum_ns: u128,
    /// Exact, from the kernel.
    pub max_ns: u64,
    /// Exact counts per Prometheus bucket: `le[i]` = requests in (BUCKETS[i-1], BUCKETS[i]],
    /// `le[16]` = above the last bound.
    pub le: [u64; 17],
    /// The kernel's log-linear bucket counts (12.5% wide).
    buckets: Vec<u64>,
    /// For quantiles: `buckets` recorded at their middle into an hdrhistogram, built on first
    /// use (a scrape, an export, a printed table), not on every 250 ms refresh.
    hist: OnceCell<Histogram<u64>>,
}

impl OpStats {
    fn from_kernel(a: &OpAgg) -> Self {
        Self {
            count: a.count,
            errors: a.errors,
            sum_ns: a.sum_ns as u128,
            max_ns: a.max_ns,
            le: a.le,
            buckets: a.hist.to_vec(),
            hist: OnceCell::new(),
        }
    }

    fn hist(&self) -> &Histogram<u64> {
        self.hist.get_or_init(|| {
            // 1 µs .. 150 s, 2 significant digits.
            let mut h = Histogram::new_with_bounds(1_000, 150_000_000_000, 2).unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()));
            for (b, &n) in self.buckets.iter().enumerate() {
                if n > 0 {
                    let (lo, hi) = hist_bucket_range(b);
                    let _ = h.record_n((lo / 2 + hi / 2).clamp(1_000, 150_000_000_000), n);
                }
            }
            h
        })
    }

    /// Requests with latency <= BUCKETS[i].
    pub fn cumulative(&self, i: usize) -> u64 {
        self.le.iter().take(i + 1).sum()
    }

    pub fn quantile_ns(&self, q: f64) -> u64 {
        if q >= 1.0 {
            self.max_ns
        } else {
            self.hist().value_at_quantile(q).min(self.max_ns)
        }
    }

    /// The low end of the lowest non-empty bucket (the true minimum is within 12.5% above).
    pub fn min_ns(&self) -> u64 {
        self.buckets.iter().position(|&n| n > 0).map(|b| hist_bucket_range(b).0).unwrap_or(0)
    }
}

/// The last live counters read for an open connection.
#[derive(Clone, Copy)]
struct Live {
    port: u16,
    peer: IpAddr,
    requests: u64,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// Encrypted (TLS): its requests are not visible.
    tls: bool,
    /// A request is being served (arrived, not yet answered).
    in_flight: bool,
    /// Refreshes since the connection was last seen in the kernel's map.
    missed: u8,
}

#[derive(Default)]
pub struct Stats {
    pub ports: BTreeMap<u16, PortStats>,
    pub peers: BTreeMap<(u16, IpAddr), PeerStats>,
    pub ops: BTreeMap<(u16, &'static str), OpStats>,
    pub events: u64,
    /// The servers' cgroup load by port (see `load`), as of the last read.
    pub load: BTreeMap<u16, crate::load::CgroupLoad>,
    /// Open connections by (socket address, opened at).
    live: HashMap<(u64, u64), Live>,
    /// Connections that were open when the agent started (from /proc/net/tcp*), counted as
    /// opened then, that the kernel programs have not adopted yet: an OPEN event for one of
    /// these (adopted on its first bytes, or raced with the listing) is not counted again,
    /// and one that closes unseen is found gone by [`Stats::reconcile_seeded`].
    seeded: HashSet<Tuple>,
}

/// A connection by (server port, peer address, peer port).
pub type Tuple = (u16, [u8; 16], u16);

fn peer_ip(a: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl Stats {
    /// The key a peer is counted under (bounded: beyond MAX_PEERS, "::").
    fn peer_key(&self, port: u16, ip: IpAddr) -> (u16, IpAddr) {
        if self.peers.len() < MAX_PEERS || self.peers.contains_key(&(port, ip)) {
            (port, ip)
        } else {
            (port, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        }
    }

    /// A connection event from the ring buffer.
    pub fn record(&mut self, ev: &Event) {
        self.events += 1;
        let key = self.peer_key(ev.port, peer_ip(&ev.peer_addr));
        let port = self.ports.entry(ev.port).or_default();
        let peer = self.peers.entry(key).or_default();
        match ev.kind {
            EVENT_OPEN => {
                if !self.seeded.remove(&(ev.port, ev.peer_addr, ev.peer_port)) {
                    port.opened += 1;
                    peer.opened += 1;
                }
            }
            EVENT_CLOSE => {
                self.live.remove(&(ev.sock, ev.opened_ns));
                port.closed += 1;
                peer.closed += 1;
                peer.closed_requests += ev.requests;
                peer.closed_errors += ev.errors;
                port.closed_bytes_in += ev.bytes_in;
                port.closed_bytes_out += ev.bytes_out;
                if ev.flags & EVENT_FLAG_ADOPTED == 0 {
                    let secs = ev.value_ns as f64 / 1e9;
                    port.conn_seconds_sum += secs;
                    port.lifetimes += 1;
                    port.conn_le[CONN_BUCKETS.iter().take_while(|b| secs > **b).count()] += 1;
                }
                if ev.rtt_us > 0 {
                    let rtt = ev.rtt_us as f64 / 1e6;
                    port.rtt_seconds_sum += rtt;
                    port.rtt_count += 1;
                    port.rtt_seconds_max = port.rtt_seconds_max.max(rtt);
                }
            }
            EVENT_RETRANSMIT => port.retransmits += 1,
            _ => {}
        }
    }

    /// The kernel's state after the events read so far: request aggregates per (port,
    /// operation), summed over CPUs, and the open connections' live counters.
    pub fn refresh(&mut self, ops: Vec<((u16, &'static str), OpAgg)>, conns: impl Iterator<Item = (u64, ConnState)>) {
        self.ops = ops.iter().filter(|(_, a)| a.count > 0).map(|(k, a)| (*k, OpStats::from_kernel(a))).collect();
        for p in self.ports.values_mut() {
            p.errors = 0;
        }
        for ((port, _), o) in &self.ops {
            self.ports.entry(*port).or_default().errors += o.errors;
        }
        // A connection gone from the kernel's map keeps its last live counters until its
        // close event (already in the ring buffer) brings the final ones at the next drain.
        // Gone for two refreshes: its event was dropped; its last counters are kept as final.
        for l in self.live.values_mut() {
            l.missed = l.missed.saturating_add(1);
        }
        for (sock, c) in conns {
            let peer = peer_ip(&c.peer_addr);
            let l = Live {
                port: c.port,
                peer,
                requests: c.requests,
                errors: c.errors,
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
                tls: c.flags & FLAG_TLS != 0,
                in_flight: c.phase == PHASE_REQUEST && c.flags & (FLAG_SYNC | FLAG_LOGIN | FLAG_INFILE) == 0,
                missed: 0,
            };
            self.live.insert((sock, c.opened_ns), l);
        }
        let lost: Vec<(u64, u64)> = self.live.iter().filter(|(_, l)| l.missed > 2).map(|(k, _)| *k).collect();
        for k in lost {
            if let Some(l) = self.live.remove(&k) {
                let key = self.peer_key(l.port, l.peer);
                let peer = self.peers.entry(key).or_default();
                peer.closed += 1;
                peer.closed_requests += l.requests;
                peer.closed_errors += l.errors;
                let port = self.ports.entry(l.port).or_default();
                port.closed += 1;
                port.closed_bytes_in += l.bytes_in;
                port.closed_bytes_out += l.bytes_out;
            }
        }
        for p in self.ports.values_mut() {
            p.bytes_in = p.closed_bytes_in;
            p.bytes_out = p.closed_bytes_out;
            p.encrypted = 0;
            p.in_flight = 0;
        }
        for p in self.peers.values_mut() {
            p.requests = p.closed_requests;
            p.errors = p.closed_errors;
        }
        let live: Vec<Live> = self.live.values().copied().collect();
        for l in live {
            let key = self.peer_key(l.port, l.peer);
            let peer = self.peers.entry(key).or_default();
            peer.requests += l.requests;
            peer.errors += l.errors;
            let port = self.ports.entry(l.port).or_default();
            port.bytes_in += l.bytes_in;
            port.bytes_out += l.bytes_out;
            if l.missed == 0 {
                port.encrypted += l.tls as u64;
                port.in_flight += l.in_flight as u64;
            }
        }
    }

    /// The connections open when the agent started: counted as opened now.
    pub fn seed(&mut self, conns: impl IntoIterator<Item = Tuple>) {
        for t in conns {
            if self.seeded.insert(t) {
                let key = self.peer_key(t.0, peer_ip(&t.1));
                self.ports.entry(t.0).or_default().opened += 1;
                self.peers.entry(key).or_default().opened += 1;
            }
        }
    }

    /// Whether seeded connections are still waiting for adoption.
    pub fn has_seeded(&self) -> bool {
        !self.seeded.is_empty()
    }

    /// Seeded connections no longer established (closed before they sent a byte the
    /// programs saw) are counted closed.
    pub fn reconcile_seeded(&mut self, established: &HashSet<Tuple>) {
        let gone: Vec<Tuple> = self.seeded.iter().filter(|t| !established.contains(*t)).copied().collect();
        for t in gone {
            self.seeded.remove(&t);
            let key = self.peer_key(t.0, peer_ip(&t.1));
            self.ports.entry(t.0).or_default().closed += 1;
            self.peers.entry(key).or_default().closed += 1;
        }
    }

    pub fn active(&self, port: u16) -> u64 {
        self.ports.get(&port).map(|p| p.opened.saturating_sub(p.closed)).unwrap_or(0)
    }
}

/// Sum of one (port, operation)'s per-CPU aggregates (max for the max).
pub fn sum_cpus<'a>(per_cpu: impl Iterator<Item = &'a OpAgg>) -> OpAgg {
    let mut t = OpAgg { count: 0, errors: 0, sum_ns: 0, max_ns: 0, le: [0; 17], hist: [0; HIST_BUCKETS] };
    for a in per_cpu {
        t.count += a.count;
        t.errors += a.errors;
        t.sum_ns += a.sum_ns;
        t.max_ns = t.max_ns.max(a.max_ns);
        for (x, y) in t.le.iter_mut().zip(a.le.iter()) {
            *x += y;
        }
        for (x, y) in t.hist.iter_mut().zip(a.hist.iter()) {
            *x += y;
        }
    }
    t
}
