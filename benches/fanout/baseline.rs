//! The baseline relay: the simplest fan-out one could write, against which the
//! bench compares wsgate. It runs as its own process (the bench binary
//! re-executed with `WSGATE_BENCH_ROLE=baseline`, see `main.rs`) so that its
//! CPU time and RSS are measured exactly like the gateway's.
//!
//! Design, on purpose naive but not wasteful:
//! - **one thread** does everything;
//! - **one upstream** WebSocket connection to the origin (tungstenite client,
//!   blocking with a short read timeout so new clients are accepted even when
//!   the origin is quiet); while the relay is busy writing to clients it does
//!   not read, so the origin link becomes the queue;
//! - a **non-blocking listener**; new clients are accepted between messages
//!   and upgraded with a hand-written, blocking HTTP exchange
//!   (`tungstenite::handshake::derive_accept_key`);
//! - for each origin message the unmasked server frame is **encoded once**
//!   into a reused `Vec`, then each client gets **one blocking `write_all`**
//!   of it (client sockets blocking, `TCP_NODELAY`). A client whose write
//!   fails or times out is dropped. Clients are never read from.
//!
//! Its listener, origin link and upgrade are also the coalescing relay's
//! (`writev.rs`).
//!
//! Usage (by the bench only): `WSGATE_BENCH_ROLE=baseline BENCH_EXE
//! LISTEN_ADDR ORIGIN_URL`. Once listening it prints
//! `baseline: clients connect to ws://ADDR/` on stdout. SIGTERM or SIGINT
//! make it send Close 1001 to every client, close the origin link and exit 0;
//! so does the origin closing the feed. Setup errors exit with code 2.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::{Bytes, Message, WebSocket};

/// Environment variable that selects a role for the re-executed bench binary.
pub const ROLE_ENV: &str = "WSGATE_BENCH_ROLE";
/// The value of [`ROLE_ENV`] that runs this relay.
pub const ROLE: &str = "baseline";

/// How long the upstream read waits before the loop checks for new clients
/// and for a stop request.
const UPSTREAM_POLL: Duration = Duration::from_millis(10);
/// Time a new client has to send its upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that does not take a frame within this time is dropped, so the
/// relay can never hang forever on one socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest upgrade request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Listen backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Entry point of the baseline role; `args` are the arguments after the
/// program name.
pub fn main(args: &[String]) -> ExitCode {
    exit(ROLE, run(args))
}

/// A relay role's exit: 0, or 2 with its error on stderr.
pub fn exit(role: &str, result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{role}: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// A relay role's command line, `LISTEN_ADDR ORIGIN_URL`, and the flag
/// SIGTERM and SIGINT set.
pub fn setup<'a>(
    role: &str,
    args: &'a [String],
) -> Result<(SocketAddr, &'a str, Arc<AtomicBool>), String> {
    let [listen, origin_url] = args else {
        return Err(format!(
            "usage: {ROLE_ENV}={role} BENCH_EXE LISTEN_ADDR ORIGIN_URL (got {args:?})"
        ));
    };
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("bad listen address {listen:?}: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| format!("cannot install handler for signal {signal}: {e}"))?;
    }
    Ok((listen, origin_url, stop))
}

