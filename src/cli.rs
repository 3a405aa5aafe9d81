//! Command-line flags, and how they override a [`wsgate::Config`].
//!
//! Each flag is named after the setting it overrides (`--queue-depth` sets
//! `queue_depth`); older spellings stay as hidden aliases. No flag has a
//! default of its own: settings start from [`Config::default`], then the
//! config file (`--config`), then the flags given. Only parsing and merging
//! live here; `main.rs` runs the gateway.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use argh::FromArgs;
use log::LevelFilter;
#[cfg(feature = "sse")]
use wsgate::SlowStream;
use wsgate::{ClientMessages, Config, Error, OriginLoss, RouteConfig, SlowClient};

/// wsgate: one origin WebSocket feed, fanned out to many clients.
///
/// Settings come from their defaults (see --print-config), then --config
/// FILE, then these flags.
#[derive(FromArgs, Debug, Default, Clone)]
pub struct Cli {
    /// TOML config file (the README has an annotated example); flags override it
    #[argh(option)]
    pub config: Option<PathBuf>,

    /// print the settings these flags and the file make, as TOML, and exit
    #[argh(switch)]
    pub print_config: bool,

    /// feed the gateway from an embedded ticker (the in-process publisher)
    #[argh(switch)]
    pub demo: bool,

    /// log level: off, error, warn, info, debug or trace (info unless set)
    #[argh(option)]
    pub log_level: Option<LevelFilter>,

    /// address clients connect to
    #[argh(option)]
    pub listen: Option<SocketAddr>,

    /// set SO_REUSEPORT on the listener: several wsgate processes share
    /// --listen and the kernel spreads clients over them
    #[argh(switch)]
    pub reuse_port: bool,

    /// upstream of the route at --path (the short form of --route PATH=URL):
    /// ws:// or wss:// (WebSocket), redis:// or rediss:// (pub/sub channel),
    /// redis+stream:// (stream)
    #[argh(option)]
    pub origin: Option<String>,

    /// request path of the --origin route
    #[argh(option)]
    pub path: Option<String>,

    /// a route: clients at PATH are fanned out from URL (repeatable)
    #[argh(option)]
    pub route: Vec<RouteFlag>,

    /// clients per lobby, hence per origin connection
    #[argh(option)]
    pub lobby_capacity: Option<usize>,

    /// frames queued per client before the oldest is dropped
    #[argh(option)]
    pub queue_depth: Option<usize>,

    /// writer threads serving client sockets
    #[argh(option)]
    pub writers: Option<usize>,

    /// how long a client's frames may wait to be written together, e.g. 2ms
    #[argh(option)]
    pub write_batch: Option<Span>,

    /// most clients connected at once, beyond which 503; 0 = no limit
    #[argh(option)]
    pub max_clients: Option<usize>,

    /// most connections from one address (pending handshakes included),
    /// beyond which 429; 0 = no limit
    #[argh(option)]
    pub max_clients_per_ip: Option<usize>,

    /// leading bits of an IPv6 address counted as one address
    #[argh(option)]
    pub ipv6_prefix: Option<u8>,

    /// most connections in their upgrade at once; beyond, the oldest is closed
    #[argh(option)]
    pub max_pending_handshakes: Option<usize>,

    /// browser origin allowed to connect, e.g. https://app.example (repeatable)
    #[argh(option)]
    pub allowed_origin: Vec<String>,

    /// with --client-messages forward and no --allowed-origin: let every
    /// browser origin send messages upstream
    #[argh(switch)]
    pub allow_any_origin: bool,

    /// time a client has to complete its upgrade
    #[argh(option)]
    pub handshake_timeout: Option<Span>,

    /// nice value (1-19) the acceptor thread adds, so admitting a storm of
    /// clients yields the CPU to serving those connected (default 0)
    #[argh(option)]
    pub acceptor_nice: Option<u8>,

    /// largest upgrade request in bytes, beyond which 431
    #[argh(option)]
    pub max_request_bytes: Option<usize>,

    /// largest client message in bytes, beyond which close 1009
    #[argh(option)]
    pub max_client_message: Option<usize>,

    /// kernel send buffer per client in bytes (expert); 0 = autotuning
    #[argh(option)]
    pub client_send_buffer: Option<usize>,

    /// most bytes a client socket holds unsent (TCP_NOTSENT_LOWAT); 0 = kernel default
    #[argh(option)]
    pub client_unsent: Option<usize>,

