//! Statements the proxy answers or acts on itself: `SELECT LAST_INSERT_ID()` and
//! `CONNECTION_ID()` from the session, `KILL [QUERY|CONNECTION] <session id>`, and the
//! default_query_timeout reaper that kills statements past the limit on their backend.

use super::session::{ClientGone, Session, SqlError};
use crate::protocol::errcode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;
use crate::backend::server::Server;
use crate::runtime::{Proxy, Running, SessionHandle};
use tokio::sync::watch;

impl Session {
    /// KILL [QUERY|CONNECTION] <id> where id is a proxy session id (what CONNECTION_ID()
    /// and the handshake report): the target's running statement is killed on its backend
    /// (KILL QUERY <thread> there), and for CONNECTION the target session is closed.
    pub(super) async fn kill(&mut self, (query_only, id): (bool, Option<u32>)) -> Result<(), ClientGone> {
        let Some(id) = id else {
            let e = SqlError::new(1235, "42000", "Breakwater supports KILL [CONNECTION | QUERY] <id> with a session id from CONNECTION_ID()");
            return self.send_err(self.reply_seq, &e).await;
        };
        let target = self.proxy.sessions.lock().ok().and_then(|m| m.get(&id).cloned());
        let Some(target) = target else {
            return self.send_err(self.reply_seq, &SqlError::new(1094, "HY000", format!("Unknown thread id: {id}"))).await;
        };
        if target.user.lock().map(|u| *u != self.user.name).unwrap_or(true) {
            return self.send_err(self.reply_seq, &SqlError::new(1095, "HY000", format!("You are not owner of thread {id}"))).await;
        }
        let running = target.running.lock().ok().and_then(|r| r.clone());
        if let Some(Running { server, thread, .. }) = running {
            if let Err(e) = kill_query(&self.rt, &server, thread).await {
                let msg = format!("Could not kill the running statement of session {id} on {}: {e}", server.addr);
                return self.send_err(self.reply_seq, &SqlError::new(errcode::CONN_HOST_ERROR, "HY000", msg)).await;
            }
        }
        if !query_only {
            let _ = target.killed.send(true);
            if id == self.id {
                self.send_err(self.reply_seq, &SqlError::new(errcode::CONNECTION_KILLED, "70100", "Connection was killed")).await?;
                return Err(ClientGone);
            }
        }
        self.send_ok().await
    }
}

/// `KILL QUERY <thread>` on a server, over a connection of the monitor user (5 s bound).
pub async fn kill_query(rt: &crate::runtime::Runtime, server: &Server, thread: u32) -> Result<(), String> {
    let m = &rt.cfg.monitor;
    let opts = server.side_opts(&m.username, &m.password, &rt.backend_tls);
    tokio::time::timeout(Duration::from_secs(5), async {
        use mysql_async::prelude::Queryable;
        let mut c = mysql_async::Conn::new(opts).await?;
        c.query_drop(format!("KILL QUERY {thread}")).await?;
        c.disconnect().await
    })
    .await
    .map_err(|_| "timed out after 5 s".to_string())?
    .map_err(|e| e.to_string())
}

