//! The relay under test as a child process: the `wsgate` binary, the
//! baseline or coalescing relay (this bench binary re-executed in the
//! `baseline` or `writev` role), or nginx with nchan, optionally pinned to
//! CPUs.
//!
//! [`Relay::start`] spawns it on `127.0.0.1:0` in front of a given origin and
//! waits for the `... clients connect to ws://ADDR/` line on its stdout
//! (`wss://ADDR/` from a wsgate given a certificate and key). The
//! child's further stdout and its stderr are forwarded to our stderr, each
//! line prefixed with `[relay name]`. [`Relay::stop`] asks for a graceful exit
//! (SIGTERM) and kills it if that takes too long.
//!
//! nginx prints no address: it gets a configuration of its own
//! (`nchan.rs`, two free ports) and is ready once both ports take a
//! connection; [`Relay::start_feed`] then starts the bridge (`bridge.rs`)
//! publishing the origin's messages into it. Stopping stops the bridge
//! first, then nginx (SIGTERM: a fast shutdown, which closes its clients'
//! connections without a Close frame or a last event). nginx 1.22 with nchan 1.3.6
//! and `master_process off` aborts on every exit (SIGTERM and SIGQUIT
//! alike: "double free" from nchan's exit handlers, which a single process
//! runs twice); that exit is said on stderr and not counted as a problem.
//!
//! No run leaves a process behind: dropping a [`Relay`] kills (SIGKILL) and
//! reaps the child, so every error path and a panic clean up; and
//! [`kill_relays_on_signal`] makes SIGINT, SIGTERM or SIGHUP to the bench kill
//! the live relay before the bench exits. Every signal goes to a child that
//! has not been reaped yet (its pid cannot have been reused): a pid leaves the
//! [`LIVE`] registry, under its lock, at the moment it is reaped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGABRT, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::bridge::Bridge;
use crate::nchan::{Install, Nginx};
use crate::tls::Certs;
use crate::{baseline, writev};

/// Environment variable naming another wsgate binary to bench (e.g. an
/// older build) instead of the one cargo built.
pub const WSGATE_ENV: &str = "WSGATE_BENCH_WSGATE";
/// Environment variable pinning every relay to these CPUs (`taskset -c`),
/// e.g. `0` with the bench itself run under `taskset -c 1`: a relay on a
/// core of its own, as issue 27's saturated comparison asks.
pub const RELAY_CPU_ENV: &str = "WSGATE_BENCH_RELAY_CPU";

/// Pids of the relays started and not yet reaped.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// What precedes the drop count in wsgate's last log line.
const DROPPED_MARK: &str = "frames dropped ";
/// Time a relay has to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a relay has to exit after SIGTERM before it is killed. wsgate's own
/// drain bound is 5 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One thread, one write per client per message (`baseline.rs`).
    Baseline,
    /// One thread, a bounded queue per client, one `writev` of it
    /// (`writev.rs`).
    Writev,
    /// The real gateway binary with its default settings.
    Wsgate,
    /// The same binary, its clients reading event streams (Server-Sent
    /// Events) instead of WebSocket: the second run of an `sse` scenario.
    WsgateSse,
    /// nginx with the nchan module, its clients WebSocket subscribers
    /// (`nchan.rs`).
    Nchan,
    /// nginx with nchan, its clients EventSource (event-stream) subscribers.
    NchanSse,
}

impl Kind {
    /// wsgate's two client protocols, in the order they run (`sse` scenarios).
    pub const PROTOCOLS: [Kind; 2] = [Kind::Wsgate, Kind::WsgateSse];