    /// most frames a client may send per second (and in a burst); 0 = off
    #[argh(option)]
    pub max_client_rate: Option<u32>,

    /// ping clients silent this long, close them after as long again
    #[argh(option)]
    pub client_ping: Option<Span>,

    /// heartbeat comment on an idle SSE stream this often
    #[cfg(feature = "sse")]
    #[argh(option)]
    pub sse_heartbeat: Option<Span>,

    /// reconnection delay SSE clients are told (retry:)
    #[cfg(feature = "sse")]
    #[argh(option)]
    pub sse_retry: Option<Span>,

    /// event streams and resume clients with a full queue: close them so
    /// they resume (default), or drop their oldest
    #[cfg(feature = "sse")]
    #[argh(option)]
    pub slow_stream: Option<SlowStream>,

    /// slow clients: drop their oldest frames, or disconnect them with 1013
    #[argh(option)]
    pub slow_client: Option<SlowClient>,

    /// with --slow-client disconnect, frames a client may lose per minute
    #[argh(option)]
    pub slow_client_drops: Option<u64>,

    /// client text/binary messages: drop them, or forward them to the origin
    #[argh(option)]
    pub client_messages: Option<ClientMessages>,

    /// on shutdown, time clients get to receive what is queued and the close
    #[argh(option)]
    pub drain_timeout: Option<Span>,

    /// most lobbies, hence origin connections, per route; 0 = no limit
    #[argh(option)]
    pub max_origin_connections: Option<usize>,

    /// how often lobbies are compacted; 0 turns it off
    #[argh(option)]
    pub compact_interval: Option<Span>,

    /// fill, as a fraction of capacity, compaction packs lobbies to
    #[argh(option)]
    pub compact_fill: Option<Fraction>,

    /// recent frames a new client receives before the live stream
    #[argh(option)]
    pub replay: Option<usize>,

    /// messages each lobby remembers for resume, migration and replay
    /// (at least 4 x the queue depth)
    #[argh(option)]
    pub history: Option<usize>,

    /// bytes of messages each lobby keeps beyond its newest queue's worth
    #[argh(option)]
    pub history_bytes: Option<usize>,

    /// how long an empty lobby keeps its thread and origin connection
    #[argh(option)]
    pub lobby_linger: Option<Span>,

    /// first reconnect delay after an origin failure
    #[argh(option)]
    pub origin_backoff_min: Option<Span>,

    /// longest reconnect delay
    #[argh(option)]
    pub origin_backoff_max: Option<Span>,

    /// bound on origin name lookup, TCP connect, TLS and upgrade
    #[argh(option)]
    pub origin_connect_timeout: Option<Span>,

    /// interval between pings to the origin
    #[argh(option)]
    pub origin_ping: Option<Span>,

    /// origin declared dead after this long with nothing received
    #[argh(option)]
    pub origin_timeout: Option<Span>,

    /// on origin loss: keep clients connected, or close them with 1012
    #[argh(option)]
    pub on_origin_loss: Option<OriginLoss>,

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

    /// PEM certificate chain clients are served wss:// with (with --tls-key)
    #[cfg(feature = "tls")]
    #[argh(option)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert
    #[cfg(feature = "tls")]
    #[argh(option)]
    pub tls_key: Option<PathBuf>,

    /// a certificate served to clients asking for one of NAMES (SNI;
    /// `*.` wildcards), NAMES=CERT,KEY with comma-separated names
    /// (repeatable; --tls-cert stays the default)
    #[cfg(feature = "tls")]
    #[argh(option)]
    pub tls_sni: Vec<SniFlag>,

    /// a second client listener serving wss:// (with --tls-cert) while
    /// --listen serves plain ws://, into the same lobbies
    #[cfg(feature = "tls")]
    #[argh(option)]
    pub tls_listen: Option<SocketAddr>,

    /// threads spending TLS handshakes' CPU (0: the acceptor itself)
    #[cfg(feature = "tls")]
    #[argh(option)]
    pub tls_threads: Option<usize>,

    /// largest origin message in bytes; larger drops the connection
    #[argh(option)]
    pub max_origin_message: Option<usize>,

    /// subprotocol clients may ask for; the first offered that is listed is
    /// chosen (repeatable)
    #[argh(option)]
    pub subprotocol: Vec<String>,

    /// refuse (400) clients that offer none of the --subprotocol names
    #[argh(switch)]
    pub require_subprotocol: bool,

    /// key lobbies by the client's query string (see --query-param)
    #[argh(switch)]
    pub pass_query: bool,

