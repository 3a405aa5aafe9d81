//! Prometheus metrics: a [`prometheus_client`] collector over the gateway's
//! counters.
//!
//! [`GatewayCollector`] reads one [`StatsSnapshot`] per scrape and encodes it
//! through `prometheus_client`; it keeps no counters of its own, so what a
//! scrape shows is exactly what [`GatewayHandle::stats`] shows. It runs on the
//! thread that scrapes: the admin thread for `GET /metrics`, or an embedder's
//! thread when the collector is registered in the embedder's own [`Registry`]
//! (see [`register`]). It reads atomics only: it never waits on a gateway
//! thread and takes no lock a gateway thread holds.
//!
//! Names follow Prometheus conventions: the `wsgate_` prefix (from the
//! registry), `_total` on counters, base units (`_bytes`, `_seconds`). Where a
//! counter is split by a label (a cause, a reason, a status), the split is a
//! table below, so a new reason is one line.
//!
//! [`GatewayHandle::stats`]: crate::GatewayHandle::stats

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use crossbeam_channel::Sender;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    control::inbox::{ManagerMsg, ask_lobbies},
    stats::{AuthResult, Disconnect, DropReason, Stats, StatsSnapshot, TlsFailure},
};

/// The prefix every wsgate metric name carries.
pub const PREFIX: &str = "wsgate";

/// A `prometheus_client` [`Collector`] that encodes a gateway's counters on
/// each scrape. Cheap to clone; get one from
/// [`GatewayHandle::metrics_collector`](crate::GatewayHandle::metrics_collector).
///
/// Its metric names carry no prefix of their own: [`register`] puts them
/// under `wsgate_`.
#[derive(Debug, Clone)]
pub struct GatewayCollector {
    stats: Arc<Stats>,
    /// Asked for the lobby list (the per-route gauges), briefly; `None` in
    /// tests of the counters alone.
    manager: Option<Sender<ManagerMsg>>,
}

/// Longest a scrape waits for the manager's lobby list.
const LOBBY_LIST_WAIT: Duration = Duration::from_millis(250);

impl GatewayCollector {
    pub(crate) fn new(stats: Arc<Stats>, manager: Option<Sender<ManagerMsg>>) -> GatewayCollector {
        GatewayCollector { stats, manager }
    }
}

/// Adds a gateway's metrics to `registry`, under the `wsgate_` prefix (after
/// any prefix the registry already has).
///
/// ```
/// use prometheus_client::{encoding::text::encode, registry::Registry};
/// # use wsgate::{Config, Gateway};
/// # let mut config = Config::default();
/// # config.listen = "127.0.0.1:0".parse().unwrap();
/// # config.origin = "ws://127.0.0.1:9/feed".to_owned();
/// # let gateway = Gateway::start(config)?;
/// let mut registry = Registry::default(); // the embedding program's own
/// wsgate::metrics::register(&mut registry, gateway.metrics_collector());
/// let mut text = String::new();
/// encode(&mut text, &registry).unwrap();
/// assert!(text.contains("wsgate_clients 0"));
/// # Ok::<(), wsgate::Error>(())
/// ```
pub fn register(registry: &mut Registry, collector: GatewayCollector) {
    registry
        .sub_registry_with_prefix(PREFIX)
        .register_collector(Box::new(collector));
}

