//! The lobby registry: which lobbies exist, which clients are in which, and
//! the placement and compaction decisions. Pure bookkeeping, driven by the
//! manager thread (`manager.rs`): no threads, no channels, no sockets, so
//! every rule here is unit-tested on its own.
//!
//! Lobbies belong to a *group*: a route, and for a route with query-keyed
//! lobbies, one normalised query string. A client joins the fullest lobby of
//! its group that has room; a new lobby starts only when none has, within
//! the route's lobby limit. Compaction moves the members of a group's
//! emptiest settled lobbies into its fullest ones when the group's clients
//! fit in fewer lobbies, and never moves a client across groups. A move is
//! two steps (the old lobby releases the client, then the new one adopts
//! it), recorded here so a client that leaves meanwhile is never adopted.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use crate::id::{ClientId, Group, LobbyId, RouteId};

/// A route's placement rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rules {
    /// Clients per lobby.
    pub capacity: usize,
    /// Members per lobby that compaction packs to (capacity × fill, at least 1).
    pub compact_to: usize,
    /// Most lobbies of the route at once, if limited.
    pub max_lobbies: Option<usize>,
}

/// What placing a client found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Join this running lobby.
    Join(LobbyId),
    /// Start this new lobby (already registered, empty) and join it.
    Start(LobbyId),
    /// Every lobby is full and no more may start.
    Full,
}

/// A lobby as the registry knows it.
#[derive(Debug)]
struct Lobby {
    group: Group,
    /// Clients placed here, moving ones counted where they are going.
    members: usize,
    /// Its thread has ended (a message to it failed): place nobody here.
    is_dead: bool,
    /// Its route was removed or its upstream changed: place nobody here,
    /// move nobody in; it ends once its clients have left.
    is_retiring: bool,
    empty_since: Option<Instant>,
    /// When it started, or last received migrated clients: it is not
    /// drained again until a compaction interval has passed since.
    settled_since: Instant,
}

impl Lobby {
    /// Whether clients may be placed here or moved in.
    fn is_open(&self) -> bool {
        !self.is_dead && !self.is_retiring
    }
}

/// A client as the registry knows it.
#[derive(Debug, Clone, Copy)]
struct Client {
    lobby: LobbyId,
    /// While moving: the old lobby, asked to release it; `lobby` is the new one.
    moving_from: Option<LobbyId>,
}

/// One move compaction decided: `client` from lobby `from` into `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Move {
    pub client: ClientId,
    pub from: LobbyId,
    pub to: LobbyId,
}

/// A client of a lobby that ended unexpectedly, and what becomes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Orphan {
    /// It was in the lobby (or moving into it): place it afresh.
    Rehome(ClientId),
    /// It was moving out of the lobby: its new lobby adopts it as is.
    Adopt(ClientId, LobbyId),
}

/// A client's departure: the lobby it was in, and whether that lobby must
/// be told (a client still moving is not in its new lobby yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Departure {
    pub lobby: LobbyId,
    pub tell_lobby: bool,
}

/// One lobby's counts, for the lobby listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Occupancy {
    pub id: LobbyId,
    pub group: Group,
    pub members: usize,
}

/// The registry itself; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    rules: HashMap<RouteId, Rules>,
    lobbies: BTreeMap<LobbyId, Lobby>,
    clients: HashMap<ClientId, Client>,
    next_lobby: u32,
}

impl Registry {
    /// Sets (or changes) a route's rules; they apply to new placements.
    pub(crate) fn set_rules(&mut self, route: RouteId, rules: Rules) {
        self.rules.insert(route, rules);
    }

    /// Forgets a route's rules: nobody is placed in it any more.
    pub(crate) fn remove_rules(&mut self, route: RouteId) {
        self.rules.remove(&route);
    }

    /// Retires every open lobby of `route` (they take nobody new and end
    /// once empty); returns them.
    pub(crate) fn retire(&mut self, route: RouteId) -> Vec<LobbyId> {
        self.lobbies
            .iter_mut()
            .filter(|(_, l)| l.group.route == route && l.is_open())
            .map(|(id, l)| {
                l.is_retiring = true;
                *id
            })
            .collect()
    }

