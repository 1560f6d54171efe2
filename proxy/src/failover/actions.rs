//! The SQL a recovery runs on servers, and the promotion hooks. Every call is bounded by a
//! timeout; errors come back as text for the event log.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use std::time::Duration;

async fn bounded<T>(what: &str, limit: Duration, fut: impl std::future::Future<Output = Result<T, mysql_async::Error>>) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} ms", limit.as_millis())),
    }
}

pub async fn exec(c: &mut Conn, sql: &str, limit: Duration) -> Result<(), String> {
    bounded(sql, limit, c.query_drop(sql)).await
}

pub async fn gtid_binlog_pos(c: &mut Conn, limit: Duration) -> Result<String, String> {
    let v: Option<String> = bounded("SELECT @@gtid_binlog_pos", limit, c.query_first("SELECT @@gtid_binlog_pos")).await?;
    Ok(v.unwrap_or_default())
}

/// Wait until the server has applied `pos` (MASTER_GTID_WAIT); Err on timeout.
pub async fn wait_applied(c: &mut Conn, pos: &str, limit: Duration) -> Result<(), String> {
    if pos.trim().is_empty() {
        return Ok(());
    }
    let secs = limit.as_secs_f64();
    let sql = format!("SELECT MASTER_GTID_WAIT('{}', {secs:.3})", pos.replace('\'', ""));
    let r: Option<i64> = bounded(&sql, limit + Duration::from_secs(2), c.query_first(&sql)).await?;
    match r {
        Some(0) => Ok(()),
        Some(-1) => Err(format!("did not apply {pos} within {} ms", limit.as_millis())),
        other => Err(format!("MASTER_GTID_WAIT returned {other:?}")),
    }
}

/// Make a replica a primary: stop and forget replication, accept writes; with `semi_sync`
/// (its timeout) commits wait for a replica's acknowledgement (AFTER_SYNC) first.
pub async fn promote(c: &mut Conn, limit: Duration, semi_sync: Option<Duration>) -> Result<(), String> {
    exec(c, "STOP SLAVE", limit).await?;
    exec(c, "RESET SLAVE ALL", limit).await?;
    if let Some(t) = semi_sync {
        exec(c, "SET GLOBAL rpl_semi_sync_master_wait_point = 'AFTER_SYNC'", limit).await?;
        exec(c, &format!("SET GLOBAL rpl_semi_sync_master_timeout = {}", t.as_millis()), limit).await?;
        exec(c, "SET GLOBAL rpl_semi_sync_master_enabled = 1", limit).await?;
    }
    exec(c, "SET GLOBAL read_only = 0", limit).await
}

/// Point a server at a (new) primary with GTID auto-positioning. `use_gtid` is slave_pos
/// for replicas and current_pos for a former primary (its own binlog counts).
pub async fn repoint(
    c: &mut Conn,
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    use_gtid: &str,
    semi_sync: bool,
    limit: Duration,
) -> Result<(), String> {
    let q = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'");
    exec(c, "STOP SLAVE", limit).await?;
    exec(c, "SET GLOBAL read_only = 1", limit).await?;
    let sql = format!(
        "CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT={port}, MASTER_USER='{}', MASTER_PASSWORD='{}', \
         MASTER_USE_GTID={use_gtid}, MASTER_CONNECT_RETRY=1",
        q(host),
        q(user),
        q(password)
    );
    bounded("CHANGE MASTER TO", limit, c.query_drop(sql)).await?;
    if semi_sync {
        // The replica side, registered when the IO thread starts; a replica never waits as a master.
        exec(c, "SET GLOBAL rpl_semi_sync_slave_enabled = 1", limit).await?;
        exec(c, "SET GLOBAL rpl_semi_sync_master_enabled = 0", limit).await?;
    }
    exec(c, "START SLAVE", limit).await
}

pub struct HookEnv<'a> {
    pub cluster: &'a str,
    pub kind: &'a str,
    pub failed: &'a str,
    pub promoted: &'a str,
}

/// Run a hook with `sh -c`; Ok(output) on exit 0, Err(why) otherwise.
pub async fn run_hook(cmd: &str, env: &HookEnv<'_>, limit: Duration) -> Result<String, String> {
    let split = |a: &str| {
        let (h, p) = a.rsplit_once(':').unwrap_or((a, ""));
        (h.to_string(), p.to_string())
    };
    let (fh, fp) = split(env.failed);
    let (ph, pp) = split(env.promoted);
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("BREAKWATER_CLUSTER", env.cluster)
        .env("BREAKWATER_RECOVERY_KIND", env.kind)
        .env("BREAKWATER_FAILED_HOST", fh)
        .env("BREAKWATER_FAILED_PORT", fp)
        .env("BREAKWATER_PROMOTED_HOST", ph)
        .env("BREAKWATER_PROMOTED_PORT", pp)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, child).await {
        Err(_) => Err(format!("hook {cmd:?} did not finish within {} ms", limit.as_millis())),
        Ok(Err(e)) => Err(format!("hook {cmd:?} could not start: {e}")),
        Ok(Ok(out)) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let text = text.trim().chars().take(500).collect::<String>();
            if out.status.success() {
                Ok(text)
            } else {
                Err(format!("hook {cmd:?} exited with {}: {text}", out.status))
            }
        }
    }
}
