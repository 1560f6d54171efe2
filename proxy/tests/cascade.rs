//! The seed's outage, replayed on the lab (`cargo xtask drill cascade`), and load-aware
//! failover with only unfit candidates. These tests change the lab's topology and limit its
//! nodes' cgroups, so `cargo xtask test` runs each alone, from and back to a fresh lab.
//!
//! The scenario, the same for both failover policies:
//! - a steady load through the proxy that the primary (3307) carries: writers (INSERTs, each
//!   acknowledged id recorded), readers (point SELECTs, to the replicas), and reporters (a
//!   GROUP BY report that query rule 50 sends to the writer, marked `shed_priority = 1`;
//!   its clients give up after 3 s and retry on a new connection, as applications do);
//! - semi-synchronous replication (AFTER_SYNC): an acknowledged write is on a replica;
//! - replica 3308 is weak: a CPU limit (0.3 cores) and a memory limit (its anonymous memory
//!   as a replica plus 48 MiB) on its cgroup. It serves its share of reads and applies the writes as a
//!   replica, but cannot carry the primary's load;
//! - 3308 is the most advanced replica: 3309's IO thread is stopped a second before the
//!   kill, so a choice by position alone picks 3308;
//! - kill -9 of the primary; the run goes on for `after`.
//!
//! A server that dies after the kill is not killed by the drill: the kernel OOM-kills mysqld
//! when its cgroup runs out of memory (the report queries' temporary tables, piling up on a
//! slow server as their clients retry). Each death is reported with its cause (the cgroup's
//! `oom_kill` count says whether it was the OOM killer).
//!
//! Every run prints `DRILL-TIMELINE` lines and one `DRILL-JSON` line, which
//! `cargo xtask drill cascade` collects into the side-by-side timeline and `--json` output.

mod common;

use common::*;
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SCHEMA: &str = "sbtest_cascade";
const WEAK: u16 = 3308;
const STRONG: u16 = 3309;
const ALL: [u16; 3] = [3307, 3308, 3309];
const BIG_ROWS: usize = 20_000;
/// The weak replica's limits: CPU cores, and memory above what it holds as a replica.
const WEAK_CPU: f64 = 0.3;
const WEAK_MEMORY_HEADROOM_MIB: u64 = 48;

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The drill's proxy configuration: the lab default with room for the load's connections
/// (200 per server, as a production proxy would have), the report rule, and the policy.
fn config(policy: &str) -> String {
    let report_rule = "[[query_rules]]\nrule_id = 50\nmatch_pattern = '^/\\* report \\*/'\ndestination_hostgroup = 10\napply = true\nshed_priority = 1\n\n";
    breakwater_proxy::config::DEFAULT_TOML
        .replace("max_connections = 20", "max_connections = 200")
        .replacen("[[query_rules]]\nrule_id = 100", &format!("{report_rule}[[query_rules]]\nrule_id = 100"), 1)
        .replace("policy = \"breakwater\"", &format!("policy = \"{policy}\""))
}

/// Lifts every node's CPU and memory limits when dropped (the test may fail half-way).
struct Limits;

impl Drop for Limits {
    fn drop(&mut self) {
        for p in ALL {
            let _ = breakwater_testkit::set_cpu_limit(p, None);
            let _ = breakwater_testkit::set_memory_limit(p, None);
        }
    }
}

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent of the same build, reporting to the proxy's OTLP receiver every 500 ms.
fn start_agent(proxy: &Proxy) -> Agent {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("breakwater-agent");
    assert!(bin.exists(), "{} is missing: build the workspace first", bin.display());
    let child = std::process::Command::new(bin)
        .args(["--ports", "3307,3308,3309", "--prometheus-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--otlp-http-endpoint", &format!("http://127.0.0.1:{}/v1/metrics", proxy.admin_port), "--export-interval-ms", "500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn breakwater-agent");
    Agent(child)
}

/// The OOM killer's count for a node's memory cgroup (v2 memory.events, v1 memory.oom_control).
fn oom_kills(port: u16) -> u64 {
    for dir in breakwater_testkit::node_dirs(port) {
        for (file, key) in [("memory.events", "oom_kill "), ("memory.oom_control", "oom_kill ")] {
            if let Ok(t) = std::fs::read_to_string(dir.join(file)) {
                if let Some(v) = t.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()) {
                    return v;
                }
            }
        }
    }
    0
}

