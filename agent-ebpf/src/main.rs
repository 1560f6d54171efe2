//! Breakwater's kernel programs: MySQL server sockets seen from the kernel.
//!
//! - `inet_sock_set_state`: a passive open on a watched port (SYN_RECV -> ESTABLISHED)
//!   starts tracking the socket; its transition to CLOSE ends it (matched by socket
//!   address: the local port is already zero then).
//! - `sock_recv_length` / `sock_send_length`: on tracked sockets, the first bytes received
//!   with MySQL sequence id 0 start a request; the first bytes sent after it end it. Its
//!   latency runs from the request's arrival to the response's transmission, by the socket's
//!   own clock (see `sock_clock`). The
//!   request's first bytes are kept to name it (command, statement kind), and the response's
//!   first bytes tell an ERR packet.
//! - Requests are aggregated here, per CPU, per (port, operation): counts, errors, latency
//!   sum/max, a log-linear histogram and the exact Prometheus buckets (agent-common's
//!   OpAgg). Nothing crosses the ring buffer per request; the agent reads the aggregates.
//! - Prepared statements: a PREPARE_OK stores the statement's kind under (socket, id), so an
//!   EXECUTE is counted as the SELECT/UPDATE/... it runs.
//! - Connections established before the programs attached (a proxy's warm pool, or kept
//!   across an agent restart) are adopted on their first bytes: tracked from then on, and
//!   counted from their next request boundary (`FLAG_SYNC`, see `at_request_boundary`).
//! - `tcp_retransmit_skb`: retransmitted segments on tracked sockets.
//! - At close, the connection's smoothed RTT (tcp_sock.srtt_us, at the offset the agent
//!   found in the kernel's BTF).
//!
//! Classic tracepoints with the field offsets of their format files (sock:*, stable since
//! 4.16/6.x); maps have fixed sizes and overflows are counted in DROPS.
#![no_std]
#![no_main]

