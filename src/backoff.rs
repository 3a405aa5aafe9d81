//! Reconnect delays: capped exponential backoff with jitter.
//!
//! Used by each lobby's source (`source/websocket.rs`, `source/redis.rs`);
//! nothing here sleeps or touches a socket.

use std::time::Duration;

/// Capped exponential backoff with jitter: the n-th delay (from 0) is drawn
/// uniformly from `[min, min(max, min·2ⁿ⁺¹)]`. Never below `min`, never above
/// `max`, and lobbies that lost the origin together drift apart, so they do
/// not come back together.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff between `min` and `max`, its jitter seeded by `seed`.
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
            rng: splitmix64(seed) | 1,
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
            self.random() % span.saturating_add(1)
        };
        self.min + Duration::from_nanos(jitter)
    }

    /// Starts over from the shortest delays.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// xorshift64*: plenty for jitter, no dependency.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Spreads similar seeds (lobby ids, clock readings) over the whole range.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);

    #[test]
    fn delays_stay_within_a_doubling_ceiling_and_the_cap() {
        let max = Duration::from_secs(3);
        for seed in 0..50 {
            let mut b = Backoff::new(MIN, max, seed);
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
        let mut b = Backoff::new(MIN, max, 7);
        let late: Vec<Duration> = (0..40).map(|_| b.next_delay()).skip(20).collect();
        assert!(late.iter().all(|d| *d <= max));
        assert!(late.iter().any(|d| *d > max / 2), "{late:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(MIN, Duration::from_secs(30), 3);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= MIN * 2);
    }

    #[test]
    fn equal_settings_with_different_seeds_jitter_apart() {
        let delays: Vec<Duration> = (0..8)
            .map(|seed| Backoff::new(MIN, Duration::from_secs(30), seed).next_delay())
            .collect();
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 4, "{delays:?}");
    }

    #[test]
    fn min_equal_to_max_is_a_fixed_delay() {
        let mut b = Backoff::new(MIN, MIN, 1);
        assert!((0..5).all(|_| b.next_delay() == MIN));
    }
}
