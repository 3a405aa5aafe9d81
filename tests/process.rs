//! The `wsgate` binary under conditions only a real process shows: a low
//! open-file limit, SIGTERM, SIGHUP, a fatal failure (its writer's poll
//! failing, through a preloaded library), and its memory after attacks.
//! Each test spawns its own gateway process, reaped when the test ends.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use support::*;

/// A gateway child process, killed and reaped if the test ends early.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    /// Kept open: the gateway may print more than its first line.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Gateway {
    /// Starts `wsgate` through `sh -c` with `prefix` (e.g. a ulimit) and `args`.
    fn spawn(prefix: &str, args: &str) -> Gateway {
        let command = format!(
            "{prefix} exec '{}' --listen 127.0.0.1:0 {args}",
            env!("CARGO_BIN_EXE_wsgate")
        );
        let mut child = Command::new("sh")
            .args(["-c", &command])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsgate");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("wsgate prints its address");
        let addr = address_in(&line, "ws://").unwrap_or_else(|| panic!("no address in {line:?}"));
        Gateway {
            child,
            addr,
            _stdout: stdout,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Its open descriptors numbered below `limit`: those an open-file
    /// limit of `limit` counts (it may have inherited some above, such as
    /// cargo's jobserver pipe).
    fn fds_below(&self, limit: usize) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| {
                d.flatten()
                    .filter(|fd| {
                        fd.file_name()
                            .to_str()
                            .and_then(|n| n.parse::<usize>().ok())
                            .is_some_and(|n| n < limit)
                    })
                    .count()
            })
            .unwrap_or(limit)
    }

    fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends `SIG<name>` to the process (by its PID).
    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name}");
    }

    /// Waits at most `limit` for the process to exit (panics if it runs
    /// on, and the drop kills it); its exit code and stderr.
    fn wait_within(mut self, limit: Duration) -> (Option<i32>, String) {
        let end = Instant::now() + limit;
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < end, "still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wait()
    }

    /// Waits for the process to exit; its exit code and stderr.
    fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().expect("wait");
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        (status.code(), stderr)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects and sends an upgrade request.
fn request_upgrade(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .ok()?;
    Some(s)
}

/// Whether `s` has been answered 101, waiting at most `patience`.
fn is_upgraded(s: &mut TcpStream, patience: Duration) -> bool {
    let mut head = [0u8; 12];
    s.set_read_timeout(Some(patience)).is_ok()
        && s.read_exact(&mut head).is_ok()
        && &head == b"HTTP/1.1 101"
}

/// What became of an upgrade request on `s`, without waiting: answered
/// 101 (`Some(true)`), closed or answered otherwise (`Some(false)`), or
/// nothing yet (`None`). The answer stays unread.
fn answer(s: &TcpStream) -> Option<bool> {
    let mut head = [0u8; 12];
    s.set_nonblocking(true).expect("non-blocking");
    let peeked = s.peek(&mut head);
    s.set_nonblocking(false).expect("blocking");
    match peeked {
        Ok(12) => Some(&head == b"HTTP/1.1 101"),
        Ok(0) => Some(false),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(_) => Some(false),
    }
}

/// Sends an upgrade request; the stream if answered 101 within `patience`.
fn upgrade(addr: SocketAddr, patience: Duration) -> Option<TcpStream> {
    let mut s = request_upgrade(addr)?;
    is_upgraded(&mut s, patience).then_some(s)
}