    /// with --pass-query, a query parameter that keys lobbies (repeatable)
    #[argh(option)]
    pub query_param: Vec<String>,

    /// with --pass-query, most distinct keys at once, beyond which 503; 0 = no limit
    #[argh(option)]
    pub max_keys: Option<usize>,

    /// negotiate permessage-deflate with clients that offer it: on or off
    #[argh(option)]
    pub compression: Option<OnOff>,

    /// smallest message in bytes sent compressed; smaller go out as they are
    #[argh(option)]
    pub compress_min: Option<usize>,

    /// admin HTTP server address: /metrics, /livez, /readyz, /lobbies, dashboard
    #[argh(option)]
    pub admin: Option<SocketAddr>,

    /// file holding the bearer token /metrics and /lobbies require
    #[cfg(feature = "admin")]
    #[argh(option)]
    pub admin_token_file: Option<PathBuf>,

    /// file holding the HMAC secret clients' JWTs are signed with (HS256
    /// unless --jwt-algorithm says HS384 or HS512); never the secret itself
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_secret_file: Option<PathBuf>,

    /// environment variable holding the HMAC secret, instead of a file
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_secret_env: Option<String>,

    /// PEM public key that verifies clients' JWTs: RSA (RS256), EC P-256
    /// (ES256), EC P-384 (ES384) or Ed25519 (EdDSA)
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_public_key: Option<PathBuf>,

    /// JWKS file of the keys that verify clients' JWTs, chosen by kid
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwks_file: Option<PathBuf>,

    /// the algorithm a secret or RSA key is pinned to (HS256, RS384, PS256...)
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_algorithm: Option<String>,

    /// the iss a client's JWT must carry
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_issuer: Option<String>,

    /// the aud a client's JWT must carry
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_audience: Option<String>,

    /// clock skew allowed on exp and nbf; a connection ends at exp plus this
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_leeway: Option<Span>,

    /// the JWT claim listing the routes (and query keys) a token may open
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub jwt_claim: Option<String>,

    /// query parameter a client's token may come in
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub token_param: Option<String>,

    /// cookie a client's token may come in
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub token_cookie: Option<String>,

    /// auth service asked about each upgrade (http:// or https://): 2xx
    /// admits, 401/403 are passed on, anything else is 503
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_url: Option<String>,

    /// longest wait for the auth service
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_timeout: Option<Span>,

    /// header carrying the client's address to the auth service
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_client_header: Option<String>,

    /// how long the auth service's yes is remembered for the same credentials
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_cache_ttl: Option<Span>,

    /// most auth service answers remembered
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_cache_size: Option<usize>,

    /// threads asking auth services
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_threads: Option<usize>,

    /// upgrades waiting for an auth thread at most; beyond, 503
    #[cfg(feature = "auth")]
    #[argh(option)]
    pub auth_queue: Option<usize>,

    /// old spelling of --queue-depth
    #[argh(option, hidden_help)]
    pub queue: Option<usize>,

    /// old spelling of --max-origin-message
    #[argh(option, hidden_help)]
    pub max_message: Option<usize>,

    /// old spelling of --write-batch, in milliseconds
    #[argh(option, hidden_help)]
    pub write_batch_ms: Option<u64>,

    /// old spelling of --allowed-origin
    #[argh(option, hidden_help)]
    pub allow_origin: Vec<String>,
}

