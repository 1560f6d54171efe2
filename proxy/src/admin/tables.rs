//! The admin tables, ProxySQL-style, held in SQLite: the configuration tables a DBA edits
//! with SQL (mysql_servers, mysql_users, mysql_query_rules), their runtime_* views, the
//! stats_* tables (refreshed from the live proxy before each statement), and
//! `LOAD ... TO RUNTIME` / `SAVE ... TO DISK` / `LOAD ... FROM DISK` / `SAVE ... FROM RUNTIME`.
//!
//! Three layers, as in ProxySQL: memory (the `main` database, what SQL edits), runtime (what
//! the proxy uses; changed only by LOAD ... TO RUNTIME), disk (the `disk` database attached
//! from `[admin] db_file`, written by SAVE ... TO DISK and read at start).

use crate::config::{PromotionRule, QueryRule, ServerConfig, UserConfig};
use crate::failover::Shared;
use crate::router::rules::Rules;
use crate::runtime::{build_users, Proxy};
use rusqlite::types::ValueRef;
use rusqlite::Connection;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CONFIG_TABLES: &[(&str, &str)] = &[
    (
        "mysql_servers",
        "(hostgroup_id INT NOT NULL, hostname VARCHAR NOT NULL, port INT NOT NULL DEFAULT 3306, weight INT NOT NULL DEFAULT 1, \
          max_connections INT NOT NULL DEFAULT 100, max_replication_lag INT NOT NULL DEFAULT 0, \
          promotion_rule VARCHAR NOT NULL DEFAULT 'neutral' CHECK (promotion_rule IN ('prefer','neutral','prefer_not','must_not')), \
          socket VARCHAR, comment VARCHAR NOT NULL DEFAULT '', \
          status VARCHAR NOT NULL DEFAULT 'ONLINE' CHECK (status IN ('ONLINE','OFFLINE_SOFT','OFFLINE_HARD')), \
          use_ssl INT NOT NULL DEFAULT 0 CHECK (use_ssl IN (0, 1)), \
          PRIMARY KEY (hostgroup_id, hostname, port))",
    ),
    (
        "mysql_users",
        "(username VARCHAR NOT NULL PRIMARY KEY, password VARCHAR, password_hash VARCHAR, sha2_password_hash VARCHAR, \
          auth_plugin VARCHAR NOT NULL DEFAULT 'mysql_native_password', backend_username VARCHAR, \
          backend_password VARCHAR NOT NULL DEFAULT '', default_hostgroup INT NOT NULL DEFAULT 0, default_schema VARCHAR)",
    ),
    (
        "mysql_query_rules",
        "(rule_id INT NOT NULL PRIMARY KEY, active INT NOT NULL DEFAULT 1, username VARCHAR, schemaname VARCHAR, \
          match_digest VARCHAR, match_pattern VARCHAR, negate_match_pattern INT NOT NULL DEFAULT 0, \
          destination_hostgroup INT, cache_ttl INT, cache_stale_while_revalidate INT, apply INT NOT NULL DEFAULT 0, comment VARCHAR, \
          cache_stale_if_error_ms INT, shed_priority INT)",
    ),
];

/// The admin database. Not Sync: callers hold it in a Mutex.
pub struct AdminDb {
    conn: Connection,
    has_disk: bool,
}

fn sql_err(e: rusqlite::Error) -> String {
    e.to_string()
}

