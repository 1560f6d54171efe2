//! Loads the kernel programs, attaches them, and pumps their events into the statistics.
//!
//! Hooks are classic tracepoints (sock:inet_sock_set_state, sock:sock_recv_length,
//! sock:sock_send_length), which need tracefs: it is mounted when missing. Where the recv/send
//! tracepoints do not exist (kernels before 6.x), the agent says so and keeps connection
//! metrics only.

use crate::prometheus::Shared;
use anyhow::{anyhow, bail, Context};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint};
use aya::{include_bytes_aligned, Btf, Ebpf, EbpfLoader};
use breakwater_agent_common::{
    ConnState, Event, OpAgg, DROP_CONNS_FULL, DROP_REASONS, DROP_RINGBUF_FULL, DROP_TCP_GAP, GLOBAL_CLOCK_OFFSET, GLOBAL_SRTT_OFFSET, MAX_PORTS, OPS, OP_NAMES,
};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct Loaded {
    _ebpf: Ebpf,
    /// The watched ports, in slot order.
    ports: Vec<u16>,
    events: Option<RingBuf<MapData>>,
    agg: Option<PerCpuArray<MapData, OpAgg>>,
    conns: Option<HashMap<MapData, u64, ConnState>>,
    /// The kernel programs' own log lines (aya-log: rare conditions such as a full map),
    /// written to this process's log at each pump.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub drops: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    pub hooks: String,
    /// What sees the servers' bytes: "cgroup_skb", "tracepoints", or "connections_only"
    /// when neither attached (breakwater_agent_hooks_info).
    pub mode: &'static str,
}

fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events/sock").exists() {
        return Ok(());
    }
    let r = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        bail!("tracefs is not mounted and mounting it failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Which hooks see the servers' bytes (`--hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Hooks {
    /// cgroup_skb where it attaches, else the tracepoints.
    Auto,
    /// cgroup_skb on the servers' cgroups: runs for the servers' packets only.
    Cgroup,
    /// sock_recv_length / sock_send_length: run for every socket's reads and writes.
    Tracepoints,
}

/// Attach the segment programs `ingress` and `egress` to the cgroups of the servers on
/// `ports`; a description of where, for the log.
fn attach_cgroup_skb(ebpf: &mut Ebpf, ports: &[u16], ingress: &str, egress: &str) -> anyhow::Result<String> {
    let cgroups = crate::cgroup::server_cgroups(ports)?;
    let mut names = Vec::new();
    for (prog, kind) in [(ingress, CgroupSkbAttachType::Ingress), (egress, CgroupSkbAttachType::Egress)] {
        let p: &mut CgroupSkb = ebpf.program_mut(prog).ok_or_else(|| anyhow!("program {prog} missing"))?.try_into()?;
        p.load().with_context(|| format!("loading {prog}"))?;
        for (dir, _) in &cgroups {
            let f = std::fs::File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
            // A BPF link (kernels since 5.7): other programs on the cgroup (systemd's IP
            // accounting, ...) stay attached and keep running.
            p.attach(f, kind, CgroupAttachMode::Single).with_context(|| format!("attaching {prog} to {}", dir.display()))?;
        }
    }
    for (dir, why) in &cgroups {
        names.push(format!("cgroup_skb:{} ({why})", dir.display()));
    }
    Ok(names.join(","))
}

