//! The `wsgate` binary under conditions only a real process shows: a low
//! open-file limit, SIGTERM, and its memory after attacks. Each test spawns
//! its own gateway process, reaped when the test ends.

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
    std::thread::sleep(Duration::from_millis(200));

    // Far more connections than descriptors: most wait in the backlog.
    let mut extra: Vec<TcpStream> = (0..60).filter_map(|_| request_upgrade(gw.addr)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut upgraded = 0;
    for s in &mut extra {
        upgraded += usize::from(is_upgraded(s, Duration::from_millis(20)));
    }
    assert!(
        upgraded < 60,
        "the limit did not bite ({upgraded} upgraded)"
    );
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
    for raw in &mut attackers {
        assert!(
            read_close_code(raw).is_some(),
            "every attacker is closed with a code"
        );
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
    write(
        &["/a", "/b"],
        &format!("compact_interval = \"0s\"\n{}", header(1)),
    );
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

    write(
        &["/a", "/c"],
        &format!("compact_interval = \"0s\"\n{}", header(2)),
    );
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
    assert_continuous(&stays.finish(), |_| 0);
    assert_continuous(&moves.finish(), |_| 0);
    let reconnected = origin.events().iter().any(|e| {
        matches!(e, OriginEvent::Connected { uri, headers, .. }
            if uri == "/h" && headers.iter().any(|(n, v)| n == "x-gen" && v == "2"))
    });
    assert!(reconnected, "/h reconnected with its new header");
    drop(added);
    gw.terminate();
    let (code, stderr) = gw.wait();
    assert_eq!(code, Some(0), "{stderr}");
    let where_ = format!("{}:3", file.display());
    assert!(
        stderr.contains("reload failed") && stderr.contains(&where_) && stderr.contains("bogus"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
