//! The data path under multiplexing, tried with an independent client: mysql-connector-python
//! (pure Python; `cargo xtask deps` installs it from PyPI), plus raw-socket and mysql_async
//! checks of the same defects. Each scenario runs against the server directly first (which
//! proves the scenario's expectations are MySQL's own), then through a proxy with small pools
//! so that consecutive statements of one client do land on different backend connections.
//!
//! Shares the lab with the other tests: every test uses its own schemas (sbtest_cli_*) and
//! its own proxy process.

mod common;

use common::*;
use mysql_async::prelude::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Run one scenario of tests/py/clients.py; its JSON result.
fn python(scenario: &str, port: u16, schema: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/clients.py");
    let out = Command::new("python3")
        .arg(script)
        .args([scenario, &port.to_string(), schema])
        .output()
        .expect("python3 (cargo xtask deps installs mysql-connector-python)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{scenario} on {port} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{scenario}: bad JSON ({e}): {stdout}"))
}

/// Small pools: 2 connections per server, so 8 clients share them all the time.
fn small_pools() -> Proxy {
    Proxy::start(&["--max-connections", "2"])
}

/// The same prepared statement text in different schemas and sql_modes: a backend statement
/// prepared in one context is never executed for a client in another.
#[tokio::test]
async fn prepared_statements_keep_their_context() {
    let base = "sbtest_cli_ps";
    {
        let mut p = lab(PRIMARY).await;
        for (suffix, v) in [("a", "a"), ("b", "b")] {
            let db = format!("{base}_{suffix}");
            p.query_drop(format!(
                "DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db}; \
                 CREATE TABLE {db}.t (id INT PRIMARY KEY, v VARCHAR(10)); INSERT INTO {db}.t VALUES (1, '{v}')"
            ))
            .await
            .unwrap();
        }
        wait_replicas_caught_up().await;
    }
    let direct = python("ps_contexts", PRIMARY, base);
    assert_eq!(direct["wrong_count"], 0, "the scenario itself is wrong: {direct}");
    let proxy = small_pools();
    let r = python("ps_contexts", proxy.port, base);
    println!("through the proxy: {r}");
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["executions"], 240);
    assert_eq!(r["wrong_count"], 0, "executions that read another context's statement: {r}");
}

/// LAST_INSERT_ID() inside statements, ROW_COUNT(), FOUND_ROWS(), SHOW WARNINGS and
/// @@warning_count answer for this client's own previous statement, wherever it ran.
#[tokio::test]
async fn last_statement_functions_survive_multiplexing() {
    for (schema, port) in [("sbtest_cli_lid_direct", None), ("sbtest_cli_lid", Some(()))] {
        {
            let mut p = lab(PRIMARY).await;
            p.query_drop(format!(
                "DROP DATABASE IF EXISTS {schema}; CREATE DATABASE {schema}; \
                 CREATE TABLE {schema}.parent (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(10)); \
                 CREATE TABLE {schema}.child (id INT AUTO_INCREMENT PRIMARY KEY, parent_id INT, tag VARCHAR(10))"
            ))
            .await
            .unwrap();
            wait_replicas_caught_up().await;
        }
        let proxy = port.map(|_| small_pools());
        let r = python("last_statement_info", proxy.as_ref().map(|p| p.port).unwrap_or(PRIMARY), schema);
        println!("{}: {r}", if proxy.is_some() { "through the proxy" } else { "direct" });
        assert_eq!(r["errors"], serde_json::json!([]), "{r}");
        assert_eq!(r["children"], 280, "{r}");
        assert_eq!(r["matched"], 280, "child rows pointing at another client's parent: {r}");
        assert_eq!(r["problem_count"], 0, "{r}");
    }
}

/// A client without CLIENT_MULTI_STATEMENTS cannot run two statements in one query (the
/// standard defence against stacked-query injection); COM_SET_OPTION turns it on and off, as
/// on the server.
#[tokio::test]
async fn multi_statements_only_when_the_client_allows() {
    let proxy = Proxy::start(&[]);
    let r = python("multi_statements", proxy.port, "sbtest");
    println!("{r}");
    assert_eq!(r["direct"]["without_flag"], 1064, "the server refuses: {r}");
    assert_eq!(r["proxy"], r["direct"], "the proxy answers as the server does");
}

/// Peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A 23 MiB multi-row INSERT passes with memory of about its own size: its text is looked at
/// (lexed, digested, matched) on its first query_digests_max_query_length bytes only, and
/// forwarded without copies of its size.
#[tokio::test]
async fn huge_insert_costs_about_its_own_size() {
    let _heavy = HEAVY.lock().await;
    fresh_schema("sbtest_cli_big").await;
    let proxy = Proxy::start(&[]);
    let mut c = mysql_async::Conn::new(proxy.opts("app", "app", Some("sbtest_cli_big"))).await.unwrap();
    c.query_drop("CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, a INT, b VARCHAR(64))").await.unwrap();
    let mut sql = String::from("INSERT INTO t (a, b) VALUES ");
    let mut n = 0u64;
    while sql.len() < 23 << 20 {
        if n > 0 {
            sql.push(',');
        }
        sql.push_str(&format!("({n}, 'row {n} of a bulk insert through the proxy')"));
        n += 1;
    }
    let before = peak_rss(proxy.pid());
    let t = Instant::now();
    c.query_drop(&sql).await.unwrap();
    let took = t.elapsed();
    let after = peak_rss(proxy.pid());
    // On the writer: the replicas may still be applying it.
    let count: Option<u64> = c.query_first("SELECT COUNT(*) FROM t FOR UPDATE").await.unwrap();
    let grew = after.saturating_sub(before);
    println!("{} MiB INSERT ({n} rows) in {took:?}; proxy peak RSS {} -> {} MiB (+{} MiB)", sql.len() >> 20, before >> 20, after >> 20, grew >> 20);
    assert_eq!(count, Some(n));
    assert!(grew < (sql.len() as u64) * 5 / 2, "peak RSS grew {} MiB for a {} MiB statement", grew >> 20, sql.len() >> 20);
    let d = proxy.admin("GET", "/api/digests").await.1;
    let digest = d.to_string();
    assert!(digest.contains("INSERT INTO t"), "the statement is digested on its first bytes: {digest:.400}");
    assert!(took < Duration::from_secs(60));
}

/// default_query_timeout: a statement running longer is killed on its backend and the
/// client gets error 1969 naming the limit; the session goes on.
#[tokio::test]
async fn default_query_timeout_kills_on_the_backend() {
    let proxy = Proxy::start(&["--default-query-timeout-ms", "1000"]);
    let mut c = proxy.conn().await;
    let t = Instant::now();
    let err = c.query_drop("SELECT SLEEP(20) /* bw-timeout */").await.unwrap_err();
    let took = t.elapsed();
    println!("timed out after {took:?}: {err}");
    assert_eq!(server_code(&err), Some(1969), "{err}");
    assert!(err.to_string().contains("default_query_timeout_ms (1000 ms)"), "{err}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{took:?}");
    let v: Option<i64> = c.query_first("SELECT 1").await.unwrap();
    assert_eq!(v, Some(1), "the session goes on");
    for port in [PRIMARY, REPLICAS[0], REPLICAS[1]] {
        let mut l = lab(port).await;
        let n: Option<i64> = l
            .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(20) /* bw-timeout */%'")
            .await
            .unwrap();
        assert_eq!(n, Some(0), "the statement is no longer running on {port}");
    }
    // Statements under the limit are untouched.
    let v: Option<i64> = c.query_first("SELECT SLEEP(0.3) + 5").await.unwrap();
    assert_eq!(v, Some(5));
    // The limit in force and its counter, on the SQL admin.
    let var = proxy.admin_sql("SELECT variable_value FROM runtime_global_variables WHERE variable_name = 'mysql-default_query_timeout'").unwrap();
    assert_eq!(var.trim(), "1000");
    let n = proxy.admin_sql("SELECT Variable_Value FROM stats_mysql_global WHERE Variable_Name = 'Query_timeouts'").unwrap();
    assert_eq!(n.trim(), "1");
}

