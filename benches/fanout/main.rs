//! `cargo bench`: the end-to-end fan-out benchmark of wsgate against a naive
//! baseline relay, over loopback.
//!
//! For each scenario the same load runs against two relays, one after the
//! other, each a separate process measured through `/proc/PID`:
//! - **baseline** (`baseline.rs`): one thread, one origin connection, each
//!   message's frame encoded once, then one blocking `write_all` per client;
//! - **wsgate**: the real binary with its defaults (`--writers 2 --queue 16
//!   --lobby-capacity 512`, so 1000 clients use 2 lobbies, hence 2 origin
//!   connections where the baseline has 1).
//!
//! The origin and the clients are threads of this process, from the load tool
//! (`examples/load/origin.rs`, `client.rs`; relay CPU and RSS via `gwstat.rs`).
//! They share the machine's cores with the relay, so the absolute figures
//! depend on the machine and on the load generator's own cost: read the
//! wsgate/baseline ratios, not the absolute numbers.
//!
//! Scenarios (`scenario.rs`): `saturated` (1000 clients × 10 000 msg/s ×
//! 128 B: 10M deliveries/s offered, far more than the machine can write),
//! `steady` (1000 × 200 msg/s × 128 B), `batched` (the same, wsgate with
//! `--write-batch-ms 10`), `light` (1000 × 50 msg/s: latency below
//! saturation), `slow` (steady, with 100 clients that never read: with
//! wsgate's unsent bound their queues overflow within seconds), `large`
//! (200 × 50 msg/s × 64 KiB), `wide` (16 000 × 5 msg/s × 128 B: the cost
//! of width, what grows with sockets rather than messages), `idle` (10 000
//! idle clients; relay RSS per
//! client), `json` (1000 × 200 msg/s × a 1 KiB JSON price tick) and
//! `compressed` (the same, the clients offering permessage-deflate; after
//! both, wsgate's bytes on the wire and CPU per delivery in the two are
//! compared). Two scenarios compare wsgate with itself rather than with the
//! baseline, which cannot serve Server-Sent Events: `sse-steady` (steady's
//! load) and `sse-saturated` (saturated's) run wsgate once to WebSocket
//! clients (`wsgate`) and once to event-stream clients (`wsgate-sse`: a
//! `GET` with `Accept: text/event-stream` on the same route; the origin's
//! binary messages reach them as `event: binary` in base64, which the
//! clients decode as far as seq and timestamp), and their ratio line is
//! wsgate-sse/wsgate. wsgate closes an event stream that cannot keep up
//! rather than thin it; the event-stream clients then reconnect after
//! 100 ms with `Last-Event-ID` and resume from the lobby's history, as a
//! browser would, so `sse-saturated` measures CPU per delivery with streams
//! closed and resumed. Their detail lines say how many streams were ended,
//! reconnected and reset (with the seqs the resets skipped, which are not
//! gaps); a stream that could not reconnect is a problem.
//!
//! More run only when named (`scenario::ON_REQUEST`): `saturated-writev`,
//! `wide-writev` and `idle-writev` compare wsgate with a coalescing relay
//! (`writev.rs`: one thread, a queue of 16 frames per client dropping the
//! oldest, one `writev` of it) instead of the baseline, the comparison issue
//! 27 asks for at saturation (with `WSGATE_BENCH_RELAY_CPU`, below, on a
//! core of its own); `wss-steady` and
//! `wss-large`, `steady`'s and `large`'s loads with wsgate serving its
//! clients `wss://` (TLS 1.3 on the binary's own provider, a throwaway CA
//! and leaf made at start, `tls.rs`), each client through its own rustls
//! session on aws-lc-rs without resumption. The baseline has no TLS, so
//! their ratio is wsgate over TLS against a plain relay; run beside
//! `steady` and `large`, a `tls` line before the table gives what TLS adds
//! to wsgate: CPU per delivery as a ratio, and RSS per client (growth from
//! no client to the window's end, queues included) in both runs. The
//! clients' TLS costs the load generator too, on the same cores.
//!
//! And the comparisons with nginx and its nchan module that two issues ask
//! for (`nchan.rs`: `nginx -c` with a configuration the bench writes, one
//! process, `master_process off`, one channel; `bridge.rs`: a thread of
//! this process that reads the origin as a gateway would and publishes
//! each message into nchan over one WebSocket publisher connection, from
//! when the clients are connected: a saturated nginx accepts too slowly
//! for them to connect in time otherwise). Their
//! origin sends text (seq and timestamp in base64, then dots, to the same
//! size), to both relays, since nchan's EventSource passes a message on as
//! its data as it is; their ratio lines read wsgate/nchan.
//! `sse-steady-nchan` and `sse-saturated-nchan` run `steady`'s and
//! `saturated`'s loads to event-stream clients of each (`nchan-sse`, then
//! `wsgate-sse`; nchan's event IDs are not wsgate's, so its streams
//! reconnect at the newest message, what they missed showing as gaps);
//! `wss-saturated-nchan`, `wss-large-nchan` and `wss-idle-nchan` run
//! `saturated`'s, `large`'s and `idle`'s to `wss://` WebSocket clients of
//! each (`nchan`, then `wsgate`: nginx serves TLS 1.3 with the same
//! certificate; for `idle`, RSS per TLS client). Only nginx's pid is
//! measured as the relay; the bridge's CPU is the load generator's. nchan
//! neither drops nor disconnects when it cannot keep up (gaps stay 0): it
//! reads the publisher link only as fast as it writes each message to
//! every subscriber, so the backlog waits upstream and latency grows for
//! as long as it is behind (`nchan.rs`). When
//! nginx or the module is missing they print one `skipped` line saying
//! what to install (`apt-get install nginx-light libnginx-mod-nchan`) and
//! the rest runs.
//!
//! Per run: deliveries/s (messages received by clients in the window /
//! window), relay CPU per delivery (relay utime + stime over the window /
//! deliveries; `/proc` counts in 10 ms ticks), relay CPU % of one core (above
//! 100% for a multi-threaded relay), latency p50/p99 (origin timestamp to
//! client receipt), gaps and duplicates per client, and for `idle` the RSS
//! growth per client from no client to all connected. The detail lines add
//! what the origin published, the share of it delivered, the number of origin
//! connections, and this process's own CPU (the load generator's).
//!
//! Running:
//! - `cargo bench` runs every scenario but those on request (about 90 s on
//!   2 cores; `cargo bench --bench fanout` skips the empty unit-test
//!   harnesses of the other targets);
//! - `cargo bench -- saturated` (or `-- steady,large`, or
//!   `-- sse-steady,sse-saturated`) runs only those; this is also how the
//!   scenarios on request run (`-- steady,wss-steady,large,wss-large`, or
//!   `-- sse-steady-nchan,sse-saturated-nchan,wss-saturated-nchan,wss-large-nchan,wss-idle-nchan`);
//! - `WSGATE_BENCH_SECS` (default 8) sets the measurement window and
//!   `WSGATE_BENCH_WARMUP` (default 2) the warm-up, both in seconds
//!   (fractions allowed);
//! - `WSGATE_BENCH_RELAY_CPU=0` starts every relay under `taskset -c 0`; run
//!   the bench itself under `taskset -c 1` and the relay has a core to
//!   itself, the load generator the other;
//! - `WSGATE_BENCH_WSGATE=/path/to/wsgate` benches that binary (e.g. an older
//!   build) instead of the one cargo just built; the `wss-` scenarios need
//!   one with `--tls-cert` and `--tls-key` (feature `tls`), whichever
//!   provider it was built on;
//! - `WSGATE_BENCH_NGINX=/path/to/nginx` runs that nginx in the `-nchan`
//!   scenarios instead of the first on `$PATH` or in `/usr/sbin` (the
//!   module is looked for where Debian's `libnginx-mod-nchan` puts it).
//!
//! Results go to stdout (a detail block per run, the table at the end, then
//! each scenario's figure beside the README's committed one, a change over
//! 10% flagged: `committed.rs`);
//! progress and the relays' own output go to stderr. A run that fails, or
//! that has a problem (clients that did not connect, client errors, an
//! unclean relay exit), is reported and the bench continues; the exit code
//! is then 1. This binary also hosts the baseline and coalescing relays:
//! re-executed with `WSGATE_BENCH_ROLE=baseline` (or `writev`), `main` runs
//! that instead.

