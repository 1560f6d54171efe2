//! Record types shared by the kernel programs (agent-ebpf) and the agent that loads them,
//! so the two sides can never disagree on a layout, and the request classifier the kernel
//! runs (plain `no_std` code, unit-tested here in user space).
//!
//! Requests are counted in the kernel: per (watched port, operation) a per-CPU [`OpAgg`]
//! holds counters and latency histograms, so answering a request costs a map update, not
//! an event. Only connection events (open, close, retransmit) cross the ring buffer.
#![no_std]

mod classify;
pub use classify::*;

/// How many bytes of a request (packet header, command byte, start of the statement) the
/// kernel keeps to classify it.
pub const REQ_PREFIX: usize = 32;

pub const EVENT_OPEN: u32 = 1;
pub const EVENT_CLOSE: u32 = 2;
pub const EVENT_RETRANSMIT: u32 = 4;

/// Connection phases tracked in the kernel.
pub const PHASE_IDLE: u8 = 0;
pub const PHASE_REQUEST: u8 = 1;
pub const PHASE_RESPONSE: u8 = 2;
/// The 4-byte header of a command was read alone; its payload comes next.
pub const PHASE_HEADER: u8 = 3;

/// ConnState flags: the connection is authenticating (from the greeting to the server's
/// OK; again after COM_CHANGE_USER); the client is sending a LOAD DATA LOCAL file.
pub const FLAG_LOGIN: u8 = 1;
pub const FLAG_INFILE: u8 = 2;
/// ConnState flags of the cgroup_skb hooks: `rcv_next` / `snd_next` hold a sequence number.
pub const FLAG_SEQ_IN: u8 = 4;
pub const FLAG_SEQ_OUT: u8 = 8;
/// ConnState flags of a connection the programs did not see open (established before they
/// attached: a proxy's pool, or kept across an agent restart): adopted on its first bytes,
/// its lifetime unknown. While FLAG_SYNC is set, nothing is counted but bytes: the programs
/// wait for a request boundary (a client packet with sequence id 0 and a command byte,
/// whole in what was read) before they follow the request/response rhythm.
pub const FLAG_ADOPTED: u8 = 16;
pub const FLAG_SYNC: u8 = 32;
/// ConnState flag: the client asked for TLS (SSLRequest during login). What follows is
/// encrypted: the connection's bytes count, its requests cannot be seen.
pub const FLAG_TLS: u8 = 64;
/// Event flags: OPEN / CLOSE of an adopted connection (`opened_ns` is when it was adopted).
pub const EVENT_FLAG_ADOPTED: u32 = 1;

/// Global (read-only data) of the kernel programs: byte offset of tcp_sock.srtt_us (0 =
/// unknown), from BTF, set by the agent before it loads them.
pub const GLOBAL_SRTT_OFFSET: &str = "SRTT_OFFSET";
/// Global of the kernel programs: byte offset of tcp_sock.tcp_clock_cache (0 = unknown), from
/// BTF: the socket's own clock, refreshed (CLOCK_MONOTONIC ns) when segments arrive and when
/// it transmits. Requests are timed with it from arrival to transmission, for the price of
/// one load instead of a clock read.
pub const GLOBAL_CLOCK_OFFSET: &str = "CLOCK_OFFSET";

/// Indexes of the DROPS per-CPU counters.
pub const DROP_RINGBUF_FULL: u32 = 0;
pub const DROP_CONNS_FULL: u32 = 1;
/// A segment arrived (or left) after a gap in the sequence numbers the programs saw.
pub const DROP_TCP_GAP: u32 = 2;
/// The `reason` label of each DROPS counter, by index.
pub const DROP_REASONS: [&str; 3] = ["ringbuf_full", "conns_map_full", "tcp_gap"];

/// Most watched ports one agent handles (each has its block of [`OPS`] aggregates).
pub const MAX_PORTS: usize = 32;

/// One event from the kernel about a connection: opened, closed, or a retransmitted segment.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    /// The server's (local) port.
    pub port: u16,
    pub peer_port: u16,
    /// IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d).
    pub peer_addr: [u8; 16],
    /// The server socket's kernel address: identifies the connection.
    pub sock: u64,
    /// CLOSE: the smoothed RTT of the connection when it closed, in µs (0 = unknown).
    pub rtt_us: u32,
    /// EVENT_FLAG_*.
    pub flags: u32,
    /// CLOSE: connection lifetime.
    pub value_ns: u64,
    /// When the connection opened (kernel monotonic ns): with `sock`, names one connection.
    pub opened_ns: u64,
    /// CLOSE: totals for the connection.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
    pub errors: u64,
}

/// Per-connection state kept in the kernel, keyed by socket address. The agent also reads
/// the live counters (requests, errors, bytes) of open connections from this map.
///
/// Laid out by use: what every read and write of the connection touches comes first and
/// fits in 56 bytes, so with the map entry's own header it spans as few cache lines as
/// possible (each hook call after the server ran a query starts with cold lines). A request
/// is named when it is read (command, statement kind), so its bytes are not kept. The
/// prepared statements next; what only the open and close events need last.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnState {
    pub phase: u8,
    /// FLAG_LOGIN | FLAG_INFILE.
    pub flags: u8,
    /// Index of the port in the watched set (selects the block of aggregates).
    pub port_slot: u8,
    /// The current request's command byte (0 = not known).
    pub cmd: u8,
    /// The operation the current request is counted as (OP_*); for COM_STMT_PREPARE, the
    /// kind of the statement it prepares.
    pub op: u8,
    pub stmt_next: u8,
    pub _pad: u16,
    /// cgroup_skb hooks: the next sequence number expected from the client / the server.
    pub rcv_next: u32,
    pub snd_next: u32,
    pub request_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
    pub errors: u64,
    /// The connection's last prepared statements (id 0 = empty) and their operations.
    pub stmt_ids: [u32; STMT_CACHE],
    pub stmt_ops: [u8; STMT_CACHE],
    pub port: u16,
    pub peer_port: u16,
    pub _pad2: u32,
    pub peer_addr: [u8; 16],
    pub opened_ns: u64,
}

