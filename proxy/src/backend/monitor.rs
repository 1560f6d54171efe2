//! Health checks: every interval, each server is connected to (mysql_async, short timeouts),
//! asked for @@read_only and SHOW REPLICA STATUS (MariaDB 10.5+ and MySQL 8.0.22+; column
//! names of both). After `shun_after_failures` consecutive bad verdicts (unreachable, lag
//! past max_replication_lag, replication broken) a server is SHUNNED; it comes back ONLINE as
//! soon as a check passes. One task per server, so a hung server never stalls the others.

use super::server::{Server, Status};
use crate::config::MonitorConfig;
use crate::runtime::Runtime;
use mysql_async::prelude::Queryable;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Check {
    pub read_only: bool,
    /// Seconds_Behind_Master: None when not a replica or when the SQL thread reports NULL.
    pub lag: Option<i64>,
    pub is_replica: bool,
    /// Why replication is broken (SQL thread stopped, IO thread stopped), if it is.
    pub broken: Option<String>,
}

/// Start one monitor task per distinct address. A server may sit in several hostgroups (and
/// the failover controller adds entries), so each check applies to every entry of that
/// address known at that moment.
pub fn spawn(rt: Arc<Runtime>, cfg: MonitorConfig, shutdown: watch::Receiver<bool>) {
    // A supervisor starts one checker per address, also for servers added at runtime.
    tokio::spawn(async move {
        let mut started: std::collections::BTreeSet<String> = Default::default();
        let mut stop = shutdown.clone();
        loop {
            for s in rt.servers() {
                if started.insert(s.addr.to_string()) {
                    tokio::spawn(check_loop(rt.clone(), s, cfg.clone(), shutdown.clone()));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(cfg.interval_ms.max(50))) => {}
                _ = stop.changed() => break,
            }
        }
    });
}

async fn check_loop(rt: Arc<Runtime>, first: Arc<Server>, cfg: MonitorConfig, mut shutdown: watch::Receiver<bool>) {
    let addr = first.addr.clone();
    let mut conn: Option<mysql_async::Conn> = None;
    let interval = Duration::from_millis(cfg.interval_ms.max(50));
    let mut failures = 0u32;
    loop {
        let res = check(&first, &cfg, &rt.backend_tls, &mut conn).await;
        let entries: Vec<Arc<Server>> = rt.servers().into_iter().filter(|s| s.addr == addr).collect();
        apply(&entries, res, &cfg, &mut failures);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => break,
        }
    }
}

async fn check(server: &Server, cfg: &MonitorConfig, tls: &crate::backend::tls::BackendTls, conn: &mut Option<mysql_async::Conn>) -> Result<Check, String> {
    let timeout = Duration::from_millis(cfg.timeout_ms.max(50));
    let fut = async {
        if conn.is_none() {
            let opts = server.side_opts(&cfg.username, &cfg.password, tls).conn_ttl(None);
            *conn = Some(mysql_async::Conn::new(opts).await.map_err(|e| e.to_string())?);
        }
        let c = conn.as_mut().ok_or("no connection")?;
        let ro: Option<i64> = c.query_first("SELECT @@read_only").await.map_err(|e| e.to_string())?;
        let rows: Vec<mysql_async::Row> = c.query("SHOW REPLICA STATUS").await.map_err(|e| e.to_string())?;
        let (is_replica, lag, broken) = match rows.first() {
            None => (false, None, None),
            Some(r) => {
                // MariaDB keeps the Slave_/Master names; MySQL 8.0.22+ says Replica_/Source.
                let text = |names: &[&str]| {
                    names.iter().find_map(|n| r.get_opt::<Option<String>, _>(*n).and_then(|v| v.ok()).flatten())
                };
                let lag = ["Seconds_Behind_Master", "Seconds_Behind_Source"]
                    .iter()
                    .find_map(|n| r.get_opt::<Option<i64>, _>(*n).and_then(|v| v.ok()).flatten());
                let sql = text(&["Slave_SQL_Running", "Replica_SQL_Running"]).unwrap_or_default();
                let io = text(&["Slave_IO_Running", "Replica_IO_Running"]).unwrap_or_default();
                let broken = if !sql.eq_ignore_ascii_case("Yes") {
                    let err = text(&["Last_SQL_Error"]).unwrap_or_default();
                    Some(format!("replication SQL thread not running ({sql}) {err}").trim().to_string())
                } else if io.eq_ignore_ascii_case("No") {
                    let err = text(&["Last_IO_Error"]).unwrap_or_default();
                    Some(format!("replication IO thread stopped {err}").trim().to_string())
                } else {
                    None
                };
                (true, lag, broken)
            }
        };
        Ok::<_, String>(Check { read_only: ro == Some(1), lag, is_replica, broken })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            *conn = None;
            Err(e)
        }
        Err(_) => {
            *conn = None;
            Err(format!("health check timed out after {} ms", timeout.as_millis()))
        }
    }
}

/// A check's verdict on a server entry: None = healthy, Some(reason) = not.
fn verdict(s: &Server, res: &Result<Check, String>, cfg: &MonitorConfig) -> Option<String> {
    match res {
        Err(e) => Some(format!("health check failed: {e}")),
        Ok(c) => {
            let max = s.max_replication_lag() as i64;
            match (&c.broken, c.lag) {
                (Some(why), _) if cfg.shun_broken_replication && c.is_replica => Some(why.clone()),
                (_, Some(lag)) if max > 0 && c.is_replica && lag > max => {
                    Some(format!("replication lag {lag}s > max_replication_lag {max}s"))
                }
                _ => None,
            }
        }
    }
}

fn apply(entries: &[Arc<Server>], res: Result<Check, String>, cfg: &MonitorConfig, failures: &mut u32) {
    let verdicts: Vec<Option<String>> = entries.iter().map(|s| verdict(s, &res, cfg)).collect();
    *failures = if verdicts.iter().any(Option::is_some) { failures.saturating_add(1) } else { 0 };
    for (s, v) in entries.iter().zip(verdicts) {
        if s.status() == Status::OfflineHard {
            continue;
        }
        if let Ok(c) = &res {
            s.lag.store(c.lag.unwrap_or(-1), std::sync::atomic::Ordering::Relaxed);
        }
        match v {
            Some(why) if *failures >= cfg.shun_after_failures.max(1) => {
                s.set_status(Status::Shunned, &why);
            }
            Some(why) => {
                tracing::debug!(server = %s.addr, failures = *failures, of = cfg.shun_after_failures, reason = %why, "health check failed");
            }
            None => {
                s.set_status(Status::Online, "");
            }
        }
    }
}
