//! Shared helpers for the end-to-end tests: a real in-process origin, a real
//! gateway on port 0, real WebSocket clients, and deadline-bounded waits.
//!
//! Everything runs over loopback sockets; nothing is mocked.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tungstenite::{Message, WebSocket, protocol::CloseFrame};
use wsgate::{Config, Gateway, GatewayHandle};

mod browser;
#[allow(unused_imports)]
pub use browser::*;
mod origin;
#[allow(unused_imports)]
pub use origin::*;
#[cfg(feature = "cli")]
mod process;
#[cfg(feature = "cli")]
#[allow(unused_imports)]
pub use process::*;
#[cfg(feature = "auth")]
mod tokens;
#[cfg(feature = "auth")]
#[allow(unused_imports)]
pub use tokens::*;
#[cfg(feature = "redis")]
mod redis_server;
#[cfg(feature = "redis")]
#[allow(unused_imports)]
pub use redis_server::*;
mod require;
#[allow(unused_imports)]
pub use require::*;
mod deflate;
#[allow(unused_imports)]
pub use deflate::*;
#[cfg(feature = "sse")]
mod sse;
#[cfg(feature = "sse")]
#[allow(unused_imports)]
pub use sse::*;

/// The generous deadline every wait in the tests uses: the machine is small and noisy.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds, or panics naming `what` after [`DEADLINE`].
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A configuration for tests: port 0, the given origin, short timers.
pub fn test_config(origin: &str) -> Config {
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.origin = origin.to_owned();
    config.origin_backoff_min = Duration::from_millis(50);
    config.origin_backoff_max = Duration::from_millis(500);
    config.drain_timeout = Duration::from_secs(2);
    config.lobby_linger = Duration::from_millis(200);
    config
}

/// Starts a gateway in this process.
pub fn start_gateway(config: Config) -> GatewayHandle {
    Gateway::start(config).expect("gateway starts")
}

pub type Client = WebSocket<TcpStream>;

/// A real WebSocket client connected to the gateway at `addr`.
pub fn ws_client(addr: SocketAddr) -> Client {
    let stream = TcpStream::connect(addr).expect("connect to gateway");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("upgrade");
    ws
}

/// A WebSocket client at `target` (path and query), offering `protocols`.
pub fn client_at(addr: SocketAddr, target: &str, protocols: &[&str]) -> Client {
    let stream = TcpStream::connect(addr).expect("connect to gateway");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let uri: tungstenite::http::Uri = format!("ws://{addr}{target}").parse().expect("a URI");
    let mut request = tungstenite::ClientRequestBuilder::new(uri);
    for p in protocols {
        request = request.with_sub_protocol(*p);
    }
    let (ws, _) = tungstenite::client(request, stream).expect("upgrade");
    ws
}

/// The next data message's text, skipping control frames; panics on timeout or close.
#[track_caller]
pub fn recv_text(ws: &mut Client) -> String {
    loop {
        match ws.read().expect("message before the deadline") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Binary(b) => return String::from_utf8_lossy(&b).into_owned(),
            Message::Close(frame) => panic!("closed by the gateway: {frame:?}"),
            _ => {}
        }
    }
}

/// The next message that is not a `"warm"` one (what tests publish until
/// their lobbies are up).
#[track_caller]
pub fn recv_past_warm(ws: &mut Client) -> String {
    let mut got = recv_text(ws);
    while got == "warm" {
        got = recv_text(ws);
    }
    got
}

/// Each client, past its warm-up messages, receives `"1"` to `"n"` in order.
#[track_caller]
pub fn expect_numbered(clients: &mut [Client], n: u64) {
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(recv_past_warm(client), "1", "client {i}");
        for k in 2..=n {
            assert_eq!(recv_text(client), k.to_string(), "client {i}");
        }
    }
}

/// Reads until the gateway closes the connection; returns its close frame.
#[track_caller]
pub fn recv_close(ws: &mut Client) -> Option<CloseFrame> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame,
            Ok(_) => {}
            Err(e) => panic!("no close frame before the connection ended: {e}"),
        }
    }
}

/// A gateway with a plain WebSocket client holding its one lobby open, so
/// the lobby and its history outlive the clients that come and go (event
/// streams, resume clients).
pub fn gateway_with_a_lobby(
    config: impl FnOnce(&mut Config),
) -> (TestOrigin, GatewayHandle, Follower) {
    let origin = TestOrigin::start();
    let mut c = test_config(&origin.url());
    config(&mut c);
    let gw = start_gateway(c);
    let ws = Follower::spawn(connect_clients(&gw, 1).remove(0));
    wait_until("one origin connection", || origin.open() == 1);
    (origin, gw, ws)
}