impl Cli {
    /// The settings: `file` (a config file's, or the defaults) with every
    /// flag given applied on top. `--demo` leaves no origin and no routes:
    /// the demo ticker feeds the gateway through its in-process publisher.
    pub fn apply(&self, mut config: Config) -> Result<Config, Error> {
        if self.demo && (self.origin.is_some() || !self.route.is_empty()) {
            return Err(Error::Config(
                "use either --origin/--route or --demo, not both".into(),
            ));
        }
        macro_rules! set {
            ($($field:ident),* $(,)?) => {
                $(if let Some(value) = &self.$field {
                    config.$field = value.clone().into();
                })*
            };
        }
        set!(
            listen,
            origin,
            path,
            lobby_capacity,
            queue_depth,
            writers,
            write_batch,
            max_clients,
            max_clients_per_ip,
            ipv6_prefix,
            max_pending_handshakes,
            handshake_timeout,
            acceptor_nice,
            max_request_bytes,
            max_client_message,
            client_send_buffer,
            client_unsent,
            max_client_rate,
            client_ping,
            slow_client,
            slow_client_drops,
            client_messages,
            drain_timeout,
            max_origin_connections,
            compact_interval,
            compact_fill,
            replay,
            history,
            history_bytes,
            lobby_linger,
            origin_backoff_min,
            origin_backoff_max,
            origin_connect_timeout,
            origin_ping,
            origin_timeout,
            on_origin_loss,
            max_origin_message,
            max_keys,
            compression,
            compress_min,
        );
        #[cfg(feature = "admin")]
        if let Some(path) = &self.admin_token_file {
            config.admin_token_file = Some(path.clone());
        }
        #[cfg(feature = "auth")]
        self.apply_auth(&mut config);
        #[cfg(feature = "sse")]
        {
            if let Some(every) = &self.sse_heartbeat {
                config.sse_heartbeat = every.0;
            }
            if let Some(retry) = &self.sse_retry {
                config.sse_retry = retry.0;
            }
            if let Some(slow) = self.slow_stream {
                config.slow_stream = slow;
            }
        }

        if let Some(path) = &self.origin_ca {
            config.origin_ca = Some(path.clone());
        }
        #[cfg(feature = "tls")]
        {
            if let Some(path) = &self.tls_cert {
                config.tls_cert = Some(path.clone());
            }
            if let Some(path) = &self.tls_key {
                config.tls_key = Some(path.clone());
            }
            if !self.tls_sni.is_empty() {
                config.tls.certs = self.tls_sni.iter().map(|f| f.0.clone()).collect();
            }
            if let Some(threads) = self.tls_threads {
                config.tls_threads = threads;
            }
            if let Some(addr) = self.tls_listen {
                config.tls_listen = Some(addr);
            }
        }
        if let Some(admin) = self.admin {
            config.admin = Some(admin);
        }
        // Hidden aliases: the old spellings.
        if let Some(depth) = self.queue {
            config.queue_depth = depth;
        }
        if let Some(bytes) = self.max_message {
            config.max_origin_message = bytes;
        }
        if let Some(ms) = self.write_batch_ms {
            config.write_batch = Duration::from_millis(ms);
        }
        // Repeatable flags replace the file's list when given; switches turn on.
        macro_rules! set_list {
            ($($flag:ident => $field:ident),* $(,)?) => {
                $(if !self.$flag.is_empty() {
                    config.$field = self.$flag.clone();
                })*
            };
        }
        set_list!(
            allowed_origin => allowed_origins,
            allow_origin => allowed_origins,
            origin_init => origin_init,
            origin_subprotocol => origin_subprotocols,
            subprotocol => subprotocols,
            query_param => query_params,
        );
        if !self.origin_header.is_empty() {
            config.origin_headers = self
                .origin_header
                .iter()
                .map(|h| {
                    wsgate::parse_header(h)
                        .map_err(|e| Error::Config(format!("origin_headers: {e}")))
                })
                .collect::<Result<_, _>>()?;
        }
        config.reuse_port |= self.reuse_port;
        config.allow_any_origin |= self.allow_any_origin;
        config.require_subprotocol |= self.require_subprotocol;
        config.pass_query |= self.pass_query;
        if !self.route.is_empty() {
            config.routes = self.route.iter().map(|r| r.0.clone()).collect();
        }
        if self.demo {
            config.origin = String::new();
            config.routes.clear();
        }
        Ok(config)
    }

    /// The auth flags onto `config`: the `[auth]` table's settings (the
    /// route defaults), each flag named after its key, and the pool's.
    #[cfg(feature = "auth")]
    fn apply_auth(&self, config: &mut Config) {
        if let Some(threads) = self.auth_threads {
            config.auth_threads = threads;
        }
        if let Some(queue) = self.auth_queue {
            config.auth_queue = queue;
        }
        let auth = &mut config.auth;
        macro_rules! set_auth {
            ($($flag:ident => $field:ident),* $(,)?) => {
                $(if let Some(value) = &self.$flag {
                    auth.$field = value.clone().into();
                })*
            };
        }
        set_auth!(
            jwt_secret_file => jwt_secret_file,
            jwt_secret_env => jwt_secret_env,
            jwt_public_key => jwt_public_key,
            jwks_file => jwks_file,
            jwt_algorithm => jwt_algorithm,
            jwt_issuer => jwt_issuer,
            jwt_audience => jwt_audience,
            jwt_leeway => jwt_leeway,
            jwt_claim => jwt_claim,
            token_param => token_param,
            token_cookie => token_cookie,
            auth_url => url,
            auth_timeout => timeout,
            auth_client_header => client_header,
            auth_cache_ttl => cache_ttl,
            auth_cache_size => cache_size,
        );
    }
}

