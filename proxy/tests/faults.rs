//! Failure tests that kill lab nodes. They run after the shared tests, one at a time
//! (`cargo xtask test` runs this target with --test-threads=1), and leave the lab as they
//! found it.

mod common;

use common::*;
use mysql_async::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let during = per_phase(shunned_at, back_at);
    let after = per_phase(back_at + Duration::from_millis(500), Duration::MAX);
    println!("killed at {killed_at:?}, shunned by {shunned_at:?}, back at {back_at:?}");
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
