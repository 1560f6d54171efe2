//! Breakwater's kernel programs: MySQL server sockets seen from the kernel.
//!
//! - `inet_sock_set_state`: a passive open on a watched port (SYN_RECV -> ESTABLISHED)
//!   starts tracking the socket; its transition to CLOSE ends it (matched by socket
//!   address: the local port is already zero then).
//! - `sock_recv_length` / `sock_send_length`: on tracked sockets, the first bytes received
//!   with MySQL sequence id 0 start a request; the first bytes sent after it end it. The
//!   request's first bytes and the response's first byte are read from the syscall's user
//!   buffer, so the agent can name the command and count ERR responses.
//!
//! - `tcp_retransmit_skb`: retransmitted segments on tracked sockets.
//! - At close, the connection's smoothed RTT (tcp_sock.srtt_us, at the offset the agent
//!   found in the kernel's BTF).
//!
//! Classic tracepoints with the field offsets of their format files (sock:*, stable since
//! 4.16/6.x); maps have fixed sizes and overflows are counted in DROPS.
#![no_std]
#![no_main]

use aya_ebpf::bindings::pt_regs;
use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user_buf, bpf_task_pt_regs};
use aya_ebpf::macros::{btf_tracepoint, map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{BtfTracePointContext, TracePointContext};
use breakwater_agent_common::*;

#[map]
static WATCHED: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);
/// The same ports as an array indexed by port: the cheapest possible first filter for the
/// recv/send hooks, which fire for every socket on the host.
#[map]
static WATCHED_PORTS: Array<u8> = Array::with_max_entries(65536, 0);
#[map]
static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(65536, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);
/// Offsets the agent found in the kernel's BTF (see CONFIG_* in agent-common).
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(4, 0);

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

fn drop_count(idx: u32) {
    if let Some(p) = DROPS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

/// BPF_RB_NO_WAKEUP: the agent drains the ring buffer on a timer, so no event pays for
/// waking it up.
const BPF_RB_NO_WAKEUP: u64 = 1;

fn emit(ev: &Event) {
    if EVENTS.output::<Event>(ev, BPF_RB_NO_WAKEUP).is_err() {
        drop_count(DROP_RINGBUF_FULL);
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
        response_err: 0,
        _pad: [0; 3],
        request_len: 0,
        sock: sk,
        response: [0; 12],
        rtt_us: 0,
        value_ns: 0,
        bytes_in: 0,
        bytes_out: 0,
        requests: 0,
        request: [0; REQ_PREFIX],
    }
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
        if WATCHED.get(&sport).is_none() {
            return Ok(());
        }
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
        let st = ConnState {
            port: sport,
            peer_port: ctx.read_at(26)?,
            phase: PHASE_IDLE,
            skip_payload: 0,
            _pad: [0; 2],
            request_len: 0,
            peer_addr: peer,
            opened_ns: bpf_ktime_get_ns(),
            request_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            requests: 0,
            request: [0; REQ_PREFIX],
        };
        if CONNS.insert(&sk, &st, 0).is_err() {
            drop_count(DROP_CONNS_FULL);
            return Ok(());
        }
        let ev = conn_event(EVENT_OPEN, &st, sk);
        emit(&ev);
    } else if new == TCP_CLOSE {
        if let Some(st) = CONNS.get(&sk) {
            let mut rtt_us = 0;
            if let Some(&off) = CONFIG.get(CONFIG_SRTT_OFFSET) {
                if off != 0 {
                    if let Ok(srtt) = bpf_probe_read_kernel((sk + off as u64) as *const u32) {
                        rtt_us = srtt >> 3; // srtt_us holds 8 x the smoothed RTT
                    }
                }
            }
            let mut ev = conn_event(EVENT_CLOSE, st, sk);
            ev.rtt_us = rtt_us;
            ev.value_ns = bpf_ktime_get_ns().saturating_sub(st.opened_ns);
            ev.bytes_in = st.bytes_in;
            ev.bytes_out = st.bytes_out;
            ev.requests = st.requests;
            emit(&ev);
            let _ = CONNS.remove(&sk);
        }
    }
    Ok(())
}

/// Offset of `skc_num` (the local port, host order) in `struct sock_common`, stable since 2.6.
const SKC_NUM_OFFSET: u64 = 14;

/// Whether this socket's local port is watched: one kernel read and one array lookup, so
/// sockets of other programs (clients, replication, the agent) cost almost nothing.
unsafe fn on_watched_port(sk: u64) -> bool {
    let Ok(port) = bpf_probe_read_kernel((sk + SKC_NUM_OFFSET) as *const u16) else { return false };
    matches!(WATCHED_PORTS.get(port as u32), Some(v) if *v != 0)
}