/// Waits until the gateway's stats say `n` clients are connected.
#[track_caller]
pub fn wait_clients(gw: &GatewayHandle, n: u64) {
    wait_until(&format!("{n} clients"), || gw.stats().clients == n);
}

/// Waits until at least `n` clients are placed in lobbies and held by them:
/// an upgrade completes just before the manager places its client, and the
/// lobby takes it in a moment later. Once held, a client gets every message
/// the origin sends afterwards.
#[track_caller]
pub fn wait_placed(gw: &GatewayHandle, n: usize) {
    wait_until(&format!("{n} clients placed"), || {
        gw.lobbies(DEADLINE)
            .iter()
            .map(|l| l.clients.min(l.attached))
            .sum::<usize>()
            >= n
    });
}

/// Connects `n` clients and waits until every one is placed in a lobby and
/// the origin has a connection from each lobby.
pub fn connect_clients(gw: &GatewayHandle, n: usize) -> Vec<Client> {
    // Clients connected just before may not be counted yet: wait for at least.
    let before = gw.stats().clients;
    let clients: Vec<Client> = (0..n).map(|_| ws_client(gw.local_addr())).collect();
    let want = before + n as u64;
    wait_until(&format!("{want} clients"), || gw.stats().clients >= want);
    wait_placed(gw, want as usize);
    clients
}

/// A raw TCP connection that completed the upgrade by hand, for sending
/// frames tungstenite would refuse to send.
pub fn raw_client(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .expect("send request");
    let response = read_http_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    stream
}

/// Sends `request` on a new connection and returns the whole response.
pub fn http_exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

pub fn read_http_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A masked client frame.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    wsgate::fuzz::client_frame(first, [0xA1, 0xB2, 0xC3, 0xD4], payload)
}

/// Reads one unmasked server frame: (opcode, payload).
pub fn read_server_frame(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    read_server_frame_whole(stream).map(|(first, payload)| (first & 0x0F, payload))
}

/// Sends an upgrade request for `target` with `extra` header lines (each
/// ending in CRLF); returns the stream and the response head.
pub fn upgrade_with(addr: SocketAddr, target: &str, extra: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the gateway");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the upgrade");
    let head = read_http_head(&mut stream);
    (stream, head)
}

/// The status code of a response head (0 if there is none).
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A raw client upgraded by hand, offering `extensions` in
/// `Sec-WebSocket-Extensions`; with the gateway's 101 response.
pub fn raw_client_offering(addr: SocketAddr, extensions: &str) -> (TcpStream, String) {
    let (stream, response) = upgrade_with(
        addr,
        "/",
        &format!("Sec-WebSocket-Extensions: {extensions}\r\n"),
    );
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    (stream, response)
}

/// Reads one unmasked server frame: (its first byte: FIN, RSV bits and
/// opcode; its payload).
pub fn read_server_frame_whole(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// Reads server frames until a close frame; returns its code.
pub fn read_close_code(stream: &mut TcpStream) -> Option<u16> {
    loop {
        let (opcode, payload) = read_server_frame(stream).ok()?;
        if opcode == 0x8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
    }
}

/// Lobby threads alive in this process (each test binary is its own process).
pub fn lobby_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|name| name.starts_with("wsgate-lobby-"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A thread that reads a client's text messages until stopped.
pub struct Reader {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<Vec<String>>,
}

impl Reader {
    /// Starts reading `client` in its own thread.
    pub fn spawn(mut client: Client) -> Reader {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        client
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let thread = thread::spawn(move || {
            let mut got = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match client.read() {
                    Ok(Message::Text(t)) => got.push(t.as_str().to_owned()),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("reader failed after {} messages: {e}", got.len()),
                }
            }
            got
        });
        Reader { stop, thread }
    }

    /// Stops reading and returns every text message received, in order.
    pub fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("reader thread")
    }
}

/// A thread that makes the origin send numbered text messages `"1"`, `"2"`, …
/// at a steady pace, each followed by `heartbeats(n)` copies of [`HEARTBEAT`].
pub struct Feed {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

/// The identical payload a feed interleaves between numbered messages.
pub const HEARTBEAT: &str = "{\"hb\":1}";

impl Feed {
    /// Sends one numbered message every `every`, from 1, with no heartbeats.
    pub fn start(origin: std::sync::Arc<TestOrigin>, every: Duration) -> Feed {
        Feed::new(origin, every, 1, |_| 0)
    }

    /// Sends one numbered message every `every`, from 1, each followed by
    /// `heartbeats(n)` heartbeats.
    pub fn with_heartbeats(
        origin: std::sync::Arc<TestOrigin>,
        every: Duration,
        heartbeats: fn(u64) -> usize,
    ) -> Feed {
        Feed::new(origin, every, 1, heartbeats)
    }