    /// Name used in output.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::Writev => "writev",
            Kind::Wsgate => "wsgate",
            Kind::WsgateSse => "wsgate-sse",
            Kind::Nchan => "nchan",
            Kind::NchanSse => "nchan-sse",
        }
    }

    /// The wsgate binary runs (with either client protocol).
    pub fn is_wsgate(self) -> bool {
        matches!(self, Kind::Wsgate | Kind::WsgateSse)
    }

    /// The clients read event streams.
    pub fn is_sse(self) -> bool {
        matches!(self, Kind::WsgateSse | Kind::NchanSse)
    }

    /// nginx with nchan runs (with either client protocol).
    pub fn is_nchan(self) -> bool {
        matches!(self, Kind::Nchan | Kind::NchanSse)
    }

    /// The relay can serve its clients over TLS (in a `tls` scenario).
    pub fn has_tls(self) -> bool {
        self.is_wsgate() || self.is_nchan()
    }

    /// wsgate with the same client protocol: what an nchan run is compared
    /// with.
    pub fn wsgate_twin(self) -> Kind {
        if self.is_sse() {
            Kind::WsgateSse
        } else {
            Kind::Wsgate
        }
    }

    /// The relay's command line; nginx's reads `nginx`'s configuration.
    fn command(self, origin_url: &str, nginx: Option<&Nginx>) -> Result<Command, String> {
        const LISTEN: &str = "127.0.0.1:0";
        match self {
            Kind::Baseline | Kind::Writev => {
                let exe = std::env::current_exe()
                    .map_err(|e| format!("cannot find the bench executable to re-run: {e}"))?;
                let role = match self {
                    Kind::Writev => writev::ROLE,
                    _ => baseline::ROLE,
                };
                let mut cmd = pinned(exe.as_os_str())?;
                cmd.env(baseline::ROLE_ENV, role).args([LISTEN, origin_url]);
                Ok(cmd)
            }
            Kind::Wsgate | Kind::WsgateSse => {
                let mut cmd = pinned(wsgate_path().as_ref())?;
                // The defaults, spelled out so the output says what ran.
                cmd.args(["--listen", LISTEN, "--origin", origin_url])
                    .args(["--writers", "2", "--queue", "16", "--lobby-capacity", "512"])
                    // Info for the final counters; lifecycle lines only.
                    .args(["--log-level", "info"]);
                Ok(cmd)
            }
            Kind::Nchan | Kind::NchanSse => {
                let nginx =
                    nginx.ok_or_else(|| format!("{} needs its configuration", self.name()))?;
                let mut cmd = pinned(nginx.program().as_os_str())?;
                cmd.args(nginx.args());
                Ok(cmd)
            }
        }
    }
}

/// A command running `program`, through `taskset -c CPU` when
/// [`RELAY_CPU_ENV`] names a CPU (`taskset` execs it: the pid is the
/// relay's).
fn pinned(program: &OsStr) -> Result<Command, String> {
    let Ok(cpu) = std::env::var(RELAY_CPU_ENV) else {
        return Ok(Command::new(program));
    };
    if cpu.is_empty() || !cpu.bytes().all(|b| b.is_ascii_digit() || b == b',') {
        return Err(format!(
            "{RELAY_CPU_ENV} must be a CPU number or list, e.g. 0 (got {cpu:?})"
        ));
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu]).arg(program);
    Ok(cmd)
}

/// The wsgate binary to run: [`WSGATE_ENV`] if set, else cargo's build.
pub fn wsgate_path() -> String {
    std::env::var(WSGATE_ENV).unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsgate").to_string())
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, kills every live relay
/// and exits the bench with 128 + the signal number.
pub fn kill_relays_on_signal() -> Result<(), String> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("bench-signals".to_string())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            // Holding the lock until exit keeps the pids from being reaped.
            let live = live();
            for pid in live.iter() {
                let _ = send_signal("-KILL", *pid);
            }
            eprintln!("bench: signal {signal}: killed relay pids {live:?}; exiting");
            std::process::exit(128 + signal);
        })
        .map(drop)
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

fn live() -> MutexGuard<'static, Vec<u32>> {
    // A panic while holding the lock leaves a list that is still valid.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `kill SIGNAL PID`.
fn send_signal(signal: &str, pid: u32) -> Result<(), String> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {signal} {pid} failed with {status}"))
    }
}

/// A running relay process; see the module docs.
pub struct Relay {
    kind: Kind,
    child: Child,
    /// Set once the child has been waited for.
    exited: Option<ExitStatus>,
    url: String,
    forwarders: Vec<JoinHandle<Option<u64>>>,
    /// nchan only: the bridge publishing into it (stopped before nginx).
    bridge: Option<Bridge>,
    /// nchan only: its configuration's directory (removed after it exits:
    /// fields drop after [`Relay`]'s own `drop` has killed it).
    nginx: Option<Nginx>,
}