/// The Prometheus text exposition (format 0.0.4) of the gateway's metrics, as
/// served at `GET /metrics`, and its `Content-Type`.
pub(crate) fn exposition(collector: &GatewayCollector) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    register(&mut registry, collector.clone());
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The `Content-Type` of [`exposition`].
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One value of a labelled metric: the label's value and how to read it.
type Split = (&'static str, fn(&StatsSnapshot) -> u64);

/// Origin connections by state (a gauge).
const ORIGIN_STATES: &[Split] = &[
    ("up", |s| s.origin_connections),
    ("connecting", |s| s.origins_connecting),
    ("backing_off", |s| s.origins_backing_off),
];

/// Origin connect attempts and connections that failed, by cause.
const ORIGIN_FAILURES: &[Split] = &[
    ("connect", |s| s.origin_failed_connect),
    ("timeout", |s| s.origin_failed_timeout),
    ("tls", |s| s.origin_failed_tls),
    ("upgrade", |s| s.origin_failed_upgrade),
    ("lost", |s| s.origin_lost),
    ("silent", |s| s.origin_silent),
    ("oversized", |s| s.origin_oversized),
];

/// Upgrade requests answered with an HTTP error, by status. `other` is every
/// other refusal (400, 404, 405, 426, 431).
const REFUSALS: &[Split] = &[
    ("403", |s| s.refused_origin),
    ("429", |s| s.refused_per_ip),
    ("503", |s| s.refused_full),
    ("other", |s| {
        s.handshakes_rejected
            .saturating_sub(s.refused_origin + s.refused_per_ip + s.refused_full)
    }),
];

/// Client migrations between lobbies, by outcome.
const MIGRATIONS: &[Split] = &[
    ("gap_free", |s| {
        s.migrations.saturating_sub(s.migration_gaps)
    }),
    ("gap", |s| s.migration_gaps),
];

/// Clients resuming after a message ID (SSE `Last-Event-ID`), by outcome.
const RESUMES: &[Split] = &[
    ("from_history", |s| s.resumes),
    ("from_source", |s| s.resumes_from_source),
    ("reset", |s| s.resume_resets),
];

/// Client messages for the origin (with `--client-messages forward`), by outcome.
const FORMS: &[Split] = &[
    ("compressed", |s| s.frames_delivered_compressed),
    ("uncompressed", |s| {
        s.frames_delivered
            .saturating_sub(s.frames_delivered_compressed)
    }),
];

const COMPRESSION: &[Split] = &[
    ("before", |s| s.compress_bytes_in),
    ("after", |s| s.compress_bytes_out),
];

const TLS_HANDSHAKES: &[Split] = &[
    ("ok", |s| s.tls_handshakes_ok),
    ("failed", |s| s.tls_handshakes_failed),
    ("timeout", |s| s.tls_handshakes_timed_out),
];

const TLS_VERSIONS: &[Split] = &[
    ("1.3", |s| s.tls_handshakes_tls13),
    ("1.2", |s| s.tls_handshakes_tls12),
];

const FORWARDS: &[Split] = &[
    ("sent", |s| s.forwarded),
    ("dropped", |s| s.forward_dropped),
];

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = self.stats.snapshot();
        let mut out = Out {
            encoder: &mut encoder,
            s: &s,
        };
        out.gauge("clients", "Clients connected", s.clients)?;
        out.gauge(
            "lobbies",
            "Lobby threads running, lingering ones included",
            s.lobbies,
        )?;
        out.gauges_by(
            "origin_connections",
            "Origin connections by state",
            "state",
            ORIGIN_STATES,
        )?;
        out.counter(
            "clients_accepted",
            "Clients that completed the upgrade",
            s.clients_accepted,
        )?;
        out.counters_by(
            "handshakes_refused",
            "Upgrade requests answered with an HTTP error, by status",
            "status",
            REFUSALS,
        )?;
        out.counter(
            "handshake_timeouts",
            "Connections closed because the upgrade did not complete in time",
            s.handshakes_timed_out,
        )?;
        out.gauge(
            "handshakes_pending",
            "Connections in their HTTP upgrade",
            s.handshakes_pending,
        )?;
        out.counter(
            "handshakes_shed",
            "Pending handshakes closed to make room (pending cap, or out of descriptors)",
            s.handshakes_shed,
        )?;
        out.counters_by(
            "tls_handshakes",
            "Client TLS handshakes by result: ok, failed (garbage, nothing in common, \
             an alert, the client gone), timeout (still under way at the handshake timeout)",
            "result",
            TLS_HANDSHAKES,
        )?;
        out.counters_by(
            "tls_versions",
            "Client TLS handshakes that completed, by the version negotiated",
            "version",
            TLS_VERSIONS,
        )?;
        out.counters_of(
            "tls_handshake_failures",
            "Client TLS handshakes that failed, by reason: bad_message (not TLS, or a \
             malformed or misplaced message), incompatible (no shared version, cipher \
             suite, group or signature scheme), peer_alert (the client ended it with an \
             alert), eof (the client closed), other",
            "reason",
            TlsFailure::ALL.map(|reason| (reason.name(), s.tls_handshake_failed(reason))),
        )?;
        out.counters_of(
            "tls_cipher_suites",
            "Client TLS handshakes that completed, by the cipher suite negotiated",
            "suite",
            s.tls_cipher_suites(),
        )?;
        out.certificates(&self.stats.tls_certificates.read())?;
        out.counter(
            "tls_reload_failures",
            "Certificate and key pairs a reload could not use (the running pair stayed)",
            s.tls_reload_failures,
        )?;
        out.disconnects()?;
        out.counter(
            "origin_connect_attempts",
            "Origin connect attempts, first connects and reconnects",
            s.origin_connect_attempts,
        )?;
        out.counter(
            "origin_connects",
            "Origin connections established",
            s.origin_connected,
        )?;
        out.counters_by(
            "origin_failures",
            "Origin connect attempts and connections that failed, by cause",
            "cause",
            ORIGIN_FAILURES,
        )?;
        out.counter(
            "origin_messages_received",
            "Data messages received from the origin, summed over lobbies",
            s.messages_in,
        )?;
        out.counter(
            "origin_gaps",
            "Messages a lobby's source skipped, never to be delivered: a lobby behind \
             its publisher, a Redis stream trimmed past a lobby's position",
            s.origin_gaps,
        )?;
        out.counter(
            "frames_delivered",
            "Data frames completely written to clients",
            s.frames_delivered,
        )?;
        out.counters_by(
            "frames_delivered_by_form",
            "Data frames completely written to clients, permessage-deflate compressed or not",
            "form",
            FORMS,
        )?;
        out.counter(
            "messages_compressed",
            "Messages compressed by lobbies (once per lobby per message and form, the frame or the resume envelope, shared by its clients)",
            s.messages_compressed,
        )?;
        out.counters_by(
            "compression_payload_bytes",
            "Payload bytes of the messages lobbies compressed, before and after compression",
            "stage",
            COMPRESSION,
        )?;
        out.drops(
            "frames_dropped",
            "Data frames dropped before reaching a client, by reason: slow_client (its \
             socket was full), writer_behind (its queue overflowed before its writer \
             reached it: a burst longer than the queue, or every core busy), departed \
             (queued for a client that left)",
            "reason",
        )?;
        out.counter_in(
            "client_sent",
            "Bytes written to client sockets, control frames included",
            &Unit::Bytes,
            s.bytes_sent,
        )?;
        out.counter(
            "client_writes",
            "Writes to client sockets that wrote something, control frames included; \
             frames_delivered over this is how many frames a write carried",
            s.client_writes,
        )?;
        out.latency()?;
        out.counters_by(
            "migrations",
            "Clients moved between lobbies by compaction, by outcome",
            "outcome",
            MIGRATIONS,
        )?;
        out.counters_by(
            "resumes",
            "Clients resuming after a message ID (SSE Last-Event-ID, or a wsgate.resume.v1 \
             client's last_event_id), by outcome: from_history (they got exactly what \
             followed it), from_source (the same, read again from a Redis stream), reset \
             (neither the lobby's history nor its source held the ID, or it was further \
             back than a stream resume serves: the reset event or message, then the live \
             stream)",
            "outcome",
            RESUMES,
        )?;
        out.counters_by(
            "forwarded_messages",
            "Client messages for the origin, by outcome",
            "outcome",
            FORWARDS,
        )?;
        out.counter(
            "lobbies_started",
            "Lobby threads started",
            s.lobbies_started,
        )?;
        out.counter("lobbies_ended", "Lobby threads ended", s.lobbies_ended)?;
        out.counter(
            "reloads",
            "Configurations applied by a reload (SIGHUP)",
            s.reloads,
        )?;
        out.counter(
            "reload_failures",
            "Reloads refused (the running configuration stayed)",
            s.reload_failures,
        )?;
        out.auth(&self.stats.auth_routes.read())?;
        out.counter(
            "auth_key_failures",
            "JWT key files a reload could not read (the route kept its running keys)",
            s.auth_key_failures,
        )?;
        let (buckets, sum) = s.auth_latency();
        out.histogram(
            "auth_request_duration",
            "Round trips of auth requests to auth services",
            &buckets,
            sum,
        )?;
        out.counter(
            "thread_panics",
            "Gateway threads that panicked, recovered or not",
            s.thread_panics,
        )?;
        out.counter(
            "fatal_errors",
            "Failures that leave the gateway unable to serve; liveness fails above 0",
            s.fatal_errors,
        )?;
        out.gauge(
            "draining",
            "1 once shutdown has begun (readiness fails), else 0",
            u64::from(s.draining),
        )?;
        if let Some(lobbies) = self
            .manager
            .as_ref()
            .and_then(|m| ask_lobbies(m, LOBBY_LIST_WAIT))
        {
            let mut routes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for lobby in lobbies {
                let route = routes.entry(lobby.route).or_default();
                route.0 += lobby.clients as u64;
                route.1 += 1;
            }
            for (name, help, pick) in [
                ("route_clients", "Clients placed in each route's lobbies", 0),
                ("route_lobbies", "Lobbies of each route", 1),
            ] {
                let mut metric =
                    out.encoder
                        .encode_descriptor(name, help, None, MetricType::Gauge)?;
                for (route, counts) in &routes {
                    let value = if pick == 0 { counts.0 } else { counts.1 };
                    metric
                        .encode_family(&[("route", route.as_str())])?
                        .encode_gauge(&value)?;
                }
            }
        }
        let uptime = ConstGauge::new(self.stats.epoch.millis() as f64 / 1000.0);
        let metric = out.encoder.encode_descriptor(
            "uptime",
            "Time since the gateway started",
            Some(&Unit::Seconds),
            uptime.metric_type(),
        )?;
        uptime.encode(metric)
    }
}