use aya_ebpf::bindings::pt_regs;
use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_skc_to_tcp_sock, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user_buf, bpf_skb_load_bytes, bpf_task_pt_regs};
use aya_ebpf::macros::{btf_tracepoint, cgroup_skb, map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{BtfTracePointContext, SkBuffContext, TracePointContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::warn;
use breakwater_agent_common::*;

/// Watched ports, indexed by port: 0 = not watched, else 1 + the port's slot. The cheapest
/// possible first filter for the recv/send hooks, which fire for every socket on the host.
#[map]
static WATCHED_PORTS: Array<u8> = Array::with_max_entries(65536, 0);
/// Request aggregates, per CPU, at slot * OPS + operation (sized by the agent at load).
#[map]
static AGG: PerCpuArray<OpAgg> = PerCpuArray::with_max_entries(1, 0);
/// (socket, prepared statement id) -> the statement's operation; LRU-bounded.
#[map]
static STMTS: LruHashMap<StmtKey, u32> = LruHashMap::with_max_entries(65536, 0);
#[map]
static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(65536, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);
/// Byte offsets in `struct tcp_sock` that the agent found in the kernel's BTF (0 = not
/// found), set before the programs are loaded: read-only data the verifier sees as
/// constants, so the BTF programs read these fields with a plain load.
#[unsafe(no_mangle)]
static SRTT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static CLOCK_OFFSET: u32 = 0;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const AF_INET: u16 = 2;
const IPPROTO_TCP: u16 = 6;
// x86_64 syscall numbers whose buffer is the second argument.
const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_SENDTO: u64 = 44;
const SYS_RECVFROM: u64 = 45;

/// Count a drop; the new count on this CPU.
fn drop_count(idx: u32) -> u64 {
    match DROPS.get_ptr_mut(idx) {
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    }
}

/// BPF_RB_NO_WAKEUP: the agent drains the ring buffer on a timer, so no event pays for
/// waking it up.
const BPF_RB_NO_WAKEUP: u64 = 1;

fn emit<C: EbpfContext>(ctx: &C, ev: &Event) {
    if EVENTS.output::<Event>(ev, BPF_RB_NO_WAKEUP).is_err() {
        let n = drop_count(DROP_RINGBUF_FULL);
        // Logged at the 1st, 2nd, 4th, 8th... drop on a CPU: a flood of drops stays a few lines.
        if n.is_power_of_two() {
            warn!(ctx, "event ring buffer full: {} events dropped on this CPU (the agent is not draining it)", n);
        }
    }
}

/// An event about a tracked connection, with every per-kind field zeroed.
#[inline(always)]
fn conn_event(kind: u32, st: &ConnState, sk: u64) -> Event {
    Event {
        kind,
        port: st.port,
        peer_port: st.peer_port,
        peer_addr: st.peer_addr,
        sock: sk,
        rtt_us: 0,
        flags: if st.flags & FLAG_ADOPTED != 0 { EVENT_FLAG_ADOPTED } else { 0 },
        value_ns: 0,
        opened_ns: st.opened_ns,
        bytes_in: 0,
        bytes_out: 0,
        requests: 0,
        errors: 0,
    }
}

/// A connection's state as tracking starts (at its handshake, or adopted mid-life).
#[inline(always)]
fn new_conn(port: u16, peer_port: u16, port_slot: u8, peer_addr: [u8; 16], flags: u8) -> ConnState {
    ConnState {
        port,
        peer_port,
        phase: PHASE_IDLE,
        flags,
        port_slot,
        cmd: 0,
        op: 0,
        rcv_next: 0,
        snd_next: 0,
        _pad: 0,
        _pad2: 0,
        peer_addr,
        opened_ns: unsafe { bpf_ktime_get_ns() },
        request_ns: 0,
        bytes_in: 0,
        bytes_out: 0,
        requests: 0,
        errors: 0,
        stmt_ids: [0; STMT_CACHE],
        stmt_ops: [0; STMT_CACHE],
        stmt_next: 0,
    }
}

/// BPF_NOEXIST: adopting never overwrites the state a handshake just created.
const BPF_NOEXIST: u64 = 1;

/// Start tracking a connection the programs did not see open, on its first bytes: from the
/// next request boundary on it is counted like any other. Emits an OPEN flagged adopted.
#[inline(never)]
unsafe fn adopt<C: EbpfContext>(ctx: &C, sk: u64, port: u16, peer: [u8; 16], peer_port: u16) -> Option<*mut ConnState> {
    let slot = match WATCHED_PORTS.get(port as u32) {
        Some(&v) if v != 0 => v - 1,
        _ => return None,
    };
    let st = new_conn(port, peer_port, slot, peer, FLAG_ADOPTED | FLAG_SYNC);
    if CONNS.insert(&sk, &st, BPF_NOEXIST).is_ok() {
        let ev = conn_event(EVENT_OPEN, &st, sk);
        emit(ctx, &ev);
    }
    // A full map: no drop counted here. A connection opened while the programs ran was
    // counted (and logged) once at its handshake, and this runs on each of its segments;
    // one older than the agent stays in the agent's seeded list, unadopted.
    CONNS.get_ptr_mut(&sk)
}

/// The peer of a socket, from its `struct sock_common` (adoption by the recv/send hooks):
/// skc_daddr at 0, skc_dport (network order) at 12, skc_family at 16, skc_v6_daddr at 56,
/// stable on x86_64 since 4.x.
#[inline(never)]
unsafe fn sock_peer(sk: u64) -> Option<([u8; 16], u16)> {
    let family: u16 = bpf_probe_read_kernel((sk + 16) as *const u16).ok()?;
    let dport: u16 = bpf_probe_read_kernel((sk + 12) as *const u16).ok()?;
    let mut peer = [0u8; 16];
    if family == AF_INET {
        let v4: [u8; 4] = bpf_probe_read_kernel((sk) as *const [u8; 4]).ok()?;
        peer[10] = 0xff;
        peer[11] = 0xff;
        peer[12..16].copy_from_slice(&v4);
    } else {
        peer = bpf_probe_read_kernel((sk + 56) as *const [u8; 16]).ok()?;
    }
    Some((peer, u16::from_be(dport)))
}

/// The peer of a segment (adoption by the cgroup_skb hooks): the source of what arrives, the
/// destination of what leaves; `ip_len` is the IP header's length.
#[inline(never)]
unsafe fn segment_peer(ctx: &SkBuffContext, ingress: bool, ip_len: u32) -> Option<([u8; 16], u16)> {
    let v4 = u16::from_be((*ctx.skb.skb).protocol as u16) == ETH_P_IP;
    let mut peer = [0u8; 16];
    if v4 {
        let v4: [u8; 4] = ctx.load(if ingress { 12 } else { 16 }).ok()?;
        peer[10] = 0xff;
        peer[11] = 0xff;
        peer[12..16].copy_from_slice(&v4);
    } else {
        peer = ctx.load(if ingress { 8 } else { 24 }).ok()?;
    }
    let port: u16 = ctx.load(ip_len as usize + if ingress { 0 } else { 2 }).ok()?;
    Some((peer, u16::from_be(port)))
}

/// Whether the client's `n` new bytes start a request: a packet with sequence id 0 whose
/// first byte is a command (COM_SLEEP..COM_RESET_CONNECTION range) and which lies whole in
/// these bytes, or a packet header read alone (a server reads a command that way). Bytes in
/// the middle of a request (a continuation segment, the file of a LOAD DATA LOCAL, a login
/// packet, all with other sequence ids or lengths) do not pass, so an adopted connection is
/// never counted from the middle of a request.
#[inline(always)]
unsafe fn at_request_boundary<B: Bytes>(n: u32, src: &B) -> bool {
    let mut h = [0u8; 5];
    if n == 4 {
        let mut h4 = [0u8; 4];
        return src.read(&mut h4) && h4[3] == 0;
    }
    if n < 5 || !src.read(&mut h) {
        return false;
    }
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]);
    h[3] == 0 && h[4] <= 0x1f && len >= 1 && len + 4 <= n
}

