//! The per-client drop-oldest queue over a crossbeam bounded channel.
//!
//! A lobby pushes shared frames; when the queue is full it pops the oldest
//! frame itself (it holds a receiver clone for that) and counts a drop, so it
//! never waits on a slow client. The writer that owns the client's socket
//! drains the other end. The queue belongs to the client, not the lobby: the
//! manager keeps a handle so it outlives a move between lobbies.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::frame::Frame;

/// Both ends of one client's queue. Cloning shares the same queue.
#[derive(Debug, Clone)]
pub(crate) struct ClientQueue {
    tx: Sender<Frame>,
    rx: Receiver<Frame>,
    /// Frames this client lost, when the slow-client policy needs the count.
    drops: Option<Arc<AtomicU64>>,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The frame was queued and nothing was lost.
    Queued,
    /// The queue was full: its oldest frame was dropped to make room.
    DroppedOldest,
}

impl ClientQueue {
    /// A queue holding at most `depth` frames, counting the frames it drops
    /// if `count_drops`.
    pub(crate) fn new(depth: usize, count_drops: bool) -> ClientQueue {
        let (tx, rx) = bounded(depth);
        let drops = count_drops.then(Arc::default);
        ClientQueue { tx, rx, drops }
    }

    /// Queues `frame`, dropping the oldest queued frame if the queue is full.
    /// Never blocks.
    pub(crate) fn push(&self, mut frame: Frame) -> Pushed {
        let mut pushed = Pushed::Queued;
        loop {
            match self.tx.try_send(frame) {
                Ok(()) => {
                    if pushed == Pushed::DroppedOldest {
                        self.count_drops(1);
                    }
                    return pushed;
                }
                Err(TrySendError::Full(back)) => {
                    frame = back;
                    // The writer may have drained it meanwhile; then just retry.
                    if self.rx.try_recv().is_ok() {
                        pushed = Pushed::DroppedOldest;
                    }
                }
                // Unreachable while we hold `rx`, but nothing to deliver to either way.
                Err(TrySendError::Disconnected(_)) => return pushed,
            }
        }
    }

    /// Frames this client lost so far (0 when drops are not counted).
    pub(crate) fn drops(&self) -> u64 {
        self.drops.as_ref().map_or(0, |d| d.load(Relaxed))
    }

    /// Records `n` frames this client lost elsewhere (the writer's trim).
    pub(crate) fn count_drops(&self, n: u64) {
        if let Some(drops) = &self.drops {
            if n > 0 {
                drops.fetch_add(n, Relaxed);
            }
        }
    }

    /// Takes the oldest queued frame, if any.
    pub(crate) fn pop(&self) -> Option<Frame> {
        self.rx.try_recv().ok()
    }

    /// Frames currently queued.
    pub(crate) fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The most frames the queue holds.
    pub(crate) fn depth(&self) -> usize {
        self.rx.capacity().unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{OP_TEXT, encode};

    #[test]
    fn full_queue_drops_the_oldest() {
        let q = ClientQueue::new(3, true);
        let frames: Vec<Frame> = (0..5).map(|i| encode(OP_TEXT, &[b'0' + i])).collect();
        let results: Vec<Pushed> = frames.iter().map(|f| q.push(f.clone())).collect();
        assert_eq!(results[..3], [Pushed::Queued; 3]);
        assert_eq!(results[3..], [Pushed::DroppedOldest; 2]);
        assert_eq!(q.drops(), 2);
        let left: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|f| f[2]).collect();
        assert_eq!(left, b"234");
    }

    #[test]
    fn frames_are_shared_not_copied() {
        let q = ClientQueue::new(2, false);
        let frame = encode(OP_TEXT, b"x");
        q.push(frame.clone());
        let out = q.pop().unwrap();
        assert!(Frame::ptr_eq(&frame, &out));
    }
}
