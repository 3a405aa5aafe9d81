//! What the acceptor remembers of auth services' answers: the yeses, for a
//! while, and the questions already on their way.
//!
//! A reconnect storm must not become a storm at the auth service. A yes is
//! remembered under the digest of the credentials it was given for (the
//! `Cookie`, `Authorization` and `Origin` headers, a token, the service's
//! URL) for the route's `cache_ttl`, never past the expiry the service
//! set, and covers what the service said the client may open (the target
//! asked about, unless it listed more). A question already asked is not
//! asked again: upgrades with the same credentials and target wait for the
//! same answer. Both are bounded: the oldest yes goes first beyond the
//! cache's size, and the waiting upgrades are pending handshakes, under
//! their own cap and deadline. Only the acceptor thread touches this; no
//! lock, no I/O.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::edge::auth::{Question, allows};

/// The key of a question in flight: the credentials' digest and the
/// target asked about.
pub(crate) type Asked = ([u8; 32], String, Option<Arc<str>>);

/// What a yes from the auth service covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Yes {
    /// When the client's access ends, in seconds since the Unix epoch, if
    /// the service said.
    pub expires: Option<u64>,
    /// The targets it may open (as a token's claim lists them), if the
    /// service listed them; otherwise just the one asked about.
    pub allowed: Option<Vec<String>>,
}

#[derive(Debug)]
struct Entry {
    until: Instant,
    yes: Yes,
    /// The target asked about, which a yes without a list covers.
    path: String,
    lobby_key: Option<Arc<str>>,
}

/// Remembered yeses, oldest first in `order`.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    entries: HashMap<[u8; 32], Entry>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl Cache {
    /// A remembered yes that covers `question`, if one is still fresh at
    /// `now` (Unix seconds `unix` for the service's expiry).
    pub(crate) fn get(
        &mut self,
        question: &Question,
        now: Instant,
        unix: u64,
        normalise: &impl Fn(&str) -> Option<Arc<str>>,
    ) -> Option<Yes> {
        let entry = self.entries.get(&question.key)?;
        if entry.until <= now || entry.yes.expires.is_some_and(|e| e <= unix) {
            self.entries.remove(&question.key);
            return None;
        }
        let lobby_key = question.lobby_key.as_ref();
        let covered = match &entry.yes.allowed {
            Some(list) => allows(list, &question.path, lobby_key, normalise),
            None => entry.path == question.path && entry.lobby_key.as_ref() == lobby_key,
        };
        covered.then(|| entry.yes.clone())
    }

    /// Remembers a yes to `question` from `now`.
    pub(crate) fn put(&mut self, question: &Question, yes: &Yes, now: Instant, unix: u64) {
        let mut ttl = question.cache_ttl;
        if let Some(expires) = yes.expires {
            ttl = ttl.min(Duration::from_secs(expires.saturating_sub(unix)));
        }
        if ttl.is_zero() || question.cache_size == 0 {
            return;
        }
        let until = now + ttl;
        self.entries.insert(
            question.key,
            Entry {
                until,
                yes: yes.clone(),
                path: question.path.clone(),
                lobby_key: question.lobby_key.clone(),
            },
        );
        self.order.push_back((question.key, until));
        while self.entries.len() > question.cache_size {
            let Some((key, until)) = self.order.pop_front() else {
                break;
            };
            // Only the entry this record was made for: a key asked again
            // since has a newer one further back.
            if self.entries.get(&key).is_some_and(|e| e.until == until) {
                self.entries.remove(&key);
            }
        }
        // Records of entries replaced since are rebuilt away once they
        // outnumber the entries: amortised over as many inserts.
        if self.order.len() > 2 * self.entries.len() + 16 {
            let mut live: Vec<([u8; 32], Instant)> =
                self.entries.iter().map(|(k, e)| (*k, e.until)).collect();
            live.sort_by_key(|(_, until)| *until);
            self.order = live.into();
        }
    }

    /// Yeses remembered (for tests of the bounds).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(key: u8, path: &str, lobby_key: Option<&str>) -> Question {
        Question {
            url: Arc::from("http://auth/"),
            timeout: Duration::from_secs(2),
            headers: Vec::new(),
            client_header: "X-Forwarded-For".into(),
            peer: "127.0.0.1".into(),
            key: [key; 32],
            path: path.to_owned(),
            lobby_key: lobby_key.map(Arc::from),
            cache_ttl: Duration::from_secs(10),
            cache_size: 2,
        }
    }

    fn same(q: &str) -> Option<Arc<str>> {
        Some(Arc::from(q))
    }

    #[test]
    fn a_yes_covers_its_target_until_its_ttl_or_expiry() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let q = question(1, "/book", Some("symbol=btc"));
        let yes = Yes {
            expires: Some(1_000 + 5),
            allowed: None,
        };
        cache.put(&q, &yes, now, 1_000);
        assert_eq!(cache.get(&q, now, 1_000, &same), Some(yes.clone()));
        let eth = question(1, "/book", Some("symbol=eth"));
        assert_eq!(cache.get(&eth, now, 1_000, &same), None, "another key");
        assert_eq!(
            cache.get(&q, now + Duration::from_secs(6), 1_006, &same),
            None,
            "past the service's expiry (5 s), before the ttl (10 s)"
        );
    }

    #[test]
    fn a_listed_yes_covers_what_it_lists() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let yes = Yes {
            expires: None,
            allowed: Some(vec!["/book?symbol=btc".into(), "/trades".into()]),
        };
        cache.put(&question(1, "/trades", None), &yes, now, 0);
        assert!(
            cache
                .get(&question(1, "/book", Some("symbol=btc")), now, 0, &same)
                .is_some()
        );
        assert!(
            cache
                .get(&question(1, "/book", Some("symbol=eth")), now, 0, &same)
                .is_none()
        );
        assert!(
            cache
                .get(&question(2, "/trades", None), now, 0, &same)
                .is_none()
        );
    }

    #[test]
    fn the_oldest_goes_first_beyond_the_size() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let yes = Yes {
            expires: None,
            allowed: None,
        };
        for key in 0..10u8 {
            cache.put(&question(key, "/", None), &yes, now, 0);
            cache.put(&question(key, "/", None), &yes, now, 0);
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&question(9, "/", None), now, 0, &same).is_some());
        assert!(cache.get(&question(0, "/", None), now, 0, &same).is_none());
        assert!(cache.order.len() <= 2 * 2 + 16);
    }
}
