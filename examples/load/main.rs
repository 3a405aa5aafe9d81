//! `load`: the load generator for wsgate, run as
//! `cargo run --release --example load -- ...`.
//!
//! One process, threads and mio only, playing up to three roles at once:
//! - origin (`--origin-listen`): a WebSocket server the gateway's lobbies
//!   connect to, broadcasting `--rate` msgs/s (`--burst` at a time) of
//!   `--size` bytes carrying `seq` and `sent_unix_ns` (see `origin.rs`);
//! - clients (`--url`, `--clients`): WebSocket clients (with `--sse`, event
//!   stream readers; over `wss://`, each through its own rustls session
//!   trusting `--tls-ca`) over `--threads` mio
//!   threads measuring deliveries, gaps, duplicates and latency (see
//!   `client.rs`);
//! - gateway observer (`--gateway-pid`): the gateway's CPU and RSS over the
//!   measurement window (see `gwstat.rs`).
//!
//! Event streams that resume (`--sse --reconnect`): a stream the gateway
//! ends (wsgate closes one that cannot keep up) is reconnected after
//! `--reconnect-delay-ms` (100) with `Last-Event-ID`, and seqs are checked
//! across the reconnect. The resume storm (`--sse --storm N --storm-away
//! SECS`, which implies `--reconnect`): at the window's start the last N
//! clients all close their streams, stay away SECS (default 2: they miss
//! rate × SECS messages), then all reconnect at once with their
//! `Last-Event-ID` (at most `--in-flight` connects in flight per thread, as
//! the first connects). A storm client is *live* again when it receives a
//! message with a seq above the highest any client had received when the
//! storm came back (a message published after the reconnect began); the
//! storm lasts from then until every storm client is live, plus 1 s
//! (`client.rs`). `--seconds` must be longer than SECS.
//!
//! Progress goes to stderr; at the end exactly one summary line goes to
//! stdout. Exit code 0 when the run completed, 1 on a setup failure (cannot
//! bind, bad arguments, no client connected) or if the hard deadline
//! (connect timeout + warm-up + seconds + 10 s) passes.
//!
//! Summary fields: `clients`/`connected` (plus `connect_failed`, `slow` when
//! non-zero); `rate`/`size` when this process is the origin (`rate=max(N/s)`
//! when saturated); `secs` the window; `delivered` messages received by all
//! clients inside the window (and per second); `expected` = messages the
//! origin published inside the window × connected reading clients (only when
//! this process is the origin; the two differ by edge effects of about one
//! latency's worth of messages); `p50`/`p99`/`max` latency (now −
//! `sent_unix_ns`) of messages received inside the window; `gaps`/`dups`
//! missing and repeated/reordered seqs per client; `errors` I/O and protocol
//! errors and server-initiated closes after connect; `upstreams` origin
//! connections open at the window end; `gw_cpu` (% of one core),
//! `gw_cpu_per_delivery` (gateway CPU time / delivered), `gw_rss` (at the
//! window end) and `gw_rss_per_client` ((RSS − `--rss-baseline-kib`) /
//! connected) with `--gateway-pid`.
//!
//! With `--reconnect` (whole run unless said): `stream_ends` streams the
//! gateway ended (not in `errors`: they reconnect); `reconnects` streams
//! reconnected (`200` received); `resets` `event: reset` received;
//! `reset_gaps` seqs missing right after a reset, in the window (expected,
//! so not in `gaps`); `reconnect_failed` reconnect attempts that failed and
//! were tried again, and `unresumed` clients whose stream was down at the
//! window's end for longer than the delay + 2 s (both only when non-zero).
//! With `--storm`: `storm` = N; `storm_left` storm clients that left;
//! `storm_live` live again / left; `storm_all_live` time from the storm's
//! reconnect until the last storm client was live (`-` if one never was),
//! `storm_live_p50` the median client's; `storm_resumed` messages storm
//! clients received from their reconnect until live (what they resumed,
//! then live ones up to the first new one); `storm_gaps`/`storm_dups`/`storm_resets`/
//! `storm_reset_gaps` the storm clients' share of those counts;
//! `others_p99` the p99 latency of the clients not in the storm over the
//! window, `others_storm_p99` theirs while the storm lasted; with
//! `--gateway-pid`, `storm_gw_cpu` the gateway's CPU (% of one core) and
//! `storm_gw_cpu_s` its CPU seconds while the storm lasted.
//!
//! A storm against a gateway (the origin in this process):
//! `load --origin-listen 127.0.0.1:9001 --url ws://127.0.0.1:8080/ --sse
//! --clients 2500 --storm 2000 --storm-away 2 --rate 50 --seconds 10
//! --gateway-pid PID` with `wsgate --origin ws://127.0.0.1:9001/`.
//!
//! Self-test without a gateway (clients straight on the tool's own origin):
//! `cargo run --release --example load -- --origin-listen 127.0.0.1:9001
//! --url ws://127.0.0.1:9001/ --clients 200 --rate 200 --seconds 5`.

