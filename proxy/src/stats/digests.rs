//! Query digest statistics (ProxySQL's stats_mysql_query_digest): per (digest, hostgroup)
//! the count, total/min/max time, an estimated p99, rows sent, errors, first and last seen.
//!
//! The table is bounded (`max_digests`); when it is full the row with the fewest executions
//! (the oldest among equals) makes room. Digests replace literals, so distinct literals never
//! add rows.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Latency buckets: upper bounds in microseconds, roughly x1.5 apart from 10 us to ~1 h.
fn bucket_of(us: u64) -> usize {
    let mut b = 10u64;
    let mut i = 0;
    while us > b && i < BUCKETS - 1 {
        b = b * 3 / 2 + 1;
        i += 1;
    }
    i
}

fn bucket_upper(i: usize) -> u64 {
    let mut b = 10u64;
    for _ in 0..i {
        b = b * 3 / 2 + 1;
    }
    b
}

const BUCKETS: usize = 50;

#[derive(Clone)]
struct Row {
    digest_text: String,
    schema: String,
    user: String,
    count: u64,
    sum_us: u64,
    min_us: u64,
    max_us: u64,
    rows_sent: u64,
    errors: u64,
    first_seen: u64,
    last_seen: u64,
    hist: [u32; BUCKETS],
}

#[derive(Debug, Clone, Serialize)]
pub struct DigestRow {
    /// -1: answered from the query cache (as ProxySQL shows it).
    pub hostgroup: i64,
    pub schemaname: String,
    pub username: String,
    /// 64-bit hash of the digest text, as hex (ProxySQL's `digest`).
    pub digest: String,
    pub digest_text: String,
    pub count_star: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    pub sum_time_us: u64,
    pub min_time_us: u64,
    pub max_time_us: u64,
    /// Upper bound of the latency bucket holding the 99th percentile.
    pub p99_time_us: u64,
    pub sum_rows_sent: u64,
    pub sum_errors: u64,
}

pub struct Digests {
    max: usize,
    rows: Mutex<HashMap<(u64, i64), Row>>,
    evicted: std::sync::atomic::AtomicU64,
}

/// FNV-1a: stable across runs (unlike std's RandomState), cheap, good enough for a key.
pub fn hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Digests {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), rows: Mutex::new(HashMap::new()), evicted: Default::default() }
    }

    /// Record one execution.
    #[allow(clippy::too_many_arguments)]
    pub fn record(&self, digest_text: &str, hostgroup: i64, user: &str, schema: Option<&str>, took: Duration, rows: u64, error: bool) {
        let h = hash(digest_text);
        let us = took.as_micros() as u64;
        let now = now_s();
        let Ok(mut map) = self.rows.lock() else { return };
        if !map.contains_key(&(h, hostgroup)) && map.len() >= self.max {
            if let Some(k) = map.iter().min_by_key(|(_, r)| (r.count, r.last_seen)).map(|(k, _)| *k) {
                map.remove(&k);
                self.evicted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let r = map.entry((h, hostgroup)).or_insert_with(|| Row {
            digest_text: digest_text.to_string(),
            schema: schema.unwrap_or("").to_string(),
            user: user.to_string(),
            count: 0,
            sum_us: 0,
            min_us: u64::MAX,
            max_us: 0,
            rows_sent: 0,
            errors: 0,
            first_seen: now,
            last_seen: now,
            hist: [0; BUCKETS],
        });
        r.count += 1;
        r.sum_us += us;
        r.min_us = r.min_us.min(us);
        r.max_us = r.max_us.max(us);
        r.rows_sent += rows;
        r.errors += error as u64;
        r.last_seen = now;
        let b = bucket_of(us);
        r.hist[b] = r.hist[b].saturating_add(1);
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.rows.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every row, by total time descending.
    pub fn snapshot(&self) -> Vec<DigestRow> {
        let Ok(map) = self.rows.lock() else { return Vec::new() };
        let mut out: Vec<DigestRow> = map
            .iter()
            .map(|((h, hg), r)| {
                let target = (r.count * 99).div_ceil(100);
                let mut seen = 0u64;
                let mut p99 = r.max_us;
                for (i, n) in r.hist.iter().enumerate() {
                    seen += *n as u64;
                    if seen >= target && target > 0 {
                        p99 = bucket_upper(i).min(r.max_us);
                        break;
                    }
                }
                DigestRow {
                    hostgroup: *hg,
                    schemaname: r.schema.clone(),
                    username: r.user.clone(),
                    digest: format!("0x{h:016X}"),
                    digest_text: r.digest_text.clone(),
                    count_star: r.count,
                    first_seen: r.first_seen,
                    last_seen: r.last_seen,
                    sum_time_us: r.sum_us,
                    min_time_us: if r.count == 0 { 0 } else { r.min_us },
                    max_time_us: r.max_us,
                    p99_time_us: p99,
                    sum_rows_sent: r.rows_sent,
                    sum_errors: r.errors,
                }
            })
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.sum_time_us));
        out
    }

    pub fn reset(&self) {
        if let Ok(mut m) = self.rows.lock() {
            m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counted() {
        let d = Digests::new(3);
        for i in 0..100u64 {
            d.record("SELECT c FROM t WHERE id = ?", 20, "app", Some("s"), Duration::from_micros(100 + i), 1, false);
        }
        d.record("SELECT c FROM t WHERE id = ?", 10, "app", Some("s"), Duration::from_micros(5000), 1, true);
        let rows = d.snapshot();
        assert_eq!(rows.len(), 2);
        let r20 = rows.iter().find(|r| r.hostgroup == 20).unwrap();
        assert_eq!(r20.count_star, 100);
        assert_eq!(r20.min_time_us, 100);
        assert_eq!(r20.max_time_us, 199);
        assert!(r20.p99_time_us >= 190 && r20.p99_time_us <= 199, "{}", r20.p99_time_us);
        assert_eq!(rows.iter().find(|r| r.hostgroup == 10).unwrap().sum_errors, 1);
        for i in 0..10 {
            d.record(&format!("SELECT {i}"), 20, "app", None, Duration::from_micros(1), 0, false);
        }
        assert_eq!(d.len(), 3, "bounded");
        assert!(d.snapshot().iter().any(|r| r.count_star == 100), "the busy digest survives eviction");
    }
}
