//! A lobby's memory of its latest frames, for migrations and late joiners.
//!
//! The lobby thread appends every frame it broadcasts, with a fingerprint of
//! its bytes. A client moving between lobbies carries the fingerprints of the
//! last frames its old lobby queued for it; the new lobby finds that run in
//! its own history and continues right after it, so the client sees one
//! continuous stream even when the two origin connections are a few messages
//! apart. Matching a run of fingerprints, not one, keeps repeated payloads
//! (heartbeats) from misaligning it. A source with exact positions (a Redis
//! stream ID, a publisher's sequence number) supplies each frame's
//! fingerprint itself, so the match is exact whatever the payloads. A late joiner can be given the last few
//! frames. Bounded twice: the fingerprints of the last `capacity` frames,
//! and the frames themselves (shared with queues through `Arc`) only as far
//! as its byte budget (`history_bytes`) allows beyond the newest `keep`:
//! large messages must not make every lobby hold `capacity` of them. A message is held in
//! the forms its lobby built ([`Forms`]: uncompressed, and compressed while a
//! member wanted that), so a client replayed or caught up from the history
//! gets the form it negotiated where there is one; fingerprints are of the
//! uncompressed frame, so they match across lobbies whatever their members.
//!
//! With feature `sse`, every entry also has its message ID, the position a
//! client sees and hands back to resume (`Last-Event-ID`): a source's exact
//! position where it has one (a Redis stream ID, a publisher's sequence
//! number, each as the 64 bits migration aligns on; a Redis stream's can
//! be read back from its ID, [`History::position_of`]), and otherwise a hash of
//! the fingerprints of the message and the [`RESUME_RUN`]` - 1` before it.
//! Every lobby fed the same stream derives the same ID for a message once it
//! has seen the run before it (a lobby's first few messages hash the
//! shorter run it saw), and repeated payloads get different IDs wherever
//! what precedes them differs: the same strength as a migration's match.
//! Both kinds are salted with the route's path and query key
//! ([`id_salt`]), so one route's IDs are never found in another's history.

use std::collections::VecDeque;

use crate::{
    control::inbox::Resume,
    wire::frame::{Forms, Frame},
};

/// How many trailing fingerprints identify a position in the stream.
pub(crate) const RESUME_RUN: usize = 8;

/// One frame of the history: its fingerprint, its message ID, and the
/// frame while it is held.
#[derive(Debug)]
struct Entry {
    fp: u64,
    #[cfg(feature = "sse")]
    id: u64,
    forms: Option<Forms>,
}

/// The last frames of a lobby's stream. Frames are numbered from 0 in the
/// order the lobby broadcast them; a number is a position in the stream.
/// Only the newest `held` entries still have their frame.
#[derive(Debug)]
pub(crate) struct History {
    entries: VecDeque<Entry>,
    /// The number of `entries[0]`.
    first: u64,
    capacity: usize,
    /// Frames held whatever their size.
    keep: usize,
    /// Entries holding their frame: the newest ones.
    held: usize,
    /// Bytes of the frames held.
    bytes: usize,
    /// Bytes of frames held beyond the newest `keep`.
    budget: usize,
    /// Mixed into every message ID: the route's path and query key.
    #[cfg(feature = "sse")]
    salt: u64,
    /// The number of the first frame since the source last stopped: what
    /// came before may be followed by messages this lobby never received.
    #[cfg(feature = "sse")]
    since: u64,
}

impl History {
    /// Remembers the fingerprints of up to `capacity` frames, and the frames
    /// themselves: at least the newest `keep`, more within `budget` bytes.
    pub(crate) fn new(capacity: usize, keep: usize, budget: usize) -> History {
        History {
            entries: VecDeque::with_capacity(capacity),
            first: 0,
            capacity,
            keep,
            held: 0,
            bytes: 0,
            budget,
            #[cfg(feature = "sse")]
            salt: 0,
            #[cfg(feature = "sse")]
            since: 0,
        }
    }