fn node_pid(port: u16) -> Option<u32> {
    std::fs::read_to_string(lab_dir().join(format!("node{port}/mysqld.pid"))).ok()?.trim().parse().ok()
}

#[derive(Debug, Clone)]
struct Death {
    port: u16,
    at: Instant,
    cause: String,
}

/// Watches the nodes' processes every 50 ms and records each death with its cause.
struct Watcher {
    stop: Arc<AtomicBool>,
    deaths: Arc<Mutex<Vec<Death>>>,
    killed_by_drill: Arc<Mutex<BTreeSet<u16>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start() -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let deaths = Arc::new(Mutex::new(Vec::new()));
        let killed_by_drill = Arc::new(Mutex::new(BTreeSet::new()));
        let (s, d, k) = (stop.clone(), deaths.clone(), killed_by_drill.clone());
        let thread = std::thread::spawn(move || {
            let mut alive: Vec<(u16, u32, u64)> = ALL.iter().filter_map(|p| node_pid(*p).map(|pid| (*p, pid, oom_kills(*p)))).collect();
            while !s.load(Ordering::Relaxed) {
                alive.retain(|(port, pid, ooms)| {
                    if std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(*pid) {
                        return true;
                    }
                    let cause = if k.lock().unwrap().contains(port) {
                        "kill -9 (the drill)".to_string()
                    } else if oom_kills(*port) > *ooms {
                        "OOM-killed by the kernel (its cgroup's memory limit)".to_string()
                    } else {
                        "died (not the drill, not the OOM killer)".to_string()
                    };
                    d.lock().unwrap().push(Death { port: *port, at: Instant::now(), cause });
                    false
                });
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watcher { stop, deaths, killed_by_drill, thread: Some(thread) }
    }

    fn kill(&self, port: u16) {
        self.killed_by_drill.lock().unwrap().insert(port);
        kill_node(port);
    }

    fn finish(mut self) -> Vec<Death> {
        std::thread::sleep(Duration::from_millis(120));
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let d = self.deaths.lock().unwrap().clone();
        d
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))).unwrap_or(true)
}

