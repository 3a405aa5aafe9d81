//! permessage-deflate (RFC 7692): the negotiation, and compressing and
//! inflating one message at a time.
//!
//! [`negotiate`] reads a client's `Sec-WebSocket-Extensions` offers (the
//! acceptor calls it through `edge/upgrade.rs`) and answers the first it can honour,
//! always with `server_no_context_takeover` and `client_no_context_takeover`
//! (RFC 7692 §7.1.1.1 and §7.1.1.2 let a server add both to any offer it
//! accepts): every message is compressed on its own, so a lobby compresses
//! an origin message once (and its resume envelope once, while a resume
//! client negotiated) and every client that negotiated shares the bytes,
//! and a writer inflates a client message with no window kept per client.
//! [`Deflater`] is the lobby's (one per lobby, made on first use);
//! [`Inflater`] is a writer's (one per writer, its buffers made on first
//! use). Frames and their RSV1 bit live in `frame.rs`; who gets which form
//! is the lobby's business (`fanout/lobby.rs`).
//!
//! Without the `compression` feature, [`negotiate`] declines every offer, so
//! neither codec is ever asked to work.

use crate::wire::close::{self, Violation};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// The answer to an offer accepted as it is.
const ACCEPT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The answer to an offer that limits the server's window to 15 bits (ours).
const ACCEPT_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";
/// The empty stored block a sync flush ends with: taken off each compressed
/// message, put back before inflating one (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What a compressed client message that is not valid DEFLATE is closed with.
const CORRUPT: Violation = Violation {
    code: close::INVALID_PAYLOAD,
    reason: "invalid compressed data",
};
/// What a client message that inflates past the size limit is closed with.
#[cfg(feature = "compression")]
const TOO_BIG: Violation = Violation {
    code: close::TOO_BIG,
    reason: "message too big",
};

/// The `Sec-WebSocket-Extensions` value accepting the first of `offers`
/// (the request's header values, in order) this gateway can honour, or
/// `None` if it declines them all.
///
/// Per RFC 7692 §7: an offer with an unknown, repeated or malformed
/// parameter is declined; `server_max_window_bits` below 15 is declined
/// (the compressor's window is 15 bits, and one frame serves every client
/// of a lobby), 15 is accepted and echoed; `client_max_window_bits`, with or
/// without a value, is accepted and not answered (our inflater takes any
/// window, and the response may only carry it when offered).
pub(crate) fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    if !cfg!(feature = "compression") {
        return None;
    }
    offers
        .into_iter()
        .flat_map(|value| split_outside_quotes(value, ','))
        .find_map(answer)
}

/// The answer to one offer, if it is permessage-deflate and acceptable.
fn answer(offer: &str) -> Option<&'static str> {
    let mut parts = split_outside_quotes(offer, ';');
    if !parts.next()?.trim().eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = [false; 4];
    let mut window_15 = false;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (param.trim(), None),
        };
        let which = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ]
        .iter()
        .position(|known| name.eq_ignore_ascii_case(known))?;
        if std::mem::replace(&mut seen[which], true) {
            return None;
        }
        match (which, value) {
            (0 | 1, None) | (3, None) => {}
            (2, Some(bits)) => {
                if window_bits(bits)? != 15 {
                    return None;
                }
                window_15 = true;
            }
            (3, Some(bits)) => {
                window_bits(bits)?;
            }
            _ => return None,
        }
    }
    Some(if window_15 { ACCEPT_WINDOW_15 } else { ACCEPT })
}

/// A window size parameter's value: 8 to 15, no leading zero (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter value as a token or a quoted string (without escapes: a
/// valid value here is digits).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(quoted) => quoted
            .strip_suffix('"')
            .filter(|v| !v.contains(['"', '\\'])),
        None => Some(value),
    }
}

