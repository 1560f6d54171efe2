//! Aggregation of kernel events: counters per server port and per peer, and latency
//! histograms (hdrhistogram) per server port and operation. Fixed memory per key; the
//! number of keys is bounded (peers beyond MAX_PEERS are folded into "other").

use crate::classify;
use breakwater_agent_common::{Event, EVENT_CLOSE, EVENT_OPEN, EVENT_REQUEST, EVENT_RETRANSMIT};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

pub const MAX_PEERS: usize = 1024;

/// Latency bucket bounds (seconds) exposed as a Prometheus histogram.
pub const BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default, Clone, Debug)]
pub struct PortStats {
    pub opened: u64,
    pub closed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub retransmits: u64,
    pub conn_seconds_sum: f64,
    /// Smoothed RTT at close: sum and count of connections with a known RTT, and the max.
    pub rtt_seconds_sum: f64,
    pub rtt_count: u64,
    pub rtt_seconds_max: f64,
}

#[derive(Default, Clone, Debug)]
pub struct PeerStats {
    pub opened: u64,
    pub closed: u64,
    pub requests: u64,
    pub errors: u64,
}

pub struct OpStats {
    pub count: u64,
    pub errors: u64,
    pub sum_ns: u128,
    pub hist: Histogram<u64>,
}

impl OpStats {
    fn new() -> Self {
        // 1 µs .. 60 s, 2 significant digits: a few KiB per (port, operation).
        let hist = Histogram::new_with_bounds(1_000, 60_000_000_000, 2).unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()));
        Self { count: 0, errors: 0, sum_ns: 0, hist }
    }
}

/// Prepared statements per connection, so an EXECUTE is named by its statement's kind.
pub const MAX_STMTS: usize = 65536;

#[derive(Default)]
pub struct Stats {
    /// (server socket, statement id) -> the prepared statement's kind.
    pub stmts: std::collections::HashMap<(u64, u32), &'static str>,
    pub ports: BTreeMap<u16, PortStats>,
    pub peers: BTreeMap<(u16, IpAddr), PeerStats>,
    pub ops: BTreeMap<(u16, &'static str), OpStats>,
    pub events: u64,
}

fn peer_ip(a: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl Stats {
    pub fn record(&mut self, ev: &Event) {
        self.events += 1;
        let port = self.ports.entry(ev.port).or_default();
        let ip = peer_ip(&ev.peer_addr);
        let peer_key = if self.peers.len() < MAX_PEERS || self.peers.contains_key(&(ev.port, ip)) {
            (ev.port, ip)
        } else {
            (ev.port, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        };
        let peer = self.peers.entry(peer_key).or_default();
        match ev.kind {
            EVENT_OPEN => {
                port.opened += 1;
                peer.opened += 1;
            }
            EVENT_CLOSE => {
                let sock = ev.sock;
                self.stmts.retain(|(s, _), _| *s != sock);
                port.closed += 1;
                peer.closed += 1;
                port.bytes_in += ev.bytes_in;
                port.bytes_out += ev.bytes_out;
                port.conn_seconds_sum += ev.value_ns as f64 / 1e9;
                if ev.rtt_us > 0 {
                    let rtt = ev.rtt_us as f64 / 1e6;
                    port.rtt_seconds_sum += rtt;
                    port.rtt_count += 1;
                    port.rtt_seconds_max = port.rtt_seconds_max.max(rtt);
                }
            }
            EVENT_REQUEST => {
                let len = (ev.request_len as usize).min(ev.request.len());
                let req = &ev.request[..len];
                let mut op = classify::operation(req);
                if op == "COM_STMT_PREPARE" && ev.response[4] == 0x00 && self.stmts.len() < MAX_STMTS {
                    // PREPARE_OK: statement id follows the status byte.
                    let id = u32::from_le_bytes([ev.response[5], ev.response[6], ev.response[7], ev.response[8]]);
                    self.stmts.insert((ev.sock, id), classify::prepared_kind(req));
                } else if op == "COM_STMT_EXECUTE" && len >= 9 {
                    let id = u32::from_le_bytes([req[5], req[6], req[7], req[8]]);
                    if let Some(kind) = self.stmts.get(&(ev.sock, id)) {
                        op = kind;
                    }
                }
                peer.requests += 1;
                let err = ev.response_err != 0;
                if err {
                    port.errors += 1;
                    peer.errors += 1;
                }
                let s = self.ops.entry((ev.port, op)).or_insert_with(OpStats::new);
                s.count += 1;
                s.errors += err as u64;
                s.sum_ns += ev.value_ns as u128;
                let _ = s.hist.record(ev.value_ns.clamp(1_000, 60_000_000_000));
            }
            EVENT_RETRANSMIT => port.retransmits += 1,
            _ => {}
        }
    }

    pub fn active(&self, port: u16) -> u64 {
        self.ports.get(&port).map(|p| p.opened.saturating_sub(p.closed)).unwrap_or(0)
    }
}