impl Relay {
    /// Spawns the relay in front of `origin_url` (wsgate with `wsgate_args`
    /// added, and serving `wss://` with `tls`'s leaf when given) and waits
    /// until it listens.
    pub fn start(
        kind: Kind,
        origin_url: &str,
        wsgate_args: &[&str],
        tls: Option<&Certs>,
    ) -> Result<Relay, String> {
        let name = kind.name();
        let nginx = if kind.is_nchan() {
            Some(Nginx::prepare(&Install::find()?, tls)?)
        } else {
            None
        };
        let mut command = kind.command(origin_url, nginx.as_ref())?;
        if kind.is_wsgate() {
            command.args(wsgate_args);
            if let Some(certs) = tls {
                command
                    .arg("--tls-cert")
                    .arg(&certs.cert)
                    .arg("--tls-key")
                    .arg(&certs.key);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", command.get_program()))?;
        live().push(child.id());
        // From here on the guard owns the child: every early return kills it.
        let mut relay = Relay {
            kind,
            child,
            exited: None,
            url: String::new(),
            forwarders: Vec::new(),
            bridge: None,
            nginx,
        };
        let (first_line, rx) = mpsc::channel();
        if let Some(stdout) = relay.child.stdout.take() {
            relay
                .forwarders
                .push(forward(name, stdout, Some(first_line))?);
        }
        if let Some(stderr) = relay.child.stderr.take() {
            relay.forwarders.push(forward(name, stderr, None)?);
        }
        if let Some(nginx) = &relay.nginx {
            let (url, listening) = (nginx.url(), nginx.listening());
            relay.wait_listening(&listening)?;
            relay.url = url;
            return Ok(relay);
        }
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "{name} did not print its address within {}s",
                    START_TIMEOUT.as_secs()
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its stdout closed: it is exiting (its stderr says why).
                let status = relay.wait_exit(Duration::from_secs(2));
                return Err(format!("{name} exited before listening ({status})"));
            }
        };
        relay.url = line
            .split_whitespace()
            .find(|word| word.starts_with("ws://") || word.starts_with("wss://"))
            .ok_or_else(|| format!("{name} printed no ws:// or wss:// address: {line:?}"))?
            .to_string();
        Ok(relay)
    }

    /// Starts the feed of a relay that does not dial the origin itself:
    /// for nchan, the bridge publishing `origin_url`'s messages into it
    /// (`bridge.rs`). The other relays were fed from their start.
    pub fn start_feed(&mut self, origin_url: &str) -> Result<(), String> {
        if let Some(nginx) = &self.nginx {
            self.bridge = Some(Bridge::start(origin_url, &nginx.publish_url())?);
        }
        Ok(())
    }

    /// The URL clients connect to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The child's process id (for `/proc/PID`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; kills the child if it does not
    /// exit within [`STOP_TIMEOUT`]. Fails unless it exited with status 0
    /// (and, for nchan, its bridge ran to the end without an error).
    /// Returns the frames the relay says it dropped over its life (from
    /// wsgate's final `stopped: …, frames dropped N` log line; none from the
    /// baseline, which drops nothing, nor from nchan).
    pub fn stop(mut self) -> Result<Option<u64>, String> {
        let name = self.kind.name();
        let bridged = self.bridge.take().map(Bridge::stop).transpose();
        // Not reaped yet, so the pid is still this child's.
        send_signal("-TERM", self.child.id())
            .map_err(|e| format!("cannot stop {name} (killed instead): {e}"))?;
        let outcome = self.wait_exit(STOP_TIMEOUT);
        bridged?;
        match self.exited {
            Some(status) if status.success() => Ok(self.join_forwarders()),
            Some(status) if self.kind.is_nchan() && status.signal() == Some(SIGABRT) => {
                eprintln!(
                    "    [{name}] aborted on exit, as it always does with master_process off \
                     (nchan frees its memory twice there); the run's figures stand"
                );
                Ok(self.join_forwarders())
            }
            Some(status) => Err(format!(
                "{name} exited with {status} after SIGTERM{}",
                self.nginx
                    .as_ref()
                    .map(|nginx| format!(" (error log: {})", nginx.error_tail()))
                    .unwrap_or_default()
            )),
            // Dropping `self` kills it.
            None => Err(format!(
                "{name} did not exit within {}s of SIGTERM ({outcome}); killed",
                STOP_TIMEOUT.as_secs()
            )),
        }
    }