/// `text` split at each `sep` that is not inside a quoted string.
fn split_outside_quotes(text: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        for (i, c) in s.char_indices() {
            match c {
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// A lobby's compressor: each message compressed on its own (no context
/// taken over), into one reused buffer.
#[derive(Debug)]
pub(crate) struct Deflater {
    #[cfg(feature = "compression")]
    raw: flate2::Compress,
    #[cfg(feature = "compression")]
    out: Vec<u8>,
}

impl Deflater {
    /// A compressor at DEFLATE level 6 (zlib's default).
    pub(crate) fn new() -> Deflater {
        Deflater {
            #[cfg(feature = "compression")]
            raw: flate2::Compress::new(flate2::Compression::new(6), false),
            #[cfg(feature = "compression")]
            out: Vec::new(),
        }
    }

    /// `payload` compressed as a permessage-deflate message payload (its
    /// sync-flush tail taken off), or `None` if that is not smaller.
    #[cfg(feature = "compression")]
    pub(crate) fn compress(&mut self, payload: &[u8]) -> Option<&[u8]> {
        use flate2::{FlushCompress, Status};
        self.raw.reset();
        self.out.clear();
        // Room for the payload and the tail, no more: a result that fills it
        // would not be smaller.
        self.out.reserve(payload.len() + TAIL.len());
        let status = self
            .raw
            .compress_vec(payload, &mut self.out, FlushCompress::Sync)
            .ok()?;
        let finished = status == Status::Ok
            && self.raw.total_in() == payload.len() as u64
            && self.out.len() < self.out.capacity();
        if !finished || !self.out.ends_with(&TAIL) {
            return None;
        }
        self.out.truncate(self.out.len() - TAIL.len());
        (self.out.len() < payload.len()).then_some(&self.out[..])
    }

    /// Without the `compression` feature: nothing is ever compressed.
    #[cfg(not(feature = "compression"))]
    pub(crate) fn compress(&mut self, _payload: &[u8]) -> Option<&[u8]> {
        None
    }
}

/// Bytes of inflated output handed on at a time.
#[cfg(feature = "compression")]
const INFLATE_CHUNK: usize = 16 * 1024;

/// A writer's inflater for its clients' compressed messages: one message at
/// a time, from its start (clients take over no context), into one output
/// buffer. Its state and buffer are made on the first compressed message.
#[derive(Debug, Default)]
pub(crate) struct Inflater {
    #[cfg(feature = "compression")]
    state: Option<Box<(flate2::Decompress, [u8; INFLATE_CHUNK])>>,
}

impl Inflater {
    /// Inflates one message's payload (`input`, with [`TAIL`] appended by
    /// the caller), handing the output to `on` a chunk at a time (`true` with
    /// the last). Output is counted as it is produced: once more than `max`
    /// bytes come out, it stops with 1009, having produced at most `max + 1`.
    /// Data that is not DEFLATE gets 1007.
    #[cfg(feature = "compression")]
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        max: u64,
        on: &mut impl FnMut(&[u8], bool) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        use flate2::{Decompress, FlushDecompress, Status};
        let state = self
            .state
            .get_or_insert_with(|| Box::new((Decompress::new(false), [0; INFLATE_CHUNK])));
        let (raw, out) = &mut **state;
        raw.reset(false);
        let (mut at, mut total) = (0usize, 0u64);
        loop {
            let room = usize::try_from(max.saturating_sub(total).saturating_add(1))
                .map_or(out.len(), |r| r.min(out.len()));
            let (in_before, out_before) = (raw.total_in(), raw.total_out());
            let status = raw
                .decompress(&input[at..], &mut out[..room], FlushDecompress::Sync)
                .map_err(|_| CORRUPT)?;
            let consumed = (raw.total_in() - in_before) as usize;
            let produced = (raw.total_out() - out_before) as usize;
            at += consumed;
            total += produced as u64;
            if total > max {
                return Err(TOO_BIG);
            }
            let done = status == Status::StreamEnd || (at == input.len() && produced < room);
            if produced > 0 || done {
                on(&out[..produced], done)?;
            }
            if done {
                return Ok(());
            }
            if consumed == 0 && produced == 0 {
                return Err(CORRUPT);
            }
        }
    }

    /// Without the `compression` feature no client negotiates, so no
    /// compressed message is accepted to get here; refuse it all the same.
    #[cfg(not(feature = "compression"))]
    pub(crate) fn inflate(
        &mut self,
        _input: &[u8],
        _max: u64,
        _on: &mut impl FnMut(&[u8], bool) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        Err(CORRUPT)
    }
}

/// Appends the sync-flush tail a compressed message's payload lost (before
/// inflating it).
pub(crate) fn restore_tail(payload: &mut Vec<u8>) {
    payload.extend_from_slice(&TAIL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(values: &[&str]) -> Option<&'static str> {
        negotiate(values.iter().copied())
    }

    #[cfg(feature = "compression")]
    #[test]
    fn accepts_what_browsers_and_libraries_offer() {
        // Chromium and Firefox.
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits"]),
            Some(ACCEPT)
        );
        assert_eq!(offer(&["permessage-deflate"]), Some(ACCEPT));
        assert_eq!(
            offer(&[
                "Permessage-Deflate ; Client_No_Context_Takeover ; server_no_context_takeover"
            ]),
            Some(ACCEPT)
        );
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits=10"]),
            Some(ACCEPT),
            "the client's own window is its business: not answered"
        );
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits=\"12\""]),
            Some(ACCEPT)
        );
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=15"]),
            Some(ACCEPT_WINDOW_15)
        );
    }

    #[cfg(feature = "compression")]
    #[test]
    fn declines_what_it_cannot_honour_and_takes_the_next_offer() {
        // A smaller server window than ours cannot be honoured: declined.
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=10"]),
            None
        );
        // The next offer, in the same header or the next one, is taken.
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=8, permessage-deflate"]),
            Some(ACCEPT)
        );
        assert_eq!(
            offer(&[
                "x-webkit-deflate-frame",
                "permessage-deflate; server_max_window_bits=9",
                "permessage-deflate; client_max_window_bits"
            ]),
            Some(ACCEPT)
        );
    }

    #[cfg(feature = "compression")]
    #[test]
    fn declines_malformed_offers() {
        for bad in [
            "permessage-deflate; unknown_param",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate; client_max_window_bits=10; client_max_window_bits",
            "deflate-frame",
            "",
        ] {
            assert_eq!(offer(&[bad]), None, "{bad:?}");
        }
        // A comma inside a quoted value does not start a new offer.
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits=\"1,permessage-deflate\""]),
            None
        );
    }

    #[cfg(not(feature = "compression"))]
    #[test]
    fn a_build_without_compression_declines_everything() {
        assert_eq!(offer(&["permessage-deflate"]), None);
    }

    #[cfg(feature = "compression")]
    #[test]
    fn compressed_messages_inflate_to_what_was_compressed() {
        let text: Vec<u8> = (0..200)
            .flat_map(|i| format!("{{\"price\":{i}.25,\"qty\":{}}}", i * 7).into_bytes())
            .collect();
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::default();
        for _ in 0..3 {
            let mut compressed = deflater.compress(&text).expect("JSON compresses").to_vec();
            assert!(compressed.len() < text.len() / 3);
            restore_tail(&mut compressed);
            let mut out = Vec::new();
            let mut fins = 0;
            inflater
                .inflate(&compressed, text.len() as u64, &mut |chunk, fin| {
                    out.extend_from_slice(chunk);
                    fins += usize::from(fin);
                    Ok(())
                })
                .unwrap();
            assert_eq!((out == text, fins), (true, 1));
            // One byte under the limit is too big.
            let r = inflater.inflate(&compressed, text.len() as u64 - 1, &mut |_, _| Ok(()));
            assert_eq!(r.map_err(|v| v.code), Err(1009));
        }
        // Random bytes do not compress; what deflate cannot shrink is not sent so.
        let mut x = 1u32;
        let noise: Vec<u8> = (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(deflater.compress(&noise).is_none());
        let r = inflater.inflate(&[0xff; 8], 1 << 20, &mut |_, _| Ok(()));
        assert_eq!(r.map_err(|v| v.code), Err(1007));
    }
}
