//! An adaptive concurrency limit for one backend: how many statements may run on it at once.
//! A pure state machine fed by observations (no I/O, no clock of its own), in the family of
//! Netflix concurrency-limits' `Gradient2Limit` and Envoy's adaptive_concurrency filter:
//!
//! - Samples (statement latency, statements in flight when it started) are gathered in
//!   windows; a window's median latency (of its first `SAMPLES_KEPT` samples) is the
//!   short-term RTT. The median, not the mean: a database serves statements of very
//!   different cost, and one long report in a window of point reads says nothing about
//!   overload, while most statements slowing down does.
//! - The long-term RTT is an exponential average of the windows (about `long_window`
//!   windows), pulled down when the short RTT falls well below it (recovery from a past
//!   overload should not keep the limit high for minutes).
//! - gradient = clamp(tolerance × long / short, 0.5, 1): 1 while latency holds, smaller as
//!   it rises. new = limit × gradient + queue allowance (√limit), smoothed. The limit only
//!   grows when the backend is actually used near it (a mostly idle backend proves
//!   nothing), and stays within [min, max].
//! - A slow start (part 2 of the adaptive loop: a freshly promoted primary) begins at
//!   `min` and doubles per good window until latency rises.

#[derive(Debug, Clone)]
pub struct LimitConfig {
    pub initial: f64,
    pub min: f64,
    pub max: f64,
    /// Latency may rise this much over the long-term RTT before the limit shrinks.
    pub tolerance: f64,
    /// Weight of a new window in the smoothed limit.
    pub smoothing: f64,
    /// Windows in the long-term average.
    pub long_window: f64,
    /// A window closes after this many samples …
    pub window_samples: u32,
    /// … or this long (µs), whichever is later, with at least one sample.
    pub window_us: u64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self { initial: 20.0, min: 2.0, max: 200.0, tolerance: 1.5, smoothing: 0.2, long_window: 600.0, window_samples: 10, window_us: 100_000 }
    }
}

/// Samples kept per window for its median.
const SAMPLES_KEPT: usize = 64;

#[derive(Debug, Clone)]
pub struct Gradient2 {
    cfg: LimitConfig,
    limit: f64,
    long_rtt_us: f64,
    long_n: f64,
    /// The window being gathered.
    w_started_us: u64,
    w_samples: [u32; SAMPLES_KEPT],
    w_n: u32,
    w_max_in_flight: u32,
    /// Slow start: doubling while latency holds.
    slow_start: bool,
    /// The last window's median latency and gradient (for the health view).
    pub last_rtt_us: f64,
    pub last_gradient: f64,
}

impl Gradient2 {
    pub fn new(cfg: LimitConfig) -> Self {
        let limit = cfg.initial.clamp(cfg.min, cfg.max);
        Self {
            cfg,
            limit,
            long_rtt_us: 0.0,
            long_n: 0.0,
            w_started_us: 0,
            w_samples: [0; SAMPLES_KEPT],
            w_n: 0,
            w_max_in_flight: 0,
            slow_start: false,
            last_rtt_us: 0.0,
            last_gradient: 1.0,
        }
    }

