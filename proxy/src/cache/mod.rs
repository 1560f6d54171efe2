//! The query cache: result sets of reads kept as the raw packets the server sent, served to
//! later clients without touching a backend.
//!
//! - Key: user, schema, character set, sql_mode, time_zone and the query text (see
//!   [`key`]); entries expire after their rule's cache_ttl and are never served after it
//!   (or after ttl + stale-while-revalidate, for rules that allow stale reads while one
//!   client refreshes).
//! - Memory: entries + keys are bounded by `max_bytes`; eviction is CLOCK (second chance),
//!   an approximation of LRU where a hit only sets a bit: entries are evicted in insertion
//!   order, except that one used since the hand last passed gets another round.
//! - Stampede protection: one client fetches a missing key, the others wait for it
//!   ([`QueryCache::lookup`] returns [`Lookup::Fill`] to exactly one of them).
//! - Invalidation: a write that names tables drops every entry that read them; a write whose
//!   tables cannot be told drops everything. A fill that started before an invalidation of
//!   its tables is not stored.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Build a cache key into `out`: the NUL-separated `parts` (user, schema, character set,
/// collation, sql_mode, time_zone, protocol flags), then the query text.
pub fn key(out: &mut Vec<u8>, parts: &[&[u8]], query: &[u8]) {
    out.clear();
    for part in parts {
        out.extend_from_slice(part);
        out.push(0);
    }
    out.extend_from_slice(query);
}

/// Append more NUL-separated `parts` and a body to a key built by [`key`] (whose body was
/// empty).
pub fn key_append(out: &mut Vec<u8>, parts: &[&[u8]], body: &[u8]) {
    for part in parts {
        out.extend_from_slice(part);
        out.push(0);
    }
    out.extend_from_slice(body);
}

/// How a text query was routed when its result was stored. The query rules decide on user,
/// schema and query text only, and all three are in the key, so under the same rules (the
/// same generation) the same key routes the same way: a hit can skip lexing, digesting and
/// routing the query again (see `QueryCache::hit`).
#[derive(Debug)]
pub struct Route {
    pub rules_generation: u64,
    pub digest: Arc<str>,
    /// db.operation.name of the statement.
    pub operation: &'static str,
}

/// A stored result: its packets (sequence ids from 1) and how many rows it has (what
/// FOUND_ROWS() says after it).
#[derive(Clone, Debug)]
pub struct Cached {
    pub data: Arc<[u8]>,
    pub rows: u64,
}

struct Entry {
    data: Arc<[u8]>,
    rows: u64,
    /// Set for text queries (prepared statements take the full path).
    route: Option<Arc<Route>>,
    tables: Vec<String>,
    expires: Instant,
    stale_until: Instant,
    /// Kept until then for stale-if-error (at least `stale_until`).
    error_until: Instant,
    /// Which insertion this is (its slot in `Inner::ring` carries the same id).
    id: u64,
    /// Used since the CLOCK hand last passed it.
    referenced: bool,
    bytes: usize,
    refreshing: bool,
}

/// A key stored in the hash table's own slot when it is short (most are: user, schema,
/// session settings and a statement), so a hit does not miss the CPU cache twice (table slot,
/// then a separately allocated key) on a large cache. Hashes and compares as its bytes.
enum InlineKey {
    Small { len: u8, bytes: [u8; INLINE_KEY] },
    Large(Box<[u8]>),
}

const INLINE_KEY: usize = 120;

