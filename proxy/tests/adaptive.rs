//! The adaptive loop with real parts: the lab, a breakwater-agent on its nodes (eBPF), and a
//! proxy that receives the agent's OTLP metrics. Runs serially (`cargo xtask test` lists this
//! target with the ones that need the lab to themselves): the agent's cgroup_skb programs
//! take the nodes' cgroups in single attach mode, so no other agent may run meanwhile.

mod common;

use common::*;
use mysql_async::prelude::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary of the same build (`cargo xtask test` builds the whole workspace first).
fn agent_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("breakwater-agent");
    assert!(bin.exists(), "{} is missing: build the workspace first (cargo build --workspace)", bin.display());
    bin
}

fn start_agent(otlp_url: &str) -> Agent {
    start_agent_with(otlp_url, &[])
}

fn start_agent_with(otlp_url: &str, env: &[(&str, &str)]) -> Agent {
    let prom = free_port();
    let child = Command::new(agent_bin())
        .args(["--ports", "3307,3308,3309", "--prometheus-listen", &format!("127.0.0.1:{prom}")])
        .args(["--otlp-http-endpoint", otlp_url, "--export-interval-ms", "500"])
        .envs(env.iter().copied())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn breakwater-agent");
    Agent(child)
}

/// The backend view as JSON rows, keyed "hostgroup/port".
async fn backends(proxy: &Proxy) -> std::collections::BTreeMap<String, serde_json::Value> {
    let (code, v) = proxy.admin("GET", "/api/backends").await;
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| (format!("{}/{}", r["hostgroup"], r["srv_port"]), r.clone()))
        .collect()
}

/// Reads through the proxy for `d` from `clients` connections; returns how many were
/// answered (none may fail: see `run_load`, which allows only the limiter's 9001).
async fn read_load(proxy: &Proxy, clients: usize, d: Duration) -> usize {
    let (ok, shed) = run_load(proxy, clients, d, "SELECT 1 FROM DUAL WHERE @@server_id > 0").await;
    assert_eq!(shed, 0, "no read shed under this load");
    ok
}