#[test]
fn out_of_descriptors_it_keeps_serving_and_recovers() {
    let origin = TestOrigin::start();
    let gw = Gateway::spawn(
        "ulimit -n 64 &&",
        &format!("--origin {} --log-level warn", origin.url()),
    );
    let mut clients: Vec<Client> = (0..30).map(|_| ws_client(gw.addr)).collect();
    wait_until("origin connection", || origin.open() == 1);

    // Far more connections than descriptors: each descriptor left serves
    // one (a new client keeps its socket), and the rest wait in the backlog
    // (or, accepted in a burst, are shed to make room): no more, no fewer.
    let free = 64 - gw.fds_below(64);
    let extra: Vec<TcpStream> = (0..60).filter_map(|_| request_upgrade(gw.addr)).collect();
    assert_eq!(extra.len(), 60, "connected");
    let upgraded = || extra.iter().filter(|s| answer(s) == Some(true)).count();
    wait_until(&format!("{free} upgraded, a descriptor each"), || {
        upgraded() >= free
    });
    assert_eq!(upgraded(), free, "upgraded, with {free} descriptors free");
    origin.send_seq(1);
    for c in &mut clients {
        assert_eq!(recv_text(c), "1", "existing clients keep receiving");
    }

    // Free descriptors: new clients get in again.
    drop(extra);
    for mut c in clients.drain(..20) {
        let _ = c.close(None);
    }
    let mut late = None;
    wait_until("a new client accepted again", || {
        late = upgrade(gw.addr, Duration::from_secs(1));
        late.is_some()
    });
    let (code, stderr) = {
        gw.terminate();
        gw.wait()
    };
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("out of file descriptors"), "{stderr}");
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0_within_the_drain_timeout() {
    let origin = TestOrigin::start();
    let gw = Gateway::spawn(
        "",
        &format!(
            // A client placed after the message still gets it, once.
            "--origin {} --drain-timeout 3s --replay 1 --log-level info",
            origin.url()
        ),
    );
    let mut clients: Vec<Client> = (0..5).map(|_| ws_client(gw.addr)).collect();
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    for c in &mut clients {
        assert_eq!(recv_text(c), "1");
    }
    let start = Instant::now();
    gw.terminate();
    for c in &mut clients {
        let close = recv_close(c).expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
        let _ = c.flush(); // the close reply
    }
    let (code, stderr) = gw.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "stopped: clients served 5, origin messages 1, frames delivered 5, frames dropped 0"
        ),
        "no final counters in: {stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    wait_until("the origin connection closed", || origin.open() == 0);
}

#[test]
fn after_attacks_it_still_serves_and_its_memory_returns_near_baseline() {
    let origin = TestOrigin::start();
    let gw = Gateway::spawn(
        "",
        &format!(
            "--origin {} --handshake-timeout 1s --max-client-rate 20 --log-level warn",
            origin.url()
        ),
    );
    let mut good = ws_client(gw.addr);
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(recv_text(&mut good), "1");
    let baseline_fds = gw.open_fds();
    let baseline = gw.rss_kib();

    // Stalled handshakes, floods, oversized messages, garbage.
    let stalled: Vec<TcpStream> = (0..1000)
        .filter_map(|_| {
            let mut s = TcpStream::connect(gw.addr).ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: slow").ok()?;
            Some(s)
        })
        .collect();
    let mut attackers = Vec::new();
    for i in 0..200 {
        let mut raw = raw_client(gw.addr);
        let attack = match i % 3 {
            0 => (0..100)
                .flat_map(|_| masked_frame(0x81, b"flood"))
                .collect(),
            1 => masked_frame(0x82, &vec![7u8; 70_000]),
            _ => vec![0xFF; 64],
        };
        let _ = raw.write_all(&attack);
        attackers.push(raw);
    }
    // Each attack is closed with the code the README promises: a flood
    // past the rate 1008, a message above the size limit 1009, reserved
    // bits and an unknown opcode 1002.
    for (i, raw) in attackers.iter_mut().enumerate() {
        let promised = [1008, 1009, 1002][i % 3];
        assert_eq!(read_close_code(raw), Some(promised), "attacker {i}");
    }
    drop(attackers);
    drop(stalled);
    wait_until("the attackers' sockets released", || {
        gw.open_fds() <= baseline_fds + 2
    });

    origin.send_seq(2);
    assert_eq!(recv_text(&mut good), "2", "the good client is served");
    let after = gw.rss_kib();
    assert!(
        after <= baseline + 4 * 1024,
        "RSS grew from {baseline} KiB to {after} KiB"
    );
    eprintln!("RSS {baseline} KiB before the attacks, {after} KiB after");
}