/// The user buffer of the current recv/send syscall, when it is read/write/recvfrom/sendto.
unsafe fn syscall_buffer() -> Option<u64> {
    let task = bpf_get_current_task_btf();
    let regs = bpf_task_pt_regs(task) as *const pt_regs;
    if regs.is_null() {
        return None;
    }
    let nr = bpf_probe_read_kernel(&(*regs).orig_rax).ok()?;
    match nr {
        SYS_READ | SYS_WRITE | SYS_SENDTO | SYS_RECVFROM => bpf_probe_read_kernel(&(*regs).rsi).ok(),
        _ => None,
    }
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    if let (Ok(sk), Ok(ret)) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<i32>(20)) } {
        let _ = unsafe { on_recv(sk, ret) };
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
    let _ = unsafe { on_recv(sk as u64, ret) };
    0
}

unsafe fn on_recv(sk: u64, ret: i32) -> Result<(), i32> {
    if ret <= 0 {
        return Ok(());
    }
    if !on_watched_port(sk) {
        return Ok(());
    }
    let Some(st) = CONNS.get_ptr_mut(&sk) else { return Ok(()) };
    let st = &mut *st;
    st.bytes_in += ret as u64;
    // COM_STMT_SEND_LONG_DATA (0x18) and COM_STMT_CLOSE (0x19) get no response: the next
    // bytes are a new command.
    let no_reply = st.request_len > 4 && (st.request[4] == 0x18 || st.request[4] == 0x19);
    if st.phase == PHASE_REQUEST && !no_reply {
        // More bytes of the same request. MariaDB reads the 4-byte packet header first and
        // the payload next: complete the prefix from the payload read.
        if st.request_len == 4 {
            if let Some(buf) = syscall_buffer() {
                if bpf_probe_read_user_buf(buf as *const u8, &mut st.request[4..]).is_ok() {
                    let more = if (ret as u32) < (REQ_PREFIX as u32 - 4) { ret as u32 } else { REQ_PREFIX as u32 - 4 };
                    st.request_len = 4 + more;
                }
            }
        }
        return Ok(());
    }
    if st.skip_payload != 0 {
        st.skip_payload = 0;
        return Ok(());
    }
    let Some(buf) = syscall_buffer() else { return Ok(()) };
    let mut head = [0u8; REQ_PREFIX];
    if bpf_probe_read_user_buf(buf as *const u8, &mut head).is_err() {
        return Ok(());
    }
    // A command starts a new exchange with sequence id 0 (login packets have 1 and up).
    if head[3] != 0 {
        if ret == 4 {
            st.skip_payload = 1; // its payload comes in the next read
        }
        return Ok(());
    }
    st.phase = PHASE_REQUEST;
    st.request_ns = bpf_ktime_get_ns();
    st.request = head;
    st.request_len = if (ret as u32) < REQ_PREFIX as u32 { ret as u32 } else { REQ_PREFIX as u32 };
    Ok(())
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    if let (Ok(sk), Ok(ret)) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<i32>(20)) } {
        let _ = unsafe { on_send(sk, ret) };
    }
    0
}

/// BTF variant of sock_send_length (see sock_recv_length_btf).
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let _ = unsafe { on_send(sk as u64, ret) };
    0
}

unsafe fn on_send(sk: u64, ret: i32) -> Result<(), i32> {
    if ret <= 0 {
        return Ok(());
    }
    if !on_watched_port(sk) {
        return Ok(());
    }
    let Some(st) = CONNS.get_ptr_mut(&sk) else { return Ok(()) };
    let st = &mut *st;
    st.bytes_out += ret as u64;
    if st.phase != PHASE_REQUEST {
        st.phase = PHASE_RESPONSE;
        return Ok(());
    }
    let now = bpf_ktime_get_ns();
    st.phase = PHASE_RESPONSE;
    st.requests += 1;
    // Written in place in the ring buffer: no Event built on the stack and copied.
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        drop_count(DROP_RINGBUF_FULL);
        return Ok(());
    };
    let ev = slot.as_mut_ptr();
    (*ev).kind = EVENT_REQUEST;
    (*ev).port = st.port;
    (*ev).peer_port = st.peer_port;
    (*ev).peer_addr = st.peer_addr;
    (*ev)._pad = [0; 3];
    (*ev).request_len = st.request_len;
    (*ev).sock = sk;
    (*ev).rtt_us = 0;
    (*ev).value_ns = now.saturating_sub(st.request_ns);
    (*ev).bytes_in = 0;
    (*ev).bytes_out = 0;
    (*ev).requests = 0;
    (*ev).request = st.request;
    (*ev).response = [0; 12];
    (*ev).response_err = 0;
    if let Some(buf) = syscall_buffer() {
        if bpf_probe_read_user_buf(buf as *const u8, &mut (*ev).response).is_ok() {
            (*ev).response_err = ((*ev).response[4] == 0xff) as u8;
        }
    }
    slot.submit(BPF_RB_NO_WAKEUP);
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
    emit(&ev);
    Ok(())
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