/// A transaction idle past max_transaction_idle_time_ms, or open past
/// max_transaction_time_ms, is rolled back (its locks released) and its client disconnected
/// with an error that names the limit.
#[tokio::test]
async fn transactions_past_their_limits_are_ended() {
    fresh_schema("sbtest_cli_txn").await;
    {
        let mut p = lab(PRIMARY).await;
        p.query_drop("CREATE TABLE sbtest_cli_txn.t (id INT PRIMARY KEY, v INT); INSERT INTO sbtest_cli_txn.t VALUES (1, 0), (2, 0)")
            .await
            .unwrap();
    }
    let proxy = Proxy::start(&["--max-transaction-idle-time-ms", "800", "--max-transaction-time-ms", "2500"]);
    let opts = proxy.opts("app", "app", Some("sbtest_cli_txn"));
    // Idle in a transaction holding a row lock.
    let mut idle = mysql_async::Conn::new(opts.clone()).await.unwrap();
    idle.query_drop("BEGIN").await.unwrap();
    idle.query_drop("UPDATE t SET v = 1 WHERE id = 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = idle.query_drop("COMMIT").await.unwrap_err();
    println!("idle transaction: {err}");
    assert!(err.to_string().contains("max_transaction_idle_time_ms") || !matches!(err, mysql_async::Error::Server(_)), "{err}");
    let mut other = mysql_async::Conn::new(opts.clone()).await.unwrap();
    other.query_drop("SET innodb_lock_wait_timeout = 1").await.unwrap();
    other.query_drop("UPDATE t SET v = 2 WHERE id = 1").await.expect("the idle transaction's lock is gone");
    let v: Option<i64> = other.query_first("SELECT v FROM t WHERE id = 1 FOR UPDATE").await.unwrap();
    assert_eq!(v, Some(2), "the idle transaction was rolled back");
    // Busy, but open too long.
    let mut busy = mysql_async::Conn::new(opts.clone()).await.unwrap();
    busy.query_drop("BEGIN").await.unwrap();
    busy.query_drop("UPDATE t SET v = 3 WHERE id = 2").await.unwrap();
    let t = Instant::now();
    let mut ended = None;
    while t.elapsed() < Duration::from_secs(6) {
        if let Err(e) = busy.query_drop("SELECT v FROM t WHERE id = 2").await {
            ended = Some((t.elapsed(), e.to_string()));
            break;
        }
    }
    let (at, e) = ended.expect("the long transaction was ended");
    println!("long transaction ended after {at:?}: {e}");
    // Answered with the error when a statement is sent after the limit; sent unsolicited
    // (as a server's wait_timeout error is) when it passes while the client waits.
    assert!(e.contains("max_transaction_time_ms (2500 ms)") || e.contains("out of sync"), "{e}");
    assert!(at >= Duration::from_millis(2000) && at < Duration::from_secs(4), "{at:?}");
    let v: Option<i64> = other.query_first("SELECT v FROM t WHERE id = 2 FOR UPDATE").await.unwrap();
    assert_eq!(v, Some(0), "the long transaction was rolled back");
    let m = proxy.admin("GET", "/metrics").await.1.as_str().unwrap_or_default().to_string();
    assert!(m.contains("breakwater_proxy_transaction_timeouts_total{db_system_name=\"mysql\"} 2"), "{}", m.lines().filter(|l| l.contains("timeout")).collect::<Vec<_>>().join("\n"));
}

/// A client that stops reading its results is cut off after client_write_timeout_ms; the
/// backend statement that was streaming to it ends too (its connection is closed).
#[tokio::test]
async fn client_that_stops_reading_is_cut_off() {
    use std::io::Read;
    let proxy = Proxy::start(&["--client-write-timeout-ms", "1000"]);
    let mut s = raw_login(proxy.port, "sbtest");
    // About 200 MB of result, never read.
    raw_send(&mut s, 0, b"\x03SELECT REPEAT('x', 1000000) /* bw-unread */ FROM sbtest1 LIMIT 200");
    let t = Instant::now();
    let running = |ports: [u16; 2]| async move {
        let mut n = 0;
        for port in ports {
            let mut l = lab(port).await;
            let c: Option<i64> = l
                .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT REPEAT(%bw-unread%'")
                .await
                .unwrap();
            n += c.unwrap_or(0);
        }
        n
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(running(REPLICAS).await, 1, "the statement streams to the proxy");
    let mut gone = None;
    while t.elapsed() < Duration::from_secs(10) {
        if running(REPLICAS).await == 0 {
            gone = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("backend statement ended {gone:?} after the client stopped reading");
    let gone = gone.expect("the backend statement ended");
    assert!(gone < Duration::from_secs(5), "{gone:?}");
    // The client's socket is closed by the proxy: reading drains what was buffered, then EOF.
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("the proxy did not close the connection: {e} after {total} bytes"),
        }
    }
    assert!(total < 150 << 20, "the result was cut off ({total} bytes reached the client)");
}

/// A procedure that changes session state, and a multi-statement that fails after a SET:
/// the client stays on the connection that has the state; nobody else gets it.
#[tokio::test]
async fn state_the_proxy_cannot_follow_stays_with_its_client() {
    for (schema, through_proxy) in [("sbtest_cli_state_direct", false), ("sbtest_cli_state", true)] {
        {
            let mut p = lab(PRIMARY).await;
            p.query_drop(format!(
                "DROP DATABASE IF EXISTS {schema}; CREATE DATABASE {schema}; \
                 CREATE PROCEDURE {schema}.set_tz() SET SESSION time_zone = '+05:00'"
            ))
            .await
            .unwrap();
            wait_replicas_caught_up().await;
        }
        let proxy = through_proxy.then(|| Proxy::start(&["--max-connections", "2"]));
        let r = python("session_state", proxy.as_ref().map(|p| p.port).unwrap_or(PRIMARY), schema);
        println!("{}: {r}", if through_proxy { "through the proxy" } else { "direct" });
        assert_eq!(r["multi_error"], 1146, "{r}");
        assert_eq!(r["problems"], serde_json::json!([]), "{r}");
    }
}

/// Query cache keys hold every session variable that changes a result.
#[tokio::test]
async fn cache_keys_hold_the_session_variables() {
    fresh_schema("sbtest_cli_cachekey").await;
    {
        let mut p = lab(PRIMARY).await;
        p.query_drop("CREATE TABLE sbtest_cli_cachekey.c (v INT); INSERT INTO sbtest_cli_cachekey.c VALUES (1), (2), (3)").await.unwrap();
        wait_replicas_caught_up().await;
    }
    let cfg = default_config_with(
        "[[query_rules]]\nrule_id = 10\nmatch_digest = '^SELECT v FROM c'\ndestination_hostgroup = 20\ncache_ttl = 60000\napply = true\n",
    );
    let proxy = Proxy::start_with(Some(&cfg), &[]);
    let opts = proxy.opts("app", "app", Some("sbtest_cli_cachekey"));
    let mut plain = mysql_async::Conn::new(opts.clone()).await.unwrap();
    let mut limited = mysql_async::Conn::new(opts.clone()).await.unwrap();
    limited.query_drop("SET sql_select_limit = 1").await.unwrap();
    let mut concat = mysql_async::Conn::new(opts).await.unwrap();
    concat.query_drop("SET group_concat_max_len = 4").await.unwrap();
    for round in 0..2 {
        let a: Vec<i64> = plain.query("SELECT v FROM c ORDER BY v").await.unwrap();
        let b: Vec<i64> = limited.query("SELECT v FROM c ORDER BY v").await.unwrap();
        assert_eq!(a, vec![1, 2, 3], "round {round}");
        assert_eq!(b, vec![1], "round {round}: sql_select_limit is part of the key");
        let x: Option<String> = plain.query_first("SELECT v FROM c WHERE 0 UNION SELECT GROUP_CONCAT(v) FROM c").await.unwrap();
        let y: Option<String> = concat.query_first("SELECT v FROM c WHERE 0 UNION SELECT GROUP_CONCAT(v) FROM c").await.unwrap();
        assert_eq!(x.as_deref(), Some("1,2,3"));
        assert_eq!(y.as_deref(), Some("1,2,"), "group_concat_max_len is part of the key");
    }
    let st = proxy.admin("GET", "/api/cache").await.1;
    assert!(st["hits"].as_u64().unwrap_or(0) >= 4, "the second round was served from the cache: {st}");
}

/// A server that answers every connection as a MySQL server at its connection limit does:
/// an ERR 1040 packet instead of the greeting. Returns its port.
fn server_at_its_limit() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            use std::io::Write;
            let mut p = vec![0xffu8, 0x10, 0x04]; // 1040
            p.extend_from_slice(b"Too many connections");
            let mut pkt = (p.len() as u32).to_le_bytes()[..3].to_vec();
            pkt.push(0);
            pkt.extend_from_slice(&p);
            let _ = s.write_all(&pkt);
        }
    });
    port
}

