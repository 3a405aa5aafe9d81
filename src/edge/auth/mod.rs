//! Who may connect: each route's client authentication, a step of the
//! upgrade like seats.
//!
//! A route's [`RouteAuth`] is loaded from its `AuthConfig` on the thread
//! that starts or reloads the gateway (its keys read from their files).
//! At the upgrade, on the acceptor thread, [`RouteAuth::check`] finds the
//! client's token (an `Authorization: Bearer` header, a `bearer.TOKEN`
//! subprotocol entry, a cookie or a query parameter), verifies it
//! (`jwt.rs`, pure CPU) and checks what it may open; a route with an auth
//! service then has a [`Question`] for it, which the acceptor answers from
//! its cache (`cache.rs`) or hands to the auth threads (`pool.rs`), never
//! waiting itself. What a client was granted travels with it as the instant
//! its access ends, which its writer enforces.
//!
//! A token is never logged, counted by value, passed upstream or shown:
//! the query parameter that carries one is not part of a lobby key (config
//! validation refuses that), and a subprotocol entry that carries one is
//! never answered back.

pub(crate) mod ask;
pub(crate) mod cache;
pub(crate) mod jwt;
pub(crate) mod pool;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};

use crate::{config::AuthConfig, error::Result, stats::AuthResult};

/// The subprotocol entry prefix a token may come in:
/// `Sec-WebSocket-Protocol: feed.v1, bearer.TOKEN`.
pub(crate) const PROTOCOL_PREFIX: &str = "bearer.";

/// A route's authentication, as the acceptor runs it.
pub(crate) struct RouteAuth {
    /// Its JWT keys, if it checks tokens.
    pub jwt: Option<jwt::Keys>,
    /// Its auth service, if it asks one.
    pub service: Option<Service>,
    /// The claim listing what a token may open.
    token_param: String,
    token_cookie: Option<String>,
}

impl fmt::Debug for RouteAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteAuth")
            .field("jwt", &self.jwt)
            .field("service", &self.service.as_ref().map(|s| &s.url))
            .finish_non_exhaustive()
    }
}

/// Where and how a route asks its auth service.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub url: Arc<str>,
    pub timeout: Duration,
    pub client_header: String,
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// What a client that passed the checks done at the upgrade is granted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Grant {
    /// When its access ends (its token's `exp` plus the leeway), in seconds
    /// since the Unix epoch.
    pub expires: Option<u64>,
    /// The auth service must still be asked.
    pub ask: Option<Box<Question>>,
}

/// A question for a route's auth service about one upgrade: everything
/// the service is sent, owned, so an auth thread can take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Question {
    pub url: Arc<str>,
    pub timeout: Duration,
    /// Header lines sent: the request's target and its credentials.
    pub headers: Vec<(String, String)>,
    /// The header that carries the client's address, and the address
    /// (the acceptor fills it in).
    pub client_header: String,
    pub peer: String,
    /// The credentials' digest: the cache's key.
    pub key: [u8; 32],
    /// The path and query key asked about, for what a yes covers.
    pub path: String,
    pub lobby_key: Option<Arc<str>>,
    /// How long a yes is remembered, and how many at most.
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// Why a client was refused at the upgrade, and with which status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Denied {
    pub result: AuthResult,
    pub status: u16,
    pub why: &'static str,
}

/// What the request carries that authentication reads: borrowed from the
/// request's head.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Presented<'b> {
    /// Its full target, path and query.
    pub target: &'b str,
    pub query: &'b str,
    pub authorization: Option<&'b str>,
    pub cookie: Option<&'b str>,
    pub origin: Option<&'b str>,
    /// Its `Sec-WebSocket-Protocol` values.
    pub protocols: &'b [&'b str],
}

impl RouteAuth {
    /// A route's authentication from its settings, its keys read; `None`
    /// when it has none.
    pub(crate) fn load(auth: &AuthConfig) -> Result<Option<RouteAuth>> {
        if !auth.is_enabled() {
            return Ok(None);
        }
        let service = auth.url.as_ref().map(|url| Service {
            url: Arc::from(url.as_str()),
            timeout: auth.timeout,
            client_header: auth.client_header.clone(),
            cache_ttl: auth.cache_ttl,
            cache_size: auth.cache_size,
        });
        Ok(Some(RouteAuth {
            jwt: jwt::Keys::load(auth)?,
            service,
            token_param: auth.token_param.clone(),
            token_cookie: auth.token_cookie.clone(),
        }))
    }