#[derive(Default)]
struct Counts {
    acked: Mutex<Vec<(i64, Instant)>>,
    write_failed: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    reports_ok: AtomicU64,
    reports_failed: AtomicU64,
    /// Errors by their first 60 characters (what clients were told).
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counts {
    fn error(&self, e: &str) {
        let k: String = e.chars().take(200).collect();
        *self.errors.lock().unwrap().entry(k).or_default() += 1;
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Writer,
    Reader,
    Reporter,
}

/// One client of the load: its own connection through the proxy, a new one after a
/// connection error or a client-side timeout.
fn client(role: Role, opts: Opts, counts: Arc<Counts>, next_id: Arc<AtomicI64>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<Conn> = None;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ next_id.load(Ordering::Relaxed) as u64;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                match tokio::time::timeout(Duration::from_secs(2), Conn::new(opts.clone())).await {
                    Ok(Ok(c)) => conn = Some(c),
                    _ => {
                        match role {
                            Role::Writer => counts.write_failed.fetch_add(1, Ordering::Relaxed),
                            Role::Reader => counts.reads_failed.fetch_add(1, Ordering::Relaxed),
                            Role::Reporter => counts.reports_failed.fetch_add(1, Ordering::Relaxed),
                        };
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let (sql, limit, id) = match role {
                Role::Writer => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    (format!("INSERT INTO {SCHEMA}.w (id) VALUES ({id})"), Duration::from_secs(10), id)
                }
                Role::Reader => (format!("SELECT pad FROM {SCHEMA}.big WHERE id = {}", rng % BIG_ROWS as u64 + 1), Duration::from_secs(2), 0),
                Role::Reporter => (
                    format!("/* report */ SELECT pad, COUNT(*) FROM {SCHEMA}.big WHERE id > {} GROUP BY pad ORDER BY NULL LIMIT 5", rng % 100),
                    Duration::from_secs(3),
                    0,
                ),
            };
            let r = tokio::time::timeout(limit, c.query_drop(sql)).await;
            match (role, r) {
                (Role::Writer, Ok(Ok(()))) => counts.acked.lock().unwrap().push((id, Instant::now())),
                (Role::Reader, Ok(Ok(()))) => {
                    counts.reads_ok.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await; // a steady read rate
                }
                (Role::Reporter, Ok(Ok(()))) => {
                    counts.reports_ok.fetch_add(1, Ordering::Relaxed);
                }
                (_, r) => {
                    match role {
                        Role::Writer => counts.write_failed.fetch_add(1, Ordering::Relaxed),
                        Role::Reader => counts.reads_failed.fetch_add(1, Ordering::Relaxed),
                        Role::Reporter => counts.reports_failed.fetch_add(1, Ordering::Relaxed),
                    };
                    match r {
                        Ok(Err(mysql_async::Error::Server(e))) => counts.error(&e.message),
                        Ok(Err(e)) => {
                            counts.error(&format!("connection: {e}"));
                            conn = None;
                        }
                        _ => {
                            counts.error("no answer in time (client gave up and reconnects)");
                            conn = None; // dropped: the proxy sees the client go
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

/// A running load: its clients and what they counted.
struct Load {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxy: &Proxy, mix: &[(Role, usize)], next_id: &Arc<AtomicI64>) -> Load {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let opts = proxy.opts("app", "app", Some(SCHEMA));
        let mut tasks = Vec::new();
        for (role, n) in mix {
            for _ in 0..*n {
                tasks.push(client(*role, opts.clone(), counts.clone(), next_id.clone(), stop.clone()));
            }
        }
        Load { counts, stop, tasks }
    }

    /// Stop the clients (each finishes or gives up on its statement).
    async fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }
}

async fn setup_schema() {
    let mut c = lab(3307).await;
    c.query_drop(format!(
        "DROP DATABASE IF EXISTS {SCHEMA}; CREATE DATABASE {SCHEMA}; \
         CREATE TABLE {SCHEMA}.w (id BIGINT PRIMARY KEY, at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6)); \
         CREATE TABLE {SCHEMA}.big (id INT PRIMARY KEY, k INT, pad VARCHAR(200))"
    ))
    .await
    .unwrap();
    for chunk in (1..=BIG_ROWS).collect::<Vec<_>>().chunks(2000) {
        let values: Vec<String> = chunk.iter().map(|i| format!("({i}, {}, CONCAT(MD5({i}), REPEAT('x', 120), {i}))", i % 100)).collect();
        c.query_drop(format!("INSERT INTO {SCHEMA}.big VALUES {}", values.join(","))).await.unwrap();
    }
    wait_replicas_caught_up().await;
}

async fn enable_semisync() {
    let mut c = lab(3307).await;
    c.query_drop("SET GLOBAL rpl_semi_sync_master_wait_point = 'AFTER_SYNC'; SET GLOBAL rpl_semi_sync_master_timeout = 10000; SET GLOBAL rpl_semi_sync_master_enabled = 1")
        .await
        .unwrap();
    for r in [WEAK, STRONG] {
        lab(r).await.query_drop("STOP SLAVE IO_THREAD; START SLAVE IO_THREAD").await.unwrap();
    }
    let t = Instant::now();
    while global_status(3307, "Rpl_semi_sync_master_clients").await < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "semi-sync clients did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn view(p: &Proxy) -> serde_json::Value {
    let (code, v) = p.admin("GET", "/api/failover").await;
    assert_eq!(code, 200, "{v}");
    v
}

/// What one run of the scenario found.
#[derive(Debug)]
struct Outcome {
    policy: String,
    promoted: Vec<String>,
    crashes: Vec<String>,
    acked: usize,
    failed_writes: u64,
    lost_writes: Option<usize>,
    write_unavailable_s: f64,
    first_write_after_kill_s: Option<f64>,
    reads_served_ratio: f64,
    verdict: String,
    ok: bool,
}

struct Scenario {
    policy: &'static str,
    warmup: Duration,
    after: Duration,
    /// Leave the lab as the run left it (no restart of dead nodes to count lost writes).
    keep: bool,
}

async fn run(sc: Scenario) -> Outcome {
    let _limits = Limits;
    setup_schema().await;
    enable_semisync().await;
    let mut args = vec!["--failover", "on"];
    if sc.policy == "orchestrator" {
        // What ProxySQL does: no adaptive concurrency limit, plain weighted reader choice.
        args.extend(["--adaptive-limit", "false", "--balance", "weighted"]);
    }
    let proxy = Proxy::start_with(Some(&config(sc.policy)), &args);
    let _agent = start_agent(&proxy);
    let t = Instant::now();
    while view(&proxy).await["polls"].as_u64().unwrap_or(0) < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "controller did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The weak replica: CPU and memory limits on its cgroup.
    breakwater_testkit::set_cpu_limit(WEAK, Some(WEAK_CPU)).expect("CPU limit on the weak replica");
    let anon = breakwater_testkit::memory_anon(WEAK).expect("the weak replica's memory.stat");
    let mem_limit = anon + (WEAK_MEMORY_HEADROOM_MIB << 20);
    breakwater_testkit::set_memory_limit(WEAK, Some(mem_limit)).expect("memory limit on the weak replica");
    let mut timeline: Vec<(f64, String)> = Vec::new();
    let weak_line = format!(
        "{} weak: CPU limit {WEAK_CPU} cores, memory limit {} MiB (its {} MiB of anonymous memory + {WEAK_MEMORY_HEADROOM_MIB} MiB)",
        addr(WEAK),
        mem_limit >> 20,
        anon >> 20
    );

    let next_id = Arc::new(AtomicI64::new(1));
    let mut load = Load::start(&proxy, &[(Role::Writer, 8), (Role::Reader, 8), (Role::Reporter, 6)], &next_id);
    let (counts, stop) = (load.counts.clone(), load.stop.clone());
    let watcher = Watcher::start();
    // BREAKWATER_DRILL_VERBOSE=1: the load and the proxy's view every 2 s.
    let verbose = std::env::var("BREAKWATER_DRILL_VERBOSE").is_ok_and(|v| v == "1");
    let progress = verbose.then(|| {
        let (c, s, admin) = (counts.clone(), stop.clone(), proxy.admin_port);
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut last = [0u64; 6];
            while !s.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let now = [
                    c.acked.lock().unwrap().len() as u64,
                    c.write_failed.load(Ordering::Relaxed),
                    c.reads_ok.load(Ordering::Relaxed),
                    c.reads_failed.load(Ordering::Relaxed),
                    c.reports_ok.load(Ordering::Relaxed),
                    c.reports_failed.load(Ordering::Relaxed),
                ];
                let d: Vec<u64> = now.iter().zip(last).map(|(a, b)| a - b).collect();
                last = now;
                let rows = reqwest_like(admin, "/api/backends").await;
                println!("[{:>5.1}s] writes {}/{} reads {}/{} reports {}/{} (ok/failed) | {rows}", t0.elapsed().as_secs_f64(), d[0], d[1], d[2], d[3], d[4], d[5]);
            }
        })
    });
    tokio::time::sleep(sc.warmup).await;
    // The weak replica becomes the most advanced: 3309 stops receiving for a second.
    lab(STRONG).await.query_drop("STOP SLAVE IO_THREAD").await.unwrap();
    let io_stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed_at = Instant::now();
    let kill_ms = unix_ms();
    timeline.push((-io_stopped.elapsed().as_secs_f64(), format!("{} IO thread stopped: {} is the most advanced replica", addr(STRONG), addr(WEAK))));
    watcher.kill(3307);
    timeline.push((0.0, "kill -9 primary 127.0.0.1:3307".into()));
    // 3309 tries its dead primary again, as after a network blip.
    lab(STRONG).await.query_drop("START SLAVE IO_THREAD").await.unwrap();
    tokio::time::sleep(sc.after).await;
    let end = Instant::now();
    load.finish().await;
    let deaths = watcher.finish();
    if let Some(p) = progress {
        p.abort();
    }
    let v = view(&proxy).await;

    // What happened, from the controller's events.
    let mut promoted = Vec::new();
    for e in v["events"].as_array().into_iter().flatten() {
        let at = e["at_ms"].as_u64().unwrap_or(0);
        if at + 2000 < kill_ms {
            continue;
        }
        let kind = e["kind"].as_str().unwrap_or("");
        let rel = (at as f64 - kill_ms as f64) / 1000.0;
        let action = e["action"].as_str().unwrap_or("");
        let evidence: Vec<&str> = e["evidence"].as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect();
        match kind {
            "RecoverDeadPrimary" => {
                if let Some(p) = action.strip_prefix("promoted ").and_then(|r| r.split_whitespace().next()) {
                    promoted.push(p.to_string());
                }
                for line in evidence.iter().filter(|l| l.contains("fit") || l.starts_with("candidate") || l.starts_with("load of") || l.contains("caught up") || l.starts_with("write ramp")) {
                    timeline.push((rel, format!("  {line}")));
                }
                timeline.push((rel, format!("RecoverDeadPrimary: {action}")));
            }
            "NoFitCandidate" => {
                for line in evidence.iter().filter(|l| l.contains("fit") || l.starts_with("load of")) {
                    timeline.push((rel, format!("  {line}")));
                }
                timeline.push((rel, format!("NoFitCandidate: {action}")));
            }
            "CascadingRisk" => {
                for line in &evidence {
                    timeline.push((rel, format!("  sign: {line}")));
                }
                timeline.push((rel, format!("{kind} {}: {action}", e["addr"].as_str().unwrap_or(""))));
            }
            "DeadPrimary" | "RecoveryBlocked" | "RecoveryFailed" | "CascadingRiskCleared" | "DeadReplica" => {
                timeline.push((rel, format!("{kind} {}: {action}", e["addr"].as_str().unwrap_or(""))));
            }
            _ => {}
        }
    }
    for d in &deaths {
        let rel = d.at.saturating_duration_since(killed_at).as_secs_f64() - killed_at.saturating_duration_since(d.at).as_secs_f64();
        if d.port != 3307 {
            timeline.push((rel, format!("{} died: {}", addr(d.port), d.cause)));
        }
    }
    let acked = counts.acked.lock().unwrap().clone();
    let mut after_kill: Vec<Instant> = acked.iter().map(|a| a.1).filter(|a| *a > killed_at + Duration::from_millis(50)).collect();
    after_kill.sort();
    let first_after = after_kill.first().map(|a| a.duration_since(killed_at).as_secs_f64());
    if let Some(f) = first_after {
        timeline.push((f, "first acknowledged write after the kill".into()));
    }
    // Time without an acknowledged write after the kill (gaps over 1 s, the end included).
    let mut points = vec![killed_at];
    points.extend(after_kill.iter().copied());
    points.push(end);
    let unavailable: f64 = points.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64()).filter(|g| *g > 1.0).sum();
    let final_primary = v["primary"].as_str().unwrap_or("").to_string();
    let crashes: Vec<String> = deaths.iter().map(|d| addr(d.port)).collect();
    // Lost writes: acknowledged ids missing on the final primary (restarted to look when it
    // died, unless the lab is to be kept as it is).
    let fp = final_primary.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(0);
    if deaths.iter().any(|d| d.port == fp) && !sc.keep {
        let _ = breakwater_testkit::set_memory_limit(fp, None);
        let _ = breakwater_testkit::set_cpu_limit(fp, None);
        start_node(fp).await;
    }
    let lost = match tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = Conn::new(lab_opts(fp)).await.ok()?;
        let ids: Vec<i64> = c.query(format!("SELECT id FROM {SCHEMA}.w")).await.ok()?;
        Some(ids.into_iter().collect::<BTreeSet<i64>>())
    })
    .await
    {
        Ok(Some(have)) => Some(acked.iter().filter(|(id, _)| !have.contains(id)).count()),
        _ => None,
    };
    let reads_ok = counts.reads_ok.load(Ordering::Relaxed);
    let reads_failed = counts.reads_failed.load(Ordering::Relaxed);
    let ratio = reads_ok as f64 / (reads_ok + reads_failed).max(1) as f64;
    let (ok, verdict) = if sc.policy == "orchestrator" {
        if crashes.len() >= 2 {
            (true, format!("cascade reproduced: {} crashes ({})", crashes.len(), crashes.join(", ")))
        } else {
            (false, format!("no cascade ({} crash): the scenario proves nothing", crashes.len()))
        }
    } else {
        let mut bad = Vec::new();
        if promoted.iter().any(|p| *p == addr(WEAK)) {
            bad.push("the weak replica was promoted".to_string());
        }
        if crashes.len() > 1 {
            bad.push(format!("{} crashes after the first", crashes.len() - 1));
        }
        if lost != Some(0) {
            bad.push(format!("lost writes: {lost:?}"));
        }
        if first_after.is_none_or(|f| f > 10.0) {
            bad.push(format!("writes back after {first_after:?} s (most 10 s)"));
        }
        if ratio < 0.99 {
            bad.push(format!("reads served {:.2}% (least 99%)", ratio * 100.0));
        }
        if bad.is_empty() {
            (true, "cascade stopped: weak replica not promoted, no crash after the first, no acknowledged write lost".to_string())
        } else {
            (false, format!("FAILED: {}", bad.join("; ")))
        }
    };
    let gate = v["writer_gate"].as_str().unwrap_or("?");
    let writes = match gate.split_once(':') {
        None => format!("writes {gate}"),
        Some((state, why)) => format!("writes {}: {}", if state == "block" { "refused" } else { state }, why.split_once(". ").map(|x| x.0).unwrap_or(why).trim()),
    };
    timeline.push((end.duration_since(killed_at).as_secs_f64(), format!("end: primary {final_primary}, {writes}")));
    timeline.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    let out = Outcome {
        policy: sc.policy.into(),
        promoted,
        crashes,
        acked: acked.len(),
        failed_writes: counts.write_failed.load(Ordering::Relaxed),
        lost_writes: lost,
        write_unavailable_s: unavailable,
        first_write_after_kill_s: first_after,
        reads_served_ratio: ratio,
        verdict,
        ok,
    };
    println!("DRILL-TIMELINE {}\t-\t{weak_line}", sc.policy);
    for (t, line) in &timeline {
        println!("DRILL-TIMELINE {}\t{t:+.2}\t{line}", sc.policy);
    }
    println!(
        "DRILL-TIMELINE {}\t-\twrites acknowledged {}, failed {}, lost {}; reads {} served, {} failed; reports {} served, {} failed",
        sc.policy,
        out.acked,
        out.failed_writes,
        lost.map(|l| l.to_string()).unwrap_or_else(|| "unknown".into()),
        reads_ok,
        reads_failed,
        counts.reports_ok.load(Ordering::Relaxed),
        counts.reports_failed.load(Ordering::Relaxed)
    );
    for (e, n) in counts.errors.lock().unwrap().iter().rev().take(8) {
        println!("DRILL-TIMELINE {}\t-\tclients were told ({n}×): {e}", sc.policy);
    }
    let json = serde_json::json!({
        "policy": out.policy,
        "weak_replica": addr(WEAK),
        "promoted": out.promoted,
        "crashes": out.crashes,
        "acked_writes": out.acked,
        "failed_writes": out.failed_writes,
        "lost_writes": out.lost_writes,
        "write_unavailable_seconds": (out.write_unavailable_s.max(0.0) * 100.0).round() / 100.0,
        "first_write_after_kill_seconds": out.first_write_after_kill_s.map(|f| (f * 100.0).round() / 100.0),
        "reads_served_ratio": (out.reads_served_ratio * 10000.0).round() / 10000.0,
        "verdict": out.verdict,
    });
    println!("DRILL-JSON {json}");
    out
}