    /// The clients in `lobby` that are not moving (in order).
    pub(crate) fn clients_in(&self, lobby: LobbyId) -> Vec<ClientId> {
        let mut clients: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.lobby == lobby && c.moving_from.is_none())
            .map(|(id, _)| *id)
            .collect();
        clients.sort();
        clients
    }

    /// Finds a lobby for a new client of `group`: the fullest live one with
    /// room (the oldest on ties), else a new one if the route allows it.
    /// A new lobby is registered at once; if its thread cannot start,
    /// [`Registry::lobby_ended`] forgets it.
    pub(crate) fn place(&mut self, group: &Group, now: Instant) -> Place {
        let Some(rules) = self.rules.get(&group.route).copied() else {
            return Place::Full;
        };
        let fullest = self
            .lobbies
            .iter()
            .filter(|(_, l)| l.group == *group && l.is_open() && l.members < rules.capacity)
            .max_by_key(|(id, l)| (l.members, Reverse(**id)))
            .map(|(id, _)| *id);
        if let Some(id) = fullest {
            return Place::Join(id);
        }
        let of_route = self
            .lobbies
            .values()
            .filter(|l| l.group.route == group.route && !l.is_retiring)
            .count();
        if rules.max_lobbies.is_some_and(|max| of_route >= max) {
            return Place::Full;
        }
        let id = LobbyId(self.next_lobby);
        self.next_lobby = self.next_lobby.wrapping_add(1);
        self.lobbies.insert(
            id,
            Lobby {
                group: group.clone(),
                members: 0,
                is_dead: false,
                is_retiring: false,
                empty_since: None,
                settled_since: now,
            },
        );
        Place::Start(id)
    }

    /// Records `client` as a member of `lobby` (it was sent a Join).
    pub(crate) fn join(&mut self, client: ClientId, lobby: LobbyId) {
        if let Some(l) = self.lobbies.get_mut(&lobby) {
            l.members += 1;
            l.empty_since = None;
        }
        self.clients.insert(
            client,
            Client {
                lobby,
                moving_from: None,
            },
        );
    }

    /// A message to `lobby` failed: its thread has ended. Nobody is placed
    /// there any more; its end, when reported, re-homes its clients.
    pub(crate) fn mark_dead(&mut self, lobby: LobbyId) {
        if let Some(l) = self.lobbies.get_mut(&lobby) {
            l.is_dead = true;
        }
    }

    /// Forgets a client that left; says which lobby must let it go.
    pub(crate) fn leave(&mut self, client: ClientId, now: Instant) -> Option<Departure> {
        let c = self.clients.remove(&client)?;
        if let Some(l) = self.lobbies.get_mut(&c.lobby) {
            l.members -= 1;
            if l.members == 0 {
                l.empty_since = Some(now);
            }
        }
        Some(Departure {
            lobby: c.lobby,
            tell_lobby: c.moving_from.is_none(),
        })
    }

    /// The lobby `client` is in (or moving to).
    pub(crate) fn lobby_of(&self, client: ClientId) -> Option<LobbyId> {
        self.clients.get(&client).map(|c| c.lobby)
    }

    /// The moves that would pack each group into fewer lobbies at its
    /// route's compaction fill: the members of the emptiest lobbies settled
    /// for at least `interval`, into the fullest ones. Never across groups.
    pub(crate) fn plan_compaction(&self, now: Instant, interval: Duration) -> Vec<Move> {
        let mut groups: BTreeMap<&Group, Vec<(LobbyId, usize)>> = BTreeMap::new();
        for (id, l) in &self.lobbies {
            if l.members > 0 && l.is_open() {
                groups.entry(&l.group).or_default().push((*id, l.members));
            }
        }
        let mut moves = Vec::new();
        for (group, mut occupied) in groups {
            let Some(rules) = self.rules.get(&group.route) else {
                continue;
            };
            let total: usize = occupied.iter().map(|(_, m)| m).sum();
            let needed = total.div_ceil(rules.compact_to);
            if occupied.len() <= needed {
                continue;
            }
            occupied.sort_by_key(|&(id, members)| (Reverse(members), id));
            let mut targets: Vec<(LobbyId, usize)> = occupied[..needed].to_vec();
            let sources = occupied[needed..].iter().rev().filter(|(id, _)| {
                self.lobbies
                    .get(id)
                    .is_some_and(|l| now.duration_since(l.settled_since) >= interval)
            });
            'sources: for &(source, _) in sources {
                let mut movers: Vec<ClientId> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.lobby == source && c.moving_from.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                movers.sort();
                for client in movers {
                    let target = targets
                        .iter_mut()
                        .filter(|(_, members)| *members < rules.compact_to)
                        .max_by_key(|(t, members)| (*members, Reverse(*t)));
                    let Some((to, members)) = target else {
                        break 'sources;
                    };
                    *members += 1;
                    moves.push(Move {
                        client,
                        from: source,
                        to: *to,
                    });
                }
            }
        }
        moves
    }

    /// Records that `m.from` was asked to release `m.client` for `m.to`.
    pub(crate) fn start_move(&mut self, m: Move, now: Instant) {
        if self.clients.contains_key(&m.client) {
            self.let_go(m.from, now);
            self.hold_move(m, now);
        }
    }

    /// Records that `m.client` moves to `m.to` once `m.to` has warmed up:
    /// it counts in `m.to` from now on, so placement sees it there, and
    /// still in `m.from`, which goes on serving it, so that lobby is not
    /// empty and does not linger away with it, until [`Registry::let_go`].
    /// A client already held for another lobby counts there no more.
    pub(crate) fn hold_move(&mut self, m: Move, now: Instant) {
        let Some(c) = self.clients.get_mut(&m.client) else {
            return;
        };
        let before = c.lobby;
        let held_elsewhere = c.moving_from.is_some() && before != m.to;
        c.lobby = m.to;
        c.moving_from = Some(m.from);
        if held_elsewhere {
            self.let_go(before, now);
        }
        if let Some(to) = self.lobbies.get_mut(&m.to) {
            to.members += 1;
            to.empty_since = None;
            to.settled_since = now;
        }
    }

    /// `lobby` no longer serves one of its members: one held for a move
    /// is released now, or left before its move.
    pub(crate) fn let_go(&mut self, lobby: LobbyId, now: Instant) {
        if let Some(l) = self.lobbies.get_mut(&lobby) {
            l.members = l.members.saturating_sub(1);
            if l.members == 0 {
                l.empty_since = Some(now);
            }
        }
    }

    /// The old lobby let `client` go: the lobby that is to adopt it, if it
    /// is still moving (not if it left, or its move was settled otherwise).
    pub(crate) fn released(&mut self, client: ClientId) -> Option<LobbyId> {
        let c = self.clients.get_mut(&client)?;
        c.moving_from.take()?;
        Some(c.lobby)
    }

    /// `client`'s new lobby could not take it: it no longer counts there
    /// (place it afresh with [`Registry::place`] and [`Registry::join`]).
    pub(crate) fn unplace(&mut self, client: ClientId, now: Instant) {
        if let Some(c) = self.clients.remove(&client) {
            if let Some(l) = self.lobbies.get_mut(&c.lobby) {
                l.members -= 1;
                if l.members == 0 {
                    l.empty_since = Some(now);
                }
            }
        }
    }

    /// A lobby's thread ended. Forgets it and says what becomes of its
    /// clients; `None` if it was not registered (it ended as asked).
    pub(crate) fn lobby_ended(&mut self, lobby: LobbyId) -> Option<Vec<Orphan>> {
        self.lobbies.remove(&lobby)?;
        let mut orphans: Vec<Orphan> = self
            .clients
            .iter()
            .filter_map(|(id, c)| {
                if c.lobby == lobby {
                    Some(Orphan::Rehome(*id))
                } else if c.moving_from == Some(lobby) {
                    Some(Orphan::Adopt(*id, c.lobby))
                } else {
                    None
                }
            })
            .collect();
        orphans.sort_by_key(|o| match o {
            Orphan::Rehome(id) | Orphan::Adopt(id, _) => *id,
        });
        for orphan in &orphans {
            if let Orphan::Rehome(id) = orphan {
                self.clients.remove(id);
            }
        }
        Some(orphans)
    }

    /// When the next lingering lobby's time is up, if any lobby is empty.
    pub(crate) fn next_linger_end(&self, linger: Duration) -> Option<Instant> {
        self.lobbies
            .values()
            .filter_map(|l| l.empty_since)
            .min()
            .map(|since| since + linger)
    }

    /// Forgets the lobbies that stayed empty for `linger`; returns them
    /// (the manager ends their threads).
    pub(crate) fn take_lingering(&mut self, now: Instant, linger: Duration) -> Vec<LobbyId> {
        let expired: Vec<LobbyId> = self
            .lobbies
            .iter()
            .filter(|(_, l)| l.empty_since.is_some_and(|since| since + linger <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.lobbies.remove(id);
        }
        expired
    }

    /// Every lobby, ordered by id.
    pub(crate) fn occupancy(&self) -> Vec<Occupancy> {
        self.lobbies
            .iter()
            .map(|(id, l)| Occupancy {
                id: *id,
                group: l.group.clone(),
                members: l.members,
            })
            .collect()
    }

    /// Forgets every lobby (the gateway is stopping); returns them.
    pub(crate) fn take_all(&mut self) -> Vec<LobbyId> {
        self.clients.clear();
        std::mem::take(&mut self.lobbies).into_keys().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn group(route: u32, key: Option<&str>) -> Group {
        Group {
            route: RouteId(route),
            key: key.map(Arc::from),
        }
    }

    fn registry(capacity: usize, max_lobbies: Option<usize>) -> Registry {
        let mut r = Registry::default();
        for route in [RouteId(0), RouteId(1)] {
            r.set_rules(
                route,
                Rules {
                    capacity,
                    compact_to: (capacity * 9 / 10).max(1),
                    max_lobbies,
                },
            );
        }
        r
    }

    /// Places `n` clients numbered from `first` in `group`; their lobbies.
    fn fill(r: &mut Registry, g: &Group, first: u64, n: u64, now: Instant) -> Vec<LobbyId> {
        (first..first + n)
            .map(|c| {
                let lobby = match r.place(g, now) {
                    Place::Join(l) | Place::Start(l) => l,
                    Place::Full => panic!("full"),
                };
                r.join(ClientId(c), lobby);
                lobby
            })
            .collect()
    }

    fn members(r: &Registry) -> Vec<(u32, usize)> {
        r.occupancy().iter().map(|o| (o.id.0, o.members)).collect()
    }

    #[test]
    fn clients_fill_the_fullest_lobby_and_start_one_only_when_all_are_full() {
        let now = Instant::now();
        let mut r = registry(3, Some(2));
        let g = group(0, None);
        assert_eq!(r.place(&g, now), Place::Start(LobbyId(0)));
        r.join(ClientId(0), LobbyId(0));
        fill(&mut r, &g, 1, 2, now);
        assert_eq!(r.place(&g, now), Place::Start(LobbyId(1)));
        r.join(ClientId(3), LobbyId(1));
        // After a departure lobby 0 has 2 and lobby 1 has 1: the fullest
        // with room is 0.
        r.leave(ClientId(1), now);
        assert_eq!(r.place(&g, now), Place::Join(LobbyId(0)));
        r.join(ClientId(4), LobbyId(0));
        fill(&mut r, &g, 5, 2, now);
        assert_eq!(r.place(&g, now), Place::Full, "two lobbies at most");
    }

    #[test]
    fn groups_never_share_lobbies_and_the_lobby_limit_is_per_route() {
        let now = Instant::now();
        let mut r = registry(10, Some(2));
        let btc = group(0, Some("symbol=btc"));
        let eth = group(0, Some("symbol=eth"));
        let other = group(1, None);
        let a = fill(&mut r, &btc, 0, 1, now)[0];
        let b = fill(&mut r, &eth, 1, 1, now)[0];
        assert_ne!(a, b);
        assert_eq!(
            r.place(&group(0, Some("symbol=sol")), now),
            Place::Full,
            "route 0 has its two lobbies"
        );
        assert!(matches!(r.place(&other, now), Place::Start(_)));
        let groups: Vec<Group> = r.occupancy().into_iter().map(|o| o.group).collect();
        assert_eq!(groups[..2], [btc, eth]);
    }

    #[test]
    fn compaction_packs_each_group_into_its_fullest_lobbies_and_never_crosses_groups() {
        let start = Instant::now();
        let mut r = registry(10, None);
        let g = group(0, None);
        let h = group(1, None);
        fill(&mut r, &g, 0, 30, start); // lobbies 0, 1, 2 of g
        fill(&mut r, &h, 100, 3, start); // lobby 3 of h
        for c in (0..30).filter(|c| ![0, 1, 10, 11, 12, 20, 21, 22, 23].contains(c)) {
            r.leave(ClientId(c), start);
        }
        assert_eq!(members(&r), [(0, 2), (1, 3), (2, 4), (3, 3)]);
        let interval = Duration::from_secs(10);
        assert!(
            r.plan_compaction(start, interval).is_empty(),
            "lobbies not settled yet"
        );
        let later = start + interval;
        let moves = r.plan_compaction(later, interval);
        assert_eq!(moves.len(), 5);
        assert!(moves.iter().all(|m| m.to == LobbyId(2)), "{moves:?}");
        for m in &moves {
            r.start_move(*m, later);
        }
        assert_eq!(members(&r), [(0, 0), (1, 0), (2, 9), (3, 3)]);
        assert!(r.plan_compaction(later, interval).is_empty());
        // The emptied lobbies end after lingering; moving clients finish.
        assert_eq!(
            r.take_lingering(later, Duration::ZERO),
            [LobbyId(0), LobbyId(1)]
        );
        for m in &moves {
            assert_eq!(r.released(m.client), Some(LobbyId(2)));
            assert_eq!(r.released(m.client), None, "released once");
        }
    }

    #[test]
    fn a_client_that_leaves_while_moving_is_never_adopted() {
        let now = Instant::now();
        let mut r = registry(10, None);
        let g = group(0, None);
        fill(&mut r, &g, 0, 10, now);
        fill(&mut r, &g, 10, 1, now);
        let m = Move {
            client: ClientId(10),
            from: LobbyId(1),
            to: LobbyId(0),
        };
        r.leave(ClientId(9), now);
        r.start_move(m, now);
        let gone = r.leave(ClientId(10), now).unwrap();
        assert_eq!(
            gone,
            Departure {
                lobby: LobbyId(0),
                tell_lobby: false
            },
            "its old lobby releases it; its new one never had it"
        );
        assert_eq!(r.released(ClientId(10)), None);
        assert_eq!(members(&r), [(0, 9), (1, 0)]);
    }

    #[test]
    fn retired_lobbies_take_nobody_and_count_against_no_limit() {
        let now = Instant::now();
        let mut r = registry(2, Some(2));
        let g = group(0, None);
        fill(&mut r, &g, 0, 3, now); // lobbies 0 (full) and 1
        assert_eq!(r.retire(RouteId(0)), [LobbyId(0), LobbyId(1)]);
        assert_eq!(r.clients_in(LobbyId(0)), [ClientId(0), ClientId(1)]);
        // New lobbies start beside the retiring ones, within the limit.
        assert_eq!(r.place(&g, now), Place::Start(LobbyId(2)));
        let m = Move {
            client: ClientId(0),
            from: LobbyId(0),
            to: LobbyId(2),
        };
        r.start_move(m, now);
        assert!(r.plan_compaction(now, Duration::ZERO).is_empty());
        r.remove_rules(RouteId(0));
        assert_eq!(
            r.place(&g, now),
            Place::Full,
            "a removed route takes nobody"
        );
    }

    #[test]
    fn a_dead_lobby_takes_nobody_and_its_end_rehomes_each_client_once() {
        let now = Instant::now();
        let mut r = registry(2, None);
        let g = group(0, None);
        fill(&mut r, &g, 0, 4, now); // lobbies 0 and 1
        r.start_move(
            Move {
                client: ClientId(2),
                from: LobbyId(1),
                to: LobbyId(0),
            },
            now,
        );
        r.mark_dead(LobbyId(1));
        assert!(matches!(r.place(&g, now), Place::Start(LobbyId(2))));
        let orphans = r.lobby_ended(LobbyId(1)).unwrap();
        assert_eq!(
            orphans,
            [
                Orphan::Adopt(ClientId(2), LobbyId(0)),
                Orphan::Rehome(ClientId(3))
            ]
        );
        assert_eq!(
            r.lobby_of(ClientId(3)),
            None,
            "placed afresh by the manager"
        );
        assert_eq!(r.lobby_of(ClientId(2)), Some(LobbyId(0)));
        assert_eq!(r.released(ClientId(2)), Some(LobbyId(0)), "adopted once");
        assert_eq!(r.released(ClientId(2)), None);
        assert_eq!(r.lobby_ended(LobbyId(1)), None, "reported once");
    }
}
