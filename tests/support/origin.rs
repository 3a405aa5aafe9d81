//! The test origin: a real WebSocket server in the test process that the
//! gateway's lobbies connect to. It broadcasts what the test sends, records
//! what it sees (handshake headers, messages from the gateway, when each
//! connection arrived), and can misbehave on purpose: stay silent, refuse
//! upgrades with an HTTP status, or serve TLS.

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
use tungstenite::{
    Message, WebSocket,
    handshake::server::{Request, Response},
};

/// Counters the test origin keeps; shared across a restart on the same port.
#[derive(Debug, Default)]
pub struct OriginCounts {
    /// Upgraded connections ever accepted.
    pub accepted: AtomicUsize,
    /// Connections currently open.
    pub open: AtomicUsize,
    /// Connections that ended with a close frame from the gateway.
    pub closed_by_peer: AtomicUsize,
    /// Upgrade attempts answered with an HTTP error.
    pub rejected: AtomicUsize,
}

/// How the test origin behaves.
#[derive(Clone, Default)]
pub struct OriginOptions {
    /// After the upgrade, never read nor write (so never answer pings).
    pub silent: bool,
    /// Answer this many upgrade attempts with `reject_status` before accepting.
    pub reject_first: usize,
    /// The HTTP status for refused upgrades.
    pub reject_status: u16,
    /// Connection number k sends each message k × `skew` after it was sent
    /// (so upstream connections are a few messages apart).
    pub skew: Duration,
    /// Instead: connections asking for this target (path and query, as
    /// [`OriginEvent::Connected`] records it) send each message `skew`
    /// late, and the others at once, whatever order they connect in (a
    /// gateway given [`TestOrigin::url`] with this query is the one behind).
    pub skew_only: Option<String>,
    /// Prefix each text message with its connection number, so no two
    /// connections carry the same stream.
    pub tag_per_conn: bool,
    /// Send one message ("hello") right after the upgrade, then close.
    pub hello_and_close: bool,
    /// Serve TLS with this configuration.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Something the origin saw.
#[derive(Debug, Clone)]
pub enum OriginEvent {
    /// Connection number `conn` completed its upgrade, asking for `uri`
    /// (path and query) with these request headers.
    Connected {
        conn: usize,
        at: Instant,
        uri: String,
        headers: Vec<(String, String)>,
    },
    /// Connection `conn` sent this text message.
    Received { conn: usize, text: String },
    /// Connection `conn` sent a close frame with this code.
    Closed { conn: usize, code: Option<u16> },
}

struct Conn {
    tx: Sender<Message>,
    alive: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Shared {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
    counts: Arc<OriginCounts>,
    events: Arc<Mutex<Vec<OriginEvent>>>,
    options: OriginOptions,
}

/// A WebSocket origin server in this process. Every message sent through it
/// goes to every connection it has, in order.
pub struct TestOrigin {
    addr: SocketAddr,
    shared: Shared,
    pub counts: Arc<OriginCounts>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestOrigin {
    /// Starts a well-behaved origin on a free loopback port.
    pub fn start() -> TestOrigin {
        TestOrigin::start_with(OriginOptions::default())
    }

    /// Starts an origin with `options` on a free loopback port.
    pub fn start_with(options: OriginOptions) -> TestOrigin {
        TestOrigin::start_on(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::default(),
            options,
        )
    }

    /// Starts an origin on `addr`, adding to `counts` (to restart one on the same port).
    pub fn start_on(
        addr: SocketAddr,
        counts: Arc<OriginCounts>,
        options: OriginOptions,
    ) -> TestOrigin {
        let listener = TcpListener::bind(addr).expect("bind test origin");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("origin address");
        let shared = Shared {
            stop: Arc::default(),
            conns: Arc::default(),
            counts: counts.clone(),
            events: Arc::default(),
            options,
        };
        let acceptor = {
            let shared = shared.clone();
            thread::spawn(move || accept_loop(listener, &shared))
        };
        TestOrigin {
            addr,
            shared,
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

    /// What the origin saw so far, in order.
    pub fn events(&self) -> Vec<OriginEvent> {
        self.shared.events.lock().expect("origin lock").clone()
    }

    /// Sends `msg` to every open connection; returns how many got it.
    pub fn send(&self, msg: Message) -> usize {
        let conns = self.shared.conns.lock().expect("origin lock");
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
        self.shared.stop.store(true, Ordering::SeqCst);
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

fn accept_loop(listener: TcpListener, shared: &Shared) {
    let mut threads = Vec::new();
    let mut attempts = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((stream, _)) = listener.accept() else {
            thread::sleep(Duration::from_millis(2));
            continue;
        };
        attempts += 1;
        let shared = shared.clone();
        let reject = attempts <= shared.options.reject_first;
        threads.push(thread::spawn(move || {
            if reject {
                refuse(stream, &shared);
            } else {
                upgrade_and_serve(stream, &shared);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Reads the upgrade request and answers it with the configured HTTP error.
fn refuse(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    let status = shared.options.reject_status;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    shared.counts.rejected.fetch_add(1, Ordering::SeqCst);
}

fn upgrade_and_serve(stream: TcpStream, shared: &Shared) {
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let tcp = stream.try_clone().expect("clone origin socket");
    #[cfg(feature = "tls")]
    if let Some(config) = &shared.options.tls {
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        return upgraded(rustls::StreamOwned::new(conn, stream), &tcp, shared);
    }
    upgraded(stream, &tcp, shared);
}

fn upgraded<S: Read + Write>(stream: S, tcp: &TcpStream, shared: &Shared) {
    let mut headers = Vec::new();
    let mut uri = String::new();
    // tungstenite's callback signature returns its (large) HTTP error response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| {
        uri = req.uri().to_string();
        headers = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        // Like a real server, select the first subprotocol offered.
        let offered = req
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if let Some(first) = offered.and_then(|v| v.split(',').next()) {
            if let Ok(value) = first.trim().parse() {
                resp.headers_mut().insert("Sec-WebSocket-Protocol", value);
            }
        }
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else {
        return;
    };
    tcp.set_nonblocking(true).expect("nonblocking");
    let (tx, rx) = unbounded();
    let alive = Arc::new(AtomicBool::new(true));
    shared.conns.lock().expect("origin lock").push(Conn {
        tx,
        alive: alive.clone(),
    });
    // Counted once it takes broadcasts: a test that sees the connection
    // open and sends at once must reach it.
    let conn = shared.counts.accepted.fetch_add(1, Ordering::SeqCst);
    shared.counts.open.fetch_add(1, Ordering::SeqCst);
    let delay = match &shared.options.skew_only {
        Some(target) if *target == uri => shared.options.skew,
        Some(_) => Duration::ZERO,
        None => shared.options.skew * conn as u32,
    };
    shared
        .events
        .lock()
        .expect("origin lock")
        .push(OriginEvent::Connected {
            conn,
            at: Instant::now(),
            uri,
            headers,
        });
    if shared.options.hello_and_close {
        let _ = ws.send(Message::text("hello"));
        let _ = ws.close(None);
        let _ = ws.flush();
    } else if shared.options.silent {
        while !shared.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
    } else {
        serve(ws, conn, delay, &rx, shared);
    }
    alive.store(false, Ordering::SeqCst);
    shared.counts.open.fetch_sub(1, Ordering::SeqCst);
}

fn serve<S: Read + Write>(
    mut ws: WebSocket<S>,
    conn: usize,
    delay: Duration,
    rx: &Receiver<Message>,
    shared: &Shared,
) {
    // Queued, not flushed: what was sent together goes out together (the
    // flush below), as a busy origin's burst does.
    let send = |ws: &mut WebSocket<S>, msg| match ws.write(msg) {
        Ok(()) => true,
        Err(e) => is_would_block(&e),
    };
    let tag = |msg: Message| match (&msg, shared.options.tag_per_conn) {
        (Message::Text(text), true) => Message::text(format!("{conn}:{}", text.as_str())),
        _ => msg,
    };
    let mut delayed: std::collections::VecDeque<(Instant, Message)> = Default::default();
    'conn: while !shared.stop.load(Ordering::SeqCst) {
        while let Ok(msg) = rx.try_recv() {
            delayed.push_back((Instant::now() + delay, tag(msg)));
        }
        while delayed.front().is_some_and(|(at, _)| *at <= Instant::now()) {
            let Some((_, msg)) = delayed.pop_front() else {
                break;
            };
            if !send(&mut ws, msg) {
                break 'conn;
            }
        }
        loop {
            match ws.read() {
                Ok(Message::Close(frame)) => {
                    shared.counts.closed_by_peer.fetch_add(1, Ordering::SeqCst);
                    let code = frame.map(|f| u16::from(f.code));
                    shared
                        .events
                        .lock()
                        .expect("origin lock")
                        .push(OriginEvent::Closed { conn, code });
                    let _ = ws.flush();
                    break 'conn;
                }
                Ok(Message::Text(text)) => {
                    shared
                        .events
                        .lock()
                        .expect("origin lock")
                        .push(OriginEvent::Received {
                            conn,
                            text: text.as_str().to_owned(),
                        })
                }
                Ok(_) => {}
                Err(e) if is_would_block(&e) => break,
                Err(_) => break 'conn,
            }
        }
        let _ = ws.flush();
        if let Ok(msg) = rx.recv_timeout(Duration::from_millis(1)) {
            delayed.push_back((Instant::now() + delay, tag(msg)));
        }
    }
}

fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}
