//! The publisher bridge of the `-nchan` scenarios: a thread of the bench
//! that connects to the load tool's origin as a gateway would and
//! publishes every message it gets into nchan over one WebSocket publisher
//! connection (`nchan.rs`'s `/pub`): nchan takes published messages, it
//! dials no origin. Its CPU is the bench's (the load generator's), not
//! nginx's: nginx pays for reading the publisher link, as wsgate pays for
//! reading its origin link.
//!
//! One loop, blocking: read a message from the origin (tungstenite, the
//! baseline's `connect_origin`, a 10 ms read timeout so the stop flag is
//! seen), send it to nchan as the same kind of message (text or binary),
//! flushed at once. When nchan is slower than the origin, the send blocks,
//! the origin link fills and the origin slows, as it would for a gateway
//! that reads slowly. Whatever nchan sends back on the publisher link is
//! read and thrown away by a second thread, so that nginx never waits on
//! it.
//!
//! [`Bridge::stop`] closes both links and joins both threads; dropping a
//! [`Bridge`] does the same.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use tungstenite::{Message, WebSocket};

use crate::baseline;

/// A running bridge; see the module docs.
pub struct Bridge {
    stop: Arc<AtomicBool>,
    /// The publisher link's socket, to shut down what the drain reads.
    publisher: TcpStream,
    relay: Option<JoinHandle<Result<u64, String>>>,
    drain: Option<JoinHandle<()>>,
}

impl Bridge {
    /// Connects to the origin at `origin_url` and to nchan's publisher at
    /// `publish_url`, and starts relaying.
    pub fn start(origin_url: &str, publish_url: &str) -> Result<Bridge, String> {
        let origin = baseline::connect_origin(origin_url)?;
        let publisher = baseline::connect_ws(publish_url, "nchan's publisher")?;
        let socket = publisher
            .get_ref()
            .try_clone()
            .map_err(|e| format!("cannot clone the publisher socket: {e}"))?;
        let mut drained = socket
            .try_clone()
            .map_err(|e| format!("cannot clone the publisher socket: {e}"))?;
        let drain = std::thread::Builder::new()
            .name("bench-bridge-drain".to_string())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                // Ends when nchan closes the link or stop() shuts it down.
                while matches!(drained.read(&mut buf), Ok(n) if n > 0) {}
            })
            .map_err(|e| format!("cannot start the bridge's drain thread: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let relay = std::thread::Builder::new()
            .name("bench-bridge".to_string())
            .spawn(move || relay(origin, publisher, &flag))
            .map_err(|e| format!("cannot start the bridge thread: {e}"))?;
        Ok(Bridge {
            stop,
            publisher: socket,
            relay: Some(relay),
            drain: Some(drain),
        })
    }

    /// Stops relaying, closes both links and joins both threads. Returns
    /// the number of messages published, or why relaying failed.
    pub fn stop(mut self) -> Result<u64, String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let relayed = match self.relay.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the bridge thread panicked".to_string()),
            None => Ok(0),
        };
        // The link may be closed already: nothing more to shut then.
        let _ = self.publisher.shutdown(Shutdown::Both);
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
        relayed.map_err(|e| format!("the nchan bridge failed: {e}"))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The bridge's loop: origin messages to the publisher until `stop`, or
/// until either link closes. Returns the messages published.
fn relay(
    mut origin: WebSocket<TcpStream>,
    mut publisher: WebSocket<TcpStream>,
    stop: &AtomicBool,
) -> Result<u64, String> {
    let mut published = 0;
    while !stop.load(Ordering::Relaxed) {
        let message = match origin.read() {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => message,
            // tungstenite answers pings itself; nothing else to publish.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            Ok(Message::Close(_))
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                break;
            }
            Err(e) if baseline::no_message_yet(&e) => continue,
            Err(e) => return Err(format!("reading from the origin: {e}")),
        };
        publisher
            .send(message)
            .map_err(|e| format!("publishing message {}: {e}", published + 1))?;
        published += 1;
    }
    // Best effort: both peers treat a vanished link like a closed one.
    let _ = origin.close(None);
    let _ = origin.flush();
    let _ = publisher.close(None);
    let _ = publisher.flush();
    Ok(published)
}
