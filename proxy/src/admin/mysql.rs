//! The MySQL-protocol admin interface (ProxySQL's port 6032): a DBA connects with the
//! mariadb client as the admin user and reads or edits the tables of [`super::tables`]
//! with SQL; `LOAD … TO RUNTIME` applies, `SAVE … TO DISK` persists.

use super::tables::{AdminDb, Module, Outcome};
use crate::failover::Shared;
use crate::frontend::login;
use crate::protocol::packet::{PacketReader, PacketWriter};
use crate::protocol::{auth, cmd, codec, errcode, status};
use crate::runtime::{Proxy, User};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

pub struct AdminSql {
    pub proxy: Arc<Proxy>,
    pub failover: Option<Arc<Shared>>,
    pub db: Mutex<AdminDb>,
    user: Arc<User>,
}

impl AdminSql {
    pub fn new(proxy: Arc<Proxy>, failover: Option<Arc<Shared>>, db: AdminDb) -> Arc<Self> {
        let a = &proxy.rt.cfg.admin;
        let user = Arc::new(User {
            name: a.username.clone(),
            native: Some(auth::native_stage2(a.password.as_bytes())),
            sha2: Some(auth::sha2_stage2(a.password.as_bytes())),
            plugin: auth::NATIVE,
            backend_user: "".into(),
            backend_password: String::new(),
            default_hostgroup: 0,
            default_schema: None,
            temporary: false,
            read_only: false,
        });
        Arc::new(Self { proxy, failover, db: Mutex::new(db), user })
    }
}

