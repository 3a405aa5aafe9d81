//! Shared helpers for the end-to-end tests: a real in-process origin, a real
//! gateway on port 0, real WebSocket clients, and deadline-bounded waits.
//!
//! Everything runs over loopback sockets; nothing is mocked.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, unbounded};
use tungstenite::{Message, WebSocket, protocol::CloseFrame};
use wsgate::{Config, Gateway, GatewayHandle};

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

/// Counters the test origin keeps.
#[derive(Debug, Default)]
pub struct OriginCounts {
    /// Upgraded connections ever accepted.
    pub accepted: AtomicUsize,
    /// Connections currently open.
    pub open: AtomicUsize,
    /// Connections that ended with a close frame from the gateway.
    pub closed_by_peer: AtomicUsize,
}

struct Conn {
    tx: Sender<Message>,
    alive: Arc<AtomicBool>,
}

/// A WebSocket origin server in this process. Every message sent through it
/// goes to every connection it has, in order.
pub struct TestOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
    pub counts: Arc<OriginCounts>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestOrigin {
    /// Starts an origin on a free loopback port.
    pub fn start() -> TestOrigin {
        TestOrigin::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), Arc::default())
    }

    /// Starts an origin on `addr`, adding to `counts` (to restart one on the same port).
    pub fn start_on(addr: SocketAddr, counts: Arc<OriginCounts>) -> TestOrigin {
        let listener = TcpListener::bind(addr).expect("bind test origin");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let acceptor = {
            let (stop, conns, counts) = (stop.clone(), conns.clone(), counts.clone());
            thread::spawn(move || accept_loop(listener, &stop, &conns, &counts))
        };
        TestOrigin {
            addr,
            stop,
            conns,
            counts,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("ws://{}/feed", self.addr)
    }

    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    /// Connections ever accepted.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Sends `msg` to every open connection; returns how many got it.
    pub fn send(&self, msg: Message) -> usize {
        let conns = self.conns.lock().expect("origin lock");
        conns
            .iter()
            .filter(|c| c.alive.load(Ordering::SeqCst) && c.tx.send(msg.clone()).is_ok())
            .count()
    }

    /// Sends the text `"{n}"` to every connection.
    pub fn send_seq(&self, n: u64) -> usize {
        self.send(Message::text(n.to_string()))
    }

    /// Kills the origin: stops listening and drops every connection without a close.
    pub fn kill(mut self) -> (SocketAddr, Arc<OriginCounts>) {
        self.halt();
        (self.addr, self.counts.clone())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.join().expect("origin acceptor");
        }
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.halt();
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: &Arc<AtomicBool>,
    conns: &Mutex<Vec<Conn>>,
    counts: &Arc<OriginCounts>,
) {
    let mut threads = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (tx, rx) = unbounded();
                let alive = Arc::new(AtomicBool::new(true));
                let (stop, counts, flag) = (stop.clone(), counts.clone(), alive.clone());
                threads.push(thread::spawn(move || {
                    serve(stream, &rx, &stop, &counts, &flag)
                }));
                conns.lock().expect("origin lock").push(Conn { tx, alive });
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

fn serve(
    stream: TcpStream,
    rx: &Receiver<Message>,
    stop: &AtomicBool,
    counts: &OriginCounts,
    alive: &AtomicBool,
) {
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let Ok(mut ws) = tungstenite::accept(stream) else {
        alive.store(false, Ordering::SeqCst);
        return;
    };
    ws.get_ref().set_nonblocking(true).expect("nonblocking");
    counts.accepted.fetch_add(1, Ordering::SeqCst);
    counts.open.fetch_add(1, Ordering::SeqCst);
    'conn: while !stop.load(Ordering::SeqCst) {
        while let Ok(msg) = rx.try_recv() {
            if let Err(e) = ws.send(msg) {
                if !is_would_block(&e) {
                    break 'conn;
                }
            }
        }
        loop {
            match ws.read() {
                Ok(Message::Close(_)) => {
                    counts.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                    let _ = ws.flush();
                    break 'conn;
                }
                Ok(_) => {}
                Err(e) if is_would_block(&e) => break,
                Err(_) => break 'conn,
            }
        }
        let _ = ws.flush();
        if let Ok(msg) = rx.recv_timeout(Duration::from_millis(2)) {
            if let Err(e) = ws.send(msg) {
                if !is_would_block(&e) {
                    break;
                }
            }
        }
    }
    alive.store(false, Ordering::SeqCst);
    counts.open.fetch_sub(1, Ordering::SeqCst);
}

fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
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

/// Waits until the gateway's stats say `n` clients are connected.
#[track_caller]
pub fn wait_clients(gw: &GatewayHandle, n: u64) {
    wait_until(&format!("{n} clients"), || gw.stats().clients == n);
}

/// Connects `n` clients and waits until every one is placed in a lobby and
/// the origin has a connection from each lobby.
pub fn connect_clients(gw: &GatewayHandle, n: usize) -> Vec<Client> {
    // Clients connected just before may not be counted yet: wait for at least.
    let before = gw.stats().clients;
    let clients: Vec<Client> = (0..n).map(|_| ws_client(gw.local_addr())).collect();
    let want = before + n as u64;
    wait_until(&format!("{want} clients"), || gw.stats().clients >= want);
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

fn read_http_head(stream: &mut TcpStream) -> String {
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
    let mask = [0xA1, 0xB2, 0xC3, 0xD4];
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one unmasked server frame: (opcode, payload).
pub fn read_server_frame(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
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
    Ok((head[0] & 0x0F, payload))
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