/// The client's SSLRequest: a 32-byte login packet with sequence id 1, sent instead of the
/// handshake response (which is longer: it names the user). Its header is enough (a server
/// may read the header alone).
#[inline(always)]
unsafe fn is_ssl_request<B: Bytes>(n: u32, src: &B) -> bool {
    let mut h = [0u8; 4];
    n >= 4 && src.read(&mut h) && h == [32, 0, 0, 1]
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = unsafe { on_state(&ctx) };
    0
}

unsafe fn on_state(ctx: &TracePointContext) -> Result<(), i32> {
    let protocol: u16 = ctx.read_at(30)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let sk: u64 = ctx.read_at(8)?;
    let old: i32 = ctx.read_at(16)?;
    let new: i32 = ctx.read_at(20)?;
    if new == TCP_ESTABLISHED && old == TCP_SYN_RECV {
        let sport: u16 = ctx.read_at(24)?;
        let slot = match WATCHED_PORTS.get(sport as u32) {
            Some(&v) if v != 0 => v - 1,
            _ => return Ok(()),
        };
        let family: u16 = ctx.read_at(28)?;
        let mut peer = [0u8; 16];
        if family == AF_INET {
            let v4: [u8; 4] = ctx.read_at(36)?;
            peer[10] = 0xff;
            peer[11] = 0xff;
            peer[12..16].copy_from_slice(&v4);
        } else {
            peer = ctx.read_at(56)?;
        }
        let st = new_conn(sport, ctx.read_at(26)?, slot, peer, FLAG_LOGIN);
        if CONNS.insert(&sk, &st, 0).is_err() {
            let n = drop_count(DROP_CONNS_FULL);
            if n.is_power_of_two() {
                warn!(ctx, "connection map full: a connection to port {} is not traced ({} on this CPU)", sport, n);
            }
            return Ok(());
        }
        let ev = conn_event(EVENT_OPEN, &st, sk);
        emit(ctx, &ev);
    } else if new == TCP_CLOSE {
        if let Some(st) = CONNS.get(&sk) {
            let mut rtt_us = 0;
            let off = core::ptr::read_volatile(&SRTT_OFFSET);
            if off != 0 {
                if let Ok(srtt) = bpf_probe_read_kernel((sk + off as u64) as *const u32) {
                    rtt_us = srtt >> 3; // srtt_us holds 8 x the smoothed RTT
                }
            }
            let mut ev = conn_event(EVENT_CLOSE, st, sk);
            ev.rtt_us = rtt_us;
            ev.value_ns = bpf_ktime_get_ns().saturating_sub(st.opened_ns);
            ev.bytes_in = st.bytes_in;
            ev.bytes_out = st.bytes_out;
            ev.requests = st.requests;
            ev.errors = st.errors;
            emit(ctx, &ev);
            let _ = CONNS.remove(&sk);
        }
    }
    Ok(())
}

/// Offset of `skc_num` (the local port, host order) in `struct sock_common`, stable since 2.6.
const SKC_NUM_OFFSET: u64 = 14;

