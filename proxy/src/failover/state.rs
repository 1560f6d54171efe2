//! The controller's durable state: who the primary is, which servers are fenced, until when
//! automated recoveries are blocked (the cooldown), whether promotion is held (after a
//! cascading risk) or was refused (no fit candidate). Kept in the admin SQLite file
//! (`[admin] db_file`, table `breakwater_failover_state`), written at once on every change,
//! so that a restarted or upgraded proxy neither trusts a returning old primary nor forgets
//! the cooldown (a crash-looping proxy does not reset it). Without a db_file the state lives
//! in memory only, as before, and the start says so.

use rusqlite::{params, Connection};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Persisted {
    pub primary: String,
    pub fenced: BTreeSet<String>,
    /// Unix ms; 0 for none.
    pub cooldown_until_ms: u64,
    pub hold: Option<String>,
    pub refused: bool,
    /// A recovery under way (see `journal`): taken up by the next run.
    pub journal: Option<super::journal::Journal>,
    /// Why writes are refused now (the writer hostgroup's block), for the other proxies.
    pub writer_block: Option<String>,
    /// The reader hostgroup as the controller placed it (the other proxies route reads the
    /// same way; empty in states written before it was kept).
    pub readers: Vec<String>,
}

pub struct Durable {
    /// In a Mutex so that the controller (held across awaits) stays Sync.
    conn: Option<std::sync::Mutex<Connection>>,
    last: Option<Persisted>,
}

impl Durable {
    /// Open (and create) the state table in `db_file`; an empty name keeps state in memory.
    pub fn open(db_file: &str, cluster: &str) -> Result<Self, String> {
        if db_file.is_empty() {
            return Ok(Self { conn: None, last: None });
        }
        let e = |err: rusqlite::Error| format!("failover state in {db_file}: {err}");
        let conn = Connection::open(db_file).map_err(e)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(e)?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS breakwater_failover_state (cluster TEXT PRIMARY KEY, state TEXT NOT NULL, updated_ms INTEGER NOT NULL)")
            .map_err(e)?;
        let mut d = Self { conn: Some(std::sync::Mutex::new(conn)), last: None };
        d.last = d.load(cluster)?;
        Ok(d)
    }

    pub fn is_durable(&self) -> bool {
        self.conn.is_some()
    }

    /// What was saved for `cluster`, if anything.
    pub fn loaded(&self) -> Option<&Persisted> {
        self.last.as_ref()
    }

    fn load(&self, cluster: &str) -> Result<Option<Persisted>, String> {
        let Some(c) = &self.conn else { return Ok(None) };
        let c = c.lock().map_err(|_| "failover state: lock poisoned".to_string())?;
        let text: Option<String> = c
            .query_row("SELECT state FROM breakwater_failover_state WHERE cluster = ?1", [cluster], |r| r.get(0))
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(|e| format!("failover state: {e}"))?;
        match text {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t).map(Some).map_err(|e| format!("failover state of cluster {cluster} is unreadable ({e}): {t}")),
        }
    }

    /// Write `state` when it differs from what was written last.
    pub fn save(&mut self, cluster: &str, state: &Persisted, now_ms: u64) -> Result<(), String> {
        if self.last.as_ref() == Some(state) {
            return Ok(());
        }
        if let Some(c) = &self.conn {
            let c = c.lock().map_err(|_| "failover state: lock poisoned".to_string())?;
            let text = serde_json::to_string(state).map_err(|e| e.to_string())?;
            c.execute(
                "INSERT INTO breakwater_failover_state (cluster, state, updated_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(cluster) DO UPDATE SET state = excluded.state, updated_ms = excluded.updated_ms",
                params![cluster, text, now_ms as i64],
            )
            .map_err(|e| format!("failover state: {e}"))?;
        }
        self.last = Some(state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("bw-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("admin.db");
        let f = f.to_str().unwrap();
        let mut d = Durable::open(f, "lab").unwrap();
        assert!(d.loaded().is_none());
        let s = Persisted {
            primary: "127.0.0.1:3308".into(),
            fenced: ["127.0.0.1:3307".to_string()].into(),
            cooldown_until_ms: 1_800_000_000_000,
            hold: Some("cascading risk".into()),
            refused: false,
            journal: None,
            writer_block: Some("refused".into()),
            readers: vec!["127.0.0.1:3309".into()],
        };
        d.save("lab", &s, 1).unwrap();
        drop(d);
        let d = Durable::open(f, "lab").unwrap();
        assert_eq!(d.loaded(), Some(&s));
        assert!(Durable::open(f, "other").unwrap().loaded().is_none(), "per cluster");
        let mem = Durable::open("", "lab").unwrap();
        assert!(!mem.is_durable() && mem.loaded().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