/// The backends' status, in flight and limit, one short line (verbose drill output).
async fn reqwest_like(admin: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(("127.0.0.1", admin))).await else { return "admin?".into() };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{admin}\r\n\r\n").as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("hg{}/{} {} if={} lim={} lat={:.1}", r["hostgroup"], r["srv_port"], r["status"].as_str().unwrap_or(""), r["in_flight"], r["concurrency_limit"], r["proxy_latency_ms"].as_f64().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

/// `cargo xtask drill cascade` runs this once per policy (BREAKWATER_DRILL_POLICY), from a
/// fresh lab; the outcome is its printed lines, not a pass or fail here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn drill() {
    let policy = match std::env::var("BREAKWATER_DRILL_POLICY").as_deref() {
        Ok("orchestrator") => "orchestrator",
        _ => "breakwater",
    };
    let keep = std::env::var("BREAKWATER_DRILL_KEEP").is_ok_and(|v| v == "1");
    run(Scenario { policy, warmup: env_secs("BREAKWATER_DRILL_WARMUP_S", 20), after: env_secs("BREAKWATER_DRILL_AFTER_S", 60), keep }).await;
}

/// The short drill, orchestrator policy: the cascade must happen (else the scenario proves
/// nothing about the other policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_drill_orchestrator_cascades() {
    let o = run(Scenario { policy: "orchestrator", warmup: Duration::from_secs(12), after: Duration::from_secs(30), keep: false }).await;
    assert!(o.ok, "{}", o.verdict);
}

