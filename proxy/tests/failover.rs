//! The failover controller against the real lab. These tests change the lab's topology
//! (they kill primaries and promote replicas), so `cargo xtask test` runs them alone, last,
//! and resets the lab afterwards (`cargo xtask lab reset`).
//!
//! `cluster_survives_primary_failures` runs the whole story in order, each phase starting
//! from the topology the previous one left:
//! 1. the controller alone loses sight of the primary (nftables drops its packets; the
//!    replicas still replicate): UnreachablePrimary, no promotion;
//! 2. graceful switchover 3307 -> 3308 with a writer loop: no acknowledged write lost, the
//!    write pause measured;
//! 3. kill -9 of the primary under a writer loop, semi-synchronous replication on: a replica
//!    is promoted within 10 s, the other follows it, every acknowledged write is there;
//! 4. a second kill inside the cooldown: no promotion, reads work, writes get the cooldown
//!    error; `ack` with a vetoing pre-promotion hook: still no promotion; a manual failover
//!    promotes, writes work again;
//! 5. the first failed primary comes back writable: it is fenced (read_only, not routed);
//! 6. the topology page in headless Chromium shows all of it; /metrics counts it.
//!
//! `drill` (ignored; run by `cargo xtask drill failover`) is phase 3 alone with a timeline.

mod common;

use common::*;
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SCHEMA: &str = "sbtest_failover";
const ALL: [u16; 3] = [3307, 3308, 3309];

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0)
}

/// The proxy's embedded config with hooks that log (and can veto) promotions.
fn config(dir: &str) -> String {
    let hooks = format!(
        "pre_promotion_hook = 'test ! -e {dir}/veto || {{ echo vetoed by test; exit 3; }}; echo \"$BREAKWATER_RECOVERY_KIND $BREAKWATER_FAILED_HOST:$BREAKWATER_FAILED_PORT $BREAKWATER_PROMOTED_HOST:$BREAKWATER_PROMOTED_PORT\" >> {dir}/pre.log'\n\
         post_promotion_hook = 'echo \"$BREAKWATER_RECOVERY_KIND $BREAKWATER_FAILED_HOST:$BREAKWATER_FAILED_PORT $BREAKWATER_PROMOTED_HOST:$BREAKWATER_PROMOTED_PORT\" >> {dir}/post.log'\n"
    );
    breakwater_proxy::config::DEFAULT_TOML.replace("# pre_promotion_hook =", &format!("{hooks}# pre_promotion_hook ="))
}

/// Connection to a lab server, or None when it is down.
async fn try_lab(port: u16) -> Option<Conn> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("monitor"))
        .pass(Some("monitor"))
        .prefer_socket(false);
    tokio::time::timeout(Duration::from_secs(2), Conn::new(opts)).await.ok()?.ok()
}

/// (Master_Port, Slave_IO_Running) of a replica.
async fn replication_of(port: u16) -> Option<(u16, String)> {
    let mut c = try_lab(port).await?;
    let row: Option<mysql_async::Row> = c.query_first("SHOW SLAVE STATUS").await.ok()?;
    let row = row?;
    let mp: u16 = row.get_opt::<u16, _>("Master_Port")?.ok()?;
    let io: String = row.get_opt::<String, _>("Slave_IO_Running")?.ok()?;
    Some((mp, io))
}

/// Wait (10 s at most) until `replica` replicates from `primary` with its IO thread running.
async fn wait_follows(replica: u16, primary: u16) {
    wait_for(&format!("{replica} replicates from {primary}"), Duration::from_secs(10), || async move {
        replication_of(replica).await.is_some_and(|(m, io)| m == primary && io == "Yes")
    })
    .await;
}