mod client;
mod gwstat;
mod origin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use argh::FromArgs;
use crossbeam_channel::RecvTimeoutError;

use crate::client::ms;

/// Load generator for wsgate: origin, clients and gateway observer in one
/// process (loopback only). Prints one summary line on stdout.
#[derive(FromArgs)]
struct Args {
    /// gateway URL the clients connect to: ws://HOST:PORT/PATH, or wss://
    /// with --tls-ca (loopback)
    #[argh(option)]
    url: Option<String>,
    /// PEM file of the CA certificates a wss:// gateway is checked against
    #[argh(option)]
    tls_ca: Option<PathBuf>,
    /// number of clients (default 100)
    #[argh(option, default = "100")]
    clients: usize,
    /// client event-loop threads (default 2)
    #[argh(option, default = "2")]
    threads: usize,
    /// source addresses 127.0.0.1..=127.0.0.K to spread clients over (default 50)
    #[argh(option, default = "50")]
    source_ips: u8,
    /// measurement window in seconds (default 20)
    #[argh(option, default = "20")]
    seconds: u64,
    /// warm-up seconds after connecting, not measured (default 2)
    #[argh(option, default = "2")]
    warmup: u64,
    /// run the origin WebSocket server on this address, e.g. 127.0.0.1:9001
    #[argh(option)]
    origin_listen: Option<SocketAddr>,
    /// origin messages per second, 0 = as fast as upstreams accept (default 200)
    #[argh(option, default = "200")]
    rate: u64,
    /// the origin releases its rate this many messages at a time, back to
    /// back, every burst/rate seconds (default 1: smooth)
    #[argh(option, default = "1")]
    burst: u64,
    /// origin message size in bytes, at least 16 (default 128)
    #[argh(option, default = "128")]
    size: usize,
    /// the first M clients handshake and then never read (default 0)
    #[argh(option, default = "0")]
    slow: usize,
    /// pings a second each never-reading client sends (default 0)
    #[argh(option, default = "0")]
    slow_ping: u32,
    /// clients only connect and hold; the origin publishes nothing
    #[argh(switch)]
    idle: bool,
    /// the origin's messages carry a JSON price tick (else zeros)
    #[argh(switch)]
    ticks: bool,
    /// the origin's messages are text: seq and timestamp in base64, then
    /// dots (for relays that pass text only, e.g. to event streams)
    #[argh(switch)]
    text: bool,
    /// the clients offer permessage-deflate
    #[argh(switch)]
    deflate: bool,
    /// the clients read a Server-Sent Events stream (GET with Accept:
    /// text/event-stream) instead of upgrading to WebSocket
    #[argh(switch)]
    sse: bool,
    /// with --sse: a stream the gateway ends is reconnected with
    /// Last-Event-ID and checked for continuity across the reconnect
    #[argh(switch)]
    reconnect: bool,
    /// delay before a reconnect, ms (default 100)
    #[argh(option, default = "100")]
    reconnect_delay_ms: u64,
    /// with --sse: the last N clients make a resume storm at the window's
    /// start (implies --reconnect; default 0: none)
    #[argh(option, default = "0")]
    storm: usize,
    /// seconds the storm clients stay away before all reconnecting at once
    /// (default 2)
    #[argh(option, default = "2")]
    storm_away: u64,
    /// gateway process to observe (CPU and RSS over the window)
    #[argh(option)]
    gateway_pid: Option<u32>,
    /// gateway RSS with no clients, KiB, to report RSS per client
    #[argh(option)]
    rss_baseline_kib: Option<u64>,
    /// seconds allowed for all clients to connect (default 30)
    #[argh(option, default = "30")]
    connect_timeout: u64,
    /// connects in flight per client thread; keep threads x this <= the
    /// gateway's listen backlog (default 64)
    #[argh(option, default = "64")]
    in_flight: usize,
    /// a request header line every client sends, 'Name: value', e.g.
    /// 'Authorization: Bearer TOKEN' (repeatable)
    #[argh(option)]
    header: Vec<String>,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let hard = Duration::from_secs(args.connect_timeout + args.warmup + args.seconds + 10);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let watchdog = std::thread::Builder::new()
        .name("load-watchdog".to_string())
        .spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(hard) {
                eprintln!(
                    "load: error: hard deadline of {}s exceeded, exiting",
                    hard.as_secs()
                );
                std::process::exit(1);
            }
        });
    let watchdog = match watchdog {
        Ok(w) => w,
        Err(e) => {
            eprintln!("load: error: cannot start watchdog: {e}");
            return ExitCode::from(1);
        }
    };
    let result = run(&args);
    drop(done_tx);
    let _ = watchdog.join();
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("load: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Snapshots taken at the edges of the measurement window.
#[derive(Default)]
struct Edges {
    published: [u64; 2],
    upstreams: usize,
    gateway: [Option<gwstat::Sample>; 2],
    /// The gateway at the storm's reconnect and at its end.
    storm: [Option<gwstat::Sample>; 2],
    started: Option<Instant>,
    window: Duration,
}

impl Edges {
    /// Samples the gateway at the storm's reconnect (`end` 0) or end (1).
    fn sample_storm(&mut self, end: usize, observer: Option<&gwstat::Observer>) {
        if let Some(obs) = observer {
            match obs.sample() {
                Ok(s) => self.storm[end] = Some(s),
                Err(e) => eprintln!("load: cannot sample gateway: {e}"),
            }
        }
    }

    fn take(
        &mut self,
        end: usize,
        origin: Option<&origin::Origin>,
        observer: Option<&gwstat::Observer>,
    ) {
        let now = Instant::now();
        if end == 0 {
            self.started = Some(now);
        } else if let Some(s) = self.started {
            self.window = now - s;
        }
        if let Some(o) = origin {
            self.published[end] = o.published();
            self.upstreams = o.connections();
        }
        if let Some(obs) = observer {
            match obs.sample() {
                Ok(s) => self.gateway[end] = Some(s),
                Err(e) => eprintln!("load: cannot sample gateway: {e}"),
            }
        }
    }
}

fn run(args: &Args) -> Result<String, String> {
    if args.url.is_none() && args.origin_listen.is_none() {
        return Err("nothing to do: give --url and/or --origin-listen".to_string());
    }
    if args.size < 16 {
        return Err(format!("--size must be at least 16 (got {})", args.size));
    }
    if args.source_ips == 0 || args.source_ips > 254 {
        return Err("--source-ips must be in 1..=254".to_string());
    }
    if args.threads == 0 {
        return Err("--threads must be at least 1".to_string());
    }
    if args.url.is_some() && args.clients == 0 {
        return Err("--clients must be at least 1".to_string());
    }
    if args.ticks && args.text {
        return Err("--ticks and --text exclude each other".to_string());
    }
    if (args.reconnect || args.storm > 0) && !args.sse {
        return Err("--reconnect and --storm need --sse".to_string());
    }
    if args.storm > 0 && args.storm >= args.clients {
        return Err(format!(
            "--storm must be below --clients (the others are measured beside it): {} >= {}",
            args.storm, args.clients
        ));
    }
    if args.storm > 0 && args.storm_away >= args.seconds {
        return Err(format!(
            "--seconds ({}) must be longer than --storm-away ({}): the storm runs in the window",
            args.seconds, args.storm_away
        ));
    }

    let observer = match args.gateway_pid {
        Some(pid) => {
            let obs = gwstat::Observer::new(pid)?;
            eprintln!(
                "load: observing gateway pid {pid} ({} clock ticks/s)",
                obs.ticks_per_sec()
            );
            Some(obs)
        }
        None => None,
    };

    let origin = match args.origin_listen {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "--origin-listen must be a loopback address (got {addr})"
                ));
            }
            let rate = match args.rate {
                _ if args.idle => origin::Rate::Paused,
                0 => origin::Rate::Saturated,
                rate if args.burst > 1 => origin::Rate::Bursts {
                    per_second: rate,
                    burst: args.burst,
                },
                rate => origin::Rate::PerSecond(rate),
            };
            let started = if args.ticks {
                origin::Origin::start_ticks(addr, rate, args.size)
            } else if args.text {
                origin::Origin::start_text(addr, rate, args.size)
            } else {
                origin::Origin::start_with(addr, rate, args.size)
            };
            let o = started.map_err(|e| format!("cannot bind origin on {addr}: {e}"))?;
            eprintln!(
                "load: origin on {} ({}, {} B)",
                o.local_addr(),
                describe_rate(args),
                args.size
            );
            Some(o)
        }
        None => None,
    };

    let mut edges = Edges::default();
    let warmup = Duration::from_secs(args.warmup);
    let measure = Duration::from_secs(args.seconds);
    let report = match &args.url {
        Some(url) => {
            let mut config = client::Config::new(url, args.clients);
            config.threads = args.threads;
            config.source_ips = args.source_ips;
            config.slow = args.slow;
            config.deflate = args.deflate;
            config.sse = args.sse;
            config.slow_ping = args.slow_ping;
            config.connect_timeout = Duration::from_secs(args.connect_timeout);
            config.max_in_flight = args.in_flight;
            config.headers.clone_from(&args.header);
            config.tls_ca.clone_from(&args.tls_ca);
            if args.reconnect || args.storm > 0 {
                config.reconnect = Some(Duration::from_millis(args.reconnect_delay_ms));
            }
            config.storm = args.storm;
            config.storm_away = Duration::from_secs(args.storm_away);
            let t0 = Instant::now();
            let mut hook = |phase: client::Phase| match phase {
                client::Phase::Connected(p) => {
                    eprintln!(
                        "load: connected {}/{} clients ({} failed) in {:.1}s",
                        p.connected,
                        args.clients,
                        p.failed,
                        t0.elapsed().as_secs_f64(),
                    );
                    if p.connected > 0 {
                        eprintln!("load: warming up {}s", args.warmup);
                    }
                }
                client::Phase::WindowStart => {
                    edges.take(0, origin.as_ref(), observer.as_ref());
                    eprintln!("load: measuring for {}s", args.seconds);
                }
                client::Phase::StormBack => {
                    edges.sample_storm(0, observer.as_ref());
                    eprintln!(
                        "load: {} storm clients reconnecting after {}s away",
                        args.storm, args.storm_away
                    );
                }
                client::Phase::StormOver => {
                    edges.sample_storm(1, observer.as_ref());
                    eprintln!("load: storm over");
                }
                client::Phase::WindowEnd => {
                    edges.take(1, origin.as_ref(), observer.as_ref());
                    eprintln!("load: closing clients");
                }
            };
            match client::run(config, warmup, measure, &mut hook) {
                Ok(r) => Some(r),
                Err(e) => {
                    if let Some(o) = origin {
                        let _ = o.stop();
                    }
                    return Err(e);
                }
            }
        }
        None => {
            eprintln!("load: origin only; warming up {}s", args.warmup);
            std::thread::sleep(warmup);
            edges.take(0, origin.as_ref(), observer.as_ref());
            eprintln!("load: measuring for {}s", args.seconds);
            std::thread::sleep(measure);
            edges.take(1, origin.as_ref(), observer.as_ref());
            None
        }
    };

    if let Some(o) = origin {
        eprintln!(
            "load: origin published {} messages in total, {} upstream connection(s) at the window end",
            o.published(),
            edges.upstreams
        );
        if let Err(e) = o.stop() {
            eprintln!("load: origin stopped with an error: {e}");
        }
    }
    if let Some(r) = &report {
        eprintln!(
            "load: received {} messages in total; errors: io={} protocol={} server_closes={}; clean closes {}/{}{}",
            r.total_messages,
            r.io_errors,
            r.protocol_errors,
            r.server_closes,
            r.clean_closes,
            r.connected - r.slow_connected,
            r.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
        if r.connect_failed > 0 {
            eprintln!(
                "load: {} client(s) failed to connect; first error: {}",
                r.connect_failed,
                r.first_connect_error.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(summary(args, report.as_ref(), &edges, observer.as_ref()))
}

fn describe_rate(args: &Args) -> String {
    if args.idle {
        "paused (--idle)".to_string()
    } else if args.rate == 0 {
        "saturated".to_string()
    } else if args.burst > 1 {
        format!("{}/s in bursts of {}", args.rate, args.burst)
    } else {
        format!("{}/s", args.rate)
    }
}

/// The summary's reconnect fields (see the module docs).
fn resumes(s: &mut String, r: &client::Report) {
    use std::fmt::Write as _;
    let _ = write!(
        s,
        " stream_ends={} reconnects={} resets={} reset_gaps={}",
        r.stream_ends, r.reconnects, r.resets, r.reset_gaps
    );
    if r.reconnect_failed > 0 {
        let _ = write!(s, " reconnect_failed={}", r.reconnect_failed);
    }
    if r.unresumed > 0 {
        let _ = write!(s, " unresumed={}", r.unresumed);
    }
}

/// The summary's storm fields (see the module docs).
fn storm(
    s: &mut String,
    n: usize,
    r: &client::Report,
    edges: &Edges,
    observer: Option<&gwstat::Observer>,
) {
    use std::fmt::Write as _;
    let st = &r.storm;
    let _ = write!(
        s,
        " storm={n} storm_left={} storm_live={}/{}",
        st.left, st.live, st.left
    );
    if st.live < st.left || st.time_to_live.is_empty() {
        s.push_str(" storm_all_live=-");
    } else {
        let _ = write!(s, " storm_all_live={}", ms(st.time_to_live.max()));
    }
    if !st.time_to_live.is_empty() {
        let _ = write!(
            s,
            " storm_live_p50={}",
            ms(st.time_to_live.value_at_quantile(0.50))
        );
    }
    let _ = write!(
        s,
        " storm_resumed={} storm_gaps={} storm_dups={} storm_resets={} storm_reset_gaps={}",
        st.resumed, st.gaps, st.dups, st.resets, st.reset_gaps
    );
    let p99 = |h: &hdrhistogram::Histogram<u64>| {
        if h.is_empty() {
            "-".to_string()
        } else {
            ms(h.value_at_quantile(0.99))
        }
    };
    let _ = write!(
        s,
        " others_p99={} others_storm_p99={}",
        p99(&r.others_latency),
        p99(&st.others_latency)
    );
    if let (Some(obs), [Some(a), Some(b)]) = (observer, &edges.storm) {
        let cpu_us = obs.cpu_us(a, b);
        let wall_us = b.at.saturating_duration_since(a.at).as_micros().max(1) as f64;
        let _ = write!(
            s,
            " storm_gw_cpu={:.1}% storm_gw_cpu_s={:.2}",
            cpu_us as f64 * 100.0 / wall_us,
            cpu_us as f64 / 1e6
        );
    }
}

/// The one summary line.
fn summary(
    args: &Args,
    report: Option<&client::Report>,
    edges: &Edges,
    observer: Option<&gwstat::Observer>,
) -> String {
    use std::fmt::Write as _;
    let secs = edges.window.as_secs_f64().max(1e-9);
    let published = edges.published[1].saturating_sub(edges.published[0]);
    let is_origin = args.origin_listen.is_some();
    let mut s = String::from("load:");
    if let Some(r) = report {
        let _ = write!(s, " clients={} connected={}", r.clients, r.connected);
        if r.connect_failed > 0 {
            let _ = write!(s, " connect_failed={}", r.connect_failed);
        }
        if args.slow > 0 {
            let _ = write!(s, " slow={}", r.slow_connected);
        }
    } else {
        s.push_str(" origin-only");
    }
    if args.idle {
        s.push_str(" idle");
    }
    if is_origin {
        if args.idle {
            s.push_str(" rate=0/s");
        } else if args.rate == 0 {
            let _ = write!(s, " rate=max({:.0}/s)", published as f64 / secs);
        } else {
            let _ = write!(s, " rate={}/s", args.rate);
            if args.burst > 1 {
                let _ = write!(s, " burst={}", args.burst);
            }
        }
        let _ = write!(s, " size={}B", args.size);
    }
    let _ = write!(s, " secs={}", args.seconds);
    let mut delivered = 0;
    match report {
        Some(r) => {
            delivered = r.delivered;
            let window = r.window.as_secs_f64().max(1e-9);
            let _ = write!(
                s,
                " delivered={} ({:.0}/s)",
                r.delivered,
                r.delivered as f64 / window
            );
            if is_origin && !args.idle {
                let reading = (r.connected - r.slow_connected) as u64;
                let _ = write!(s, " expected={}", published * reading);
            }
            if r.latency.is_empty() {
                s.push_str(" p50=- p99=- max=-");
            } else {
                let _ = write!(
                    s,
                    " p50={} p99={} max={}",
                    ms(r.latency.value_at_quantile(0.50)),
                    ms(r.latency.value_at_quantile(0.99)),
                    ms(r.latency.max())
                );
            }
            let _ = write!(s, " gaps={} dups={} errors={}", r.gaps, r.dups, r.errors());
            if is_origin {
                let _ = write!(s, " upstreams={}", edges.upstreams);
            }
            if args.reconnect || args.storm > 0 {
                resumes(&mut s, r);
            }
            if args.storm > 0 {
                storm(&mut s, args.storm, r, edges, observer);
            }
        }
        None => {
            let _ = write!(
                s,
                " published={published} ({:.0}/s) upstreams={}",
                published as f64 / secs,
                edges.upstreams
            );
        }
    }
    let connected = report.map_or(0, |r| r.connected);
    if let (Some(obs), [Some(a), Some(b)]) = (observer, &edges.gateway) {
        let cpu_us = obs.cpu_us(a, b);
        let wall_us = b.at.saturating_duration_since(a.at).as_micros().max(1) as f64;
        let _ = write!(s, " gw_cpu={:.1}%", cpu_us as f64 * 100.0 / wall_us);
        if delivered > 0 {
            let _ = write!(
                s,
                " gw_cpu_per_delivery={:.2}us",
                cpu_us as f64 / delivered as f64
            );
        } else {
            s.push_str(" gw_cpu_per_delivery=-");
        }
        let _ = write!(s, " gw_rss={:.1}MiB", b.rss_kib as f64 / 1024.0);
        if let Some(base) = args.rss_baseline_kib {
            if connected > 0 {
                let per = b.rss_kib.saturating_sub(base) as f64 / connected as f64;
                let _ = write!(s, " gw_rss_per_client={per:.2}KiB");
            }
        }
    }
    s
}
