//! What the proxy itself sees of one backend server (one per address, shared by its entries
//! in every hostgroup), and the gate it keeps on it:
//! - statements in flight and their latency as a peak-EWMA (Finagle's and Linkerd's: a
//!   slower sample is taken at once, faster ones pull the average down over `DECAY_S`);
//! - the adaptive concurrency limit (`limit::Gradient2`) on statements in flight, not
//!   connections: a statement beyond it waits in a bounded queue until one finishes or its
//!   deadline passes, then is shed with an error naming the server, its limit and the queue.
//!   The pool's hard `max_connections` stays in force underneath.
//! - outlier ejection: `EJECT_AFTER` backend failures in a row (the connection lost or
//!   timed out, a connect refused, 1040 or 1053 from the server) take the server out of
//!   adaptive reader choice for 10 s, doubling per ejection up to 60 s. The balancer never
//!   ejects every server of a hostgroup: with all ejected it fails open to the plain
//!   choice (as PgDog does). A server that the health monitor takes back (SHUNNED ->
//!   ONLINE) is un-ejected at once.
//!
//! Kept apart from the pool (which enforces caps) and from the balancer that reads it.

use super::limit::{Gradient2, LimitConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Backend failures in a row that eject a server.
pub const EJECT_AFTER: u32 = 5;

/// Time constant of the latency average.
const DECAY_S: f64 = 5.0;
/// Time constant of its decay while no statement finishes on the server: a server that was
/// slow (one 12 s stall peaks it at 12 s) is probed again within about 20 s, not a minute.
const IDLE_DECAY_S: f64 = 2.5;

/// A monotonic clock in µs for the limiter (which keeps no clock of its own).
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[derive(Debug)]
struct Ewma {
    ms: f64,
    at: Instant,
}

/// How one statement waits for the limiter.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// false: no limit (`[proxy] adaptive_limit = false`); statements are only counted.
    pub enabled: bool,
    pub timeout: Duration,
    pub max_queue: u64,
}

/// A statement refused by the limiter.
#[derive(Debug, Clone, thiserror::Error)]
#[error("concurrency limit {limit} reached ({in_flight} statements in flight, {waiting} waiting{})", if *.queue_full { ", queue full".to_string() } else { format!(", waited {waited_ms} ms") })]
pub struct Shed {
    pub limit: u64,
    pub in_flight: u64,
    pub waiting: u64,
    pub waited_ms: u64,
    pub queue_full: bool,
}

#[derive(Debug)]
pub struct BackendLoad {
    pub in_flight: AtomicU64,
    /// Sum of the start times (µs of `now_us`) of the statements in flight: their mean age.
    started_sum_us: AtomicU64,
    pub statements: AtomicU64,
    /// The limit in force (whole statements), from `limiter` after each window.
    limit: AtomicU64,
    limiter: Mutex<Gradient2>,
    /// Statements waiting for the limit now, and shed so far.
    pub waiting: AtomicU64,
    pub shed: AtomicU64,
    /// Slots under the limit, handed out in arrival order (tokio's semaphore is fair: a
    /// freed slot goes to the longest waiter, never to a newcomer).
    slots: Arc<tokio::sync::Semaphore>,
    /// Slots to take out of circulation as they come back: the limit shrank below what was
    /// out.
    debt: AtomicU64,
    /// Outlier ejection: failures in a row, until when (µs of `now_us`) it is ejected, how
    /// many ejections in a row (the next lasts longer), and ejections so far.
    failures_in_row: AtomicU64,
    ejected_until_us: AtomicU64,
    ejection_level: AtomicU64,
    pub ejections: AtomicU64,
    /// Share of its hostgroup's statements lately, in millionths (see `view::sample_shares`).
    share_ppm: AtomicU64,
    /// The cost multiplier from the agent's fresh signals (f64 bits; 1.0 without them).
    penalty_bits: AtomicU64,
    ewma: Mutex<Ewma>,
}

impl Default for BackendLoad {
    fn default() -> Self {
        Self::new(LimitConfig::default())
    }
}

/// A statement admitted to a backend: counted in flight until dropped (which wakes a
/// waiter); `finish` records its latency for the balancer and the limiter. Dropped without
/// `finish` (the statement failed or was never sent), it teaches nothing.
pub struct InFlight {
    load: Arc<BackendLoad>,
    /// Its slot under the limit (none when the limit does not apply to it).
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    started: Instant,
    started_us: u64,
    /// Statements in flight when it was admitted, itself included.
    at_start: u64,
}