// The load tool's modules, shared verbatim. This bench uses only part of
// their API, and cargo builds benches with `cfg(test)` (but, with
// `harness = false`, runs no tests), so their unit tests' imports go unused.
#[allow(dead_code, unused_imports)]
#[path = "../../examples/load/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "../../examples/load/gwstat.rs"]
mod gwstat;
#[allow(dead_code, unused_imports)]
#[path = "../../examples/load/origin.rs"]
mod origin;

mod baseline;
mod bridge;
mod committed;
mod nchan;
mod relay;
mod scenario;
mod table;
mod tls;
mod writev;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use relay::Kind;
use scenario::{Scenario, Settings};
use table::Row;
use tls::Certs;

/// Environment variable for the measurement window, seconds.
const SECS_ENV: &str = "WSGATE_BENCH_SECS";
/// Environment variable for the warm-up, seconds.
const WARMUP_ENV: &str = "WSGATE_BENCH_WARMUP";

fn main() -> ExitCode {
    let role = std::env::var_os(baseline::ROLE_ENV);
    let args = match utf8_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    match role {
        Some(role) if role == baseline::ROLE => return baseline::main(&args),
        Some(role) if role == writev::ROLE => return writev::main(&args),
        Some(role) => {
            eprintln!("bench: unknown {}={role:?}", baseline::ROLE_ENV);
            return ExitCode::from(2);
        }
        None => {}
    }
    let setup = selected_scenarios(&args).and_then(|scenarios| Ok((scenarios, settings()?)));
    let (scenarios, settings) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let certs = match scenarios.iter().any(|s| s.tls).then(Certs::generate) {
        None => None,
        Some(Ok(certs)) => Some(certs),
        Some(Err(e)) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = relay::kill_relays_on_signal() {
        eprintln!("bench: {e}");
        return ExitCode::from(2);
    }
    if bench(&scenarios, &settings, certs.as_ref()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs the scenarios (a `tls` one with `certs`) and prints everything.
/// Returns whether every run succeeded without a problem.
fn bench(scenarios: &[Scenario], settings: &Settings, certs: Option<&Certs>) -> bool {
    let started = Instant::now();
    println!("machine: {}", machine());
    println!(
        "window {:.1}s after {:.1}s warm-up ({SECS_ENV}, {WARMUP_ENV}); wsgate: {}",
        settings.window.as_secs_f64(),
        settings.warmup.as_secs_f64(),
        relay::wsgate_path()
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut all_ok = true;
    for scenario in scenarios {
        println!();
        let missing = (scenario.against.is_nchan())
            .then(nchan::Install::find)
            .and_then(Result::err);
        if let Some(missing) = missing {
            println!("== {}: skipped: {missing}", scenario.name);
            continue;
        }
        println!("== {}: {}", scenario.name, scenario.describe());
        for kind in scenario.kinds() {
            eprintln!("  {}: starting", kind.name());
            let result = scenario::run(scenario, kind, settings, certs);
            match &result {
                Ok(m) => {
                    println!("{}", table::detail(kind, m));
                    all_ok &= m.problems.is_empty();
                }
                Err(e) => {
                    println!("  {:<8}  FAILED: {e}", kind.name());
                    all_ok = false;
                }
            }
            rows.push(Row {
                scenario: *scenario,
                kind,
                result,
            });
        }
        if let [.., b, w] = rows.as_slice() {
            if let (Ok(b), Ok(w)) = (&b.result, &w.result) {
                println!("{}", table::ratio(scenario, b, w));
            }
        }
    }
    let wsgate_in = |name: &str| {
        rows.iter()
            .find(|r| r.scenario.name == name && r.kind == Kind::Wsgate)
            .and_then(|r| r.result.as_ref().ok())
    };
    if let (Some(plain), Some(compressed)) = (wsgate_in("json"), wsgate_in("compressed")) {
        println!();
        println!("{}", table::compression(plain, compressed));
    }
    let tls_lines: Vec<String> = scenario::TLS_TWINS
        .iter()
        .filter_map(|&(plain, wss)| {
            Some(table::tls(plain, wsgate_in(plain)?, wss, wsgate_in(wss)?))
        })
        .collect();
    if !tls_lines.is_empty() {
        println!();
        println!("{}", tls_lines.join("\n"));
    }
    println!();
    print!("{}", table::table(&rows));
    print!("{}", committed::against_readme(&rows));
    println!("notes: figures are relative (origin, clients and relay share the machine);");
    println!("  `!` = see PROBLEM above; rss/client is the relay's VmRSS growth per client,");
    println!("  without kernel socket memory: a relay keeping only a socket per client shows ~0.");
    println!("total {:.0}s", started.elapsed().as_secs_f64());
    all_ok
}

/// Command-line arguments after the program name, as UTF-8.
fn utf8_args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not valid UTF-8"))
        })
        .collect()
}

/// The scenarios named by the first non-flag argument (comma-separated,
/// from [`scenario::ALL`] and [`scenario::ON_REQUEST`]), or all of
/// [`scenario::ALL`]. Flags such as cargo's `--bench` are ignored.
fn selected_scenarios(args: &[String]) -> Result<Vec<Scenario>, String> {
    let Some(filter) = args.iter().find(|a| !a.starts_with('-')) else {
        return Ok(scenario::ALL.to_vec());
    };
    let known = || scenario::ALL.iter().chain(&scenario::ON_REQUEST);
    let names: Vec<&str> = known().map(|s| s.name).collect();
    filter
        .split(',')
        .filter(|name| !name.is_empty())
        .map(|name| {
            known()
                .find(|s| s.name == name)
                .copied()
                .ok_or_else(|| format!("unknown scenario {name:?}; known: {}", names.join(", ")))
        })
        .collect()
}

fn settings() -> Result<Settings, String> {
    Ok(Settings {
        window: seconds_from_env(SECS_ENV, 8.0)?,
        warmup: seconds_from_env(WARMUP_ENV, 2.0)?,
    })
}

fn seconds_from_env(var: &str, default: f64) -> Result<Duration, String> {
    let Ok(value) = std::env::var(var) else {
        return Ok(Duration::from_secs_f64(default));
    };
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{var} must be a number of seconds in 0..=3600 (got {value:?})"))
}

/// CPU count and model, e.g. `2 CPUs (nproc), AMD EPYC`.
fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|e| format!("? ({e})"));
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown model".to_string());
    format!("{cpus} CPUs (nproc), {model}")
}
