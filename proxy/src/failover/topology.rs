//! Discovery: what one probe of one server tells (reachability, server_id, version,
//! read_only, GTID positions, and each replication channel from SHOW ALL SLAVES STATUS).
//! Probes use mysql_async with a hard timeout, so an unreachable or hung server costs at
//! most `probe_timeout_ms` and never stalls the controller loop.

use mysql_async::prelude::Queryable;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Default)]
pub struct Replication {
    pub master_host: String,
    pub master_port: u16,
    /// "Yes", "No" or "Connecting".
    pub io_running: String,
    pub sql_running: String,
    pub seconds_behind_master: Option<i64>,
    /// GTIDs received into the relay log (MariaDB's Gtid_IO_Pos).
    pub gtid_io_pos: String,
    pub last_io_error: String,
    pub last_sql_error: String,
}

impl Replication {
    pub fn master_addr(&self) -> String {
        format!("{}:{}", self.master_host, self.master_port)
    }

    pub fn io_ok(&self) -> bool {
        self.io_running == "Yes"
    }

    pub fn sql_ok(&self) -> bool {
        self.sql_running == "Yes"
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Instance {
    pub addr: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub server_id: u32,
    pub version: String,
    pub read_only: bool,
    pub gtid_binlog_pos: String,
    pub gtid_current_pos: String,
    pub gtid_slave_pos: String,
    /// The last GTID of every (domain, server id) pair in its binlog: the errant-transaction
    /// and rejoin checks compare these, not just the last GTID per domain.
    pub gtid_binlog_state: String,
    pub semi_sync_master: bool,
    /// Rpl_semi_sync_master_status (ON while commits wait for a replica's ack) and the
    /// semi-sync replicas connected; None where the server does not report them.
    pub semi_sync_master_status: Option<bool>,
    pub semi_sync_clients: Option<u64>,
    pub replication: Option<Replication>,
    /// Milliseconds the probe took.
    pub probe_ms: u64,
    /// The server answers but is not one the controller can work with (MySQL: no MariaDB
    /// GTID variables). The controller then acts on nothing and says so.
    pub unsupported: Option<String>,
}

/// ER_UNKNOWN_SYSTEM_VARIABLE: what MySQL answers to `@@gtid_binlog_pos`.
fn unknown_variable(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == 1193)
}

pub struct Prober {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub timeout: Duration,
    /// TLS for a server with use_ssl.
    pub ssl: Option<mysql_async::SslOpts>,
    conn: Option<mysql_async::Conn>,
}

impl Prober {
    pub fn new(host: &str, port: u16, user: &str, password: &str, timeout: Duration) -> Self {
        Self { host: host.into(), port, user: user.into(), password: password.into(), timeout, ssl: None, conn: None }
    }

    /// Probe and run recovery commands over TLS (the server has use_ssl).
    pub fn with_ssl(mut self, ssl: Option<mysql_async::SslOpts>) -> Self {
        self.ssl = ssl;
        self
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// One probe; on any failure the connection is dropped and the next probe reconnects.
    pub async fn probe(&mut self) -> Instance {
        let t = Instant::now();
        let addr = self.addr();
        let res = tokio::time::timeout(self.timeout, self.query()).await;
        let mut inst = match res {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                self.conn = None;
                Instance { addr: addr.clone(), error: Some(e), ..Default::default() }
            }
            Err(_) => {
                self.conn = None;
                Instance {
                    addr: addr.clone(),
                    error: Some(format!("no answer within {} ms", self.timeout.as_millis())),
                    ..Default::default()
                }
            }
        };
        inst.addr = addr;
        inst.probe_ms = t.elapsed().as_millis() as u64;
        inst
    }