/// A write whose rule's hostgroup has nothing ONLINE gets a clear error and is not sent to
/// another hostgroup (reads still fall back to the writer); the error of a command sent in
/// several packets (16 MiB or more) carries the next sequence id; a backend's 1040 reaches
/// the client as 1040.
#[tokio::test]
async fn clear_errors_instead_of_detours() {
    fresh_schema("sbtest_cli_detour").await;
    {
        let mut p = lab(PRIMARY).await;
        p.query_drop("CREATE TABLE sbtest_cli_detour.t (id INT AUTO_INCREMENT PRIMARY KEY, v LONGTEXT)").await.unwrap();
        wait_replicas_caught_up().await;
    }
    let full = server_at_its_limit();
    let cfg = default_config_with(&format!(
        "[[servers]]\nhostgroup = 30\nhost = \"127.0.0.1\"\nport = 1\n\n\
         [[servers]]\nhostgroup = 40\nhost = \"127.0.0.1\"\nport = {full}\n\n\
         [[query_rules]]\nrule_id = 10\nmatch_pattern = '^INSERT INTO t '\ndestination_hostgroup = 30\napply = true\n\n\
         [[query_rules]]\nrule_id = 11\nmatch_pattern = '^SELECT /\\* archive \\*/'\ndestination_hostgroup = 30\napply = true\n\n\
         [[query_rules]]\nrule_id = 12\nmatch_pattern = '^SELECT /\\* full \\*/'\ndestination_hostgroup = 40\napply = true\n"
    ));
    // The fake server never passes a health check: keep it ONLINE so the data path meets it.
    let proxy = Proxy::start_with(Some(&cfg), &["--shun-after-failures", "1000000"]);
    let mut c = mysql_async::Conn::new(proxy.opts("app", "app", Some("sbtest_cli_detour"))).await.unwrap();
    // Hostgroup 30's only server is down (nothing listens on port 1).
    for _ in 0..2 {
        let err = c.query_drop("INSERT INTO t (v) VALUES ('x')").await.unwrap_err();
        println!("write: {err}");
        assert!(err.to_string().contains("hostgroup 30"), "{err}");
    }
    let n: Option<i64> = lab(PRIMARY).await.query_first("SELECT COUNT(*) FROM sbtest_cli_detour.t").await.unwrap();
    assert_eq!(n, Some(0), "the write was not sent to the writer hostgroup");
    let v: Option<i64> = c.query_first("SELECT /* archive */ 7").await.unwrap();
    assert_eq!(v, Some(7), "a read still falls back to the user's default hostgroup");
    let err = c.query_drop("SELECT /* full */ 1").await.unwrap_err();
    println!("full: {err}");
    assert_eq!(server_code(&err), Some(1040), "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{full}")), "{err}");

    // A 17 MiB INSERT comes in two packets (sequence 0 and 1): the error is sequence 2.
    let mut s = raw_login(proxy.port, "sbtest_cli_detour");
    let mut q = b"\x03INSERT INTO t (v) VALUES ('".to_vec();
    q.resize(q.len() + (17 << 20), b'a');
    q.extend_from_slice(b"')");
    raw_send(&mut s, 0, &q);
    let (seq, e) = raw_read(&mut s);
    assert_eq!(e[0], 0xff, "an error");
    assert_eq!(seq, 2, "the reply follows the command's last packet (sequence 1)");
}