pub async fn run(listener: TcpListener, admin: Arc<AdminSql>, mut shutdown: watch::Receiver<bool>) {
    let mut next_id = 1u32;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let admin = admin.clone();
                next_id = next_id.wrapping_add(1);
                let id = next_id;
                tokio::spawn(async move {
                    serve(admin, stream, id, peer.ip().to_string()).await;
                });
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(admin: Arc<AdminSql>, stream: TcpStream, id: u32, peer: String) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut rd = PacketReader::new(r);
    let mut wr = PacketWriter::new(w);
    let user = admin.user.clone();
    let lookup = move |n: &str| (n == user.name).then(|| user.clone());
    let version = "5.5.30 (Breakwater Admin Module)";
    if login::login(&mut rd, &mut wr, version, &lookup, id, &peer).await.is_err() {
        return;
    }
    info!(%peer, "admin session opened");
    let mut buf = Vec::new();
    loop {
        if rd.read_payload(&mut buf, 16 << 20).await.is_err() {
            return;
        }
        let Some(&c) = buf.first() else { return };
        match c {
            cmd::QUIT => return,
            cmd::PING | cmd::INIT_DB => {
                wr.push(1, &codec::ok_packet(0, 0, status::AUTOCOMMIT, 0));
            }
            cmd::QUERY => {
                let sql = String::from_utf8_lossy(&buf[1..]).trim().trim_end_matches(';').trim().to_string();
                let res = if sql.len() > 7 && sql[..7].eq_ignore_ascii_case("ACCESS ") {
                    access_command(&admin, &sql).await
                } else {
                    statement(&admin, &sql)
                };
                match res {
                    Ok(Outcome::Affected(n)) => {
                        wr.push(1, &codec::ok_packet(n, 0, status::AUTOCOMMIT, 0));
                    }
                    Ok(Outcome::Rows(cols, rows)) => result_set(&mut wr, &cols, &rows),
                    Err(e) => {
                        wr.push(1, &codec::err_packet(1105, "HY000", &e));
                    }
                }
            }
            other => {
                wr.push(1, &codec::err_packet(errcode::UNKNOWN_COM, "08S01", &format!("Command {other:#04x} is not supported by the admin interface")));
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
}

/// `ACCESS GRANT USER u TTL 4h SCHEMA s [ROLE r] [REASON 'text']`, `ACCESS REVOKE USER u`,
/// `ACCESS EXTEND USER u TTL 1h`, `ACCESS LIST`.
async fn access_command(admin: &AdminSql, sql: &str) -> Result<Outcome, String> {
    let a = admin.proxy.access.get().ok_or("temporary access is disabled: set [admin] db_file (or --admin-db)")?;
    // Words, with one quoted REASON string.
    let (head, reason) = match sql.find('\'') {
        Some(i) => (&sql[..i], sql[i + 1..].trim_end().trim_end_matches('\'').to_string()),
        None => (sql, String::new()),
    };
    let words: Vec<&str> = head.split_whitespace().collect();
    let get = |k: &str| words.windows(2).find(|w| w[0].eq_ignore_ascii_case(k)).map(|w| w[1].to_string());
    let user = get("USER").ok_or("missing USER <name>")?;
    let by = format!("admin:{}", admin.user.name);
    match words.get(1).map(|w| w.to_ascii_uppercase()).as_deref() {
        Some("GRANT") => {
            let ttl = crate::access::parse_ttl(&get("TTL").ok_or("missing TTL <duration>")?)?;
            let g = a
                .grant(crate::access::GrantRequest { user, ttl_seconds: ttl, role: get("ROLE").unwrap_or_else(|| "read_only".into()), schema: get("SCHEMA"), reason, by })
                .await?;
            Ok(Outcome::Rows(
                vec!["user".into(), "password".into(), "expires_at".into(), "role".into(), "schema".into()],
                vec![vec![Some(g.user), Some(g.password), Some(g.expires_at), Some(g.role), Some(g.schema)]],
            ))
        }
        Some("REVOKE") => a.revoke(&user, "revoked", &by).await.map(|_| Outcome::Affected(1)),
        Some("EXTEND") => {
            let ttl = crate::access::parse_ttl(&get("TTL").ok_or("missing TTL <duration>")?)?;
            a.extend(&user, ttl, &by).await.map(|_| Outcome::Affected(1))
        }
        _ => Err("usage: ACCESS GRANT USER <name> TTL 4h SCHEMA s [ROLE read_only] [REASON 'why'] | ACCESS REVOKE USER <name> | ACCESS EXTEND USER <name> TTL 1h".into()),
    }
}

/// Admin commands (LOAD/SAVE, client chatter) first, then SQL on the tables.
fn statement(admin: &AdminSql, sql: &str) -> Result<Outcome, String> {
    let upper = sql.to_ascii_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    let mut db = admin.db.lock().map_err(|_| "admin database lock poisoned".to_string())?;
    if matches!(words.first(), Some(&"LOAD") | Some(&"SAVE")) {
        let module = match words.get(1..3) {
            Some(["MYSQL", "SERVERS"]) => Module::Servers,
            Some(["MYSQL", "USERS"]) => Module::Users,
            Some(["MYSQL", "QUERY"]) if words.get(3) == Some(&"RULES") => Module::QueryRules,
            _ => return Err(format!("unknown admin command: {sql} (LOAD|SAVE MYSQL SERVERS|USERS|QUERY RULES TO|FROM RUNTIME|DISK|MEMORY)")),
        };
        let tail: Vec<&str> = words.iter().rev().take(2).rev().copied().collect();
        if words[0] == "SAVE" && tail.as_slice() == ["FROM", "RUNTIME"] && module == Module::Servers {
            db.refresh(&admin.proxy, admin.failover.as_deref())?;
        }
        let msg = match (words[0], tail.as_slice()) {
            ("LOAD", ["TO", "RUNTIME"]) | ("LOAD", ["FROM", "MEMORY"]) => db.load_to_runtime(&admin.proxy, module)?,
            ("SAVE", ["TO", "DISK"]) | ("SAVE", ["FROM", "MEMORY"]) => db.save_to_disk(module)?,
            ("LOAD", ["FROM", "DISK"]) | ("LOAD", ["TO", "MEMORY"]) => db.load_from_disk(module)?,
            ("SAVE", ["FROM", "RUNTIME"]) | ("SAVE", ["TO", "MEMORY"]) => db.save_from_runtime(module)?,
            _ => return Err(format!("unknown admin command: {sql}")),
        };
        info!(command = %sql, result = %msg, "admin command");
        return Ok(Outcome::Affected(0));
    }
    if upper.starts_with("SELECT @@") || upper.starts_with("SELECT DATABASE()") || upper.starts_with("SELECT USER()") {
        // Client chatter (mariadb, connectors): `SELECT @@a, @@b [LIMIT 1]`.
        let body = sql[6..].trim();
        let body = match body.to_ascii_uppercase().rfind(" LIMIT ") {
            Some(i) => &body[..i],
            None => body,
        };
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for item in body.split(',').map(str::trim) {
            let (expr, alias) = match item.to_ascii_uppercase().find(" AS ") {
                Some(i) => (&item[..i], item[i + 4..].trim().to_string()),
                None => (item, item.to_string()),
            };
            let name = expr.trim().trim_start_matches("@@").to_ascii_lowercase();
            let name = name.rsplit('.').next().unwrap_or("");
            let v = match name {
                "version_comment" => Some("Breakwater admin".to_string()),
                "version" => Some("5.5.30".into()),
                "max_allowed_packet" => Some("16777216".into()),
                "wait_timeout" | "interactive_timeout" => Some("28800".into()),
                "autocommit" => Some("1".into()),
                "database()" => Some("main".into()),
                "user()" => Some(admin.user.name.clone()),
                _ => None,
            };
            cols.push(alias);
            vals.push(v);
        }
        return Ok(Outcome::Rows(cols, vec![vals]));
    }
    if matches!(words.first(), Some(&"SET") | Some(&"USE") | Some(&"BEGIN") | Some(&"COMMIT")) {
        return Ok(Outcome::Affected(0));
    }
    if let Some(why) = outside_own_tables(&upper) {
        return Err(why);
    }
    if upper == "SHOW DATABASES" {
        return Ok(Outcome::Rows(vec!["name".into()], vec![vec![Some("main".into())], vec![Some("disk".into())], vec![Some("stats".into())]]));
    }
    let sql = if upper == "SHOW TABLES" { "SELECT name AS tables FROM sqlite_master WHERE type = 'table' ORDER BY name" } else { sql };
    db.refresh(&admin.proxy, admin.failover.as_deref())?;
    if let Some(a) = admin.proxy.access.get() {
        db.refresh_access(&a.list()?)?;
    }
    db.execute(sql)
}

/// Why a statement reaches beyond the admin's own tables, if it does: the SQLite behind
/// them must not be driven (ATTACH, PRAGMA, VACUUM INTO, extension and file functions,
/// sqlite_* tables), and the attached disk file also holds the temporary-access store, whose
/// password-equivalents are never to be read and whose expiry changes only through the
/// access API (audited): of `disk.`, only the saved mysql_* tables are reachable, and the
/// grants view is read-only.
fn outside_own_tables(upper: &str) -> Option<String> {
    // Quotes and brackets around identifiers do not hide a name from this scan.
    let flat: String = upper.chars().map(|c| if matches!(c, '"' | '`' | '[' | ']') { ' ' } else { c }).collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ").replace(" .", ".").replace(". ", ".");
    let words: Vec<&str> = flat.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).filter(|w| !w.is_empty()).collect();
    for w in &words {
        if ["ATTACH", "DETACH", "PRAGMA", "VACUUM", "REINDEX", "LOAD_EXTENSION", "READFILE", "WRITEFILE", "EDIT", "FTS3_TOKENIZER"].contains(w)
            || w.starts_with("SQLITE_")
            || w.contains(".SQLITE_")
        {
            return Some(format!("the admin interface does not run {w}: only its own tables (SHOW TABLES) are reachable"));
        }
        if let Some(table) = w.strip_prefix("DISK.") {
            if !["MYSQL_SERVERS", "MYSQL_USERS", "MYSQL_QUERY_RULES"].contains(&table) {
                return Some(format!("disk.{} is not an admin table (disk holds mysql_servers, mysql_users, mysql_query_rules)", table.to_ascii_lowercase()));
            }
        }
    }
    let writes = matches!(words.first(), Some(&("INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "DROP" | "ALTER" | "CREATE")));
    if writes && words.iter().any(|w| w.contains("BREAKWATER_ACCESS")) {
        return Some("breakwater_access_grants is read-only here: temporary access changes only through `breakwater-proxy access` (audited)".into());
    }
    None
}

/// A text-protocol result set with every column a string.
fn result_set<W: tokio::io::AsyncWrite + Unpin>(wr: &mut PacketWriter<W>, cols: &[String], rows: &[Vec<Option<String>>]) {
    let cols: Vec<codec::Column> = cols.iter().map(|c| codec::Column { name: c, kind: codec::TYPE_VAR_STRING, flags: 0 }).collect();
    codec::push_text_result_set(wr, 1, &cols, rows, status::AUTOCOMMIT);
}

#[cfg(test)]
mod guard_tests {
    use super::outside_own_tables as g;

    #[test]
    fn only_its_own_tables() {
        for ok in [
            "SELECT * FROM MYSQL_SERVERS",
            "SELECT * FROM DISK.MYSQL_QUERY_RULES",
            "UPDATE MYSQL_SERVERS SET WEIGHT = 2",
            "SELECT USERNAME, EXPIRES_AT FROM BREAKWATER_ACCESS_GRANTS",
            "SHOW TABLES",
        ] {
            assert_eq!(g(ok), None, "{ok}");
        }
        for bad in [
            "ATTACH DATABASE '/tmp/x' AS X",
            "PRAGMA DATABASE_LIST",
            "SELECT * FROM SQLITE_MASTER",
            "SELECT * FROM DISK.BREAKWATER_ACCESS_GRANTS",
            "SELECT STAGE1_HEX FROM \"DISK\".\"BREAKWATER_ACCESS_GRANTS\"",
            "SELECT * FROM DISK . BREAKWATER_ACCESS_META",
            "UPDATE BREAKWATER_ACCESS_GRANTS SET EXPIRES_AT = 9999999999",
            "VACUUM INTO '/tmp/copy.db'",
            "SELECT LOAD_EXTENSION('X')",
        ] {
            assert!(g(bad).is_some(), "{bad}");
        }
    }
}
