//! Liveness and readiness: what `/livez` and `/readyz` answer, and what
//! [`GatewayHandle::liveness`] and [`GatewayHandle::readiness`] return.
//!
//! Both are pure functions of one [`StatsSnapshot`] (and the configured
//! client limits), computed on the caller's thread: they read atomics and
//! never ask a gateway thread anything.
//!
//! [`GatewayHandle::liveness`]: crate::GatewayHandle::liveness
//! [`GatewayHandle::readiness`]: crate::GatewayHandle::readiness

use std::sync::Arc;

use crate::{
    config::Config,
    stats::{Stats, StatsSnapshot},
};

/// The answer of a health probe: whether it passes, and one line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether the probe passes (HTTP 200 rather than 503).
    pub ok: bool,
    /// One line saying why, for people and load-balancer logs.
    pub why: String,
}

impl Health {
    fn pass(why: String) -> Health {
        Health { ok: true, why }
    }

    fn fail(why: String) -> Health {
        Health { ok: false, why }
    }
}

/// What the probes read: the counters and the most clients the gateway takes.
#[derive(Debug, Clone)]
pub(crate) struct Probes {
    stats: Arc<Stats>,
    /// Most clients at once (`--max-clients`, or every lobby full at
    /// `--max-origin-connections`), if limited.
    seats: Option<u64>,
}

impl Probes {
    pub(crate) fn new(stats: Arc<Stats>, config: &Config) -> Probes {
        let max_clients = (config.max_clients > 0).then_some(config.max_clients as u64);
        let seats = match (max_clients, config.lobby_seats()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Probes { stats, seats }
    }

    /// Live: the gateway runs and has had no fatal failure.
    pub(crate) fn liveness(&self) -> Health {
        liveness(&self.stats.snapshot())
    }

    /// Ready: new clients are welcome and would receive the feed.
    pub(crate) fn readiness(&self) -> Health {
        readiness(&self.stats.snapshot(), self.seats)
    }
}

fn liveness(s: &StatsSnapshot) -> Health {
    if s.fatal_errors > 0 {
        Health::fail(format!("failed: {} fatal errors", s.fatal_errors))
    } else {
        Health::pass("ok".to_owned())
    }
}

fn readiness(s: &StatsSnapshot, seats: Option<u64>) -> Health {
    if s.draining {
        return Health::fail("draining: shutdown has begun".to_owned());
    }
    if s.fatal_errors > 0 {
        return Health::fail(format!("failed: {} fatal errors", s.fatal_errors));
    }
    if let Some(seats) = seats.filter(|&seats| s.clients >= seats) {
        return Health::fail(format!("full: {} clients of {seats}", s.clients));
    }
    // A first origin attempt under way is not a failure: an instance's first
    // client would otherwise fail the check for as long as its lobby
    // connects, and a load balancer mark a fresh instance down for it.
    if s.clients > 0 && s.origin_connections == 0 && s.origins_failing > 0 {
        return Health::fail(format!(
            "no origin connection up for {} clients ({} connecting, {} backing off, \
             {} failing)",
            s.clients, s.origins_connecting, s.origins_backing_off, s.origins_failing
        ));
    }
    Health::pass(format!(
        "ready: {} clients, {} origin connections up, {} connecting",
        s.clients, s.origin_connections, s.origins_connecting
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(clients: u64, up: u64) -> StatsSnapshot {
        StatsSnapshot {
            clients,
            origin_connections: up,
            ..StatsSnapshot::default()
        }
    }

    #[test]
    fn ready_without_clients_with_an_origin_up_or_its_first_attempt_under_way() {
        assert!(readiness(&snapshot(0, 0), None).ok);
        assert!(readiness(&snapshot(5, 1), None).ok);
        let first = StatsSnapshot {
            origins_connecting: 1,
            ..snapshot(5, 0)
        };
        assert!(readiness(&first, None).ok, "{:?}", readiness(&first, None));
        let failing = StatsSnapshot {
            origins_connecting: 1,
            origins_failing: 1,
            ..snapshot(5, 0)
        };
        let waiting = readiness(&failing, None);
        assert!(!waiting.ok);
        assert!(
            waiting.why.starts_with("no origin connection up"),
            "{waiting:?}"
        );
        let elsewhere = StatsSnapshot {
            origins_failing: 1,
            ..snapshot(5, 1)
        };
        assert!(
            readiness(&elsewhere, None).ok,
            "another lobby's origin is up"
        );
    }

    #[test]
    fn not_ready_while_draining_full_or_failed() {
        let draining = StatsSnapshot {
            draining: true,
            ..snapshot(0, 0)
        };
        assert!(readiness(&draining, None).why.starts_with("draining"));
        assert!(!readiness(&snapshot(10, 1), Some(10)).ok);
        assert!(readiness(&snapshot(9, 1), Some(10)).ok);
        let failed = StatsSnapshot {
            fatal_errors: 1,
            ..snapshot(0, 0)
        };
        assert!(!readiness(&failed, None).ok);
        assert!(!liveness(&failed).ok);
        assert_eq!(liveness(&snapshot(3, 0)).why, "ok");
    }
}