    /// The source stopped (the lobby let it go, or lost it): whatever it
    /// sends from now on may not follow what the history holds, so no
    /// resume may run from before here into what comes next.
    #[cfg(feature = "sse")]
    pub(crate) fn sever(&mut self) {
        self.since = self.head();
    }

    /// The number of the first frame since the source last stopped: a
    /// client that saw a frame before it cannot resume from the history.
    #[cfg(feature = "sse")]
    pub(crate) fn since(&self) -> u64 {
        self.since
    }

    /// The same history, its message IDs salted with `salt` ([`id_salt`]).
    #[cfg(feature = "sse")]
    pub(crate) fn salted(mut self, salt: u64) -> History {
        self.salt = salt;
        self
    }

    /// Appends a frame, fingerprinted by its `position` in the source's
    /// stream if it has one and by its bytes if not, forgetting the oldest
    /// beyond capacity and releasing the oldest frames beyond the byte budget.
    #[cfg(test)]
    pub(crate) fn push(&mut self, frame: Forms, position: Option<u64>) {
        let mark = self.mark(&frame.plain, position);
        self.push_marked(frame, mark);
    }

    /// The fingerprint and message ID the next frame, `plain` at `position`
    /// (see [`History::push`]), will have: what [`History::push_marked`] takes.
    pub(crate) fn mark(&self, plain: &Frame, position: Option<u64>) -> Mark {
        let fp = position.unwrap_or_else(|| fingerprint(plain));
        Mark {
            fp,
            #[cfg(feature = "sse")]
            id: position.map_or_else(|| self.run_id(fp), |p| mix(p ^ self.salt)),
        }
    }

    /// Appends a frame marked by [`History::mark`], forgetting the oldest
    /// beyond capacity and releasing the oldest frames beyond the byte budget.
    pub(crate) fn push_marked(&mut self, frame: Forms, mark: Mark) {
        if self.entries.len() == self.capacity {
            if let Some(Entry {
                forms: Some(gone), ..
            }) = self.entries.pop_front()
            {
                self.held -= 1;
                self.bytes -= gone.len();
            }
            self.first += 1;
        }
        self.held += 1;
        self.bytes += frame.len();
        self.entries.push_back(Entry {
            fp: mark.fp,
            #[cfg(feature = "sse")]
            id: mark.id,
            forms: Some(frame),
        });
        while self.held > self.keep && self.bytes > self.budget {
            let oldest = self.entries.len() - self.held;
            if let Some(gone) = self.entries[oldest].forms.take() {
                self.bytes -= gone.len();
            }
            self.held -= 1;
        }
    }

    /// The ID of a frame fingerprinted `fp` coming next: a hash of the
    /// fingerprints of the last [`RESUME_RUN`]` - 1` frames and `fp`.
    #[cfg(feature = "sse")]
    fn run_id(&self, fp: u64) -> u64 {
        let start = self.entries.len().saturating_sub(RESUME_RUN - 1);
        self.entries
            .range(start..)
            .map(|e| e.fp)
            .chain([fp])
            .fold(self.salt ^ 0x243F_6A88_85A3_08D3, |h, fp| mix(h ^ fp))
    }

    /// The number of the frame whose message ID is `id`, the newest if
    /// several are; `None` if no frame remembered has it.
    #[cfg(feature = "sse")]
    pub(crate) fn find_id(&self, id: u64) -> Option<u64> {
        let index = self.entries.iter().rposition(|e| e.id == id)?;
        Some(self.first + index as u64)
    }

    /// The number of the first frame from number `from` on whose message
    /// ID is `id`; `None` if none since has it.
    #[cfg(feature = "sse")]
    pub(crate) fn find_id_from(&self, id: u64, from: u64) -> Option<u64> {
        let skip = usize::try_from(from.saturating_sub(self.first)).unwrap_or(usize::MAX);
        let index = self.entries.iter().skip(skip).position(|e| e.id == id)?;
        Some(self.first + (skip + index) as u64)
    }

