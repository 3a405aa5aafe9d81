//! What each admin path answers; run by the admin thread for each request.
//!
//! Every answer is built from atomics (the stats, each lobby's counters) and
//! the manager's lobby list, asked for with a bounded wait
//! ([`LOBBIES_TIMEOUT`]). The dashboard and the chart library it draws with
//! (uPlot, vendored under `src/admin/uplot/`) are compiled into the binary.
//! Nothing here touches a socket: the admin thread writes the [`Reply`].

use std::{
    borrow::Cow,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use crossbeam_channel::Sender;
use serde::Serialize;

use crate::{
    control::inbox::{ManagerMsg, ask_lobbies},
    error::{Error, Result},
    ops::{
        health::{Health, Probes},
        metrics::{self, GatewayCollector},
    },
    stats::{LobbyInfo, Stats},
};

/// Longest the admin thread waits for the manager's lobby list.
pub(crate) const LOBBIES_TIMEOUT: Duration = Duration::from_millis(500);

const DASHBOARD: &str = include_str!("dashboard.html");
const UPLOT_JS: &str = include_str!("uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("uplot/LICENSE");

/// What the admin endpoints read.
#[derive(Debug)]
pub(crate) struct Sources {
    pub stats: Arc<Stats>,
    pub probes: Probes,
    pub collector: GatewayCollector,
    pub manager: Sender<ManagerMsg>,
    pub lobby_capacity: usize,
    /// The bearer token `/metrics` and `/lobbies` require, if one is set.
    pub token: Arc<AdminToken>,
}

/// The admin server's bearer token (`admin_token_file`), replaced by
/// reloads; a lock held for a comparison, never across I/O.
#[derive(Debug, Default)]
pub(crate) struct AdminToken(Mutex<Option<Arc<str>>>);

impl AdminToken {
    /// Reads the token in `path`, or none without a path. The file must
    /// hold the token alone (a trailing newline is dropped).
    pub(crate) fn read(path: Option<&Path>) -> Result<Option<Arc<str>>> {
        let Some(path) = path else {
            return Ok(None);
        };
        let bad =
            |why: String| Error::Config(format!("admin_token_file: {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "must hold one token of at least 16 visible characters".into()
            ));
        }
        Ok(Some(Arc::from(token)))
    }

    /// Sets the token (`None`: no token needed).
    pub(crate) fn set(&self, token: Option<Arc<str>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// Whether a request with this `Authorization` header may read the
    /// protected paths.
    fn admits(&self, authorization: Option<&str>) -> bool {
        let token = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(token) = token else {
            return true;
        };
        let presented = authorization
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, t)| t.trim());
        // Constant time in the token's bytes: no early exit on a mismatch.
        presented.len() == token.len()
            && presented
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// An HTTP response, before it is serialized.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    content_type: &'static str,
    pub body: Cow<'static, [u8]>,
    /// A `HEAD` request: headers only.
    head_only: bool,
}

impl Reply {
    fn new(status: u16, content_type: &'static str, body: impl Into<Cow<'static, [u8]>>) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
            head_only: false,
        }
    }

    /// A plain-text reply.
    pub(crate) fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply::new(
            status,
            "text/plain; charset=utf-8",
            body.into().into_bytes(),
        )
    }

    fn health(health: Health) -> Reply {
        Reply::text(if health.ok { 200 } else { 503 }, health.why + "\n")
    }

    /// The response's bytes: status line, headers, body.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        if self.status == 401 {
            head.push_str("WWW-Authenticate: Bearer\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The reply to `method path`.
pub(crate) fn route(
    method: &str,
    path: &str,
    authorization: Option<&str>,
    sources: &Sources,
) -> Reply {
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    if matches!(path, "/metrics" | "/lobbies") && !sources.token.admits(authorization) {
        return Reply::text(401, "a bearer token is required\n");
    }
    let get = || -> Option<Reply> {
        Some(match path {
            "/" => Reply::new(200, "text/html; charset=utf-8", DASHBOARD.as_bytes()),
            "/uPlot.iife.min.js" => Reply::new(200, "text/javascript", UPLOT_JS.as_bytes()),
            "/uPlot.min.css" => Reply::new(200, "text/css", UPLOT_CSS.as_bytes()),
            "/uPlot.LICENSE" => Reply::new(200, "text/plain", UPLOT_LICENSE.as_bytes()),
            "/metrics" => match metrics::exposition(&sources.collector) {
                Ok(text) => Reply::new(200, metrics::CONTENT_TYPE, text.into_bytes()),
                Err(_) => Reply::text(500, "cannot encode the metrics\n"),
            },
            "/livez" => Reply::health(sources.probes.liveness()),
            "/readyz" => Reply::health(sources.probes.readiness()),
            "/lobbies" => lobbies(sources),
            _ => return None,
        })
    };
    match method {
        "GET" => get().unwrap_or_else(not_found),
        "HEAD" => {
            let mut reply = get().unwrap_or_else(not_found);
            reply.head_only = true;
            reply
        }
        _ if is_known(path) => Reply::text(405, "only GET and HEAD\n"),
        _ => not_found(),
    }
}

fn not_found() -> Reply {
    Reply::text(
        404,
        "not found; try /, /metrics, /livez, /readyz or /lobbies\n",
    )
}

fn is_known(path: &str) -> bool {
    matches!(
        path,
        "/" | "/uPlot.iife.min.js"
            | "/uPlot.min.css"
            | "/uPlot.LICENSE"
            | "/metrics"
            | "/livez"
            | "/readyz"
            | "/lobbies"
    )
}

/// `GET /lobbies`: every lobby, as JSON.
#[derive(Debug, Serialize)]
struct LobbiesJson {
    /// Seconds since the gateway started, when the list was taken.
    uptime_seconds: f64,
    /// Clients a lobby holds at most.
    lobby_capacity: usize,
    lobbies: Vec<LobbyJson>,
}

#[derive(Debug, Serialize)]
struct LobbyJson {
    id: u32,
    /// The path of its route.
    route: String,
    /// Its query key, for a route keyed by query; null otherwise.
    key: Option<String>,
    clients: usize,
    /// `idle`, `connecting`, `up`, `backing_off` or `closing`.
    origin: &'static str,
    /// Seconds in that state.
    origin_since_seconds: f64,
    messages_in: u64,
    frames_out: u64,
    frames_dropped: u64,
    /// Seconds since the last origin message; null if none came yet.
    last_message_age_seconds: Option<f64>,
    /// Messages its history holds (resume, replay and migration reach).
    history_messages: usize,
    /// Their bytes.
    history_bytes: usize,
}

impl From<LobbyInfo> for LobbyJson {
    fn from(l: LobbyInfo) -> LobbyJson {
        LobbyJson {
            id: l.id,
            route: l.route,
            key: l.key,
            clients: l.clients,
            origin: l.origin.name(),
            origin_since_seconds: l.origin_since.as_secs_f64(),
            messages_in: l.messages_in,
            frames_out: l.frames_out,
            frames_dropped: l.frames_dropped,
            last_message_age_seconds: l.last_message_age.map(|age| age.as_secs_f64()),
            history_messages: l.history_messages,
            history_bytes: l.history_bytes,
        }
    }
}

fn lobbies(sources: &Sources) -> Reply {
    let Some(lobbies) = ask_lobbies(&sources.manager, LOBBIES_TIMEOUT) else {
        return Reply::text(
            503,
            format!(
                "the manager did not answer within {} ms (busy, or shutting down)\n",
                LOBBIES_TIMEOUT.as_millis()
            ),
        );
    };
    let json = LobbiesJson {
        uptime_seconds: sources.stats.epoch.millis() as f64 / 1000.0,
        lobby_capacity: sources.lobby_capacity,
        lobbies: lobbies.into_iter().map(LobbyJson::from).collect(),
    };
    match serde_json::to_vec(&json) {
        Ok(body) => Reply::new(200, "application/json", body),
        Err(_) => Reply::text(500, "cannot encode the lobbies\n"),
    }
}
