//! Command-line flags, and their mapping onto a [`wsgate::Config`].
//!
//! Only parsing and mapping live here; `main.rs` runs the gateway.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use argh::FromArgs;
use log::LevelFilter;
use wsgate::{ClientMessages, Config, Error, OriginLoss, SlowClient};

/// wsgate: one origin WebSocket feed, fanned out to many clients.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// address clients connect to (default 127.0.0.1:8080)
    #[argh(option, default = "SocketAddr::from(([127, 0, 0, 1], 8080))")]
    pub listen: SocketAddr,

    /// upstream URL: ws:// or wss:// (WebSocket), redis:// or rediss://
    /// (pub/sub channel), redis+stream:// (stream) (required unless --demo)
    #[argh(option)]
    pub origin: Option<String>,

    /// clients per lobby, hence per origin connection (default 512)
    #[argh(option, default = "512")]
    pub lobby_capacity: usize,

    /// frames queued per client before the oldest is dropped (default 16)
    #[argh(option, default = "16")]
    pub queue: usize,

    /// writer threads serving client sockets (default 2)
    #[argh(option, default = "2")]
    pub writers: usize,

    /// milliseconds a client's frames may wait to be written together (default 0)
    #[argh(option, default = "0")]
    pub write_batch_ms: u64,

    /// most clients connected at once, beyond which 503; 0 = no limit (default 0)
    #[argh(option, default = "0")]
    pub max_clients: usize,

    /// most connections from one address (pending handshakes included),
    /// beyond which 429; 0 = no limit (default 0)
    #[argh(option, default = "0")]
    pub max_clients_per_ip: usize,

    /// leading bits of an IPv6 address counted as one address by
    /// --max-clients-per-ip (default 64)
    #[argh(option, default = "64")]
    pub ipv6_prefix: u8,

    /// most connections in their upgrade at once; beyond, the oldest is
    /// closed (default 1024)
    #[argh(option, default = "1024")]
    pub max_pending_handshakes: usize,

    /// browser origin allowed to connect, e.g. https://app.example (repeatable; default: any)
    #[argh(option)]
    pub allow_origin: Vec<String>,

    /// with --client-messages forward and no --allow-origin: let every
    /// browser origin send messages upstream
    #[argh(switch)]
    pub allow_any_origin: bool,

    /// time a client has to complete its upgrade (default 10s)
    #[argh(option, default = "Span::secs(10)")]
    pub handshake_timeout: Span,

    /// largest client message in bytes, beyond which close 1009 (default 65536)
    #[argh(option, default = "64 * 1024")]
    pub max_client_message: usize,

    /// kernel send buffer per client in bytes (an expert knob; see
    /// --client-unsent first); 0 = kernel autotuning (default 0)
    #[argh(option, default = "0")]
    pub client_send_buffer: usize,

    /// most bytes a client socket holds unsent (TCP_NOTSENT_LOWAT), so a
    /// stalled client costs its queue plus this; 0 = kernel default (default 16384)
    #[argh(option, default = "16 * 1024")]
    pub client_unsent: usize,

    /// most frames a client may send per second (and in a burst), beyond
    /// which close 1008; 0 = off (default 100)
    #[argh(option, default = "100")]
    pub max_client_rate: u32,

    /// ping clients silent this long, close them after as long again (default 30s)
    #[argh(option, default = "Span::secs(30)")]
    pub client_ping: Span,

    /// slow clients: drop their oldest frames, or disconnect them with 1013 (default drop)
    #[argh(option, default = "SlowClient::Drop")]
    pub slow_client: SlowClient,

    /// with --slow-client disconnect, frames a client may lose per minute (default 256)
    #[argh(option, default = "256")]
    pub slow_client_drops: u64,

    /// client text/binary messages: drop them, or forward them to the origin (default drop)
    #[argh(option, default = "ClientMessages::Drop")]
    pub client_messages: ClientMessages,

    /// on shutdown, time clients get to receive what is queued and the close (default 5s)
    #[argh(option, default = "Span::secs(5)")]
    pub drain_timeout: Span,

    /// most lobbies, hence origin connections; 0 = no limit (default 0)
    #[argh(option, default = "0")]
    pub max_origin_connections: usize,

    /// how often lobbies are compacted; 0 turns it off (default 10s)
    #[argh(option, default = "Span::secs(10)")]
    pub compact_interval: Span,

    /// fill, as a fraction of capacity, compaction packs lobbies to (default 0.9)
    #[argh(option, default = "0.9")]
    pub compact_fill: f64,

    /// recent frames a new client receives before the live stream (default 0)
    #[argh(option, default = "0")]
    pub replay: usize,

    /// how long an empty lobby lingers before its thread ends (default 5s)
    #[argh(option, default = "Span::secs(5)")]
    pub lobby_linger: Span,

    /// first reconnect delay after an origin failure (default 100ms)
    #[argh(option, default = "Span::millis(100)")]
    pub origin_backoff_min: Span,

    /// longest reconnect delay (default 30s)
    #[argh(option, default = "Span::secs(30)")]
    pub origin_backoff_max: Span,

    /// bound on origin TCP connect + TLS + upgrade (default 10s)
    #[argh(option, default = "Span::secs(10)")]
    pub origin_connect_timeout: Span,

    /// interval between pings to the origin (default 15s)
    #[argh(option, default = "Span::secs(15)")]
    pub origin_ping: Span,

    /// origin declared dead after this long with nothing received (default 45s)
    #[argh(option, default = "Span::secs(45)")]
    pub origin_timeout: Span,

    /// on origin loss: keep clients connected, or close them with 1012 (default keep)
    #[argh(option, default = "OriginLoss::Keep")]
    pub on_origin_loss: OriginLoss,

    /// header sent on every origin handshake, 'Name: value' (repeatable)
    #[argh(option)]
    pub origin_header: Vec<String>,

    /// text message sent to the origin after every (re)connect (repeatable, in order)
    #[argh(option)]
    pub origin_init: Vec<String>,

    /// subprotocol offered on the origin handshake (repeatable)
    #[argh(option)]
    pub origin_subprotocol: Vec<String>,

    /// PEM file of the CA that signs a wss:// origin's certificate
    #[argh(option)]
    pub origin_ca: Option<PathBuf>,

    /// largest origin message in bytes; larger drops the connection (default 16777216)
    #[argh(option, default = "16 << 20")]
    pub max_message: usize,

    /// admin HTTP server address: /metrics, /livez, /readyz, /lobbies and a
    /// dashboard at / (default: none)
    #[argh(option)]
    pub admin: Option<SocketAddr>,

    /// log level: off, error, warn, info, debug or trace (default info)
    #[argh(option, default = "LevelFilter::Info")]
    pub log_level: LevelFilter,

    /// feed the gateway from an embedded ticker (the in-process publisher)
    #[argh(switch)]
    pub demo: bool,
}