/// A duration flag: `250ms`, `10s`, `2m`, or a bare number of seconds.
#[derive(Debug, Clone, Copy)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Span, String> {
        wsgate::parse_duration(s).map(Span)
    }
}

/// A fraction flag: above 0 and at most 1, like `0.9`.
#[derive(Debug, Clone, Copy)]
pub struct Fraction(pub f64);

impl FromStr for Fraction {
    type Err = String;

    fn from_str(s: &str) -> Result<Fraction, String> {
        wsgate::parse_fraction(s).map(Fraction)
    }
}

impl From<Fraction> for f64 {
    fn from(fraction: Fraction) -> f64 {
        fraction.0
    }
}

impl From<Span> for Duration {
    fn from(span: Span) -> Duration {
        span.0
    }
}

/// An on/off flag's value: `on` or `off`.
#[derive(Debug, Clone, Copy)]
pub struct OnOff(pub bool);

impl FromStr for OnOff {
    type Err = String;

    fn from_str(s: &str) -> Result<OnOff, String> {
        match s {
            "on" => Ok(OnOff(true)),
            "off" => Ok(OnOff(false)),
            _ => Err(format!("expected on or off, not {s:?}")),
        }
    }
}

impl From<OnOff> for bool {
    fn from(value: OnOff) -> bool {
        value.0
    }
}

/// A `--route PATH=URL` flag.
#[derive(Debug, Clone)]
pub struct RouteFlag(RouteConfig);

impl FromStr for RouteFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<RouteFlag, String> {
        match s.split_once('=') {
            Some((path, url)) if path.starts_with('/') && !url.is_empty() => {
                Ok(RouteFlag(RouteConfig::new(path, url)))
            }
            _ => Err(format!("{s:?} is not of the form PATH=URL")),
        }
    }
}

/// A `--tls-sni NAMES=CERT,KEY` flag.
#[cfg(feature = "tls")]
#[derive(Debug, Clone)]
pub struct SniFlag(wsgate::SniCert);

#[cfg(feature = "tls")]
impl FromStr for SniFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<SniFlag, String> {
        let parsed = s.split_once('=').and_then(|(names, files)| {
            let (cert, key) = files.split_once(',')?;
            let names = names.split(',').map(str::trim);
            Some(wsgate::SniCert::new(names, cert.trim(), key.trim()))
        });
        parsed
            .map(SniFlag)
            .ok_or_else(|| format!("{s:?} is not of the form NAMES=CERT,KEY"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, String> {
        Cli::from_args(&["wsgate"], args).map_err(|e| e.output)
    }

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
            wsgate::parse_header("Authorization: Bearer a:b").unwrap(),
            ("Authorization".into(), "Bearer a:b".into())
        );
        assert!(wsgate::parse_header("no colon").is_err());
        assert!(wsgate::parse_header(": value").is_err());
    }

    #[test]
    fn old_spellings_are_hidden_aliases() {
        let c = cli(&[
            "--queue",
            "8",
            "--max-message",
            "1000",
            "--write-batch-ms",
            "3",
        ])
        .unwrap()
        .apply(Config::default())
        .unwrap();
        assert_eq!(c.queue_depth, 8);
        assert_eq!(c.max_origin_message, 1000);
        assert_eq!(c.write_batch, Duration::from_millis(3));
        let help = cli(&["--help"]).unwrap_err();
        assert!(!help.contains("--write-batch-ms"), "{help}");
        assert!(help.contains("--queue-depth"), "{help}");
    }

