//! Output formatting: the per-run detail line, the per-scenario ratio line,
//! the lines comparing wsgate's runs across two scenarios (compression,
//! TLS) and the summary table printed at the end. Nothing here measures
//! anything.

use crate::client::ms;
use crate::relay::Kind;
use crate::scenario::{Measurement, Scenario};

/// One relay's outcome in one scenario.
pub struct Row {
    pub scenario: Scenario,
    pub kind: Kind,
    pub result: Result<Measurement, String>,
}

/// The line printed as soon as a run ends.
pub fn detail(kind: Kind, m: &Measurement) -> String {
    let mut s = format!(
        "  {:<8}  connected {}/{}, upstreams {}, window {:.1}s, origin published {} ({:.0}/s)",
        kind.name(),
        m.connected,
        m.requested,
        m.upstreams,
        m.window.as_secs_f64(),
        m.published,
        m.published as f64 / m.window.as_secs_f64().max(1e-9),
    );
    s.push_str(&format!(
        "\n            delivered {} ({:.0}/s{}), {} B on the wire per delivery, relay cpu {:.0}% ({} per delivery), load generator cpu {:.0}%",
        m.delivered,
        m.deliveries_per_sec(),
        m.delivered_share()
            .map(|share| format!(", {:.1}% of published x clients", share * 100.0))
            .unwrap_or_default(),
        opt(m.bytes_per_delivery().map(|b| format!("{b:.0}"))),
        m.cpu_percent(),
        opt(m.cpu_per_delivery_us().map(micros)),
        m.load_cpu_percent(),
    ));
    s.push_str(&format!(
        "\n            latency {}, gaps {}, dups {}, relay rss {} KiB empty -> {} KiB loaded ({} per client)",
        match m.latency {
            Some([p50, p99, max]) => format!("p50 {} p99 {} max {}", ms(p50), ms(p99), ms(max)),
            None => "-".to_string(),
        },
        m.gaps,
        m.dups,
        m.rss_empty_kib,
        m.rss_loaded_kib,
        opt(m.rss_per_client_kib().map(kib)),
    ));
    if let Some([relay, load, floor]) = m.per_message_ms() {
        s.push_str(&format!(
            "\n            cpu per origin message: relay {relay:.2}ms + load generator {load:.2}ms; \
             spread over every core, {floor:.2}ms: the last client's wait cannot be shorter"
        ));
    }
    if let Some(dropped) = m.relay_dropped {
        s.push_str(&format!(
            "\n            whole run: relay dropped {dropped} frames, reading clients missed {} \
             messages between their first and last",
            m.missed
        ));
        if dropped > m.missed {
            s.push_str(
                " (the rest were for clients that never read, or queued before a \
                 client's first frame was written)",
            );
        }
    }
    if let Some(r) = &m.resumes {
        s.push_str(&format!(
            "\n            event streams: {} ended by the relay, {} reconnected ({} attempts \
             failed), {} resets ({} seqs skipped by them), {} could not reconnect",
            r.ended, r.reconnects, r.failed, r.resets, r.reset_gaps, r.unresumed
        ));
    }
    for problem in &m.problems {
        s.push_str(&format!("\n            PROBLEM: {problem}"));
    }
    s
}

/// wsgate with compressing clients against wsgate with plain ones, the same
/// messages in the same run: bytes on the wire and relay CPU per delivery.
pub fn compression(plain: &Measurement, compressed: &Measurement) -> String {
    format!(
        "  compression (wsgate, compressed/json): bytes on the wire per delivery {}, cpu/delivery {}",
        opt(both(compressed.bytes_per_delivery(), plain.bytes_per_delivery()).map(times)),
        opt(both(
            compressed.cpu_per_delivery_us(),
            plain.cpu_per_delivery_us()
        )
        .map(times)),
    )
}

/// What TLS adds to wsgate: its run in the `wss` scenario against its run
/// in the `plain` one of the same load, CPU per delivery as a ratio and
/// RSS per client (growth from no client to the window's end) side by side.
pub fn tls(plain_name: &str, plain: &Measurement, wss_name: &str, wss: &Measurement) -> String {
    let rss = match (wss.rss_per_client_kib(), plain.rss_per_client_kib()) {
        (Some(w), Some(p)) => format!("{} against {} ({:+.2}KiB)", kib(w), kib(p), w - p),
        _ => "-".to_string(),
    };
    format!(
        "  tls (wsgate, {wss_name}/{plain_name}): cpu/delivery {} ({} against {}), rss/client {rss}",
        opt(both(wss.cpu_per_delivery_us(), plain.cpu_per_delivery_us()).map(times)),
        opt(wss.cpu_per_delivery_us().map(micros)),
        opt(plain.cpu_per_delivery_us().map(micros)),
    )
}

