//! The `wsgate` binary: flags → [`wsgate::Config`] → a running gateway.
//!
//! It sets up logging, feeds the gateway from the demo ticker for `--demo`
//! (the embedding path: a [`wsgate::Publisher`]), runs the gateway until
//! SIGINT or SIGTERM (a second one exits at once), reloads the config file
//! on SIGHUP, and turns errors into
//! exit codes: 2 with one line on stderr for a usage or configuration
//! error, 1 when the gateway stopped on a fatal failure. The main thread
//! waits for signals itself, and learns from [`wsgate::Builder::on_stop`]
//! that the gateway stopped on its own, so the binary runs no thread of its
//! own beside the gateway's. All gateway behaviour lives in the library.

mod cli;

use std::{
    io::{IsTerminal, Write},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use argh::{EarlyExit, FromArgs};
use log::{LevelFilter, error, info, warn};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode};
use wsgate::{Config, Error, Gateway, demo::DemoFeed};

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
    let config = load(cli)?;
    if cli.print_config {
        print_config(&config)?;
        return Ok(true);
    }
    init_logging(cli.log_level.unwrap_or(LevelFilter::Info));
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut builder = Gateway::builder(config.clone());
    let publisher = cli.demo.then(|| builder.publisher());
    let routes = config.route_configs();
    // The gateway's end, whatever caused it, ends the wait for signals.
    let signal_handle = signals.handle();
    builder.on_stop(move || signal_handle.close());
    let gateway = builder.start().map_err(|e| with_location(e, cli))?;
    let demo = match publisher {
        Some(publisher) => Some(
            DemoFeed::start(publisher, DEMO_TICK)
                .map_err(|e| format!("cannot start the demo feed: {e}"))?,
        ),
        None => None,
    };
    let scheme = if config.tls_cert.is_some() && config.tls_listen.is_none() {
        "wss"
    } else {
        "ws"
    };
    let url = |path: &str| format!("{scheme}://{}{path}", gateway.local_addr());
    if demo.is_some() {
        let url = url(&config.path);
        say(&format!("wsgate demo: connect WebSocket clients to {url}"));
        say(&format!(
            "  e.g. python3 -m websockets {url}   (Ctrl-C stops the gateway)"
        ));
    } else {
        let (first, more) = routes
            .split_first()
            .map_or((None, &[][..]), |(f, m)| (Some(f), m));
        if let Some(route) = first {
            say(&format!("wsgate: clients connect to {}", url(&route.path)));
        }
        for route in more {
            say(&format!(
                "  and to {} (from {})",
                url(&route.path),
                shown_url(&route.origin)
            ));
        }
    }
    #[cfg(feature = "admin")]
    if let Some(admin) = gateway.admin_addr() {
        say(&format!(
            "  admin: dashboard at http://{admin}/, metrics at http://{admin}/metrics"
        ));
    }

    let mut stopping = false;
    for signal in signals.forever() {
        match signal {
            SIGHUP => {
                info!("SIGHUP received; reloading the configuration");
                match load(cli) {
                    Ok(config) => {
                        let _ = gateway.reload(config);
                    }
                    Err(e) => gateway.reload_handle().reject(&message(&e)),
                }
            }
            _ if stopping => {
                warn!("signal {signal} received again; exiting now");
                std::process::exit(128 + signal);
            }
            _ => {
                info!("signal {signal} received; shutting down (a second one exits at once)");
                stopping = true;
                gateway.shutdown();
            }
        }
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

/// Prints a line for the operator. Whoever reads our standard output may
/// have gone (a closed pipe): the gateway runs on regardless.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// What stands for a credential in what the binary prints.
const REDACTED: &str = "REDACTED";

/// An origin URL as the binary prints it: the password in its user
/// information (`redis://user:PASSWORD@host/channel`) replaced by
/// [`REDACTED`]; the rest as it is.
fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:{REDACTED}@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

/// The settings: the defaults, then the config file, then the flags; not
/// yet validated. A file error names the file, its line and the key.
fn load(cli: &Cli) -> Result<Config, Error> {
    let file = match &cli.config {
        Some(path) => read_config_file(path)?,
        None => Config::default(),
    };
    cli.apply(file)
}

/// A config file's settings.
#[cfg(feature = "config-file")]
fn read_config_file(path: &Path) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    Config::from_toml(&text).map_err(|e| {
        let msg = message(&e);
        // "line N: key: why" reads "FILE:N: key: why".
        let located = msg
            .strip_prefix("line ")
            .and_then(|m| m.split_once(": "))
            .map(|(line, rest)| format!("{}:{line}: {rest}", path.display()));
        Error::Config(located.unwrap_or_else(|| format!("{}: {msg}", path.display())))
    })
}