impl InFlight {
    pub fn finish(self) {
        let rtt = self.started.elapsed();
        self.load.observe(rtt.as_secs_f64() * 1e3);
        self.load.succeeded();
        let Ok(mut l) = self.load.limiter.lock() else { return };
        if l.sample(now_us(), rtt.as_micros() as u64, self.at_start as u32) {
            self.load.set_limit(l.limit() as u64);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.started_sum_us.fetch_sub(self.started_us, Ordering::Relaxed);
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(slot) = self.slot.take() {
            if self.load.debt.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |d| d.checked_sub(1)).is_ok() {
                slot.forget(); // the limit shrank: this slot leaves circulation
            }
        }
    }
}

impl BackendLoad {
    pub fn new(cfg: LimitConfig) -> Self {
        let limiter = Gradient2::new(cfg);
        let initial = limiter.limit();
        Self {
            in_flight: AtomicU64::new(0),
            started_sum_us: AtomicU64::new(0),
            statements: AtomicU64::new(0),
            limit: AtomicU64::new(limiter.limit() as u64),
            limiter: Mutex::new(limiter),
            waiting: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            slots: Arc::new(tokio::sync::Semaphore::new(initial)),
            debt: AtomicU64::new(0),
            failures_in_row: AtomicU64::new(0),
            ejected_until_us: AtomicU64::new(0),
            ejection_level: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            share_ppm: AtomicU64::new(0),
            penalty_bits: AtomicU64::new(1f64.to_bits()),
            ewma: Mutex::new(Ewma { ms: 0.0, at: Instant::now() }),
        }
    }

    /// A backend failure (not a SQL error of the statement): ejects the server after
    /// `EJECT_AFTER` in a row. Returns true when this one ejected it.
    pub fn failed(&self) -> bool {
        let n = self.failures_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER as u64 || self.is_ejected() {
            return false;
        }
        let level = self.ejection_level.fetch_add(1, Ordering::Relaxed).min(3);
        let secs = (10u64 << level).min(60);
        self.ejected_until_us.store(now_us() + secs * 1_000_000, Ordering::Relaxed);
        self.failures_in_row.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn succeeded(&self) {
        if self.failures_in_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_row.store(0, Ordering::Relaxed);
        }
        if !self.is_ejected() && self.ejection_level.load(Ordering::Relaxed) != 0 {
            self.ejection_level.store(0, Ordering::Relaxed); // healthy again after its ejection
        }
    }

    /// Back in adaptive choice at once: the server passed its health checks again after
    /// being shunned (as Envoy's successful_active_health_check_uneject_host).
    pub fn uneject(&self) {
        self.ejected_until_us.store(0, Ordering::Relaxed);
        self.failures_in_row.store(0, Ordering::Relaxed);
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_us.load(Ordering::Relaxed);
        until != 0 && now_us() < until
    }