#[test]
fn out_of_descriptors_a_flood_of_half_requests_does_not_lock_out_another_address() {
    const HALF: usize = 1100;
    let origin = TestOrigin::start();
    let gw = Gateway::spawn(
        "ulimit -n 1024 &&",
        &format!(
            "--origin {} --handshake-timeout 60s --log-level warn",
            origin.url()
        ),
    );
    // One address holds more half-sent requests than the gateway has descriptors.
    let flood: Vec<TcpStream> = (0..HALF)
        .filter_map(|_| {
            let mut s = connect_from(gw.addr, [127, 0, 0, 1], 0);
            s.write_all(b"GET / HTTP/1.1\r\nHost: slow").ok()?;
            Some(s)
        })
        .collect();
    assert_eq!(flood.len(), HALF);
    std::thread::sleep(Duration::from_millis(500));
    // A client from another address gets in and receives, long before the
    // flood's handshakes would time out.
    let start = Instant::now();
    let mut other = connect_from(gw.addr, [127, 0, 0, 2], 0);
    other.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    assert!(read_http_head(&mut other).starts_with("HTTP/1.1 101"));
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    let (opcode, payload) = read_server_frame(&mut other).expect("the first message");
    assert_eq!((opcode, payload.as_slice()), (0x1, &b"1"[..]));
    let took = start.elapsed();
    eprintln!(
        "with {HALF} half-sent requests held, a new client received its first message in {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    drop(flood);
    gw.terminate();
    let (code, stderr) = gw.wait();
    assert_eq!(code, Some(0), "{stderr}");
}

/// A library to preload into the gateway: the `epoll_wait` of its threads
/// whose name starts with `WSGATE_TEST_FAIL_THREAD` fails (EBADF, as for a
/// closed poll descriptor) once the file named by `WSGATE_TEST_FAIL_POLL`
/// exists; everything else is glibc's.
const FAILING_POLL: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <unistd.h>

int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout) {
    static int (*real)(int, struct epoll_event *, int, int);
    if (!real) real = (int (*)(int, struct epoll_event *, int, int))dlsym(RTLD_NEXT, "epoll_wait");
    char name[17] = {0};
    const char *trigger = getenv("WSGATE_TEST_FAIL_POLL");
    const char *thread = getenv("WSGATE_TEST_FAIL_THREAD");
    if (trigger && thread && prctl(PR_GET_NAME, name) == 0
        && strncmp(name, thread, strlen(thread)) == 0 && access(trigger, F_OK) == 0) {
        errno = EBADF;
        return -1;
    }
    return real(epfd, events, maxevents, timeout);
}
"#;

#[test]
fn a_fatal_failure_makes_the_binary_exit_1() {
    // A real fatal cause, from outside: the writer's poll fails, which ends
    // the writer thread outside a shutdown (its clients with it). Its next
    // wake-up (it ticks every 250 ms) polls and fails.
    fails_fatally(
        "wsgate-writer-",
        &[
            "writer 0: poll failed",
            "writer 0 ended; shutting the gateway down",
        ],
        |_| {},
    );
}

#[test]
fn a_failing_acceptor_makes_the_binary_exit_1() {
    // The acceptor's poll fails: no client can be accepted any more, so the
    // gateway stops as on any fatal failure. A connection wakes it to poll.
    fails_fatally("wsgate-acceptor", &["acceptor poll failed"], |addr| {
        drop(std::net::TcpStream::connect(addr))
    });
}

