//! Record types shared by the kernel programs (agent-ebpf) and the agent that loads them,
//! so the two sides can never disagree on a layout.
#![no_std]

/// How many bytes of a request (packet header, command byte, start of the statement) the
/// kernel copies for the agent to classify.
pub const REQ_PREFIX: usize = 32;

pub const EVENT_OPEN: u32 = 1;
pub const EVENT_CLOSE: u32 = 2;
pub const EVENT_REQUEST: u32 = 3;
pub const EVENT_RETRANSMIT: u32 = 4;

/// Connection phases tracked in the kernel.
pub const PHASE_IDLE: u8 = 0;
pub const PHASE_REQUEST: u8 = 1;
pub const PHASE_RESPONSE: u8 = 2;

/// Index in the CONFIG array: byte offset of tcp_sock.srtt_us (0 = unknown), from BTF.
pub const CONFIG_SRTT_OFFSET: u32 = 0;

/// Indexes of the DROPS per-CPU counters.
pub const DROP_RINGBUF_FULL: u32 = 0;
pub const DROP_CONNS_FULL: u32 = 1;

/// One event from the kernel: a connection opened or closed, or a request answered.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    /// The server's (local) port.
    pub port: u16,
    pub peer_port: u16,
    /// IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d).
    pub peer_addr: [u8; 16],
    /// REQUEST: first byte of the response was 0xff (a MySQL ERR packet).
    pub response_err: u8,
    pub _pad: [u8; 3],
    /// How many bytes of `request` are valid.
    pub request_len: u32,
    /// The server socket's kernel address: identifies the connection.
    pub sock: u64,
    /// REQUEST: the first bytes of the response (a PREPARE_OK carries the statement id).
    pub response: [u8; 12],
    /// CLOSE: the smoothed RTT of the connection when it closed, in µs (0 = unknown).
    pub rtt_us: u32,
    /// REQUEST: first request byte to first response byte. CLOSE: connection lifetime.
    pub value_ns: u64,
    /// CLOSE: totals for the connection.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
    pub request: [u8; REQ_PREFIX],
}

/// Per-connection state kept in the kernel, keyed by socket address.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnState {
    pub port: u16,
    pub peer_port: u16,
    pub phase: u8,
    /// The next read is the payload of a login packet whose header was read alone.
    pub skip_payload: u8,
    pub _pad: [u8; 2],
    pub request_len: u32,
    pub peer_addr: [u8; 16],
    pub opened_ns: u64,
    pub request_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
    pub request: [u8; REQ_PREFIX],
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::ConnState {}
}
