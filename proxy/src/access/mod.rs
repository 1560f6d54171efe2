//! Temporary access: time-boxed database users that Breakwater creates, enforces, audits and
//! removes on time.
//!
//! A grant creates a real MariaDB account on the writer (marked with `account_prefix`,
//! random strong password, the role's privileges; it replicates) and a proxy user that logs
//! in with that password; the password is shown once and only its hashes are stored
//! ([`store`]). At expiry (or `revoke`) the proxy removes the proxy user (new logins get
//! 1045), drops the account on whichever server is the writer then, kills its server
//! connections (an in-flight query gets an error) and closes its client sessions with a
//! clear error. Grants persist in the admin SQLite file: at start, expired ones are revoked
//! and a reconciler removes any account with this store's marker (`bw_tmp_<tag>_…`) that no
//! active grant owns. Every event goes to a
//! JSON-lines audit log ([`audit`]).

pub mod audit;
pub mod store;

use crate::config::AccessConfig;
use crate::failover::controller::rfc3339;
use crate::protocol::auth;
use crate::runtime::{Runtime, User};
use mysql_async::prelude::Queryable;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{Grant, Store};
use tokio::sync::watch;
use tracing::{info, warn};

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// "90", "90s", "15m", "4h", "1d" -> seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad TTL {s:?}: use e.g. 90s, 15m, 4h, 1d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad TTL unit in {s:?}: use s, m, h or d")),
    };
    Ok(n * mult)
}

#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub user: String,
    pub ttl_seconds: u64,
    /// read_only, read_write, or a privilege list such as "SELECT, INSERT".
    pub role: String,
    pub schema: Option<String>,
    pub reason: String,
    pub by: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Granted {
    pub user: String,
    pub password: String,
    pub expires_at: String,
    pub expires_at_unix: u64,
    pub role: String,
    pub schema: String,
    pub account: String,
    pub id: i64,
}

pub struct Access {
    rt: Arc<Runtime>,
    cfg: AccessConfig,
    db_user: String,
    db_password: String,
    store: Mutex<Store>,
    /// `account_prefix` + this store's tag + `_`: the marker of the accounts this proxy owns.
    marker: String,
    pub audit: audit::Audit,
    /// One signal per temporary user: sessions close when it turns true.
    revoked: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Serialises grant / revoke / reconcile (so the reconciler never sees a half-made grant).
    ops: tokio::sync::Mutex<()>,
}