impl AdminDb {
    /// Create the tables, attach the disk file, and fill memory from disk (when it holds a
    /// saved configuration and `initial` is false) or from the TOML configuration.
    /// Returns the database and the modules whose configuration came from disk.
    pub fn open(proxy: &Proxy, db_file: &str, initial: bool) -> Result<(Self, Vec<Module>), String> {
        let conn = Connection::open_in_memory().map_err(sql_err)?;
        let has_disk = !db_file.is_empty();
        if has_disk {
            if let Some(dir) = std::path::Path::new(db_file).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            conn.execute("ATTACH DATABASE ?1 AS disk", [db_file]).map_err(|e| format!("cannot open admin db {db_file}: {e}"))?;
            // The same file is the temporary-access store (password-equivalents): owner only.
            use std::os::unix::fs::PermissionsExt;
            if std::path::Path::new(db_file).exists() {
                std::fs::set_permissions(db_file, std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("cannot make {db_file} 0600: {e}"))?;
            }
        }
        for (name, cols) in CONFIG_TABLES {
            conn.execute_batch(&format!("CREATE TABLE main.{name} {cols};")).map_err(sql_err)?;
            if *name != "mysql_servers" {
                conn.execute_batch(&format!("CREATE TABLE main.runtime_{name} {cols};")).map_err(sql_err)?;
            }
            if has_disk {
                conn.execute_batch(&format!("CREATE TABLE IF NOT EXISTS disk.{name} {cols};")).map_err(sql_err)?;
                // A file saved by an older version gets the columns added since (last, in the
                // order this version has them too).
                let added: &[(&str, &str, &str)] = &[
                    ("mysql_servers", "status", "VARCHAR NOT NULL DEFAULT 'ONLINE'"),
                    ("mysql_servers", "use_ssl", "INT NOT NULL DEFAULT 0"),
                    ("mysql_query_rules", "cache_stale_if_error_ms", "INT"),
                    ("mysql_query_rules", "shed_priority", "INT"),
                ];
                for (_, col, def) in added.iter().filter(|(t, _, _)| t == name) {
                    let has: bool = conn
                        .query_row("SELECT COUNT(*) FROM pragma_table_info(?1, 'disk') WHERE name = ?2", [name, col], |r| r.get::<_, i64>(0))
                        .map(|n| n > 0)
                        .map_err(sql_err)?;
                    if !has {
                        conn.execute_batch(&format!("ALTER TABLE disk.{name} ADD COLUMN {col} {def}")).map_err(sql_err)?;
                    }
                }
            }
        }
        conn.execute_batch(
            "CREATE TABLE runtime_mysql_servers (hostgroup_id INT, hostname VARCHAR, port INT, weight INT, max_connections INT, \
               max_replication_lag INT, promotion_rule VARCHAR, socket VARCHAR, status VARCHAR, use_ssl INT); \
             CREATE TABLE stats_mysql_query_digest (hostgroup INT, schemaname VARCHAR, username VARCHAR, digest VARCHAR, digest_text VARCHAR, \
               count_star INT, first_seen INT, last_seen INT, sum_time INT, min_time INT, max_time INT, p99_time INT, sum_rows_sent INT, sum_errors INT); \
             CREATE TABLE stats_mysql_connection_pool (hostgroup INT, srv_host VARCHAR, srv_port INT, status VARCHAR, routed INT, ConnUsed INT, \
               ConnFree INT, ConnOK INT, ConnERR INT, Queries INT, Errors INT, max_connections INT, replication_lag INT); \
             CREATE TABLE stats_mysql_global (Variable_Name VARCHAR PRIMARY KEY, Variable_Value VARCHAR); \
             CREATE TABLE runtime_global_variables (variable_name VARCHAR PRIMARY KEY, variable_value VARCHAR); \
             CREATE TABLE stats_breakwater_pins (reason VARCHAR PRIMARY KEY, count INT); \
             CREATE TABLE stats_breakwater_backends (hostgroup INT, srv_host VARCHAR, srv_port INT, status VARCHAR, signal_source VARCHAR, \
               agent VARCHAR, agent_age_ms INT, server_latency_p99_ms REAL, server_latency_mean_ms REAL, server_requests_per_s REAL, \
               server_in_flight INT, server_connections INT, cpu_pressure REAL, cpu_throttled_ratio REAL, proxy_latency_ms REAL, \
               in_flight INT, concurrency_limit INT, queued INT, shed_total INT, read_share REAL, ejected INT, ejections_total INT); \
             CREATE TABLE stats_breakwater_cache (Variable_Name VARCHAR PRIMARY KEY, Variable_Value VARCHAR); \
             CREATE TABLE breakwater_access_grants (id INT, username VARCHAR, account VARCHAR, role VARCHAR, schema_name VARCHAR, grants VARCHAR, \
               reason VARCHAR, granted_by VARCHAR, granted_at INT, expires_at INT, state VARCHAR, ended_at INT); \
             CREATE TABLE breakwater_failover_events (id INT, at VARCHAR, kind VARCHAR, server VARCHAR, action VARCHAR, evidence VARCHAR);",
        )
        .map_err(sql_err)?;
        let mut db = Self { conn, has_disk };
        db.fill_from_config(proxy)?;
        db.fill_variables(proxy)?;
        // Each table saved to disk replaces what the TOML said (as ProxySQL's disk layer).
        let mut from_disk = Vec::new();
        if has_disk && !initial {
            for (m, (t, _)) in [Module::Servers, Module::Users, Module::QueryRules].into_iter().zip(CONFIG_TABLES) {
                let n: i64 = db.conn.query_row(&format!("SELECT COUNT(*) FROM disk.{t}"), [], |r| r.get(0)).map_err(sql_err)?;
                if n > 0 {
                    db.copy(&format!("disk.{t}"), &format!("main.{t}"))?;
                    from_disk.push(m);
                }
            }
        }
        for (t, _) in CONFIG_TABLES.iter().filter(|(t, _)| *t != "mysql_servers") {
            db.copy(&format!("main.{t}"), &format!("main.runtime_{t}"))?;
        }
        Ok((db, from_disk))
    }