    /// An authentication by `keys` alone, tokens from the usual places and
    /// the cookie `cookie` (the fuzz harness's).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn with_keys(keys: jwt::Keys, cookie: &str) -> RouteAuth {
        RouteAuth {
            jwt: Some(keys),
            service: None,
            token_param: "access_token".to_owned(),
            token_cookie: Some(cookie.to_owned()),
        }
    }

    /// The client's token, from the first place it is found: the
    /// `Authorization` header, the subprotocol list, the cookie, the query.
    pub(crate) fn token<'b>(&self, req: &Presented<'b>) -> Option<&'b str> {
        let bearer = req.authorization.and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let protocol = || {
            req.protocols
                .iter()
                .flat_map(|v| v.split(','))
                .find_map(|p| p.trim().strip_prefix(PROTOCOL_PREFIX))
        };
        let cookie = || {
            let name = self.token_cookie.as_deref()?;
            req.cookie?.split(';').find_map(|pair| {
                let (n, v) = pair.trim().split_once('=')?;
                (n == name).then(|| v.trim_matches('"'))
            })
        };
        let query = || {
            req.query.split('&').find_map(|pair| {
                let (n, v) = pair.split_once('=')?;
                (n == self.token_param).then_some(v)
            })
        };
        bearer
            .or_else(protocol)
            .or_else(cookie)
            .or_else(query)
            .filter(|t| !t.is_empty())
    }

    /// Checks a request for `path` (and query key `lobby_key`, with
    /// `normalise` turning a query into a key) at `now`, seconds since the
    /// Unix epoch.
    pub(crate) fn check(
        &self,
        req: &Presented<'_>,
        path: &str,
        lobby_key: Option<&Arc<str>>,
        now: u64,
        normalise: impl Fn(&str) -> Option<Arc<str>>,
    ) -> Result<Grant, Denied> {
        let mut grant = Grant::default();
        if let Some(keys) = &self.jwt {
            let Some(token) = self.token(req) else {
                return Err(Denied {
                    result: AuthResult::Missing,
                    status: 401,
                    why: "a token is required",
                });
            };
            let claims = keys.verify(token, now).map_err(|refused| match refused {
                jwt::Refused::Expired => Denied {
                    result: AuthResult::Expired,
                    status: 401,
                    why: "the token has expired or is not valid yet",
                },
                jwt::Refused::Invalid(why) => Denied {
                    result: AuthResult::Invalid,
                    status: 401,
                    why,
                },
            })?;
            if let Some(allowed) = &claims.allowed {
                if !allows(allowed, path, lobby_key, &normalise) {
                    return Err(Denied {
                        result: AuthResult::Forbidden,
                        status: 403,
                        why: "the token does not allow this route",
                    });
                }
            }
            grant.expires = Some(claims.exp.saturating_add(keys.leeway()));
        }
        if let Some(service) = &self.service {
            grant.ask = Some(Box::new(self.question(service, req, path, lobby_key)));
        }
        Ok(grant)
    }

    fn question(
        &self,
        service: &Service,
        req: &Presented<'_>,
        path: &str,
        lobby_key: Option<&Arc<str>>,
    ) -> Question {
        let mut headers = vec![("X-Original-URI".to_owned(), req.target.to_owned())];
        let mut digest = Sha256::new();
        digest.update(service.url.as_bytes());
        for (name, value) in [
            ("Cookie", req.cookie),
            ("Authorization", req.authorization),
            ("Origin", req.origin),
        ] {
            digest.update([0]);
            if let Some(value) = value {
                digest.update(value.as_bytes());
                headers.push((name.to_owned(), value.to_owned()));
            }
        }
        // A token in the query or the subprotocol list is a credential too.
        digest.update([0]);
        if let Some(token) = self.token(req) {
            digest.update(token.as_bytes());
        }
        Question {
            url: Arc::clone(&service.url),
            timeout: service.timeout,
            headers,
            client_header: service.client_header.clone(),
            peer: String::new(),
            key: digest.finalize().into(),
            path: path.to_owned(),
            lobby_key: lobby_key.cloned(),
            cache_ttl: service.cache_ttl,
            cache_size: service.cache_size,
        }
    }
}

/// Whether a list of targets (`"*"`, `"/path"`, `"/path?query"`) allows a
/// client of `path` and query key `key`: a path alone allows all its keys,
/// a path with a query only that key (the query made a key as a client's
/// is, by `normalise`).
pub(crate) fn allows(
    list: &[String],
    path: &str,
    key: Option<&Arc<str>>,
    normalise: &impl Fn(&str) -> Option<Arc<str>>,
) -> bool {
    list.iter().any(|entry| {
        if entry == "*" {
            return true;
        }
        match entry.split_once('?') {
            None => entry == path,
            Some((p, q)) => p == path && key.is_some() && normalise(q).as_ref() == key,
        }
    })
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
