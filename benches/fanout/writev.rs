//! The coalescing relay: a single-threaded relay that keeps a bounded queue
//! per client and writes whatever a client has queued in one `writev`, the
//! best a one-thread design does at saturation. The bench's `-writev`
//! scenarios compare wsgate with it (`scenario::ON_REQUEST`), as issue 27's
//! "keep what is won" asks: wsgate's CPU per delivery at saturation no worse
//! than this relay's. Like the baseline it is this bench binary re-executed
//! (`WSGATE_BENCH_ROLE=writev`), measured through `/proc/PID`.
//!
//! Design:
//! - **one thread**, one `mio` poll over the listener, the origin link and
//!   every client socket (edge-triggered, all non-blocking);
//! - **one upstream**; each origin message is encoded once into a shared,
//!   reference-counted frame;
//! - **a queue of at most 16 frames per client**, dropping the oldest it
//!   has not started writing when full (wsgate's default depth and policy);
//! - after reading what the origin link holds (at most [`READ_BATCH`]
//!   messages), every client with queued frames
//!   gets **one vectored write** of them; a client whose socket is full
//!   waits for its writable edge.
//!
//! It shares the baseline's listener, origin link and upgrade (`baseline.rs`).
//! Usage and output: as the baseline's, with `writev` for `baseline`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::{Bytes, Message, WebSocket};

use crate::baseline;

/// The value of [`baseline::ROLE_ENV`] that runs this relay.
pub const ROLE: &str = "writev";

/// Frames a client's queue holds (wsgate's `--queue-depth` default).
const DEPTH: usize = 16;
/// Origin messages read, at most, before the clients are written to: more
/// than arrive during one pass over the clients at saturation, so the relay
/// keeps up with its origin link (as wsgate does) and queues, not the link,
/// absorb the excess; the bound only keeps a flood from starving writes.
const READ_BATCH: usize = 4096;
/// The longest the poll sleeps, so a stop request is seen.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

const LISTENER: Token = Token(0);
const UPSTREAM: Token = Token(1);
/// Client `i` is `Token(FIRST_CLIENT + i)`.
const FIRST_CLIENT: usize = 2;

/// Entry point of the `writev` role; `args` are the arguments after the
/// program name.
pub fn main(args: &[String]) -> ExitCode {
    baseline::exit(ROLE, run(args))
}

fn run(args: &[String]) -> Result<(), String> {
    let (listen, origin_url, stop) = baseline::setup(ROLE, args)?;
    let poll = Poll::new().map_err(|e| format!("cannot create a poll: {e}"))?;
    let listener =
        baseline::listen_on(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listener's address: {e}"))?;
    poll.registry()
        .register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )
        .map_err(|e| format!("cannot poll the listener: {e}"))?;
    let upstream = baseline::connect_origin(origin_url)?;
    upstream
        .get_ref()
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make the origin link non-blocking: {e}"))?;
    poll.registry()
        .register(
            &mut SourceFd(&upstream.get_ref().as_raw_fd()),
            UPSTREAM,
            Interest::READABLE,
        )
        .map_err(|e| format!("cannot poll the origin link: {e}"))?;

    let mut stdout = io::stdout();
    writeln!(stdout, "writev: clients connect to ws://{local}/")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write the address to stdout: {e}"))?;

    let mut relay = Relay {
        poll,
        listener,
        upstream,
        clients: Vec::new(),
        encoded: Vec::new(),
        dropped_frames: 0,
        dropped_clients: 0,
        refused: 0,
    };
    let result = relay.serve(&stop);
    relay.close_all();
    eprintln!(
        "writev: {} frame(s) dropped (queue full), {} client(s) dropped, {} upgrade(s) refused",
        relay.dropped_frames, relay.dropped_clients, relay.refused
    );
    result
}

struct Client {
    stream: TcpStream,
    /// Frames not yet written; the front one from byte `offset` on.
    queue: VecDeque<Rc<[u8]>>,
    offset: usize,
    /// The socket refused a write: wait for its writable edge.
    blocked: bool,
}

struct Relay {
    poll: Poll,
    listener: TcpListener,
    upstream: WebSocket<std::net::TcpStream>,
    /// Slot `i` is the client of `Token(FIRST_CLIENT + i)`; `None` once gone.
    clients: Vec<Option<Client>>,
    /// Encoding buffer, reused between messages.
    encoded: Vec<u8>,
    dropped_frames: u64,
    dropped_clients: u64,
    refused: u64,
}