/// Prepared statements whose kind a connection keeps in its own state.
pub const STMT_CACHE: usize = 8;

/// Key of a prepared statement: its connection (socket address) and statement id.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StmtKey {
    pub sock: u64,
    pub id: u32,
    pub _pad: u32,
}

/// Latency histogram of the kernel: log-linear, 8 sub-buckets per power of two from
/// 2^10 ns (about 1 µs) to 2^37 ns (about 137 s): every value is known within 12.5%.
/// Bucket 0 holds everything under 1024 ns.
pub const HIST_BUCKETS: usize = 1 + 27 * 8;
const HIST_MIN_EXP: u32 = 10;
const HIST_MAX_EXP: u32 = HIST_MIN_EXP + 26;

/// Exact bucket bounds (ns) of the Prometheus histogram, counted in the kernel so that a
/// request is never put on the wrong side of a published `le`.
pub const LE_NS: [u64; 16] = [
    100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000, 100_000_000, 250_000_000,
    500_000_000, 1_000_000_000, 2_500_000_000, 5_000_000_000, 10_000_000_000,
];

/// Counters of one (port, operation), per CPU: summed (max-ed) over CPUs by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpAgg {
    pub count: u64,
    pub errors: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    /// `le[i]`: requests with latency <= LE_NS[i] and > LE_NS[i-1]; `le[16]`: above all.
    pub le: [u64; 17],
    pub hist: [u64; HIST_BUCKETS],
}

/// floor(log2(v)) for v > 0, without a count-leading-zeros instruction (BPF has none).
#[inline(always)]
pub fn log2(v: u64) -> u32 {
    // A binary search over the bit positions; the constant loop unrolls into six compares.
    let (mut x, mut e) = (v, 0);
    for shift in [32, 16, 8, 4, 2, 1] {
        if x >> shift != 0 {
            x >>= shift;
            e += shift;
        }
    }
    e
}

/// The histogram bucket of a latency in ns.
#[inline(always)]
pub fn hist_bucket(ns: u64) -> usize {
    if ns < 1 << HIST_MIN_EXP {
        return 0;
    }
    let e = log2(ns);
    if e > HIST_MAX_EXP {
        return HIST_BUCKETS - 1;
    }
    let sub = (ns >> (e - 3)) & 7;
    1 + ((e - HIST_MIN_EXP) as usize) * 8 + sub as usize
}

/// The range [low, high] of ns values a bucket holds.
pub fn hist_bucket_range(b: usize) -> (u64, u64) {
    if b == 0 {
        return (0, (1 << HIST_MIN_EXP) - 1);
    }
    let e = HIST_MIN_EXP as u64 + ((b - 1) / 8) as u64;
    let sub = ((b - 1) % 8) as u64;
    let width = 1u64 << (e - 3);
    let low = (8 + sub) * width;
    (low, low + width - 1)
}

/// The Prometheus bucket (index in [`OpAgg::le`]) of a latency in ns: a fixed chain of
/// comparisons the compiler unrolls (no loop for the verifier to follow).
#[inline(always)]
pub fn le_bucket(ns: u64) -> usize {
    let mut i = 0;
    for b in LE_NS {
        i += (ns > b) as usize;
    }
    i
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::StmtKey {}
    unsafe impl aya::Pod for super::OpAgg {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_is_the_highest_set_bit() {
        for k in 0..64 {
            for v in [1u64 << k, (1u64 << k) | 1, (1u64 << k).wrapping_mul(2).wrapping_sub(1).max(1 << k)] {
                assert_eq!(log2(v), 63 - v.leading_zeros(), "{v}");
            }
        }
    }

    #[test]
    fn buckets_hold_their_values() {
        for v in [0u64, 1, 1023, 1024, 1500, 999_999, 1_000_000, 50_000_000, 50_123_456, 137_000_000_000] {
            let (lo, hi) = hist_bucket_range(hist_bucket(v));
            assert!(lo <= v && v <= hi, "{v} in [{lo}, {hi}]");
            if v >= 1024 {
                assert!((hi - lo) as f64 <= lo as f64 * 0.125, "{v}: [{lo}, {hi}] is within 12.5%");
            }
        }
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        for b in 1..HIST_BUCKETS {
            assert_eq!(hist_bucket_range(b).0, hist_bucket_range(b - 1).1 + 1, "contiguous at {b}");
        }
        for e in 0..63 {
            assert_eq!(log2(1 << e), e);
            assert_eq!(log2((1 << e) | 1), e);
        }
    }

    #[test]
    fn prometheus_buckets_are_exact() {
        assert_eq!(le_bucket(0), 0);
        assert_eq!(le_bucket(100_000), 0);
        assert_eq!(le_bucket(100_001), 1);
        assert_eq!(le_bucket(50_000_000), 8);
        assert_eq!(le_bucket(50_000_001), 9);
        assert_eq!(le_bucket(10_000_000_000), 15);
        assert_eq!(le_bucket(10_000_000_001), 16);
    }
}
