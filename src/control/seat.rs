//! Client seats: the per-address count from accept and the live client
//! count, owned in one place and released exactly once.
//!
//! [`Seats`] lives in the acceptor thread and is the only owner of the
//! per-address and per-route counts; the live client count is the `clients`
//! gauge in the stats. A [`Seat`] is taken when a connection is accepted
//! (counted against its address, pending handshake included) and becomes a
//! client's seat at the upgrade (counted in `clients` within
//! `--max-clients`, and in its route within the route's lobby seats and
//! query keys). The seat then travels with the connection: acceptor →
//! manager → writer. Wherever it is dropped (refused, closed, shut down, or
//! lost with a thread that panicked), its drop gives every count back: the
//! gauge at once, the rest through a channel the acceptor drains before its
//! next admission. Because a seat travels through three threads, it lives
//! below all of them; the acceptor says a [`Refusal`] in HTTP. Nothing here
//! touches a socket.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::{
    config::Config,
    id::{Group, RouteId},
    stats::{Stats, bump, drop_one},
};

/// The group of addresses a per-address limit counts together: one IPv4
/// address, or an IPv6 prefix (a /64 is one subscriber's network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddrKey {
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(u32),
    /// The first `prefix` bits of an IPv6 address.
    V6(u128),
}

impl AddrKey {
    /// The group of `ip` when IPv6 addresses are grouped by `prefix` bits.
    pub(crate) fn of(ip: IpAddr, prefix: u8) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(u32::from(v4)),
                None => {
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(prefix.min(128)))
                        .unwrap_or(0);
                    AddrKey::V6(u128::from(v6) & mask)
                }
            },
        }
    }
}

/// What a dropped seat gives back, shared by every seat of a gateway.
#[derive(Debug)]
struct Book {
    stats: Arc<Stats>,
    /// Where released counts go (the acceptor's [`Seats`]).
    released: Sender<Released>,
}

/// The counts a dropped seat held besides the gauge.
#[derive(Debug)]
struct Released {
    addr: Option<AddrKey>,
    group: Option<Group>,
}

/// A connection's claim on the gateway's capacity; see the module docs.
#[derive(Debug)]
pub(crate) struct Seat {
    book: Arc<Book>,
    /// The address group it is counted against, when addresses are limited;
    /// boxed, so that without per-address limits a seat carries a null
    /// pointer, not the 32 bytes (and 16-byte alignment) of an IPv6 prefix.
    addr: Option<Box<AddrKey>>,
    /// The route (and key) it is counted in, once it is a client's: then
    /// it also holds a place in the `clients` gauge (the upgrade completed).
    group: Option<Group>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if self.group.is_some() {
            drop_one(&self.book.stats.clients);
        }
        if self.addr.is_some() || self.group.is_some() {
            let released = Released {
                addr: self.addr.as_deref().copied(),
                group: self.group.take(),
            };
            // A closed channel means the acceptor has ended: nothing to count.
            let _ = self.book.released.send(released);
        }
    }
}

/// Which limit refused a connection; the acceptor answers it with its
/// HTTP status (`edge/upgrade.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its address group holds as many connections as allowed.
    FromAddress,
    /// The gateway holds as many clients as allowed.
    Clients,
    /// Its route's lobbies are full and no more may start.
    Full,
    /// Its route has as many distinct query keys as allowed.
    Keys,
}

/// A route's admission limits, and its counts.
#[derive(Debug, Default)]
pub(crate) struct RouteLimits {
    /// Most clients its lobbies can hold, when its origin connections are limited.
    pub lobby_seats: Option<u64>,
    /// Most distinct query keys at once, if limited.
    pub max_keys: Option<usize>,
    clients: u64,
    /// Clients per query key.
    keys: HashMap<Arc<str>, u32>,
}

impl RouteLimits {
    /// The limits a route's settings describe.
    pub(crate) fn new(route: &Config) -> RouteLimits {
        RouteLimits {
            lobby_seats: route.lobby_seats(),
            max_keys: (route.pass_query && route.max_keys > 0).then_some(route.max_keys),
            ..RouteLimits::default()
        }
    }
}

