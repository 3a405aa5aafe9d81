//! The demo feed behind `wsgate --demo`: a program publishing its own ticks.
//!
//! [`DemoFeed`] runs one thread of its own, `wsgate-demo`, that publishes a
//! JSON tick, `{"seq":N,"ts_ms":T}`, through a [`Publisher`] at a fixed
//! interval: the embedding path, as `examples/embed.rs` shows it, so the
//! gateway can be tried with nothing else running. The thread sleeps on a
//! channel with a timeout, so stopping it is immediate. It is not part of
//! the gateway: it is what an embedding program would run.

use std::{
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam_channel::{RecvTimeoutError, Sender, bounded};
use log::info;

use crate::Publisher;

/// A running demo feed. Dropping it stops its thread.
#[derive(Debug)]
pub struct DemoFeed {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DemoFeed {
    /// Starts publishing a tick through `publisher` every `interval`.
    pub fn start(publisher: Publisher, interval: Duration) -> std::io::Result<DemoFeed> {
        let (stop, stopped) = bounded::<()>(1);
        let thread = thread::Builder::new()
            .name("wsgate-demo".to_owned())
            .spawn(move || {
                let mut seq: u64 = 0;
                let mut next = Instant::now();
                loop {
                    let wait = next.saturating_duration_since(Instant::now());
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    seq += 1;
                    let ts_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis());
                    publisher.publish_text(format!("{{\"seq\":{seq},\"ts_ms\":{ts_ms}}}"));
                    next += interval;
                }
            })?;
        info!("demo feed: a tick every {interval:?}");
        Ok(DemoFeed {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for DemoFeed {
    fn drop(&mut self) {
        self.halt();
    }
}
