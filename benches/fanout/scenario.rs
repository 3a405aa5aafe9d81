//! The bench's scenarios, and how one scenario is run against one relay and
//! turned into a [`Measurement`].
//!
//! A run, start to finish, owns everything it starts: the origin (a thread of
//! this process), the relay (a child process, see `relay.rs`) and the clients
//! (threads of this process); all three are stopped before [`run`] returns,
//! on success and on every error path (their guards stop them on drop).
//!
//! The `tls` scenarios differ in two places only: wsgate (or nginx) gets
//! the bench's certificate (`tls.rs`) and serves `wss://`, and the clients
//! trust its CA and connect over TLS.
//!
//! Sequence: origin up → relay up (listening, and for the baseline connected
//! upstream) → settle, sample relay RSS with no client → connect the clients
//! → for nchan, start the bridge publishing into it → warm up →
//! measurement window (relay CPU time and origin seq sampled at both edges;
//! the clients count deliveries, gaps, duplicates and latency only inside
//! it) → SIGTERM the relay (it sends its clients Close 1001; nginx closes
//! their connections) → close the clients → stop the origin.

use std::net::SocketAddr;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::client::{self, Clients};
use crate::gwstat::{Observer, Sample};
use crate::origin::{Origin, Rate};
use crate::relay::{Kind, Relay};
use crate::tls::Certs;

/// Pause between the relay listening and the no-client RSS sample.
const SETTLE: Duration = Duration::from_millis(500);
/// How long an event-stream client waits before reconnecting a stream the
/// relay ended (the load tool's default).
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// One load shape.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Name used in output and to select it on the command line.
    pub name: &'static str,
    pub clients: usize,
    pub rate: Rate,
    /// Message size in bytes (payload).
    pub size: usize,
    /// Clients (the first ones) that never read.
    pub slow: usize,
    /// Flags added to wsgate's command line (the baseline has no knobs).
    pub wsgate_args: &'static [&'static str],
    /// The origin's messages carry a JSON price tick after seq and
    /// timestamp (else zeros).
    pub ticks: bool,
    /// The clients offer permessage-deflate (the baseline declines it).
    pub deflate: bool,
    /// Compare wsgate's WebSocket clients with its event-stream (SSE)
    /// clients, instead of the baseline with wsgate: the runs are
    /// [`Kind::PROTOCOLS`] rather than `against` and wsgate.
    pub sse: bool,
    /// wsgate serves its clients `wss://` (the bench's throwaway
    /// certificate, `tls.rs`), and so does nginx with nchan; the baseline
    /// and the coalescing relay have no TLS and serve `ws://` as ever.
    pub tls: bool,
    /// The relay wsgate is compared with: [`Kind::Baseline`], the
    /// coalescing [`Kind::Writev`] (the `-writev` scenarios), or nginx with
    /// nchan, [`Kind::Nchan`] to WebSocket clients or [`Kind::NchanSse`] to
    /// event-stream ones, then wsgate to the same kind of client (the
    /// `-nchan` scenarios, whose origin sends text: see
    /// [`Scenario::is_text`]).
    pub against: Kind,
}

/// 10 000 msg/s to 1000 clients offers 10M deliveries/s, several times what
/// this machine kind can write: the relay is saturated, while a relay that
/// keeps up with its origin link can still keep latency low.
const SATURATED: Scenario = Scenario {
    name: "saturated",
    clients: 1000,
    rate: Rate::PerSecond(10_000),
    size: 128,
    slow: 0,
    wsgate_args: &[],
    ticks: false,
    deflate: false,
    sse: false,
    tls: false,
    against: Kind::Baseline,
};

/// 1000 clients × 200 msg/s × 128 B (also the load of `wss-steady`).
const STEADY: Scenario = Scenario {
    name: "steady",
    clients: 1000,
    rate: Rate::PerSecond(200),
    size: 128,
    slow: 0,
    wsgate_args: &[],
    ticks: false,
    deflate: false,
    sse: false,
    tls: false,
    against: Kind::Baseline,
};