type HostPort = (String, u16);

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Access {
    /// None when no store is configured (`[admin] db_file`).
    pub fn open(rt: Arc<Runtime>, otlp_logs: Option<tokio::sync::mpsc::Sender<crate::telemetry::LogEvent>>) -> Result<Option<Arc<Self>>, String> {
        let db_file = rt.cfg.admin.db_file.clone();
        if db_file.is_empty() {
            return Ok(None);
        }
        let cfg = rt.cfg.access.clone();
        let store = Store::open(&db_file)?;
        let marker = format!("{}{}_", cfg.account_prefix, store.tag);
        let audit_path = if cfg.audit_log.is_empty() { format!("{db_file}.audit.jsonl") } else { cfg.audit_log.clone() };
        let audit = audit::Audit::open(&audit_path, otlp_logs)?;
        let (db_user, db_password) = if cfg.admin_username.is_empty() {
            (rt.cfg.monitor.username.clone(), rt.cfg.monitor.password.clone())
        } else {
            (cfg.admin_username.clone(), cfg.admin_password.clone())
        };
        let a = Arc::new(Self {
            rt,
            cfg,
            db_user,
            db_password,
            store: Mutex::new(store),
            marker,
            audit,
            revoked: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
        });
        // Active grants are usable at once; expired ones are revoked by the loop's first pass.
        for g in a.with_store(|s| s.active())? {
            if g.expires_at > now_s() {
                a.install(&g);
            }
        }
        Ok(Some(a))
    }

    fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T, String>) -> Result<T, String> {
        let s = self.store.lock().map_err(|_| "access store lock poisoned".to_string())?;
        f(&s)
    }

    /// The proxy user of a grant, and its revoke signal.
    fn install(&self, g: &Grant) {
        let native = auth::from_hex(&g.stage2_hex).and_then(|v| <[u8; 20]>::try_from(v).ok());
        let read_only = g.role == "read_only";
        let user = User {
            name: g.username.clone(),
            native,
            sha2: None,
            plugin: auth::NATIVE,
            backend_user: g.account.clone().into(),
            backend_password: format!("{}{}", auth::STAGE1_PREFIX, g.stage1_hex),
            default_hostgroup: if read_only { self.cfg.read_only_hostgroup } else { self.cfg.read_write_hostgroup },
            default_schema: (g.schema != "*").then(|| g.schema.clone()),
            temporary: true,
            read_only,
        };
        self.rt.add_temp_user(Arc::new(user));
        if let Ok(mut m) = self.revoked.lock() {
            m.insert(g.username.clone(), watch::channel(false).0);
        }
    }

    /// For a session of a temporary user: resolves when its access ends.
    pub fn session_signal(&self, user: &str) -> Option<watch::Receiver<bool>> {
        self.revoked.lock().ok()?.get(user).map(|t| t.subscribe())
    }

    /// Whether `name` is (or was) a temporary user, for auditing failed logins.
    pub fn knows(&self, name: &str) -> bool {
        self.with_store(|s| s.all()).map(|v| v.iter().any(|g| g.username == name)).unwrap_or(false)
    }

    pub fn list(&self) -> Result<Vec<Grant>, String> {
        self.with_store(|s| s.all())
    }

    /// (host, port) of the writer now, then of the readers (the failover controller keeps
    /// the hostgroups current, so revocation follows a promotion).
    fn targets(&self) -> (Option<HostPort>, Vec<HostPort>) {
        let routing = self.rt.routing();
        let hp = |s: &crate::backend::server::Server| (s.cfg.host.clone(), s.cfg.port);
        let writer = routing.hostgroups.get(&self.cfg.read_write_hostgroup).and_then(|h| h.servers.first()).map(|s| hp(s));
        let mut readers: Vec<HostPort> = Vec::new();
        for h in routing.hostgroups.values() {
            for s in &h.servers {
                let t = hp(s);
                if Some(&t) != writer.as_ref() && !readers.contains(&t) {
                    readers.push(t);
                }
            }
        }
        (writer, readers)
    }

    async fn connect(&self, host: &str, port: u16) -> Result<mysql_async::Conn, String> {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(host.to_string())
            .tcp_port(port)
            .user(Some(self.db_user.clone()))
            .pass(Some(self.db_password.clone()))
            .prefer_socket(false);
        tokio::time::timeout(Duration::from_secs(3), mysql_async::Conn::new(opts))
            .await
            .map_err(|_| format!("connect to {host}:{port} timed out"))?
            .map_err(|e| format!("connect to {host}:{port}: {e}"))
    }

    pub async fn grant(&self, req: GrantRequest) -> Result<Granted, String> {
        if !valid_name(&req.user) {
            return Err("user must be 1-16 characters of [A-Za-z0-9_]".into());
        }
        if req.ttl_seconds == 0 || req.ttl_seconds > self.cfg.max_ttl_seconds {
            return Err(format!("ttl must be between 1 s and max_ttl_seconds ({} s)", self.cfg.max_ttl_seconds));
        }
        let privileges = role_privileges(&req.role)?;
        let schema = grant_schema(req.schema.as_deref())?;
        let _op = self.ops.lock().await;
        if self.rt.user(&req.user).is_some() {
            return Err(format!("a user named {} already exists in the proxy", req.user));
        }
        let password: String = {
            use rand::Rng;
            const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
            let mut r = rand::thread_rng();
            (0..24).map(|_| CHARS[r.gen_range(0..CHARS.len())] as char).collect()
        };
        let suffix: u32 = rand::random::<u32>() & 0xff_ffff;
        let account = format!("{}{}_{suffix:06x}", self.marker, req.user.to_ascii_lowercase());
        let on = format!("`{schema}`.*");
        let (writer, readers) = self.targets();
        let (host, port) = writer.ok_or("no writer server to create the account on")?;
        let mut c = self.connect(&host, port).await?;
        let create = async {
            c.query_drop(format!("CREATE USER '{account}'@'%' IDENTIFIED BY '{password}'")).await?;
            c.query_drop(format!("GRANT {privileges} ON {on} TO '{account}'@'%'")).await?;
            c.query_first::<String, _>("SELECT @@gtid_binlog_pos").await
        };
        let pos = match tokio::time::timeout(Duration::from_secs(10), create).await {
            Ok(Ok(p)) => p.unwrap_or_default(),
            Ok(Err(e)) => {
                let _ = c.query_drop(format!("DROP USER IF EXISTS '{account}'@'%'")).await;
                return Err(format!("creating the account on {host}:{port}: {e}"));
            }
            Err(_) => return Err(format!("creating the account on {host}:{port} timed out")),
        };
        let _ = c.disconnect().await;
        // Readers must have the account before the first login is routed there.
        for (h, p) in &readers {
            if let Ok(mut r) = self.connect(h, *p).await {
                let _ = tokio::time::timeout(Duration::from_secs(6), r.query_drop(format!("SELECT MASTER_GTID_WAIT('{pos}', 5)"))).await;
                let _ = r.disconnect().await;
            }
        }
        let stage1 = auth::native_stage1(password.as_bytes());
        let stage2 = auth::native_stage2(password.as_bytes());
        let now = now_s();
        let mut g = Grant {
            id: 0,
            username: req.user.clone(),
            account: account.clone(),
            role: req.role.clone(),
            schema: schema.clone(),
            grants: format!("{privileges} ON {on}"),
            reason: req.reason.clone(),
            granted_by: req.by.clone(),
            granted_at: now,
            expires_at: now + req.ttl_seconds,
            state: "active".into(),
            ended_at: None,
            account_dropped: false,
            stage1_hex: auth::to_hex(&stage1),
            stage2_hex: auth::to_hex(&stage2),
        };
        g.id = self.with_store(|s| s.insert(&g))?;
        self.install(&g);
        self.audit.event("grant", &g.username, &[("account", &g.account), ("role", &g.role), ("schema", &g.schema), ("by", &g.granted_by), ("reason", &g.reason), ("expires_at", &rfc3339(g.expires_at * 1000))]);
        info!(user = %g.username, account = %g.account, role = %g.role, expires_at = g.expires_at, "temporary access granted");
        Ok(Granted {
            user: g.username,
            password,
            expires_at: rfc3339(g.expires_at * 1000),
            expires_at_unix: g.expires_at,
            role: g.role,
            schema,
            account,
            id: g.id,
        })
    }

    pub async fn extend(&self, user: &str, ttl_seconds: u64, by: &str) -> Result<String, String> {
        let _op = self.ops.lock().await;
        let g = self.with_store(|s| s.active_by_user(user))?.ok_or_else(|| format!("no active grant for {user}"))?;
        let want = now_s() + ttl_seconds;
        let cap = g.granted_at + self.cfg.max_ttl_seconds;
        if want > cap {
            return Err(format!("extension past max_ttl_seconds ({} s after the grant): latest allowed expiry {}", self.cfg.max_ttl_seconds, rfc3339(cap * 1000)));
        }
        self.with_store(|s| s.set_expiry(g.id, want))?;
        self.audit.event("extend", user, &[("by", by), ("expires_at", &rfc3339(want * 1000)), ("reason", &g.reason)]);
        Ok(format!("{user}: access now expires at {}", rfc3339(want * 1000)))
    }

    /// End a grant now (`state` is revoked or expired).
    pub async fn revoke(&self, user: &str, state: &str, by: &str) -> Result<String, String> {
        let _op = self.ops.lock().await;
        let g = self.with_store(|s| s.active_by_user(user))?.ok_or_else(|| format!("no active grant for {user}"))?;
        self.end(&g, state, by).await
    }

    /// End a grant: no new logins, its client sessions closed and its running statements
    /// killed at once, whatever the servers' state; then its account dropped on the writer.
    /// When the writer cannot be reached the grant is ended all the same and its account is
    /// dropped as soon as a writer answers ([`Access::drop_pending`]).
    async fn end(&self, g: &Grant, state: &str, by: &str) -> Result<String, String> {
        self.rt.remove_temp_user(&g.username);
        // Client sessions close with a clear error.
        if let Ok(mut m) = self.revoked.lock() {
            if let Some(tx) = m.remove(&g.username) {
                let _ = tx.send(true);
            }
        }
        let now = now_s();
        self.with_store(|s| s.end(g.id, state, now))?;
        self.audit.event(state, &g.username, &[("account", &g.account), ("by", by), ("reason", &g.reason)]);
        info!(user = %g.username, account = %g.account, state, "temporary access ended");
        match self.drop_account(g).await {
            Ok(done) => Ok(format!("{}: access {state}; {done}", g.username)),
            Err(e) => {
                self.audit.event("drop_pending", &g.username, &[("account", &g.account), ("error", &e)]);
                warn!(user = %g.username, account = %g.account, error = %e, "temporary access ended; its account is dropped once the writer answers");
                Ok(format!("{}: access {state}; sessions closed; account {} not dropped yet ({e}): dropped as soon as the writer answers", g.username, g.account))
            }
        }
    }

    /// Drop the account on the writer (the DROP replicates), and kill its server
    /// connections wherever a server answers (its statements end with an error), also when
    /// the writer does not.
    async fn drop_account(&self, g: &Grant) -> Result<String, String> {
        let bound = Duration::from_secs(5);
        let (writer, readers) = self.targets();
        let dropped = match &writer {
            None => Err("no writer server to drop the account on".to_string()),
            Some((host, port)) => match self.connect(host, *port).await {
                Err(e) => Err(e),
                Ok(mut c) => {
                    let r = tokio::time::timeout(bound, c.query_drop(format!("DROP USER IF EXISTS '{}'@'%'", g.account))).await;
                    let _ = tokio::time::timeout(bound, c.disconnect()).await;
                    match r {
                        Ok(Ok(())) => Ok(format!("{host}:{port}")),
                        Ok(Err(e)) => Err(format!("DROP USER on {host}:{port}: {e}")),
                        Err(_) => Err(format!("DROP USER on {host}:{port}: no answer within {} s", bound.as_secs())),
                    }
                }
            },
        };
        let mut killed = 0;
        for (h, p) in writer.iter().cloned().chain(readers) {
            let Ok(mut k) = self.connect(&h, p).await else { continue };
            let ids: Vec<u64> = tokio::time::timeout(bound, k.exec("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?", (g.account.clone(),)))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            for id in ids {
                if let Ok(Ok(())) = tokio::time::timeout(bound, k.query_drop(format!("KILL {id}"))).await {
                    killed += 1;
                }
            }
            let _ = tokio::time::timeout(bound, k.disconnect()).await;
        }
        let server = dropped?;
        self.with_store(|s| s.dropped(g.id))?;
        self.audit.event("account_dropped", &g.username, &[("account", &g.account), ("server", &server), ("killed_backend_connections", &killed.to_string())]);
        Ok(format!("account {} dropped on {server}, {killed} server connection(s) killed", g.account))
    }

    /// Drop the accounts of ended grants whose writer was unreachable at their end.
    pub async fn drop_pending(&self) -> usize {
        let _op = self.ops.lock().await;
        let mut done = 0;
        for g in self.with_store(|s| s.pending_drops()).unwrap_or_default() {
            match self.drop_account(&g).await {
                Ok(_) => done += 1,
                Err(e) => tracing::debug!(account = %g.account, error = %e, "account drop still pending"),
            }
        }
        done
    }

    /// Drop accounts with this store's marker that no active grant owns, on every server;
    /// never touch others (unmarked ones, or those of another proxy's store).
    pub async fn reconcile(&self) -> Result<usize, String> {
        let _op = self.ops.lock().await;
        let owned: BTreeSet<String> = self.with_store(|s| s.active())?.into_iter().map(|g| g.account).collect();
        let like = format!("{}%", self.marker.replace('_', "\\_"));
        let (writer, readers) = self.targets();
        let mut removed = 0;
        for (i, (h, p)) in writer.into_iter().chain(readers).enumerate() {
            let Ok(mut c) = self.connect(&h, p).await else { continue };
            let accounts: Vec<(String, String)> = c.exec("SELECT User, Host FROM mysql.user WHERE User LIKE ?", (like.clone(),)).await.unwrap_or_default();
            for (user, host) in accounts.into_iter().filter(|(u, _)| !owned.contains(u)) {
                // On replicas: local only (the writer's DROP replicates on its own).
                let sql = if i == 0 {
                    format!("DROP USER IF EXISTS '{user}'@'{host}'")
                } else {
                    format!("SET SESSION sql_log_bin = 0; DROP USER IF EXISTS '{user}'@'{host}'; SET SESSION sql_log_bin = 1")
                };
                match c.query_drop(sql).await {
                    Ok(()) => {
                        removed += 1;
                        warn!(account = %user, server = %format!("{h}:{p}"), "orphaned temporary account removed");
                        self.audit.event("orphan_removed", &user, &[("server", &format!("{h}:{p}")), ("host", &host)]);
                    }
                    Err(e) => warn!(account = %user, error = %e, "could not remove orphaned account"),
                }
            }
            let _ = c.disconnect().await;
        }
        Ok(removed)
    }

    /// Expire grants on time and reconcile periodically; the first pass runs at once.
    pub fn spawn(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let a = self.clone();
        tokio::spawn(async move {
            let tick = Duration::from_millis(a.cfg.expiry_check_ms.max(100));
            let every = (a.cfg.reconcile_interval_ms / tick.as_millis().max(1) as u64).max(1);
            let mut n: u64 = 0;
            loop {
                let due: Vec<Grant> = a.with_store(|s| s.active()).unwrap_or_default().into_iter().filter(|g| g.expires_at <= now_s()).collect();
                for g in due {
                    if let Err(e) = a.revoke(&g.username, "expired", "breakwater").await {
                        warn!(user = %g.username, error = %e, "expiry failed; retrying");
                    }
                }
                // Accounts left behind by a writer that did not answer, every 5 s or so.
                if n.is_multiple_of((5000 / tick.as_millis().max(1) as u64).max(1)) {
                    a.drop_pending().await;
                }
                if n.is_multiple_of(every) {
                    if let Err(e) = a.reconcile().await {
                        warn!(error = %e, "access reconcile failed");
                    }
                }
                n += 1;
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = shutdown.changed() => break,
                }
            }
        });
    }
}

