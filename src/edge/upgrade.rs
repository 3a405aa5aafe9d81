//! The HTTP side of the client upgrade: parse the request, answer it.
//!
//! Pure functions over bytes, so the acceptor can feed them whatever a
//! non-blocking socket has delivered so far, and a fuzzer can feed them
//! anything. Every refusal maps to a precise status. Sockets and deadlines
//! live in `acceptor.rs`.
//!
//! The request is parsed with `httparse` (tungstenite's own parser);
//! tungstenite's server handshake is not used because it answers malformed
//! requests with no status at all, and allocates per-connection buffers this
//! gateway does not want. The accept key ([`accept_key`]) serves both sides:
//! the origin's upgrade (`source/websocket/handshake.rs`) checks it too.
//!
//! With feature `sse`, a GET that asks for `text/event-stream` (in its
//! `Accept`) and no upgrade is a Server-Sent Events request: it passes the
//! same path, Origin, query-key and authentication checks, and is answered
//! `200 text/event-stream` with a `retry:` hint and, for a browser, a CORS
//! header. Its `Last-Event-ID` header, or else its `last_event_id` query
//! parameter (which never reaches a lobby key or the origin), must be a
//! message ID (16 hex digits, `wire/sse.rs`): anything else gets 400.
//! A WebSocket upgrade that offers the subprotocol `wsgate.resume.v1`
//! opts into resume (`wire/envelope.rs`): that subprotocol is answered (in
//! place of the route's own, which a route that requires one still checks
//! for), permessage-deflate is negotiated as for any WebSocket client (its
//! lobby compresses the envelope), and its `last_event_id` query
//! parameter is read and kept out of the lobby key, as for a stream. An
//! event stream has no frames: its offer of the extension is declined.

use std::sync::Arc;

#[cfg(feature = "auth")]
use crate::edge::auth::{Grant, Presented, RouteAuth};
use crate::{
    config::syntax::is_query_name,
    control::seat::Refusal,
    id::RouteId,
    stats::AuthResult,
    wire::{deflate, handshake::accept_key},
};

/// Most request headers accepted; more gets 431.
const MAX_HEADERS: usize = 64;

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The request is not complete yet: read more.
    Incomplete,
    /// A valid upgrade: send `response`; bytes after `consumed` are
    /// WebSocket data. The client belongs to `route`, and to the lobbies of
    /// `key` (its normalised query) if the route keys lobbies by query.
    Upgrade {
        response: Vec<u8>,
        consumed: usize,
        route: RouteId,
        key: Option<Arc<str>>,
        /// The client negotiated permessage-deflate.
        deflate: bool,
        /// A Server-Sent Events request (answered 200), not an upgrade.
        sse: bool,
        /// A WebSocket client that opted into resume (the subprotocol
        /// `wsgate.resume.v1`, `wire/envelope.rs`): it gets each message
        /// in its envelope, with its ID.
        envelope: bool,
        /// The message ID an SSE or resume client saw last: it resumes
        /// after it.
        after: Option<u64>,
        /// What its authentication granted (or must still ask).
        #[cfg(feature = "auth")]
        grant: Grant,
    },
    /// Refuse the request with this status.
    Reject(Rejection),
    /// Answer with these bytes and close: a CORS preflight (an `OPTIONS`
    /// a browser sends before a cross-origin event stream with its own
    /// headers, `Authorization` say).
    #[cfg(feature = "sse")]
    Answer(Vec<u8>),
}

/// An HTTP error answer to an upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// Status code, e.g. 404.
    pub status: u16,
    /// Why, for the log line and the response body.
    pub why: &'static str,
    /// Extra response header lines, each ending in CRLF.
    headers: &'static str,
    /// For a refusal by authentication: the route and how it ended.
    pub auth: Option<(RouteId, AuthResult)>,
}

impl Rejection {
    /// No lobby has room and no more origin connections are allowed.
    pub(crate) const FULL: Rejection = Rejection {
        status: 503,
        why: "all lobbies are full; try again later",
        headers: "Retry-After: 5\r\n",
        auth: None,
    };

    /// The gateway holds as many clients as it is allowed to.
    pub(crate) const TOO_MANY_CLIENTS: Rejection = Rejection {
        status: 503,
        why: "too many clients; try again later",
        headers: "Retry-After: 5\r\n",
        auth: None,
    };

    /// The route has as many query keys as it is allowed.
    pub(crate) const TOO_MANY_KEYS: Rejection = Rejection {
        status: 503,
        why: "too many distinct queries on this route; try again later",
        headers: "Retry-After: 5\r\n",
        auth: None,
    };

    /// This address has as many clients connected as it is allowed.
    pub(crate) const TOO_MANY_FROM_ADDRESS: Rejection = Rejection {
        status: 429,
        why: "too many connections from this address",
        headers: "Retry-After: 5\r\n",
        auth: None,
    };

    const fn new(status: u16, why: &'static str) -> Rejection {
        Rejection {
            status,
            why,
            headers: "",
            auth: None,
        }
    }

    /// An authentication's refusal of a client of `route`: 401 says how to
    /// authenticate (RFC 6750), 503 when to try again.
    #[cfg(feature = "auth")]
    pub(crate) const fn auth(
        route: RouteId,
        result: AuthResult,
        status: u16,
        why: &'static str,
    ) -> Rejection {
        Rejection {
            status,
            why,
            headers: match status {
                401 => "WWW-Authenticate: Bearer\r\n",
                503 => "Retry-After: 1\r\n",
                _ => "",
            },
            auth: Some((route, result)),
        }
    }

    /// The complete HTTP response, closing the connection.
    pub(crate) fn response(&self) -> Vec<u8> {
        let body = format!("{}\n", self.why);
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{}",
            self.status,
            reason_phrase(self.status),
            body.len(),
            self.headers,
            body
        )
        .into_bytes()
    }
}

