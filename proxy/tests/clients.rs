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