/// wsgate / baseline (or, for an `sse` scenario, wsgate-sse / wsgate) for
/// one scenario, if both ran.
pub fn ratio(scenario: &Scenario, baseline: &Measurement, wsgate: &Measurement) -> String {
    let [first, second] = scenario.kinds();
    let mut s = format!(
        "  ratio     {}/{}: deliveries/s {}, cpu/delivery {}",
        second.name(),
        first.name(),
        deliveries_ratio(baseline, wsgate),
        cpu_ratio(baseline, wsgate),
    );
    if scenario.is_idle() {
        s.push_str(&format!(", rss/client {}", rss_ratio(baseline, wsgate)));
    }
    s
}

fn deliveries_ratio(b: &Measurement, w: &Measurement) -> String {
    opt(quotient(w.deliveries_per_sec(), b.deliveries_per_sec()).map(times))
}

fn cpu_ratio(b: &Measurement, w: &Measurement) -> String {
    opt(both(w.cpu_per_delivery_us(), b.cpu_per_delivery_us()).map(times))
}

/// The ratio, and the difference: the baseline's figure can be ~0, which
/// makes the ratio alone meaningless.
fn rss_ratio(b: &Measurement, w: &Measurement) -> String {
    match (w.rss_per_client_kib(), b.rss_per_client_kib()) {
        (Some(wk), Some(bk)) => {
            format!("{} ({:+.2}KiB)", opt(quotient(wk, bk).map(times)), wk - bk)
        }
        _ => "-".to_string(),
    }
}

/// The summary table over every run.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "relay",
        "clients",
        "deliveries/s",
        "cpu/delivery",
        "cpu%",
        "p50",
        "p99",
        "gaps",
        "dups",
        "rss/client",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for (i, row) in rows.iter().enumerate() {
        lines.push(cells(row));
        // After a scenario's second row (wsgate, or wsgate-sse), the ratio
        // to its first (baseline, or wsgate).
        let Some(previous) = i.checked_sub(1).map(|p| &rows[p]) else {
            continue;
        };
        if previous.scenario.name == row.scenario.name
            && [previous.kind, row.kind] == row.scenario.kinds()
        {
            if let (Ok(b), Ok(w)) = (&previous.result, &row.result) {
                lines.push(ratio_cells(&row.scenario, b, w));
            }
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            text.push_str(&format!("{cell:<w$}  ", w = widths[c]));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn cells(row: &Row) -> Vec<String> {
    let mut cells = vec![row.scenario.name.to_string(), row.kind.name().to_string()];
    match &row.result {
        Err(_) => cells.push("FAILED".to_string()),
        Ok(m) => {
            let flag = if m.problems.is_empty() { "" } else { " !" };
            cells.push(format!("{}{flag}", m.connected));
            if row.scenario.is_idle() {
                cells.extend(["-".to_string(), "-".to_string()]);
            } else {
                cells.push(format!("{:.0}", m.deliveries_per_sec()));
                cells.push(opt(m.cpu_per_delivery_us().map(micros)));
            }
            cells.push(format!("{:.0}%", m.cpu_percent()));
            match m.latency {
                Some([p50, p99, _]) => cells.extend([ms(p50), ms(p99)]),
                None => cells.extend(["-".to_string(), "-".to_string()]),
            }
            cells.push(m.gaps.to_string());
            cells.push(m.dups.to_string());
            cells.push(if row.scenario.is_idle() {
                opt(m.rss_per_client_kib().map(kib))
            } else {
                "-".to_string()
            });
        }
    }
    cells
}

fn ratio_cells(scenario: &Scenario, b: &Measurement, w: &Measurement) -> Vec<String> {
    let mut cells = vec![
        scenario.name.to_string(),
        "ratio".to_string(),
        String::new(),
    ];
    if scenario.is_idle() {
        cells.extend(["-".to_string(), "-".to_string()]);
    } else {
        cells.extend([deliveries_ratio(b, w), cpu_ratio(b, w)]);
    }
    // cpu%, p50, p99, gaps, dups: no ratio.
    cells.extend(std::iter::repeat_n(String::new(), 5));
    if scenario.is_idle() {
        cells.push(rss_ratio(b, w));
    }
    cells
}

fn quotient(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn both(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    quotient(a?, b?)
}

fn opt(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".to_string())
}

fn times(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

fn micros(us: f64) -> String {
    format!("{us:.2}us")
}

fn kib(k: f64) -> String {
    format!("{k:.2}KiB")
}