impl Cli {
    /// The gateway configuration these flags describe. The origin is left
    /// empty for `--demo`, whose ticker feeds the gateway through a publisher.
    pub fn config(&self) -> Result<Config, Error> {
        let origin = match (&self.origin, self.demo) {
            (Some(_), true) => {
                return Err(Error::Config(
                    "use either --origin or --demo, not both".into(),
                ));
            }
            (None, false) => {
                return Err(Error::Config(
                    "--origin URL is required (or try --demo)".into(),
                ));
            }
            (Some(origin), false) => origin.clone(),
            (None, true) => String::new(),
        };
        let mut config = Config::default();
        config.listen = self.listen;
        config.origin = origin;
        config.lobby_capacity = self.lobby_capacity;
        config.queue_depth = self.queue;
        config.writers = self.writers;
        config.write_batch = Duration::from_millis(self.write_batch_ms);
        config.lobby_linger = self.lobby_linger.0;
        config.max_clients = self.max_clients;
        config.max_clients_per_ip = self.max_clients_per_ip;
        config.ipv6_prefix = self.ipv6_prefix;
        config.max_pending_handshakes = self.max_pending_handshakes;
        config.allowed_origins = self.allow_origin.clone();
        config.allow_any_origin = self.allow_any_origin;
        config.handshake_timeout = self.handshake_timeout.0;
        config.max_client_message = self.max_client_message;
        config.client_send_buffer = self.client_send_buffer;
        config.client_unsent = self.client_unsent;
        config.max_client_rate = self.max_client_rate;
        config.client_ping = self.client_ping.0;
        config.slow_client = self.slow_client;
        config.slow_client_drops = self.slow_client_drops;
        config.client_messages = self.client_messages;
        config.drain_timeout = self.drain_timeout.0;
        config.admin = self.admin;
        config.max_origin_connections = self.max_origin_connections;
        config.compact_interval = self.compact_interval.0;
        config.compact_fill = self.compact_fill;
        config.replay = self.replay;
        config.origin_backoff_min = self.origin_backoff_min.0;
        config.origin_backoff_max = self.origin_backoff_max.0;
        config.origin_connect_timeout = self.origin_connect_timeout.0;
        config.origin_ping = self.origin_ping.0;
        config.origin_timeout = self.origin_timeout.0;
        config.on_origin_loss = self.on_origin_loss;
        config.origin_headers = self
            .origin_header
            .iter()
            .map(|h| parse_header(h))
            .collect::<Result<_, _>>()?;
        config.origin_init = self.origin_init.clone();
        config.origin_subprotocols = self.origin_subprotocol.clone();
        config.origin_ca = self.origin_ca.clone();
        config.max_origin_message = self.max_message;
        Ok(config)
    }
}

/// Splits `Name: value`.
fn parse_header(header: &str) -> Result<(String, String), Error> {
    match header.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(Error::Config(format!(
            "--origin-header {header:?} is not of the form 'Name: value'"
        ))),
    }
}

/// A duration flag: `250ms`, `10s`, `2m`, or a bare number of seconds.
#[derive(Debug, Clone, Copy)]
pub struct Span(pub Duration);

impl Span {
    const fn secs(s: u64) -> Span {
        Span(Duration::from_secs(s))
    }

    const fn millis(ms: u64) -> Span {
        Span(Duration::from_millis(ms))
    }
}

impl FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Span, String> {
        let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
            (n, 0.001)
        } else if let Some(n) = s.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = s.strip_suffix('m') {
            (n, 60.0)
        } else {
            (s, 1.0)
        };
        match number.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 && n * scale < 1e9 => {
                Ok(Span(Duration::from_secs_f64(n * scale)))
            }
            _ => Err(format!("{s:?} is not a duration like 250ms, 10s or 2m")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_with_and_without_units() {
        let ms = |s: &str| s.parse::<Span>().map(|d| d.0.as_millis());
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("2m"), Ok(120_000));
        assert_eq!(ms("5"), Ok(5000));
        assert!(ms("soon").is_err());
        assert!(ms("-1s").is_err());
        assert!(ms("1e300").is_err());
    }

    #[test]
    fn headers_split_on_the_first_colon() {
        assert_eq!(
            parse_header("Authorization: Bearer a:b").unwrap(),
            ("Authorization".into(), "Bearer a:b".into())
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(": value").is_err());
    }
}