/// The agent, started after the proxy's pool is warm, feeds every lab server's row: the
/// pooled connections are seen (server-side requests and latency on the replicas), the
/// admin SQL table and /metrics show it; stopping the agent ages the signals out and the
/// rows fall back to the proxy's own view. The proxy wants `[signals] token`
/// (`--signals-token`), which the agent sends (BREAKWATER_AGENT_OTLP_TOKEN): a report
/// without it or with another is refused with a 401, a bad payload with a 400 or 415, each
/// counted, and the proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_signals_feed_the_backend_view_and_age_out() {
    let _heavy = HEAVY.lock().await;
    let token = format!("signals-{}", std::process::id());
    let proxy = Proxy::start(&["--signals-token", &token]);
    // A warm pool before the agent starts.
    assert!(read_load(&proxy, 4, Duration::from_millis(800)).await > 0);
    let before = backends(&proxy).await;
    assert_eq!(before.len(), 3, "one row per lab server entry: {before:?}");
    for (k, r) in &before {
        assert_eq!(r["signal_source"], "proxy", "{k}: no agent yet");
    }
    let url = format!("http://127.0.0.1:{}/v1/metrics", proxy.admin_port);
    let agent = start_agent_with(&url, &[("BREAKWATER_AGENT_OTLP_TOKEN", &token)]);
    // Reads on the warm pool while the agent reports every 500 ms.
    let t = Instant::now();
    let mut rows = before;
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(20) {
        served += read_load(&proxy, 4, Duration::from_millis(700)).await;
        rows = backends(&proxy).await;
        let ok = rows.iter().all(|(k, r)| {
            r["signal_source"] == "agent+proxy" && (k.starts_with("10/") || r["server_latency_p99_ms"].as_f64().is_some_and(|v| v > 0.0))
        });
        if ok {
            break;
        }
    }
    println!("after {:?} ({served} reads): {rows:#?}", t.elapsed());
    for (k, r) in &rows {
        assert_eq!(r["signal_source"], "agent+proxy", "{k}: fed by the agent");
        assert!(r["agent_age_ms"].as_u64().is_some_and(|a| a < 3000), "{k}: a recent report");
        assert!(r["server_connections"].as_u64().is_some_and(|c| c > 0), "{k}: the pool's connections, opened before the agent");
    }
    for port in REPLICAS {
        let r = &rows[&format!("20/{port}")];
        assert!(r["server_requests_per_s"].as_f64().is_some_and(|q| q > 0.0), "{port}: reads seen server-side on the warm pool: {r}");
        assert!(r["server_latency_p99_ms"].as_f64().is_some_and(|v| v > 0.0 && v < 1000.0), "{port}: server-side p99: {r}");
    }
    // The admin SQL table says the same.
    let sql = proxy
        .admin_sql("SELECT srv_port, signal_source, agent_age_ms IS NOT NULL FROM stats_breakwater_backends WHERE hostgroup = 20 ORDER BY srv_port")
        .expect("admin SQL");
    assert_eq!(sql, "3308\tagent+proxy\t1\n3309\tagent+proxy\t1\n");
    let (_, metrics) = proxy.admin("GET", "/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("breakwater_proxy_backend_signal_fresh{hostgroup=\"20\",server_address=\"127.0.0.1:3308\"} 1"), "{metrics}");

    // Garbage and the wrong content type: 400 / 415, counted; the proxy keeps serving.
    let rejected = |m: &str| m.lines().find(|l| l.starts_with("breakwater_proxy_signals_rejected_total ")).and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    let r0 = rejected(&metrics).expect("rejected counter is exported from 0");
    let good = format!("Bearer {token}");
    let empty: Vec<u8> = Vec::new();
    for (auth, ctype, body, want) in [
        ("", "application/x-protobuf", &empty[..], 401),
        ("Bearer not-the-token", "application/x-protobuf", &empty[..], 401),
        (good.as_str(), "application/x-protobuf", &b"\xff\xff\xff\xff not protobuf"[..], 400),
        (good.as_str(), "application/json", &b"{}"[..], 415),
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.admin_port)).unwrap();
        use std::io::{Read, Write};
        let auth = if auth.is_empty() { String::new() } else { format!("Authorization: {auth}\r\n") };
        let head = format!("POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{auth}Content-Length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(resp.starts_with(&format!("HTTP/1.1 {want}")), "{resp}");
    }
    let (_, m2) = proxy.admin("GET", "/metrics").await;
    assert_eq!(rejected(m2.as_str().unwrap_or_default()), Some(r0 + 4));
    assert!(read_load(&proxy, 1, Duration::from_millis(100)).await > 0);

    // A real Prometheus scrapes the proxy; every query of the adaptive loop's dashboard
    // returns data (reads go on meanwhile, so the agent keeps reporting).
    let admin_port = proxy.admin_port;
    let prom = tokio::task::spawn_blocking(move || {
        let prom = breakwater_testkit::Prometheus::start("breakwater-adaptive", admin_port);
        let exprs = breakwater_testkit::dashboard_queries(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/breakwater-adaptive.json"));
        assert!(exprs.len() >= 12, "{exprs:?}");
        prom.all_have_data(&exprs, Duration::from_secs(60));
    });
    while !prom.is_finished() {
        read_load(&proxy, 2, Duration::from_millis(500)).await;
    }
    prom.await.expect("every dashboard query has data");

    // The agent stops: its signals age out (three export intervals) and the proxy falls back.
    drop(agent);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = backends(&proxy).await;
    for (k, r) in &after {
        assert_eq!(r["signal_source"], "proxy", "{k}: stale signals are not used");
        assert!(r["agent_age_ms"].as_u64().is_some_and(|a| a >= 1500), "{k}: the stale series' age stays visible: {r}");
        assert!(r["server_latency_p99_ms"].is_null(), "{k}: no stale numbers");
    }
}