    /// The adaptive limit in force now.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Take a slot under the limit: at once when there is room and nobody waits, else in the
    /// queue (in arrival order) until a statement finishes or the limit grows, or until
    /// `adm.timeout` passes.
    pub async fn admit(self: &Arc<Self>, adm: Admission) -> Result<InFlight, Shed> {
        if !adm.enabled {
            return Ok(self.enter(None));
        }
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(self.enter(Some(slot)));
        }
        let started = Instant::now();
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _queued = Queued(&self.waiting);
        if waiting >= adm.max_queue {
            return Err(self.shed(started, true));
        }
        match tokio::time::timeout(adm.timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(self.enter(Some(slot))),
            _ => Err(self.shed(started, false)),
        }
    }

    /// Whether a statement would be admitted at once.
    pub fn has_room(&self) -> bool {
        self.slots.available_permits() > 0
    }

    /// A new limit from the limiter: slots added at once (paying any debt first), or taken
    /// out (the free ones now, the others as they come back).
    fn set_limit(&self, new: u64) {
        let old = self.limit.swap(new, Ordering::Relaxed);
        if new > old {
            let grow = new - old;
            let mut paid = 0;
            let _ = self.debt.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |d| {
                paid = d.min(grow);
                Some(d - paid)
            });
            self.slots.add_permits((grow - paid) as usize);
        } else if new < old {
            let cut = old - new;
            let freed = self.slots.forget_permits(cut as usize) as u64;
            self.debt.fetch_add(cut - freed, Ordering::Relaxed);
        }
    }

    fn enter(self: &Arc<Self>, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> InFlight {
        let at_start = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.statements.fetch_add(1, Ordering::Relaxed);
        let started_us = now_us();
        self.started_sum_us.fetch_add(started_us, Ordering::Relaxed);
        InFlight { load: self.clone(), slot, started: Instant::now(), started_us, at_start }
    }

    fn shed(&self, started: Instant, queue_full: bool) -> Shed {
        self.shed.fetch_add(1, Ordering::Relaxed);
        Shed {
            limit: self.limit(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed).saturating_sub(1),
            waited_ms: started.elapsed().as_millis() as u64,
            queue_full,
        }
    }

    /// Start over at the limiter's minimum, doubling while latency holds (a backend about to
    /// take a load it never carried).
    pub fn slow_start(&self) {
        if let Ok(mut l) = self.limiter.lock() {
            l.slow_start();
            self.set_limit(l.limit() as u64);
        }
    }

    /// Cut the limit to `factor` of itself now (cascading risk on a promoted primary).
    pub fn clamp(&self, factor: f64) {
        if let Ok(mut l) = self.limiter.lock() {
            l.clamp_to(factor);
            self.set_limit(l.limit() as u64);
        }
    }

    /// One statement's latency (ms) into the peak-EWMA.
    pub(crate) fn observe(&self, ms: f64) {
        let Ok(mut e) = self.ewma.lock() else { return };
        let now = Instant::now();
        let dt = now.saturating_duration_since(e.at).as_secs_f64();
        e.at = now;
        let cur = e.ms * (-dt / IDLE_DECAY_S).exp();
        if ms > cur {
            // Peak: a slower sample counts at once, at most 4× (+1 ms) per sample, so one
            // statement that waited out a stall does not mark the server slow for long
            // (a stall shows in the age of what is in flight instead).
            e.ms = if e.ms == 0.0 { ms } else { ms.min(cur * 4.0 + 1.0) };
        } else {
            let w = (-dt / DECAY_S).exp();
            e.ms = cur * w + ms * (1.0 - w);
        }
    }

    /// The mean age (ms) of the statements in flight now; 0 with none.
    fn in_flight_age_ms(&self) -> f64 {
        let n = self.in_flight.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        let sum = self.started_sum_us.load(Ordering::Relaxed);
        (now_us().saturating_mul(n).saturating_sub(sum)) as f64 / n as f64 / 1e3
    }

    pub fn share(&self) -> f64 {
        self.share_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }

    pub fn set_share(&self, share: f64) {
        self.share_ppm.store((share.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// The latency estimate now (ms): the average, decayed while no statement finishes (so
    /// a server that was slow is tried again after a while, as Finagle does), but never less
    /// than the mean age of the statements still in flight there (a stalled server, whose
    /// statements do not finish, is seen as slow while they wait). 0 before any statement.
    pub fn latency_ms(&self) -> f64 {
        let avg = self.ewma.lock().map(|e| e.ms * (-e.at.elapsed().as_secs_f64() / IDLE_DECAY_S).exp()).unwrap_or(0.0);
        avg.max(self.in_flight_age_ms())
    }

    pub fn penalty(&self) -> f64 {
        f64::from_bits(self.penalty_bits.load(Ordering::Relaxed))
    }

    /// From the agent's fresh signals of the host: 1 + 4 × the share of time throttled by
    /// a CPU limit + 2 × CPU pressure (PSI some avg10); 1 without fresh signals.
    pub fn set_penalty(&self, throttled_ratio: f64, cpu_pressure: f64) {
        let p = 1.0 + 4.0 * throttled_ratio.clamp(0.0, 1.0) + 2.0 * cpu_pressure.clamp(0.0, 1.0);
        self.penalty_bits.store(p.to_bits(), Ordering::Relaxed);
    }
}

/// Leaves the queue when dropped (admitted, shed, or the client went away).
struct Queued<'a>(&'a AtomicU64);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_then_decay() {
        let l = BackendLoad::default();
        l.observe(50.0);
        assert!((l.latency_ms() - 50.0).abs() < 0.1, "a slow sample counts at once");
        std::thread::sleep(std::time::Duration::from_millis(50));
        l.observe(1.0);
        let after = l.latency_ms();
        assert!(after < 50.0 && after > 40.0, "faster samples pull it down gradually: {after}");
        // Without samples it decays (a slow server is tried again after a while).
        l.ewma.lock().unwrap().at -= std::time::Duration::from_secs(10);
        assert!(l.latency_ms() < after * 0.2, "decayed while idle");
        // A far slower sample raises it at most 4× (+1 ms) at a time.
        let l = BackendLoad::default();
        l.observe(2.0);
        l.observe(1000.0);
        assert!((l.latency_ms() - 9.0).abs() < 0.1, "{}", l.latency_ms());
    }

    #[tokio::test]
    async fn a_statement_that_does_not_finish_counts_by_its_age() {
        let l = Arc::new(BackendLoad::default());
        l.observe(1.0);
        let stuck = l.admit(Admission { enabled: true, timeout: Duration::ZERO, max_queue: 0 }).await.expect("room");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(l.latency_ms() >= 190.0, "a stall shows while it lasts: {}", l.latency_ms());
        drop(stuck);
        assert!(l.latency_ms() < 2.0, "and not after: {}", l.latency_ms());
    }

    #[test]
    fn failures_in_a_row_eject_for_longer_each_time() {
        let l = BackendLoad::default();
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!l.failed());
        }
        assert!(!l.is_ejected());
        assert!(l.failed(), "the 5th in a row ejects");
        assert!(l.is_ejected());
        let until = l.ejected_until_us.load(Ordering::Relaxed);
        assert!((9_000_000..=10_000_000).contains(&(until - now_us())), "10 s first");
        // Back after it: the next burst ejects for 20 s.
        l.ejected_until_us.store(1, Ordering::Relaxed);
        assert!(!l.is_ejected());
        for _ in 0..EJECT_AFTER {
            l.failed();
        }
        let until = l.ejected_until_us.load(Ordering::Relaxed);
        assert!((19_000_000..=20_000_000).contains(&(until - now_us())), "20 s next");
        // A success between failures resets the count.
        l.ejected_until_us.store(1, Ordering::Relaxed);
        for _ in 0..EJECT_AFTER - 1 {
            l.failed();
        }
        l.succeeded();
        assert!(!l.failed(), "the run was broken by a success");
        assert_eq!(l.ejections.load(Ordering::Relaxed), 2);
        // Taken back by the health monitor: un-ejected at once.
        for _ in 0..EJECT_AFTER {
            l.failed();
        }
        assert!(l.is_ejected());
        l.uneject();
        assert!(!l.is_ejected());
    }

    fn quick(timeout_ms: u64, max_queue: u64) -> Admission {
        Admission { enabled: true, timeout: Duration::from_millis(timeout_ms), max_queue }
    }

    #[tokio::test]
    async fn a_shrinking_limit_takes_slots_back_as_they_return() {
        let l = Arc::new(BackendLoad::new(LimitConfig { initial: 4.0, min: 1.0, ..LimitConfig::default() }));
        let mut held: Vec<InFlight> = Vec::new();
        for _ in 0..4 {
            held.push(l.admit(quick(10, 10)).await.expect("room"));
        }
        l.set_limit(2);
        held.pop();
        held.pop();
        assert!(!l.has_room(), "the two that came back left circulation");
        held.pop();
        assert!(l.has_room(), "the next one is a slot again");
        l.set_limit(5);
        assert_eq!(l.slots.available_permits(), 4, "grown: 5 slots, one out");
        drop(held);
        assert_eq!(l.slots.available_permits(), 5);
    }

    #[tokio::test]
    async fn newcomers_queue_behind_waiters() {
        let l = Arc::new(BackendLoad::new(LimitConfig { initial: 1.0, min: 1.0, ..LimitConfig::default() }));
        let a = l.admit(quick(50, 10)).await.expect("first");
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.admit(quick(2000, 10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a); // the slot frees; the waiter is woken
        let newcomer = l.admit(quick(50, 10)).await;
        assert!(newcomer.is_err(), "a newcomer does not take the slot the waiter was woken for");
        assert!(waiter.await.unwrap().is_ok(), "the waiter got it");
    }

    #[tokio::test]
    async fn the_limit_holds_waiters_queue_then_are_shed() {
        let cfg = LimitConfig { initial: 2.0, min: 2.0, ..LimitConfig::default() };
        let l = Arc::new(BackendLoad::new(cfg));
        let a = l.admit(quick(50, 10)).await.expect("first");
        let b = l.admit(quick(50, 10)).await.expect("second");
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 2);
        // Third: waits, and gets the slot when one finishes.
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.admit(quick(2000, 10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.waiting.load(Ordering::Relaxed), 1);
        a.finish();
        let c = waiter.await.unwrap().expect("admitted after a release");
        assert_eq!(c.at_start, 2);
        // Fourth: the deadline passes with both slots busy.
        let e = match l.admit(quick(30, 10)).await {
            Err(e) => e,
            Ok(_) => panic!("no room: must be shed"),
        };
        assert!(!e.queue_full && e.limit == 2 && e.waited_ms >= 30, "{e:?}");
        // No queue room at all: shed at once.
        let e = match l.admit(quick(1000, 0)).await {
            Err(e) => e,
            Ok(_) => panic!("no queue room"),
        };
        assert!(e.queue_full, "{e}");
        assert_eq!(l.shed.load(Ordering::Relaxed), 2);
        assert_eq!(l.waiting.load(Ordering::Relaxed), 0, "every waiter left the queue");
        drop((b, c));
        // Disabled: counted, never held.
        let many: Vec<InFlight> = futures_util::future::join_all((0..10).map(|_| l.admit(Admission { enabled: false, ..quick(1, 0) })))
            .await
            .into_iter()
            .map(|r| r.expect("no limit"))
            .collect();
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 10);
        drop(many);
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 0);
    }
}