/// 200 clients × 50 msg/s × 64 KiB (also the load of `wss-large`).
const LARGE: Scenario = Scenario {
    name: "large",
    clients: 200,
    rate: Rate::PerSecond(50),
    size: 64 * 1024,
    slow: 0,
    wsgate_args: &[],
    ticks: false,
    deflate: false,
    sse: false,
    tls: false,
    against: Kind::Baseline,
};

/// 16 000 clients × 5 msg/s × 128 B: the cost of width (also `wide-writev`).
const WIDE: Scenario = Scenario {
    name: "wide",
    clients: 16_000,
    rate: Rate::PerSecond(5),
    size: 128,
    slow: 0,
    wsgate_args: &[],
    ticks: false,
    deflate: false,
    sse: false,
    tls: false,
    against: Kind::Baseline,
};

/// 10 000 idle clients: memory per client (also `idle-writev`).
const IDLE: Scenario = Scenario {
    name: "idle",
    clients: 10_000,
    rate: Rate::Paused,
    size: 128,
    slow: 0,
    wsgate_args: &[],
    ticks: false,
    deflate: false,
    sse: false,
    tls: false,
    against: Kind::Baseline,
};

/// Every scenario run by default, in the order they run.
pub const ALL: [Scenario; 13] = [
    SATURATED,
    STEADY,
    // The same with a 10 ms write-batching window: fewer, larger writes.
    Scenario {
        name: "batched",
        clients: 1000,
        rate: Rate::PerSecond(200),
        size: 128,
        slow: 0,
        wsgate_args: &["--write-batch-ms", "10"],
        ticks: false,
        deflate: false,
        sse: false,
        tls: false,
        against: Kind::Baseline,
    },
    // The steady feed's rate in bursts of 16 back to back (12.5 a second):
    // wsgate's writes coalesce by themselves while it is behind.
    Scenario {
        name: "burst",
        clients: 1000,
        rate: Rate::Bursts {
            per_second: 200,
            burst: 16,
        },
        size: 128,
        slow: 0,
        wsgate_args: &[],
        ticks: false,
        deflate: false,
        sse: false,
        tls: false,
        against: Kind::Baseline,
    },
    // Well below saturation: latency is the measure.
    Scenario {
        name: "light",
        clients: 1000,
        rate: Rate::PerSecond(50),
        size: 128,
        slow: 0,
        wsgate_args: &[],
        ticks: false,
        deflate: false,
        sse: false,
        tls: false,
        against: Kind::Baseline,
    },
    // 100 of the 1000 clients never read: the others must lose nothing.
    // wsgate's default unsent bound (16 KiB) keeps the kernel from absorbing
    // minutes of this feed for each stalled client, so their queues
    // overflow within the warm-up and drop-oldest is what is measured.
    Scenario {
        name: "slow",
        clients: 1000,
        rate: Rate::PerSecond(200),
        size: 128,
        slow: 100,
        wsgate_args: &[],
        ticks: false,
        deflate: false,
        sse: false,
        tls: false,
        against: Kind::Baseline,
    },
    LARGE,
    WIDE,
    IDLE,
    // A 1 KiB JSON price tick at steady load, to clients that do not offer
    // permessage-deflate; then the same to clients that do: wsgate
    // compresses each message once per lobby. Compared in one run: bytes
    // on the wire and relay CPU per delivery.
    Scenario {
        name: "json",
        clients: 1000,
        rate: Rate::PerSecond(200),
        size: 1024,
        slow: 0,
        wsgate_args: &[],
        ticks: true,
        deflate: false,
        sse: false,
        tls: false,
        against: Kind::Baseline,
    },
    Scenario {
        name: "compressed",
        clients: 1000,
        rate: Rate::PerSecond(200),
        size: 1024,
        slow: 0,
        wsgate_args: &[],
        ticks: true,
        deflate: true,
        sse: false,
        tls: false,
        against: Kind::Baseline,
    },
    // wsgate at steady load and saturated, once to WebSocket clients and
    // once to event-stream clients, the same origin messages (binary, so
    // each is an `event: binary` in base64, encoded once per lobby).
    Scenario {
        name: "sse-steady",
        clients: 1000,
        rate: Rate::PerSecond(200),
        size: 128,
        slow: 0,
        wsgate_args: &[],
        ticks: false,
        deflate: false,
        sse: true,
        tls: false,
        against: Kind::Baseline,
    },
    Scenario {
        name: "sse-saturated",
        clients: 1000,
        rate: Rate::PerSecond(10_000),
        size: 128,
        slow: 0,
        wsgate_args: &[],
        ticks: false,
        deflate: false,
        sse: true,
        tls: false,
        against: Kind::Baseline,
    },
];