async fn read_only(port: u16) -> Option<bool> {
    let mut c = try_lab(port).await?;
    let v: Option<i64> = c.query_first("SELECT @@read_only").await.ok()?;
    v.map(|v| v != 0)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    loop {
        if f().await {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that inserts one row per statement through the proxy and remembers which
/// inserts were acknowledged (and when), reconnecting after errors.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WriterReport>,
}

#[derive(Default)]
struct WriterReport {
    acked: Vec<(i64, Instant)>,
    errors: Vec<(Instant, String)>,
}

impl WriterReport {
    /// Longest time between two acknowledged writes.
    fn max_gap(&self) -> Duration {
        self.acked.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or_default()
    }

    fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.acked.iter().map(|a| a.1).find(|a| *a > t)
    }
}

impl Writer {
    fn start(opts: Opts, first_id: i64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut rep = WriterReport::default();
            let mut conn: Option<Conn> = None;
            let mut id = first_id;
            while !s.load(Ordering::Relaxed) {
                if conn.is_none() {
                    match tokio::time::timeout(Duration::from_secs(2), Conn::new(opts.clone())).await {
                        Ok(Ok(c)) => conn = Some(c),
                        Ok(Err(e)) => {
                            rep.errors.push((Instant::now(), format!("connect: {e}")));
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        Err(_) => {
                            rep.errors.push((Instant::now(), "connect: timeout".into()));
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                id += 1;
                let q = format!("INSERT INTO {SCHEMA}.w (id) VALUES ({id})");
                match tokio::time::timeout(Duration::from_secs(15), c.query_drop(q)).await {
                    Ok(Ok(())) => rep.acked.push((id, Instant::now())),
                    Ok(Err(e)) => {
                        let server_err = matches!(e, mysql_async::Error::Server(_));
                        rep.errors.push((Instant::now(), e.to_string()));
                        if !server_err {
                            conn = None;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(_) => {
                        rep.errors.push((Instant::now(), "insert: no answer in 15 s".into()));
                        conn = None;
                    }
                }
            }
            rep
        });
        Writer { stop, task }
    }

    async fn finish(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task")
    }
}

/// Every acknowledged id must be on `port`; returns how many were missing (and asserts
/// none are when `must_keep_all`).
async fn check_acked(port: u16, rep: &WriterReport, must_keep_all: bool) -> usize {
    let mut c = lab(port).await;
    let ids: Vec<i64> = c.query(format!("SELECT id FROM {SCHEMA}.w")).await.unwrap();
    let have: BTreeSet<i64> = ids.into_iter().collect();
    let missing: Vec<i64> = rep.acked.iter().map(|a| a.0).filter(|id| !have.contains(id)).collect();
    if must_keep_all {
        assert!(missing.is_empty(), "{} acknowledged writes missing on {port}: {:?}", missing.len(), &missing[..missing.len().min(20)]);
    }
    missing.len()
}

async fn view(p: &Proxy) -> serde_json::Value {
    let (code, v) = p.admin("GET", "/api/failover").await;
    assert_eq!(code, 200, "{v}");
    v
}

/// How many events of `kind` the view holds.
fn count_events(v: &serde_json::Value, kind: &str) -> usize {
    events(v).iter().filter(|e| *e == kind).count()
}

/// Lines the test hooks (see `config`) wrote to `dir/file` (pre.log, post.log): one per run.
fn hook_lines(dir: &std::path::Path, file: &str) -> usize {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default().lines().count()
}

fn events(v: &serde_json::Value) -> Vec<String> {
    v["events"].as_array().into_iter().flatten().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect()
}


async fn current_primary(p: &Proxy) -> String {
    view(p).await["primary"].as_str().unwrap_or("").to_string()
}

/// Semi-synchronous replication on `primary` (AFTER_SYNC: a commit is acknowledged only
/// once a replica has it in its relay log); replicas re-connect their IO threads so they
/// register as semi-sync clients.
async fn enable_semisync(primary: u16, replicas: &[u16]) {
    let mut c = lab(primary).await;
    c.query_drop(
        "SET GLOBAL rpl_semi_sync_master_wait_point = 'AFTER_SYNC'; SET GLOBAL rpl_semi_sync_master_timeout = 10000; \
         SET GLOBAL rpl_semi_sync_master_enabled = 1",
    )
    .await
    .unwrap();
    for r in replicas {
        lab(*r).await.query_drop("STOP SLAVE IO_THREAD; START SLAVE IO_THREAD").await.unwrap();
    }
    let want = replicas.len() as u64;
    wait_for("semi-sync clients registered", Duration::from_secs(10), || async move {
        global_status(primary, "Rpl_semi_sync_master_clients").await >= want
    })
    .await;
}

struct Timeline {
    killed: u16,
    promoted: String,
    detected_after: Duration,
    promoted_after: Duration,
    first_write_after: Duration,
    acked: usize,
    errors: usize,
    missing: usize,
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  t=0          kill -9 primary 127.0.0.1:{}", self.killed)?;
        writeln!(f, "  t={:>8.3}s  DeadPrimary detected", self.detected_after.as_secs_f64())?;
        writeln!(f, "  t={:>8.3}s  {} promoted (proxy writer hostgroup switched)", self.promoted_after.as_secs_f64(), self.promoted)?;
        writeln!(f, "  t={:>8.3}s  first acknowledged write through the same proxy address", self.first_write_after.as_secs_f64())?;
        write!(f, "  writes acknowledged {}, failed {} (all during the outage), acknowledged but missing on the new primary: {}", self.acked, self.errors, self.missing)
    }
}

/// kill -9 the primary while a writer loop runs through the proxy; returns the timeline.
async fn kill_primary_under_load(p: &Proxy, first_id: i64, semisync: bool) -> Timeline {
    let old = current_primary(p).await;
    let old_port = port_of(&old);
    let replicas: Vec<u16> = ALL.iter().copied().filter(|x| *x != old_port).collect();
    if semisync {
        enable_semisync(old_port, &replicas).await;
    } else {
        // The lab runs semi-sync; the asynchronous drill turns it off to show what is lost.
        lab(old_port).await.query_drop("SET GLOBAL rpl_semi_sync_master_enabled = 0").await.unwrap();
    }
    let w = Writer::start(p.opts("app", "app", Some(SCHEMA)), first_id);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = view(p).await["events"].as_array().map(|a| a.len()).unwrap_or(0);
    let wall_kill = std::time::SystemTime::now();
    let killed_at = Instant::now();
    kill_node(old_port);
    wait_for("a replica promoted", Duration::from_secs(10), || async {
        let v = view(p).await;
        let now = v["primary"].as_str().unwrap_or("").to_string();
        now != old && !now.is_empty() && v["writer_gate"] == "open"
    })
    .await;
    let v = view(p).await;
    let new = v["primary"].as_str().unwrap().to_string();
    let new_port = port_of(&new);
    // Writes resume through the same proxy address: give the writer a second on the new primary.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rep = w.finish().await;
    let first = rep.first_ack_after(killed_at + Duration::from_millis(5)).expect("no write succeeded after the failover");
    assert!(first - killed_at < Duration::from_secs(10), "first write after kill took {:?}", first - killed_at);
    let kill_ms = wall_kill.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let rec = &v["last_recovery"];
    let detected_ms = rec["detected_at_ms"].as_u64().unwrap_or(kill_ms);
    let promoted_ms = rec["promoted_at_ms"].as_u64().unwrap_or(kill_ms);
    assert!(events(&v)[before..].iter().any(|e| e == "DeadPrimary"), "{:?}", events(&v));
    // The other replica follows the new primary.
    for r in replicas.iter().copied().filter(|r| *r != new_port) {
        wait_follows(r, new_port).await;
    }
    assert_eq!(read_only(new_port).await, Some(false), "new primary must be writable");
    let missing = check_acked(new_port, &rep, semisync).await;
    Timeline {
        killed: old_port,
        promoted: new,
        detected_after: Duration::from_millis(detected_ms.saturating_sub(kill_ms)),
        promoted_after: Duration::from_millis(promoted_ms.saturating_sub(kill_ms)),
        first_write_after: first - killed_at,
        acked: rep.acked.len(),
        errors: rep.errors.len(),
        missing,
    }
}

/// The lab must be in its initial topology (3307 primary; `cargo xtask lab reset` makes it so).
async fn assert_initial_topology() {
    assert_eq!(read_only(3307).await, Some(false), "3307 must be the writable primary: run `cargo xtask lab reset`");
    for r in [3308, 3309] {
        let rep = replication_of(r).await;
        assert!(rep.as_ref().is_some_and(|(m, io)| *m == 3307 && io == "Yes"), "{r} must replicate from 3307 (got {rep:?}): run `cargo xtask lab reset`");
    }
}

async fn setup_schema() {
    let mut c = lab(3307).await;
    c.query_drop(format!("DROP DATABASE IF EXISTS {SCHEMA}; CREATE DATABASE {SCHEMA}; CREATE TABLE {SCHEMA}.w (id BIGINT PRIMARY KEY, at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6))"))
        .await
        .unwrap();
    wait_replicas_caught_up().await;
}


fn chromium_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("bw-chromium-{}", std::process::id()));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("chromium (installed by cargo xtask deps)");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A replica added at runtime through the admin interface (LOAD MYSQL SERVERS TO RUNTIME)
/// joins the controller: probed, shown as a replica, a promotion candidate by its rule.
/// Changes no topology, but needs the initial one: its name sorts it before
/// `cluster_survives_primary_failures` (libtest runs them in name order, one at a time here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_added_server_joins_the_controller() {
    assert_initial_topology().await;
    let without_3309 = breakwater_proxy::config::DEFAULT_TOML.replace(
        "[[servers]]\nhostgroup = 20\nhost = \"127.0.0.1\"\nport = 3309\n",
        "[[servers]]\nhostgroup = 99\nhost = \"127.0.0.1\"\nport = 3309\n",
    );
    assert_ne!(without_3309, breakwater_proxy::config::DEFAULT_TOML, "the default config lists 3309 in hostgroup 20");
    let p = Proxy::start_with(Some(&without_3309), &["--failover", "on", "--initial"]);
    let members = |v: &serde_json::Value| -> Vec<(String, String, String)> {
        v["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["addr"].as_str().unwrap_or("").to_string(), s["role"].as_str().unwrap_or("").to_string(), s["promotion_rule"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    wait_for("controller polls", Duration::from_secs(10), || async { view(&p).await["polls"].as_u64().unwrap_or(0) >= 2 }).await;
    let v = view(&p).await;
    assert!(!members(&v).iter().any(|m| m.0 == addr(3309)), "3309 is not in the cluster's hostgroups yet: {:?}", members(&v));
    p.admin_sql("INSERT INTO mysql_servers (hostgroup_id, hostname, port, max_replication_lag, promotion_rule) VALUES (20, '127.0.0.1', 3309, 10, 'prefer')")
        .unwrap();
    p.admin_sql("LOAD MYSQL SERVERS TO RUNTIME").unwrap();
    wait_for("3309 joins as a replica", Duration::from_secs(10), || async {
        members(&view(&p).await).contains(&(addr(3309), "replica".to_string(), "prefer".to_string()))
    })
    .await;
    let v = view(&p).await;
    assert!(events(&v).iter().any(|e| e == "MemberAdded"), "{:?}", events(&v));
    assert_eq!(v["primary"], addr(3307), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_primary_failures() {
    assert_initial_topology().await;
    setup_schema().await;
    let hooks_dir = std::env::temp_dir().join(format!("bw-failover-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&hooks_dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hooks_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let dir = hooks_dir.display().to_string();
    let admin_db = format!("{dir}/admin.db");
    let p = Proxy::start_as_nobody(Some(&config(&dir)), &["--failover", "on", "--admin-db", &admin_db]);
    wait_for("controller sees 3307 as primary", Duration::from_secs(10), || async {
        let v = view(&p).await;
        v["primary"] == addr(3307) && v["polls"].as_u64().unwrap_or(0) >= 2
    })
    .await;

    // 1. Only the controller loses the primary: no promotion.
    {
        let _blocked = cut_nobody_off(3307);
        wait_for("UnreachablePrimary detected", Duration::from_secs(10), || async {
            view(&p).await["problems"].as_array().into_iter().flatten().any(|x| x["kind"] == "UnreachablePrimary")
        })
        .await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let v = view(&p).await;
        assert_eq!(v["primary"], addr(3307), "{v}");
        assert!(v["counters"]["recoveries"].as_object().is_none_or(|m| m.is_empty()), "no recovery may run: {v}");
        assert!(!events(&v).iter().any(|e| e == "DeadPrimary"), "{:?}", events(&v));
        assert_eq!(read_only(3307).await, Some(false));
        for r in [3308, 3309] {
            assert_eq!(replication_of(r).await.map(|x| x.1), Some("Yes".to_string()), "replica {r} keeps replicating");
        }
        println!("phase 1: controller cut off from 3307 for 4+ s: UnreachablePrimary, no promotion");
    }
    wait_for("primary reachable and ONLINE in the proxy again", Duration::from_secs(10), || async {
        view(&p).await["servers"].as_array().into_iter().flatten().any(|s| {
            s["addr"] == addr(3307) && s["reachable"] == true && s["proxy_status"].as_str().is_some_and(|x| x.contains("hg10:ONLINE"))
        })
    })
    .await;

    // 2. Graceful switchover with a writer loop.
    let w = Writer::start(p.opts("app", "app", Some(SCHEMA)), 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, out) = failover_cli(&p, &["switchover", "--to", "127.0.0.1:3308"]);
    assert!(ok, "switchover: {out}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rep = w.finish().await;
    check_acked(3308, &rep, true).await;
    assert_eq!(read_only(3308).await, Some(false));
    for r in [3307, 3309] {
        wait_follows(r, 3308).await;
    }
    let v = view(&p).await;
    let pause = v["last_recovery"]["write_pause_ms"].as_u64().unwrap_or(0);
    println!(
        "phase 2: switchover 3307 -> 3308: {} writes acknowledged, none lost, {} errors {:?}; writes held {} ms in the proxy, longest gap between acknowledged writes {} ms",
        rep.acked.len(),
        rep.errors.len(),
        rep.errors.iter().map(|e| &e.1).take(3).collect::<Vec<_>>(),
        pause,
        rep.max_gap().as_millis()
    );
    assert!(rep.max_gap() < Duration::from_secs(5), "write pause {:?}", rep.max_gap());
    assert!(v["cooldown"]["active"] == false, "a switchover is planned: no cooldown");
    let (_, m) = p.admin("GET", "/metrics").await;
    assert!(m.as_str().unwrap_or("").contains("breakwater_replication_lag_seconds{cluster=\"lab\",server_address=\"127.0.0.1:3307\"}"), "{m}");
    // A real Prometheus scrapes the admin /metrics; every query of the proxy's Grafana
    // dashboard returns data.
    let admin_port = p.admin_port;
    tokio::task::spawn_blocking(move || {
        let prom = breakwater_testkit::Prometheus::start("breakwater-proxy", admin_port);
        let v = prom.value("breakwater_failover_recoveries_total{kind=\"switchover\",result=\"ok\"}", Duration::from_secs(30));
        assert_eq!(v, 1.0);
        let exprs = breakwater_testkit::dashboard_queries(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/breakwater-proxy.json"));
        assert!(exprs.len() >= 12, "{exprs:?}");
        prom.all_have_data(&exprs, Duration::from_secs(60));
    })
    .await
    .expect("prometheus check");
    println!("phase 2: Prometheus scraped /metrics; every query of dashboards/breakwater-proxy.json returns data");

    // A temporary user granted before the failover.
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater-proxy"))
        .args(["access", "--admin", &format!("127.0.0.1:{}", p.admin_port), "grant", "--user", "dave", "--ttl", "1h", "--schema", "sbtest_failover", "--output", "json"])
        .env("BREAKWATER_ADMIN_TOKEN", &p.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dave: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dave_account = dave["account"].as_str().unwrap().to_string();

    // 3. kill -9 of the primary under load, semi-sync on.
    let tl = kill_primary_under_load(&p, 1_000_000, true).await;
    // The grant survived: dave logs in through the proxy; revoking drops the account on the
    // new primary (and so on the replica that follows it).
    let mut d = Conn::new(p.opts("dave", dave["password"].as_str().unwrap(), Some(SCHEMA))).await.expect("dave after the failover");
    let _: Option<i64> = d.query_first(format!("SELECT COUNT(*) FROM {SCHEMA}.w")).await.unwrap();
    drop(d);
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater-proxy"))
        .args(["access", "--admin", &format!("127.0.0.1:{}", p.admin_port), "revoke", "--user", "dave"])
        .env("BREAKWATER_ADMIN_TOKEN", &p.token)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && msg.contains(&tl.promoted), "revoked on the new primary: {msg} {}", String::from_utf8_lossy(&out.stderr));
    for port in ALL.iter().copied().filter(|x| *x != 3308) {
        let acct = dave_account.clone();
        wait_for("dave's account gone", Duration::from_secs(10), || {
            let acct = acct.clone();
            async move {
                let mut c = lab(port).await;
                let n: Option<i64> = c.exec_first("SELECT COUNT(*) FROM mysql.user WHERE User = ?", (acct,)).await.unwrap();
                n == Some(0)
            }
        })
        .await;
    }
    println!("phase 3: kill -9 of the primary with semi-sync replication:\n{tl}");
    let first_new = port_of(&tl.promoted);
    let pre = std::fs::read_to_string(hooks_dir.join("pre.log")).unwrap_or_default();
    let post = std::fs::read_to_string(hooks_dir.join("post.log")).unwrap_or_default();
    let line = format!("automated 127.0.0.1:3308 {}", tl.promoted);
    assert!(pre.contains(&line) && post.contains(&line), "hooks saw: pre {pre:?} post {post:?}");
    let v = view(&p).await;
    assert_eq!(v["cooldown"]["active"], true);

    // 4. A second primary failure inside the cooldown: detected, not acted on.
    let remaining: u16 = ALL.iter().copied().find(|x| *x != 3308 && *x != first_new).unwrap();
    kill_node(first_new);
    let blocked_in = wait_for("second DeadPrimary blocked by the cooldown", Duration::from_secs(10), || async {
        let v = view(&p).await;
        v["writer_gate"].as_str().is_some_and(|g| g.starts_with("block")) && events(&v).iter().any(|e| e == "RecoveryBlocked")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(current_primary(&p).await, tl.promoted, "no automated promotion inside the cooldown");
    assert_eq!(replication_of(remaining).await.map(|x| x.0), Some(first_new), "the last replica was not touched");
    let mut c = p.conn().await;
    let n: Option<i64> = c.query_first(format!("SELECT COUNT(*) FROM {SCHEMA}.w")).await.expect("reads keep working");
    assert!(n.unwrap_or(0) > 0);
    let e = c.query_drop(format!("INSERT INTO {SCHEMA}.w (id) VALUES (-1)")).await.expect_err("writes must be refused");
    assert_eq!(server_code(&e), Some(1290), "{e}");
    assert!(e.to_string().contains("cooldown"), "{e}");
    println!("phase 4: second kill inside the cooldown: blocked {blocked_in:?} after the kill; 3 s later still no promotion, reads OK, writes refused: {e}");
    // ack lets automated recovery run, but the pre-promotion hook vetoes it.
    std::fs::write(hooks_dir.join("veto"), "").unwrap();
    let (ok, out) = failover_cli(&p, &["ack", "--by", "failover-test"]);
    assert!(ok, "ack: {out}");
    let v = view(&p).await;
    assert_eq!(v["primary"], tl.promoted, "vetoed: {v}");
    assert!(events(&v).iter().any(|e| e == "RecoveryFailed"), "{:?}", events(&v));
    let e = c.query_drop(format!("INSERT INTO {SCHEMA}.w (id) VALUES (-2)")).await.expect_err("still refused after a veto");
    assert!(e.to_string().contains("vetoed"), "{e}");
    // A person runs a manual failover: it ignores the cooldown the vetoed attempt started.
    std::fs::remove_file(hooks_dir.join("veto")).unwrap();
    let (ok, out) = failover_cli(&p, &["failover"]);
    assert!(ok, "manual failover: {out}");
    assert_eq!(current_primary(&p).await, addr(remaining));
    c.query_drop(format!("INSERT INTO {SCHEMA}.w (id) VALUES (-3)")).await.expect("writes work after the manual failover");
    println!("phase 4: ack + vetoing hook: no promotion; manual failover: {}", out.trim());
    drop(c);

    // 5. The first failed primary (3308) comes back writable: fenced.
    start_node(3308).await;
    // Its start script says read_only=1; a real primary's my.cnf says 0: make it so.
    lab(3308).await.query_drop("SET GLOBAL read_only = 0").await.unwrap();
    wait_for("3308 fenced read-only", Duration::from_secs(10), || async { read_only(3308).await == Some(true) }).await;
    let v = view(&p).await;
    let s3308 = v["servers"].as_array().unwrap().iter().find(|s| s["addr"] == addr(3308)).unwrap().clone();
    assert_eq!(s3308["role"], "fenced");
    assert_eq!(s3308["hostgroups"].as_array().map(|a| a.len()), Some(0), "a fenced server is not routed: {s3308}");
    assert!(events(&v).iter().any(|e| e == "Fenced"));

    // 6. The topology page and the metrics.
    let dom = chromium_dom(&format!("http://127.0.0.1:{}/topology", p.admin_port));
    assert!(dom.contains(&format!("data-addr=\"{}\" data-role=\"primary\"", addr(remaining))), "page: {dom}");
    assert!(dom.contains("data-addr=\"127.0.0.1:3308\" data-role=\"fenced\" data-up=\"true\""), "page: {dom}");
    assert!(dom.contains(&format!("data-addr=\"{}\" data-role=\"fenced\" data-up=\"false\"", addr(first_new))), "page: {dom}");
    assert!(dom.contains("id=\"cooldown\" data-active=\"true\""), "page: {dom}");
    // Each node's live load (from /api/backends): the writer's row in hostgroup 10.
    assert!(dom.contains("class=\"load\" data-hostgroup=\"10\" data-source=\"proxy\""), "page: {dom}");
    assert!(dom.contains("RecoverDeadPrimary") && dom.contains("RecoveryBlocked"), "page events: {dom}");
    let (code, m) = p.admin("GET", "/metrics").await;
    assert_eq!(code, 200);
    let m = m.as_str().unwrap_or("").to_string();
    for want in [
        "breakwater_failover_recoveries_total{cluster=\"lab\",kind=\"automated\",result=\"ok\"} 1",
        "breakwater_failover_recoveries_total{cluster=\"lab\",kind=\"automated\",result=\"failed\"} 1",
        "breakwater_failover_recoveries_total{cluster=\"lab\",kind=\"manual\",result=\"ok\"} 1",
        "breakwater_failover_recoveries_total{cluster=\"lab\",kind=\"switchover\",result=\"ok\"} 1",
        "breakwater_failover_recoveries_blocked_total{cluster=\"lab\"} 1",
        "breakwater_failover_cooldown_active{cluster=\"lab\"} 1",
        "breakwater_failover_detections_total{cluster=\"lab\",kind=\"DeadPrimary\"} 2",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    // Phase 1's UnreachablePrimary, at least. A killed primary can also be seen as unreachable
    // for one poll, while a replica's IO thread has not yet noticed the lost connection
    // (replicas that still replicate mean "unreachable", not "dead"), before it is DeadPrimary.
    let unreachable = m
        .lines()
        .find_map(|l| l.strip_prefix("breakwater_failover_detections_total{cluster=\"lab\",kind=\"UnreachablePrimary\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(unreachable >= 1, "UnreachablePrimary detections: {unreachable}\n{m}");
    let _ = std::fs::remove_dir_all(&hooks_dir);
}

/// `cargo xtask drill failover`: kill -9 the primary under a writer loop and print the
/// timeline. BREAKWATER_DRILL_ASYNC=1 runs it without semi-sync and reports lost writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn drill() {
    let semisync = std::env::var("BREAKWATER_DRILL_ASYNC").map(|v| v != "1").unwrap_or(true);
    setup_schema().await;
    let p = Proxy::start(&["--failover", "on"]);
    wait_for("controller ready", Duration::from_secs(10), || async { view(&p).await["polls"].as_u64().unwrap_or(0) >= 2 }).await;
    let tl = kill_primary_under_load(&p, 0, semisync).await;
    println!(
        "\nfailover drill ({}):\n{tl}\n\nevents:",
        if semisync { "semi-synchronous replication, AFTER_SYNC" } else { "asynchronous replication" }
    );
    for e in view(&p).await["events"].as_array().into_iter().flatten() {
        println!("  {} {:<20} {:<16} {}", e["at"].as_str().unwrap_or(""), e["kind"].as_str().unwrap_or(""), e["addr"].as_str().unwrap_or(""), e["action"].as_str().unwrap_or(""));
    }
    println!("\nthe lab is left as the drill made it; `cargo xtask lab reset` restores 3307 as primary");
}

/// What the controller decided survives a restart of the proxy (the admin db file): after a
/// failover, the proxy goes down and the old primary comes back writable meanwhile; the
/// restarted proxy keeps the new primary, fences the old one (read_only, not routed) and
/// keeps the cooldown. A second proxy with no state of its own follows the replication
/// topology: it routes to the primary the replicas follow and fences a writable stray.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_proxy_keeps_its_decisions() {
    assert_initial_topology().await;
    setup_schema().await;
    let dir = fresh_dir("state-test");
    let db = dir.join("admin.db").display().to_string();
    let args = ["--failover", "on", "--admin-db", db.as_str()];
    let p = Proxy::start(&args);
    wait_for("controller ready", Duration::from_secs(10), || async { view(&p).await["polls"].as_u64().unwrap_or(0) >= 2 }).await;
    kill_node(3307);
    wait_for("a replica promoted", Duration::from_secs(15), || async {
        let v = view(&p).await;
        v["primary"] != addr(3307) && v["writer_gate"] == "open"
    })
    .await;
    let new = current_primary(&p).await;
    // Semi-sync is managed: the new primary waits for the other replica, which was
    // repointed with its replica side on.
    let mut c = lab(port_of(&new)).await;
    let on: Option<i64> = c.query_first("SELECT @@rpl_semi_sync_master_enabled").await.unwrap();
    assert_eq!(on, Some(1), "semi-sync master side on the promoted primary");
    drop(c);
    let np = port_of(&new);
    wait_for("the other replica registers as a semi-sync client", Duration::from_secs(10), || async move {
        global_status(np, "Rpl_semi_sync_master_clients").await >= 1
    })
    .await;
    wait_for("the metric says so", Duration::from_secs(5), || async {
        let (_, m) = p.admin("GET", "/metrics").await;
        m.as_str().unwrap_or_default().contains("breakwater_failover_semisync_active{cluster=\"lab\"} 1")
    })
    .await;
    println!("promoted {new}; the proxy goes down, 3307 comes back writable");
    drop(p);
    start_node(3307).await;
    assert_eq!(read_only(3307).await, Some(false), "the old primary restarts writable (its start.sh says read_only=0)");

    let p = Proxy::start(&args);
    wait_for("restarted controller polls", Duration::from_secs(10), || async { view(&p).await["polls"].as_u64().unwrap_or(0) >= 2 }).await;
    wait_for("3307 fenced again", Duration::from_secs(10), || async { read_only(3307).await == Some(true) }).await;
    let v = view(&p).await;
    assert_eq!(v["primary"], new.as_str(), "{v:#}");
    assert!(v["cooldown"]["active"].as_bool() == Some(true), "the cooldown survived the restart: {:#}", v["cooldown"]);
    assert!(events(&v).iter().any(|e| e == "StateRestored"), "{:?}", events(&v));
    let old = v["servers"].as_array().into_iter().flatten().find(|s| s["addr"] == addr(3307)).cloned().unwrap_or_default();
    assert_eq!(old["role"], "fenced", "{old:#}");
    assert!(old["hostgroups"].as_array().is_some_and(|h| h.is_empty()), "the fenced server is not routed: {old:#}");
    // Writes through the restarted proxy land on the new primary.
    let mut c = Conn::new(p.opts("app", "app", Some(SCHEMA))).await.unwrap();
    c.query_drop(format!("INSERT INTO {SCHEMA}.w (id) VALUES (424242)")).await.unwrap();
    drop(c);
    let on = |port: u16| async move {
        let mut c = lab(port).await;
        let n: Option<i64> = c.query_first(format!("SELECT COUNT(*) FROM {SCHEMA}.w WHERE id = 424242")).await.unwrap();
        n.unwrap_or(0)
    };
    assert_eq!(on(port_of(&new)).await, 1);
    assert_eq!(on(3307).await, 0, "nothing reached the fenced old primary");
    drop(p);

    // A proxy with no state (its own db file) and the default config naming 3307 as the
    // writer: it follows the replicas, and fences 3307 when it is writable again.
    lab(3307).await.query_drop("SET GLOBAL read_only = 0").await.unwrap();
    let other = dir.join("other.db").display().to_string();
    let q = Proxy::start(&["--failover", "on", "--admin-db", other.as_str()]);
    wait_for("the stateless proxy follows the topology", Duration::from_secs(10), || async {
        let v = view(&q).await;
        v["primary"] == new.as_str() && read_only(3307).await == Some(true)
    })
    .await;
    let v = view(&q).await;
    let ev = events(&v);
    assert!(ev.iter().any(|e| e == "DiscoveredPrimary") && ev.iter().any(|e| e == "UnknownWritableServer"), "{ev:?}");
    // 3307 wrote nothing the new primary lacks: its history fits and it rejoins as a replica.
    let (ok, out) = failover_cli(&q, &["rejoin", "127.0.0.1:3307"]);
    assert!(ok, "{out}");
    let np = port_of(&new);
    wait_follows(3307, np).await;
    // A write on the replica in another GTID domain (9): an errant transaction the old
    // per-domain check (the replica's own server id in the last GTID of each domain the
    // primary has) would miss when the domain is new; found over every (domain, server id).
    lab(3307)
        .await
        .query_drop(format!("SET GLOBAL read_only = 0; SET SESSION gtid_domain_id = 9; INSERT INTO {SCHEMA}.w (id) VALUES (-9); SET GLOBAL read_only = 1"))
        .await
        .unwrap();
    wait_for("ErrantTransactions on 3307", Duration::from_secs(10), || async {
        view(&q).await["problems"].as_array().into_iter().flatten().any(|p| {
            p["kind"] == "ErrantTransactions" && p["addr"] == addr(3307).as_str() && p["evidence"].to_string().contains("9-7-1..1")
        })
    })
    .await;
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy killed -9 right after it saved recovery step `step` (the test hook
/// `BREAKWATER_FAILOVER_PAUSE_AT` holds it there), then started again from the same admin db
/// file: it takes the recovery up and completes it once. One promotion (one pre and one
/// post hook run, the candidate chosen before the kill is the primary, the other replica
/// follows it), no acknowledged write lost across the kill, the cooldown in force.
async fn killed_at_step(step: &str) {
    assert_initial_topology().await;
    setup_schema().await;
    enable_semisync(3307, &[3308, 3309]).await;
    let dir = fresh_dir(&format!("journal-{step}"));
    let d = dir.display().to_string();
    let db = dir.join("admin.db").display().to_string();
    let cfg = config(&d);
    let mut p = Proxy::start_env(Some(&cfg), &["--failover", "on", "--admin-db", db.as_str()], &[("BREAKWATER_FAILOVER_PAUSE_AT", step)]);
    wait_for("controller ready", Duration::from_secs(10), || async { view(&p).await["polls"].as_u64().unwrap_or(0) >= 2 }).await;
    let w = Writer::start(p.opts("app", "app", Some(SCHEMA)), 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill_node(3307);
    wait_for(&format!("the recovery pauses after step {step}"), Duration::from_secs(20), || async {
        let v = view(&p).await;
        v["recovery_in_progress"]["step"] == step && events(&v).iter().any(|e| e == "RecoveryPaused")
    })
    .await;
    let j = view(&p).await["recovery_in_progress"].clone();
    let cand = j["candidate"].as_str().unwrap().to_string();
    let other = ALL.iter().copied().find(|x| *x != 3307 && *x != port_of(&cand)).unwrap();
    let (_, m) = p.admin("GET", "/metrics").await;
    assert!(m.as_str().unwrap_or_default().contains(&format!("breakwater_failover_recovery_step{{cluster=\"lab\",step=\"{step}\"}} 1")), "{m}");
    println!("paused after {step}: recovery {} to {cand}; kill -9 of the proxy", j["id"]);
    p.kill9_and_restart(&[]);
    let restarted = Instant::now();
    wait_for("the restarted proxy completes the recovery", Duration::from_secs(30), || async {
        let v = view(&p).await;
        v["primary"] == cand.as_str() && v["writer_gate"] == "open" && v["recovery_in_progress"].is_null()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rep = w.finish().await;
    let v = view(&p).await;
    let n = |k: &str| count_events(&v, k);
    assert_eq!((n("RecoveryResumed"), n("RecoverDeadPrimary"), n("RecoveryFailed")), (1, 1, 0), "{:?}", events(&v));
    assert_eq!(v["counters"]["recoveries"]["automated/ok"], 1, "{:#}", v["counters"]);
    assert_eq!((hook_lines(&dir, "pre.log"), hook_lines(&dir, "post.log")), (1, 1), "one promotion: one pre and one post hook");
    assert_eq!(read_only(port_of(&cand)).await, Some(false), "the candidate is the writable primary");
    let cp = port_of(&cand);
    wait_follows(other, cp).await;
    assert_eq!(read_only(other).await, Some(true));
    assert!(rep.first_ack_after(restarted).is_some(), "writes through the restarted proxy");
    check_acked(cp, &rep, true).await;
    assert_eq!(v["cooldown"]["active"], true, "the cooldown survived the kill: {:#}", v["cooldown"]);
    println!("{step}: {} writes acknowledged, none lost; {} failed during the outage", rep.acked.len(), rep.errors.len());
    if step == "repointed" {
        // The old primary comes back writable: fenced. With a write of its own that the new
        // primary lacks (made here; in life, a commit in flight at the crash, or a write
        // after), its history does not fit, and rejoin refuses it, naming the transactions.
        start_node(3307).await;
        wait_for("3307 fenced", Duration::from_secs(10), || async { read_only(3307).await == Some(true) }).await;
        lab(3307).await.query_drop(format!("SET GLOBAL read_only = 0; INSERT INTO {SCHEMA}.w (id) VALUES (-7); SET GLOBAL read_only = 1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, out) = failover_cli(&p, &["rejoin", "127.0.0.1:3307"]);
        assert!(!ok && out.contains("refused") && out.contains("0-7-") && out.contains("transaction"), "{out}");
        println!("rejoin refused: {}", out.trim());
        assert!(events(&view(&p).await).iter().any(|e| e == "RejoinRefused"));
        assert_eq!(replication_of(3307).await, None, "3307 was not repointed");
    }
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_after_step_chosen() {
    killed_at_step("chosen").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_after_step_caught_up() {
    killed_at_step("caught_up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_after_step_promoted() {
    killed_at_step("promoted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_after_step_switched() {
    killed_at_step("switched").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_after_step_repointed() {
    killed_at_step("repointed").await;
}

/// Three proxies of one cluster with etcd (a real etcd-server on free ports), each with its
/// own admin db file and the same hooks; a lease of 2 s.
struct Trio {
    etcd: breakwater_testkit::Etcd,
    proxies: Vec<Proxy>,
    dir: std::path::PathBuf,
}

impl Trio {
    async fn start(name: &str, env: &[(&str, &str)]) -> Trio {
        let etcd = breakwater_testkit::Etcd::start();
        let dir = fresh_dir(&format!("trio-{name}"));
        let cfg = config(&dir.display().to_string());
        let proxies = (0..3)
            .map(|i| {
                let db = dir.join(format!("admin-{i}.db")).display().to_string();
                let me = format!("proxy-{i}");
                Proxy::start_env(Some(&cfg), &["--failover", "on", "--admin-db", &db, "--etcd", &etcd.url, "--cluster-name", &me, "--etcd-lease-ttl", "2"], env)
            })
            .collect();
        let t = Trio { etcd, proxies, dir };
        wait_for("one leader, known to all three", Duration::from_secs(15), || async { t.leader().await.is_some() }).await;
        t
    }

    /// The index of the one proxy that leads, when exactly one does and every live proxy
    /// names it.
    async fn leader(&self) -> Option<usize> {
        let mut leaders = Vec::new();
        let mut named = BTreeSet::new();
        for (i, p) in self.proxies.iter().enumerate().filter(|(_, p)| p.pid() != 0) {
            let v = view(p).await;
            if v["leader"] == true {
                leaders.push(i);
            }
            named.insert(v["leader_name"].as_str().unwrap_or("").to_string());
        }
        (leaders.len() == 1 && named.len() == 1 && named.contains(&format!("proxy-{}", leaders[0]))).then(|| leaders[0])
    }

    fn hook_lines(&self, f: &str) -> usize {
        hook_lines(&self.dir, f)
    }
}

impl Drop for Trio {
    fn drop(&mut self) {
        self.proxies.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = self.etcd.port;
    }
}

/// kill -9 of the primary under writer loops through all three proxies: one proxy leads and
/// promotes once (one pre and one post hook, one recovery counted among the three); the two
/// followers route writes to the new primary from the leader's decision in etcd; every
/// acknowledged write is on the new primary. A follower refuses commands, naming the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_one_promotion() {
    assert_initial_topology().await;
    setup_schema().await;
    enable_semisync(3307, &[3308, 3309]).await;
    let trio = Trio::start("one", &[]).await;
    let leader = trio.leader().await.unwrap();
    println!("leader: proxy-{leader}");
    for (i, p) in trio.proxies.iter().enumerate() {
        let (_, m) = p.admin("GET", "/metrics").await;
        let m = m.as_str().unwrap_or_default().to_string();
        assert!(m.contains(&format!("breakwater_failover_leader{{cluster=\"lab\"}} {}", (i == leader) as u8)), "proxy-{i}: {m}");
        assert!(m.contains("breakwater_failover_etcd_up{cluster=\"lab\"} 1") && m.contains("breakwater_failover_recovery_step{cluster=\"lab\",step=\"chosen\"} 0"), "proxy-{i}: {m}");
    }
    let follower = (leader + 1) % 3;
    let (code, body) = trio.proxies[follower].admin("POST", "/api/failover/ack").await;
    assert!(code >= 400 && body.to_string().contains("not the leader") && body.to_string().contains(&format!("proxy-{leader}")), "{code} {body}");
    let writers: Vec<Writer> = trio.proxies.iter().enumerate().map(|(i, p)| Writer::start(p.opts("app", "app", Some(SCHEMA)), i as i64 * 10_000_000)).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    kill_node(3307);
    wait_for("all three route writes to one new primary", Duration::from_secs(20), || async {
        let mut prim = BTreeSet::new();
        for p in &trio.proxies {
            let v = view(p).await;
            if v["writer_gate"] != "open" || v["primary"] == addr(3307).as_str() {
                return false;
            }
            prim.insert(v["primary"].as_str().unwrap_or("").to_string());
        }
        prim.len() == 1
    })
    .await;
    let new = current_primary(&trio.proxies[0]).await;
    println!("all three route writes to {new} after {:?}", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut recoveries = 0;
    for p in &trio.proxies {
        let v = view(p).await;
        recoveries += v["counters"]["recoveries"]["automated/ok"].as_u64().unwrap_or(0);
    }
    assert_eq!(recoveries, 1, "one promotion among the three");
    assert_eq!((trio.hook_lines("pre.log"), trio.hook_lines("post.log")), (1, 1), "one pre and one post hook");
    assert!(events(&view(&trio.proxies[follower]).await).iter().any(|e| e == "LeaderDecision"));
    // Reads too are routed as the leader placed them.
    let mut reader_sets = BTreeSet::new();
    for p in &trio.proxies {
        let v = view(p).await;
        let rs: BTreeSet<String> =
            v["servers"].as_array().into_iter().flatten().filter(|s| s["hostgroups"].as_array().is_some_and(|h| h.contains(&serde_json::json!(20)))).map(|s| s["addr"].to_string()).collect();
        reader_sets.insert(rs);
    }
    assert_eq!(reader_sets.len(), 1, "one reader hostgroup for the three: {reader_sets:?}");
    for (i, w) in writers.into_iter().enumerate() {
        let rep = w.finish().await;
        assert!(rep.first_ack_after(killed + Duration::from_millis(5)).is_some(), "proxy-{i}: no write acknowledged after the failover");
        let missing = check_acked(port_of(&new), &rep, true).await;
        println!("proxy-{i}: {} writes acknowledged, {missing} lost, {} failed during the outage", rep.acked.len(), rep.errors.len());
    }
}

/// The leader is killed -9 in the middle of a recovery (the test hook pauses it after
/// `promoted`): within the lease another proxy leads, takes the recovery up from etcd and
/// completes it once (the same candidate; one pre and one post hook); both survivors route
/// writes to it and no write acknowledged through any of the three is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_recovery() {
    assert_initial_topology().await;
    setup_schema().await;
    enable_semisync(3307, &[3308, 3309]).await;
    let mut trio = Trio::start("mid", &[("BREAKWATER_FAILOVER_PAUSE_AT", "promoted")]).await;
    let leader = trio.leader().await.unwrap();
    let writers: Vec<Writer> = trio.proxies.iter().enumerate().map(|(i, p)| Writer::start(p.opts("app", "app", Some(SCHEMA)), i as i64 * 10_000_000)).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill_node(3307);
    wait_for("the leader pauses after promoted", Duration::from_secs(20), || async {
        let v = view(&trio.proxies[leader]).await;
        v["recovery_in_progress"]["step"] == "promoted" && events(&v).iter().any(|e| e == "RecoveryPaused")
    })
    .await;
    let cand = view(&trio.proxies[leader]).await["recovery_in_progress"]["candidate"].as_str().unwrap().to_string();
    println!("proxy-{leader} paused after promoting {cand}: kill -9");
    trio.proxies[leader].kill9();
    let killed = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    wait_for("a new leader completes the recovery", Duration::from_secs(20), || async {
        for i in &survivors {
            let v = view(&trio.proxies[*i]).await;
            if v["primary"] != cand.as_str() || v["writer_gate"] != "open" || !v["recovery_in_progress"].is_null() {
                return false;
            }
        }
        true
    })
    .await;
    let took = killed.elapsed();
    let new_leader = trio.leader().await.expect("one leader among the survivors");
    println!("proxy-{new_leader} took over and completed the recovery {took:?} after the kill");
    let v = view(&trio.proxies[new_leader]).await;
    let n = |k: &str| count_events(&v, k);
    assert_eq!((n("LeaderElected"), n("RecoveryResumed"), n("RecoverDeadPrimary")), (1, 1, 1), "{:?}", events(&v));
    assert_eq!((trio.hook_lines("pre.log"), trio.hook_lines("post.log")), (1, 1), "the recovery completed once");
    for i in &survivors {
        let v = view(&trio.proxies[*i]).await;
        assert_eq!(v["cooldown"]["active"], true, "proxy-{i}: the cooldown came with the shared state: {:#}", v["cooldown"]);
        assert!(v["servers"].as_array().into_iter().flatten().any(|s| s["addr"] == addr(3307).as_str() && s["role"] == "fenced"), "proxy-{i}: 3307 fenced");
    }
    let other = ALL.iter().copied().find(|x| *x != 3307 && *x != port_of(&cand)).unwrap();
    let cp = port_of(&cand);
    wait_follows(other, cp).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, w) in writers.into_iter().enumerate() {
        let rep = w.finish().await;
        if i != leader {
            assert!(rep.first_ack_after(killed).is_some(), "proxy-{i}: no write acknowledged after the takeover");
        }
        let missing = check_acked(cp, &rep, true).await;
        println!("proxy-{i}: {} writes acknowledged, {missing} lost", rep.acked.len());
    }
}

/// A proxy cut off from etcd never promotes: once etcd is gone its lease cannot be renewed,
/// it stops leading (`leader: false`, etcd unreachable in `failover status`), and a primary
/// that dies then is left alone: no promotion, routing stays on the last known topology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_etcd_never_promotes() {
    assert_initial_topology().await;
    let etcd = breakwater_testkit::Etcd::start();
    let p = Proxy::start(&["--failover", "on", "--etcd", &etcd.url, "--cluster-name", "lonely", "--etcd-lease-ttl", "2"]);
    wait_for("leading", Duration::from_secs(10), || async { view(&p).await["leader"] == true }).await;
    let (ok, out) = failover_cli(&p, &["status"]);
    assert!(ok && out.contains("this proxy lonely  leader: true") && out.contains("etcd: reachable"), "{out}");
    drop(etcd);
    let lost = wait_for("leadership given up without etcd", Duration::from_secs(5), || async { view(&p).await["leader"] == false }).await;
    println!("leadership given up {lost:?} after etcd stopped (lease 2 s)");
    let (_, out) = failover_cli(&p, &["status"]);
    assert!(out.contains("leader: false") && out.contains("etcd: UNREACHABLE"), "{out}");
    kill_node(3307);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let v = view(&p).await;
    assert_eq!(v["primary"], addr(3307).as_str(), "{v:#}");
    assert!(!events(&v).iter().any(|e| e == "RecoverDeadPrimary" || e == "RecoveryFailed"), "{:?}", events(&v));
    for r in [3308, 3309] {
        assert_eq!(read_only(r).await, Some(true), "{r} was not promoted");
    }
    let (ok, out) = failover_cli(&p, &["failover"]);
    assert!(!ok && out.contains("not the leader"), "a command is refused too: {out}");
}

/// A proxy killed -9 in the middle of a switchover, right after `demoted`: the old primary
/// is read_only and nothing is promoted, so without the journal writes would stall for
/// good. The restarted proxy takes the switchover up and completes it: the candidate is the
/// primary, the old primary and the other replica replicate from it, no failover happened,
/// no acknowledged write was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_during_switchover() {
    assert_initial_topology().await;
    setup_schema().await;
    let dir = fresh_dir("journal-switchover");
    let db = dir.join("admin.db").display().to_string();
    let cfg = config(&dir.display().to_string());
    let mut p = Proxy::start_env(Some(&cfg), &["--failover", "on", "--admin-db", db.as_str()], &[("BREAKWATER_FAILOVER_PAUSE_AT", "demoted")]);
    wait_for("controller ready", Duration::from_secs(10), || async { view(&p).await["polls"].as_u64().unwrap_or(0) >= 2 }).await;
    let w = Writer::start(p.opts("app", "app", Some(SCHEMA)), 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The command waits for the controller, which the hook holds: in the background.
    let (admin, token) = (format!("127.0.0.1:{}", p.admin_port), p.token.clone());
    let cmd = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_breakwater-proxy")).args(["failover", "--admin", &admin, "switchover"]).env("BREAKWATER_ADMIN_TOKEN", token).output()
    });
    wait_for("the switchover pauses after demoted", Duration::from_secs(20), || async {
        let v = view(&p).await;
        v["recovery_in_progress"]["step"] == "demoted" && v["recovery_in_progress"]["kind"] == "switchover"
    })
    .await;
    let cand = view(&p).await["recovery_in_progress"]["candidate"].as_str().unwrap().to_string();
    assert_eq!(read_only(3307).await, Some(true), "demoted");
    println!("switchover to {cand} paused after demoted: kill -9 of the proxy");
    p.kill9_and_restart(&[]);
    let restarted = Instant::now();
    let _ = cmd.join();
    wait_for("the restarted proxy completes the switchover", Duration::from_secs(30), || async {
        let v = view(&p).await;
        v["primary"] == cand.as_str() && v["writer_gate"] == "open" && v["recovery_in_progress"].is_null()
    })
    .await;
    println!("switchover completed {:?} after the restart", restarted.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rep = w.finish().await;
    let v = view(&p).await;
    let n = |k: &str| count_events(&v, k);
    assert_eq!((n("RecoveryResumed"), n("Switchover"), n("RecoverDeadPrimary"), n("SwitchoverFailed")), (1, 1, 0, 0), "{:?}", events(&v));
    assert_eq!((hook_lines(&dir, "pre.log"), hook_lines(&dir, "post.log")), (1, 1));
    let cp = port_of(&cand);
    for r in ALL.into_iter().filter(|r| *r != cp) {
        wait_follows(r, cp).await;
    }
    assert_eq!(read_only(cp).await, Some(false));
    assert!(rep.first_ack_after(restarted).is_some(), "writes through the restarted proxy");
    check_acked(cp, &rep, true).await;
    println!("{} writes acknowledged, none lost, {} failed meanwhile", rep.acked.len(), rep.errors.len());
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// etcd as production runs it: TLS with client certificates, auth enabled, the proxies' user
/// allowed `/breakwater/` only. A proxy with the right password (BREAKWATER_ETCD_PASSWORD)
/// leads; one with a wrong password never does, says why, and the password shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_users() {
    use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
    assert_initial_topology().await;
    let etcd = breakwater_testkit::Etcd::start_tls();
    let read = |f: &str| std::fs::read(etcd.file(f)).unwrap();
    let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca.pem"))).identity(Identity::from_pem(read("client.pem"), read("client-key.pem")));
    let mut c = Client::connect([etcd.url.as_str()], Some(ConnectOptions::new().with_tls(tls))).await.expect("etcd over TLS");
    c.user_add("root", "root-pw", None).await.unwrap();
    let _ = c.role_add("root").await;
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("breakwater").await.unwrap();
    c.role_grant_permission("breakwater", Permission::read_write("/breakwater/").with_prefix()).await.unwrap();
    c.user_add("bw", "bw-secret-pw", None).await.unwrap();
    c.user_grant_role("bw", "breakwater").await.unwrap();
    c.auth_enable().await.unwrap();
    let cfg = breakwater_proxy::config::DEFAULT_TOML.replace(
        "[cluster]\n",
        &format!(
            "[cluster]\netcd_user = \"bw\"\netcd_ca_file = \"{}\"\netcd_cert_file = \"{}\"\netcd_key_file = \"{}\"\n",
            etcd.file("ca.pem"),
            etcd.file("client.pem"),
            etcd.file("client-key.pem")
        ),
    );
    let args = |name: &'static str| ["--failover", "on", "--etcd", etcd.url.as_str(), "--cluster-name", name, "--etcd-lease-ttl", "2"];
    let good = Proxy::start_env(Some(&cfg), &args("tls-good"), &[("BREAKWATER_ETCD_PASSWORD", "bw-secret-pw")]);
    wait_for("the proxy with the right password leads", Duration::from_secs(15), || async { view(&good).await["leader"] == true }).await;
    let bad = Proxy::start_env(Some(&cfg), &args("tls-bad"), &[("BREAKWATER_ETCD_PASSWORD", "not-it")]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let v = view(&bad).await;
    assert_eq!(v["leader"], false, "{:#}", v["cluster_status"]);
    let why = v["cluster_status"]["last_error"].as_str().unwrap_or("").to_lowercase();
    assert!(why.contains("authentication") || why.contains("auth"), "the wrong password is named: {why}");
    println!("wrong password: {why}");
    let g = view(&good).await;
    assert_eq!((g["leader"].clone(), g["leader_name"].clone()), (serde_json::json!(true), serde_json::json!("tls-good")));
    for p in [&good, &bad] {
        let (_, body) = p.admin("GET", "/api/failover").await;
        let (_, m) = p.admin("GET", "/metrics").await;
        assert!(!body.to_string().contains("bw-secret-pw") && !m.to_string().contains("bw-secret-pw"), "the etcd password is not shown");
    }
}