/// Runs the binary with the failing-poll library on the threads named
/// `thread*`, serves a client, sets the failure off (then `kick`s the
/// gateway), and checks it exits 1 with `logged` lines, within its bound.
fn fails_fatally(thread: &str, logged: &[&str], kick: impl Fn(std::net::SocketAddr)) {
    let Some(cc) = require_program("cc", "apt-get install gcc") else {
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fatal-{}-{thread}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, shim, trigger) = (
        dir.join("failing_poll.c"),
        dir.join("failing_poll.so"),
        dir.join("fail"),
    );
    std::fs::write(&source, FAILING_POLL).unwrap();
    let built = Command::new(cc)
        .args(["-shared", "-fPIC", "-o"])
        .args([&shim, &source])
        .arg("-ldl")
        .status()
        .is_ok_and(|s| s.success());
    assert!(built, "cannot build {}", shim.display());

    let origin = TestOrigin::start();
    let gw = Gateway::spawn(
        &format!(
            "export LD_PRELOAD='{}' WSGATE_TEST_FAIL_POLL='{}' WSGATE_TEST_FAIL_THREAD='{thread}' &&",
            shim.display(),
            trigger.display()
        ),
        &format!(
            "--origin {} --writers 1 --drain-timeout 1s --log-level info",
            origin.url()
        ),
    );
    let mut client = ws_client(gw.addr);
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(recv_text(&mut client), "1", "served before the failure");

    std::fs::write(&trigger, b"").unwrap();
    let start = Instant::now();
    kick(gw.addr);
    let (code, stderr) = gw.wait_within(DEADLINE);
    let took = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{stderr}");
    for line in logged.iter().chain(&["exiting with status 1"]) {
        assert!(stderr.contains(line), "{line:?} not logged: {stderr}");
    }
    // A writer's tick, then the shutdown's bound (the drain timeout and a
    // second), with 2 s for this machine.
    let bound = Duration::from_millis(250) + Duration::from_secs(1 + 1) + Duration::from_secs(2);
    assert!(took < bound, "exited after {took:?}");
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let origin = Arc::new(TestOrigin::start());
    let gw = Gateway::spawn(
        "",
        &format!(
            "--origin {} --drain-timeout 60s --log-level info",
            origin.url()
        ),
    );
    // A client that never reads a busy feed keeps the drain going.
    let _stalled = stalled_client(gw.addr);
    wait_until("origin connection", || origin.open() == 1);
    let feed = Feed::start(origin.clone(), Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(500));
    gw.terminate();
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    gw.terminate();
    let (code, stderr) = gw.wait();
    feed.stop();
    assert!(start.elapsed() < Duration::from_secs(10), "{stderr}");
    assert_eq!(code, Some(128 + 15), "{stderr}");
    assert!(stderr.contains("received again; exiting now"), "{stderr}");
}

