//! The host-wide CPU budget: a token bucket of check time, refilled at
//! `cpu_budget` seconds per second, that paces every domain's checks.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Budget {
    /// CPU seconds per second.
    rate: f64,
    state: Mutex<State>,
}

struct State {
    tokens: f64,
    last: Instant,
    window_start: Instant,
    window_used: f64,
    last_ratio: f64,
}

impl Budget {
    pub fn new(rate: f64) -> Self {
        let now = Instant::now();
        Self {
            rate,
            state: Mutex::new(State {
                tokens: rate,
                last: now,
                window_start: now,
                window_used: 0.0,
                last_ratio: 0.0,
            }),
        }
    }

    fn refill(&self, s: &mut State, now: Instant) {
        let dt = now.duration_since(s.last).as_secs_f64();
        s.tokens = (s.tokens + dt * self.rate).min(self.rate); // at most one second's worth banked
        s.last = now;
    }

    /// How long to wait before a check estimated to cost `estimate` may run;
    /// zero when it may run now (and the estimate is then taken).
    pub fn reserve(&self, estimate: Duration) -> Duration {
        let cost = estimate.as_secs_f64().min(self.rate); // a check dearer than the bucket still runs
        let mut s = self.state.lock().expect("budget lock");
        self.refill(&mut s, Instant::now());
        if s.tokens >= cost {
            s.tokens -= cost;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((cost - s.tokens) / self.rate)
        }
    }

    /// Settles a check's actual cost against its estimate, and returns the
    /// share of the budget used over the last full second.
    pub fn settle(&self, estimate: Duration, actual: Duration) -> f64 {
        let mut s = self.state.lock().expect("budget lock");
        let now = Instant::now();
        self.refill(&mut s, now);
        s.tokens += estimate.as_secs_f64().min(self.rate) - actual.as_secs_f64();
        s.window_used += actual.as_secs_f64();
        let span = now.duration_since(s.window_start).as_secs_f64();
        if span >= 1.0 {
            s.last_ratio = s.window_used / (self.rate * span);
            s.window_used = 0.0;
            s.window_start = now;
        }
        s.last_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_when_spent_and_refills() {
        let b = Budget::new(0.1); // 100 ms of checking per second
        assert_eq!(b.reserve(Duration::from_millis(60)), Duration::ZERO);
        let wait = b.reserve(Duration::from_millis(60));
        assert!(
            wait > Duration::from_millis(150) && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // A check that cost less than estimated gives the rest back.
        b.settle(Duration::from_millis(60), Duration::from_millis(10));
        assert_eq!(b.reserve(Duration::from_millis(60)), Duration::ZERO);
    }
}
