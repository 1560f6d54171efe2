//! Server-side prepared statements over multiplexed connections.
//!
//! The client sees statement ids chosen by the proxy. Each backend connection keeps the
//! statements prepared on it by SQL text; when a client executes on a connection that has
//! not seen the statement, the proxy prepares it there first, transparently, and rewrites
//! the statement id (and re-sends parameter types when the client relies on earlier ones).

use super::cache_path::CacheSrc;
use super::executor::Command;
use super::session::{ClientGone, ClientStmt, Session, SqlError};
use crate::backend::conn::BackendError;
use crate::backend::pool::PooledConn;
use crate::protocol::response::Kind;
use crate::protocol::{errcode, status};
use crate::router::classify::{self, Effect, PinReason};
use crate::router::digest;
use std::sync::Arc;

/// COM_STMT_EXECUTE / FETCH / RESET as sent to one backend connection.
pub struct StmtCommand<'a> {
    pub(super) payload: &'a mut Vec<u8>,
    pub(super) sql: Arc<str>,
    pub(super) params: u16,
    /// Types known from an earlier execute of this client statement.
    pub(super) known_types: Option<Vec<u8>>,
    /// Types this command sent (to remember on the connection).
    pub(super) sent_types: Option<Vec<u8>>,
    pub(super) execute: bool,
    /// The statement's key on the connection it runs on, made once per command.
    pub(super) key: Option<crate::backend::conn::StmtKey>,
}

impl<'a> StmtCommand<'a> {
    pub async fn build(&mut self, conn: &mut PooledConn) -> Result<&[u8], BackendError> {
        let key = conn.stmt_key(&self.sql);
        let id = if self.execute {
            conn.ensure_prepared_key(&key).await?
        } else {
            // FETCH and RESET act on the statement the client executed on this (pinned)
            // connection, even if a SET since then changed the connection's context.
            let same_text = || conn.stmts.iter().find(|(k, _)| k.sql == self.sql).map(|(_, s)| s);
            match conn.stmts.get(&key).or_else(same_text) {
                Some(s) => s.id,
                None => return Err(BackendError::Protocol(format!("statement not prepared on {}", conn.addr))),
            }
        };
        let p = &mut *self.payload;
        if p.len() < 5 {
            return Err(BackendError::Protocol("short statement command".into()));
        }
        p[1..5].copy_from_slice(&id.to_le_bytes());
        self.sent_types = None;
        if self.execute && self.params > 0 {
            let n = self.params as usize;
            let flag_pos = 10 + n.div_ceil(8);
            if let Some(&flag) = p.get(flag_pos) {
                if flag == 1 {
                    self.sent_types = p.get(flag_pos + 1..flag_pos + 1 + 2 * n).map(|t| t.to_vec());
                } else if let Some(types) = &self.known_types {
                    let conn_has = conn.stmts.get(&key).and_then(|s| s.types.as_deref()) == Some(types.as_slice());
                    if !conn_has {
                        p[flag_pos] = 1;
                        p.splice(flag_pos + 1..flag_pos + 1, types.iter().copied());
                        self.sent_types = Some(types.clone());
                    }
                }
            }
        }
        self.key = Some(key);
        Ok(&self.payload[..])
    }

    pub fn after(&mut self, conn: &mut PooledConn) {
        if let (Some(t), Some(key)) = (self.sent_types.take(), self.key.take()) {
            if let Some(s) = conn.stmts.get_mut(&key) {
                s.types = Some(t);
            }
        }
    }
}