/// A read opened as a cursor pins its client: it is opened on the writer, so the writes
/// that follow in the session never go to a reader.
#[tokio::test]
async fn cursor_reads_open_on_the_writer() {
    let proxy = Proxy::start(&[]);
    let mut s = raw_login(proxy.port, "sbtest");
    raw_send(&mut s, 0, b"\x16SELECT @@port");
    let (_, ok) = raw_read(&mut s);
    assert_eq!(ok[0], 0, "PREPARE_OK");
    let id = [ok[1], ok[2], ok[3], ok[4]];
    // column definition and EOF of the prepare
    while raw_read(&mut s).1[0] != 0xfe {}
    let mut exec = vec![0x17];
    exec.extend_from_slice(&id);
    exec.push(1); // CURSOR_TYPE_READ_ONLY
    exec.extend_from_slice(&1u32.to_le_bytes());
    raw_send(&mut s, 0, &exec);
    let (_, n) = raw_read(&mut s);
    assert_eq!(n, vec![1], "one column");
    raw_read(&mut s);
    let (_, eof) = raw_read(&mut s);
    let status = u16::from_le_bytes([eof[3], eof[4]]);
    assert!(eof[0] == 0xfe && status & 0x40 != 0, "a cursor was opened: {eof:?}");
    let mut fetch = vec![0x1c];
    fetch.extend_from_slice(&id);
    fetch.extend_from_slice(&10u32.to_le_bytes());
    raw_send(&mut s, 0, &fetch);
    let (_, row) = raw_read(&mut s);
    assert_eq!(row[0], 0, "a binary row");
    let port = u16::from_le_bytes([row[2], row[3]]);
    assert_eq!(port, PRIMARY, "the cursor is on the writer");
}