/// This socket's local port when it is watched: one kernel read and one array lookup, so
/// sockets of other programs (clients, replication, the agent) cost almost nothing. BTF
/// hooks get `sk` as a typed kernel pointer and read the field with a plain load.
#[inline(always)]
unsafe fn watched_port<const BTF: bool>(sk: u64) -> Option<u16> {
    let port = if BTF {
        core::ptr::read_volatile((sk + SKC_NUM_OFFSET) as *const u16)
    } else {
        bpf_probe_read_kernel((sk + SKC_NUM_OFFSET) as *const u16).ok()?
    };
    match WATCHED_PORTS.get(port as u32) {
        Some(v) if *v != 0 => Some(port),
        _ => None,
    }
}

/// The socket's clock (tcp_sock.tcp_clock_cache, at the offset the agent found in BTF): the
/// kernel sets it to the time (CLOCK_MONOTONIC ns) it processed the last arriving segment or
/// started the last transmission. Read when the server reads a request, it is the request's
/// arrival (time queued in the socket included); when the server has sent, the response's
/// departure. Without the offset, the current time.
///
/// BTF programs turn `sk` into a typed `tcp_sock` pointer (bpf_skc_to_tcp_sock) and load the
/// field directly: the offset is a constant to the verifier, which checks the access against
/// the kernel's own layout. Classic tracepoints copy it with bpf_probe_read_kernel.
#[inline(always)]
unsafe fn sock_clock<const BTF: bool>(sk: u64) -> u64 {
    let off = core::ptr::read_volatile(&CLOCK_OFFSET);
    if off != 0 {
        if BTF {
            let tp = bpf_skc_to_tcp_sock(sk as *mut core::ffi::c_void);
            if !tp.is_null() {
                return core::ptr::read_volatile((tp as u64 + off as u64) as *const u64);
            }
        } else if let Ok(t) = bpf_probe_read_kernel((sk + off as u64) as *const u64) {
            return t;
        }
    }
    bpf_ktime_get_ns()
}

/// The user buffer of the current recv/send syscall, when it is read/write/recvfrom/sendto.
unsafe fn syscall_buffer() -> Option<u64> {
    let task = bpf_get_current_task_btf();
    let regs = bpf_task_pt_regs(task) as *const pt_regs;
    if regs.is_null() {
        return None;
    }
    // Direct loads: the verifier knows `regs` as a trusted BTF pointer to pt_regs and turns
    // them into inline probe loads, cheaper than two bpf_probe_read_kernel calls.
    let nr = core::ptr::read_volatile(&(*regs).orig_rax);
    match nr {
        SYS_READ | SYS_WRITE | SYS_SENDTO | SYS_RECVFROM => Some(core::ptr::read_volatile(&(*regs).rsi)),
        _ => None,
    }
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    if let (Ok(sk), Ok(ret)) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<i32>(20)) } {
        let _ = unsafe { on_recv::<false, _>(&ctx, sk, ret) };
    }
    0
}

/// The same hook as a BTF tracepoint (`sock_recv_length(struct sock *sk, int ret, int
/// flags)`): no trace record is built, so it costs less than the classic tracepoint. The
/// agent uses it when the kernel allows and the classic one otherwise.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let _ = unsafe { on_recv::<true, _>(&ctx, sk as u64, ret) };
    0
}

/// The state of a watched socket seen by the recv/send hooks: tracked since its handshake,
/// or adopted now (older than the programs).
#[inline(always)]
unsafe fn tracked_or_adopted<C: EbpfContext>(ctx: &C, sk: u64, port: u16) -> Option<*mut ConnState> {
    match CONNS.get_ptr_mut(&sk) {
        Some(st) => Some(st),
        None => sock_peer(sk).and_then(|(peer, pp)| adopt(ctx, sk, port, peer, pp)),
    }
}

unsafe fn on_recv<const BTF: bool, C: EbpfContext>(ctx: &C, sk: u64, ret: i32) -> Result<(), i32> {
    if ret <= 0 {
        return Ok(());
    }
    let Some(port) = watched_port::<BTF>(sk) else { return Ok(()) };
    let Some(st) = tracked_or_adopted(ctx, sk, port) else { return Ok(()) };
    client_bytes(&mut *st, sk, ret as u32, &UserBuffer::<BTF> { sk });
    Ok(())
}