fn stmt_id(buf: &[u8]) -> Option<u32> {
    buf.get(1..5).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn unknown_stmt(id: u32, func: &str) -> SqlError {
    SqlError::new(
        errcode::UNKNOWN_STMT_HANDLER,
        "HY000",
        format!("Unknown prepared statement handler ({id}) given to {func}"),
    )
}

impl Session {
    pub(super) async fn com_stmt_prepare(&mut self) -> Result<(), ClientGone> {
        let buf = std::mem::take(&mut self.buf);
        let sql_bytes = &buf[1..];
        let a = classify::analyze_capped(sql_bytes, self.rt.cfg.proxy.query_digests_max_query_length);
        let d = self.route(sql_bytes, &a);
        let hg = d.hostgroup.unwrap_or(self.user.default_hostgroup);
        let sql: Arc<str> = String::from_utf8_lossy(sql_bytes).into();
        let client_id = self.next_stmt_id;
        // A temporary user's prepared statements are audited like its queries: the prepare
        // with the statement's digest, then every execute.
        let audit_digest: Option<Arc<str>> = self.user.temporary.then(|| {
            let cap = self.rt.cfg.proxy.query_digests_max_query_length;
            digest::digest_into(&sql_bytes[..sql_bytes.len().min(cap)], &mut self.digest);
            self.digest.as_str().into()
        });
        if let Some(d) = &audit_digest {
            if let Some(a) = self.proxy.access.get() {
                a.audit.event("prepare", &self.user.name, &[("digest", d), ("statement", &client_id.to_string()), ("session", &self.id.to_string())]);
            }
        }
        let r = self.run(hg, Command::Prepare(&buf, client_id), Kind::Prepare, true).await;
        self.buf = buf;
        let Some((w, mut conn)) = r? else { return Ok(()) };
        if let Some(ok) = w.prepare {
            conn.adopt_prepared(sql.clone(), ok.statement_id, ok.params);
            self.next_stmt_id = self.next_stmt_id.wrapping_add(1).max(1);
            self.stmts.insert(
                client_id,
                ClientStmt {
                    sql,
                    params: ok.params,
                    hostgroup: hg,
                    read_only: a.read_only && !a.multi,
                    effects: a.effects,
                    types: None,
                    cache: (d.cache_ttl_ms > 0 && a.last_insert_id == classify::LastInsertId::No && !a.diagnostics).then_some(d),
                    last_insert_id: a.last_insert_id,
                    calc_found_rows: a.calc_found_rows,
                    audit_digest,
                },
            );
        }
        self.finish(&w, conn, &[]);
        Ok(())
    }

    pub(super) async fn com_stmt_execute(&mut self) -> Result<(), ClientGone> {
        let Some(id) = stmt_id(&self.buf) else {
            return self.send_err(self.reply_seq, &SqlError::new(errcode::MALFORMED_PACKET, "HY000", "Malformed COM_STMT_EXECUTE")).await;
        };
        let Some(stmt) = self.stmts.get(&id).cloned() else {
            return self.send_err(self.reply_seq, &unknown_stmt(id, "mysqld_stmt_execute")).await;
        };
        if let Some(d) = &stmt.audit_digest {
            if let Some(a) = self.proxy.access.get() {
                a.audit.event("execute", &self.user.name, &[("digest", d), ("statement", &id.to_string()), ("session", &self.id.to_string())]);
            }
        }
        let cursor = self.buf.get(5).is_some_and(|f| f & 0x07 != 0);
        let mut buf = std::mem::take(&mut self.buf);
        // Remember types the client sends, for later executes that omit them.
        let n = stmt.params as usize;
        let flag_pos = 10 + n.div_ceil(8);
        let mut client_types = None;
        if n > 0 && buf.get(flag_pos) == Some(&1) {
            client_types = buf.get(flag_pos + 1..flag_pos + 1 + 2 * n).map(|t| t.to_vec());
        }
        let retryable = stmt.read_only && !self.pins.any() && !cursor;
        if let (Some(d), true) = (stmt.cache, retryable) {
            // A cacheable read: the key holds the statement, the parameter types in force and
            // the bound values (everything after the statement id, flags and iteration count).
            let types = client_types.clone().or_else(|| stmt.types.clone()).unwrap_or_default();
            let key = self.cache_key_for(&[b"PS", stmt.sql.as_bytes(), &types], buf.get(10..).unwrap_or(&[]));
            let cache = self.proxy.cache.clone();
            let src = CacheSrc::Stmt { stmt: stmt.clone(), payload: &mut buf };
            let (r, _, _, _) = self.cached_lookup(src, &d, stmt.hostgroup, &cache, &key, None).await;
            self.cache_key = key;
            self.buf = buf;
            if let Some(t) = client_types {
                if let Some(s) = self.stmts.get_mut(&id) {
                    s.types = Some(t);
                }
            }
            return r;
        }
        let cmd = StmtCommand {
            payload: &mut buf,
            sql: stmt.sql.clone(),
            params: stmt.params,
            known_types: stmt.types.clone(),
            sent_types: None,
            execute: true,
            key: None,
        };
        self.sync_lid = (stmt.last_insert_id == classify::LastInsertId::Reads).then_some(self.last_insert_id);
        self.calc_found_rows = stmt.calc_found_rows;
        // A cursor pins the client to the connection that holds it: it is opened on the
        // user's default (writer) hostgroup, so the writes that may follow in the same
        // session never land on a reader.
        let hg = if cursor { self.user.default_hostgroup } else { stmt.hostgroup };
        let r = self.run(hg, Command::Stmt(cmd), Kind::ResultSet, retryable).await;
        self.sync_lid = None;
        self.buf = buf;
        if let Some(t) = client_types {
            if let Some(s) = self.stmts.get_mut(&id) {
                s.types = Some(t);
            }
        }
        let Some((w, conn)) = r? else { return Ok(()) };
        let mut effects = stmt.effects.clone();
        self.pins.long_data = false;
        if cursor && w.status.is_some_and(|s| s & status::CURSOR_EXISTS != 0) {
            effects.push(Effect::Pin(PinReason::Cursor));
            self.cursor_stmt = Some(id);
        }
        self.finish(&w, conn, &effects);
        if !stmt.read_only && self.rt.rules().caches() {
            let a = classify::analyze(stmt.sql.as_bytes());
            self.invalidate_after_write(stmt.sql.as_bytes(), &a);
        }
        Ok(())
    }

    pub(super) async fn com_stmt_fetch(&mut self) -> Result<(), ClientGone> {
        let id = stmt_id(&self.buf).unwrap_or(0);
        let stmt = match (self.stmts.get(&id).cloned(), self.pinned.is_some() && self.cursor_stmt == Some(id)) {
            (Some(s), true) => s,
            _ => return self.send_err(self.reply_seq, &unknown_stmt(id, "mysqld_stmt_fetch")).await,
        };
        let mut buf = std::mem::take(&mut self.buf);
        let cmd = StmtCommand { payload: &mut buf, sql: stmt.sql, params: 0, known_types: None, sent_types: None, execute: false, key: None };
        let r = self.run(stmt.hostgroup, Command::Stmt(cmd), Kind::Fetch, false).await;
        self.buf = buf;
        if let Some((w, conn)) = r? {
            self.finish(&w, conn, &[]);
        }
        Ok(())
    }

    pub(super) async fn com_stmt_send_long_data(&mut self) -> Result<(), ClientGone> {
        // No response is ever sent for this command; failures surface at EXECUTE.
        let Some(id) = stmt_id(&self.buf) else { return Ok(()) };
        let Some(stmt) = self.stmts.get(&id).cloned() else { return Ok(()) };
        // Sending long data is not a statement: its slot is released at once.
        let mut conn = match self.acquire(stmt.hostgroup, None, stmt.read_only).await {
            Ok((c, _slot)) => c,
            Err(e) => {
                tracing::warn!(session = self.id, error = %e.message, "long data dropped: no backend");
                return Ok(());
            }
        };
        let res = async {
            let extra = crate::backend::conn::SyncExtra { multi_statements: self.multi_statements, last_insert_id: None };
            conn.sync(&self.vars, &extra).await?;
            let bid = conn.ensure_prepared(&stmt.sql).await?;
            let mut p = self.buf.clone();
            p[1..5].copy_from_slice(&bid.to_le_bytes());
            conn.send_no_reply(&p).await
        }
        .await;
        match res {
            Ok(()) => {
                // The server holds the data for this statement until an EXECUTE or RESET:
                // the connection must not serve anyone else before then.
                conn.dirty = true;
                self.pins.add(PinReason::LongData);
                self.pinned = Some(conn);
            }
            Err(e) => {
                tracing::warn!(session = self.id, error = %e, "long data could not be sent");
                if !conn.broken {
                    self.keep_or_release(conn);
                } else {
                    conn.discard();
                }
            }
        }
        Ok(())
    }

    pub(super) fn com_stmt_close(&mut self) {
        // No response. The backend statement stays cached on its connections for reuse.
        if let Some(id) = stmt_id(&self.buf) {
            self.stmts.remove(&id);
            if self.cursor_stmt == Some(id) {
                self.cursor_stmt = None;
                self.pins.cursor = false;
                self.release_if_unpinned();
            }
            if self.pins.long_data {
                // Long data sent and never executed: the connection stays marked dirty, so
                // it is closed (or reset) rather than handed to another client with the
                // data still attached to its statement.
                self.pins.long_data = false;
                self.release_if_unpinned();
            }
        }
    }

    pub(super) async fn com_stmt_reset(&mut self) -> Result<(), ClientGone> {
        let id = stmt_id(&self.buf).unwrap_or(0);
        let Some(stmt) = self.stmts.get(&id).cloned() else {
            return self.send_err(self.reply_seq, &unknown_stmt(id, "mysqld_stmt_reset")).await;
        };
        let on_pinned = self.pinned.as_ref().is_some_and(|c| c.stmt(&stmt.sql).is_some());
        self.pins.long_data = false;
        if self.cursor_stmt == Some(id) {
            self.cursor_stmt = None;
            self.pins.cursor = false;
        }
        if !on_pinned {
            self.release_if_unpinned();
            return self.send_ok().await;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let cmd = StmtCommand { payload: &mut buf, sql: stmt.sql, params: 0, known_types: None, sent_types: None, execute: false, key: None };
        let r = self.run(stmt.hostgroup, Command::Stmt(cmd), Kind::Single, false).await;
        self.buf = buf;
        if let Some((w, conn)) = r? {
            self.finish(&w, conn, &[]);
        }
        Ok(())
    }

    fn release_if_unpinned(&mut self) {
        if !self.pins.any() {
            self.pinned.take();
        }
    }
}