    /// Waits until a connection to each of `addrs` succeeds (nginx, which
    /// prints no address), or fails if the child exits or
    /// [`START_TIMEOUT`] passes first.
    fn wait_listening(&mut self, addrs: &[SocketAddr]) -> Result<(), String> {
        let name = self.kind.name();
        let deadline = Instant::now() + START_TIMEOUT;
        let why = |relay: &Relay| {
            relay
                .nginx
                .as_ref()
                .map(|nginx| format!("; error log: {}", nginx.error_tail()))
                .unwrap_or_default()
        };
        loop {
            let probe = Duration::from_millis(100);
            if addrs
                .iter()
                .all(|addr| TcpStream::connect_timeout(addr, probe).is_ok())
            {
                return Ok(());
            }
            match self.try_reap() {
                Ok(Some(status)) => {
                    return Err(format!(
                        "{name} exited before listening ({status}{})",
                        why(self)
                    ));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(format!(
                        "{name} did not listen on {addrs:?} within {}s{}",
                        START_TIMEOUT.as_secs(),
                        why(self)
                    ));
                }
                Err(e) => return Err(format!("cannot query {name}'s status: {e}")),
            }
        }
    }

    /// Waits up to `timeout` for the child to exit; describes the outcome.
    fn wait_exit(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_reap() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => return "still running".to_string(),
                Err(e) => return format!("cannot query its status: {e}"),
            }
        }
    }

    /// Reaps the child if it has exited, removing it from [`LIVE`] at once.
    fn try_reap(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let mut live = live();
        let status = self.child.try_wait()?;
        if let Some(status) = status {
            self.exited = Some(status);
            live.retain(|&pid| pid != self.child.id());
        }
        Ok(status)
    }

    /// Joins the output threads; the frames-dropped count if one reported it.
    fn join_forwarders(&mut self) -> Option<u64> {
        // The pipes close when the child exits, so these end promptly (unless
        // the child left a grandchild holding them, which neither relay does).
        let mut dropped = None;
        for handle in self.forwarders.drain(..) {
            if let Ok(Some(count)) = handle.join() {
                dropped = Some(count);
            }
        }
        dropped
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The bridge first, while nginx still reads what it publishes.
        drop(self.bridge.take());
        if self.exited.is_none() {
            let name = self.kind.name();
            let pid = self.child.id();
            let mut live = live();
            if let Err(e) = self.child.kill() {
                eprintln!("bench: cannot kill {name} (pid {pid}): {e}");
            }
            match self.child.wait() {
                Ok(status) => self.exited = Some(status),
                Err(e) => eprintln!("bench: cannot reap {name} (pid {pid}): {e}"),
            }
            live.retain(|&p| p != pid);
        }
        self.join_forwarders();
    }
}

/// Copies `pipe` line by line to our stderr with a `[name]` prefix; the first
/// line goes to `first_line` instead, when given. The thread returns the last
/// `frames dropped N` count it saw.
fn forward(
    name: &'static str,
    pipe: impl Read + Send + 'static,
    mut first_line: Option<mpsc::Sender<String>>,
) -> Result<JoinHandle<Option<u64>>, String> {
    std::thread::Builder::new()
        .name(format!("{name}-output"))
        .spawn(move || {
            let mut dropped = None;
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some((_, count)) = line.rsplit_once(DROPPED_MARK) {
                    dropped = count.trim().parse().ok().or(dropped);
                }
                match first_line.take() {
                    // The receiver may have given up waiting; nothing to do then.
                    Some(tx) => drop(tx.send(line)),
                    None => eprintln!("    [{name}] {line}"),
                }
            }
            dropped
        })
        .map_err(|e| format!("cannot start a thread reading {name}'s output: {e}"))
}