pub fn load(ports: &[u16], max_connections: u32, choice: Hooks) -> anyhow::Result<Loaded> {
    ensure_tracefs()?;
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() || ports.len() > MAX_PORTS {
        bail!("watch between 1 and {MAX_PORTS} ports (got {})", ports.len());
    }

    let (srtt_offset, clock_offset) = tcp_sock_offsets();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("AGG", (ports.len() * OPS) as u32)
        .map_max_entries("CONNS", max_connections)
        .override_global(GLOBAL_SRTT_OFFSET, &srtt_offset, true)
        .override_global(GLOBAL_CLOCK_OFFSET, &clock_offset, true)
        .load(include_bytes_aligned!(concat!(env!("OUT_DIR"), "/breakwater-agent-ebpf.o")))
        .context("loading the eBPF object into the kernel (is BPF enabled?)")?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "the kernel programs' log lines will not be shown");
            None
        }
    };
    let mut hooks = Vec::new();
    let state: &mut TracePoint = ebpf
        .program_mut("inet_sock_set_state")
        .ok_or_else(|| anyhow!("program inet_sock_set_state missing from the eBPF object"))?
        .try_into()?;
    state.load()?;
    state.attach("sock", "inet_sock_set_state").context("attaching tracepoint sock:inet_sock_set_state")?;
    hooks.push("sock:inet_sock_set_state".to_string());
    let mut mode = "connections_only";
    if choice != Hooks::Tracepoints {
        match attach_cgroup_skb(&mut ebpf, &ports, "mysql_ingress", "mysql_egress") {
            Ok(desc) => {
                hooks.push(desc);
                mode = "cgroup_skb";
            }
            Err(e) if choice == Hooks::Cgroup => return Err(e.context("cgroup_skb hooks (--hooks cgroup)")),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cgroup_skb hooks unavailable: using the recv/send tracepoints, which run for every socket on the host"),
        }
    }
    if mode != "cgroup_skb" && attach_tracepoints(&mut ebpf, &mut hooks)? {
        mode = "tracepoints";
    }
    let retrans: &mut TracePoint =
        ebpf.program_mut("tcp_retransmit_skb").ok_or_else(|| anyhow!("program tcp_retransmit_skb missing"))?.try_into()?;
    match retrans.load().map_err(anyhow::Error::from).and_then(|_| retrans.attach("tcp", "tcp_retransmit_skb").map_err(anyhow::Error::from)) {
        Ok(_) => hooks.push("tcp:tcp_retransmit_skb".to_string()),
        Err(e) => tracing::warn!(hook = "tcp:tcp_retransmit_skb", error = %e, "hook unavailable: retransmits are not counted"),
    }
    let mut ports_array: aya::maps::Array<_, u8> =
        aya::maps::Array::try_from(ebpf.map_mut("WATCHED_PORTS").ok_or_else(|| anyhow!("map WATCHED_PORTS missing"))?)?;
    for (slot, p) in ports.iter().enumerate() {
        ports_array.set(*p as u32, slot as u8 + 1, 0).with_context(|| format!("watching port {p}"))?;
    }
    let events = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or_else(|| anyhow!("map EVENTS missing"))?)?;
    let drops = PerCpuArray::try_from(ebpf.take_map("DROPS").ok_or_else(|| anyhow!("map DROPS missing"))?)?;
    let agg = PerCpuArray::try_from(ebpf.take_map("AGG").ok_or_else(|| anyhow!("map AGG missing"))?)?;
    let conns = HashMap::try_from(ebpf.take_map("CONNS").ok_or_else(|| anyhow!("map CONNS missing"))?)?;
    Ok(Loaded {
        _ebpf: ebpf,
        ports,
        events: Some(events),
        agg: Some(agg),
        conns: Some(conns),
        logger,
        drops: Arc::new(Mutex::new(drops)),
        hooks: hooks.join(","),
        mode,
    })
}