    fn copy(&self, from: &str, to: &str) -> Result<(), String> {
        self.conn.execute_batch(&format!("DELETE FROM {to}; INSERT INTO {to} SELECT * FROM {from};")).map_err(sql_err)
    }

    /// runtime_global_variables: the data path's limits in force, under ProxySQL's names
    /// where it has them (read-only here: they come from the TOML and the flags).
    fn fill_variables(&mut self, proxy: &Proxy) -> Result<(), String> {
        let p = &proxy.rt.cfg.proxy;
        let m = &proxy.rt.cfg.monitor;
        let tls = &proxy.rt.backend_tls;
        let rows: [(&str, String); 19] = [
            ("mysql-connect_timeout_server", p.connect_timeout_ms.to_string()),
            ("mysql-backend_read_timeout", p.backend_read_timeout_ms.to_string()),
            ("mysql-default_query_timeout", p.default_query_timeout_ms.to_string()),
            ("mysql-max_transaction_time", p.max_transaction_time_ms.to_string()),
            ("mysql-max_transaction_idle_time", p.max_transaction_idle_time_ms.to_string()),
            ("mysql-client_write_timeout", p.client_write_timeout_ms.to_string()),
            ("mysql-client_keepalive", p.client_keepalive_ms.to_string()),
            ("mysql-query_digests_max_query_length", p.query_digests_max_query_length.to_string()),
            ("mysql-max_allowed_packet", p.max_allowed_packet.to_string()),
            ("mysql-queue_timeout", p.queue_timeout_ms.to_string()),
            ("mysql-max_connections", p.max_client_connections.to_string()),
            ("mysql-multiplex_after_call", p.multiplex_after_call.to_string()),
            ("mysql-monitor_ping_interval", m.interval_ms.to_string()),
            ("mysql-monitor_ping_timeout", m.timeout_ms.to_string()),
            ("mysql-monitor_ping_max_failures", m.shun_after_failures.to_string()),
            ("mysql-monitor_shun_broken_replication", m.shun_broken_replication.to_string()),
            // Paths only: a key file's contents never show through an admin surface.
            ("mysql-ssl_p2s_ca", tls.ca_file().to_string()),
            ("mysql-ssl_p2s_cert", p.ssl_p2s_cert.clone()),
            ("mysql-ssl_p2s_verify", tls.verify().as_str().to_string()),
        ];
        for (k, v) in rows {
            self.conn.execute("INSERT INTO runtime_global_variables VALUES (?1, ?2)", rusqlite::params![k, v]).map_err(sql_err)?;
        }
        Ok(())
    }