#[cfg(not(feature = "config-file"))]
fn read_config_file(path: &Path) -> Result<Config, Error> {
    Err(Error::Config(format!(
        "{}: this build reads no config files (feature `config-file`); use flags",
        path.display()
    )))
}

/// Prints the settings as a config file, without their credentials:
/// origin header values and the passwords in origin URLs are printed as
/// [`REDACTED`] (a header's name stays, so the reader sees it is set).
#[cfg(feature = "config-file")]
fn print_config(config: &Config) -> Result<(), Error> {
    let mut shown = config.clone();
    let hide = |headers: &mut Vec<(String, String)>| {
        for (_, value) in headers {
            *value = REDACTED.to_owned();
        }
    };
    shown.origin = shown_url(&shown.origin);
    hide(&mut shown.origin_headers);
    for route in &mut shown.routes {
        route.origin = shown_url(&route.origin);
        if let Some(headers) = &mut route.origin_headers {
            hide(headers);
        }
    }
    if shown != *config {
        println!(
            "# Credentials are printed as {REDACTED}: origin header values, passwords in origin URLs."
        );
    }
    print!("{}", shown.to_toml());
    Ok(())
}

#[cfg(not(feature = "config-file"))]
fn print_config(_: &Config) -> Result<(), Error> {
    Err(Error::Config(
        "--print-config needs a build with config files (feature `config-file`)".into(),
    ))
}

/// An error's message without its kind's prefix.
fn message(e: &Error) -> String {
    match e {
        Error::Config(msg) => msg.clone(),
        e => e.to_string(),
    }
}

/// A validation error about a setting the config file holds, with the file
/// and the line where it is set (`route PATH:` errors: within that route).
fn with_location(e: Error, cli: &Cli) -> Error {
    let (Error::Config(msg), Some(path)) = (&e, &cli.config) else {
        return e;
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return e;
    };
    let (route, rest) = match msg.strip_prefix("route ").and_then(|m| m.split_once(": ")) {
        Some((route, rest)) => (Some(route), rest),
        None => (None, msg.as_str()),
    };
    let key: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    // A route's key is looked for after its `path = "..."` line.
    let from = route
        .and_then(|r| {
            lines
                .iter()
                .position(|l| l.replace(' ', "") == format!("path=\"{r}\""))
        })
        .unwrap_or(0);
    let found = lines.iter().enumerate().skip(from).find(|(_, l)| {
        l.split_once('=')
            .is_some_and(|(k, _)| !key.is_empty() && k.trim() == key)
    });
    match found {
        Some((n, _)) => Error::Config(format!("{}:{}: {msg}", path.display(), n + 1)),
        None => Error::Config(format!("{}: {msg}", path.display())),
    }
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

#[cfg(test)]
mod tests {
    use super::shown_url;

    #[test]
    fn a_printed_url_hides_its_password_only() {
        for (url, shown) in [
            (
                "redis://:pw@127.0.0.1:6379/ch",
                "redis://:REDACTED@127.0.0.1:6379/ch",
            ),
            (
                "rediss+stream://user:p%40ss@h/2/key?field=d",
                "rediss+stream://user:REDACTED@h/2/key?field=d",
            ),
            ("redis://a:b@c@h/ch", "redis://a:REDACTED@h/ch"),
            ("redis://user@h/ch", "redis://user@h/ch"),
            ("ws://h:9000/feed?x=a@b", "ws://h:9000/feed?x=a@b"),
            ("", ""),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
    }
}
