//! What the proxy itself sees of one backend server (one per address, shared by its entries
//! in every hostgroup): statements in flight, and their latency as a peak-EWMA (Finagle's and
//! Linkerd's: a slower sample is taken at once, faster ones pull the average down over
//! `DECAY`). Kept apart from the pool (which enforces caps) and from the policy that reads it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Time constant of the latency average.
const DECAY_S: f64 = 5.0;

#[derive(Debug)]
struct Ewma {
    ms: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct BackendLoad {
    pub in_flight: AtomicU64,
    pub statements: AtomicU64,
    /// Share of its hostgroup's statements lately, in millionths (see `view::sample_shares`).
    share_ppm: AtomicU64,
    /// The cost multiplier from the agent's fresh signals (f64 bits; 1.0 without them).
    penalty_bits: AtomicU64,
    ewma: Mutex<Ewma>,
}

impl Default for BackendLoad {
    fn default() -> Self {
        Self { in_flight: AtomicU64::new(0), statements: AtomicU64::new(0), share_ppm: AtomicU64::new(0), penalty_bits: AtomicU64::new(1f64.to_bits()), ewma: Mutex::new(Ewma { ms: 0.0, at: Instant::now() }) }
    }
}

/// A statement running on a backend: counted in flight until dropped; `finish` records its
/// latency.
pub struct InFlight<'a> {
    load: &'a BackendLoad,
    started: Instant,
}

impl InFlight<'_> {
    pub fn finish(self) {
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.load.observe(ms);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BackendLoad {
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.statements.fetch_add(1, Ordering::Relaxed);
        InFlight { load: self, started: Instant::now() }
    }

    fn observe(&self, ms: f64) {
        let Ok(mut e) = self.ewma.lock() else { return };
        let now = Instant::now();
        let dt = now.saturating_duration_since(e.at).as_secs_f64();
        e.at = now;
        if ms > e.ms {
            e.ms = ms; // peak: a slower sample counts at once
        } else {
            let w = (-dt / DECAY_S).exp();
            e.ms = e.ms * w + ms * (1.0 - w);
        }
    }

    pub fn share(&self) -> f64 {
        self.share_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }

    pub fn set_share(&self, share: f64) {
        self.share_ppm.store((share.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// The latency average now (ms); 0 before any statement. It decays while no statement
    /// finishes, so a server that was slow is tried again after a while (Finagle does the
    /// same).
    pub fn latency_ms(&self) -> f64 {
        self.ewma.lock().map(|e| e.ms * (-e.at.elapsed().as_secs_f64() / DECAY_S).exp()).unwrap_or(0.0)
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
        let g = l.start();
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 1);
        drop(g);
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 0);
    }
}