/// Encodes metrics from one snapshot.
struct Out<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
    s: &'a StatsSnapshot,
}

impl Out<'_, '_> {
    fn gauge(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        metric.encode_gauge(&value)
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        self.counter_with(name, help, None, value)
    }

    fn counter_in(&mut self, name: &str, help: &str, unit: &Unit, value: u64) -> fmt::Result {
        self.counter_with(name, help, Some(unit), value)
    }

    fn counter_with(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: u64,
    ) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, unit, MetricType::Counter)?;
        metric.encode_counter::<NoLabelSet, _, u64>(&value, None)
    }

    fn gauges_by(&mut self, name: &str, help: &str, label: &str, rows: &[Split]) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (value, read) in rows {
            metric
                .encode_family(&[(label, *value)])?
                .encode_gauge(&read(self.s))?;
        }
        Ok(())
    }

    /// The sampled delivery latency, a histogram in seconds.
    fn latency(&mut self) -> fmt::Result {
        let (buckets, sum) = self.s.delivery_latency();
        self.histogram(
            "delivery_latency",
            "From an origin message's arrival to the write that completes it to a client \
             (one delivery in 16 is timed)",
            &buckets,
            sum,
        )
    }

    /// A histogram in seconds from its (non-cumulative) buckets and sum.
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum: f64,
    ) -> fmt::Result {
        let count = buckets.iter().map(|(_, n)| n).sum();
        let mut metric = self.encoder.encode_descriptor(
            name,
            help,
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }

    /// Client authentications, by route and result (routes that counted
    /// none left out).
    fn auth(&mut self, routes: &[(String, [u64; AuthResult::COUNT])]) -> fmt::Result {
        let mut metric = self.encoder.encode_descriptor(
            "auth",
            "Client authentications at the upgrade, by route and result",
            None,
            MetricType::Counter,
        )?;
        for (route, counts) in routes {
            for result in AuthResult::ALL {
                metric
                    .encode_family(&[("route", route.as_str()), ("result", result.name())])?
                    .encode_counter::<NoLabelSet, _, u64>(&counts[result as usize], None)?;
            }
        }
        Ok(())
    }

    /// Clients gone, by reason and by the close code the gateway sent
    /// (`none` where it sent none).
    fn disconnects(&mut self) -> fmt::Result {
        let mut metric = self.encoder.encode_descriptor(
            "client_disconnects",
            "Clients gone, by reason and the close code the gateway sent",
            None,
            MetricType::Counter,
        )?;
        for reason in Disconnect::ALL {
            let code = reason.close_code().map_or("none".into(), |c| c.to_string());
            metric
                .encode_family(&[("reason", reason.name()), ("code", code.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&self.s.disconnected(reason), None)?;
        }
        Ok(())
    }

    /// When each of the client listener's certificates expires, by name
    /// (none without TLS).
    fn certificates(&mut self, certificates: &[(String, u64)]) -> fmt::Result {
        if certificates.is_empty() {
            return Ok(());
        }
        let mut metric = self.encoder.encode_descriptor(
            "tls_certificate_expiry_timestamp_seconds",
            "When each of the client listener's certificates expires, in seconds since \
             the Unix epoch, by name: default, or the first server name of a certificate \
             served by name",
            None,
            MetricType::Gauge,
        )?;
        for (name, at) in certificates {
            metric
                .encode_family(&[("name", name.as_str())])?
                .encode_gauge(at)?;
        }
        Ok(())
    }

    fn counters_by(&mut self, name: &str, help: &str, label: &str, rows: &[Split]) -> fmt::Result {
        let s = self.s;
        let rows = rows.iter().map(|(value, read)| (*value, read(s)));
        self.counters_of(name, help, label, rows)
    }

    /// Frames dropped, labelled with each [`DropReason`]'s name.
    fn drops(&mut self, name: &str, help: &str, label: &str) -> fmt::Result {
        let s = self.s;
        let rows = DropReason::ALL.map(|reason| (reason.name(), s.dropped(reason)));
        self.counters_of(name, help, label, rows)
    }

    fn counters_of(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        rows: impl IntoIterator<Item = (&'static str, u64)>,
    ) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (value, count) in rows {
            metric
                .encode_family(&[(label, value)])?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_the_stats_with_their_labels() {
        let stats = Arc::new(Stats::default());
        stats.dropped(DropReason::WriterBehind, 7);
        stats.dropped(DropReason::Departed, 1);
        stats
            .origin_lost
            .store(2, std::sync::atomic::Ordering::Relaxed);
        stats
            .bytes_sent
            .store(1234, std::sync::atomic::Ordering::Relaxed);
        stats
            .origin_gaps
            .store(3, std::sync::atomic::Ordering::Relaxed);
        stats
            .client_writes
            .store(5, std::sync::atomic::Ordering::Relaxed);
        let text = exposition(&GatewayCollector::new(stats, None)).unwrap();
        for line in [
            "# TYPE wsgate_frames_dropped_total counter",
            "wsgate_frames_dropped_total{reason=\"slow_client\"} 0",
            "wsgate_frames_dropped_total{reason=\"writer_behind\"} 7",
            "wsgate_frames_dropped_total{reason=\"departed\"} 1",
            "wsgate_origin_failures_total{cause=\"lost\"} 2",
            "wsgate_origin_failures_total{cause=\"tls\"} 0",
            "wsgate_client_sent_bytes_total 1234",
            "wsgate_origin_gaps_total 3",
            "wsgate_client_writes_total 5",
            "wsgate_origin_connections{state=\"backing_off\"} 0",
            "wsgate_clients 0",
            "wsgate_client_disconnects_total{reason=\"rate_limited\",code=\"1008\"} 0",
            "wsgate_client_disconnects_total{reason=\"connection_lost\",code=\"none\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }
}