impl InlineKey {
    fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE_KEY {
            let mut bytes = [0u8; INLINE_KEY];
            bytes[..key.len()].copy_from_slice(key);
            InlineKey::Small { len: key.len() as u8, bytes }
        } else {
            InlineKey::Large(key.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            InlineKey::Small { len, bytes } => &bytes[..*len as usize],
            InlineKey::Large(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for InlineKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::hash::Hash for InlineKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state) // the same as the [u8] it borrows as
    }
}

impl PartialEq for InlineKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for InlineKey {}

/// foldhash (randomly seeded per process): hashing the key is on every hit's path, and
/// SipHash over 60-100 byte keys cost several per cent of the proxy's CPU there.
type FastMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

#[derive(Default)]
struct Inner {
    entries: FastMap<InlineKey, Entry>,
    /// CLOCK ring: (entry id, key) in insertion order. Slots of entries removed since are
    /// skipped (their id no longer matches) and compacted away.
    ring: VecDeque<(u64, Box<[u8]>)>,
    tick: u64,
    bytes: usize,
    /// Keys of the entries that read each table (a set: removing one is O(1)).
    by_table: HashMap<String, std::collections::HashSet<Box<[u8]>, foldhash::quality::RandomState>>,
    /// Invalidation generation per table, and for everything.
    table_gen: HashMap<String, u64>,
    all_gen: u64,
    last_write: HashMap<String, Instant>,
    filling: FastMap<Box<[u8]>, Arc<Notify>>,
}

#[derive(Default, Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub entries: usize,
    pub bytes: usize,
    pub max_bytes: usize,
    pub hits: u64,
    pub stale_hits: u64,
    pub stale_if_error_hits: u64,
    pub misses: u64,
    pub stores: u64,
    pub evictions: u64,
    pub invalidations: u64,
    pub fill_waits: u64,
}

pub struct QueryCache {
    inner: Mutex<Inner>,
    pub max_bytes: usize,
    pub max_entry_bytes: usize,
    hits: AtomicU64,
    stale_hits: AtomicU64,
    stale_if_error_hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    fill_waits: AtomicU64,
}

/// What a session should do for a cacheable read.
pub enum Lookup {
    /// Send these packets (sequence ids start at 1).
    Hit(Cached),
    /// Send these (expired, within stale-while-revalidate) packets, then refresh the entry
    /// with the ticket.
    Stale(Cached, Fill),
    /// Fetch from a backend, then `store` (or drop the ticket) — other clients wait.
    Fill(Fill),
    /// Another client is filling: wait on this, then look up again.
    Wait(Arc<Notify>),
}

/// The right to fill one key. Dropping it without storing wakes the waiters. Call
/// [`Fill::begin`] with the query's tables before fetching.
pub struct Fill {
    cache: Arc<QueryCache>,
    key: Box<[u8]>,
    gen_at_start: u64,
    notify: Option<Arc<Notify>>,
    /// An expired entry still within its stale-if-error window: what to answer if no
    /// backend can (see [`QueryCache::served_stale_if_error`]).
    pub fallback: Option<Cached>,
}

impl Fill {
    /// Snapshot the invalidation generation of `tables` (before the backend fetch).
    pub fn begin(&mut self, tables: &[String]) {
        let inner = self.cache.lock();
        self.gen_at_start = gen_of(&inner, tables);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.cache.inner.lock() {
            inner.filling.remove(&self.key);
            if let Some(e) = inner.entries.get_mut(&*self.key) {
                e.refreshing = false;
            }
        }
        if let Some(n) = self.notify.take() {
            n.notify_waiters();
        }
    }
}

