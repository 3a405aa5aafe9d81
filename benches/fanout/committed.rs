//! The regression signal: this run's figures beside those committed in the
//! README's Performance table, each change over 10% flagged. What is
//! compared is machine-independent where it can be: wsgate's CPU per
//! delivery as a ratio to the baseline relay's in the same run, and for
//! `idle` wsgate's RSS per client. Nothing here measures; CI times nothing,
//! so this is for whoever changes the hot path.

use crate::relay::Kind;
use crate::table::Row;

/// A change beyond this fraction is flagged.
const FLAG: f64 = 0.10;

/// One scenario's committed figure.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Figure {
    /// wsgate's CPU per delivery over the baseline's.
    CpuRatio(f64),
    /// wsgate's RSS growth per client, KiB.
    RssKib(f64),
}

/// The comparison block printed after the table; empty if the README or its
/// table cannot be read (said on one line).
pub fn against_readme(rows: &[Row]) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let committed = match std::fs::read_to_string(path) {
        Ok(text) => figures(&text),
        Err(e) => return format!("against the README: cannot read {path}: {e}\n"),
    };
    let mut out = String::from(
        "against the README's Performance table (wsgate/baseline CPU per delivery; idle: RSS per client):\n",
    );
    for (name, now) in measured(rows) {
        let Some((_, then)) = committed.iter().find(|(n, _)| *n == name) else {
            out.push_str(&format!(
                "  {name:<10} now {}  (not in the README)\n",
                show(now)
            ));
            continue;
        };
        let change = match (now, *then) {
            (Figure::CpuRatio(a), Figure::CpuRatio(b)) | (Figure::RssKib(a), Figure::RssKib(b))
                if b > 0.0 =>
            {
                a / b - 1.0
            }
            _ => continue,
        };
        let flag = if change.abs() > FLAG {
            "  ! over 10%"
        } else {
            ""
        };
        out.push_str(&format!(
            "  {name:<10} now {}  README {}  {:+.0}%{flag}\n",
            show(now),
            show(*then),
            change * 100.0
        ));
    }
    out
}

fn show(figure: Figure) -> String {
    match figure {
        Figure::CpuRatio(r) => format!("{r:.2}x"),
        Figure::RssKib(k) => format!("{k:.2}KiB"),
    }
}

/// This run's figure per scenario, where both relays ran.
fn measured(rows: &[Row]) -> Vec<(&'static str, Figure)> {
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| r.kind == Kind::Wsgate) {
        let Ok(w) = &row.result else { continue };
        let name = row.scenario.name;
        let figure = if row.scenario.is_idle() {
            w.rss_per_client_kib().map(Figure::RssKib)
        } else {
            let baseline = rows
                .iter()
                .find(|r| r.scenario.name == name && r.kind == Kind::Baseline)
                .and_then(|r| r.result.as_ref().ok());
            baseline
                .and_then(|b| Some(w.cpu_per_delivery_us()? / b.cpu_per_delivery_us()?))
                .filter(|r| r.is_finite())
                .map(Figure::CpuRatio)
        };
        if let Some(figure) = figure {
            out.push((name, figure));
        }
    }
    out
}

/// The committed figures: the wsgate rows of the table under
/// `## Performance`, by the scenario name that starts their group.
fn figures(readme: &str) -> Vec<(String, Figure)> {
    let mut out = Vec::new();
    let mut scenario = String::new();
    let section = readme.split("\n## Performance").nth(1).unwrap_or_default();
    let table = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    for line in table {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", scenario, relay, deliveries, cpu, p50, p99, gaps, ""]
        let (Some(first), Some(relay)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        if !first.is_empty() {
            scenario = first
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        if !relay.starts_with("wsgate") {
            continue;
        }
        let figure = if let Some(rss) = cells.iter().find_map(|c| c.strip_prefix("RSS ")) {
            number(rss).map(Figure::RssKib)
        } else {
            cells
                .get(4)
                .and_then(|cpu| cpu.split_once('('))
                .and_then(|(_, ratio)| number(ratio))
                .map(Figure::CpuRatio)
        };
        if let Some(figure) = figure {
            out.push((scenario.clone(), figure));
        }
    }
    out
}

/// The first decimal number in `text` (bold markers and units around it
/// ignored).
fn number(text: &str) -> Option<f64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