/// The admission limits and the per-address counts, owned by the acceptor.
#[derive(Debug)]
pub(crate) struct Seats {
    book: Arc<Book>,
    released: Receiver<Released>,
    per_addr: HashMap<AddrKey, u32>,
    /// Most connections from one address group, if limited.
    max_per_addr: Option<u32>,
    ipv6_prefix: u8,
    /// Most clients connected at once, if limited.
    max_clients: Option<u64>,
    routes: HashMap<RouteId, RouteLimits>,
}

impl Seats {
    /// The limits `config` sets, counting in `stats`.
    pub(crate) fn new(config: &Config, stats: Arc<Stats>) -> Seats {
        let (tx, released) = unbounded();
        Seats {
            book: Arc::new(Book {
                stats,
                released: tx,
            }),
            released,
            per_addr: HashMap::new(),
            max_per_addr: (config.max_clients_per_ip > 0)
                .then(|| u32::try_from(config.max_clients_per_ip).unwrap_or(u32::MAX)),
            ipv6_prefix: config.ipv6_prefix,
            max_clients: (config.max_clients > 0).then_some(config.max_clients as u64),
            routes: HashMap::new(),
        }
    }

    /// Changes the gateway-wide limits (a reload); the counts carry over.
    pub(crate) fn set_limits(&mut self, config: &Config) {
        self.max_per_addr = (config.max_clients_per_ip > 0)
            .then(|| u32::try_from(config.max_clients_per_ip).unwrap_or(u32::MAX));
        self.ipv6_prefix = config.ipv6_prefix;
        self.max_clients = (config.max_clients > 0).then_some(config.max_clients as u64);
    }

    /// Sets (or changes) a route's limits; its counts carry over.
    pub(crate) fn set_route(&mut self, route: RouteId, limits: RouteLimits) {
        let entry = self.routes.entry(route).or_default();
        entry.lobby_seats = limits.lobby_seats;
        entry.max_keys = limits.max_keys;
    }