    /// Sends one numbered message every `every`, from `first`, each followed
    /// by `heartbeats(n)` heartbeats.
    pub fn new(
        origin: std::sync::Arc<TestOrigin>,
        every: Duration,
        first: u64,
        heartbeats: fn(u64) -> usize,
    ) -> Feed {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut n = first - 1;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                origin.send_seq(n);
                for _ in 0..heartbeats(n) {
                    origin.send(Message::text(HEARTBEAT));
                }
                thread::sleep(every);
            }
            n
        });
        Feed { stop, thread }
    }

    /// Stops the feed; returns the last number sent.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("feed thread")
    }
}

/// Checks a client's stream: numbered messages consecutive (no gap, no
/// duplicate), each followed by exactly `heartbeats(n)` heartbeats (except at
/// the ends, where the stream may start or stop mid-pattern). Returns the
/// numbers seen.
#[track_caller]
pub fn assert_continuous(got: &[String], heartbeats: fn(u64) -> usize) -> Vec<u64> {
    let mut numbers = Vec::new();
    let mut beats_after: Vec<usize> = Vec::new();
    for msg in got {
        if msg == HEARTBEAT {
            if let Some(b) = beats_after.last_mut() {
                *b += 1;
            }
        } else {
            numbers.push(
                msg.parse::<u64>()
                    .unwrap_or_else(|_| panic!("unexpected {msg:?}")),
            );
            beats_after.push(0);
        }
    }
    assert!(!numbers.is_empty(), "no numbered message received");
    for w in numbers.windows(2) {
        assert_eq!(w[1], w[0] + 1, "gap or duplicate in {numbers:?}");
    }
    let inner = numbers.len().saturating_sub(1);
    for (n, beats) in numbers.iter().zip(&beats_after).take(inner) {
        assert_eq!(*beats, heartbeats(*n), "heartbeats after {n} in {got:?}");
    }
    numbers
}

/// The upgrade request the raw clients send.
pub const UPGRADE_REQUEST: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A TCP connection to `addr` from the loopback address `source`, with a
/// receive buffer of `rcvbuf` bytes (0: the default), nothing sent yet.
pub fn connect_from(addr: SocketAddr, source: [u8; 4], rcvbuf: usize) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if rcvbuf > 0 {
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    }
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .expect("bind source address");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream
}

/// A raw client upgraded by hand whose socket receives into a 4 KiB buffer:
/// once it stops reading, it stalls within a few frames.
pub fn stalled_client(addr: SocketAddr) -> TcpStream {
    let mut stream = connect_from(addr, [127, 0, 0, 1], 4096);
    stream
        .write_all(UPGRADE_REQUEST.as_bytes())
        .expect("send request");
    let response = read_http_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    stream
}

/// The send and receive queues (bytes) of the TCP socket from `local` to
/// `remote`, as `ss` shows them (Send-Q: written, not yet acknowledged),
/// read from `/proc/net/tcp`; `None` if there is no such socket.
pub fn socket_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let addr = |field: &str| -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(SocketAddr::from((ip.to_le_bytes(), port)))
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if addr(fields.get(1)?)? != local || addr(fields.get(2)?)? != remote {
            return None;
        }
        let (tx, rx) = fields.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// The file `name` in a directory on `PATH`, if there is one.
pub fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// A client whose socket receive buffer is 16 KiB (no autotuning), so what
/// the kernel holds for it is small and known.
pub fn small_buffer_client(addr: SocketAddr) -> Client {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("upgrade");
    ws
}

/// A binary message of `size` bytes that starts with `n` in 8 digits.
pub fn numbered(n: u64, size: usize) -> Message {
    let mut payload = format!("{n:08}").into_bytes();
    payload.resize(size, b'.');
    Message::binary(payload)
}

/// The number a [`numbered`] message carries.
#[track_caller]
pub fn number(message: Message) -> u64 {
    let data = message.into_data();
    std::str::from_utf8(&data[..8.min(data.len())])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("a numbered message")
}

/// Reads `client` until message `last`; the numbers received, in order.
#[track_caller]
pub fn read_until(mut client: Client, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        got.push(number(client.read().expect("read")));
    }
    got
}

// Helpers for tests that must fail only for their own reason (issue 28):
// a reader that ends at a message rather than a moment, the drop check that
// comes before a continuity check, and a log sink that holds a gateway
// thread at a known point.