/// Scenarios that run only when named: `steady`'s and `large`'s loads over
/// `wss://` to wsgate (the baseline as in those), to compare with them in
/// the same run (`-- steady,wss-steady,large,wss-large`). Each takes as
/// long as its plain twin, and more to connect (a full TLS handshake per
/// client), which the default run need not pay. `saturated`'s, `wide`'s
/// and `idle`'s loads with wsgate against the coalescing relay
/// (`writev.rs`) rather than the baseline. And wsgate against nginx with
/// nchan (`nchan.rs`), which needs both installed: `steady`'s and
/// `saturated`'s loads to event-stream clients, and `saturated`'s,
/// `large`'s and `idle`'s to `wss://` clients of both.
pub const ON_REQUEST: [Scenario; 10] = [
    Scenario {
        name: "wss-steady",
        tls: true,
        ..STEADY
    },
    Scenario {
        name: "wss-large",
        tls: true,
        ..LARGE
    },
    Scenario {
        name: "saturated-writev",
        against: Kind::Writev,
        ..SATURATED
    },
    Scenario {
        name: "wide-writev",
        against: Kind::Writev,
        ..WIDE
    },
    Scenario {
        name: "idle-writev",
        against: Kind::Writev,
        ..IDLE
    },
    Scenario {
        name: "sse-steady-nchan",
        against: Kind::NchanSse,
        ..STEADY
    },
    Scenario {
        name: "sse-saturated-nchan",
        against: Kind::NchanSse,
        ..SATURATED
    },
    Scenario {
        name: "wss-saturated-nchan",
        tls: true,
        against: Kind::Nchan,
        ..SATURATED
    },
    Scenario {
        name: "wss-large-nchan",
        tls: true,
        against: Kind::Nchan,
        ..LARGE
    },
    Scenario {
        name: "wss-idle-nchan",
        tls: true,
        against: Kind::Nchan,
        ..IDLE
    },
];

/// The `wss-` scenarios beside the plain ones they repeat over TLS, as
/// (plain, wss) names.
pub const TLS_TWINS: [(&str, &str); 2] = [
    (STEADY.name, ON_REQUEST[0].name),
    (LARGE.name, ON_REQUEST[1].name),
];

impl Scenario {
    /// Idle scenarios measure memory per client rather than throughput.
    pub fn is_idle(&self) -> bool {
        self.rate == Rate::Paused
    }

    /// The origin sends text messages (seq and timestamp in base64): to
    /// both relays of an nchan scenario, since nchan's EventSource passes a
    /// message's bytes on as its data, as they are.
    pub fn is_text(&self) -> bool {
        self.against.is_nchan()
    }

    /// The relays (or client protocols) this scenario compares, in the
    /// order they run; the ratio is the second's over the first's.
    pub fn kinds(&self) -> [Kind; 2] {
        if self.sse {
            Kind::PROTOCOLS
        } else {
            [self.against, self.against.wsgate_twin()]
        }
    }

    /// One line saying what the load is.
    pub fn describe(&self) -> String {
        let load = self.load();
        match (self.tls, self.against) {
            (true, Kind::Nchan) => format!("{load}, text; wsgate and nginx+nchan over wss://"),
            (true, _) => format!("{load}; wsgate over wss://, the baseline ws://"),
            (false, Kind::NchanSse) => {
                format!("{load}, text; wsgate's event streams and nchan's EventSource")
            }
            (false, _) => load,
        }
    }