/// Lifts a lab node's CPU limit when dropped (also when the test fails).
struct CpuLimit(u16);

impl CpuLimit {
    fn set(port: u16, cores: f64) -> CpuLimit {
        breakwater_testkit::set_cpu_limit(port, Some(cores)).expect("limit the node's CPU");
        CpuLimit(port)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        let _ = breakwater_testkit::set_cpu_limit(self.0, None);
    }
}

/// Reads on each replica (from the proxy's per-server statement counts) while `clients`
/// read for `d`.
async fn shares_during(proxy: &Proxy, clients: usize, d: Duration) -> (f64, usize) {
    let before = backends(proxy).await;
    let n = read_load(proxy, clients, d).await;
    let _ = before;
    let rows = backends(proxy).await;
    (rows["20/3308"]["read_share"].as_f64().unwrap_or(0.0), n)
}

/// A replica made slow by CPU throttling of its cgroup gets at most a quarter of the reads
/// within 15 s, and its share back (at least 35%) within 40 s of the throttle's end; with the
/// agent's signals feeding the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_replica_gets_less_traffic_and_regains_it() {
    let _heavy = HEAVY.lock().await;
    let proxy = Proxy::start(&[]);
    let url = format!("http://127.0.0.1:{}/v1/metrics", proxy.admin_port);
    let _agent = start_agent(&url);
    let (share, _) = shares_during(&proxy, 8, Duration::from_secs(3)).await;
    println!("healthy: 3308 share {share:.2}");
    let limit = CpuLimit::set(3308, 0.03);
    let t = Instant::now();
    let mut low = None;
    while t.elapsed() < Duration::from_secs(15) {
        let (share, n) = shares_during(&proxy, 8, Duration::from_secs(1)).await;
        println!("{:>5.1}s throttled: 3308 share {share:.2} ({n} reads)", t.elapsed().as_secs_f64());
        if share <= 0.25 && t.elapsed() > Duration::from_secs(5) {
            low = Some(t.elapsed());
            break;
        }
    }
    let rows = backends(&proxy).await;
    println!("{:#?}", rows["20/3308"]);
    assert!(low.is_some(), "the throttled replica kept more than a quarter of the reads for 15 s");
    drop(limit);
    let t = Instant::now();
    let mut back = None;
    while t.elapsed() < Duration::from_secs(40) {
        let (share, n) = shares_during(&proxy, 8, Duration::from_secs(1)).await;
        println!("{:>5.1}s lifted: 3308 share {share:.2} ({n} reads)", t.elapsed().as_secs_f64());
        if share >= 0.35 && t.elapsed() > Duration::from_secs(5) {
            back = Some(t.elapsed());
            break;
        }
    }
    assert!(back.is_some(), "the replica did not regain 35% of the reads within 40 s");
}

/// The proxy's config with the adaptive limit between 2 and 16 and a 3 s queue.
fn limited_config() -> String {
    let mut cfg = breakwater_proxy::config::DEFAULT_TOML.to_string();
    for (from, to) in [
        ("queue_timeout_ms = 10000", "queue_timeout_ms = 3000"),
        ("limit_initial = 32", "limit_initial = 16"),
        ("limit_min = 4", "limit_min = 2"),
        ("limit_max = 512", "limit_max = 16"),
    ] {
        assert!(cfg.contains(from), "the default TOML has {from}");
        cfg = cfg.replace(from, to);
    }
    cfg
}