    /// The number of the frame at source `position` (a Redis stream
    /// entry's), the newest if several are; `None` if no frame remembered
    /// has it: where a client read again from the source up to
    /// `position` goes on from the history instead.
    #[cfg(feature = "sse")]
    pub(crate) fn find_position(&self, position: u64) -> Option<u64> {
        self.find_id(mix(position ^ self.salt))
    }

    /// The source position a message ID was made from, if it was made
    /// from one (for a Redis stream, where the lobby can read the entries
    /// after it again). Any ID gives some position: one that is not a
    /// position's gives one the source does not hold.
    #[cfg(feature = "sse")]
    pub(crate) fn position_of(&self, id: u64) -> u64 {
        unmix(id) ^ self.salt
    }

    /// Frame number `at` with its message ID, if the frame is still held.
    #[cfg(feature = "sse")]
    pub(crate) fn get_with_id(&self, at: u64) -> Option<(&Forms, u64)> {
        let index = usize::try_from(at.checked_sub(self.first)?).ok()?;
        let entry = self.entries.get(index)?;
        Some((entry.forms.as_ref()?, entry.id))
    }

    /// The number the next frame will get: the live edge.
    pub(crate) fn head(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// The number of the oldest frame still held.
    pub(crate) fn oldest(&self) -> u64 {
        self.head() - self.held as u64
    }

    /// Frames held, and their bytes: how far back a client can be served.
    pub(crate) fn held(&self) -> (usize, usize) {
        (self.held, self.bytes)
    }

    /// Frame number `at`, if still held.
    pub(crate) fn get(&self, at: u64) -> Option<&Forms> {
        let index = usize::try_from(at.checked_sub(self.first)?).ok()?;
        self.entries.get(index)?.forms.as_ref()
    }

    /// The position just before frame `at` (a client that has had every
    /// frame before `at`), as fingerprints to find it in another lobby.
    pub(crate) fn resume_before(&self, at: u64) -> Resume {
        let end = usize::try_from(at.saturating_sub(self.first))
            .map_or(self.entries.len(), |e| e.min(self.entries.len()));
        let start = end.saturating_sub(RESUME_RUN);
        self.entries.range(start..end).map(|e| e.fp).collect()
    }

    /// Whether the newest frames are exactly the run `resume` ends with (the
    /// lobby has just reached the point a migrating client is at).
    pub(crate) fn ends_with(&self, resume: &[u64]) -> bool {
        let n = resume.len().min(self.entries.len());
        n > 0
            && self
                .entries
                .iter()
                .rev()
                .zip(resume.iter().rev())
                .take(n)
                .all(|(e, want)| e.fp == *want)
    }

    /// The number of the frame after the newest occurrence of the run
    /// `resume`; `None` if the run is not in the history. Only a history
    /// younger than the run (it has seen fewer frames than the run holds)
    /// may match it partly: its whole stream then ends the run. Anything
    /// else needs the whole run, so a frame that recurs (a heartbeat) at the
    /// start of a history cannot pass for the run.
    pub(crate) fn find_after(&self, resume: &[u64]) -> Option<u64> {
        let len = self.entries.len();
        if resume.is_empty() || len == 0 {
            return None;
        }
        // The run would end at entries[end - 1].
        (1..=len).rev().find_map(|end| {
            let n = resume.len().min(end);
            let is_younger = self.first == 0 && len < resume.len();
            let is_whole_run = n == resume.len() || end == n && is_younger;
            let matches =
                (0..n).all(|i| self.entries[end - 1 - i].fp == resume[resume.len() - 1 - i]);
            (is_whole_run && matches).then_some(self.first + end as u64)
        })
    }
}

/// The fingerprint and message ID of a frame about to join a history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    fp: u64,
    /// Its message ID (see the module docs).
    #[cfg(feature = "sse")]
    pub id: u64,
}

