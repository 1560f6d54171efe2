//! Health checks: every interval, each server is connected to (mysql_async, short timeouts),
//! asked for @@read_only and, where a lag limit is set, SHOW SLAVE STATUS. Unreachable
//! servers and replicas lagging past max_replication_lag are SHUNNED; they come back ONLINE
//! as soon as a check passes. One task per server, so a hung server never stalls the others.

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
    loop {
        let res = check(&first, &cfg, &mut conn).await;
        let entries: Vec<Arc<Server>> = rt.servers().into_iter().filter(|s| s.addr == addr).collect();
        apply(&entries, res);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => break,
        }
    }
}

async fn check(server: &Server, cfg: &MonitorConfig, conn: &mut Option<mysql_async::Conn>) -> Result<Check, String> {
    let timeout = Duration::from_millis(cfg.timeout_ms.max(50));
    let fut = async {
        if conn.is_none() {
            let opts = mysql_async::OptsBuilder::default()
                .ip_or_hostname(server.cfg.host.clone())
                .tcp_port(server.cfg.port)
                .user(Some(cfg.username.clone()))
                .pass(Some(cfg.password.clone()))
                .prefer_socket(false)
                .conn_ttl(None);
            *conn = Some(mysql_async::Conn::new(opts).await.map_err(|e| e.to_string())?);
        }
        let c = conn.as_mut().ok_or("no connection")?;
        let ro: Option<i64> = c.query_first("SELECT @@read_only").await.map_err(|e| e.to_string())?;
        let rows: Vec<mysql_async::Row> = c.query("SHOW SLAVE STATUS").await.map_err(|e| e.to_string())?;
        let (is_replica, lag) = match rows.first() {
            None => (false, None),
            Some(r) => (true, r.get_opt::<Option<i64>, _>("Seconds_Behind_Master").and_then(|v| v.ok()).flatten()),
        };
        Ok::<_, String>(Check { read_only: ro == Some(1), lag, is_replica })
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

fn apply(entries: &[Arc<Server>], res: Result<Check, String>) {
    for s in entries {
        if s.status() == Status::OfflineHard {
            continue;
        }
        match &res {
            Err(e) => {
                s.set_status(Status::Shunned, &format!("health check failed: {e}"));
            }
            Ok(c) => {
                s.lag.store(c.lag.unwrap_or(-1), std::sync::atomic::Ordering::Relaxed);
                let max = s.cfg.max_replication_lag as i64;
                match c.lag {
                    Some(lag) if max > 0 && c.is_replica && lag > max => {
                        s.set_status(Status::Shunned, &format!("replication lag {lag}s > max_replication_lag {max}s"));
                    }
                    _ => {
                        s.set_status(Status::Online, "");
                    }
                }
            }
        }
    }
}
