//! Tests that need the lab to themselves (killing nodes, 500 clients at once). They run
//! after the shared tests, one at a time
//! (`cargo xtask test` runs this target with --test-threads=1), and leave the lab as they
//! found it.

mod common;

use common::*;
use mysql_async::prelude::*;
use mysql_async::Conn;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Seen {
    /// (time since start, port) of each successful read.
    reads: Vec<(Duration, u16)>,
    /// (time since start, error) of each failed read.
    read_errors: Vec<(Duration, String)>,
    writes_ok: u64,
    write_errors: Vec<String>,
}

/// kill -9 of a replica under load: in-flight reads get an error or are retried on the
/// other replica, writers are unaffected, the proxy shuns the replica and takes it back
/// once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_replica_is_shunned_and_taken_back() {
    fresh_schema("sbtest_faults").await;
    let proxy = Proxy::start(&[]);
    {
        let mut c = proxy.conn().await;
        c.query_drop("CREATE TABLE sbtest_faults.w (id INT AUTO_INCREMENT PRIMARY KEY, at DOUBLE)").await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let opts = proxy.opts("app", "app", Some("sbtest"));
        let (seen, stop) = (seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = mysql_async::Conn::new(opts).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                match c.query_first::<(u16, i64), _>("SELECT @@port, SLEEP(0.02)").await {
                    Ok(Some((port, _))) => seen.lock().unwrap().reads.push((t0.elapsed(), port)),
                    Ok(None) => {}
                    Err(e) => seen.lock().unwrap().read_errors.push((t0.elapsed(), e.to_string())),
                }
            }
        }));
    }
    {
        let opts = proxy.opts("app", "app", Some("sbtest_faults"));
        let (seen, stop) = (seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = mysql_async::Conn::new(opts).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                match c.query_drop("INSERT INTO w (at) VALUES (UNIX_TIMESTAMP(NOW(6)))").await {
                    Ok(()) => seen.lock().unwrap().writes_ok += 1,
                    Err(e) => seen.lock().unwrap().write_errors.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = t0.elapsed();
    kill_node(3309);
    let shunned = proxy.wait_log(&["127.0.0.1:3309", "SHUNNED"], Duration::from_secs(5));
    let shunned_at = t0.elapsed();
    assert!(shunned, "proxy did not shun 3309:\n{}", proxy.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Until here 3309 is dead: no read may have been served by it since the shun.
    let restart_at = t0.elapsed();
    start_node(3309).await;
    let back = proxy.wait_log(&["127.0.0.1:3309", "ONLINE"], Duration::from_secs(15));
    assert!(back, "proxy did not take 3309 back:\n{}", proxy.log_text());
    let back_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let s = seen.lock().unwrap();
    let per_phase = |from: Duration, to: Duration| {
        let mut m: BTreeMap<u16, u64> = BTreeMap::new();
        for (t, p) in &s.reads {
            if *t >= from && *t < to {
                *m.entry(*p).or_default() += 1;
            }
        }
        m
    };
    let before = per_phase(Duration::ZERO, killed_at);
    let during = per_phase(shunned_at, restart_at);
    let after = per_phase(back_at + Duration::from_millis(500), Duration::MAX);
    println!("killed at {killed_at:?}, shunned by {shunned_at:?}, restarted at {restart_at:?}, back at {back_at:?}");
    println!("reads by port: before {before:?}, while shunned {during:?}, after {after:?}");
    println!("read errors: {:?}", s.read_errors);
    println!("writes ok {}, write errors {:?}", s.writes_ok, s.write_errors);
    assert!(before.get(&3309).copied().unwrap_or(0) > 0 && before.get(&3308).copied().unwrap_or(0) > 0);
    assert_eq!(during.get(&3309), None, "no reads from the dead replica once shunned");
    assert!(during.get(&3308).copied().unwrap_or(0) > 50, "the other replica carries the reads");
    assert!(after.get(&3309).copied().unwrap_or(0) > 0, "the replica is used again once back");
    // At most the reads in flight on 3309 at the kill may fail; none after the shun.
    assert!(s.read_errors.len() <= 16, "{:?}", s.read_errors);
    assert!(s.read_errors.iter().all(|(t, _)| *t < shunned_at), "{:?}", s.read_errors);
    assert!(s.write_errors.is_empty(), "writers unaffected: {:?}", s.write_errors);
    assert!(s.writes_ok > 100);
}

/// Leaves the lab as the other tests expect it: every replica caught up.
#[tokio::test]
async fn zz_lab_is_whole_again() {
    wait_replicas_caught_up().await;
}

/// 500 concurrent clients are served by at most max_connections backend connections per
/// server, sampled from the servers' process lists while the load runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_clients_never_exceed_backend_caps() {
    fresh_user("bw_cap", "bw_cap").await;
    let cfg = default_config_with(
        "[[users]]\nusername = \"bw_cap\"\npassword = \"bw_cap\"\nbackend_password = \"bw_cap\"\ndefault_hostgroup = 10\n",
    );
    let proxy = Proxy::start_with(Some(&cfg), &["--max-connections", "20"]);
    let running = Arc::new(AtomicBool::new(true));
    let max_seen: Arc<std::sync::Mutex<BTreeMap<u16, u64>>> = Default::default();
    let sampler = {
        let running = running.clone();
        let max_seen = max_seen.clone();
        tokio::spawn(async move {
            let mut conns = Vec::new();
            for p in [PRIMARY, REPLICAS[0], REPLICAS[1]] {
                conns.push((p, lab(p).await));
            }
            while running.load(Ordering::Relaxed) {
                for (p, c) in conns.iter_mut() {
                    let n: Option<u64> = c
                        .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'bw_cap'")
                        .await
                        .unwrap();
                    let mut m = max_seen.lock().unwrap();
                    let e = m.entry(*p).or_default();
                    *e = (*e).max(n.unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // All 500 clients connect first, then all run their queries at once.
    let mut connecting = Vec::new();
    for i in 0..500 {
        let opts = proxy.opts("bw_cap", "bw_cap", Some("sbtest"));
        connecting.push(tokio::spawn(async move { Conn::new(opts).await.map_err(|e| format!("client {i}: {e}")) }));
    }
    let mut clients = Vec::new();
    for c in connecting {
        clients.push(c.await.unwrap().unwrap_or_else(|e| panic!("{e}")));
    }
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let ok = ok.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..4 {
                // Reads to the replicas, writes-class statements to the primary.
                let q = if (i + j) % 4 == 0 { "DO SLEEP(0.01)" } else { "SELECT SLEEP(0.01), @@port" };
                c.query_drop(q).await.map_err(|e| format!("client {i} query {j}: {e}"))?;
                ok.fetch_add(1, Ordering::Relaxed);
            }
            c.disconnect().await.map_err(|e| e.to_string())
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            errors.push(e);
        }
    }
    running.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let m = max_seen.lock().unwrap().clone();
    println!("max backend connections seen per server: {m:?}");
    assert!(errors.is_empty(), "{} clients failed, first: {:?}", errors.len(), errors.first());
    assert_eq!(ok.load(Ordering::Relaxed), 2000);
    for (port, n) in &m {
        assert!(*n <= 20, "server {port} saw {n} proxy connections > max_connections 20");
    }
    assert!(m.values().all(|n| *n > 0), "each server was used: {m:?}");
}


/// Drop every loopback packet to or from `port` (not refused: dropped, as a firewall or a
/// dead host does).
fn black_hole(port: u16) -> NftTable {
    NftTable::on("bw_blackhole", &format!("tcp dport {port} drop\n tcp sport {port} drop"))
}

/// A replica black-holed by the firewall: reads in flight on it end within
/// backend_read_timeout_ms (retried on the other replica, as nothing had reached the
/// client), new reads move to the other replica, and the replica is taken back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn black_holed_replica_reads_end_and_move() {
    let timeout = Duration::from_millis(3000);
    let proxy = Proxy::start(&["--backend-read-timeout-ms", "3000"]);
    #[derive(Debug, Clone)]
    struct Read {
        start: Duration,
        took: Duration,
        port: Option<u16>,
        error: Option<String>,
    }
    let reads: Arc<Mutex<Vec<Read>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let opts = proxy.opts("app", "app", Some("sbtest"));
        let (reads, stop) = (reads.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = mysql_async::Conn::new(opts).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let start = t0.elapsed();
                let r = tokio::time::timeout(Duration::from_secs(30), c.query_first::<(u16, i64), _>("SELECT @@port, SLEEP(0.3)")).await;
                let took = t0.elapsed() - start;
                let (port, error) = match r {
                    Ok(Ok(Some((p, _)))) => (Some(p), None),
                    Ok(Ok(None)) => (None, Some("no row".to_string())),
                    Ok(Err(e)) => (None, Some(e.to_string())),
                    Err(_) => (None, Some("hung for 30 s".to_string())),
                };
                let failed = error.is_some();
                reads.lock().unwrap().push(Read { start, took, port, error });
                if failed {
                    // A failed read may leave the client's connection unusable: a new one.
                    match mysql_async::Conn::new(c.opts().clone()).await {
                        Ok(n) => c = n,
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let blocked_at = t0.elapsed();
    let hole = black_hole(3308);
    tokio::time::sleep(Duration::from_secs(9)).await;
    let lifted_at = t0.elapsed();
    drop(hole);
    let back = proxy.wait_log(&["127.0.0.1:3308", "ONLINE"], Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let reads = reads.lock().unwrap().clone();
    let in_flight: Vec<&Read> = reads.iter().filter(|r| r.start < blocked_at && r.start + r.took > blocked_at).collect();
    let slowest = reads.iter().filter(|r| r.start >= blocked_at.saturating_sub(Duration::from_secs(1))).map(|r| r.took).max().unwrap_or_default();
    let settled = blocked_at + timeout + Duration::from_secs(2);
    let moved: Vec<&Read> = reads.iter().filter(|r| r.start > settled && r.start + r.took < lifted_at).collect();
    let errors: Vec<&Read> = reads.iter().filter(|r| r.error.is_some()).collect();
    println!("blocked at {blocked_at:?}, lifted at {lifted_at:?}; {} reads, {} in flight at the block, slowest since {slowest:?}", reads.len(), in_flight.len());
    println!("in flight: {:?}", in_flight.iter().map(|r| (r.took, r.port, r.error.clone())).collect::<Vec<_>>());
    println!("errors: {errors:?}");
    assert!(!in_flight.is_empty());
    assert!(slowest <= timeout + Duration::from_secs(2), "a read took {slowest:?} (backend_read_timeout_ms 3000)");
    assert!(moved.len() > 20, "reads kept going: {}", moved.len());
    assert!(moved.iter().all(|r| r.port == Some(3309)), "reads moved to the other replica: {moved:?}");
    assert!(errors.len() <= 12, "at most the reads in flight fail: {errors:?}");
    assert!(back, "3308 is taken back once reachable:\n{}", proxy.log_text());
}

/// Broken replication (SQL thread stopped) shuns a replica after shun_after_failures
/// checks; it comes back when replication runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_replication_is_shunned() {
    let proxy = Proxy::start(&["--shun-after-failures", "2"]);
    let mut r = lab(3309).await;
    r.query_drop("STOP SLAVE SQL_THREAD").await.unwrap();
    let shunned = proxy.wait_log(&["127.0.0.1:3309", "SHUNNED", "SQL thread not running"], Duration::from_secs(10));
    let mut c = proxy.conn().await;
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let p: Option<u16> = c.query_first("SELECT @@port").await.unwrap();
        ports.extend(p);
    }
    r.query_drop("START SLAVE SQL_THREAD").await.unwrap();
    let back = proxy.wait_log(&["127.0.0.1:3309", "ONLINE"], Duration::from_secs(10));
    assert!(shunned, "{}", proxy.log_text());
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![3308], "reads avoid the broken replica");
    assert!(back, "{}", proxy.log_text());
    wait_replicas_caught_up().await;
}

/// A temporary grant that expires while the proxy cannot reach the writer (nftables drops
/// its packets to 3307): its sessions are closed at expiry all the same (the account still
/// exists on the servers, the proxy no longer lets it in), the audit log says the drop is
/// pending, and the account is dropped everywhere once the writer answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_expiring_while_the_writer_is_unreachable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_dir("cutoff");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let db = dir.join("admin.db").display().to_string();
    let audit = format!("{db}.audit.jsonl");
    let p = Proxy::start_as_nobody(None, &["--admin-db", &db]);
    let (ok, out) = access_cli(&p, &["grant", "--user", "dora", "--ttl", "6s", "--role", "read_only", "--schema", "sbtest", "--reason", "INC-77", "--output", "json"]);
    assert!(ok, "{out}");
    let granted = Instant::now();
    let g: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (pw, account) = (g["password"].as_str().unwrap().to_string(), g["account"].as_str().unwrap().to_string());
    let mut c = Conn::new(p.opts("dora", &pw, Some("sbtest"))).await.expect("dora logs in");
    let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM sbtest1").await.unwrap();
    assert_eq!(n, Some(10000));
    let cut = cut_nobody_off(PRIMARY);
    // The session is closed at expiry, though the writer does not answer.
    let closed = loop {
        if c.query_first::<i64, _>("SELECT 1").await.is_err() {
            break granted.elapsed();
        }
        assert!(granted.elapsed() < Duration::from_secs(12), "the session outlived its grant");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("session closed {closed:?} after a 6 s grant, the writer unreachable");
    assert!(closed >= Duration::from_secs(5), "not before the expiry: {closed:?}");
    let e = Conn::new(p.opts("dora", &pw, Some("sbtest"))).await.unwrap_err();
    assert_eq!(server_code(&e), Some(1045), "no new login: {e}");
    let t = Instant::now();
    while !std::fs::read_to_string(&audit).unwrap_or_default().contains("\"event\":\"drop_pending\"") {
        assert!(t.elapsed() < Duration::from_secs(15), "no drop_pending in the audit log:\n{}", std::fs::read_to_string(&audit).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(account_counts(&account).await, vec![1, 1, 1], "the account is still on the servers");
    drop(cut);
    let back = Instant::now();
    while account_counts(&account).await != vec![0, 0, 0] {
        assert!(back.elapsed() < Duration::from_secs(20), "the account was not dropped once the writer answered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("account dropped everywhere {:?} after the writer answered again", back.elapsed());
    let log = std::fs::read_to_string(&audit).unwrap();
    for ev in ["expired", "drop_pending", "account_dropped"] {
        assert!(log.lines().any(|l| l.contains(&format!("\"event\":\"{ev}\"")) && l.contains("\"user\":\"dora\"")), "audit lacks {ev}:\n{log}");
    }
    let (ok, list) = access_cli(&p, &["list"]);
    assert!(ok && list.contains("dora") && list.contains("expired"), "{list}");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
