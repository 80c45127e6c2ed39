//! Log lines a guest can cause at will (a bad BAR move, a refused queue count,
//! MSI-X misuse) must not flood the host's log: [`guest_warn!`] lets a few per
//! minute through from each call site and says how many it held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per call site and period.
pub const BURST: u32 = 10;
pub const PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    passed: u32,
    held: u64,
}

/// One call site's budget.
#[derive(Debug)]
pub struct RateLimit(Mutex<Window>);

impl RateLimit {
    pub const fn new() -> Self {
        Self(Mutex::new(Window {
            start: None,
            passed: 0,
            held: 0,
        }))
    }

    /// `Some(lines held back since the last one let through)` if this line may
    /// be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= PERIOD) {
            w.start = Some(now);
            w.passed = 0;
        }
        if w.passed < BURST {
            w.passed += 1;
            Some(std::mem::take(&mut w.held))
        } else {
            w.held += 1;
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for what a guest can trigger at will: [`BURST`] lines per
/// [`PERIOD`] from each call site, then silence, then a line that counts what
/// was held back.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => tracing::warn!($($arg)+),
            Some(held) => tracing::warn!(
                "{} ({held} more like this were not logged)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        let passed = (0..25).filter(|_| l.allow_at(t0).is_some()).count();
        assert_eq!(passed, BURST as usize);
        // Still within the period: held back.
        assert_eq!(l.allow_at(t0 + PERIOD / 2), None);
        // A new period: the first line says how many were dropped.
        assert_eq!(l.allow_at(t0 + PERIOD), Some(16));
        assert_eq!(l.allow_at(t0 + PERIOD), Some(0));
    }
}