    /// Takes back what dropped seats held.
    fn absorb_releases(&mut self) {
        for gone in self.released.try_iter() {
            if let Some(addr) = gone.addr {
                if let Some(n) = self.per_addr.get_mut(&addr) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_addr.remove(&addr);
                    }
                }
            }
            if let Some(group) = gone.group {
                if let Some(route) = self.routes.get_mut(&group.route) {
                    route.clients = route.clients.saturating_sub(1);
                    if let Some(key) = group.key {
                        if let Some(n) = route.keys.get_mut(&key) {
                            *n -= 1;
                            if *n == 0 {
                                route.keys.remove(&key);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A seat for a connection just accepted from `ip`, or the refusal
    /// when its address group already holds as many connections as allowed.
    pub(crate) fn take(&mut self, ip: IpAddr) -> Result<Seat, Refusal> {
        let mut seat = Seat {
            book: Arc::clone(&self.book),
            addr: None,
            group: None,
        };
        let Some(max) = self.max_per_addr else {
            return Ok(seat);
        };
        self.absorb_releases();
        let addr = AddrKey::of(ip, self.ipv6_prefix);
        let count = self.per_addr.entry(addr).or_default();
        if *count >= max {
            bump(&self.book.stats.refused_per_ip);
            return Err(Refusal::FromAddress);
        }
        *count += 1;
        seat.addr = Some(Box::new(addr));
        Ok(seat)
    }

    /// Makes `seat` a client of `group` at its upgrade (counted in
    /// `clients` and in its route), or says which limit refuses it.
    pub(crate) fn claim_client(&mut self, seat: &mut Seat, group: &Group) -> Result<(), Refusal> {
        if seat.group.is_some() {
            return Ok(());
        }
        self.absorb_releases();
        let stats = &self.book.stats;
        let route = self.routes.entry(group.route).or_default();
        let is_new_key = group
            .key
            .as_ref()
            .is_some_and(|k| !route.keys.contains_key(k));
        let before = stats.clients.fetch_add(1, Ordering::SeqCst);
        let refusal = if self.max_clients.is_some_and(|max| before >= max) {
            Some(Refusal::Clients)
        } else if route.lobby_seats.is_some_and(|max| route.clients >= max) {
            Some(Refusal::Full)
        } else if is_new_key && route.max_keys.is_some_and(|max| route.keys.len() >= max) {
            Some(Refusal::Keys)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop_one(&stats.clients);
            bump(&stats.refused_full);
            return Err(refusal);
        }
        route.clients += 1;
        if let Some(key) = &group.key {
            *route.keys.entry(Arc::clone(key)).or_default() += 1;
        }
        seat.group = Some(group.clone());
        Ok(())
    }

    /// Address groups currently counted (for tests of the bookkeeping).
    #[cfg(test)]
    fn counted(&mut self) -> u32 {
        let _ = self.take(IpAddr::from([0, 0, 0, 0])).map(drop);
        self.per_addr
            .iter()
            .filter(|(k, _)| **k != AddrKey::V4(0))
            .map(|(_, n)| *n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn seats(per_ip: usize, max_clients: usize) -> Seats {
        let config = Config {
            max_clients_per_ip: per_ip,
            max_clients,
            ..Config::default()
        };
        Seats::new(&config, Arc::new(Stats::default()))
    }

    fn group(key: Option<&str>) -> Group {
        Group {
            route: RouteId(0),
            key: key.map(Arc::from),
        }
    }

    #[test]
    fn ipv6_addresses_group_by_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddrKey::of(a, 64), AddrKey::of(b, 64));
        assert_ne!(AddrKey::of(a, 64), AddrKey::of(c, 64));
        assert_eq!(AddrKey::of(a, 48), AddrKey::of(c, 48));
        assert_ne!(AddrKey::of(a, 128), AddrKey::of(b, 128));
        assert_eq!(AddrKey::of(a, 0), AddrKey::of(c, 0));
        let mapped = IpAddr::V6(Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]));
        assert_eq!(
            AddrKey::of(mapped, 64),
            AddrKey::of(IpAddr::from([127, 0, 0, 1]), 64)
        );
    }

    #[test]
    fn the_address_limit_counts_from_accept_and_frees_on_drop() {
        let mut s = seats(2, 0);
        let ip = IpAddr::from([10, 0, 0, 1]);
        let a = s.take(ip).unwrap();
        let b = s.take(ip).unwrap();
        assert_eq!(
            s.take(ip).unwrap_err(),
            Refusal::FromAddress,
            "pending handshakes count"
        );
        assert!(
            s.take(IpAddr::from([10, 0, 0, 2])).is_ok(),
            "other addresses are not"
        );
        drop(a);
        let c = s.take(ip).unwrap();
        drop((b, c));
        assert_eq!(s.counted(), 0, "every seat released exactly once");
    }

    #[test]
    fn a_route_holds_at_most_its_keys_and_frees_one_with_its_last_client() {
        let mut s = seats(0, 0);
        s.set_route(
            RouteId(0),
            RouteLimits {
                max_keys: Some(2),
                ..RouteLimits::default()
            },
        );
        let ip = IpAddr::from([10, 0, 0, 1]);
        let claim = |s: &mut Seats, key| {
            let mut seat = s.take(ip).unwrap();
            s.claim_client(&mut seat, &group(Some(key))).map(|()| seat)
        };
        let btc = claim(&mut s, "symbol=btc").unwrap();
        let btc2 = claim(&mut s, "symbol=btc").unwrap();
        let eth = claim(&mut s, "symbol=eth").unwrap();
        assert_eq!(claim(&mut s, "symbol=sol").unwrap_err(), Refusal::Keys);
        assert!(
            claim(&mut s, "symbol=eth").is_ok(),
            "a known key is no new key"
        );
        drop((btc, btc2));
        assert!(
            claim(&mut s, "symbol=sol").is_ok(),
            "btc's last client left"
        );
        drop(eth);
    }

    #[test]
    fn client_seats_are_counted_once_and_released_once() {
        let mut s = seats(0, 2);
        let stats = Arc::clone(&s.book.stats);
        let mut a = s.take(IpAddr::from([10, 0, 0, 1])).unwrap();
        let mut b = s.take(IpAddr::from([10, 0, 0, 1])).unwrap();
        let mut c = s.take(IpAddr::from([10, 0, 0, 1])).unwrap();
        s.claim_client(&mut a, &group(None)).unwrap();
        s.claim_client(&mut a, &group(None)).unwrap();
        s.claim_client(&mut b, &group(None)).unwrap();
        assert_eq!(
            s.claim_client(&mut c, &group(None)).unwrap_err(),
            Refusal::Clients
        );
        assert_eq!(stats.clients.load(Ordering::SeqCst), 2);
        drop(c);
        assert_eq!(stats.clients.load(Ordering::SeqCst), 2);
        drop((a, b));
        assert_eq!(stats.clients.load(Ordering::SeqCst), 0);
    }
}
