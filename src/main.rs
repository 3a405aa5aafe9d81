//! The `wsgate` binary: flags → [`wsgate::Config`] → a running gateway.
//!
//! It sets up logging, feeds the gateway from the demo ticker for `--demo`
//! (the embedding path: a [`wsgate::Publisher`]), runs the gateway until
//! SIGINT or SIGTERM (a second one exits at once), and turns errors into
//! exit codes: 2 with one line on stderr for a usage or configuration
//! error, 1 when the gateway stopped on a fatal failure. The main thread
//! waits for signals itself, and learns from [`wsgate::Builder::on_stop`]
//! that the gateway stopped on its own, so the binary runs no thread of its
//! own beside the gateway's. All gateway behaviour lives in the library.

mod cli;

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use argh::{EarlyExit, FromArgs};
use log::{LevelFilter, error, info, warn};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode};
use wsgate::{Gateway, demo::DemoFeed};

use crate::cli::Cli;

/// Interval between the demo feed's ticks.
const DEMO_TICK: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wsgate: {e}");
            ExitCode::from(2)
        }
    }
}

/// Parses the command line; on `--help` or a usage error, the exit code to return.
fn parse_args() -> Result<Cli, ExitCode> {
    let mut args = Vec::new();
    for arg in std::env::args_os() {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => {
                eprintln!("wsgate: argument {arg:?} is not valid UTF-8");
                return Err(ExitCode::from(2));
            }
        }
    }
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (command, rest) = strs
        .split_first()
        .map_or(("wsgate", &[][..]), |(c, r)| (*c, r));
    Cli::from_args(&[command], rest).map_err(|EarlyExit { output, status }| match status {
        Ok(()) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(()) => {
            let line = output.lines().next().unwrap_or("invalid arguments");
            eprintln!("wsgate: {line} (see --help)");
            ExitCode::from(2)
        }
    })
}

/// Runs the gateway until it stops; true if it stopped cleanly (not on a
/// fatal failure).
fn run(cli: &Cli) -> Result<bool, Box<dyn std::error::Error>> {
    init_logging(cli.log_level);
    let config = cli.config()?;
    let path = config.path.clone();
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut builder = Gateway::builder(config);
    let publisher = cli.demo.then(|| builder.publisher());
    // The gateway's end, whatever caused it, ends the wait for signals.
    let signal_handle = signals.handle();
    builder.on_stop(move || signal_handle.close());
    let gateway = builder.start()?;
    let demo = match publisher {
        Some(publisher) => Some(
            DemoFeed::start(publisher, DEMO_TICK)
                .map_err(|e| format!("cannot start the demo feed: {e}"))?,
        ),
        None => None,
    };
    let url = format!("ws://{}{path}", gateway.local_addr());
    if demo.is_some() {
        println!("wsgate demo: connect WebSocket clients to {url}");
        println!("  e.g. python3 -m websockets {url}   (Ctrl-C stops the gateway)");
    } else {
        println!("wsgate: clients connect to {url}");
    }
    #[cfg(feature = "admin")]
    if let Some(admin) = gateway.admin_addr() {
        println!("  admin: dashboard at http://{admin}/, metrics at http://{admin}/metrics");
    }

    let mut received = signals.forever();
    if let Some(signal) = received.next() {
        info!("signal {signal} received; shutting down (a second one exits at once)");
        gateway.shutdown();
    }
    if let Some(signal) = received.next() {
        warn!("signal {signal} received again; exiting now");
        std::process::exit(128 + signal);
    }
    // The gateway has stopped (`on_stop` ended the wait); drop the demo
    // feed first, so the joins below are immediate.
    drop(demo);
    let stats = gateway.join();
    info!(
        "stopped: clients served {}, origin messages {}, frames delivered {}, frames dropped {}",
        stats.clients_accepted, stats.messages_in, stats.frames_delivered, stats.frames_dropped
    );
    if stats.fatal_errors > 0 {
        error!("stopped after a fatal failure (see above); exiting with status 1");
    }
    Ok(stats.fatal_errors == 0)
}

fn init_logging(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .add_filter_allow_str("wsgate")
        .build();
    // termcolor's Auto colours any stream when TERM allows it, pipes and
    // files included; colour only a terminal.
    let color = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    // Fails only if a logger is already set, which cannot happen here.
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, color);
}