impl From<Refusal> for Rejection {
    /// How the acceptor answers a seat it could not give.
    fn from(refusal: Refusal) -> Rejection {
        match refusal {
            Refusal::FromAddress => Rejection::TOO_MANY_FROM_ADDRESS,
            Refusal::Clients => Rejection::TOO_MANY_CLIENTS,
            Refusal::Full => Rejection::FULL,
            Refusal::Keys => Rejection::TOO_MANY_KEYS,
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// One path the gateway serves, and what a request for it must match.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub route: RouteId,
    pub path: String,
    /// Subprotocols a client may ask for, in the route's order.
    pub subprotocols: Vec<String>,
    /// Refuse (400) a client that offers none of them.
    pub require_subprotocol: bool,
    /// For lobbies keyed by query: the parameters that make the key.
    pub query_params: Option<Vec<String>>,
    /// Negotiate permessage-deflate with clients that offer it.
    pub compression: bool,
    /// The reconnection delay told to SSE clients (`retry:`).
    #[cfg(feature = "sse")]
    pub sse_retry: std::time::Duration,
    /// Who may connect, if not anyone.
    #[cfg(feature = "auth")]
    pub auth: Option<Arc<RouteAuth>>,
}

impl Endpoint {
    /// An endpoint at `path` with no subprotocols and no query key (the
    /// fuzz harness's and the tests').
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn plain(route: RouteId, path: &str) -> Endpoint {
        Endpoint {
            route,
            path: path.to_owned(),
            subprotocols: Vec::new(),
            require_subprotocol: false,
            query_params: None,
            compression: false,
            #[cfg(feature = "sse")]
            sse_retry: std::time::Duration::from_secs(1),
            #[cfg(feature = "auth")]
            auth: None,
        }
    }
}

/// What an upgrade request must match to be accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route<'a> {
    /// The paths served; any other gets 404.
    pub endpoints: &'a [Endpoint],
    /// Browser origins allowed (`Origin` header); empty allows all.
    pub allowed_origins: &'a [String],
    /// The request size limit.
    pub max_bytes: usize,
    /// The time, in seconds since the Unix epoch (tokens' `exp` and `nbf`
    /// are checked against it).
    #[cfg(feature = "auth")]
    pub now: u64,
}

/// Parses the request in `buf`, served at `path`, whose size limit is
/// `max_bytes`, from any origin.
#[cfg(test)]
pub(crate) fn parse(buf: &[u8], path: &str, max_bytes: usize) -> Parsed {
    parse_route(
        buf,
        &Route {
            endpoints: &[Endpoint::plain(RouteId(0), path)],
            allowed_origins: &[],
            max_bytes,
            #[cfg(feature = "auth")]
            now: 0,
        },
    )
}

/// Parses the request in `buf` against `route`.
pub(crate) fn parse_route(buf: &[u8], route: &Route<'_>) -> Parsed {
    let max_bytes = route.max_bytes;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // Only the first `max_bytes` can hold the head: bytes past the limit must
    // not change the verdict, however the request was split into reads.
    let head = &buf[..buf.len().min(max_bytes)];
    let consumed = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < max_bytes => return Parsed::Incomplete,
        Ok(httparse::Status::Partial) => return reject(431, "request headers too large"),
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many request headers"),
        Err(_) => return reject(400, "malformed HTTP request"),
    };
    #[cfg(feature = "sse")]
    if req.method == Some("OPTIONS") {
        return match preflight(&req, route) {
            Ok(answer) => Parsed::Answer(answer),
            Err(rejection) => Parsed::Reject(rejection),
        };
    }
    match check(&req, route) {
        #[cfg(feature = "sse")]
        Ok(accepted) if accepted.sse => Parsed::Upgrade {
            response: sse_response(&accepted, route.allowed_origins),
            consumed,
            route: accepted.endpoint.route,
            key: accepted.lobby_key,
            deflate: false,
            sse: true,
            envelope: false,
            after: accepted.after,
            #[cfg(feature = "auth")]
            grant: accepted.grant,
        },
        Ok(accepted) => {
            let protocol = accepted
                .protocol
                .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
                .unwrap_or_default();
            let extensions = accepted
                .deflate
                .map(|answer| format!("Sec-WebSocket-Extensions: {answer}\r\n"))
                .unwrap_or_default();
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}{extensions}\r\n",
                accept_key(accepted.key.as_bytes())
            );
            Parsed::Upgrade {
                response: response.into_bytes(),
                consumed,
                route: accepted.endpoint.route,
                key: accepted.lobby_key,
                deflate: accepted.deflate.is_some(),
                sse: false,
                envelope: accepted.envelope,
                after: accepted.after,
                #[cfg(feature = "auth")]
                grant: accepted.grant,
            }
        }
        Err(rejection) => Parsed::Reject(rejection),
    }
}

/// The answer to an SSE request: 200, the event-stream headers, a CORS
/// header for a browser whose Origin is allowed (`*` where every origin
/// is), and the body's first bytes: the `retry:` hint.
#[cfg(feature = "sse")]
fn sse_response(accepted: &Accepted<'_, '_>, allowed_origins: &[String]) -> Vec<u8> {
    let cors = accepted
        .origin
        .map(|origin| cors_headers(origin, allowed_origins))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Accel-Buffering: no\r\n{cors}\r\nretry: {}\n\n",
        accepted.endpoint.sse_retry.as_millis()
    )
    .into_bytes()
}

/// Request headers a cross-origin event stream may carry, as a preflight
/// answers them.
#[cfg(feature = "sse")]
const PREFLIGHT_HEADERS: &str = "Authorization, Last-Event-ID, Cache-Control, Accept";