    /// The whole number of statements allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit.floor().max(1.0) as usize
    }

    pub fn config(&self) -> &LimitConfig {
        &self.cfg
    }

    /// Start over from `min`, doubling per window while latency holds (a backend that just
    /// took over a load it never carried: a promoted primary). The long-term RTT starts over
    /// too: what it measured serving a replica's reads says nothing about the writes it now
    /// takes (kept, it would end the slow start at the first write window).
    pub fn slow_start(&mut self) {
        self.limit = self.cfg.min;
        self.slow_start = true;
        self.long_rtt_us = 0.0;
        self.long_n = 0.0;
    }

    /// Cut the limit to `factor` of itself now (a clamp from outside: cascading risk).
    pub fn clamp_to(&mut self, factor: f64) {
        self.limit = (self.limit * factor).clamp(self.cfg.min, self.cfg.max);
        self.slow_start = false;
    }

    /// One statement finished after `rtt_us`, with `in_flight` statements running when it
    /// started (itself included); `now_us` is any monotonic clock. Returns true when a window
    /// closed and the limit was recomputed.
    pub fn sample(&mut self, now_us: u64, rtt_us: u64, in_flight: u32) -> bool {
        if self.w_n == 0 {
            self.w_started_us = now_us;
        }
        if let Some(slot) = self.w_samples.get_mut(self.w_n as usize) {
            *slot = rtt_us.clamp(1, u32::MAX as u64) as u32;
        }
        self.w_n = self.w_n.saturating_add(1);
        self.w_max_in_flight = self.w_max_in_flight.max(in_flight);
        if self.w_n < self.cfg.window_samples || now_us.saturating_sub(self.w_started_us) < self.cfg.window_us {
            return false;
        }
        let kept = &mut self.w_samples[..(self.w_n as usize).min(SAMPLES_KEPT)];
        kept.sort_unstable();
        let short = kept[kept.len() / 2] as f64;
        let used = self.w_max_in_flight as f64;
        self.w_n = 0;
        self.w_max_in_flight = 0;
        self.window(short, used);
        true
    }

    /// A closed window: its mean latency and the most statements in flight in it.
    fn window(&mut self, short: f64, used: f64) {
        // Long-term RTT: an exponential average over about `long_window` windows (a plain
        // mean until that many were seen, so the first windows count fully).
        self.long_n = (self.long_n + 1.0).min(self.cfg.long_window);
        if self.long_rtt_us == 0.0 {
            self.long_rtt_us = short;
        } else {
            self.long_rtt_us += (short - self.long_rtt_us) / self.long_n;
        }
        // Recovered: drop a long RTT that a past overload inflated.
        if self.long_rtt_us / short > 2.0 {
            self.long_rtt_us *= 0.95;
        }
        let gradient = (self.cfg.tolerance * self.long_rtt_us / short).clamp(0.5, 1.0);
        self.last_rtt_us = short;
        self.last_gradient = gradient;
        if self.slow_start {
            if gradient < 1.0 {
                self.slow_start = false;
            } else {
                if used >= self.limit / 2.0 {
                    self.limit = (self.limit * 2.0).min(self.cfg.max);
                }
                return;
            }
        }
        // Not used near the limit and latency holds: nothing learned about a higher one.
        if used < self.limit / 2.0 && gradient >= 1.0 {
            return;
        }
        let queue = self.limit.sqrt();
        let target = self.limit * gradient + queue;
        let next = self.limit * (1.0 - self.cfg.smoothing) + target * self.cfg.smoothing;
        // Shrinking acts at once (latency already rose); growth is smoothed.
        let next = if gradient < 1.0 { next.min(self.limit * gradient + queue.min(1.0)) } else { next };
        self.limit = next.clamp(self.cfg.min, self.cfg.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `windows` windows of samples at `rtt` µs with `in_flight` running (0: as many
    /// as the limit allows, a saturated backend).
    fn run(l: &mut Gradient2, now: &mut u64, windows: usize, rtt: u64, in_flight: u32) {
        let mut closed = 0;
        while closed < windows {
            *now += 20_000;
            let n = if in_flight == 0 { l.limit() as u32 } else { in_flight };
            closed += l.sample(*now, rtt, n) as usize;
        }
    }

    #[test]
    fn grows_while_latency_holds_and_used() {
        let mut l = Gradient2::new(LimitConfig::default());
        let mut now = 0;
        run(&mut l, &mut now, 50, 1_000, 0);
        assert!(l.limit() > 40, "limit grew under use at steady latency: {}", l.limit());
    }

    #[test]
    fn idle_backend_does_not_grow() {
        let mut l = Gradient2::new(LimitConfig::default());
        let mut now = 0;
        run(&mut l, &mut now, 100, 1_000, 2);
        assert_eq!(l.limit(), 20, "an idle backend proves nothing about a higher limit");
    }

    #[test]
    fn shrinks_when_latency_rises_then_recovers() {
        let mut l = Gradient2::new(LimitConfig::default());
        let mut now = 0;
        run(&mut l, &mut now, 30, 1_000, 0);
        let before = l.limit();
        // Latency ×10 with the backend saturated: the limit falls fast.
        run(&mut l, &mut now, 10, 10_000, 0);
        let low = l.limit();
        assert!(low <= before / 4, "limit fell from {before} to {low}");
        assert!(low >= 2, "never below min");
        // Latency back to normal under use: the limit rises again.
        run(&mut l, &mut now, 100, 1_000, 0);
        assert!(l.limit() > low * 3, "limit rose again from {low} to {}", l.limit());
    }

    #[test]
    fn slow_start_doubles_until_latency_rises() {
        let mut l = Gradient2::new(LimitConfig::default());
        let mut now = 0;
        run(&mut l, &mut now, 20, 1_000, 0);
        l.slow_start();
        assert_eq!(l.limit(), 2);
        // A promoted replica: its reads took 1 ms, the writes it now takes 3 ms. The ramp
        // measures the new load: the first write window sets the long-term RTT.
        run(&mut l, &mut now, 3, 3_000, 0);
        assert_eq!(l.limit(), 16, "2 → 4 → 8 → 16 over three good windows");
        run(&mut l, &mut now, 1, 15_000, 0);
        assert!(l.limit() < 16, "rising latency ends the slow start and shrinks: {}", l.limit());
    }

    #[test]
    fn a_few_long_statements_do_not_shrink_it() {
        let mut l = Gradient2::new(LimitConfig::default());
        let mut now = 0;
        run(&mut l, &mut now, 30, 1_000, 0);
        let before = l.limit();
        // One statement in five takes a second (reports among point reads): the median holds.
        for i in 0..400u64 {
            now += 20_000;
            let rtt = if i % 5 == 0 { 1_000_000 } else { 1_000 };
            l.sample(now, rtt, l.limit() as u32);
        }
        assert!(l.limit() >= before, "limit {before} -> {}", l.limit());
    }

    #[test]
    fn windows_need_samples_and_time() {
        let mut l = Gradient2::new(LimitConfig::default());
        // 100 samples within 1 ms: one window at most (window_us = 100 ms not reached).
        let mut closed = 0;
        for i in 0..100 {
            closed += l.sample(i * 10, 1_000, 20) as u32;
        }
        assert_eq!(closed, 0);
        assert!(l.sample(200_000, 1_000, 20));
    }
}