impl Relay {
    /// Relays until asked to stop or the origin goes away.
    fn serve(&mut self, stop: &AtomicBool) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        // The origin link may hold more than one batch: read again at once.
        let mut more_upstream = false;
        while !stop.load(Ordering::Relaxed) {
            let timeout = if more_upstream {
                Duration::ZERO
            } else {
                POLL_TIMEOUT
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("poll failed: {e}")),
            }
            let mut upstream_ready = more_upstream;
            for event in &events {
                match event.token() {
                    LISTENER => self.accept_pending(),
                    UPSTREAM => upstream_ready = true,
                    Token(t) => {
                        let slot = t - FIRST_CLIENT;
                        if let Some(Some(client)) = self.clients.get_mut(slot) {
                            client.blocked = false;
                            self.flush(slot);
                        }
                    }
                }
            }
            if upstream_ready {
                match self.read_batch()? {
                    Some(more) => more_upstream = more,
                    None => return Ok(()),
                }
                for slot in 0..self.clients.len() {
                    self.flush(slot);
                }
            }
        }
        Ok(())
    }

    /// Reads up to [`READ_BATCH`] origin messages into every queue. Returns
    /// whether the link may hold more, or `None` once the origin has closed.
    fn read_batch(&mut self) -> Result<Option<bool>, String> {
        for _ in 0..READ_BATCH {
            let (opcode, payload): (Data, Bytes) = match self.upstream.read() {
                Ok(Message::Binary(payload)) => (Data::Binary, payload),
                Ok(Message::Text(text)) => (Data::Text, text.into()),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_))
                | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    eprintln!("writev: the origin closed the feed; exiting");
                    return Ok(None);
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(Some(false));
                }
                Err(e) => return Err(format!("reading from the origin: {e}")),
            };
            self.encoded.clear();
            Frame::message(payload, OpCode::Data(opcode), true)
                .format(&mut self.encoded)
                .map_err(|e| format!("encoding a frame: {e}"))?;
            let frame: Rc<[u8]> = Rc::from(self.encoded.as_slice());
            for client in self.clients.iter_mut().flatten() {
                if client.queue.len() == DEPTH {
                    // Drop the oldest frame not started.
                    let oldest = usize::from(client.offset > 0);
                    client.queue.remove(oldest);
                    self.dropped_frames += 1;
                }
                client.queue.push_back(Rc::clone(&frame));
            }
        }
        Ok(Some(true))
    }

    /// Writes what client `slot` has queued, in one `writev` at a time,
    /// until its queue is empty or its socket full; drops it on an error.
    fn flush(&mut self, slot: usize) {
        let Some(Some(client)) = self.clients.get_mut(slot) else {
            return;
        };
        while !client.blocked && !client.queue.is_empty() {
            let mut slices: [IoSlice<'_>; DEPTH] = [IoSlice::new(&[]); DEPTH];
            for (i, frame) in client.queue.iter().enumerate() {
                let start = if i == 0 { client.offset } else { 0 };
                slices[i] = IoSlice::new(&frame[start..]);
            }
            match client.stream.write_vectored(&slices[..client.queue.len()]) {
                Ok(0) => {
                    self.drop_client(slot);
                    return;
                }
                Ok(mut written) => {
                    while let Some(front) = client.queue.front() {
                        let left = front.len() - client.offset;
                        if written < left {
                            client.offset += written;
                            break;
                        }
                        written -= left;
                        client.offset = 0;
                        client.queue.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_client(slot);
                    return;
                }
            }
        }
    }

    fn drop_client(&mut self, slot: usize) {
        if let Some(mut client) = self.clients[slot].take() {
            let _ = self.poll.registry().deregister(&mut client.stream);
            self.dropped_clients += 1;
        }
    }

    /// Accepts and upgrades every connection waiting in the backlog.
    fn accept_pending(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _peer)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // E.g. out of descriptors: the next edge tries again.
                    self.refused += 1;
                    return;
                }
            }
        }
    }

    /// Sends Close 1001 to every client, best effort (a full socket
    /// misses it, as a client that stopped reading would).
    fn close_all(&mut self) {
        if let Some(close) = baseline::going_away() {
            for client in self.clients.iter_mut().flatten() {
                let _ = client.stream.write(&close);
            }
        }
        self.clients.clear();
        let _ = self.upstream.close(None);
        let _ = self.upstream.flush();
    }

    /// Upgrades one connection (blocking, as the baseline does) and polls it.
    fn admit(&mut self, stream: std::net::TcpStream) {
        let upgraded = baseline::upgrade(stream).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let Ok(stream) = upgraded else {
            self.refused += 1;
            return;
        };
        let mut stream = TcpStream::from_std(stream);
        let slot = self.clients.len();
        if self
            .poll
            .registry()
            .register(&mut stream, Token(FIRST_CLIENT + slot), Interest::WRITABLE)
            .is_err()
        {
            self.refused += 1;
            return;
        }
        self.clients.push(Some(Client {
            stream,
            queue: VecDeque::with_capacity(DEPTH),
            offset: 0,
            blocked: false,
        }));
    }
}