/// A [`Reader`] that ends at a message, not a moment: it reads a client's
/// text messages in its own thread, noting when each arrived; the test can
/// wait on how many came, and stop it once a given message is in.
pub struct Follower {
    got: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Follower {
    /// Starts reading `client` in its own thread.
    pub fn spawn(mut client: Client) -> Follower {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, flag) = (got.clone(), stop.clone());
        client
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let thread = thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match client.read() {
                    Ok(Message::Text(t)) => sink
                        .lock()
                        .expect("follower lock")
                        .push((Instant::now(), t.as_str().to_owned())),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("follower failed: {e}"),
                }
            }
        });
        Follower {
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Text messages received so far.
    pub fn count(&self) -> usize {
        self.got.lock().expect("follower lock").len()
    }

    /// Waits until `last` has arrived, then stops reading; every text
    /// message received, in order.
    #[track_caller]
    pub fn finish_at(self, last: &str) -> Vec<String> {
        wait_until(&format!("message {last:?} to arrive"), || {
            let got = self.got.lock().expect("follower lock");
            got.iter().rev().any(|(_, text)| text == last)
        });
        self.finish_timed()
            .into_iter()
            .map(|(_, text)| text)
            .collect()
    }

    /// Stops reading now; every text message received, in order, with when
    /// it arrived.
    pub fn finish_timed(mut self) -> Vec<(Instant, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("follower thread");
        }
        std::mem::take(&mut *self.got.lock().expect("follower lock"))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Asserts that no client lost a frame to a full queue (`slow_client`,
/// `writer_behind`). A test checks this before a stream's continuity, so
/// an overloaded box fails as an overload, not as a gap. Frames queued for
/// clients that left (`departed`) are not a loss to anyone reading.
#[track_caller]
pub fn assert_no_queue_drops(stats: &wsgate::StatsSnapshot) {
    use wsgate::DropReason::{SlowClient, WriterBehind};
    assert_eq!(
        (stats.dropped(SlowClient), stats.dropped(WriterBehind)),
        (0, 0),
        "frames dropped from full queues (slow_client, writer_behind): the \
         queue is too shallow for the feed on this box, or a writer stalled: {stats:?}"
    );
}

/// Holds the gateway thread that logs a line containing a given text, until
/// released: a thread stalled at a known point, as one writing to a
/// blocked log pipe is. Only one hold is armed at a time in a process; the
/// first use installs the process's logger, at debug level.
pub struct LogHold(());

struct HoldState {
    needle: Option<String>,
    /// Counts the holds armed: a thread held by one waits only for that one.
    generation: u64,
    held: bool,
    released: bool,
}

static HOLD: std::sync::Mutex<HoldState> = std::sync::Mutex::new(HoldState {
    needle: None,
    generation: 0,
    held: false,
    released: false,
});
static HOLD_CHANGED: std::sync::Condvar = std::sync::Condvar::new();
static HOLD_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn hold_state() -> std::sync::MutexGuard<'static, HoldState> {
    HOLD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct HoldingLogger;

impl log::Log for HoldingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if !HOLD_ARMED.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let line = record.args().to_string();
        let mut state = hold_state();
        let is_it = state.needle.as_deref().is_some_and(|n| line.contains(n));
        if !is_it || state.held {
            return;
        }
        state.held = true;
        let generation = state.generation;
        HOLD_CHANGED.notify_all();
        // Never past the deadline, even if the test forgot to release it.
        let end = Instant::now() + DEADLINE;
        while state.generation == generation && !state.released && Instant::now() < end {
            state = HOLD_CHANGED
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn flush(&self) {}
}

static HOLDING_LOGGER: HoldingLogger = HoldingLogger;

/// Arms a hold: the next gateway thread to log a line containing `needle`
/// stops there until [`LogHold::release`] (or the hold is dropped).
pub fn hold_log_line(needle: &str) -> LogHold {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&HOLDING_LOGGER).expect("no other logger in the tests");
        log::set_max_level(log::LevelFilter::Debug);
    });
    let mut state = hold_state();
    assert!(state.needle.is_none(), "one log hold at a time");
    state.needle = Some(needle.to_owned());
    state.generation += 1;
    state.held = false;
    state.released = false;
    HOLD_ARMED.store(true, std::sync::atomic::Ordering::SeqCst);
    LogHold(())
}

impl LogHold {
    /// Waits until a thread is held.
    #[track_caller]
    pub fn wait_held(&self) {
        wait_until("a thread held at its log line", || hold_state().held);
    }

    /// Lets the held thread (if any) go on; the hold is disarmed.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for LogHold {
    fn drop(&mut self) {
        HOLD_ARMED.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut state = hold_state();
        state.needle = None;
        state.released = true;
        HOLD_CHANGED.notify_all();
    }
}
