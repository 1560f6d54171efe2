//! The client side of `breakwater-proxy failover status|switchover|failover|ack|rejoin`:
//! one HTTP request to the admin interface of a running proxy.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Returns (status code, body). `token`: the admin API's bearer token.
pub async fn call(admin: &str, method: &str, path: &str, token: Option<&str>, timeout: Duration) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.map_err(|e| format!("cannot reach the admin interface at {admin}: {e}"))?;
        let auth = token.filter(|t| !t.is_empty()).map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP response")?;
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("malformed HTTP status line")?;
        Ok::<_, String>((code, body.to_string()))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| format!("no answer from {admin} within {} s", timeout.as_secs()))?
}

/// The token the CLI sends: BREAKWATER_ADMIN_TOKEN, else `[admin] token` of the config,
/// else the token file a running proxy wrote (`[admin] token_file` and its defaults).
pub fn cli_token(cfg: Option<&crate::config::AdminConfig>) -> Option<String> {
    if let Some(t) = std::env::var("BREAKWATER_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()) {
        return Some(t);
    }
    let cfg = cfg?;
    if !cfg.token.is_empty() {
        return Some(cfg.token.clone());
    }
    std::fs::read_to_string(cfg.token_path()).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// A terminal view of GET /api/failover.
pub fn format_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let mut o = String::new();
    let _ = writeln!(o, "cluster {}  primary {}  writes {}", s(&v["cluster"]), s(&v["primary"]), s(&v["writer_gate"]));
    let cs = &v["cluster_status"];
    if cs["mode"] == "etcd" {
        let leader = if v["leader"].as_bool() == Some(true) { "true (this proxy runs detection and recovery)".to_string() } else { "false".to_string() };
        let who = match (cs["leader_name"].as_str(), cs["leader_admin"].as_str()) {
            (Some(n), Some(a)) => format!("{n} (admin {a})"),
            _ => "none elected".into(),
        };
        let etcd = if cs["etcd_reachable"].as_bool() == Some(true) { "reachable".to_string() } else { format!("UNREACHABLE: {}", s(&cs["last_error"])) };
        let _ = writeln!(o, "this proxy {}  leader: {leader}  the leader: {who}  etcd: {etcd}", s(&cs["me"]));
    } else {
        let _ = writeln!(o, "leader: true (single proxy, no etcd)");
    }
    if let Some(j) = v["recovery_in_progress"].as_object() {
        let _ = writeln!(o, "recovery in progress: {} of {} to {}, after step {}", s(&j["id"]), s(&j["failed"]), s(&j["candidate"]), s(&j["step"]));
    }
    let cd = &v["cooldown"];
    if cd["active"].as_bool() == Some(true) {
        let _ = writeln!(o, "cooldown: ACTIVE, {} s left (automated recoveries blocked; `failover ack` ends it)", cd["remaining_seconds"]);
    } else {
        let _ = writeln!(o, "cooldown: none");
    }
    let _ = writeln!(o, "{:<22} {:<9} {:<6} {:<10} {:<8} {:<10} {:<6} {:<24} proxy", "server", "role", "up", "read_only", "io/sql", "lag", "rule", "gtid_current_pos");
    for sv in v["servers"].as_array().into_iter().flatten() {
        let repl = &sv["replication"];
        let iosql = if repl.is_null() { "-".to_string() } else { format!("{}/{}", s(&repl["io_running"]), s(&repl["sql_running"])) };
        let lag = if repl.is_null() { "-".into() } else { repl["seconds_behind_master"].to_string() };
        let _ = writeln!(
            o,
            "{:<22} {:<9} {:<6} {:<10} {:<8} {:<10} {:<6} {:<24} {}",
            s(&sv["addr"]),
            s(&sv["role"]),
            sv["reachable"].to_string(),
            sv["read_only"].to_string(),
            iosql,
            lag,
            s(&sv["promotion_rule"]),
            s(&sv["gtid_current_pos"]),
            s(&sv["proxy_status"])
        );
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "problem: {} {}: {}", s(&p["kind"]), s(&p["addr"]), p["evidence"]);
    }
    if let Some(r) = v["last_recovery"].as_object() {
        let _ = writeln!(
            o,
            "last recovery: {} {} -> {} in {} ms (writes paused {} ms), acknowledged {}",
            r["kind"].as_str().unwrap_or(""),
            r["failed"].as_str().unwrap_or(""),
            r["promoted"].as_str().unwrap_or(""),
            r["duration_ms"],
            r["write_pause_ms"],
            r["acknowledged"]
        );
    }
    let events = v["events"].as_array().cloned().unwrap_or_default();
    for e in events.iter().rev().take(10).rev() {
        let _ = writeln!(o, "{} {:<22} {:<22} {}", s(&e["at"]), s(&e["kind"]), s(&e["addr"]), s(&e["action"]));
    }
    o
}