    /// A connection for recovery commands (same credentials and timeout rules).
    pub async fn conn(&mut self) -> Result<&mut mysql_async::Conn, String> {
        if self.conn.is_none() {
            let opts = mysql_async::OptsBuilder::default()
                .ip_or_hostname(self.host.clone())
                .tcp_port(self.port)
                .user(Some(self.user.clone()))
                .pass(Some(self.password.clone()))
                .prefer_socket(false)
                .ssl_opts(self.ssl.clone())
                .conn_ttl(None);
            let c = tokio::time::timeout(self.timeout, mysql_async::Conn::new(opts))
                .await
                .map_err(|_| format!("connect to {} timed out after {} ms", self.addr(), self.timeout.as_millis()))?
                .map_err(|e| format!("connect to {}: {e}", self.addr()))?;
            self.conn = Some(c);
        }
        self.conn.as_mut().ok_or_else(|| "no connection".to_string())
    }

    pub fn forget(&mut self) {
        self.conn = None;
    }

    async fn query(&mut self) -> Result<Instance, String> {
        let c = self.conn().await?;
        let row: Option<(u32, String, i64, String, String, String, String)> = match c
            .query_first("SELECT @@server_id, @@version, @@read_only, @@gtid_binlog_pos, @@gtid_current_pos, @@gtid_slave_pos, @@gtid_binlog_state")
            .await
        {
            Ok(r) => r,
            Err(e) if unknown_variable(&e) => {
                let version: Option<String> = c.query_first("SELECT @@version").await.unwrap_or(None);
                let why = format!(
                    "{} has no MariaDB GTID variables ({e}): the failover controller needs MariaDB 10.x (GTID domains, gtid_binlog_pos, MASTER_USE_GTID); MySQL is not supported",
                    version.unwrap_or_else(|| "the server".into())
                );
                return Ok(Instance { reachable: true, error: Some(why.clone()), unsupported: Some(why), ..Default::default() });
            }
            Err(e) => return Err(e.to_string()),
        };
        let (server_id, version, ro, binlog, current, slave, binlog_state) = row.ok_or("no row from SELECT @@server_id")?;
        let semi: Option<i64> = c.query_first("SELECT @@rpl_semi_sync_master_enabled").await.unwrap_or(None);
        let status: Vec<(String, String)> = c
            .query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Rpl_semi_sync_master_status', 'Rpl_semi_sync_master_clients')")
            .await
            .unwrap_or_default();
        let semi_status = status.iter().find(|(k, _)| k.eq_ignore_ascii_case("Rpl_semi_sync_master_status")).map(|(_, v)| v.eq_ignore_ascii_case("ON"));
        let semi_clients = status.iter().find(|(k, _)| k.eq_ignore_ascii_case("Rpl_semi_sync_master_clients")).and_then(|(_, v)| v.parse().ok());
        let rows: Vec<mysql_async::Row> = match c.query("SHOW ALL SLAVES STATUS").await {
            Ok(r) => r,
            Err(_) => c.query("SHOW SLAVE STATUS").await.map_err(|e| e.to_string())?,
        };
        let replication = rows.first().map(|r| {
            let s = |name: &str| r.get_opt::<Option<String>, _>(name).and_then(|v| v.ok()).flatten().unwrap_or_default();
            Replication {
                master_host: s("Master_Host"),
                master_port: r.get_opt::<Option<u16>, _>("Master_Port").and_then(|v| v.ok()).flatten().unwrap_or(0),
                io_running: s("Slave_IO_Running"),
                sql_running: s("Slave_SQL_Running"),
                seconds_behind_master: r.get_opt::<Option<i64>, _>("Seconds_Behind_Master").and_then(|v| v.ok()).flatten(),
                gtid_io_pos: s("Gtid_IO_Pos"),
                last_io_error: s("Last_IO_Error"),
                last_sql_error: s("Last_SQL_Error"),
            }
        });
        Ok(Instance {
            reachable: true,
            server_id,
            version,
            read_only: ro != 0,
            gtid_binlog_pos: binlog,
            gtid_current_pos: current,
            gtid_slave_pos: slave,
            gtid_binlog_state: binlog_state,
            semi_sync_master: semi == Some(1),
            semi_sync_master_status: semi_status,
            semi_sync_clients: semi_clients,
            replication,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mysql_is_told_apart() {
        let e = |code: u16| mysql_async::Error::Server(mysql_async::ServerError { code, message: "x".into(), state: "HY000".into() });
        assert!(super::unknown_variable(&e(1193)));
        assert!(!super::unknown_variable(&e(1045)));
    }
}