/// The salt of message IDs on the route at `path`, for the lobbies of
/// query key `key`: the same on every instance serving that route, and
/// different between routes and keys, so an ID from another route's
/// stream is never taken for one of this route's, whatever the payloads.
#[cfg(feature = "sse")]
pub(crate) fn id_salt(path: &str, key: Option<&str>) -> u64 {
    let text = format!("{path}?{}", key.unwrap_or_default());
    fingerprint(text.as_bytes())
}

/// Mixes 64 bits (splitmix64's finaliser).
#[cfg(feature = "sse")]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Undoes [`mix`]: each of its steps is a bijection.
#[cfg(feature = "sse")]
fn unmix(mut z: u64) -> u64 {
    z = unshift(z, 31).wrapping_mul(0x3196_42B2_D24D_8EC3);
    z = unshift(z, 27).wrapping_mul(0x96DE_1B17_3F11_9089);
    unshift(z, 30)
}

/// Undoes `z ^ (z >> shift)`.
#[cfg(feature = "sse")]
fn unshift(z: u64, shift: u32) -> u64 {
    let mut x = z;
    for _ in 0..64 / shift {
        x = z ^ (x >> shift);
    }
    x
}

/// A 64-bit fingerprint of a frame's bytes (header included, so opcodes differ).
/// Word-at-a-time multiply-rotate: fast on large frames, collisions are
/// negligible once a run of them must match.
fn fingerprint(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(last)).wrapping_mul(K);
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default byte budget (`Config::history_bytes`).
    const BUDGET: usize = 1 << 20;
    use crate::wire::frame::{OP_TEXT, encode};

    fn frame(text: &str) -> Forms {
        Forms::plain(encode(OP_TEXT, text.as_bytes()))
    }

    fn history(texts: &[&str]) -> History {
        let mut h = History::new(32, 32, BUDGET);
        for t in texts {
            h.push(frame(t), None);
        }
        h
    }

    fn resume(h: &History) -> Resume {
        h.resume_before(h.head())
    }

    /// The texts from number `from` to the head.
    fn from(h: &History, from: u64) -> Vec<String> {
        (from..h.head())
            .map(|at| String::from_utf8_lossy(&h.get(at).unwrap().plain[2..]).into_owned())
            .collect()
    }

    #[test]
    fn a_lobby_ahead_resumes_right_after_the_run() {
        let behind = history(&["1", "2", "3"]);
        let ahead = history(&["1", "2", "3", "4", "5"]);
        let at = ahead.find_after(&resume(&behind)).expect("found");
        assert_eq!(from(&ahead, at), ["4", "5"]);
    }

    #[test]
    fn a_lobby_behind_has_not_reached_the_run_yet() {
        let ahead = history(&["1", "2", "3", "4"]);
        let mut behind = history(&["1", "2"]);
        let run = resume(&ahead);
        assert!(behind.find_after(&run).is_none());
        behind.push(frame("3"), None);
        assert!(!behind.ends_with(&run));
        behind.push(frame("4"), None);
        assert!(behind.ends_with(&run));
    }

    #[test]
    fn repeated_heartbeats_do_not_misalign() {
        let hb = "{\"hb\":1}";
        let source = history(&["1", hb, hb, "2", hb, "3", hb, hb]);
        let target = history(&["1", hb, hb, "2", hb, "3", hb, hb, "4", hb, hb]);
        let at = target.find_after(&resume(&source)).expect("found");
        assert_eq!(from(&target, at), ["4", hb, hb]);
        // One heartbeat alone would have matched the last one.
        let one = vec![*resume(&source).last().unwrap()];
        assert_eq!(target.find_after(&one), Some(target.head()));
    }

    #[test]
    fn unknown_streams_do_not_match() {
        let a = history(&["a", "b", "c"]);
        let b = history(&["x", "y", "z"]);
        assert!(b.find_after(&resume(&a)).is_none());
        assert!(b.find_after(&[]).is_none());
    }

    #[test]
    fn a_young_source_resumes_on_all_it_saw() {
        let source = history(&["5", "6"]);
        let target = history(&["1", "2", "3", "4", "5", "6", "7"]);
        let at = target.find_after(&resume(&source)).unwrap();
        assert_eq!(from(&target, at), ["7"]);
    }

    #[test]
    fn a_young_target_matches_the_part_of_the_run_it_saw() {
        let source = history(&["1", "2", "3", "4", "5", "6", "7", "8"]);
        let target = history(&["6", "7", "8", "9"]);
        let at = target.find_after(&resume(&source)).unwrap();
        assert_eq!(from(&target, at), ["9"]);
        // One that forgot its start is not young, whatever it holds now.
        let mut old = History::new(4, 4, BUDGET);
        for t in ["5", "6", "7", "8", "9"] {
            old.push(frame(t), None);
        }
        assert!(old.find_after(&resume(&source)).is_none());
    }

    #[test]
    fn a_run_needs_matching_whole_unless_the_target_is_younger_than_it() {
        let hb = "{\"hb\":1}";
        let source = history(&["1", "2", "3", "4", "5", "6", "7", hb]);
        // A target whose stream starts with the run's last frame, but which
        // is older than the run and never saw the rest of it.
        let target = history(&[hb, "x", "y", "z", "w", "v", "u", "t", "s", "r"]);
        assert!(target.find_after(&resume(&source)).is_none());
        // Younger than the run, the same start is where the run ends.
        let young = history(&[hb, "8"]);
        assert_eq!(young.find_after(&resume(&source)), Some(1));
    }

    #[test]
    fn positions_survive_eviction_and_resume_before_any_point() {
        let mut h = History::new(3, 3, BUDGET);
        for t in ["1", "2", "3", "4", "5"] {
            h.push(frame(t), None);
        }
        assert_eq!((h.oldest(), h.head()), (2, 5));
        assert!(h.get(1).is_none());
        assert_eq!(from(&h, 2), ["3", "4", "5"]);
        // A client that has had frames up to "4" resumes after "4" elsewhere.
        let other = history(&["3", "4", "5", "6"]);
        let at = other.find_after(&h.resume_before(4)).unwrap();
        assert_eq!(from(&other, at), ["5", "6"]);
    }

    #[test]
    fn large_frames_are_held_only_within_the_budget() {
        let big = |n: u8| Forms::plain(encode(OP_TEXT, &vec![b'0' + n; BUDGET / 4]));
        let mut h = History::new(64, 2, BUDGET);
        for n in 0..8 {
            h.push(big(n), None);
        }
        // Four quarter-budget frames (plus headers) exceed it: three are held.
        assert_eq!((h.oldest(), h.head()), (5, 8));
        assert!(h.get(4).is_none());
        assert_eq!(h.get(5).map(|f| f.plain[10]), Some(b'5'));
        // Positions are still known: a run ending at an evicted frame is found.
        let mut source = History::new(64, 64, BUDGET);
        for n in 0..5 {
            source.push(big(n), None);
        }
        assert_eq!(h.find_after(&resume(&source)), Some(5));
        // Never fewer than `keep`, whatever their size.
        let mut tight = History::new(64, 2, BUDGET);
        for n in 0..4 {
            tight.push(Forms::plain(encode(OP_TEXT, &vec![n; BUDGET])), None);
        }
        assert_eq!(tight.head() - tight.oldest(), 2);
    }

    #[test]
    fn exact_positions_align_whatever_the_payloads() {
        let hb = frame("{\"hb\":1}");
        let mut a = History::new(32, 32, BUDGET);
        let mut b = History::new(32, 32, BUDGET);
        // Identical payloads everywhere: only the positions tell them apart.
        for at in 0..10 {
            a.push(hb.clone(), Some(at));
        }
        for at in 1..14 {
            b.push(hb.clone(), Some(at));
        }
        let at = b.find_after(&resume(&a)).expect("found");
        // b starts at position 1: its frame number 9 is position 10.
        assert_eq!(at, 9, "right after position 9");
        // Another stream's positions never match.
        let mut c = History::new(32, 32, BUDGET);
        for at in 100..120 {
            c.push(hb.clone(), Some(at));
        }
        assert!(c.find_after(&resume(&a)).is_none());
    }

    #[cfg(feature = "sse")]
    #[test]
    fn ids_agree_across_lobbies_once_they_saw_the_run_and_tell_repeats_apart() {
        let hb = "{\"hb\":1}";
        let stream: Vec<String> = (0..30)
            .map(|n| {
                if n % 3 == 0 {
                    n.to_string()
                } else {
                    hb.to_owned()
                }
            })
            .collect();
        let texts: Vec<&str> = stream.iter().map(String::as_str).collect();
        let old = history(&texts);
        let young = history(&texts[10..]);
        let id = |h: &History, at: u64| h.get_with_id(at).unwrap().1;
        // From its RESUME_RUN-th frame on, the young lobby's IDs are the old one's.
        for at in (10 + RESUME_RUN as u64 - 1)..30 {
            assert_eq!(id(&old, at), id(&young, at - 10), "frame {at}");
        }
        assert_eq!(old.find_id(id(&old, 25)), Some(25));
        assert_eq!(young.find_id(id(&old, 25)), Some(15));
        // Heartbeats in a row still have IDs of their own.
        assert_ne!(id(&old, 25), id(&old, 26));
        assert_eq!(old.find_id(0x1234), None);
        // Exact positions make the IDs.
        let mut exact = History::new(8, 8, BUDGET);
        exact.push(frame(hb), Some(42));
        let id = exact.get_with_id(0).unwrap().1;
        assert_eq!(exact.find_id(id), Some(0));
        // Another route's (or key's) lobby gives the same stream other IDs.
        let salted = |path, key| {
            let mut h = History::new(8, 8, BUDGET).salted(id_salt(path, key));
            h.push(frame(hb), Some(42));
            h.get_with_id(0).unwrap().1
        };
        assert_eq!(salted("/a", None), salted("/a", None));
        assert_ne!(salted("/a", None), salted("/b", None));
        assert_ne!(salted("/a", Some("s=1")), salted("/a", Some("s=2")));
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_position_is_read_back_from_its_id_with_the_same_salt_only() {
        let salt = id_salt("/prices", None);
        let mut h = History::new(8, 8, BUDGET).salted(salt);
        for position in [0, 1, 7_404_523_520_000 << 20 | 3, u64::MAX] {
            h.push(frame("x"), Some(position));
            let id = h.get_with_id(h.head() - 1).unwrap().1;
            assert_eq!(h.position_of(id), position);
            let other = History::new(8, 8, BUDGET).salted(id_salt("/other", None));
            assert_ne!(other.position_of(id), position);
        }
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_frame_is_found_by_its_source_position_while_remembered() {
        let mut h = History::new(4, 4, BUDGET).salted(id_salt("/prices", None));
        h.push(frame("a"), None);
        for position in [10, 20, 30] {
            h.push(frame("x"), Some(position));
        }
        assert_eq!(h.find_position(20), Some(2));
        assert_eq!(h.find_position(25), None, "no frame at 25");
        // A frame without a position is not found by any.
        let fp = fingerprint(&h.get(0).unwrap().plain);
        assert_eq!(h.find_position(fp), None);
        h.push(frame("x"), Some(40));
        h.push(frame("x"), Some(50));
        assert_eq!(h.find_position(10), None, "forgotten");
        assert_eq!(h.find_position(50), Some(5));
    }

    #[test]
    fn fingerprints_depend_on_every_byte() {
        let base = vec![7u8; 100];
        let fp = fingerprint(&base);
        for i in [0, 7, 8, 63, 99] {
            let mut changed = base.clone();
            changed[i] ^= 1;
            assert_ne!(fingerprint(&changed), fp, "byte {i}");
        }
        assert_ne!(fingerprint(&base[..99]), fp);
    }
}
