//! The embedded demo origin behind `wsgate --demo`.
//!
//! A small loopback WebSocket server on its own thread that sends every
//! connection a JSON tick, `{"seq":N,"ts_ms":T}`, at a fixed interval, so the
//! gateway can be tried with nothing else running. It is deliberately simple
//! (one thread, a handful of connections); it is not part of the gateway's
//! data path.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{debug, info};
use tungstenite::{Message, WebSocket};

/// Time a connecting lobby gets to finish its upgrade with the demo origin.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running demo origin. Dropping it stops the thread.
#[derive(Debug)]
pub struct DemoOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DemoOrigin {
    /// Starts the demo origin on `addr` (port 0 picks one), ticking every `interval`.
    pub fn start(addr: SocketAddr, interval: Duration) -> io::Result<DemoOrigin> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("wsgate-demo".to_owned())
            .spawn(move || run(listener, interval, &flag))?;
        info!("demo origin on ws://{addr}/ ticking every {interval:?}");
        Ok(DemoOrigin {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The URL to configure as the gateway's origin.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Stops the thread and closes its connections.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for DemoOrigin {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(listener: TcpListener, interval: Duration, stop: &AtomicBool) {
    let mut conns: Vec<WebSocket<TcpStream>> = Vec::new();
    let mut seq: u64 = 0;
    let mut next_tick = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        while let Ok((stream, peer)) = listener.accept() {
            match upgrade(stream) {
                Ok(ws) => {
                    debug!("demo origin: {peer} connected");
                    conns.push(ws);
                }
                Err(e) => debug!("demo origin: {peer} failed to upgrade: {e}"),
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            seq += 1;
            let ts_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let tick = format!("{{\"seq\":{seq},\"ts_ms\":{ts_ms}}}");
            conns.retain_mut(|ws| send(ws, &tick));
            next_tick += interval;
        }
        conns.retain_mut(drain_input);
        thread::sleep(
            next_tick
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        );
    }
    for mut ws in conns {
        let _ = ws.close(None).and_then(|()| ws.flush());
    }
}

fn upgrade(stream: TcpStream) -> Result<WebSocket<TcpStream>, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(UPGRADE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let ws = tungstenite::accept(stream).map_err(|e| e.to_string())?;
    ws.get_ref()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Sends a tick; false if the connection is gone.
fn send(ws: &mut WebSocket<TcpStream>, tick: &str) -> bool {
    match ws.send(Message::text(tick)) {
        Ok(()) => true,
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(_) => false,
    }
}

/// Reads what the peer sent (pings, closes); false if the connection is gone.
fn drain_input(ws: &mut WebSocket<TcpStream>) -> bool {
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = ws.flush();
                return true;
            }
            Err(_) => return false,
        }
    }
}