/// `clients` run `sql` through the proxy for `d`: (answered, shed with 9001). Any other error
/// fails the test.
async fn run_load(proxy: &Proxy, clients: usize, d: Duration, sql: &'static str) -> (usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let opts = proxy.opts("app", "app", Some("sbtest"));
        tasks.push(tokio::spawn(async move {
            let mut c = mysql_async::Conn::new(opts).await.expect("connect");
            let t = Instant::now();
            let (mut ok, mut shed) = (0, 0);
            while t.elapsed() < d {
                match c.query_drop(sql).await {
                    Ok(()) => ok += 1,
                    Err(e) if server_code(&e) == Some(9001) => {
                        assert!(e.to_string().contains("adaptive concurrency limit"), "{e}");
                        shed += 1;
                    }
                    Err(e) => panic!("{sql}: {e}"),
                }
            }
            (ok, shed)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (ok, shed) = t.await.expect("client");
        total.0 += ok;
        total.1 += shed;
    }
    total
}

/// An overloaded backend never runs more statements than its adaptive limit (the server's
/// own Threads_running, sampled while 40 clients push CPU-heavy reads at two replicas held to
/// 0.25 of a core each, after a few seconds of normal service), the limit falls under the
/// load, excess clients are queued or get the clear error, and the limit rises again once the
/// overload ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_backend_runs_at_most_its_limit() {
    let _heavy = HEAVY.lock().await;
    let proxy = Proxy::start_with(Some(&limited_config()), &[]);
    // Threads_running when idle (the sampling connection, the replication threads).
    let mut idle = std::collections::BTreeMap::new();
    let mut direct = std::collections::BTreeMap::new();
    for port in REPLICAS {
        let mut c = lab(port).await;
        let n: u64 = c.query_first("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'THREADS_RUNNING'").await.unwrap().unwrap();
        idle.insert(port, n);
        direct.insert(port, c);
    }
    // Normal service first: the limiter learns the servers' usual latency.
    run_load(&proxy, 24, Duration::from_secs(4), "SELECT 1").await;
    let limits = [CpuLimit::set(3308, 0.25), CpuLimit::set(3309, 0.25)];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let admin = proxy.admin_port;
        tokio::spawn(async move {
            let mut seen: Vec<(u16, u64, u64)> = Vec::new(); // (port, running beyond idle, limit)
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for port in REPLICAS {
                    let c = direct.get_mut(&port).unwrap();
                    let n: u64 = c
                        .query_first("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'THREADS_RUNNING'")
                        .await
                        .unwrap()
                        .unwrap();
                    let (_, body) = breakwater_proxy::admin::client::call(&format!("127.0.0.1:{admin}"), "GET", "/api/backends", None, Duration::from_secs(5)).await.unwrap();
                    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
                    let limit = rows.as_array().unwrap().iter().find(|r| r["hostgroup"] == 20 && r["srv_port"] == port).unwrap()["concurrency_limit"].as_u64().unwrap();
                    seen.push((port, n.saturating_sub(idle[&port]), limit));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    let (ok, shed) = run_load(&proxy, 40, Duration::from_secs(12), "SELECT BENCHMARK(40000, MD5('breakwater'))").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.await.unwrap();
    let rows = backends(&proxy).await;
    println!("overload: {ok} answered, {shed} shed; {rows:#?}");
    let lowest = |port: u16| seen.iter().filter(|(p, _, _)| *p == port).map(|(_, _, l)| *l).min().unwrap_or(16);
    println!("lowest limits: 3308 {} 3309 {}; {} samples: {seen:?}", lowest(3308), lowest(3309), seen.len());
    // Besides the proxy's statements, a server may run the proxy's health check (not a
    // client statement, not limited) and its replication SQL thread: 2 more at most.
    let over: Vec<_> = seen.iter().filter(|(_, running, _)| *running > 16 + 2).collect();
    assert!(over.is_empty(), "never more than limit_max statements on a server: {over:?}");
    // The limit moves between samples: a sample may see statements admitted under the limit
    // of a moment before. Allow one step of 2.
    let beyond: Vec<_> = seen.iter().filter(|(_, running, limit)| *running > limit + 2 + 2).collect();
    assert!(beyond.len() * 10 <= seen.len(), "Threads_running beyond the limit in {} of {} samples: {beyond:?}", beyond.len(), seen.len());
    assert!(lowest(3308) < 16 && lowest(3309) < 16, "the limit fell under the overload");
    assert!(ok > 0, "queued clients were served");
    assert_eq!(rows["20/3308"]["shed_total"].as_u64().unwrap() + rows["20/3309"]["shed_total"].as_u64().unwrap(), shed as u64, "every shed statement counted");
    drop(limits);
    // After the overload: light reads at the limit, latency back to normal: the limit rises.
    let low = rows["20/3308"]["concurrency_limit"].as_u64().unwrap().min(rows["20/3309"]["concurrency_limit"].as_u64().unwrap());
    let t = Instant::now();
    let mut now = low;
    while t.elapsed() < Duration::from_secs(30) {
        run_load(&proxy, 24, Duration::from_secs(2), "SELECT 1").await;
        let r = backends(&proxy).await;
        now = r["20/3308"]["concurrency_limit"].as_u64().unwrap().min(r["20/3309"]["concurrency_limit"].as_u64().unwrap());
        println!("{:>4.1}s after: limits {} / {}", t.elapsed().as_secs_f64(), r["20/3308"]["concurrency_limit"], r["20/3309"]["concurrency_limit"]);
        if now >= 12 && now > low {
            break;
        }
    }
    assert!(now > low && now >= 12, "the limit rose again after the overload: {low} -> {now}");
}

/// Clients reading `sql` through the proxy in the background until dropped.
struct Background {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

impl Background {
    fn start(proxy: &Proxy, clients: usize, sql: &'static str) -> Background {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let opts = proxy.opts("app", "app", Some("sbtest"));
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut c = mysql_async::Conn::new(opts).await.expect("connect");
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        c.query_drop(sql).await.expect("read");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        Background { stop, tasks }
    }

    async fn finish(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut n = 0;
        for t in self.tasks {
            n += t.await.expect("reader");
        }
        n
    }
}

/// Another way a replica becomes slow: a DBA's or a backup tool's table lock on one replica
/// (LOCK TABLES ... WRITE by a privileged user, which read_only does not stop). Reads of
/// that table stall there; the adaptive balancer sees the statements piling up in flight
/// and sends the reads to the other replica (at most a quarter to the stalled one within
/// 15 s), and gives the replica its share back after the lock ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stalled_by_a_table_lock_gets_less_traffic() {
    let _heavy = HEAVY.lock().await;
    fresh_table("sbtest_adaptive", "(1, 1)").await;
    let proxy = Proxy::start(&[]);
    let load = Background::start(&proxy, 8, "SELECT v FROM sbtest_adaptive.t WHERE id = 1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let share = |rows: &std::collections::BTreeMap<String, serde_json::Value>| rows["20/3308"]["read_share"].as_f64().unwrap_or(0.0);
    println!("healthy: 3308 share {:.2}", share(&backends(&proxy).await));
    // The lock, held for 12 s on a privileged connection to 3308.
    let mut locker = lab(3308).await;
    locker.query_drop("LOCK TABLES sbtest_adaptive.t WRITE").await.expect("lock on the replica");
    let t = Instant::now();
    let mut low = None;
    while t.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rows = backends(&proxy).await;
        println!("{:>5.1}s locked: 3308 share {:.2}, in flight {}", t.elapsed().as_secs_f64(), share(&rows), rows["20/3308"]["in_flight"]);
        if share(&rows) <= 0.25 && t.elapsed() >= Duration::from_secs(6) && low.is_none() {
            low = Some(t.elapsed());
        }
    }
    locker.query_drop("UNLOCK TABLES").await.unwrap();
    drop(locker);
    assert!(low.is_some(), "the stalled replica kept more than a quarter of the reads");
    let t = Instant::now();
    let mut back = None;
    while t.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = share(&backends(&proxy).await);
        println!("{:>5.1}s unlocked: 3308 share {s:.2}", t.elapsed().as_secs_f64());
        if s >= 0.35 && t.elapsed() >= Duration::from_secs(5) {
            back = Some(t.elapsed());
            break;
        }
    }
    let n = load.finish().await;
    assert!(back.is_some(), "the replica did not regain 35% of the reads within 40 s");
    println!("{n} reads, every one answered");
    lab(PRIMARY).await.query_drop("DROP DATABASE sbtest_adaptive").await.unwrap();
}