/// A server in two hostgroups is capped once: its max_connections holds across both.
/// Weight and cap change at runtime without aborting an open transaction, and OFFLINE_SOFT
/// drains a server: its open transaction finishes, new statements go elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_per_server_and_runtime_changes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    fresh_user("bw_cli_cap", "bw_cli_cap").await;
    fresh_schema("sbtest_cli_cap").await;
    {
        let mut p = lab(PRIMARY).await;
        p.query_drop("CREATE TABLE sbtest_cli_cap.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)").await.unwrap();
        wait_replicas_caught_up().await;
    }
    let cfg = default_config_with(
        "[[servers]]\nhostgroup = 30\nhost = \"127.0.0.1\"\nport = 3308\nmax_connections = 3\n\n\
         [[query_rules]]\nrule_id = 10\nmatch_pattern = '^SELECT /\\* hg30 \\*/'\ndestination_hostgroup = 30\napply = true\n\n\
         [[users]]\nusername = \"bw_cli_cap\"\npassword = \"bw_cli_cap\"\nbackend_password = \"bw_cli_cap\"\ndefault_hostgroup = 10\n",
    );
    let proxy = Proxy::start_with(Some(&cfg), &["--max-connections", "3"]);
    // 3308 is in hostgroups 20 and 30, cap 3 in each: at most 3 connections to it in all.
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, max_seen) = (stop.clone(), max_seen.clone());
        tokio::spawn(async move {
            let mut l = lab(3308).await;
            while !stop.load(Ordering::Relaxed) {
                let n: Option<u64> = l.query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'bw_cli_cap'").await.unwrap();
                max_seen.fetch_max(n.unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..12 {
        let opts = proxy.opts("bw_cli_cap", "bw_cli_cap", Some("sbtest_cli_cap"));
        tasks.push(tokio::spawn(async move {
            let mut c = mysql_async::Conn::new(opts).await.unwrap();
            for j in 0..6 {
                let q = if (i + j) % 2 == 0 { "SELECT /* hg30 */ SLEEP(0.05), @@port" } else { "SELECT SLEEP(0.05), @@port" };
                c.query_drop(q).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let seen = max_seen.load(Ordering::Relaxed);
    println!("most connections to 3308 at once: {seen}");
    assert!(seen > 0 && seen <= 3, "3308 had {seen} connections; its cap is 3 across hostgroups 20 and 30");

    // A transaction open on the writer survives a weight and cap change of its server.
    let mut txn = mysql_async::Conn::new(proxy.opts("app", "app", Some("sbtest_cli_cap"))).await.unwrap();
    txn.query_drop("BEGIN").await.unwrap();
    txn.query_drop("INSERT INTO t (v) VALUES (1)").await.unwrap();
    proxy
        .admin_sql("UPDATE mysql_servers SET weight = 5, max_connections = 7 WHERE port = 3307; LOAD MYSQL SERVERS TO RUNTIME")
        .unwrap();
    txn.query_drop("INSERT INTO t (v) VALUES (2)").await.expect("the open transaction goes on");
    txn.query_drop("COMMIT").await.unwrap();
    let rt = proxy.admin_sql("SELECT weight, max_connections, status FROM runtime_mysql_servers WHERE port = 3307").unwrap();
    assert_eq!(rt.split_whitespace().collect::<Vec<_>>(), ["5", "7", "ONLINE"], "{rt}");

    // OFFLINE_SOFT drains: the open transaction on 3307 finishes; new writes get a clear error.
    txn.query_drop("BEGIN").await.unwrap();
    txn.query_drop("INSERT INTO t (v) VALUES (3)").await.unwrap();
    proxy.admin_sql("UPDATE mysql_servers SET status = 'OFFLINE_SOFT' WHERE port = 3307; LOAD MYSQL SERVERS TO RUNTIME").unwrap();
    let mut other = mysql_async::Conn::new(proxy.opts("app", "app", Some("sbtest_cli_cap"))).await.unwrap();
    let err = other.query_drop("INSERT INTO t (v) VALUES (99)").await.unwrap_err();
    println!("write while draining: {err}");
    assert!(err.to_string().contains("hostgroup 10"), "{err}");
    txn.query_drop("INSERT INTO t (v) VALUES (4)").await.expect("the draining server finishes its transaction");
    txn.query_drop("COMMIT").await.unwrap();
    // Readers: 3309 OFFLINE_SOFT takes no new reads.
    proxy.admin_sql("UPDATE mysql_servers SET status = 'OFFLINE_SOFT' WHERE port = 3309; LOAD MYSQL SERVERS TO RUNTIME").unwrap();
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let p: Option<u16> = other.query_first("SELECT @@port").await.unwrap();
        ports.extend(p);
    }
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![3308]);
    proxy.admin_sql("UPDATE mysql_servers SET status = 'ONLINE'; LOAD MYSQL SERVERS TO RUNTIME").unwrap();
    other.query_drop("INSERT INTO t (v) VALUES (5)").await.unwrap();
    let vs: Vec<i64> = other.query("SELECT v FROM t ORDER BY v FOR UPDATE").await.unwrap();
    assert_eq!(vs, vec![1, 2, 3, 4, 5], "every acknowledged write is there, the refused one is not");
}

/// Long data sent for a statement that is then closed unexecuted never reaches another
/// client: the connection holding it is not handed on.
#[tokio::test]
async fn unexecuted_long_data_stays_with_its_client() {
    fresh_schema("sbtest_cli_longdata").await;
    {
        let mut p = lab(PRIMARY).await;
        p.query_drop("CREATE TABLE sbtest_cli_longdata.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(20))").await.unwrap();
    }
    let proxy = Proxy::start(&["--max-connections", "2"]);
    // A prepares on writer connection C and sends long data for its parameter.
    let mut a = raw_login(proxy.port, "sbtest_cli_longdata");
    raw_send(&mut a, 0, b"\x16INSERT INTO t (v) VALUES (?)");
    let (_, ok) = raw_read(&mut a);
    assert_eq!(ok[0], 0, "PREPARE_OK: {}", String::from_utf8_lossy(&ok));
    while raw_read(&mut a).1[0] != 0xfe {}
    let id = [ok[1], ok[2], ok[3], ok[4]];
    let mut long = vec![0x18];
    long.extend_from_slice(&id);
    long.extend_from_slice(&0u16.to_le_bytes());
    long.extend_from_slice(b"LEAKED");
    raw_send(&mut a, 0, &long);
    // B prepares the same text meanwhile (on another connection: C is A's).
    let mut b = mysql_async::Conn::new(proxy.opts("app", "app", Some("sbtest_cli_longdata"))).await.unwrap();
    let stmt = b.prep("INSERT INTO t (v) VALUES (?)").await.unwrap();
    // A closes the statement without executing it, and leaves.
    let mut close = vec![0x19];
    close.extend_from_slice(&id);
    raw_send(&mut a, 0, &close);
    raw_send(&mut a, 0, &[0x01]);
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..4 {
        b.exec_drop(&stmt, ("mine",)).await.unwrap();
    }
    let vs: Vec<String> = b.query("SELECT v FROM t FOR UPDATE").await.unwrap();
    assert_eq!(vs, vec!["mine"; 4], "another client's long data leaked into these rows");
}

/// COM_CHANGE_USER from mysql-connector-python: the session is the new user's (backend
/// account, no leftover state), in place, directly and through the proxy.
#[tokio::test]
async fn change_user_from_an_independent_client() {
    fresh_user("bw_cu_py", "cu").await;
    let schema = "sbtest_cli_cu";
    {
        let mut p = lab(PRIMARY).await;
        p.query_drop(format!("DROP DATABASE IF EXISTS {schema}; CREATE DATABASE {schema}")).await.unwrap();
        wait_replicas_caught_up().await;
    }
    let direct = python("change_user", PRIMARY, schema);
    assert_eq!(direct["problems"], serde_json::json!([]), "the scenario itself is wrong: {direct}");
    let cfg = default_config_with("[[users]]\nusername = \"bw_cu_py\"\npassword = \"cu\"\nbackend_password = \"cu\"\ndefault_hostgroup = 10\n");
    let proxy = Proxy::start_with(Some(&cfg), &["--max-connections", "2"]);
    let r = python("change_user", proxy.port, schema);
    assert_eq!(r["problems"], serde_json::json!([]), "{r}");
}