/// Where the programs read a connection's bytes from, and when they were seen.
trait Bytes {
    /// Copy the first bytes into `dst` (up to its length); false when unreadable.
    unsafe fn read(&self, dst: &mut [u8]) -> bool;
    /// The time the client's bytes arrived.
    unsafe fn arrived(&self) -> u64;
    /// The time the server's bytes left, for a request that arrived at `start`.
    unsafe fn left(&self, start: u64) -> u64;
}

/// The user buffer of the server's recv/send syscall (tracepoint hooks).
struct UserBuffer<const BTF: bool> {
    sk: u64,
}

impl<const BTF: bool> Bytes for UserBuffer<BTF> {
    #[inline(always)]
    unsafe fn read(&self, dst: &mut [u8]) -> bool {
        match syscall_buffer() {
            Some(buf) => bpf_probe_read_user_buf(buf as *const u8, dst).is_ok(),
            None => false,
        }
    }

    #[inline(always)]
    unsafe fn arrived(&self) -> u64 {
        sock_clock::<BTF>(self.sk)
    }

    #[inline(always)]
    unsafe fn left(&self, start: u64) -> u64 {
        let end = sock_clock::<BTF>(self.sk);
        // Nothing transmitted yet (the data waits in the socket): the time it was handed over.
        if end <= start { bpf_ktime_get_ns() } else { end }
    }
}

/// The payload of a TCP segment (cgroup_skb hooks): `len` bytes at `off` in the packet.
struct Segment<'a> {
    ctx: &'a SkBuffContext,
    off: u32,
    len: u32,
}

impl Bytes for Segment<'_> {
    #[inline(always)]
    unsafe fn read(&self, dst: &mut [u8]) -> bool {
        let n = if self.len < dst.len() as u32 { self.len } else { dst.len() as u32 };
        // Read back opaquely, so the compiler checks the very value passed: the verifier
        // wants the helper's length proven within 1..=dst.len().
        let n = core::ptr::read_volatile(&n);
        if n == 0 || n > dst.len() as u32 {
            return false;
        }
        bpf_skb_load_bytes(self.ctx.skb.skb as *const _, self.off, dst.as_mut_ptr() as *mut _, n) == 0
    }

    #[inline(always)]
    unsafe fn arrived(&self) -> u64 {
        bpf_ktime_get_ns()
    }

    #[inline(always)]
    unsafe fn left(&self, _start: u64) -> u64 {
        bpf_ktime_get_ns()
    }
}

/// `n` new bytes from the client on a tracked connection. The first bytes received with
/// MySQL sequence id 0 after a response start a request.
#[inline(always)]
unsafe fn client_bytes<B: Bytes>(st: &mut ConnState, sk: u64, n: u32, src: &B) {
    st.bytes_in += n as u64;
    if st.flags & FLAG_SYNC != 0 {
        // Adopted mid-stream: wait for a request boundary, then follow the rhythm.
        if !at_request_boundary(n, src) {
            return;
        }
        st.flags &= !FLAG_SYNC;
        st.phase = PHASE_IDLE;
        st.cmd = 0;
    }
    if st.flags & (FLAG_LOGIN | FLAG_INFILE) != 0 {
        if st.flags & (FLAG_LOGIN | FLAG_TLS) == FLAG_LOGIN && is_ssl_request(n, src) {
            st.flags |= FLAG_TLS; // encrypted from here: the login never visibly ends
        }
        return; // authentication packets, or the file of a LOAD DATA LOCAL: no commands
    }
    // COM_STMT_SEND_LONG_DATA and COM_STMT_CLOSE get no response: the next bytes are a new
    // command.
    let no_reply = st.cmd == COM_STMT_SEND_LONG_DATA || st.cmd == COM_STMT_CLOSE;
    if st.phase == PHASE_REQUEST && !no_reply {
        return; // more bytes of the same request
    }
    let mut req = [0u8; REQ_PREFIX];
    if st.phase == PHASE_HEADER {
        // The payload of a command whose 4-byte header came alone (MariaDB and MySQL read a
        // packet that way; a client may write it that way): its first bytes name the command.
        let mut len = 4;
        if src.read(&mut req[4..]) {
            len = 4 + if n < (REQ_PREFIX as u32 - 4) { n } else { REQ_PREFIX as u32 - 4 };
        }
        start_request(st, sk, &req, len);
        return;
    }
    if n == 4 {
        // A header alone, after login and outside a multi-packet request: a command starts
        // (sequence id 0), timed from now. Its payload, next, names it.
        st.request_ns = src.arrived();
        st.phase = PHASE_HEADER;
        st.cmd = 0;
        return;
    }
    if !src.read(&mut req) || req[3] != 0 {
        return; // unreadable, or not the first packet of a command
    }
    st.request_ns = src.arrived();
    start_request(st, sk, &req, if n < REQ_PREFIX as u32 { n } else { REQ_PREFIX as u32 });
}

