//! Reconnect delays: capped exponential backoff with jitter, and when a
//! lost connection earns a fresh start.
//!
//! Used by each lobby's source (`websocket/`, `redis.rs`);
//! nothing here sleeps or touches a socket.

use std::time::Duration;

use crate::source::rng::Rng;

/// A connection that lived this long earns a fresh backoff when it fails.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// A connection that delivered a message earns a fresh backoff only if it
/// also lived this long: an origin that sends one message and closes must
/// not be redialled at the shortest delay forever.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);

/// Capped exponential backoff with jitter: the n-th delay (from 0) is drawn
/// uniformly from `[min, min(max, min·2ⁿ⁺¹)]`. Never below `min`, never above
/// `max`, and lobbies that lost the origin together drift apart, so they do
/// not come back together.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: Rng,
}

impl Backoff {
    /// A backoff between `min` and `max`, its jitter drawn from `rng`.
    pub(crate) fn new(min: Duration, max: Duration, rng: Rng) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
            rng,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << (self.attempt + 1).min(30))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let span = u64::try_from(ceiling.saturating_sub(self.min).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 {
            0
        } else {
            self.rng.below(span.saturating_add(1))
        };
        self.min + Duration::from_nanos(jitter)
    }

    /// Starts over from the shortest delays.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// An established connection ended after `lived`, having `delivered` a
    /// message or not: it starts the delays over if it lived
    /// [`STABLE_AFTER`], or delivered and lived [`HEALTHY_AFTER`].
    pub(crate) fn connection_ended(&mut self, lived: Duration, delivered: bool) {
        if lived >= STABLE_AFTER || (delivered && lived >= HEALTHY_AFTER) {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);

    #[test]
    fn delays_stay_within_a_doubling_ceiling_and_the_cap() {
        let max = Duration::from_secs(3);
        for seed in 0..50 {
            let mut b = Backoff::new(MIN, max, Rng::new(seed));
            let mut ceiling = MIN * 2;
            for _ in 0..12 {
                let d = b.next_delay();
                assert!(d >= MIN && d <= ceiling.min(max), "{d:?} vs {ceiling:?}");
                ceiling *= 2;
            }
        }
    }

    #[test]
    fn the_cap_is_reached_and_held() {
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(MIN, max, Rng::new(7));
        let late: Vec<Duration> = (0..40).map(|_| b.next_delay()).skip(20).collect();
        assert!(late.iter().all(|d| *d <= max));
        assert!(late.iter().any(|d| *d > max / 2), "{late:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(MIN, Duration::from_secs(30), Rng::new(3));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= MIN * 2);
    }

    #[test]
    fn a_connection_that_lived_30s_or_delivered_and_lived_5s_starts_over() {
        let ended = |lived: u64, delivered: bool| {
            let mut b = Backoff::new(MIN, Duration::from_secs(30), Rng::new(5));
            for _ in 0..10 {
                b.next_delay();
            }
            b.connection_ended(Duration::from_secs(lived), delivered);
            b.attempt == 0
        };
        assert!(ended(30, false));
        assert!(!ended(29, false));
        assert!(ended(5, true));
        assert!(!ended(4, true));
    }

    #[test]
    fn equal_settings_with_different_seeds_jitter_apart() {
        let delays: Vec<Duration> = (0..8)
            .map(|seed| Backoff::new(MIN, Duration::from_secs(30), Rng::new(seed)).next_delay())
            .collect();
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 4, "{delays:?}");
    }

    #[test]
    fn min_equal_to_max_is_a_fixed_delay() {
        let mut b = Backoff::new(MIN, MIN, Rng::new(1));
        assert!((0..5).all(|_| b.next_delay() == MIN));
    }
}