impl QueryCache {
    pub fn new(max_bytes: usize, max_entry_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            max_entry_bytes: max_entry_bytes.min(max_bytes),
            hits: AtomicU64::new(0),
            stale_hits: AtomicU64::new(0),
            stale_if_error_hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stores: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            fill_waits: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A fresh entry stored by a text query routed under `rules_generation`, or None, with
    /// no other effect (no fill is started): the caller then takes the full path, which
    /// handles misses, stale entries and waits.
    pub fn hit(&self, key: &[u8], rules_generation: u64) -> Option<(Cached, Arc<Route>)> {
        if rules_generation == 0 {
            return None;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        let e = inner.entries.get_mut(key)?;
        let route = e.route.as_ref().filter(|r| r.rules_generation == rules_generation)?.clone();
        if now >= e.expires {
            return None;
        }
        e.referenced = true;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some((Cached { data: e.data.clone(), rows: e.rows }, route))
    }

    pub fn lookup(self: &Arc<Self>, key: &[u8]) -> Lookup {
        let now = Instant::now();
        let mut inner = self.lock();
        let gen = 0;
        let mut expired = false;
        let mut fallback = None;
        if let Some(e) = inner.entries.get_mut(key) {
            if now < e.expires {
                let data = Cached { data: e.data.clone(), rows: e.rows };
                e.referenced = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(data);
            }
            if now < e.stale_until && !e.refreshing {
                e.refreshing = true;
                let data = Cached { data: e.data.clone(), rows: e.rows };
                self.stale_hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Stale(data, Fill { cache: self.clone(), key: key.into(), gen_at_start: gen, notify: None, fallback: None });
            }
            if now < e.stale_until {
                let data = Cached { data: e.data.clone(), rows: e.rows };
                self.stale_hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(data);
            }
            if now < e.error_until {
                fallback = Some(Cached { data: e.data.clone(), rows: e.rows });
            } else {
                expired = true;
            }
        }
        if expired {
            remove(&mut inner, key);
        }
        if let Some(n) = inner.filling.get(key) {
            self.fill_waits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Wait(n.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let n = Arc::new(Notify::new());
        inner.filling.insert(key.into(), n.clone());
        Lookup::Fill(Fill { cache: self.clone(), key: key.into(), gen_at_start: gen, notify: Some(n), fallback })
    }

    /// A read was answered from an expired entry because no backend could answer it.
    pub fn served_stale_if_error(&self) {
        self.stale_if_error_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Store a fetched result (raw packets, sequence ids from 1) for `ttl` (+ `stale`), kept
    /// `stale_if_error` past its expiry for reads that no backend can answer.
    #[allow(clippy::too_many_arguments)]
    pub fn store(&self, fill: Fill, data: &[u8], rows: u64, route: Option<Arc<Route>>, tables: Vec<String>, ttl: Duration, stale: Duration, stale_if_error: Duration) {
        let bytes = data.len() + fill.key.len() + 64 + tables.iter().map(|t| t.len()).sum::<usize>();
        if bytes > self.max_entry_bytes {
            return;
        }
        {
            let mut inner = self.lock();
            // Invalidated while we were fetching: the result may predate a write.
            if gen_of(&inner, &tables) != fill.gen_at_start {
                return;
            }
            remove(&mut inner, &fill.key);
            // CLOCK: evict from the oldest end; a referenced entry loses its bit and goes
            // round again (so at most two passes).
            while inner.bytes + bytes > self.max_bytes {
                let Some((id, k)) = inner.ring.pop_front() else { break };
                match inner.entries.get_mut(&*k) {
                    Some(e) if e.id == id && e.referenced => {
                        e.referenced = false;
                        inner.ring.push_back((id, k));
                    }
                    Some(e) if e.id == id => {
                        remove(&mut inner, &k);
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {} // a slot of an entry already gone
                }
            }
            if inner.ring.len() > 2 * inner.entries.len() + 1024 {
                let Inner { ring, entries, .. } = &mut *inner;
                ring.retain(|(id, k)| entries.get(&**k).is_some_and(|e| e.id == *id));
            }
            inner.tick += 1;
            let id = inner.tick;
            let now = Instant::now();
            for t in &tables {
                inner.by_table.entry(t.clone()).or_default().insert(fill.key.clone());
            }
            inner.ring.push_back((id, fill.key.clone()));
            inner.bytes += bytes;
            inner.entries.insert(
                InlineKey::new(&fill.key),
                Entry {
                    data: data.into(),
                    rows,
                    route,
                    tables,
                    expires: now + ttl,
                    stale_until: now + ttl + stale,
                    error_until: now + ttl + stale.max(stale_if_error),
                    id,
                    referenced: false,
                    bytes,
                    refreshing: false,
                },
            );
        }
        self.stores.fetch_add(1, Ordering::Relaxed);
        drop(fill);
    }

    /// A write named these tables (None: it could have written anything).
    pub fn invalidate(&self, tables: Option<&[String]>) {
        let mut inner = self.lock();
        let now = Instant::now();
        match tables {
            None => {
                let n = inner.entries.len() as u64;
                inner.entries.clear();
                inner.ring.clear();
                inner.by_table.clear();
                inner.bytes = 0;
                inner.all_gen += 1;
                self.invalidations.fetch_add(n, Ordering::Relaxed);
            }
            Some(tables) => {
                for t in tables {
                    *inner.table_gen.entry(t.clone()).or_default() += 1;
                    inner.last_write.insert(t.clone(), now);
                    let keys = inner.by_table.remove(t).unwrap_or_default();
                    for k in keys {
                        if inner.entries.contains_key(&*k) {
                            remove(&mut inner, &k);
                            self.invalidations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // Bound the write log.
                if inner.last_write.len() > 100_000 {
                    inner.last_write.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
                }
            }
        }
    }

    /// Whether any of `tables` was written through the proxy within `window`.
    pub fn written_within(&self, tables: &[String], window: Duration) -> bool {
        let inner = self.lock();
        let now = Instant::now();
        tables.iter().any(|t| inner.last_write.get(t).is_some_and(|w| now.duration_since(*w) < window))
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        Stats {
            entries: inner.entries.len(),
            bytes: inner.bytes,
            max_bytes: self.max_bytes,
            hits: self.hits.load(Ordering::Relaxed),
            stale_hits: self.stale_hits.load(Ordering::Relaxed),
            stale_if_error_hits: self.stale_if_error_hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stores: self.stores.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            fill_waits: self.fill_waits.load(Ordering::Relaxed),
        }
    }
}

fn gen_of(inner: &Inner, tables: &[String]) -> u64 {
    inner.all_gen + tables.iter().map(|t| inner.table_gen.get(t).copied().unwrap_or(0)).sum::<u64>()
}

/// Remove an entry and its table index slots (its CLOCK slot is skipped when the hand
/// reaches it).
fn remove(inner: &mut Inner, key: &[u8]) {
    if let Some(e) = inner.entries.remove(key) {
        inner.bytes = inner.bytes.saturating_sub(e.bytes);
        for t in &e.tables {
            if let Some(v) = inner.by_table.get_mut(t) {
                v.remove(key);
                if v.is_empty() {
                    inner.by_table.remove(t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &Arc<QueryCache>, k: &[u8]) -> Fill {
        match c.lookup(k) {
            Lookup::Fill(mut f) => {
                f.begin(&["db.t".into()]);
                f
            }
            _ => panic!("expected a fill"),
        }
    }

    #[test]
    fn ttl_lru_invalidation_and_single_fill() {
        let c = QueryCache::new(10_000, 5_000);
        let f = fill(&c, b"k1");
        assert!(matches!(c.lookup(b"k1"), Lookup::Wait(_)), "second client waits");
        c.store(f, b"rows", 1, None, vec!["db.t".into()], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
        assert!(matches!(c.lookup(b"k1"), Lookup::Hit(d) if &*d.data == b"rows"));
        c.invalidate(Some(&["db.t".into()]));
        assert_eq!(c.stats().entries, 0);
        assert!(c.written_within(&["db.t".into()], Duration::from_secs(5)));
        // A fill that straddles an invalidation is not stored.
        let f = fill(&c, b"k2");
        c.invalidate(Some(&["db.t".into()]));
        c.store(f, b"old", 1, None, vec!["db.t".into()], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
        assert_eq!(c.stats().entries, 0);
        // Expired entries are never served.
        let f = fill(&c, b"k3");
        c.store(f, b"x", 1, None, vec!["db.t".into()], Duration::ZERO, Duration::ZERO, Duration::ZERO);
        assert!(matches!(c.lookup(b"k3"), Lookup::Fill(_)));
        // Memory bound: many keys, bytes never above max.
        for i in 0..1000 {
            let k = format!("key{i}");
            let f = fill(&c, k.as_bytes());
            c.store(f, &[0u8; 100], 1, None, vec!["db.t".into()], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
            assert!(c.stats().bytes <= 10_000);
        }
        assert!(c.stats().evictions > 900);
        assert!(matches!(c.lookup(b"key999"), Lookup::Hit(_)), "most recent survives");
        // CLOCK: an entry hit since the hand last passed survives the next evictions; one
        // not hit goes first.
        let hot = c.stats().entries;
        assert!(hot >= 2, "{hot} entries fit");
        let keys: Vec<String> = (1000 - hot..1000).map(|i| format!("key{i}")).collect();
        assert!(matches!(c.lookup(keys[0].as_bytes()), Lookup::Hit(_)), "the oldest is still there");
        let f = fill(&c, b"new");
        c.store(f, &[0u8; 100], 1, None, vec!["db.t".into()], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
        assert!(matches!(c.lookup(keys[0].as_bytes()), Lookup::Hit(_)), "the referenced oldest got a second chance");
        assert!(!matches!(c.lookup(keys[1].as_bytes()), Lookup::Hit(_)), "the unreferenced next oldest was evicted");
    }

    #[test]
    fn stale_while_revalidate() {
        let c = QueryCache::new(10_000, 5_000);
        let f = fill(&c, b"k");
        c.store(f, b"v1", 1, None, vec![], Duration::ZERO, Duration::from_secs(60), Duration::ZERO);
        let Lookup::Stale(d, f) = c.lookup(b"k") else { panic!("stale expected") };
        assert_eq!(&*d.data, b"v1");
        assert!(matches!(c.lookup(b"k"), Lookup::Hit(_)), "others get stale data while one refreshes");
        c.store(f, b"v2", 1, None, vec![], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
        assert!(matches!(c.lookup(b"k"), Lookup::Hit(d) if &*d.data == b"v2"));
    }

    #[test]
    fn stale_if_error_keeps_an_expired_entry_as_a_fallback_only() {
        let c = QueryCache::new(10_000, 5_000);
        let f = fill(&c, b"k");
        c.store(f, b"v1", 1, None, vec!["db.t".into()], Duration::ZERO, Duration::ZERO, Duration::from_secs(60));
        // Expired: a miss that fetches, with the old result to answer if no backend can.
        let Lookup::Fill(f) = c.lookup(b"k") else { panic!("a fill expected") };
        assert_eq!(f.fallback.as_ref().map(|c| &*c.data), Some(&b"v1"[..]));
        drop(f);
        // A write to its table ends it: never served after an invalidation.
        c.invalidate(Some(&["db.t".to_string()]));
        let Lookup::Fill(f) = c.lookup(b"k") else { panic!("a fill expected") };
        assert!(f.fallback.is_none());
        // Without stale-if-error an expired entry is gone.
        c.store(f, b"v2", 1, None, vec![], Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let Lookup::Fill(f) = c.lookup(b"k") else { panic!("a fill expected") };
        assert!(f.fallback.is_none());
    }

    #[test]
    fn fast_hit_only_under_the_same_rules() {
        let c = QueryCache::new(10_000, 5_000);
        let route = Arc::new(Route { rules_generation: 7, digest: Arc::from("SELECT ?"), operation: "SELECT" });
        assert!(c.hit(b"k", 7).is_none(), "nothing stored");
        assert!(matches!(c.lookup(b"k"), Lookup::Fill(_)), "a failed fast hit started no fill");
        let f = fill(&c, b"k2");
        c.store(f, b"rows", 1, Some(route.clone()), vec!["db.t".into()], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
        let (d, r) = c.hit(b"k2", 7).expect("hit under generation 7");
        assert_eq!((&*d.data, d.rows, &*r.digest), (&b"rows"[..], 1, "SELECT ?"));
        assert!(c.hit(b"k2", 8).is_none(), "other rules must route it again");
        assert!(c.hit(b"k2", 0).is_none());
        // Statements (no route) and expired entries take the full path.
        let f = fill(&c, b"k3");
        c.store(f, b"x", 1, None, vec![], Duration::from_secs(60), Duration::ZERO, Duration::ZERO);
        assert!(c.hit(b"k3", 7).is_none());
        let f = fill(&c, b"k4");
        c.store(f, b"x", 1, Some(route), vec![], Duration::ZERO, Duration::from_secs(60), Duration::ZERO);
        assert!(c.hit(b"k4", 7).is_none(), "stale: the full path refreshes it");
        assert!(matches!(c.lookup(b"k4"), Lookup::Stale(..)));
    }
}