/// The CORS headers for an allowed browser `origin`: `*` where every origin
/// is allowed; otherwise the origin itself, with credentials (a cookie or
/// an `Authorization` header may carry its token).
#[cfg(feature = "sse")]
fn cors_headers(origin: &str, allowed_origins: &[String]) -> String {
    if allowed_origins.is_empty() {
        "Access-Control-Allow-Origin: *\r\n".to_owned()
    } else {
        format!(
            "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
        )
    }
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-
/// Method: GET`) for a served path, from an allowed origin: 204 with what a
/// cross-origin event stream may send. Any other `OPTIONS` gets 405, an
/// unknown path 404, an origin off the list 403.
#[cfg(feature = "sse")]
fn preflight(req: &httparse::Request<'_, '_>, route: &Route<'_>) -> Result<Vec<u8>, Rejection> {
    let target = req.path.unwrap_or("");
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if !route.endpoints.iter().any(|e| e.path == path) {
        return Err(Rejection::new(404, "no WebSocket endpoint at this path"));
    }
    let header = |name| header_values(req.headers, name);
    let not_get = Rejection {
        headers: "Allow: GET\r\n",
        ..Rejection::new(405, NOT_GET)
    };
    let Some(origin) = header("Origin").next() else {
        return Err(not_get);
    };
    let allowed = route.allowed_origins;
    if !allowed.is_empty() && !allowed.iter().any(|a| same_origin(a, origin)) {
        return Err(Rejection::new(403, "origin not allowed"));
    }
    if !header("Access-Control-Request-Method").any(|m| m.trim() == "GET") {
        return Err(not_get);
    }
    Ok(format!(
        "HTTP/1.1 204 No Content\r\n{}Access-Control-Allow-Methods: GET\r\nAccess-Control-Allow-Headers: {PREFLIGHT_HEADERS}\r\nAccess-Control-Max-Age: 600\r\nConnection: close\r\n\r\n",
        cors_headers(origin, allowed)
    )
    .into_bytes())
}

/// Whether an `Accept` header lists `text/event-stream` (parameters and
/// case aside; `*/*` does not count: that client did not ask for a stream).
#[cfg(feature = "sse")]
fn accepts_event_stream<'a>(mut accept: impl Iterator<Item = &'a str>) -> bool {
    accept.any(|value| {
        value.split(',').any(|range| {
            let media = range.split(';').next().unwrap_or_default();
            media.trim().eq_ignore_ascii_case("text/event-stream")
        })
    })
}

/// The message ID an SSE client resumes after: its `Last-Event-ID` header,
/// or its `last_event_id` query parameter; `Err` if it is not an ID.
#[cfg(feature = "sse")]
fn last_event_id(header: Option<&str>, query: &str) -> Result<Option<u64>, Rejection> {
    let from_query = || {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == LAST_EVENT_ID_PARAM)
            .map(|(_, value)| value)
    };
    match header.map(str::trim).or_else(from_query) {
        None | Some("") => Ok(None),
        Some(text) => crate::wire::sse::parse_id(text)
            .map(Some)
            .ok_or(Rejection::new(
                400,
                "malformed Last-Event-ID: a message ID is 16 hex digits",
            )),
    }
}

/// The query parameter a first SSE connection resumes with.
#[cfg(feature = "sse")]
const LAST_EVENT_ID_PARAM: &str = "last_event_id";

/// `query` without its `last_event_id` parameters: a resume position is
/// not part of a lobby key.
#[cfg(feature = "sse")]
fn without_last_event_id(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some(LAST_EVENT_ID_PARAM))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decides when a request buffer that grows read by read is worth parsing:
/// once it holds the end of the head, once it exceeds the size limit, and
/// whenever it has doubled since the last parse (so a request that is
/// malformed from its first bytes is refused early). Searching for the end
/// of the head resumes where it stopped, so the work stays linear in the
/// request's size however it is split into reads; parsing at every read
/// would be quadratic for a request sent a byte at a time.
#[derive(Debug, Default)]
pub(crate) struct HeadScan {
    /// Bytes already searched for the end of the head.
    scanned: usize,
    /// Parse again once the buffer holds this many bytes.
    parse_at: usize,
}

impl HeadScan {
    /// Whether `buf` (the request so far) should be parsed now.
    pub(crate) fn should_parse(&mut self, buf: &[u8], max_bytes: usize) -> bool {
        // A head ends with an empty line: "\n\n" or "\n\r\n".
        let from = self.scanned.saturating_sub(2);
        let is_complete = buf.get(from..).is_some_and(|tail| {
            tail.iter().enumerate().any(|(i, &b)| {
                b == b'\n'
                    && (tail.get(i + 1) == Some(&b'\n')
                        || tail.get(i + 1..i + 3) == Some(&b"\r\n"[..]))
            })
        });
        self.scanned = buf.len();
        if is_complete || buf.len() > max_bytes || buf.len() >= self.parse_at {
            self.parse_at = buf.len().saturating_mul(2);
            return true;
        }
        false
    }
}

fn reject(status: u16, why: &'static str) -> Parsed {
    Parsed::Reject(Rejection::new(status, why))
}

/// A request that passed every check.
struct Accepted<'b, 'r> {
    endpoint: &'r Endpoint,
    /// Its `Sec-WebSocket-Key`.
    key: &'b str,
    /// The subprotocol chosen, if any.
    protocol: Option<&'r str>,
    /// Its normalised query, for a route keyed by query.
    lobby_key: Option<Arc<str>>,
    /// The `Sec-WebSocket-Extensions` answer, if permessage-deflate was agreed.
    deflate: Option<&'static str>,
    /// A Server-Sent Events request.
    #[cfg(feature = "sse")]
    sse: bool,
    /// A WebSocket client that offered the resume subprotocol.
    envelope: bool,
    /// For SSE or a resume client: the message ID it resumes after.
    after: Option<u64>,
    /// For SSE: its `Origin`, if a browser sent one (and it is allowed).
    #[cfg(feature = "sse")]
    origin: Option<&'b str>,
    /// What its authentication granted.
    #[cfg(feature = "auth")]
    grant: Grant,
}

