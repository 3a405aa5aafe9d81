//! The per-client drop-oldest queue over a crossbeam bounded channel.
//!
//! A lobby pushes shared frames; when the queue is full it pops the oldest
//! frame itself (it holds a receiver clone for that) and counts a drop, so it
//! never waits on a slow client. The writer that owns the client's socket
//! drains the other end, and marks the queue stalled while that socket is
//! full, so a drop says whose it was: the client's (its socket was full) or
//! the gateway's (its writer had not reached it yet). The queue belongs to
//! the client, not the lobby: the manager keeps a handle so it outlives a
//! move between lobbies. The writer holds only the [`Outlet`]: the
//! receiving end and the shared state, without the sender it never uses.

use std::{
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::{stats::DropReason, wire::frame::Frame};

/// Both ends of one client's queue. Cloning shares the same queue; its
/// outlet's methods (through `Deref`) read and drain it.
#[derive(Debug, Clone)]
pub(crate) struct ClientQueue {
    tx: Sender<Frame>,
    out: Outlet,
}

/// The receiving end of a client's queue and what the lobby and the writer
/// share about it: all a writer needs, one sender (16 bytes) less per
/// connection than the whole queue.
#[derive(Debug, Clone)]
pub(crate) struct Outlet {
    rx: Receiver<Frame>,
    /// Shared with the writer. Behind a pointer, not inline, so a lobby's
    /// member stays one cache line (it walks them all for every message).
    state: Arc<State>,
}

/// What the lobby and the writer share about a client besides its frames.
#[derive(Debug, Default)]
struct State {
    /// Its socket is full: the writer waits for the client to read.
    stalled: AtomicBool,
    /// Frames it lost while its socket was full, if counted.
    slow_drops: AtomicU64,
    /// Whether `slow_drops` is kept (the slow-client policy needs it).
    count_drops: bool,
    /// A full queue refuses the new frame and marks itself overflowed
    /// instead of dropping its oldest (an SSE client, whose stream is
    /// closed rather than missing a message: it resumes from history).
    #[cfg(feature = "sse")]
    close_when_full: bool,
    /// A frame was refused: the client's writer closes its stream.
    #[cfg(feature = "sse")]
    overflowed: AtomicBool,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The frame was queued and nothing was lost.
    Queued,
    /// The queue was full: its oldest frame was dropped to make room, for
    /// this reason ([`DropReason::SlowClient`] or [`DropReason::WriterBehind`]).
    Dropped(DropReason),
    /// The queue was full and closes its client's stream rather than drop
    /// a frame: this one was not queued, nothing was dropped.
    #[cfg(feature = "sse")]
    Overflowed,
}

impl ClientQueue {
    /// A queue holding at most `depth` frames, counting the frames its
    /// client loses while stalled if `count_drops`.
    pub(crate) fn new(depth: usize, count_drops: bool) -> ClientQueue {
        let (tx, rx) = bounded(depth);
        let state = Arc::new(State {
            count_drops,
            ..State::default()
        });
        ClientQueue {
            tx,
            out: Outlet { rx, state },
        }
    }

    /// The receiving end, for the writer.
    pub(crate) fn outlet(&self) -> Outlet {
        self.out.clone()
    }

    /// A queue of `depth` frames for an SSE client: when full it refuses a
    /// frame and is marked overflowed ([`ClientQueue::is_overflowed`]), so
    /// the client's stream is closed and the client resumes from history.
    #[cfg(feature = "sse")]
    pub(crate) fn closing_when_full(depth: usize, count_drops: bool) -> ClientQueue {
        let (tx, rx) = bounded(depth);
        let state = Arc::new(State {
            count_drops,
            close_when_full: true,
            ..State::default()
        });
        ClientQueue {
            tx,
            out: Outlet { rx, state },
        }
    }

    /// Queues an event for a queue closing when full: refused, like the one
    /// that overflowed it, once it has overflowed, so nothing after a refused
    /// event reaches the stream (a later one would put the client's
    /// `Last-Event-ID` past the gap, and resuming could not fill it).
    #[cfg(feature = "sse")]
    pub(crate) fn push_event(&self, frame: Frame) -> Pushed {
        if self.is_overflowed() {
            return Pushed::Overflowed;
        }
        self.push(frame)
    }

    /// Queues `frame`, dropping the oldest queued frame if the queue is full.
    /// Never blocks.
    pub(crate) fn push(&self, mut frame: Frame) -> Pushed {
        let mut dropped = false;
        loop {
            match self.tx.try_send(frame) {
                Ok(()) => break,
                #[cfg(feature = "sse")]
                Err(TrySendError::Full(_)) if self.state.close_when_full => {
                    self.overflow();
                    return Pushed::Overflowed;
                }
                Err(TrySendError::Full(back)) => {
                    frame = back;
                    // The writer may have drained it meanwhile; then just retry.
                    dropped |= self.rx.try_recv().is_ok();
                }
                // Unreachable while we hold `rx`, but nothing to deliver to either way.
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
        if !dropped {
            return Pushed::Queued;
        }
        let reason = self.why_lost();
        self.count_lost(reason, 1);
        Pushed::Dropped(reason)
    }
}

impl Deref for ClientQueue {
    type Target = Outlet;

    fn deref(&self) -> &Outlet {
        &self.out
    }
}

impl Outlet {
    /// Whether a full queue refuses a frame rather than drop its oldest
    /// ([`ClientQueue::closing_when_full`]).
    #[cfg(feature = "sse")]
    pub(crate) fn closes_when_full(&self) -> bool {
        self.state.close_when_full
    }

    /// Whether the queue refused a frame (see [`ClientQueue::closing_when_full`]).
    #[cfg(feature = "sse")]
    pub(crate) fn is_overflowed(&self) -> bool {
        self.state.overflowed.load(Relaxed)
    }

    /// Marks the queue overflowed: its client's stream is to be closed
    /// rather than miss a frame (a catch-up the history outran, a writer
    /// that cannot keep what it holds).
    #[cfg(feature = "sse")]
    pub(crate) fn overflow(&self) {
        self.state.overflowed.store(true, Relaxed);
    }

    /// Why a frame this client loses now is lost: its socket is full, or
    /// its writer has not reached it.
    pub(crate) fn why_lost(&self) -> DropReason {
        if self.state.stalled.load(Relaxed) {
            DropReason::SlowClient
        } else {
            DropReason::WriterBehind
        }
    }

    /// Records `n` frames this client lost for `reason` outside a push (the
    /// writer's trim, a catch-up that fell behind the history).
    pub(crate) fn count_lost(&self, reason: DropReason, n: u64) {
        if reason == DropReason::SlowClient && n > 0 && self.state.count_drops {
            self.state.slow_drops.fetch_add(n, Relaxed);
        }
    }

    /// Frames this client lost while its socket was full (0 when not counted).
    pub(crate) fn slow_drops(&self) -> u64 {
        self.state.slow_drops.load(Relaxed)
    }

    /// The writer says whether the client's socket is full.
    pub(crate) fn set_stalled(&self, stalled: bool) {
        self.state.stalled.store(stalled, Relaxed);
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
    use crate::wire::frame::{OP_TEXT, encode};

    #[test]
    fn full_queue_drops_the_oldest() {
        let q = ClientQueue::new(3, true);
        let frames: Vec<Frame> = (0..6).map(|i| encode(OP_TEXT, &[b'0' + i])).collect();
        let results: Vec<Pushed> = frames[..5].iter().map(|f| q.push(f.clone())).collect();
        assert_eq!(results[..3], [Pushed::Queued; 3]);
        // Its socket had room: the writer was behind, not the client.
        assert_eq!(results[3..], [Pushed::Dropped(DropReason::WriterBehind); 2]);
        assert_eq!(q.slow_drops(), 0);
        q.set_stalled(true);
        assert_eq!(
            q.push(frames[5].clone()),
            Pushed::Dropped(DropReason::SlowClient)
        );
        assert_eq!(q.slow_drops(), 1);
        let left: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|f| f[2]).collect();
        assert_eq!(left, b"345");
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_queue_closing_when_full_refuses_rather_than_drops() {
        let q = ClientQueue::closing_when_full(2, true);
        let frames: Vec<Frame> = (0..3).map(|i| encode(OP_TEXT, &[b'0' + i])).collect();
        assert_eq!(q.push(frames[0].clone()), Pushed::Queued);
        assert_eq!(q.push(frames[1].clone()), Pushed::Queued);
        assert!(!q.is_overflowed());
        assert_eq!(q.push(frames[2].clone()), Pushed::Overflowed);
        assert!(q.is_overflowed());
        let left: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|f| f[2]).collect();
        assert_eq!(left, b"01", "nothing it held was dropped");
        // Drained, it still takes no event: the stream ends after "1".
        assert_eq!(q.push_event(frames[2].clone()), Pushed::Overflowed);
        assert!(q.pop().is_none(), "nothing past the gap");
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
