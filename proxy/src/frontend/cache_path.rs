//! The query cache's paths through a session: the fast hit (before lexing or routing),
//! lookups with one filler per key, stale-while-revalidate refreshes, cache keys, and the
//! invalidation that follows a write.

use super::session::{ClientGone, Session};
use crate::protocol::caps;
use std::sync::Arc;
use std::time::{Duration, Instant};
use super::executor::Command;
use super::session::ClientStmt;
use crate::cache::{self, Lookup};
use crate::protocol::response::Kind;
use crate::router::classify;
use crate::router::rules::Decision;
use crate::router::tables;

/// What a cached read runs on a miss.
pub enum CacheSrc<'a> {
    /// A COM_QUERY payload.
    Query(&'a [u8]),
    /// A COM_STMT_EXECUTE of a client statement.
    Stmt { stmt: ClientStmt, payload: &'a mut Vec<u8> },
}

impl Session {
    /// A write went through: drop cached reads of its tables, now and, inside a
    /// transaction, again when it ends (a read between the write and COMMIT could have put
    /// the old rows back).
    pub(super) fn invalidate_after_write(&mut self, sql: &[u8], a: &classify::Analysis) {
        use classify::Kind as K;
        let writes = a.multi
            || matches!(a.kind, Some(K::Insert | K::Update | K::Delete | K::Replace | K::Call | K::Other));
        if writes {
            // A statement past the analysis cap: an INSERT/REPLACE names its table first;
            // for anything else the tables cannot be told (all entries go).
            let insert = matches!(a.kind, Some(K::Insert | K::Replace));
            let t = if a.multi || (a.truncated && !insert) {
                None
            } else {
                let cap = self.rt.cfg.proxy.query_digests_max_query_length;
                tables::tables(&sql[..sql.len().min(cap)], self.vars.schema.as_deref())
            };
            // `Other` without tables is DDL-ish text we cannot read (or harmless): drop all.
            self.proxy.cache.invalidate(t.as_deref());
            if self.pins.any() {
                match (&mut self.txn_written, t) {
                    (Some(Some(v)), Some(t)) => v.extend(t),
                    (slot, t) => *slot = Some(t),
                }
            }
        }
        if !self.pins.any() {
            if let Some(t) = self.txn_written.take() {
                self.proxy.cache.invalidate(t.as_deref());
            }
        }
    }

    /// The fast path of a query cache hit: a text query whose exact key was stored under the
    /// query rules in force is answered without lexing, digesting or routing it again (the
    /// rules decide on user, schema and text, all in the key). None, with nothing done, when
    /// the session is not in a cacheable state (pinned: a transaction, locks, ...; a
    /// temporary user, whose statements are audited) or there is no such fresh entry: the
    /// full path runs.
    pub(super) async fn cached_hit(&mut self, buf: &[u8]) -> Option<Result<(), ClientGone>> {
        if self.pins.any() || self.user.temporary {
            return None;
        }
        // Only reads are stored: writes and transaction control (which cannot hit) skip the
        // key and the lookup. A miss here costs nothing else: the full path runs.
        let first = buf.get(1..)?.iter().find(|b| !b.is_ascii_whitespace());
        if !matches!(first, Some(b'S' | b's' | b'W' | b'w' | b'(' | b'/' | b'-' | b'#')) {
            return None;
        }
        let rules = self.rt.rules();
        if !rules.caches() {
            return None;
        }
        let t0 = Instant::now();
        let key = self.cache_key_for(&[], buf.get(1..)?);
        let hit = self.proxy.cache.hit(&key, rules.generation());
        self.cache_key = key;
        let (data, route) = hit?;
        self.push_cached(&data);
        let res = self.flush().await;
        let took = t0.elapsed();
        self.digest.clear();
        self.digest.push_str(&route.digest);
        self.proxy.digests.record(&route.digest, -1, &self.user.name, self.vars.schema.as_deref(), took, 0, false);
        if self.proxy.telemetry.sample() {
            let end = crate::telemetry::now_ns();
            self.proxy.telemetry.record(crate::telemetry::SpanRecord {
                start_ns: end.saturating_sub(took.as_nanos() as u64),
                end_ns: end,
                operation: route.operation,
                schema: self.vars.schema.clone(),
                summary: self.digest.clone(),
                user: self.user.name.clone(),
                hostgroup: -1,
                backend: None,
                cache: "hit",
                error: None,
                rows: 0,
            });
        }
        Some(res)
    }

    /// A read under a caching rule: served from the cache, or fetched once (others wait)
    /// and stored. Returns (result, hostgroup for stats (-1 = cache), rows, failed).
    pub(super) async fn cached_query(&mut self, buf: &[u8], d: &Decision, hg: u32, operation: &'static str) -> (Result<(), ClientGone>, i64, u64, bool) {
        let key = self.cache_key_for(&[], &buf[1..]);
        let cache = self.proxy.cache.clone();
        let r = self.cached_lookup(CacheSrc::Query(buf), d, hg, &cache, &key, Some(operation)).await;
        self.cache_key = key;
        r
    }

    /// Queue a cached result for the client: it is this client's previous statement from now
    /// on (ROW_COUNT() -1, FOUND_ROWS() its row count, no warnings held).
    pub(super) fn push_cached(&mut self, c: &cache::Cached) {
        self.held = None;
        (self.row_count, self.found_rows) = (-1, c.rows);
        self.wr.buf_mut().extend_from_slice(&c.data);
    }

    /// The cache key of a read in this session's context (user, schema, character set,
    /// collation, protocol flags and every session variable the client set: sql_mode,
    /// time_zone, sql_select_limit, group_concat_max_len, character_set_results, …, since
    /// any of them may change a result), then `extra` parts and `body`.
    /// Reuses the session's key buffer: give it back with `self.cache_key = key`.
    pub(super) fn cache_key_for(&mut self, extra: &[&[u8]], body: &[u8]) -> Vec<u8> {
        let mut key = std::mem::take(&mut self.cache_key);
        let eof: &[u8] = if self.caps & caps::DEPRECATE_EOF != 0 { b"okeof" } else { b"" };
        let fixed: [&[u8]; 5] = [
            self.user.name.as_bytes(),
            self.vars.schema.as_deref().unwrap_or("").as_bytes(),
            self.vars.charset.as_bytes(),
            self.vars.collation.as_deref().unwrap_or("").as_bytes(),
            eof,
        ];
        cache::key(&mut key, &fixed, b"");
        for (name, value) in &self.vars.vars {
            key.extend_from_slice(name.as_bytes());
            key.push(b'=');
            key.extend_from_slice(value.as_bytes());
            key.push(0);
        }
        key.push(0);
        cache::key_append(&mut key, extra, body);
        key
    }

    pub(super) async fn cached_lookup(
        &mut self,
        mut src: CacheSrc<'_>,
        d: &Decision,
        hg: u32,
        cache: &Arc<cache::QueryCache>,
        key: &[u8],
        operation: Option<&'static str>,
    ) -> (Result<(), ClientGone>, i64, u64, bool) {
        fn tables_of(src: &CacheSrc<'_>, schema: Option<&str>) -> Vec<String> {
            let sql: &[u8] = match src {
                CacheSrc::Query(b) => b.get(1..).unwrap_or(&[]),
                CacheSrc::Stmt { stmt, .. } => stmt.sql.as_bytes(),
            };
            tables::tables(sql, schema).unwrap_or_default()
        }
        // Text queries record how they were routed, for the fast path of later hits.
        let route = |s: &Self| {
            operation.map(|op| {
                Arc::new(cache::Route { rules_generation: d.rules_generation, digest: Arc::from(s.digest.as_str()), operation: op })
            })
        };
        let wait = Duration::from_millis(self.rt.cfg.cache.fill_wait_ms);
        let ttl = Duration::from_millis(d.cache_ttl_ms);
        let stale = Duration::from_millis(d.cache_stale_ms);
        let stale_if_error = Duration::from_millis(d.cache_stale_if_error_ms);
        let mut waited = false;
        loop {
            match cache.lookup(key) {
                Lookup::Hit(data) => {
                    self.push_cached(&data);
                    return (self.flush().await, -1, 0, false);
                }
                Lookup::Wait(n) if !waited => {
                    waited = true;
                    let _ = tokio::time::timeout(wait, n.notified()).await;
                }
                Lookup::Wait(_) => {
                    // The filler is slow or failed twice: go to the backend without the cache.
                    let (r, rows, err) = self.fetch(&mut src, hg, false).await;
                    return (r, hg as i64, rows, err);
                }
                Lookup::Stale(data, mut fill) => {
                    let tables = tables_of(&src, self.vars.schema.as_deref());
                    fill.begin(&tables);
                    self.push_cached(&data);
                    if let Err(e) = self.flush().await {
                        return (Err(e), -1, 0, false);
                    }
                    // Refresh for the next clients; nothing of it reaches this one.
                    self.wr.start_capture(cache.max_entry_bytes, true);
                    let rows_before = (self.row_count, self.found_rows);
                    let (r, rows, err) = self.fetch(&mut src, hg, true).await;
                    // The refresh is not this client's statement: its diagnostics stay the hit's.
                    (self.row_count, self.found_rows) = rows_before;
                    if let (Some(data), false, Ok(())) = (self.wr.end_capture(), err, &r) {
                        cache.store(fill, &data, rows, route(self), tables, ttl, stale, stale_if_error);
                    }
                    return (r, -1, 0, false);
                }
                Lookup::Fill(mut fill) => {
                    let tables = tables_of(&src, self.vars.schema.as_deref());
                    fill.begin(&tables);
                    // Right after a write to these tables a replica may not have it yet.
                    let window = Duration::from_millis(self.rt.cfg.cache.fill_from_writer_after_write_ms);
                    let hg = if !tables.is_empty() && cache.written_within(&tables, window) { self.user.default_hostgroup } else { hg };
                    self.wr.start_capture(cache.max_entry_bytes, false);
                    // No backend can answer: the expired result, if the rule allows it (what
                    // it writes is captured too, but a failed fetch is never stored).
                    self.stale_if_error = fill.fallback.take();
                    let (r, rows, err) = self.fetch(&mut src, hg, true).await;
                    self.stale_if_error = None;
                    let data = self.wr.end_capture();
                    if let (Some(data), false, Ok(())) = (data, err, &r) {
                        cache.store(fill, &data, rows, route(self), tables, ttl, stale, stale_if_error);
                    }
                    return (r, hg as i64, rows, err);
                }
            }
        }
    }

    /// Run a read on a backend; (result, rows, failed).
    pub(super) async fn fetch(&mut self, src: &mut CacheSrc<'_>, hg: u32, retryable: bool) -> (Result<(), ClientGone>, u64, bool) {
        let (r, effects) = match src {
            CacheSrc::Query(buf) => (self.run(hg, Command::Raw(buf), Kind::ResultSet, retryable).await, Vec::new()),
            CacheSrc::Stmt { stmt, payload } => {
                let cmd = super::prepared::StmtCommand {
                    payload,
                    sql: stmt.sql.clone(),
                    params: stmt.params,
                    known_types: stmt.types.clone(),
                    sent_types: None,
                    execute: true,
                    key: None,
                };
                (self.run(hg, Command::Stmt(cmd), Kind::ResultSet, retryable).await, stmt.effects.clone())
            }
        };
        match r {
            Ok(Some((w, conn))) => {
                let (rows, err) = (w.rows, w.error.is_some());
                if let Some(e) = &w.error {
                    self.last_error = Some(e.code);
                }
                self.finish(&w, conn, &effects);
                (Ok(()), rows, err)
            }
            Ok(None) => (Ok(()), 0, true),
            Err(e) => (Err(e), 0, true),
        }
    }
}