fn run(args: &[String]) -> Result<(), String> {
    let (listen, origin_url, stop) = setup(ROLE, args)?;
    let listener = listen_on(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listener's address: {e}"))?;
    let upstream = connect_origin(origin_url)?;

    let mut stdout = io::stdout();
    writeln!(stdout, "baseline: clients connect to ws://{local}/")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write the address to stdout: {e}"))?;

    let mut relay = Relay {
        listener,
        upstream,
        clients: Vec::new(),
        frame: Vec::new(),
        dropped: 0,
        first_drop: None,
        refused: 0,
        first_refusal: None,
    };
    let result = relay.serve(&stop);
    relay.close_all();
    result
}

struct Relay {
    listener: TcpListener,
    upstream: WebSocket<TcpStream>,
    clients: Vec<TcpStream>,
    /// The current message's encoded server frame, reused between messages.
    frame: Vec<u8>,
    /// Clients dropped after a failed write, and why the first one was.
    dropped: u64,
    first_drop: Option<String>,
    /// Connections whose upgrade failed, and why the first one did.
    refused: u64,
    first_refusal: Option<String>,
}

impl Relay {
    /// Relays until asked to stop or the origin goes away.
    fn serve(&mut self, stop: &AtomicBool) -> Result<(), String> {
        while !stop.load(Ordering::Relaxed) {
            self.accept_pending();
            let (opcode, payload): (Data, Bytes) = match self.upstream.read() {
                Ok(Message::Binary(payload)) => (Data::Binary, payload),
                Ok(Message::Text(text)) => (Data::Text, text.into()),
                // tungstenite answers pings itself; nothing else to relay.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) => {
                    eprintln!("baseline: the origin closed the feed; exiting");
                    return Ok(());
                }
                // No message within the poll interval, or a signal (SIGTERM)
                // interrupted the read: loop to accept clients and check `stop`.
                Err(e) if no_message_yet(&e) => continue,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    eprintln!("baseline: the origin link closed; exiting");
                    return Ok(());
                }
                Err(e) => return Err(format!("reading from the origin: {e}")),
            };
            self.frame.clear();
            Frame::message(payload, OpCode::Data(opcode), true)
                .format(&mut self.frame)
                .map_err(|e| format!("encoding a frame: {e}"))?;
            self.broadcast();
        }
        Ok(())
    }

    /// One blocking `write_all` of the current frame per client; drops the
    /// clients whose write fails.
    fn broadcast(&mut self) {
        let frame = &self.frame;
        let mut dropped = 0;
        let mut first: Option<io::Error> = None;
        self.clients
            .retain_mut(|client| match client.write_all(frame) {
                Ok(()) => true,
                Err(e) => {
                    dropped += 1;
                    first.get_or_insert(e);
                    false
                }
            });
        self.dropped += dropped;
        if let Some(e) = first {
            self.first_drop.get_or_insert_with(|| e.to_string());
        }
    }

    /// Accepts and upgrades every connection waiting in the backlog.
    fn accept_pending(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => match upgrade(stream) {
                    Ok(client) => self.clients.push(client),
                    Err(e) => {
                        self.refused += 1;
                        self.first_refusal
                            .get_or_insert_with(|| format!("{peer}: {e}"));
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of descriptors: try again after the next message.
                    self.refused += 1;
                    self.first_refusal
                        .get_or_insert_with(|| format!("accept: {e}"));
                    return;
                }
            }
        }
    }

    /// Sends Close 1001 to every client and closes the origin link.
    fn close_all(&mut self) {
        if let Some(close) = going_away() {
            for client in &mut self.clients {
                // Clients that are gone already do not need a goodbye.
                let _ = client.write_all(&close);
            }
        }
        self.clients.clear();
        // Best effort: the origin treats a vanished link like a closed one.
        let _ = self.upstream.close(None);
        let _ = self.upstream.flush();
        if self.dropped > 0 {
            eprintln!(
                "baseline: dropped {} client(s) after a failed write; first: {}",
                self.dropped,
                self.first_drop.as_deref().unwrap_or("?")
            );
        }
        if self.refused > 0 {
            eprintln!(
                "baseline: {} connection(s) failed to upgrade; first: {}",
                self.refused,
                self.first_refusal.as_deref().unwrap_or("?")
            );
        }
    }
}

/// A Close 1001 frame (going away), for a relay that is stopping.
pub fn going_away() -> Option<Vec<u8>> {
    let mut close = Vec::new();
    let frame = CloseFrame {
        code: CloseCode::Away,
        reason: "".into(),
    };
    Frame::close(Some(frame)).format(&mut close).ok()?;
    Some(close)
}

/// A non-blocking listener with a deep backlog (std's `bind` uses 128).
pub fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from(socket))
}

/// Whether a read from the origin link found no message yet: its read
/// timeout passed, or a signal interrupted it; the caller reads again.
pub fn no_message_yet(e: &tungstenite::Error) -> bool {
    matches!(
        e,
        tungstenite::Error::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        )
    )
}

/// Connects to the origin and completes the WebSocket upgrade (blocking),
/// then sets the short read timeout the relay loop polls with.
pub fn connect_origin(url: &str) -> Result<WebSocket<TcpStream>, String> {
    let upstream = connect_ws(url, "the origin")?;
    upstream
        .get_ref()
        .set_read_timeout(Some(UPSTREAM_POLL))
        .map_err(|e| format!("cannot set the origin link's read timeout: {e}"))?;
    Ok(upstream)
}

/// Connects to `url` (`ws://HOST:PORT/...`, `what` naming it in errors)
/// with `TCP_NODELAY` and completes the WebSocket upgrade (blocking).
pub fn connect_ws(url: &str, what: &str) -> Result<WebSocket<TcpStream>, String> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("{what}: the URL must be ws://HOST:PORT/... (got {url:?})"))?;
    let stream = TcpStream::connect(authority)
        .map_err(|e| format!("cannot connect to {what} at {authority}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY on the link to {what}: {e}"))?;
    let (socket, _response) = tungstenite::client::client(url, stream)
        .map_err(|e| format!("WebSocket upgrade with {what} at {url} failed: {e}"))?;
    Ok(socket)
}

/// Reads the client's upgrade request and answers `101` (blocking, bounded by
/// [`HANDSHAKE_TIMEOUT`]). Returns the socket ready for frames.
pub fn upgrade(mut stream: TcpStream) -> io::Result<TcpStream> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if request.len() >= MAX_REQUEST || Instant::now() >= deadline {
            return Err(io::Error::other("no complete upgrade request"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => request.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let key = websocket_key(&request[..head_len]).map_err(io::Error::other)?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes())?;
    Ok(stream)
}

/// The `Sec-WebSocket-Key` of a complete `GET` upgrade request head.
fn websocket_key(head: &[u8]) -> Result<String, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request".to_string()),
        Err(e) => return Err(format!("bad request: {e}")),
    }
    if request.method != Some("GET") {
        return Err("not a GET request".to_string());
    }
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        .ok_or_else(|| "no Sec-WebSocket-Key".to_string())
}