/// The default_query_timeout reaper: one task for the whole proxy (no timer per
/// statement on the hot path) looks at every session's running statement a few times a
/// second and kills those past the limit on their backend; the session then tells its
/// client why (error 1969).
pub fn spawn_query_reaper(proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let limit = proxy.runtime().cfg.proxy.default_query_timeout_ms;
            let tick = Duration::from_millis((limit / 4).clamp(50, 250));
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            if limit == 0 {
                continue;
            }
            let limit = Duration::from_millis(limit);
            let handles: Vec<Arc<SessionHandle>> = proxy.sessions.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
            for h in handles {
                let victim = match h.running.lock() {
                    Ok(mut r) => match r.as_mut() {
                        Some(run) if !run.killed && run.started.elapsed() >= limit => {
                            run.killed = true;
                            Some(run.clone())
                        }
                        _ => None,
                    },
                    Err(_) => None,
                };
                let Some(run) = victim else { continue };
                h.timed_out.store(true, Ordering::Relaxed);
                proxy.stats.query_timeouts.fetch_add(1, Ordering::Relaxed);
                let rt = proxy.runtime();
                tokio::spawn(async move {
                    warn!(server = %run.server.addr, thread = run.thread, "statement past default_query_timeout_ms: KILL QUERY");
                    if let Err(e) = kill_query(&rt, &run.server, run.thread).await {
                        warn!(server = %run.server.addr, thread = run.thread, error = %e, "could not kill a statement past default_query_timeout_ms");
                    }
                });
            }
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Local {
    LastInsertId,
    ConnectionId,
}

/// `SELECT LAST_INSERT_ID()` / `@@IDENTITY` / `@@LAST_INSERT_ID` / `CONNECTION_ID()`
/// (optionally `AS alias`): what to answer and the column name. Looks only at short statements.
pub(super) fn local_query(sql: &[u8]) -> Option<(Local, String)> {
    if sql.len() > 80 || !sql.get(..6).is_some_and(|p| p.eq_ignore_ascii_case(b"select")) {
        return None;
    }
    // Every form asked about has "@@" or "ID()": most short SELECTs stop here, unparsed.
    if !sql.windows(2).any(|w| w == b"@@") && !sql.windows(4).any(|w| w.eq_ignore_ascii_case(b"id()")) {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let (expr, alias) = match words.as_slice() {
        [_, e] => (*e, None),
        [_, e, a, name] if a.eq_ignore_ascii_case("as") => (*e, Some(*name)),
        [_, e, name] => (*e, Some(*name)),
        _ => return None,
    };
    let kind = match expr.to_ascii_uppercase().as_str() {
        "LAST_INSERT_ID()" | "@@IDENTITY" | "@@LAST_INSERT_ID" | "@@SESSION.IDENTITY" | "@@SESSION.LAST_INSERT_ID" => Local::LastInsertId,
        "CONNECTION_ID()" => Local::ConnectionId,
        _ => return None,
    };
    Some((kind, alias.unwrap_or(expr).trim_matches(|c| c == '`' || c == '"' || c == '\'').to_string()))
}

/// `KILL [CONNECTION | QUERY] <id>`: (query_only, id). Anything else starting with KILL
/// (KILL USER, KILL ... QUERY ID) gives Some with id None, answered with an error.
pub(super) fn parse_kill(sql: &[u8]) -> Option<(bool, Option<u32>)> {
    use crate::router::lexer::{Lexer, Tok};
    // KILL statements are short: a long text (a bulk INSERT) is never lexed here.
    if sql.len() > 256 {
        return None;
    }
    let toks: Vec<Tok> = Lexer::new(sql).filter(|t| *t != Tok::Punct(b';')).collect();
    match toks.first() {
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"KILL") => {}
        _ => return None,
    }
    let num = |t: Option<&Tok>| match t {
        Some(Tok::Num(n)) => std::str::from_utf8(n).ok().and_then(|s| s.parse().ok()),
        _ => None,
    };
    Some(match toks.get(1) {
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"QUERY") && toks.len() == 3 => (true, num(toks.get(2))),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"CONNECTION") && toks.len() == 3 => (false, num(toks.get(2))),
        Some(Tok::Num(_)) if toks.len() == 2 => (false, num(toks.get(1))),
        _ => (false, None),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn last_insert_id_queries() {
        use super::{local_query as q, Local};
        assert_eq!(q(b"SELECT LAST_INSERT_ID()"), Some((Local::LastInsertId, "LAST_INSERT_ID()".into())));
        assert_eq!(q(b"select last_insert_id() as id;"), Some((Local::LastInsertId, "id".into())));
        assert_eq!(q(b"SELECT @@IDENTITY"), Some((Local::LastInsertId, "@@IDENTITY".into())));
        assert_eq!(q(b"SELECT CONNECTION_ID()"), Some((Local::ConnectionId, "CONNECTION_ID()".into())));
        assert_eq!(q(b"SELECT LAST_INSERT_ID(5)"), None);
        assert_eq!(q(b"SELECT c FROM t WHERE id = 1"), None);
        assert_eq!(super::parse_kill(b"KILL QUERY 12"), Some((true, Some(12))));
        assert_eq!(super::parse_kill(b"kill 7;"), Some((false, Some(7))));
        assert_eq!(super::parse_kill(b"KILL CONNECTION 3"), Some((false, Some(3))));
        assert_eq!(super::parse_kill(b"KILL USER app"), Some((false, None)));
        assert_eq!(super::parse_kill(b"SELECT 1"), None);
    }
}