/// Privileges a temporary user may get: object privileges on one schema, never anything
/// that reaches beyond it (SUPER, FILE, PROCESS, CREATE USER, GRANT OPTION, ALL, RELOAD,
/// SHUTDOWN, replication, ...): a temporary user must not be able to make a permanent one.
const ALLOWED_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE TEMPORARY TABLES",
    "LOCK TABLES",
    "EXECUTE",
    "SHOW VIEW",
    "CREATE",
    "ALTER",
    "INDEX",
    "DROP",
    "CREATE VIEW",
    "TRIGGER",
    "REFERENCES",
    "CREATE ROUTINE",
    "ALTER ROUTINE",
    "EVENT",
    "DELETE HISTORY",
];

/// A role's privilege list: read_only, read_write, or a list from the allow-list.
pub fn role_privileges(role: &str) -> Result<String, String> {
    match role {
        "read_only" => return Ok("SELECT, SHOW VIEW".into()),
        "read_write" => return Ok("SELECT, INSERT, UPDATE, DELETE, CREATE TEMPORARY TABLES, LOCK TABLES, EXECUTE, SHOW VIEW".into()),
        _ => {}
    }
    let mut out = Vec::new();
    for p in role.split(',') {
        let p = p.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_uppercase();
        if p.is_empty() {
            continue;
        }
        if !ALLOWED_PRIVILEGES.contains(&p.as_str()) {
            return Err(format!(
                "privilege {p:?} cannot be given to a temporary user (allowed: read_only, read_write, or a list of {})",
                ALLOWED_PRIVILEGES.join(", ")
            ));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(format!("unknown role {role:?}: read_only, read_write, or a privilege list like \"SELECT, INSERT\""));
    }
    Ok(out.join(", "))
}

/// The schema of a grant: required, a plain name, never a system schema.
pub fn grant_schema(schema: Option<&str>) -> Result<String, String> {
    let s = schema.map(str::trim).filter(|s| !s.is_empty()).ok_or("a schema is required (--schema NAME): temporary access is to one schema")?;
    if s == "*" || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$') || s.len() > 64 {
        return Err(format!("bad schema name {s:?}: one schema by name"));
    }
    if ["mysql", "information_schema", "performance_schema", "sys"].contains(&s.to_ascii_lowercase().as_str()) {
        return Err(format!("schema {s} is a system schema: not for temporary access"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod allow_list_tests {
    #[test]
    fn roles_and_schemas() {
        use super::{grant_schema, role_privileges};
        assert_eq!(role_privileges("read_only").unwrap(), "SELECT, SHOW VIEW");
        assert_eq!(role_privileges("select,  insert").unwrap(), "SELECT, INSERT");
        for bad in ["ALL", "ALL PRIVILEGES", "SUPER", "SELECT, FILE", "PROCESS", "CREATE USER", "GRANT OPTION", "SELECT, RELOAD", "", "SELECT; DROP"] {
            let e = role_privileges(bad).unwrap_err();
            assert!(e.contains("cannot be given") || e.contains("unknown role"), "{bad}: {e}");
        }
        assert!(role_privileges("CREATE USER").unwrap_err().contains("\"CREATE USER\" cannot be given to a temporary user"));
        assert_eq!(grant_schema(Some("sbtest")).unwrap(), "sbtest");
        assert!(grant_schema(None).unwrap_err().contains("a schema is required"));
        assert!(grant_schema(Some("*")).is_err());
        assert!(grant_schema(Some("mysql")).unwrap_err().contains("system schema"));
        assert!(grant_schema(Some("MySQL")).is_err());
        assert!(grant_schema(Some("a`b")).is_err());
    }
}