    /// Every setting: its config file key, the flags that set it, and the
    /// same value in the file's form.
    #[cfg(feature = "config-file")]
    const SETTINGS: &[(&str, &[&str], &str)] = &[
        (
            "listen",
            &["--listen", "127.0.0.2:9"],
            r#"listen = "127.0.0.2:9""#,
        ),
        ("reuse_port", &["--reuse-port"], "reuse_port = true"),
        (
            "origin",
            &["--origin", "ws://h/x"],
            r#"origin = "ws://h/x""#,
        ),
        ("path", &["--path", "/x"], r#"path = "/x""#),
        (
            "route",
            &["--route", "/a=ws://h/a", "--route", "/b=ws://h/b"],
            "[[route]]\npath = \"/a\"\norigin = \"ws://h/a\"\n\
             [[route]]\npath = \"/b\"\norigin = \"ws://h/b\"",
        ),
        (
            "lobby_capacity",
            &["--lobby-capacity", "7"],
            "lobby_capacity = 7",
        ),
        ("queue_depth", &["--queue-depth", "7"], "queue_depth = 7"),
        ("writers", &["--writers", "7"], "writers = 7"),
        (
            "write_batch",
            &["--write-batch", "2ms"],
            r#"write_batch = "2ms""#,
        ),
        ("max_clients", &["--max-clients", "7"], "max_clients = 7"),
        (
            "max_clients_per_ip",
            &["--max-clients-per-ip", "7"],
            "max_clients_per_ip = 7",
        ),
        ("ipv6_prefix", &["--ipv6-prefix", "48"], "ipv6_prefix = 48"),
        (
            "max_pending_handshakes",
            &["--max-pending-handshakes", "7"],
            "max_pending_handshakes = 7",
        ),
        (
            "allowed_origins",
            &["--allowed-origin", "https://a.example"],
            r#"allowed_origins = ["https://a.example"]"#,
        ),
        (
            "allow_any_origin",
            &["--allow-any-origin"],
            "allow_any_origin = true",
        ),
        (
            "handshake_timeout",
            &["--handshake-timeout", "3s"],
            r#"handshake_timeout = "3s""#,
        ),
        (
            "acceptor_nice",
            &["--acceptor-nice", "10"],
            "acceptor_nice = 10",
        ),
        (
            "max_request_bytes",
            &["--max-request-bytes", "700"],
            "max_request_bytes = 700",
        ),
        (
            "max_client_message",
            &["--max-client-message", "7"],
            "max_client_message = 7",
        ),
        (
            "client_send_buffer",
            &["--client-send-buffer", "8192"],
            "client_send_buffer = 8192",
        ),
        (
            "client_unsent",
            &["--client-unsent", "4096"],
            "client_unsent = 4096",
        ),
        (
            "max_client_rate",
            &["--max-client-rate", "7"],
            "max_client_rate = 7",
        ),
        (
            "client_ping",
            &["--client-ping", "7s"],
            r#"client_ping = "7s""#,
        ),
        (
            "slow_client",
            &["--slow-client", "disconnect"],
            r#"slow_client = "disconnect""#,
        ),
        (
            "slow_client_drops",
            &["--slow-client-drops", "7"],
            "slow_client_drops = 7",
        ),
        (
            "client_messages",
            &["--client-messages", "forward"],
            r#"client_messages = "forward""#,
        ),
        (
            "drain_timeout",
            &["--drain-timeout", "250ms"],
            r#"drain_timeout = "250ms""#,
        ),
        (
            "max_origin_connections",
            &["--max-origin-connections", "7"],
            "max_origin_connections = 7",
        ),
        (
            "compact_interval",
            &["--compact-interval", "1m"],
            r#"compact_interval = "1m""#,
        ),
        (
            "compact_fill",
            &["--compact-fill", "0.5"],
            "compact_fill = 0.5",
        ),
        ("replay", &["--replay", "7"], "replay = 7"),
        ("history", &["--history", "700"], "history = 700"),
        (
            "history_bytes",
            &["--history-bytes", "7000"],
            "history_bytes = 7000",
        ),
        (
            "lobby_linger",
            &["--lobby-linger", "7s"],
            r#"lobby_linger = "7s""#,
        ),
        (
            "origin_backoff_min",
            &["--origin-backoff-min", "1s"],
            r#"origin_backoff_min = "1s""#,
        ),
        (
            "origin_backoff_max",
            &["--origin-backoff-max", "1m"],
            r#"origin_backoff_max = "1m""#,
        ),
        (
            "origin_connect_timeout",
            &["--origin-connect-timeout", "7s"],
            r#"origin_connect_timeout = "7s""#,
        ),
        (
            "origin_ping",
            &["--origin-ping", "7s"],
            r#"origin_ping = "7s""#,
        ),
        (
            "origin_timeout",
            &["--origin-timeout", "70s"],
            r#"origin_timeout = "70s""#,
        ),
        (
            "on_origin_loss",
            &["--on-origin-loss", "close"],
            r#"on_origin_loss = "close""#,
        ),
        (
            "origin_headers",
            &["--origin-header", "X-Key: v"],
            r#"origin_headers = ["X-Key: v"]"#,
        ),
        (
            "origin_init",
            &["--origin-init", "sub"],
            r#"origin_init = ["sub"]"#,
        ),
        (
            "origin_subprotocols",
            &["--origin-subprotocol", "p1"],
            r#"origin_subprotocols = ["p1"]"#,
        ),
        (
            "origin_ca",
            &["--origin-ca", "/ca.pem"],
            r#"origin_ca = "/ca.pem""#,
        ),
        (
            "max_origin_message",
            &["--max-origin-message", "7"],
            "max_origin_message = 7",
        ),
        (
            "admin",
            &["--admin", "127.0.0.1:9"],
            r#"admin = "127.0.0.1:9""#,
        ),
        (
            "subprotocols",
            &["--subprotocol", "s1"],
            r#"subprotocols = ["s1"]"#,
        ),
        (
            "require_subprotocol",
            &["--require-subprotocol"],
            "require_subprotocol = true",
        ),
        ("pass_query", &["--pass-query"], "pass_query = true"),
        (
            "query_params",
            &["--query-param", "symbol"],
            r#"query_params = ["symbol"]"#,
        ),
        ("max_keys", &["--max-keys", "7"], "max_keys = 7"),
        (
            "compression",
            &["--compression", "off"],
            "compression = false",
        ),
        ("compress_min", &["--compress-min", "7"], "compress_min = 7"),
    ];

    /// The settings of the auth and admin features: rows as [`SETTINGS`]'s.
    #[cfg(all(feature = "config-file", feature = "auth", feature = "admin"))]
    const FEATURE_SETTINGS: &[(&str, &[&str], &str)] = &[
        (
            "admin_token_file",
            &["--admin-token-file", "/t"],
            "admin_token_file = \"/t\"",
        ),
        ("auth_threads", &["--auth-threads", "7"], "auth_threads = 7"),
        ("auth_queue", &["--auth-queue", "7"], "auth_queue = 7"),
        (
            "auth",
            &["--jwt-secret-file", "/s"],
            "[auth]\njwt_secret_file = \"/s\"",
        ),
        (
            "auth",
            &["--jwt-secret-env", "S"],
            "[auth]\njwt_secret_env = \"S\"",
        ),
        (
            "auth",
            &["--jwt-public-key", "/k.pem"],
            "[auth]\njwt_public_key = \"/k.pem\"",
        ),
        (
            "auth",
            &["--jwks-file", "/k.json"],
            "[auth]\njwks_file = \"/k.json\"",
        ),
        (
            "auth",
            &["--jwt-algorithm", "HS512"],
            "[auth]\njwt_algorithm = \"HS512\"",
        ),
        ("auth", &["--jwt-issuer", "i"], "[auth]\njwt_issuer = \"i\""),
        (
            "auth",
            &["--jwt-audience", "a"],
            "[auth]\njwt_audience = \"a\"",
        ),
        (
            "auth",
            &["--jwt-leeway", "7s"],
            "[auth]\njwt_leeway = \"7s\"",
        ),
        ("auth", &["--jwt-claim", "c"], "[auth]\njwt_claim = \"c\""),
        (
            "auth",
            &["--token-param", "t"],
            "[auth]\ntoken_param = \"t\"",
        ),
        (
            "auth",
            &["--token-cookie", "c"],
            "[auth]\ntoken_cookie = \"c\"",
        ),
        (
            "auth",
            &["--auth-url", "http://a/"],
            "[auth]\nurl = \"http://a/\"",
        ),
        (
            "auth",
            &["--auth-timeout", "7s"],
            "[auth]\ntimeout = \"7s\"",
        ),
        (
            "auth",
            &["--auth-client-header", "X-Real-IP"],
            "[auth]\nclient_header = \"X-Real-IP\"",
        ),
        (
            "auth",
            &["--auth-cache-ttl", "7s"],
            "[auth]\ncache_ttl = \"7s\"",
        ),
        (
            "auth",
            &["--auth-cache-size", "7"],
            "[auth]\ncache_size = 7",
        ),
    ];
    #[cfg(all(feature = "config-file", not(all(feature = "auth", feature = "admin"))))]
    const FEATURE_SETTINGS: &[(&str, &[&str], &str)] = &[];

    /// The settings of the tls feature: rows as [`SETTINGS`]'s.
    #[cfg(all(feature = "config-file", feature = "tls"))]
    const TLS_SETTINGS: &[(&str, &[&str], &str)] = &[
        (
            "tls_cert",
            &["--tls-cert", "/c.pem"],
            "tls_cert = \"/c.pem\"",
        ),
        ("tls_key", &["--tls-key", "/k.pem"], "tls_key = \"/k.pem\""),
        (
            "tls_listen",
            &["--tls-listen", "127.0.0.1:8443"],
            "tls_listen = \"127.0.0.1:8443\"",
        ),
        ("tls_threads", &["--tls-threads", "3"], "tls_threads = 3"),
        (
            "tls",
            &[
                "--tls-sni",
                "a.example,*.b.example=/a.pem,/a.key",
                "--tls-sni",
                "c.example=/c.pem,/c.key",
            ],
            "[[tls.cert]]\nserver_names = [\"a.example\", \"*.b.example\"]\n\
             cert = \"/a.pem\"\nkey = \"/a.key\"\n\
             [[tls.cert]]\nserver_names = [\"c.example\"]\ncert = \"/c.pem\"\nkey = \"/c.key\"",
        ),
    ];
    #[cfg(all(feature = "config-file", not(feature = "tls")))]
    const TLS_SETTINGS: &[(&str, &[&str], &str)] = &[];

    /// The settings of the sse feature: rows as [`SETTINGS`]'s.
    #[cfg(all(feature = "config-file", feature = "sse"))]
    const SSE_SETTINGS: &[(&str, &[&str], &str)] = &[
        (
            "sse_heartbeat",
            &["--sse-heartbeat", "7s"],
            r#"sse_heartbeat = "7s""#,
        ),
        (
            "sse_retry",
            &["--sse-retry", "250ms"],
            r#"sse_retry = "250ms""#,
        ),
        (
            "slow_stream",
            &["--slow-stream", "drop"],
            r#"slow_stream = "drop""#,
        ),
    ];
    #[cfg(all(feature = "config-file", not(feature = "sse")))]
    const SSE_SETTINGS: &[(&str, &[&str], &str)] = &[];

    #[cfg(feature = "config-file")]
    #[test]
    fn every_setting_has_a_flag_and_a_file_key_that_agree() {
        for (key, args, text) in SETTINGS
            .iter()
            .chain(FEATURE_SETTINGS)
            .chain(TLS_SETTINGS)
            .chain(SSE_SETTINGS)
        {
            let from_flags = cli(args).unwrap().apply(Config::default()).unwrap();
            let from_file = Config::from_toml(text).unwrap();
            assert_eq!(from_flags, from_file, "{key}");
            assert_ne!(from_flags, Config::default(), "{key} changes something");
        }
        // No setting is missing from the table (so none lacks a flag): every
        // key the file form has, Option ones included once set.
        let mut full = Config::from_toml(r#"admin = "127.0.0.1:1""#).unwrap();
        full.origin_ca = Some("/x".into());
        full.tls_cert = Some("/c".into());
        full.tls_key = Some("/k".into());
        full.tls
            .certs
            .push(wsgate::SniCert::new(["a.example"], "/a", "/k"));
        full.tls_listen = Some("127.0.0.1:8443".parse().unwrap());
        full.routes.push(RouteConfig::new("/", "ws://h/"));
        let table: toml::Table = toml::from_str(&full.to_toml()).unwrap();
        let listed: Vec<&str> = SETTINGS
            .iter()
            .chain(FEATURE_SETTINGS)
            .chain(TLS_SETTINGS)
            .chain(SSE_SETTINGS)
            .map(|(key, ..)| *key)
            .collect();
        // The flags of a feature this build leaves out do not exist.
        let unbuilt = !cfg!(all(feature = "auth", feature = "admin"));
        for key in table.keys() {
            if unbuilt && (key.starts_with("auth") || key == "admin_token_file") {
                continue;
            }
            if !cfg!(feature = "tls") && key.starts_with("tls") {
                continue;
            }
            if !cfg!(feature = "sse") && key.starts_with("sse_") {
                continue;
            }
            assert!(
                listed.contains(&key.as_str()),
                "{key} has no row (and maybe no flag)"
            );
        }
    }

    #[cfg(feature = "config-file")]
    #[test]
    fn flags_override_the_file_and_keep_what_they_do_not_say() {
        let file = Config::from_toml("lobby_capacity = 64\nqueue_depth = 4\n").unwrap();
        let c = cli(&["--queue-depth", "32"]).unwrap().apply(file).unwrap();
        assert_eq!((c.lobby_capacity, c.queue_depth), (64, 32));
    }
}