/// The short drill, breakwater policy: the cascade is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_drill_breakwater_stops_the_cascade() {
    let o = run(Scenario { policy: "breakwater", warmup: Duration::from_secs(12), after: Duration::from_secs(30), keep: false }).await;
    assert!(o.ok, "{}", o.verdict);
}


/// Both replicas are weak (CPU and memory limits below what the primary uses for the load):
/// when the primary dies nothing is promoted, reads keep being served by the replicas,
/// writes are refused at once with the reason and the way out, the verdicts are on the API,
/// the page's data and /metrics; a person's `failover failover --to` still promotes. Then
/// the promoted node degrades under the load: CascadingRisk, shedding, the hold, the hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_unfit_candidates_nothing_is_promoted_until_a_person_acts() {
    let _limits = Limits;
    setup_schema().await;
    let hooks = std::env::temp_dir().join(format!("bw-cascade-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&hooks).unwrap();
    let post = format!("post_promotion_hook = 'echo \"$BREAKWATER_RECOVERY_KIND $BREAKWATER_PROMOTED_HOST:$BREAKWATER_PROMOTED_PORT\" >> {}/post.log'\n", hooks.display());
    let cfg = config("breakwater").replace("# pre_promotion_hook =", &format!("{post}# pre_promotion_hook ="));
    let proxy = Proxy::start_with(Some(&cfg), &["--failover", "on"]);
    let _agent = start_agent(&proxy);
    for r in [WEAK, STRONG] {
        breakwater_testkit::set_cpu_limit(r, Some(WEAK_CPU)).expect("CPU limit");
        let anon = breakwater_testkit::memory_anon(r).expect("memory.stat");
        breakwater_testkit::set_memory_limit(r, Some(anon + (WEAK_MEMORY_HEADROOM_MIB << 20))).expect("memory limit");
    }
    let next_id = Arc::new(AtomicI64::new(1));
    let mut load = Load::start(&proxy, &[(Role::Writer, 6), (Role::Reader, 6), (Role::Reporter, 4)], &next_id);
    let counts = load.counts.clone();
    tokio::time::sleep(Duration::from_secs(12)).await;
    kill_node(3307);
    let killed = Instant::now();
    let reads_at_kill = counts.reads_ok.load(Ordering::Relaxed);
    let failed_at_kill = counts.reads_failed.load(Ordering::Relaxed);
    let t = Instant::now();
    let v = loop {
        let v = view(&proxy).await;
        if v["events"].as_array().into_iter().flatten().any(|e| e["kind"] == "NoFitCandidate") {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no NoFitCandidate event: {:#}", v["events"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Reads go on for a while with the primary dead and nothing promoted.
    tokio::time::sleep(Duration::from_secs(4)).await;
    load.finish().await;
    let v2 = view(&proxy).await;
    assert_eq!(v2["primary"], addr(3307), "nothing promoted: {:#}", v2["events"]);
    assert!(!v2["events"].as_array().into_iter().flatten().any(|e| e["kind"] == "RecoverDeadPrimary"));
    let gate = v2["writer_gate"].as_str().unwrap_or("");
    assert!(gate.starts_with("block:") && gate.contains("no replica can carry its load") && gate.contains("failover failover --to"), "{gate}");
    // The verdicts, with their numbers.
    let j = &v["last_judgment"];
    let verdicts = j["verdicts"].as_array().expect("verdicts");
    assert_eq!(verdicts.len(), 2, "{j:#}");
    for x in verdicts {
        assert_eq!(x["fit"], false, "{x:#}");
        let why = x["reasons"].as_array().map(|r| r.iter().filter_map(|s| s.as_str()).collect::<Vec<_>>().join("; ")).unwrap_or_default();
        assert!(why.contains("CPU limit 0.30 cores is below"), "{why}");
    }
    assert!(j["load"]["statements_per_s"].as_f64().is_some_and(|s| s > 10.0), "the primary's load was measured: {j:#}");
    // Writes were refused at once with the reason; reads were served.
    let errors = counts.errors.lock().unwrap().clone();
    assert!(errors.keys().any(|e| e.contains("no replica can carry its load")), "{errors:#?}");
    let reads = counts.reads_ok.load(Ordering::Relaxed) - reads_at_kill;
    let reads_failed = counts.reads_failed.load(Ordering::Relaxed) - failed_at_kill;
    println!("after the kill ({:?}): {reads} reads served, {reads_failed} failed; errors {errors:#?}", killed.elapsed());
    assert!(reads > 100 && reads_failed * 100 <= reads, "reads served after the kill: {reads} ok, {reads_failed} failed");
    let mut c = proxy.conn().await;
    let e = c.query_drop(format!("INSERT INTO {SCHEMA}.w (id) VALUES (-1)")).await.expect_err("writes are refused");
    assert!(e.to_string().contains("no replica can carry its load"), "{e}");
    drop(c);
    let (_, m) = proxy.admin("GET", "/metrics").await;
    let m = m.as_str().unwrap_or_default().to_string();
    for want in ["breakwater_failover_unfit_candidates_total{cluster=\"lab\"} 2", "breakwater_failover_recoveries_total{cluster=\"lab\",kind=\"automated\",result=\"refused\"} 1"] {
        assert!(m.contains(want), "metrics lack {want}");
    }
    // A person overrides the gate.
    let (ok, out) = failover_cli(&proxy, &["failover", "--to", &addr(STRONG)]);
    assert!(ok, "{out}");
    let v3 = view(&proxy).await;
    assert_eq!(v3["primary"], addr(STRONG), "{:#}", v3["events"]);
    let rec = v3["events"].as_array().into_iter().flatten().rev().find(|e| e["kind"] == "RecoverDeadPrimary").cloned().unwrap_or_default();
    let steps = rec["evidence"].to_string();
    assert!(steps.contains("judged unfit, promoted on a person's order"), "{steps}");
    let mut c = proxy.conn().await;
    c.query_drop(format!("INSERT INTO {SCHEMA}.w (id) VALUES (-2)")).await.expect("writes work after the manual failover");
    drop(c);

    // The person's choice goes the way the gate feared: the new primary gets slower and
    // slower under the load (its CPU cut further). The cascade watch raises the risk: the
    // limit is clamped, the reports (shed_priority 1) are refused, promotion is held until
    // an ack, and the post-promotion hook is told.
    let _ = breakwater_testkit::set_memory_limit(STRONG, None);
    let mut load = Load::start(&proxy, &[(Role::Writer, 6), (Role::Reporter, 4)], &next_id);
    let counts = load.counts.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    breakwater_testkit::set_cpu_limit(STRONG, Some(0.08)).expect("CPU limit");
    let t = Instant::now();
    let risk = loop {
        let v = view(&proxy).await;
        if let Some(e) = v["events"].as_array().into_iter().flatten().find(|e| e["kind"] == "CascadingRisk") {
            break (v.clone(), e.clone());
        }
        assert!(t.elapsed() < Duration::from_secs(40), "no CascadingRisk: {:#}", v["events"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    println!("CascadingRisk after {:?}: {:#}", t.elapsed(), risk.1);
    let (v, e) = risk;
    assert_eq!(e["addr"], addr(STRONG));
    let signs = e["evidence"].to_string();
    assert!(signs.contains("latency rising"), "a sign of degradation: {signs}");
    assert!(v["cascading_risk"]["limit"].as_u64().is_some(), "{:#}", v["cascading_risk"]);
    assert!(v["promotion_hold"].as_str().is_some_and(|h| h.contains("cascading risk on the new primary")), "{}", v["promotion_hold"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = breakwater_testkit::set_cpu_limit(STRONG, None);
    load.finish().await;
    let errors = counts.errors.lock().unwrap().clone();
    assert!(errors.keys().any(|e| e.starts_with("Breakwater: shed (query rule 50 has shed_priority 1): cascading risk")), "{errors:#?}");
    let hook = std::fs::read_to_string(hooks.join("post.log")).unwrap_or_default();
    assert!(hook.contains("cascading_risk 127.0.0.1:3309"), "post-promotion hook told: {hook:?}");
    let (_, m) = proxy.admin("GET", "/metrics").await;
    let m = m.as_str().unwrap_or_default().to_string();
    for want in ["breakwater_failover_cascading_risks_total{cluster=\"lab\"} 1", "breakwater_failover_promotion_held{cluster=\"lab\"} 1"] {
        assert!(m.contains(want), "metrics lack {want}");
    }
    assert!(!m.contains("breakwater_proxy_statements_shed_total{db_system_name=\"mysql\"} 0\n"), "statements were shed");
    // A person acknowledges: the hold ends.
    let (ok, out) = failover_cli(&proxy, &["ack"]);
    assert!(ok, "{out}");
    assert!(view(&proxy).await["promotion_hold"].is_null());
}