/// Checks a complete request against the endpoints.
fn check<'b, 'r>(
    req: &httparse::Request<'_, 'b>,
    route: &Route<'r>,
) -> Result<Accepted<'b, 'r>, Rejection> {
    if req.method != Some("GET") {
        return Err(Rejection {
            headers: "Allow: GET\r\n",
            ..Rejection::new(405, NOT_GET)
        });
    }
    if req.version != Some(1) {
        return Err(Rejection::new(400, "HTTP/1.1 is required"));
    }
    let target = req.path.unwrap_or("");
    let (req_path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(endpoint) = route.endpoints.iter().find(|e| e.path == req_path) else {
        return Err(Rejection::new(404, "no WebSocket endpoint at this path"));
    };
    let header = |name| header_values(req.headers, name);
    let has_token = |name, token: &str| {
        header(name).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    #[cfg(feature = "sse")]
    let sse = !has_token("Upgrade", "websocket") && accepts_event_stream(header("Accept"));
    #[cfg(not(feature = "sse"))]
    let sse = false;
    if !sse && (!has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade")) {
        return Err(Rejection {
            headers: "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            ..Rejection::new(426, NEITHER)
        });
    }
    if !sse && !header("Sec-WebSocket-Version").any(|v| v.trim() == "13") {
        return Err(Rejection {
            headers: "Sec-WebSocket-Version: 13\r\n",
            ..Rejection::new(426, "unsupported WebSocket version")
        });
    }
    if let Some(origin) = header("Origin").next() {
        let allowed = route.allowed_origins;
        if !allowed.is_empty() && !allowed.iter().any(|a| same_origin(a, origin)) {
            return Err(Rejection::new(403, "origin not allowed"));
        }
    }
    let key = match header("Sec-WebSocket-Key").next().map(str::trim) {
        _ if sse => "",
        Some(key) if is_valid_key(key) => key,
        _ => {
            return Err(Rejection::new(
                400,
                "missing or malformed Sec-WebSocket-Key",
            ));
        }
    };
    // The first subprotocol the client offers that the route lists.
    let protocol = header("Sec-WebSocket-Protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|offered| endpoint.subprotocols.iter().find(|p| p.as_str() == offered))
        .map(String::as_str)
        .filter(|_| !sse);
    // An event stream has no subprotocol to offer.
    if protocol.is_none() && endpoint.require_subprotocol && !sse {
        return Err(Rejection::new(400, "no subprotocol this endpoint speaks"));
    }
    // Resume is answered in place of the route's subprotocol: an answer
    // names one, and this one says how every message is framed.
    #[cfg(feature = "sse")]
    let envelope = !sse
        && header("Sec-WebSocket-Protocol")
            .flat_map(|v| v.split(','))
            .any(|offered| offered.trim() == crate::wire::envelope::PROTOCOL);
    #[cfg(not(feature = "sse"))]
    let envelope = false;
    #[cfg(feature = "sse")]
    let protocol = if envelope {
        Some(crate::wire::envelope::PROTOCOL)
    } else {
        protocol
    };
    #[cfg(feature = "sse")]
    let keyed = if sse || envelope {
        std::borrow::Cow::Owned(without_last_event_id(query))
    } else {
        std::borrow::Cow::Borrowed(query)
    };
    #[cfg(not(feature = "sse"))]
    let keyed = std::borrow::Cow::Borrowed(query);
    let lobby_key = match &endpoint.query_params {
        Some(params) => Some(
            lobby_key(&keyed, params)
                .ok_or_else(|| Rejection::new(400, "malformed query string"))?,
        ),
        None => None,
    };
    // A browser cannot set a header on a WebSocket: a resume client's
    // position is in the query only.
    #[cfg(feature = "sse")]
    let after = if sse {
        last_event_id(header("Last-Event-ID").next(), query)?
    } else if envelope {
        last_event_id(None, query)?
    } else {
        None
    };
    #[cfg(not(feature = "sse"))]
    let after = None;
    // A resume client negotiates as any WebSocket client (its lobby
    // compresses the envelope); an event stream has no frames to compress.
    let deflate = endpoint
        .compression
        .then(|| deflate::negotiate(header("Sec-WebSocket-Extensions")))
        .flatten()
        .filter(|_| !sse);
    #[cfg(feature = "auth")]
    let grant = match &endpoint.auth {
        None => Grant::default(),
        Some(auth) => {
            let protocols: Vec<&str> = header("Sec-WebSocket-Protocol").filter(|_| !sse).collect();
            let presented = Presented {
                target,
                query,
                authorization: header("Authorization").next(),
                cookie: header("Cookie").next(),
                origin: header("Origin").next(),
                protocols: &protocols,
            };
            let params = endpoint.query_params.as_deref().unwrap_or_default();
            auth.check(&presented, req_path, lobby_key.as_ref(), route.now, |q| {
                self::lobby_key(q, params)
            })
            .map_err(|d| Rejection::auth(endpoint.route, d.result, d.status, d.why))?
        }
    };
    Ok(Accepted {
        endpoint,
        key,
        protocol,
        lobby_key,
        deflate,
        #[cfg(feature = "sse")]
        sse,
        envelope,
        after,
        #[cfg(feature = "sse")]
        origin: header("Origin").next(),
        #[cfg(feature = "auth")]
        grant,
    })
}

/// Why a request that is not a GET is refused.
#[cfg(feature = "sse")]
const NOT_GET: &str = "only GET is served: a WebSocket upgrade or an event stream";
#[cfg(not(feature = "sse"))]
const NOT_GET: &str = "only GET can upgrade to a WebSocket";

/// Why a GET that asks for neither a WebSocket nor an event stream is refused.
#[cfg(feature = "sse")]
const NEITHER: &str =
    "ask for a WebSocket upgrade, or for Server-Sent Events with Accept: text/event-stream";
#[cfg(not(feature = "sse"))]
const NEITHER: &str = "this endpoint only speaks WebSocket";

/// A query string's lobby key: the parameters named in `params`, sorted
/// (by name, then value), joined with `&`; `None` if a parameter is not
/// well formed (a name or value needing more than letters, digits, `-_.~`
/// and `%XX` escapes), so nothing odd can reach the origin URL.
pub(crate) fn lobby_key(query: &str, params: &[String]) -> Option<Arc<str>> {
    let mut kept: Vec<(&str, &str)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !is_query_name(name) || !is_query_value(value) {
            return None;
        }
        if params.iter().any(|p| p == name) {
            kept.push((name, value));
        }
    }
    kept.sort_unstable();
    let key: Vec<String> = kept.iter().map(|(n, v)| format!("{n}={v}")).collect();
    Some(Arc::from(key.join("&")))
}

/// A query value: unreserved characters and well-formed `%XX` escapes.
fn is_query_value(value: &str) -> bool {
    let b = value.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if b
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) => i += 1,
            _ => return false,
        }
    }
    true
}

/// Whether two origins (`scheme://host[:port]`) are the same; scheme and
/// host compare without case, a trailing slash is ignored.
fn same_origin(a: &str, b: &str) -> bool {
    a.trim()
        .trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim().trim_end_matches('/'))
}

/// The values of every header called `name`, skipping non-UTF-8 ones.
fn header_values<'h, 'b>(
    headers: &'h [httparse::Header<'b>],
    name: &'h str,
) -> impl Iterator<Item = &'b str> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