    fn load(&self) -> String {
        let size = if self.size % 1024 == 0 {
            format!("{} KiB", self.size / 1024)
        } else {
            format!("{} B", self.size)
        };
        match self.rate {
            Rate::Paused => format!("{} idle clients, origin paused", self.clients),
            Rate::PerSecond(r) => format!("{} clients x {r} msg/s x {size}", self.clients),
            Rate::Bursts { per_second, burst } => format!(
                "{} clients x {per_second} msg/s in bursts of {burst} x {size}",
                self.clients
            ),
            Rate::Saturated => format!(
                "{} clients, {size} messages, origin as fast as the relay reads",
                self.clients
            ),
        }
    }
}

/// Timing shared by every run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Load before the window, not measured.
    pub warmup: Duration,
    /// The measurement window.
    pub window: Duration,
}

/// What one run measured.
#[derive(Debug)]
pub struct Measurement {
    pub requested: usize,
    pub connected: usize,
    /// The clients' measurement window.
    pub window: Duration,
    /// Messages received by all clients inside the window.
    pub delivered: u64,
    /// Bytes all clients read inside the window (frames as sent; over
    /// `wss://`, the frames inside the TLS records).
    pub wire_bytes: u64,
    /// Messages the origin generated inside the window.
    pub published: u64,
    /// Origin connections open at the window end.
    pub upstreams: usize,
    /// Relay CPU time (user + system) over the window, µs.
    pub cpu_us: u64,
    /// Wall time between the two CPU samples.
    pub cpu_wall: Duration,
    /// This process's CPU time (origin + clients) over the window, µs: the
    /// load generator competes with the relay for the same cores.
    pub load_cpu_us: u64,
    /// Latency p50, p99 and max in µs, if any message carried a timestamp.
    pub latency: Option<[u64; 3]>,
    pub gaps: u64,
    pub dups: u64,
    /// Messages the clients missed over the whole run (not only the window).
    pub missed: u64,
    /// Frames the relay says it dropped over the whole run (wsgate only).
    pub relay_dropped: Option<u64>,
    /// Event-stream clients only: how their streams were ended and resumed.
    pub resumes: Option<Resumes>,
    /// Relay RSS right after start (no client), KiB.
    pub rss_empty_kib: u64,
    /// Relay RSS at the window end, KiB.
    pub rss_loaded_kib: u64,
    /// Things that make this run suspect (partial connect, client errors,
    /// unclean relay exit); the bench exits non-zero when any run has one.
    pub problems: Vec<String>,
}

/// How an event-stream run's streams ended and resumed, whole run (reset
/// gaps in the window): see the load tool's `client.rs`.
#[derive(Debug, Clone, Copy)]
pub struct Resumes {
    /// Streams the relay ended (each client then reconnects).
    pub ended: u64,
    /// Streams reconnected with `Last-Event-ID`.
    pub reconnects: u64,
    /// Reconnect attempts that failed (and were tried again).
    pub failed: u64,
    /// `event: reset` received: an ID the relay could not serve.
    pub resets: u64,
    /// Seqs skipped by those resets (in the window).
    pub reset_gaps: u64,
    /// Clients whose stream was down at the window's end for longer than a
    /// reconnect should take: could not reconnect.
    pub unresumed: u64,
}