/// A request starts; `req` holds its first `len` bytes (packet header, command, start of
/// the statement). It is named now, while its bytes are at hand: the connection keeps the
/// command and the operation, not the bytes.
/// - COM_QUERY, COM_STMT_PREPARE: the statement's kind (a PREPARE is counted as such when
///   answered; the kind is what its statement id will execute as).
/// - COM_STMT_EXECUTE: the kind its PREPARE recorded, when the kernel saw it.
/// - COM_STMT_CLOSE: the statement's kind is forgotten.
#[inline(always)]
unsafe fn start_request(st: &mut ConnState, sk: u64, req: &[u8; REQ_PREFIX], len: u32) {
    st.phase = PHASE_REQUEST;
    if len < 5 {
        st.cmd = 0;
        st.op = OP_UNKNOWN as u8;
        return;
    }
    let cmd = req[4];
    st.cmd = cmd;
    let id = if len >= 9 { u32::from_le_bytes([req[5], req[6], req[7], req[8]]) } else { 0 };
    st.op = if cmd == COM_QUERY || cmd == COM_STMT_PREPARE {
        statement_kind(req, len)
    } else if cmd == COM_STMT_EXECUTE && id != 0 {
        executed_kind(st, sk, id)
    } else {
        command_op(cmd)
    } as u8;
    if cmd == COM_STMT_CLOSE && id != 0 {
        for i in 0..STMT_CACHE {
            if st.stmt_ids[i] == id {
                st.stmt_ids[i] = 0;
            }
        }
        let _ = STMTS.remove(&StmtKey { sock: sk, id, _pad: 0 });
    }
}

/// The kind of prepared statement `id` (recorded at its PREPARE_OK): the connection's own
/// cache first (a shared LRU lookup costs several times more), then the shared map.
#[inline(always)]
unsafe fn executed_kind(st: &mut ConnState, sk: u64, id: u32) -> u32 {
    for i in 0..STMT_CACHE {
        if st.stmt_ids[i] == id {
            return st.stmt_ops[i] as u32;
        }
    }
    if let Some(&kind) = STMTS.get(&StmtKey { sock: sk, id, _pad: 0 }) {
        cache_statement(st, id, kind);
        return kind;
    }
    OP_STMT_EXECUTE
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    if let (Ok(sk), Ok(ret)) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<i32>(20)) } {
        let _ = unsafe { on_send::<false, _>(&ctx, sk, ret) };
    }
    0
}

/// BTF variant of sock_send_length (see sock_recv_length_btf).
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let _ = unsafe { on_send::<true, _>(&ctx, sk as u64, ret) };
    0
}

unsafe fn on_send<const BTF: bool, C: EbpfContext>(ctx: &C, sk: u64, ret: i32) -> Result<(), i32> {
    if ret <= 0 {
        return Ok(());
    }
    let Some(port) = watched_port::<BTF>(sk) else { return Ok(()) };
    let Some(st) = tracked_or_adopted(ctx, sk, port) else { return Ok(()) };
    server_bytes(&mut *st, sk, ret as u32, &UserBuffer::<BTF> { sk });
    Ok(())
}