/// A key is 16 bytes in base64: 22 symbols then `==`.
fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route over `endpoints` allowing `allowed` origins, 8 KiB requests.
    fn route_over<'a>(endpoints: &'a [Endpoint], allowed: &'a [String]) -> Route<'a> {
        Route {
            endpoints,
            allowed_origins: allowed,
            max_bytes: 8192,
            #[cfg(feature = "auth")]
            now: 0,
        }
    }

    #[test]
    fn a_refused_seat_is_answered_429_from_one_address_and_503_when_full() {
        let status = |r| Rejection::from(r).status;
        assert_eq!(status(Refusal::FromAddress), 429);
        for full in [Refusal::Clients, Refusal::Full, Refusal::Keys] {
            assert_eq!(status(full), 503, "{full:?}");
            assert!(Rejection::from(full).headers.contains("Retry-After"));
        }
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(first_line: &str, extra: &str) -> String {
        format!(
            "{first_line}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    fn status(parsed: Parsed) -> u16 {
        match parsed {
            Parsed::Upgrade { sse: true, .. } => 200,
            Parsed::Upgrade { .. } => 101,
            Parsed::Reject(r) => r.status,
            #[cfg(feature = "sse")]
            Parsed::Answer(_) => 204,
            Parsed::Incomplete => 0,
        }
    }

    #[test]
    fn accepts_a_valid_upgrade_and_keeps_trailing_bytes() {
        let mut bytes = request("GET /?room=1 HTTP/1.1", "").into_bytes();
        let head = bytes.len();
        bytes.extend_from_slice(b"\x81\x80");
        match parse(&bytes, "/", 8192) {
            Parsed::Upgrade {
                response, consumed, ..
            } => {
                assert_eq!(consumed, head);
                let text = String::from_utf8(response).unwrap();
                // The RFC 6455 §1.3 example.
                assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn permessage_deflate_is_answered_where_the_route_compresses() {
        let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
        let bytes = request("GET / HTTP/1.1", offer);
        let answer = |compression| {
            let endpoints = [Endpoint {
                compression,
                ..Endpoint::plain(RouteId(0), "/")
            }];
            let route = route_over(&endpoints, &[]);
            match parse_route(bytes.as_bytes(), &route) {
                Parsed::Upgrade {
                    response, deflate, ..
                } => (String::from_utf8(response).unwrap(), deflate),
                other => panic!("{other:?}"),
            }
        };
        let (text, deflate) = answer(true);
        assert_eq!(deflate, cfg!(feature = "compression"));
        assert_eq!(
            text.contains(
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
            ),
            cfg!(feature = "compression"),
            "{text}"
        );
        let (text, deflate) = answer(false);
        assert!(!deflate && !text.contains("Extensions"), "{text}");
    }

    #[test]
    fn waits_for_the_rest_of_the_request() {
        let bytes = request("GET / HTTP/1.1", "");
        for cut in [0, 5, bytes.len() - 1] {
            assert_eq!(
                parse(&bytes.as_bytes()[..cut], "/", 8192),
                Parsed::Incomplete
            );
        }
    }

    #[test]
    fn a_request_sent_a_byte_at_a_time_is_parsed_a_logarithmic_number_of_times() {
        let bytes = request(
            "GET / HTTP/1.1",
            &format!("X-Pad: {}\r\n", "p".repeat(6000)),
        );
        let mut scan = HeadScan::default();
        let mut parses = 0;
        let mut verdict = Parsed::Incomplete;
        for end in 1..=bytes.len() {
            if scan.should_parse(&bytes.as_bytes()[..end], 8192) {
                parses += 1;
                verdict = parse(&bytes.as_bytes()[..end], "/", 8192);
            }
        }
        assert_eq!(status(verdict), 101);
        assert!(parses <= 16, "{parses} parses for {} bytes", bytes.len());
    }

    #[test]
    fn the_scan_finds_the_end_of_the_head_split_anywhere() {
        for head in ["GET / HTTP/1.1\r\nA: b\r\n\r\n", "GET / HTTP/1.1\nA: b\n\n"] {
            for cut in 1..head.len() {
                let mut scan = HeadScan {
                    scanned: 0,
                    parse_at: usize::MAX,
                };
                assert!(
                    !scan.should_parse(&head.as_bytes()[..cut], 8192),
                    "{head:?} {cut}"
                );
                assert!(scan.should_parse(head.as_bytes(), 8192), "{head:?} {cut}");
            }
        }
    }

    fn endpoints() -> Vec<Endpoint> {
        vec![
            Endpoint::plain(RouteId(0), "/prices"),
            Endpoint {
                subprotocols: vec!["v2".into(), "v1".into()],
                require_subprotocol: true,
                query_params: Some(vec!["symbol".into(), "depth".into()]),
                ..Endpoint::plain(RouteId(1), "/book")
            },
        ]
    }

    fn upgrade(target: &str, extra: &str) -> Parsed {
        let endpoints = endpoints();
        let bytes = request(&format!("GET {target} HTTP/1.1"), extra);
        let route = route_over(&endpoints, &[]);
        parse_route(bytes.as_bytes(), &route)
    }

    #[test]
    fn each_path_goes_to_its_route_and_others_get_404() {
        let prices = upgrade("/prices?ignored=1", "");
        assert!(
            matches!(
                prices,
                Parsed::Upgrade {
                    route: RouteId(0),
                    key: None,
                    ..
                }
            ),
            "{prices:?}"
        );
        assert_eq!(status(upgrade("/nowhere", "")), 404);
        assert_eq!(status(upgrade("/pricesx", "")), 404);
    }

    #[test]
    fn the_first_offered_subprotocol_the_route_lists_is_chosen() {
        let book = |offer: &str| upgrade("/book", &format!("Sec-WebSocket-Protocol: {offer}\r\n"));
        for (offer, chosen) in [("v1, v2", "v1"), ("x, v2", "v2"), ("v2,v1", "v2")] {
            match book(offer) {
                Parsed::Upgrade { response, .. } => {
                    let text = String::from_utf8(response).unwrap();
                    let want = format!("Sec-WebSocket-Protocol: {chosen}\r\n");
                    assert!(text.contains(&want), "{offer}: {text}");
                }
                other => panic!("{offer}: {other:?}"),
            }
        }
        assert_eq!(status(book("x, y")), 400, "the route requires one");
        assert_eq!(status(upgrade("/book", "")), 400);
        // A route listing none ignores the header.
        let plain = upgrade("/prices", "Sec-WebSocket-Protocol: v1\r\n");
        match plain {
            Parsed::Upgrade { response, .. } => {
                let text = String::from_utf8(response).unwrap();
                assert!(!text.contains("Sec-WebSocket-Protocol"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[cfg(feature = "sse")]
    #[test]
    fn the_resume_subprotocol_is_answered_alone_with_compression_and_its_position() {
        let endpoints = [Endpoint {
            compression: true,
            ..Endpoint::plain(RouteId(0), "/prices")
        }];
        let offer = "Sec-WebSocket-Protocol: bearer.secret, wsgate.resume.v1\r\n\
                     Sec-WebSocket-Extensions: permessage-deflate\r\n";
        let bytes = request("GET /prices?last_event_id=00000000000000ff HTTP/1.1", offer);
        match parse_route(bytes.as_bytes(), &route_over(&endpoints, &[])) {
            Parsed::Upgrade {
                response,
                envelope: true,
                deflate,
                after: Some(0xff),
                ..
            } => {
                let text = String::from_utf8(response).unwrap();
                assert!(
                    text.contains("Sec-WebSocket-Protocol: wsgate.resume.v1\r\n"),
                    "{text}"
                );
                assert!(
                    !text.contains("bearer"),
                    "a token is never answered: {text}"
                );
                // Compression is negotiated as for any WebSocket client.
                let compresses = cfg!(feature = "compression");
                assert_eq!(deflate, compresses);
                assert_eq!(
                    text.contains(
                        "Sec-WebSocket-Extensions: permessage-deflate; \
                         server_no_context_takeover; client_no_context_takeover\r\n"
                    ),
                    compresses,
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Beside the route's own, which a route that requires one checks
        // for; the position is not part of the key.
        let book = |target: &str, offer: &str| {
            upgrade(target, &format!("Sec-WebSocket-Protocol: {offer}\r\n"))
        };
        match book(
            "/book?last_event_id=0000000000000001&symbol=btc",
            "v1, wsgate.resume.v1",
        ) {
            Parsed::Upgrade {
                response,
                key,
                envelope: true,
                after: Some(1),
                ..
            } => {
                let text = String::from_utf8(response).unwrap();
                assert!(text.contains("Sec-WebSocket-Protocol: wsgate.resume.v1\r\n"));
                assert_eq!(key.as_deref(), Some("symbol=btc"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(status(book("/book?symbol=btc", "wsgate.resume.v1")), 400);
        assert_eq!(
            status(book("/prices?last_event_id=12", "wsgate.resume.v1")),
            400,
            "not a message ID"
        );
        // A plain client's query is as ever: no position, no envelope.
        assert!(matches!(
            upgrade("/prices?last_event_id=0000000000000001", ""),
            Parsed::Upgrade {
                envelope: false,
                after: None,
                ..
            }
        ));
    }

    #[test]
    fn query_keys_keep_the_routes_parameters_sorted_and_refuse_odd_bytes() {
        let proto = "Sec-WebSocket-Protocol: v1\r\n";
        let key = |target: &str| match upgrade(target, proto) {
            Parsed::Upgrade { key, .. } => key.map(|k| k.to_string()),
            other => panic!("{target}: {other:?}"),
        };
        assert_eq!(key("/book?symbol=btc").as_deref(), Some("symbol=btc"));
        assert_eq!(
            key("/book?x=1&symbol=eth&depth=10").as_deref(),
            Some("depth=10&symbol=eth"),
            "sorted, unknown names dropped"
        );
        assert_eq!(key("/book").as_deref(), Some(""));
        assert_eq!(key("/book?symbol=a%2Fb").as_deref(), Some("symbol=a%2Fb"));
        for bad in [
            "/book?symbol=a b",
            "/book?symbol=<x>",
            "/book?symbol=%zz",
            "/book?s*=1",
        ] {
            assert_eq!(status(upgrade(bad, proto)), 400, "{bad}");
        }
    }

    #[test]
    fn each_refusal_has_its_status() {
        let cases = [
            (request("POST / HTTP/1.1", ""), 405),
            (request("GET /other HTTP/1.1", ""), 404),
            (request("GET / HTTP/1.0", ""), 400),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 426),
            (
                request("GET / HTTP/1.1", "").replace("Version: 13", "Version: 8"),
                426,
            ),
            (request("GET / HTTP/1.1", "").replace(KEY, "short"), 400),
            ("\x16\x03\x01garbage\r\n\r\n".to_owned(), 400),
        ];
        for (req, want) in cases {
            assert_eq!(status(parse(req.as_bytes(), "/", 8192)), want, "{req:?}");
        }
    }

    #[cfg(feature = "sse")]
    fn stream(target: &str, extra: &str) -> Parsed {
        let endpoints = endpoints();
        let bytes =
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra}\r\n");
        let route = route_over(&endpoints, &[]);
        parse_route(bytes.as_bytes(), &route)
    }

    #[cfg(feature = "sse")]
    #[test]
    fn an_event_stream_request_is_answered_200_with_its_resume_point() {
        match stream("/prices", "Last-Event-ID: 00000000000000ff\r\n") {
            Parsed::Upgrade {
                response,
                sse: true,
                after: Some(0xff),
                deflate: false,
                ..
            } => {
                let text = String::from_utf8(response).unwrap();
                assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
                assert!(text.contains("Content-Type: text/event-stream\r\n"));
                assert!(text.ends_with("\r\n\r\nretry: 1000\n\n"), "{text}");
                assert!(!text.contains("Access-Control"), "no Origin, no CORS");
            }
            other => panic!("{other:?}"),
        }
        // A stream has no frames: an offer of compression is declined on a
        // route that compresses (where a WebSocket, resume or not, gets it).
        let compressing = [Endpoint {
            compression: true,
            ..Endpoint::plain(RouteId(0), "/prices")
        }];
        let bytes = "GET /prices HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\
                     Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
        match parse_route(bytes.as_bytes(), &route_over(&compressing, &[])) {
            Parsed::Upgrade {
                response,
                sse: true,
                deflate: false,
                ..
            } => {
                let text = String::from_utf8(response).unwrap();
                assert!(!text.contains("Extensions"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        // The query form; the header wins over it; neither is part of the key.
        for (target, extra, want) in [
            (
                "/book?symbol=btc&last_event_id=0000000000000001",
                "",
                Some(1),
            ),
            (
                "/book?last_event_id=0000000000000001&symbol=btc",
                "Last-Event-ID: 0000000000000002\r\n",
                Some(2),
            ),
            ("/book?symbol=btc", "", None),
        ] {
            match stream(target, extra) {
                Parsed::Upgrade { key, after, .. } => {
                    assert_eq!(key.as_deref(), Some("symbol=btc"), "{target}");
                    assert_eq!(after, want, "{target}");
                }
                other => panic!("{target}: {other:?}"),
            }
        }
        // A route requiring a subprotocol has none to require of a stream.
        assert!(matches!(
            stream("/book?symbol=btc", ""),
            Parsed::Upgrade { sse: true, .. }
        ));
    }

    #[cfg(feature = "sse")]
    #[test]
    fn an_event_stream_request_that_is_not_one_gets_its_status() {
        for bad in [
            "Last-Event-ID: 1\r\n",
            "Last-Event-ID: 00000000000000fg\r\n",
        ] {
            assert_eq!(status(stream("/prices", bad)), 400, "{bad}");
        }
        assert_eq!(status(stream("/prices?last_event_id=x", "")), 400);
        assert_eq!(status(stream("/nowhere", "")), 404);
        let accept = |value: &str| {
            let endpoints = [Endpoint::plain(RouteId(0), "/")];
            let route = route_over(&endpoints, &[]);
            let bytes = format!("GET / HTTP/1.1\r\nHost: x\r\nAccept: {value}\r\n\r\n");
            status(parse_route(bytes.as_bytes(), &route))
        };
        assert_eq!(accept("*/*"), 426, "not asked for a stream");
        assert_eq!(accept("text/html"), 426);
        assert_eq!(accept("text/html, Text/Event-Stream;q=0.9"), 200);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_cors_preflight_from_an_allowed_origin_gets_204_with_what_a_stream_may_send() {
        let endpoints = [Endpoint::plain(RouteId(0), "/feed")];
        let listed = vec!["https://app.example".to_owned()];
        let preflight = |allowed: &[String], target: &str, extra: &str| {
            let route = route_over(&endpoints, allowed);
            let bytes = format!("OPTIONS {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
            parse_route(bytes.as_bytes(), &route)
        };
        let asks = "Origin: https://app.example\r\nAccess-Control-Request-Method: GET\r\n\
                    Access-Control-Request-Headers: authorization, last-event-id\r\n";
        match preflight(&listed, "/feed?symbol=btc", asks) {
            Parsed::Answer(answer) => {
                let text = String::from_utf8(answer).unwrap();
                assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
                for line in [
                    "Access-Control-Allow-Origin: https://app.example\r\n",
                    "Access-Control-Allow-Credentials: true\r\n",
                    "Vary: Origin\r\n",
                    "Access-Control-Allow-Methods: GET\r\n",
                    "Access-Control-Allow-Headers: Authorization, Last-Event-ID, Cache-Control, Accept\r\n",
                ] {
                    assert!(text.contains(line), "{line:?} in {text}");
                }
            }
            other => panic!("{other:?}"),
        }
        match preflight(&[], "/feed", asks) {
            Parsed::Answer(answer) => {
                let text = String::from_utf8(answer).unwrap();
                assert!(
                    text.contains("Access-Control-Allow-Origin: *\r\n"),
                    "{text}"
                );
                assert!(!text.contains("Credentials"), "not with *: {text}");
            }
            other => panic!("{other:?}"),
        }
        let elsewhere = "Origin: https://evil.example\r\nAccess-Control-Request-Method: GET\r\n";
        assert_eq!(status(preflight(&listed, "/feed", elsewhere)), 403);
        assert_eq!(status(preflight(&listed, "/nowhere", asks)), 404);
        let post = "Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n";
        assert_eq!(status(preflight(&listed, "/feed", post)), 405);
        assert_eq!(
            status(preflight(&listed, "/feed", "")),
            405,
            "not a preflight"
        );
    }

    #[test]
    fn origins_off_the_list_get_403() {
        let allowed = vec!["https://app.example".to_owned()];
        let endpoints = [Endpoint::plain(RouteId(0), "/")];
        let route = route_over(&endpoints, &allowed);
        let with_origin =
            |origin: &str| request("GET / HTTP/1.1", &format!("Origin: {origin}\r\n"));
        assert_eq!(
            status(parse_route(
                with_origin("https://app.example").as_bytes(),
                &route
            )),
            101
        );
        assert_eq!(
            status(parse_route(
                with_origin("HTTPS://APP.example/").as_bytes(),
                &route
            )),
            101
        );
        assert_eq!(
            status(parse_route(
                with_origin("https://evil.example").as_bytes(),
                &route
            )),
            403
        );
        assert_eq!(
            status(parse_route(with_origin("null").as_bytes(), &route)),
            403
        );
        // Non-browser clients send no Origin; an empty list allows every origin.
        assert_eq!(
            status(parse_route(
                request("GET / HTTP/1.1", "").as_bytes(),
                &route
            )),
            101
        );
        assert_eq!(
            status(parse(
                with_origin("https://evil.example").as_bytes(),
                "/",
                8192
            )),
            101
        );
    }

    #[test]
    fn oversized_requests_get_431() {
        let big = request(
            "GET / HTTP/1.1",
            &format!("X-Pad: {}\r\n", "a".repeat(9000)),
        );
        assert_eq!(status(parse(big.as_bytes(), "/", 8192)), 431);
        assert_eq!(status(parse(&big.as_bytes()[..8192], "/", 8192)), 431);
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            status(parse(
                request("GET / HTTP/1.1", &many).as_bytes(),
                "/",
                8192
            )),
            431
        );
    }

    #[test]
    fn rejection_is_a_complete_response() {
        let text = String::from_utf8(Rejection::new(404, "nope").response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.ends_with("\r\n\r\nnope\n"));
        assert!(text.contains("Content-Length: 5\r\n"));
    }
}

#[cfg(test)]
mod props {
    //! Property tests of [`parse`] over generated requests. Each answer is
    //! checked by `crate::fuzz` (which the fuzz target shares): a status in
    //! 400..=599 and a complete response for every refusal, a 101 for every
    //! upgrade, `Incomplete` only below the limit, and verdicts that stay the
    //! same for every longer prefix of the request.

    use super::*;
    use crate::fuzz;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// `name` in one of the spellings HTTP allows (field names are case-insensitive).
    fn name(name: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![
            Just(name.to_owned()),
            Just(name.to_ascii_lowercase()),
            Just(name.to_ascii_uppercase()),
        ]
    }

    /// Optional whitespace around a field value.
    fn ows() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(""), Just(" "), Just("  "), Just("\t")]
    }

    fn header(
        n: impl Strategy<Value = String>,
        value: impl Strategy<Value = String>,
    ) -> impl Strategy<Value = String> {
        (n, ows(), value, ows()).prop_map(|(n, a, v, b)| format!("{n}:{a}{v}{b}"))
    }

    /// A valid upgrade request head for `path` (headers in any order, any
    /// case, extra headers and tokens), and that path.
    fn valid_request() -> impl Strategy<Value = (String, &'static str)> {
        let path = prop_oneof![Just("/"), Just("/ws"), Just("/feed/live")];
        let query = prop_oneof![Just(""), Just("?room=1"), Just("?a=b&c=/d")];
        let key = "[A-Za-z0-9+/]{22}".prop_map(|k| format!("{k}=="));
        let headers = (
            header(name("Host"), Just("example.com".to_owned())),
            header(
                name("Upgrade"),
                prop_oneof![Just("websocket"), Just("WebSocket"), Just("h2c, websocket")]
                    .prop_map(str::to_owned),
            ),
            header(
                name("Connection"),
                prop_oneof![
                    Just("Upgrade"),
                    Just("upgrade"),
                    Just("keep-alive, Upgrade")
                ]
                .prop_map(str::to_owned),
            ),
            header(name("Sec-WebSocket-Version"), Just("13".to_owned())),
            header(name("Sec-WebSocket-Key"), key),
            vec(header("X-[A-Za-z]{1,8}", "[ -~]{0,30}"), 0..6),
        )
            .prop_map(|(h, u, c, v, k, extra)| {
                let mut all = vec![h, u, c, v, k];
                all.extend(extra);
                all
            })
            .prop_shuffle();
        let newline = prop_oneof![Just("\r\n"), Just("\n")];
        (path, query, headers, newline).prop_map(|(path, query, headers, nl)| {
            let mut head = format!("GET {path}{query} HTTP/1.1{nl}");
            for h in headers {
                head.push_str(&h);
                head.push_str(nl);
            }
            head.push_str(nl);
            (head, path)
        })
    }

    fn route(endpoints: &[Endpoint], max_bytes: usize) -> Route<'_> {
        Route {
            endpoints,
            allowed_origins: &[],
            max_bytes,
            #[cfg(feature = "auth")]
            now: 0,
        }
    }

    fn status(parsed: &Parsed) -> u16 {
        match parsed {
            Parsed::Incomplete => 0,
            Parsed::Upgrade { .. } => 101,
            Parsed::Reject(r) => r.status,
            #[cfg(feature = "sse")]
            Parsed::Answer(_) => 204,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn valid_requests_upgrade_exactly_at_the_end_of_the_head(
            (head, path) in valid_request(),
            trailing in vec(any::<u8>(), 0..32),
        ) {
            let mut bytes = head.clone().into_bytes();
            bytes.extend(&trailing);
            for max_bytes in [head.len(), 8192] {
                let parsed = parse(&bytes, path, max_bytes);
                let consumed = match parsed {
                    Parsed::Upgrade { consumed, .. } => consumed,
                    other => panic!("{other:?} for {head:?}"),
                };
                prop_assert_eq!(consumed, head.len());
                fuzz::check_upgrade(&bytes, &route(&[Endpoint::plain(RouteId(0), path)], max_bytes));
            }
            prop_assert_eq!(status(&parse(&bytes, path, head.len() - 1)), 431);
            prop_assert_eq!(status(&parse(&bytes, "/elsewhere", 8192)), 404);
        }

        #[test]
        fn mutated_requests_keep_their_verdicts(
            (head, path) in valid_request(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
            max_bytes in prop_oneof![Just(8192usize), 0..400usize],
        ) {
            let mut bytes = head.into_bytes();
            for (at, byte, how) in edits {
                let i = at.index(bytes.len() + 1);
                match how {
                    0 => bytes.insert(i, byte),
                    1 if i < bytes.len() => bytes[i] = byte,
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            fuzz::check_upgrade(&bytes, &route(&[Endpoint::plain(RouteId(0), path)], max_bytes));
        }

        #[test]
        fn arbitrary_bytes_get_well_formed_final_answers(
            bytes in vec(any::<u8>(), 0..400),
        ) {
            fuzz::upgrade_request(&bytes);
        }

        #[test]
        fn origins_are_checked_only_against_a_non_empty_list(
            (head, path) in valid_request(),
            origin in proptest::option::of(prop_oneof![
                Just(("https://example.com", true)),
                Just(("HTTPS://Example.COM/", true)),
                Just(("https://example.com.evil", false)),
                Just(("null", false)),
            ]),
            restricted in any::<bool>(),
        ) {
            let mut head = head;
            if let Some((origin, _)) = origin {
                // Insert the Origin header right after the request line.
                let at = head.find('\n').expect("a request line") + 1;
                head.insert_str(at, &format!("Origin: {origin}\r\n"));
            }
            let allowed = ["https://example.com".to_owned()];
            let endpoints = [Endpoint::plain(RouteId(0), path)];
            let route = Route {
                endpoints: &endpoints,
                allowed_origins: if restricted { &allowed } else { &[] },
                max_bytes: 8192,
                #[cfg(feature = "auth")]
                now: 0,
            };
            let want = match origin {
                Some((_, false)) if restricted => 403,
                _ => 101,
            };
            prop_assert_eq!(status(&parse_route(head.as_bytes(), &route)), want);
            fuzz::check_upgrade(head.as_bytes(), &route);
        }
    }
}