impl Measurement {
    /// Deliveries per second of window.
    pub fn deliveries_per_sec(&self) -> f64 {
        self.delivered as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Bytes on the wire per delivery (none without deliveries).
    pub fn bytes_per_delivery(&self) -> Option<f64> {
        (self.delivered > 0).then(|| self.wire_bytes as f64 / self.delivered as f64)
    }

    /// Relay CPU time per delivery, µs (none without deliveries).
    pub fn cpu_per_delivery_us(&self) -> Option<f64> {
        (self.delivered > 0).then(|| self.cpu_us as f64 / self.delivered as f64)
    }

    /// Relay CPU use, % of one core.
    pub fn cpu_percent(&self) -> f64 {
        self.cpu_us as f64 * 100.0 / (self.cpu_wall.as_micros().max(1) as f64)
    }

    /// Load generator CPU use, % of one core.
    pub fn load_cpu_percent(&self) -> f64 {
        self.load_cpu_us as f64 * 100.0 / (self.cpu_wall.as_micros().max(1) as f64)
    }

    /// RSS growth from no client to all clients connected, per client, KiB.
    pub fn rss_per_client_kib(&self) -> Option<f64> {
        (self.connected > 0).then(|| {
            self.rss_loaded_kib.saturating_sub(self.rss_empty_kib) as f64 / self.connected as f64
        })
    }

    /// When every client got every message: the CPU each origin message cost
    /// the relay and the load generator, in ms, and the time that much work
    /// takes on every core of the machine. Each message is one write per
    /// client and one read per client, so that time bounds from below how
    /// long the last client of a message waits, whatever the relay.
    pub fn per_message_ms(&self) -> Option<[f64; 3]> {
        let all_delivered = self.delivered_share().is_some_and(|share| share >= 0.99);
        (all_delivered && self.published > 0).then(|| {
            let per_message = |us: u64| us as f64 / self.published as f64 / 1000.0;
            let (relay, load) = (per_message(self.cpu_us), per_message(self.load_cpu_us));
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            [relay, load, (relay + load) / cores as f64]
        })
    }

    /// Deliveries as a share of what the origin published in the window times
    /// the clients connected (edge effects of about one latency's worth).
    pub fn delivered_share(&self) -> Option<f64> {
        let expected = self.published * self.connected as u64;
        (expected > 0).then(|| self.delivered as f64 / expected as f64)
    }
}

/// Runs `scenario` against the relay `kind`; `certs` are what a `tls`
/// scenario's wsgate serves and its clients trust. Progress goes to stderr.
pub fn run(
    scenario: &Scenario,
    kind: Kind,
    settings: &Settings,
    certs: Option<&Certs>,
) -> Result<Measurement, String> {
    let name = kind.name();
    let tls = match (scenario.tls && kind.has_tls(), certs) {
        (true, Some(certs)) => Some(certs),
        (true, None) => return Err(format!("{} needs certificates", scenario.name)),
        (false, _) => None,
    };
    let start = if scenario.ticks {
        Origin::start_ticks
    } else if scenario.is_text() {
        Origin::start_text
    } else {
        Origin::start_with
    };
    let origin = start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        scenario.rate,
        scenario.size,
    )
    .map_err(|e| format!("cannot start the origin: {e}"))?;
    let origin_url = format!("ws://{}/", origin.local_addr());
    let mut relay = Relay::start(kind, &origin_url, scenario.wsgate_args, tls)?;
    let observer = Observer::new(relay.pid()).map_err(|e| format!("cannot observe {name}: {e}"))?;
    let load = Observer::new(std::process::id())
        .map_err(|e| format!("cannot observe the bench process: {e}"))?;
    sleep(SETTLE);
    let empty = sample(&observer, name)?;

    let mut config = client::Config::new(relay.url(), scenario.clients);
    config.slow = scenario.slow;
    config.deflate = scenario.deflate;
    config.sse = kind.is_sse();
    // A stream wsgate closes (one that cannot keep up) is reconnected and
    // resumed, as a browser's EventSource would. nchan's event IDs are not
    // wsgate's: its streams reconnect without `Last-Event-ID`, so they
    // start again at the newest message, and what they missed shows as gaps.
    config.reconnect = kind.is_sse().then_some(RECONNECT_DELAY);
    config.tls_ca = tls.map(|certs| certs.ca.clone());
    let connect_deadline = Instant::now() + config.connect_timeout;
    let started = Instant::now();
    let mut clients = Clients::start(config).map_err(|e| format!("cannot start clients: {e}"))?;
    let progress = clients.wait_connected(connect_deadline);
    eprintln!(
        "  {name}: {}/{} clients connected in {:.1}s, {} failed",
        progress.connected,
        scenario.clients,
        started.elapsed().as_secs_f64(),
        progress.failed
    );
    if progress.connected == 0 {
        let report = clients.finish();
        return Err(format!(
            "no client connected to {name} ({} failed; first error: {})",
            report.connect_failed,
            report.first_connect_error.as_deref().unwrap_or("timed out")
        ));
    }
    // nchan's feed starts now: a saturated nginx accepts so slowly that
    // clients connecting under load time out (the others were fed from
    // their start; a live feed's first seconds are the warm-up's anyway).
    relay.start_feed(&origin_url)?;