/// The recv/send tracepoints: BTF ones where the kernel allows, else the classic ones.
/// Whether both attached.
fn attach_tracepoints(ebpf: &mut Ebpf, hooks: &mut Vec<String>) -> anyhow::Result<bool> {
    let mut attached = 0;
    let btf = Btf::from_sys_fs().ok();
    for name in ["sock_recv_length", "sock_send_length"] {
        // Prefer the BTF tracepoint (cheaper); fall back to the classic one.
        let mut btf_err = None;
        if let Some(btf) = &btf {
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(&format!("{name}_btf"))
                .ok_or_else(|| anyhow!("program {name}_btf missing"))?
                .try_into()?;
            match prog.load(name, btf).map_err(anyhow::Error::from).and_then(|_| prog.attach().map_err(anyhow::Error::from)) {
                Ok(_) => {
                    hooks.push(format!("tp_btf:{name}"));
                    attached += 1;
                    continue;
                }
                Err(e) => btf_err = Some(e),
            }
        }
        let prog: &mut TracePoint = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
        match prog.load().map_err(anyhow::Error::from).and_then(|_| prog.attach("sock", name).map_err(anyhow::Error::from)) {
            Ok(_) => {
                hooks.push(format!("sock:{name}"));
                attached += 1;
            }
            Err(e) => tracing::warn!(
                hook = name,
                error = %e,
                btf_error = ?btf_err.map(|e| e.to_string()),
                "hook unavailable: request latency, bytes and errors are not measured; connection metrics only"
            ),
        }
    }
    Ok(attached == 2)
}

/// Offsets in `struct tcp_sock` (which depend on the kernel's version and configuration),
/// from the kernel's BTF: (srtt_us, tcp_clock_cache), 0 where unknown.
/// - RTT at close reads srtt_us.
/// - Request timing reads tcp_clock_cache (kernels since 4.20); without it, the programs
///   read the clock themselves.
fn tcp_sock_offsets() -> (u32, u32) {
    let btf = match std::fs::read("/sys/kernel/btf/vmlinux") {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no kernel BTF: RTT at close unavailable, requests timed from the server's reads and writes");
            return (0, 0);
        }
    };
    let srtt = crate::btf::member_offset(&btf, "tcp_sock", "srtt_us").unwrap_or_else(|e| {
        tracing::warn!(error = %e, "RTT at close unavailable: no offset for tcp_sock.srtt_us in the kernel's BTF");
        0
    });
    let clock = crate::btf::member_offset(&btf, "tcp_sock", "tcp_clock_cache").unwrap_or_else(|e| {
        tracing::info!(error = %e, "no tcp_sock.tcp_clock_cache: requests are timed from the reads and writes of the server");
        0
    });
    (srtt, clock)
}

/// `--calibrate-noop`: attach only the programs that do nothing, to the hooks `load` would
/// pick for `ports`, and keep them until the process ends (for the bench's baseline).
pub fn load_noop(ports: &[u16], choice: Hooks) -> anyhow::Result<(Ebpf, String)> {
    let mut ebpf = Ebpf::load(include_bytes_aligned!(concat!(env!("OUT_DIR"), "/breakwater-agent-ebpf.o")))
        .context("loading the eBPF object into the kernel (is BPF enabled?)")?;
    if choice != Hooks::Tracepoints {
        let hooks = attach_cgroup_skb(&mut ebpf, ports, "ingress_noop", "egress_noop")?;
        return Ok((ebpf, hooks));
    }
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    for name in ["sock_recv_length", "sock_send_length"] {
        let prog: &mut BtfTracePoint =
            ebpf.program_mut(&format!("{name}_noop")).ok_or_else(|| anyhow!("program {name}_noop missing"))?.try_into()?;
        prog.load(name, &btf)?;
        prog.attach()?;
    }
    Ok((ebpf, "tp_btf:sock_recv_length,tp_btf:sock_send_length".into()))
}

/// Counts of what the kernel could not trace, by reason (agent-common's DROP_REASONS).
pub type Drops = [u64; DROP_REASONS.len()];

/// Events lost in the kernel: [ring buffer full, connection map full].
pub fn read_drops(drops: &Arc<Mutex<PerCpuArray<MapData, u64>>>) -> Drops {
    let Ok(d) = drops.lock() else { return [0; DROP_REASONS.len()] };
    let sum = |i: u32| d.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
    [sum(DROP_RINGBUF_FULL), sum(DROP_CONNS_FULL), sum(DROP_TCP_GAP)]
}

