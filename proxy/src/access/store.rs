//! Where grants live: a table in the admin SQLite file (`[admin] db_file`), written at once
//! on every change so that a crash loses nothing. Passwords are never stored: only
//! SHA1(pw) (to log in to the servers) and SHA1(SHA1(pw)) (to check clients).

use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Grant {
    pub id: i64,
    /// The name the person logs in to the proxy with.
    pub username: String,
    /// The MariaDB account (marked with the prefix).
    pub account: String,
    pub role: String,
    pub schema: String,
    pub grants: String,
    pub reason: String,
    pub granted_by: String,
    pub granted_at: u64,
    pub expires_at: u64,
    /// active, revoked, expired.
    pub state: String,
    pub ended_at: Option<u64>,
    /// Whether the MariaDB account is gone (an ended grant whose writer was unreachable at
    /// the end keeps false until its account is dropped).
    pub account_dropped: bool,
    #[serde(skip)]
    pub stage1_hex: String,
    #[serde(skip)]
    pub stage2_hex: String,
}

pub struct Store {
    conn: Connection,
    /// Identifies this store's accounts (several proxies may share a cluster, each with its
    /// own store: a reconciler only ever removes accounts carrying its own tag).
    pub tag: String,
}

fn e(err: rusqlite::Error) -> String {
    format!("access store: {err}")
}

impl Store {
    pub fn open(path: &str) -> Result<Self, String> {
        if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        }
        let conn = Connection::open(path).map_err(|err| format!("cannot open access store {path}: {err}"))?;
        // It holds password-equivalents (SHA1 stages of the temporary users' passwords).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|err| format!("cannot make {path} 0600: {err}"))?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(e)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS breakwater_access_grants (
                id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL, account TEXT NOT NULL, role TEXT NOT NULL,
                schema_name TEXT NOT NULL, grants TEXT NOT NULL, reason TEXT NOT NULL, granted_by TEXT NOT NULL,
                granted_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, state TEXT NOT NULL, ended_at INTEGER,
                stage1_hex TEXT NOT NULL, stage2_hex TEXT NOT NULL)",
        )
        .map_err(e)?;
        // Stores made before the column: their ended grants had their accounts dropped.
        let has_dropped: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('breakwater_access_grants') WHERE name = 'account_dropped'")
            .and_then(|mut st| st.exists([]))
            .map_err(e)?;
        if !has_dropped {
            conn.execute_batch("ALTER TABLE breakwater_access_grants ADD COLUMN account_dropped INTEGER NOT NULL DEFAULT 0; UPDATE breakwater_access_grants SET account_dropped = 1 WHERE state <> 'active'")
                .map_err(e)?;
        }
        conn.execute_batch("CREATE TABLE IF NOT EXISTS breakwater_access_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)").map_err(e)?;
        let tag: Option<String> = conn
            .query_row("SELECT value FROM breakwater_access_meta WHERE name = 'store_tag'", [], |r| r.get(0))
            .optional()
            .map_err(e)?;
        let tag = match tag {
            Some(t) => t,
            None => {
                let t = format!("{:04x}", rand::random::<u16>());
                conn.execute("INSERT INTO breakwater_access_meta VALUES ('store_tag', ?1)", [&t]).map_err(e)?;
                t
            }
        };
        Ok(Self { conn, tag })
    }

    pub fn insert(&self, g: &Grant) -> Result<i64, String> {
        self.conn
            .execute(
                "INSERT INTO breakwater_access_grants (username, account, role, schema_name, grants, reason, granted_by, granted_at, expires_at, state, stage1_hex, stage2_hex)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'active', ?10, ?11)",
                params![g.username, g.account, g.role, g.schema, g.grants, g.reason, g.granted_by, g.granted_at as i64, g.expires_at as i64, g.stage1_hex, g.stage2_hex],
            )
            .map_err(e)?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn set_expiry(&self, id: i64, expires_at: u64) -> Result<(), String> {
        self.conn.execute("UPDATE breakwater_access_grants SET expires_at = ?2 WHERE id = ?1", params![id, expires_at as i64]).map_err(e)?;
        Ok(())
    }

    /// The grant ends (its account is dropped separately: `dropped`).
    pub fn end(&self, id: i64, state: &str, at: u64) -> Result<(), String> {
        self.conn
            .execute("UPDATE breakwater_access_grants SET state = ?2, ended_at = ?3, account_dropped = 0 WHERE id = ?1", params![id, state, at as i64])
            .map_err(e)?;
        Ok(())
    }

    pub fn dropped(&self, id: i64) -> Result<(), String> {
        self.conn.execute("UPDATE breakwater_access_grants SET account_dropped = 1 WHERE id = ?1", params![id]).map_err(e)?;
        Ok(())
    }

    /// Ended grants whose account could not be dropped yet.
    pub fn pending_drops(&self) -> Result<Vec<Grant>, String> {
        self.query("WHERE state <> 'active' AND account_dropped = 0")
    }

    fn query(&self, filter: &str) -> Result<Vec<Grant>, String> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT id, username, account, role, schema_name, grants, reason, granted_by, granted_at, expires_at, state, ended_at, stage1_hex, stage2_hex, account_dropped
                 FROM breakwater_access_grants {filter} ORDER BY id"
            ))
            .map_err(e)?;
        let rows = st
            .query_map([], |r| {
                Ok(Grant {
                    id: r.get(0)?,
                    username: r.get(1)?,
                    account: r.get(2)?,
                    role: r.get(3)?,
                    schema: r.get(4)?,
                    grants: r.get(5)?,
                    reason: r.get(6)?,
                    granted_by: r.get(7)?,
                    granted_at: r.get::<_, i64>(8)? as u64,
                    expires_at: r.get::<_, i64>(9)? as u64,
                    state: r.get(10)?,
                    ended_at: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
                    stage1_hex: r.get(12)?,
                    stage2_hex: r.get(13)?,
                    account_dropped: r.get::<_, i64>(14)? != 0,
                })
            })
            .map_err(e)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(e)
    }

    pub fn active(&self) -> Result<Vec<Grant>, String> {
        self.query("WHERE state = 'active'")
    }

    pub fn all(&self) -> Result<Vec<Grant>, String> {
        self.query("")
    }

    pub fn active_by_user(&self, username: &str) -> Result<Option<Grant>, String> {
        let id: Option<i64> = self
            .conn
            .query_row("SELECT id FROM breakwater_access_grants WHERE state = 'active' AND username = ?1", [username], |r| r.get(0))
            .optional()
            .map_err(e)?;
        Ok(match id {
            Some(id) => self.query(&format!("WHERE id = {id}"))?.into_iter().next(),
            None => None,
        })
    }
}