/// `n` new bytes from the server on a tracked connection: the first ones after a request
/// answer it.
#[inline(always)]
unsafe fn server_bytes<B: Bytes>(st: &mut ConnState, sk: u64, n: u32, src: &B) {
    st.bytes_out += n as u64;
    if st.flags & FLAG_SYNC != 0 {
        return; // adopted, not yet at a request boundary: bytes only
    }
    if st.flags & FLAG_LOGIN != 0 {
        // Authentication ends with the server's OK (also after caching_sha2's fast-auth
        // 0x01 0x03, in the same write or the next one).
        let mut resp = [0u8; 12];
        if src.read(&mut resp) && (resp[4] == 0x00 || (resp[4] == 0x01 && resp[5] == 0x03 && resp[10] == 0x00)) {
            st.flags &= !FLAG_LOGIN;
        }
        st.phase = PHASE_RESPONSE;
        return;
    }
    if st.phase != PHASE_REQUEST {
        // The server's answer to the file of a LOAD DATA LOCAL ends it.
        st.flags &= !FLAG_INFILE;
        st.phase = PHASE_RESPONSE;
        return;
    }
    let ns = src.left(st.request_ns).saturating_sub(st.request_ns);
    st.phase = PHASE_RESPONSE;
    st.requests += 1;
    // The response's header and first payload bytes: 0xff = ERR; a PREPARE_OK (0x00)
    // carries the statement id.
    let mut resp = [0u8; 12];
    let have_resp = src.read(&mut resp);
    let cmd = st.cmd;
    let mut op = st.op as u32;
    if have_resp {
        if cmd == COM_QUERY && resp[4] == 0xfb {
            st.flags |= FLAG_INFILE; // LOAD DATA LOCAL: the client sends a file next
        } else if cmd == COM_CHANGE_USER && (resp[4] == 0xfe || resp[4] == 0x01) {
            st.flags |= FLAG_LOGIN; // authentication goes on
        } else if cmd == COM_STMT_PREPARE && resp[4] == 0x00 {
            // PREPARE_OK: what this statement id executes as.
            let id = u32::from_le_bytes([resp[5], resp[6], resp[7], resp[8]]);
            let _ = STMTS.insert(&StmtKey { sock: sk, id, _pad: 0 }, &op, 0);
            cache_statement(st, id, op);
        }
    }
    if cmd == COM_STMT_PREPARE {
        op = OP_STMT_PREPARE;
    }
    let err = have_resp && resp[4] == 0xff;
    st.errors += err as u64;
    let Some(agg) = AGG.get_ptr_mut(st.port_slot as u32 * OPS as u32 + op) else { return };
    let agg = &mut *agg;
    agg.count += 1;
    agg.errors += err as u64;
    agg.sum_ns += ns;
    if ns > agg.max_ns {
        agg.max_ns = ns;
    }
    let le = le_bucket(ns);
    if le < agg.le.len() {
        agg.le[le] += 1;
    }
    let b = hist_bucket(ns);
    if b < HIST_BUCKETS {
        agg.hist[b] += 1;
    }
}

#[inline(always)]
fn cache_statement(st: &mut ConnState, id: u32, kind: u32) {
    let i = (st.stmt_next as usize) % STMT_CACHE;
    st.stmt_ids[i] = id;
    st.stmt_ops[i] = kind as u8;
    st.stmt_next = st.stmt_next.wrapping_add(1);
}

/// Programs that do nothing, on the same hooks: `breakwater-agent --calibrate-noop` attaches
/// only these (to the hooks the agent would pick), so the bench can tell the kernel's own
/// cost of running any program on these hooks (with bpf_stats accounting) from the agent's.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_noop(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_noop(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cgroup_skb(ingress)]
pub fn ingress_noop(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(egress)]
pub fn egress_noop(_ctx: SkBuffContext) -> i32 {
    1
}

/// cgroup_skb/ingress, on the cgroups of the MySQL servers: every TCP segment that reaches
/// a server socket. Only segments with new payload on tracked connections do anything, and
/// the programs run for the servers' sockets alone (a tracepoint runs for every socket on
/// the host). Always lets the packet through.
#[cgroup_skb(ingress)]
pub fn mysql_ingress(ctx: SkBuffContext) -> i32 {
    let _ = unsafe { on_segment::<true>(&ctx) };
    1
}

