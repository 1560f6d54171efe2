//! Fallback without eBPF: connection metrics from polling /proc/net/tcp and /proc/net/tcp6.
//!
//! Every interval the established sockets on watched ports are listed; new ones count as
//! opened, vanished ones as closed. Connections shorter than the interval are missed and
//! nothing per request is measured: the agent says so when it falls back.

use crate::prometheus::Shared;
use breakwater_agent_common::{Event, EVENT_CLOSE, EVENT_OPEN};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// (local port, remote address as IPv6-mapped bytes, remote port, inode)
pub type Key = (u16, [u8; 16], u16, u64);

fn parse_addr(s: &str, v6: bool) -> Option<([u8; 16], u16)> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut out = [0u8; 16];
    if v6 {
        // four 32-bit words, each in host (little-endian) order
        for w in 0..4 {
            let word = u32::from_str_radix(ip.get(w * 8..w * 8 + 8)?, 16).ok()?;
            out[w * 4..w * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
    } else {
        let word = u32::from_str_radix(ip, 16).ok()?;
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..16].copy_from_slice(&word.to_le_bytes());
    }
    Some((out, port))
}

/// /proc/net/tcp* socket states.
pub const TCP_ESTABLISHED: &str = "01";
pub const TCP_LISTEN: &str = "0A";

/// Sockets in `state` on local `ports`, from one /proc/net/tcp* text.
pub fn sockets(text: &str, v6: bool, state: &str, ports: &[u16]) -> Vec<Key> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != state {
            continue;
        }
        let (Some((_, lport)), Some((raddr, rport))) = (parse_addr(f[1], v6), parse_addr(f[2], v6)) else { continue };
        if !ports.contains(&lport) {
            continue;
        }
        let inode = f[9].parse().unwrap_or(0);
        out.push((lport, raddr, rport, inode));
    }
    out
}

/// Established connections on `ports` from one /proc/net/tcp* text.
pub fn established(text: &str, v6: bool, ports: &[u16]) -> Vec<Key> {
    sockets(text, v6, TCP_ESTABLISHED, ports)
}

/// The established connections on `ports` now, by (port, peer address, peer port).
pub fn established_now(ports: &[u16]) -> std::collections::HashSet<crate::stats::Tuple> {
    let mut out = std::collections::HashSet::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(established(&text, v6, ports).into_iter().map(|(p, a, pp, _)| (p, a, pp)));
        }
    }
    out
}

fn event(kind: u32, k: &Key, value_ns: u64) -> Event {
    Event {
        kind,
        port: k.0,
        peer_port: k.2,
        peer_addr: k.1,
        sock: k.3,
        rtt_us: 0,
        flags: 0,
        value_ns,
        opened_ns: 0,
        bytes_in: 0,
        bytes_out: 0,
        requests: 0,
        errors: 0,
    }
}

/// Poll forever, turning appearances and disappearances into open/close events.
pub async fn poll(ports: Vec<u16>, stats: Shared, every: Duration) {
    let mut known: HashMap<Key, Instant> = HashMap::new();
    let mut first = true;
    loop {
        let mut now_set = Vec::new();
        for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            if let Ok(text) = std::fs::read_to_string(path) {
                now_set.extend(established(&text, v6, &ports));
            }
        }
        let now = Instant::now();
        let mut events = Vec::new();
        for k in &now_set {
            if !known.contains_key(k) {
                known.insert(*k, now);
                // Connections already open at start are not "opened" while we watched.
                if !first {
                    events.push(event(EVENT_OPEN, k, 0));
                }
            }
        }
        let current: std::collections::HashSet<&Key> = now_set.iter().collect();
        known.retain(|k, since| {
            if current.contains(k) {
                true
            } else {
                events.push(event(EVENT_CLOSE, k, since.elapsed().as_nanos() as u64));
                false
            }
        });
        if let Ok(mut s) = stats.lock() {
            for e in &events {
                s.record(e);
            }
        }
        first = false;
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{established, sockets, TCP_LISTEN};

    #[test]
    fn parses_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0CEB 3700007F:9C40 01 00000000:00000000 00:00000000 00000000   106        0 12345 1 0000000000000000 20 4 30 10 -1\n\
   1: 0100007F:0CEB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   106        0 999 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:9C41 01 00000000:00000000 00:00000000 00000000   106        0 777 1 0000000000000000 20 4 30 10 -1\n";
        let got = established(text, false, &[3307]);
        assert_eq!(got.len(), 1, "only ESTABLISHED on a watched port");
        let (lport, raddr, rport, inode) = got[0];
        assert_eq!((lport, rport, inode), (3307, 0x9c40, 12345));
        assert_eq!(&raddr[12..], &[127, 0, 0, 55]);
        let listening = sockets(text, false, TCP_LISTEN, &[3307]);
        assert_eq!(listening.iter().map(|k| k.3).collect::<Vec<_>>(), vec![999], "the listener's inode");
    }
}