    fn fill_from_config(&mut self, proxy: &Proxy) -> Result<(), String> {
        let cfg = &proxy.rt.cfg;
        let tx = self.conn.transaction().map_err(sql_err)?;
        for s in &cfg.servers {
            tx.execute(
                "INSERT OR REPLACE INTO mysql_servers VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, '', ?9, ?10)",
                rusqlite::params![s.hostgroup, s.host, s.port, s.weight, s.max_connections as i64, s.max_replication_lag as i64, s.promotion_rule.as_str(), s.socket, s.status.as_str(), s.use_ssl as i64],
            )
            .map_err(sql_err)?;
        }
        for u in &cfg.users {
            tx.execute(
                "INSERT OR REPLACE INTO mysql_users VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                rusqlite::params![
                    u.username,
                    u.password,
                    u.password_hash,
                    u.sha2_password_hash,
                    u.auth_plugin,
                    u.backend_username,
                    u.backend_password,
                    u.default_hostgroup,
                    u.default_schema
                ],
            )
            .map_err(sql_err)?;
        }
        for r in &cfg.query_rules {
            tx.execute(
                "INSERT OR REPLACE INTO mysql_query_rules VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, ?12, ?13)",
                rusqlite::params![
                    r.rule_id,
                    r.active as i64,
                    r.username,
                    r.schemaname,
                    r.match_digest,
                    r.match_pattern,
                    r.negate_match_pattern as i64,
                    r.destination_hostgroup,
                    r.cache_ttl.map(|v| v as i64),
                    r.cache_stale_while_revalidate.map(|v| v as i64),
                    r.apply as i64,
                    r.cache_stale_if_error_ms.map(|v| v as i64),
                    r.shed_priority.map(|v| v as i64)
                ],
            )
            .map_err(sql_err)?;
        }
        tx.commit().map_err(sql_err)
    }

    fn servers(&self, table: &str) -> Result<Vec<ServerConfig>, String> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT hostgroup_id, hostname, port, weight, max_connections, max_replication_lag, promotion_rule, socket, status, use_ssl FROM {table} ORDER BY hostgroup_id, hostname, port"
            ))
            .map_err(sql_err)?;
        let rows = st
            .query_map([], |r| {
                let rule: String = r.get(6)?;
                let status: String = r.get::<_, Option<String>>(8)?.unwrap_or_default();
                Ok(ServerConfig {
                    hostgroup: r.get(0)?,
                    host: r.get(1)?,
                    port: r.get(2)?,
                    weight: r.get(3)?,
                    max_connections: r.get::<_, i64>(4)?.max(0) as usize,
                    max_replication_lag: r.get::<_, i64>(5)?.max(0) as u64,
                    promotion_rule: match rule.as_str() {
                        "prefer" => PromotionRule::Prefer,
                        "prefer_not" => PromotionRule::PreferNot,
                        "must_not" => PromotionRule::MustNot,
                        _ => PromotionRule::Neutral,
                    },
                    socket: r.get(7)?,
                    // runtime_mysql_servers shows SHUNNED too: not an operator's status.
                    status: crate::config::AdminStatus::parse(&status).unwrap_or_default(),
                    use_ssl: r.get::<_, Option<i64>>(9)?.unwrap_or(0) != 0,
                })
            })
            .map_err(sql_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
    }

    fn users(&self) -> Result<Vec<UserConfig>, String> {
        let mut st = self.conn.prepare("SELECT username, password, password_hash, sha2_password_hash, auth_plugin, backend_username, backend_password, default_hostgroup, default_schema FROM mysql_users").map_err(sql_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(UserConfig {
                    username: r.get(0)?,
                    password: r.get(1)?,
                    password_hash: r.get(2)?,
                    sha2_password_hash: r.get(3)?,
                    auth_plugin: r.get(4)?,
                    backend_username: r.get(5)?,
                    backend_password: r.get(6)?,
                    default_hostgroup: r.get(7)?,
                    default_schema: r.get(8)?,
                })
            })
            .map_err(sql_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
    }

    fn rules(&self) -> Result<Vec<QueryRule>, String> {
        let mut st = self.conn.prepare("SELECT rule_id, active, username, schemaname, match_digest, match_pattern, negate_match_pattern, destination_hostgroup, cache_ttl, cache_stale_while_revalidate, apply, cache_stale_if_error_ms, shed_priority FROM mysql_query_rules ORDER BY rule_id").map_err(sql_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(QueryRule {
                    rule_id: r.get(0)?,
                    active: r.get::<_, i64>(1)? != 0,
                    username: r.get(2)?,
                    schemaname: r.get(3)?,
                    match_digest: r.get(4)?,
                    match_pattern: r.get(5)?,
                    negate_match_pattern: r.get::<_, i64>(6)? != 0,
                    destination_hostgroup: r.get(7)?,
                    cache_ttl: r.get::<_, Option<i64>>(8)?.map(|v| v.max(0) as u64),
                    cache_stale_while_revalidate: r.get::<_, Option<i64>>(9)?.map(|v| v.max(0) as u64),
                    apply: r.get::<_, i64>(10)? != 0,
                    cache_stale_if_error_ms: r.get::<_, Option<i64>>(11)?.map(|v| v.max(0) as u64),
                    shed_priority: r.get::<_, Option<i64>>(12)?.map(|v| v.clamp(0, u32::MAX as i64) as u32),
                })
            })
            .map_err(sql_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
    }

    /// Apply the memory layer of one module to the running proxy.
    pub fn load_to_runtime(&self, proxy: &Proxy, module: Module) -> Result<String, String> {
        let rt = &proxy.rt;
        match module {
            Module::QueryRules => {
                let rules = self.rules()?;
                for r in &rules {
                    for re in [&r.match_pattern, &r.match_digest].into_iter().flatten() {
                        regex::Regex::new(re).map_err(|e| format!("rule {}: bad regex {re:?}: {e}", r.rule_id))?;
                    }
                }
                let compiled = Rules::new(&rules).map_err(|e| e.to_string())?;
                rt.set_rules(compiled);
            }
            Module::Users => {
                let users = build_users(&self.users()?).map_err(|e| e.to_string())?;
                rt.set_users(users);
            }
            Module::Servers => {
                let servers = self.servers("main.mysql_servers")?;
                if let Some(s) = servers.iter().find(|s| s.max_connections == 0) {
                    return Err(format!("server {}:{} has max_connections = 0", s.host, s.port));
                }
                rt.load_servers(servers);
            }
        }
        let t = module.table();
        if module != Module::Servers {
            // runtime_mysql_servers is rebuilt from the live hostgroups before every statement.
            self.copy(&format!("main.{t}"), &format!("main.runtime_{t}"))?;
        }
        Ok(format!("{t} loaded to runtime"))
    }

    pub fn save_to_disk(&self, module: Module) -> Result<String, String> {
        if !self.has_disk {
            return Err("no [admin] db_file configured (or --admin-db): nothing to save to".into());
        }
        let t = module.table();
        self.copy(&format!("main.{t}"), &format!("disk.{t}"))?;
        Ok(format!("{t} saved to disk"))
    }

    pub fn load_from_disk(&self, module: Module) -> Result<String, String> {
        if !self.has_disk {
            return Err("no [admin] db_file configured (or --admin-db)".into());
        }
        let t = module.table();
        self.copy(&format!("disk.{t}"), &format!("main.{t}"))?;
        Ok(format!("{t} loaded from disk to memory"))
    }

    pub fn save_from_runtime(&self, module: Module) -> Result<String, String> {
        let t = module.table();
        if module == Module::Servers {
            self.conn
                .execute_batch(
                    "DELETE FROM main.mysql_servers; INSERT INTO main.mysql_servers SELECT hostgroup_id, hostname, port, weight, max_connections, \
                     max_replication_lag, promotion_rule, socket, '', \
                     CASE WHEN status IN ('OFFLINE_SOFT', 'OFFLINE_HARD') THEN status ELSE 'ONLINE' END, use_ssl FROM main.runtime_mysql_servers;",
                )
                .map_err(sql_err)?;
            return Ok(format!("{t} saved from runtime to memory"));
        }
        self.copy(&format!("main.runtime_{t}"), &format!("main.{t}"))?;
        Ok(format!("{t} saved from runtime to memory"))
    }

    /// Refresh runtime_mysql_servers (the failover controller changes it) and the stats tables.
    pub fn refresh(&mut self, proxy: &Proxy, failover: Option<&Shared>) -> Result<(), String> {
        let rt = &proxy.rt;
        let routing = rt.routing();
        let tx = self.conn.transaction().map_err(sql_err)?;
        tx.execute_batch(
            "DELETE FROM runtime_mysql_servers; DELETE FROM stats_mysql_connection_pool; DELETE FROM stats_mysql_query_digest; \
             DELETE FROM stats_mysql_global; DELETE FROM stats_breakwater_pins; DELETE FROM stats_breakwater_cache; DELETE FROM stats_breakwater_backends; DELETE FROM breakwater_failover_events;",
        )
        .map_err(sql_err)?;
        for s in rt.servers() {
            let routed = routing.hostgroups.get(&s.cfg.hostgroup).is_some_and(|h| h.servers.iter().any(|x| Arc::ptr_eq(x, &s)));
            let c = &s.config();
            if routed {
                tx.execute(
                    "INSERT OR REPLACE INTO runtime_mysql_servers VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    rusqlite::params![c.hostgroup, c.host, c.port, c.weight, c.max_connections as i64, c.max_replication_lag as i64, c.promotion_rule.as_str(), c.socket, s.status().as_str(), c.use_ssl as i64],
                )
                .map_err(sql_err)?;
            }
            tx.execute(
                "INSERT INTO stats_mysql_connection_pool VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                rusqlite::params![
                    c.hostgroup,
                    c.host,
                    c.port,
                    s.status().as_str(),
                    routed as i64,
                    s.pool.in_use.load(Ordering::Relaxed) as i64,
                    s.pool.idle_count() as i64,
                    s.counters.conn_ok.load(Ordering::Relaxed) as i64,
                    s.counters.conn_err.load(Ordering::Relaxed) as i64,
                    s.counters.queries.load(Ordering::Relaxed) as i64,
                    s.counters.errors.load(Ordering::Relaxed) as i64,
                    s.pool.max() as i64,
                    s.lag.load(Ordering::Relaxed)
                ],
            )
            .map_err(sql_err)?;
        }
        for b in crate::adaptive::view::backends(proxy) {
            tx.execute(
                "INSERT INTO stats_breakwater_backends VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
                rusqlite::params![
                    b.hostgroup,
                    b.srv_host,
                    b.srv_port,
                    b.status,
                    b.signal_source,
                    b.agent,
                    b.agent_age_ms.map(|v| v as i64),
                    b.server_latency_p99_ms,
                    b.server_latency_mean_ms,
                    b.server_requests_per_s,
                    b.server_in_flight.map(|v| v as i64),
                    b.server_connections.map(|v| v as i64),
                    b.cpu_pressure,
                    b.cpu_throttled_ratio,
                    b.proxy_latency_ms,
                    b.in_flight as i64,
                    b.concurrency_limit.map(|v| v as i64),
                    b.queued as i64,
                    b.shed_total as i64,
                    b.read_share,
                    b.ejected as i64,
                    b.ejections_total as i64
                ],
            )
            .map_err(sql_err)?;
        }
        for d in proxy.digests.snapshot() {
            tx.execute(
                "INSERT INTO stats_mysql_query_digest VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                rusqlite::params![
                    d.hostgroup,
                    d.schemaname,
                    d.username,
                    d.digest,
                    d.digest_text,
                    d.count_star as i64,
                    d.first_seen as i64,
                    d.last_seen as i64,
                    d.sum_time_us as i64,
                    d.min_time_us as i64,
                    d.max_time_us as i64,
                    d.p99_time_us as i64,
                    d.sum_rows_sent as i64,
                    d.sum_errors as i64
                ],
            )
            .map_err(sql_err)?;
        }
        let st = &proxy.stats;
        for (k, v) in [
            ("Client_Connections_created", st.client_connections.load(Ordering::Relaxed)),
            ("Client_Connections_refused", st.client_connections_refused.load(Ordering::Relaxed)),
            ("Backend_errors", st.backend_errors.load(Ordering::Relaxed)),
            ("Read_retries", st.retries.load(Ordering::Relaxed)),
            ("Query_timeouts", st.query_timeouts.load(Ordering::Relaxed)),
            ("Transaction_timeouts", st.transaction_timeouts.load(Ordering::Relaxed)),
            ("Digest_rows", proxy.digests.len() as u64),
        ] {
            tx.execute("INSERT INTO stats_mysql_global VALUES (?1, ?2)", rusqlite::params![k, v.to_string()]).map_err(sql_err)?;
        }
        if let Ok(pins) = st.pins.lock() {
            for (reason, n) in pins.iter() {
                tx.execute("INSERT INTO stats_breakwater_pins VALUES (?1, ?2)", rusqlite::params![reason, *n as i64]).map_err(sql_err)?;
            }
        }
        let c = proxy.cache.stats();
        for (k, v) in [
            ("entries", c.entries as u64),
            ("bytes", c.bytes as u64),
            ("max_bytes", c.max_bytes as u64),
            ("hits", c.hits),
            ("stale_hits", c.stale_hits),
            ("stale_if_error_hits", c.stale_if_error_hits),
            ("misses", c.misses),
            ("fill_waits", c.fill_waits),
            ("stores", c.stores),
            ("evictions", c.evictions),
            ("invalidations", c.invalidations),
        ] {
            tx.execute("INSERT INTO stats_breakwater_cache VALUES (?1, ?2)", rusqlite::params![k, v.to_string()]).map_err(sql_err)?;
        }
        if let Some(f) = failover {
            for e in f.view().events {
                tx.execute(
                    "INSERT INTO breakwater_failover_events VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![e.id as i64, e.at, e.kind, e.addr, e.action, e.evidence.join("; ")],
                )
                .map_err(sql_err)?;
            }
        }
        tx.commit().map_err(sql_err)
    }

    /// The temporary access grants (no hashes), for SELECT.
    pub fn refresh_access(&mut self, grants: &[crate::access::store::Grant]) -> Result<(), String> {
        let tx = self.conn.transaction().map_err(sql_err)?;
        tx.execute("DELETE FROM breakwater_access_grants", []).map_err(sql_err)?;
        for g in grants {
            tx.execute(
                "INSERT INTO breakwater_access_grants VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                rusqlite::params![g.id, g.username, g.account, g.role, g.schema, g.grants, g.reason, g.granted_by, g.granted_at as i64, g.expires_at as i64, g.state, g.ended_at.map(|v| v as i64)],
            )
            .map_err(sql_err)?;
        }
        tx.commit().map_err(sql_err)
    }

    /// Run one statement: rows as text (None = NULL) with column names, or affected rows.
    pub fn execute(&self, sql: &str) -> Result<Outcome, String> {
        let mut st = self.conn.prepare(sql).map_err(sql_err)?;
        let cols: Vec<String> = st.column_names().iter().map(|c| c.to_string()).collect();
        if cols.is_empty() {
            let n = st.execute([]).map_err(sql_err)?;
            return Ok(Outcome::Affected(n as u64));
        }
        let mut rows = st.query([]).map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(sql_err)? {
            let mut row = Vec::with_capacity(cols.len());
            for i in 0..cols.len() {
                row.push(match r.get_ref(i).map_err(sql_err)? {
                    ValueRef::Null => None,
                    ValueRef::Integer(v) => Some(v.to_string()),
                    ValueRef::Real(v) => Some(v.to_string()),
                    ValueRef::Text(t) | ValueRef::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
                });
            }
            out.push(row);
        }
        Ok(Outcome::Rows(cols, out))
    }
}

pub enum Outcome {
    Rows(Vec<String>, Vec<Vec<Option<String>>>),
    Affected(u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Module {
    Servers,
    Users,
    QueryRules,
}

impl Module {
    pub fn table(self) -> &'static str {
        match self {
            Module::Servers => "mysql_servers",
            Module::Users => "mysql_users",
            Module::QueryRules => "mysql_query_rules",
        }
    }
}