/// cgroup_skb/egress: every TCP segment a server socket sends (see mysql_ingress).
#[cgroup_skb(egress)]
pub fn mysql_egress(ctx: SkBuffContext) -> i32 {
    let _ = unsafe { on_segment::<false>(&ctx) };
    1
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// (offset of the TCP payload, sequence number, IP header length) of a TCP segment over IPv4 or IPv6 (without
/// extension headers). The headers are read in place when they are in the packet's linear
/// part, as they usually are; else copied out.
#[inline(always)]
unsafe fn tcp_segment(ctx: &SkBuffContext) -> Option<(u32, u32, u32)> {
    let skb = ctx.skb.skb;
    let v4 = match u16::from_be((*skb).protocol as u16) {
        ETH_P_IP => true,
        ETH_P_IPV6 => false,
        _ => return None,
    };
    let data = (*skb).data as usize;
    let end = (*skb).data_end as usize;
    let (proto, ip_len) = if v4 {
        if data + 20 > end {
            return tcp_segment_copied(ctx, v4);
        }
        (*((data + 9) as *const u8), ((*(data as *const u8) & 0x0f) as usize) * 4)
    } else {
        if data + 40 > end {
            return tcp_segment_copied(ctx, v4);
        }
        (*((data + 6) as *const u8), 40)
    };
    if proto != IPPROTO_TCP as u8 {
        return None;
    }
    let tcp = data + ip_len;
    if tcp + 20 > end {
        return tcp_segment_copied(ctx, v4);
    }
    let seq = u32::from_be(core::ptr::read_unaligned((tcp + 4) as *const u32));
    let doff = *((tcp + 12) as *const u8);
    Some((ip_len as u32 + (doff >> 4) as u32 * 4, seq, ip_len as u32))
}

/// tcp_segment for headers outside the linear part: copied with bpf_skb_load_bytes.
#[inline(never)]
unsafe fn tcp_segment_copied(ctx: &SkBuffContext, v4: bool) -> Option<(u32, u32, u32)> {
    let (proto, ip_len) = if v4 {
        (ctx.load::<u8>(9).ok()?, (ctx.load::<u8>(0).ok()? & 0x0f) as u32 * 4)
    } else {
        (ctx.load::<u8>(6).ok()?, 40)
    };
    if proto != IPPROTO_TCP as u8 {
        return None;
    }
    let doff: u8 = ctx.load(ip_len as usize + 12).ok()?;
    let seq = u32::from_be(ctx.load::<u32>(ip_len as usize + 4).ok()?);
    Some((ip_len + (doff >> 4) as u32 * 4, seq, ip_len))
}

/// A segment's payload on a tracked connection, in order: retransmitted bytes (already
/// seen) are skipped, so each byte counts once. Segments that arrive after a gap (reordered
/// or lost on the way) are taken as they come and counted in DROPS: the bytes of the gap
/// are not seen, and a request that started in them is not timed.
unsafe fn on_segment<const INGRESS: bool>(ctx: &SkBuffContext) -> Result<(), i32> {
    let skb = ctx.skb.skb;
    // The socket's own port: the server's for its sockets, an ephemeral one for clients
    // that share the cgroup.
    if !matches!(WATCHED_PORTS.get((*skb).local_port), Some(v) if *v != 0) {
        return Ok(());
    }
    let len = (*skb).len;
    let Some((off, seq, ip_len)) = tcp_segment(ctx) else { return Ok(()) };
    if off >= len {
        return Ok(()); // no payload: ACK, SYN, FIN
    }
    let n = len - off;
    let sk = (*skb).__bindgen_anon_2.sk as u64;
    let st = match CONNS.get_ptr_mut(&sk) {
        Some(st) => st,
        None => {
            let port = (*skb).local_port as u16;
            match segment_peer(ctx, INGRESS, ip_len).and_then(|(peer, pp)| adopt(ctx, sk, port, peer, pp)) {
                Some(st) => st,
                None => return Ok(()),
            }
        }
    };
    let st = &mut *st;
    let (known, next) = if INGRESS { (FLAG_SEQ_IN, &mut st.rcv_next) } else { (FLAG_SEQ_OUT, &mut st.snd_next) };
    let mut skip = 0;
    if st.flags & known != 0 {
        let behind = next.wrapping_sub(seq) as i32;
        if behind >= n as i32 {
            return Ok(()); // a retransmission of bytes already seen
        }
        if behind > 0 {
            skip = behind as u32;
        } else if behind < 0 {
            drop_count(DROP_TCP_GAP);
        }
    }
    *next = seq.wrapping_add(n);
    st.flags |= known;
    let src = Segment { ctx, off: off + skip, len: n - skip };
    if INGRESS {
        client_bytes(st, sk, n - skip, &src);
    } else {
        server_bytes(st, sk, n - skip, &src);
    }
    Ok(())
}

/// tcp:tcp_retransmit_skb on a tracked connection: one event per retransmitted segment.
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = unsafe { on_retransmit(&ctx) };
    0
}

unsafe fn on_retransmit(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.read_at(16)?;
    let Some(st) = CONNS.get(&sk) else { return Ok(()) };
    let ev = conn_event(EVENT_RETRANSMIT, st, sk);
    emit(ctx, &ev);
    Ok(())
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