/// Every 250 ms: drain the ring buffer (connection events), then read the request
/// aggregates and the open connections' counters. The kernel side never wakes the agent up
/// (BPF_RB_NO_WAKEUP); the 1 MiB ring holds about 10k events, many times what 250 ms of
/// connection churn produce (drops are counted).
pub async fn pump_events(loaded: &mut Loaded, stats: Shared) -> anyhow::Result<()> {
    let mut rb = loaded.events.take().ok_or_else(|| anyhow!("event ring buffer already taken"))?;
    let agg = loaded.agg.take().ok_or_else(|| anyhow!("aggregates already taken"))?;
    let conns = loaded.conns.take().ok_or_else(|| anyhow!("connection map already taken"))?;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut batch = Vec::with_capacity(4096);
    let on_segments = loaded.mode == "cgroup_skb";
    let mut blind = BlindSpot::default();
    // Connections open before the programs attached: counted now, adopted by the programs
    // on their first bytes (listed after attaching, so none falls between the two).
    let open_before = crate::procfs::established_now(&loaded.ports);
    if !open_before.is_empty() {
        tracing::info!(connections = open_before.len(), "connections open before the agent started: tracked from their next request");
    }
    if let Ok(mut s) = stats.lock() {
        s.seed(open_before);
    }
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        ticks += 1;
        if let Some(l) = loaded.logger.as_mut() {
            l.flush();
        }
        batch.clear();
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote an `Event` (same #[repr(C)] type) at this address.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
            }
        }
        if on_segments {
            blind.check(&batch);
        }
        let ops = read_aggregates(&agg, &loaded.ports);
        let live: Vec<(u64, ConnState)> = conns.iter().filter_map(Result::ok).collect();
        if let Ok(mut s) = stats.lock() {
            for ev in &batch {
                s.record(ev);
            }
            s.refresh(ops, live.into_iter());
        }
        // Seeded connections that close without a byte seen: found gone once a second.
        if ticks % 4 == 0 && stats.lock().map(|s| s.has_seeded()).unwrap_or(false) {
            let now = crate::procfs::established_now(&loaded.ports);
            if let Ok(mut s) = stats.lock() {
                s.reconcile_seeded(&now);
            }
        }
    }
}

/// Tells when the cgroup_skb programs do not see a port's connections: a MySQL server sends
/// a greeting on every connection it accepts, so connections that close with no byte seen
/// at all, and none with bytes, mean the server's sockets are in a cgroup the programs are
/// not attached to (the server was moved after it started listening). Said once per port.
#[derive(Default)]
struct BlindSpot {
    /// Per port: (connections closed with no byte seen, some connection had bytes, said).
    ports: std::collections::HashMap<u16, (u32, bool, bool)>,
}

impl BlindSpot {
    fn check(&mut self, events: &[Event]) {
        for ev in events.iter().filter(|e| e.kind == breakwater_agent_common::EVENT_CLOSE) {
            let (silent, seen, said) = self.ports.entry(ev.port).or_default();
            if ev.bytes_in + ev.bytes_out > 0 {
                *seen = true;
            } else {
                *silent += 1;
            }
            if *silent >= 3 && !*seen && !*said {
                *said = true;
                tracing::warn!(
                    port = ev.port,
                    connections = *silent,
                    "the cgroup_skb programs see no bytes on this port's connections: the server's sockets are in another cgroup (was it moved after it started listening?); run the agent with --hooks tracepoints"
                );
            }
        }
    }
}

/// The kernel's request aggregates, summed over CPUs, per (port, operation).
fn read_aggregates(agg: &PerCpuArray<MapData, OpAgg>, ports: &[u16]) -> Vec<((u16, &'static str), OpAgg)> {
    let mut out = Vec::new();
    for (slot, port) in ports.iter().enumerate() {
        for (op, name) in OP_NAMES.iter().enumerate() {
            if let Ok(per_cpu) = agg.get(&((slot * OPS + op) as u32), 0) {
                let total = crate::stats::sum_cpus(per_cpu.iter());
                if total.count > 0 {
                    out.push(((*port, *name), total));
                }
            }
        }
    }
    out
}