#[test]
#[cfg(feature = "config-file")]
fn sighup_reloads_the_config_file_and_a_broken_one_changes_nothing() {
    // /a stays as it is, /h gets a new origin header (its lobbies reconnect
    // and its clients move), /b is removed, /c is added.
    let origin = Arc::new(TestOrigin::start());
    let dir = std::env::temp_dir().join(format!("wsgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wsgate.toml");
    let write = |paths: &[&str], extra: &str| {
        let mut text = String::from(extra);
        for path in paths {
            text.push_str(&format!(
                "[[route]]\npath = \"{path}\"\norigin = \"ws://{}{path}\"\n",
                origin.addr()
            ));
        }
        std::fs::write(&file, text).unwrap();
    };
    let header = |generation: u32| {
        format!(
            "[[route]]\npath = \"/h\"\norigin = \"ws://{}/h\"\norigin_headers = [\"X-Gen: {generation}\"]\n",
            origin.addr()
        )
    };
    // The feed sends a frame every 5 ms: a queue of 512 is 2.5 s of it (the
    // default 16, 80 ms, which a writer stalled on this busy box overflows),
    // so a gap below is the move's, not an overload's.
    let settings = "compact_interval = \"0s\"\nqueue_depth = 512\n";
    write(&["/a", "/b"], &format!("{settings}{}", header(1)));
    let gw = Gateway::spawn("", &format!("--config {} --log-level info", file.display()));
    let at = |path: &str| {
        let stream = TcpStream::connect(gw.addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        tungstenite::client(format!("ws://{}{path}", gw.addr), stream)
            .expect("upgrade")
            .0
    };
    let stays = Reader::spawn(at("/a"));
    let moves = Reader::spawn(at("/h"));
    let mut removed = at("/b");
    wait_until("three upstreams", || origin.open() == 3);
    let feed = Feed::start(origin.clone(), Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(300));

    write(&["/a", "/c"], &format!("{settings}{}", header(2)));
    gw.signal("HUP");
    let close = recv_close(&mut removed).expect("a close frame");
    assert_eq!(u16::from(close.code), 1012, "the removed route's client");
    let mut added = {
        let mut tries = 0;
        loop {
            // The reload may still be on its way when the close arrives.
            let stream = TcpStream::connect(gw.addr).unwrap();
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            match tungstenite::client(format!("ws://{}/c", gw.addr), stream) {
                Ok((ws, _)) => break ws,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("/c not served yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("/c never served: {e}"),
            }
        }
    };
    assert!(recv_text(&mut added).parse::<u64>().is_ok());

    std::fs::write(&file, "[[route]]\npath = \"/a\"\nbogus = 1\n").unwrap();
    gw.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(recv_text(&mut added).parse::<u64>().is_ok(), "still served");
    feed.stop();
    std::thread::sleep(Duration::from_millis(200));
    let (stays, moves) = (stays.finish(), moves.finish());
    drop(added);
    gw.terminate();
    let (code, stderr) = gw.wait();
    // Shown if an assertion below fails: the lifecycle of the move.
    eprintln!("the gateway's log:\n{stderr}");
    assert_continuous(&stays, |_| 0);
    assert_continuous(&moves, |_| 0);
    let reconnected = origin.events().iter().any(|e| {
        matches!(e, OriginEvent::Connected { uri, headers, .. }
            if uri == "/h" && headers.iter().any(|(n, v)| n == "x-gen" && v == "2"))
    });
    assert!(reconnected, "/h reconnected with its new header");
    assert_eq!(code, Some(0), "{stderr}");
    let where_ = format!("{}:3", file.display());
    assert!(
        stderr.contains("reload failed") && stderr.contains(&where_) && stderr.contains("bogus"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg(feature = "config-file")]
fn a_reload_keeps_the_running_value_of_a_setting_that_needs_a_restart_and_warns() {
    // Writer threads of the process `pid` (named `wsgate-writer-N`).
    let writer_threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|name| name.starts_with("wsgate-writer-"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let origin = TestOrigin::start();
    let dir = std::env::temp_dir().join(format!("wsgate-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wsgate.toml");
    let write = |writers: usize, max_client_message: usize, paths: &[&str]| {
        let mut text = format!(
            "writers = {writers}\nmax_client_message = {max_client_message}\n\
             drain_timeout = \"2s\"\n"
        );
        for path in paths {
            text.push_str(&format!(
                "[[route]]\npath = \"{path}\"\norigin = \"ws://{}{path}\"\n",
                origin.addr()
            ));
        }
        std::fs::write(&file, text).unwrap();
    };
    write(1, 1000, &["/a"]);
    let file_arg = file.display().to_string();
    let gw = GatewayProcess::spawn(&[
        "--config",
        &file_arg,
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "info",
    ]);
    // A thread takes its name once it runs, which a loaded machine delays.
    wait_until("the writer thread named", || writer_threads(gw.pid()) == 1);

    // Two settings that need a restart change, one that does not stays,
    // and a route is added (which applies).
    write(3, 100_000, &["/a", "/b"]);
    gw.signal("HUP");
    wait_until("the reload applied", || {
        gw.log().contains("configuration reloaded: 2 routes")
    });
    let log = gw.log();
    for name in ["writers", "max_client_message"] {
        let warning =
            format!("[WARN] reload: {name} changes only with a restart; keeping the running value");
        assert!(log.contains(&warning), "no warning for {name}: {log}");
    }
    assert!(!log.contains("reload: drain_timeout"), "{log}");
    // The same file again: the running values did not change, so it warns
    // again (a reload that remembered the values it refused would not).
    gw.signal("HUP");
    wait_until("the second reload applied", || {
        gw.log().matches("configuration reloaded: 2 routes").count() == 2
    });
    let log = gw.log();
    assert_eq!(
        log.matches("reload: writers changes only with a restart")
            .count(),
        2,
        "{log}"
    );

    // The running values: one writer, and a limit of 1000 bytes, for a
    // client of the route the reload added too.
    assert_eq!(writer_threads(gw.pid()), 1, "writer threads");
    let stream = TcpStream::connect(gw.addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let (mut client, _) =
        tungstenite::client(format!("ws://{}/b", gw.addr), stream).expect("/b served");
    client
        .send(tungstenite::Message::binary(vec![7u8; 2000]))
        .unwrap();
    let close = recv_close(&mut client).expect("a close frame");
    assert_eq!(
        u16::from(close.code),
        1009,
        "2000 bytes over the running limit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