    sleep(settings.warmup);
    clients.begin_window();
    let before = sample(&observer, name)?;
    let load_before = sample(&load, "the bench process")?;
    let published_before = origin.published();
    sleep(settings.window);
    clients.end_window();
    let after = sample(&observer, name)?;
    let load_after = sample(&load, "the bench process")?;
    let published = origin.published().saturating_sub(published_before);
    let upstreams = origin.connections();

    // Relay first, so its clients get a Close from it rather than the other
    // way round (the baseline never reads its clients); then the clients, then
    // the origin.
    let mut problems = Vec::new();
    let relay_dropped = relay.stop().unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let report = clients.finish();
    if let Err(e) = origin.stop() {
        problems.push(format!("the origin failed: {e}"));
    }

    if report.connected < report.clients {
        problems.push(format!(
            "only {}/{} clients connected; first error: {}",
            report.connected,
            report.clients,
            report.first_connect_error.as_deref().unwrap_or("?")
        ));
    }
    let errors = report.io_errors + report.protocol_errors;
    if errors > 0 {
        problems.push(format!(
            "{} client I/O errors and {} protocol errors; first: {}",
            report.io_errors,
            report.protocol_errors,
            report.first_error.as_deref().unwrap_or("?")
        ));
    }
    // A stream closed and resumed is what wsgate does at saturation; one
    // that could not come back is a problem.
    if report.unresumed > 0 {
        problems.push(format!(
            "{} event streams {name} ended could not reconnect by the window's end",
            report.unresumed
        ));
    }
    // Clients count what they miss between their first and last message;
    // the relay also counts drops before a client's first frame (its queue
    // overflowing while the writer has not reached it yet), so it may count
    // more, never fewer.
    if let Some(dropped) = relay_dropped.filter(|&d| d < report.missed) {
        problems.push(format!(
            "{name} counted {dropped} dropped frames, fewer than its clients missed ({})",
            report.missed
        ));
    }
    let latency = (!report.latency.is_empty()).then(|| {
        [
            report.latency.value_at_quantile(0.50),
            report.latency.value_at_quantile(0.99),
            report.latency.max(),
        ]
    });
    Ok(Measurement {
        requested: report.clients,
        connected: report.connected,
        window: report.window,
        delivered: report.delivered,
        wire_bytes: report.wire_bytes,
        published,
        upstreams,
        cpu_us: observer.cpu_us(&before, &after),
        cpu_wall: after.at.saturating_duration_since(before.at),
        load_cpu_us: load.cpu_us(&load_before, &load_after),
        latency,
        gaps: report.gaps,
        dups: report.dups,
        missed: report.missed,
        relay_dropped,
        resumes: kind.is_sse().then_some(Resumes {
            ended: report.stream_ends,
            reconnects: report.reconnects,
            failed: report.reconnect_failed,
            resets: report.resets,
            reset_gaps: report.reset_gaps,
            unresumed: report.unresumed,
        }),
        rss_empty_kib: empty.rss_kib,
        rss_loaded_kib: after.rss_kib,
        problems,
    })
}

/// One CPU/RSS sample of `what`, with an error naming it.
fn sample(observer: &Observer, what: &str) -> Result<Sample, String> {
    observer
        .sample()
        .map_err(|e| format!("cannot sample {what}: {e}"))
}
