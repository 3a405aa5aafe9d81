//! Fuzzing entry points. **Not API**: this module exists only for the fuzz
//! targets in `fuzz/` and the seed replay in `tests/fuzz_corpus.rs`, and is
//! built only with the `fuzzing` feature (and for the crate's own tests); it
//! is hidden from the docs, exempt from semver, and may change at any time.
//!
//! Each function runs a crate-private parser over arbitrary bytes and panics
//! when one of the parser's invariants breaks, which a fuzzer reports as a
//! crash:
//!
//! - [`client_frames`]: the client frame decoder on raw bytes. It must not
//!   panic; the events it reports must be well formed (no message above the
//!   size limit, valid UTF-8 text, no event after a Close); and the same bytes
//!   must decode to the same events and result however they are split into
//!   reads.
//! - [`client_messages`]: valid masked frames built from the bytes (random
//!   sizes, fragments, interleaved control frames, masks and splits) decode to
//!   exactly the messages they were built from.
//! - [`upgrade_request`]: the HTTP upgrade parser. It must not panic; its
//!   answers must be well-formed HTTP responses; and once a prefix of the
//!   request gets a verdict, every longer prefix gets the same one.
//! - [`origin_response`]: the check of an origin's answer to the gateway's
//!   own upgrade request. It must not panic; once a prefix of the response
//!   gets a verdict, every longer prefix gets the same one; an acceptance
//!   ends where the response head ends.
//! - [`token`] (feature `auth`): a client token found in a request and
//!   checked: splitting, base64url decoding, JSON and the signature. It must
//!   not panic; a token found is part of what was presented; the verdict is
//!   the same every time; only a token with the pinned algorithm and an
//!   unexpired `exp` is accepted.
//!
//! The property tests in `wire/frame.rs`, `edge/upgrade.rs` and
//! `source/websocket/handshake.rs` drive the same checks from generated
//! inputs.

use crate::{
    edge::upgrade::{self, Endpoint, Parsed, Route},
    id::RouteId,
    source::{rng::Rng, websocket::check_response},
    wire::{
        close::Violation,
        frame::{Decoder, Event, MessageKind, OP_CLOSE, OP_PING, OP_PONG},
    },
};

/// The HMAC secret of the [`token`] harness's key.
#[cfg(feature = "auth")]
pub const TOKEN_SECRET: &[u8] = b"the-fuzz-harness-hmac-secret-0123456789";

/// The time [`token`] checks tokens at, in seconds since the Unix epoch.
#[cfg(feature = "auth")]
pub const TOKEN_NOW: u64 = 1_800_000_000;

/// Message size limits `client_frames` picks from with its first byte.
const MAX_MESSAGE: [usize; 8] = [0, 1, 125, 126, 1024, 65_535, 65_536, usize::MAX];

/// Request size limits `upgrade_request` picks from with its first byte.
const MAX_REQUEST: [usize; 8] = [8192, 8192, 8192, 8192, 1024, 256, 64, 0];

/// Endpoint paths `upgrade_request` picks from with its first byte.
const PATHS: [&str; 4] = ["/", "/", "/ws", "/feed/live"];

/// Browser origins allowed, which `upgrade_request` picks from with its first byte.
fn allowed_origins(knob: u8) -> Vec<String> {
    match knob & 3 {
        0 | 1 => Vec::new(),
        2 => vec!["https://example.com".to_owned()],
        _ => vec![
            "https://a.example".to_owned(),
            "http://localhost:8080/".to_owned(),
        ],
    }
}

/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// Most payload bytes `client_messages` builds from one input.
const PAYLOAD_BUDGET: usize = 70_000;

/// Decodes `data[1..]` as a client byte stream, checking the decoder's invariants.
///
/// `data[0]` picks the message size limit (low 3 bits) and seeds the ragged
/// split. The stream is decoded whole, one byte per call and in ragged
/// pieces; all three must agree.
pub fn client_frames(data: &[u8]) {
    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    let max_message = MAX_MESSAGE[usize::from(knobs & 7)];
    let whole = decode(stream, max_message, || usize::MAX);
    let bytewise = decode(stream, max_message, || 1);
    assert_same_decoding(&whole, &bytewise);
    let mut rng = Rng::new((u64::from(knobs) << 32) | stream.len() as u64);
    let ragged = decode(stream, max_message, || rng.chunk_len());
    assert_same_decoding(&whole, &ragged);
}

/// Builds valid masked client frames from `data` and checks they decode to what was built.
///
/// The bytes are read as a small script: a seed, then one opcode byte (and a
/// few argument bytes) per data message or control frame. Payloads, masks,
/// fragment boundaries and read splits come from a generator seeded by the
/// script, so short inputs still reach every length encoding.
pub fn client_messages(data: &[u8]) {
    let mut script = Script(data);
    let mut rng = Rng::new(u64::from(script.next().unwrap_or(0)) | ((data.len() as u64) << 8));
    let mut items = Vec::new();
    let mut budget = PAYLOAD_BUDGET;
    while let Some(op) = script.next() {
        let arg = script.next().unwrap_or(0);
        let item = match op >> 5 {
            0..=4 => {
                let kind = if op & 1 == 0 {
                    MessageKind::Binary
                } else {
                    MessageKind::Text
                };
                let mut len = length(arg);
                if len > budget {
                    len = (len % 128).min(budget);
                }
                budget -= len;
                let payload = rng.payload(kind, len);
                let fragments = usize::from((op >> 1) & 3) + 1;
                let mut cuts: Vec<usize> = (1..fragments).map(|_| rng.index(len + 1)).collect();
                cuts.sort_unstable();
                let mut pieces = Vec::with_capacity(fragments);
                let mut start = 0;
                for end in cuts.into_iter().chain([len]) {
                    let between = match script.next().unwrap_or(0) & 7 {
                        1 => Some(Control::Ping(
                            rng.bytes(usize::from(arg) % (MAX_CONTROL + 1)),
                        )),
                        2 => Some(Control::Pong(rng.bytes(usize::from(arg) % 4))),
                        _ => None,
                    };
                    pieces.push((payload[start..end].to_vec(), between));
                    start = end;
                }
                Item::Message {
                    kind,
                    fragments: pieces,
                }
            }
            5 => Item::Control(Control::Ping(
                rng.bytes(usize::from(arg) % (MAX_CONTROL + 1)),
            )),
            6 => Item::Control(Control::Pong(rng.bytes(usize::from(arg) % 8))),
            _ => {
                let code = CLOSE_CODES[usize::from(arg) % CLOSE_CODES.len()];
                let reason = match code {
                    Some(_) => rng.text((usize::from(op & 31) * 4).min(MAX_CONTROL - 2)),
                    None => String::new(),
                };
                items.push(Item::Control(Control::Close(code, reason)));
                break;
            }
        };
        items.push(item);
    }
    let built = build(&items, &mut || rng.mask());
    let mut stream = built.stream;
    // Whatever follows a Close is ignored, even garbage.
    stream.extend_from_slice(script.0);
    let limit = built.largest_message;
    assert_eq!(decode(&stream, limit, || usize::MAX), built.expected);
    assert_eq!(decode(&stream, limit, || rng.chunk_len()), built.expected);
    if stream.len() <= 4096 {
        assert_eq!(decode(&stream, limit, || 1), built.expected);
    }
    if limit > 0 {
        let over = decode(&stream, limit - 1, || rng.chunk_len());
        assert_eq!(over.result.map_err(|v| v.code), Err(1009), "{items:?}");
    }
}

/// Close codes (or none) `client_messages` picks from.
const CLOSE_CODES: [Option<u16>; 8] = [
    None,
    Some(1000),
    Some(1001),
    Some(1003),
    Some(1007),
    Some(1014),
    Some(3000),
    Some(4999),
];

/// Payload lengths, biased toward the length-encoding boundaries.
fn length(arg: u8) -> usize {
    const SPECIAL: [usize; 8] = [0, 1, 125, 126, 127, 65_535, 65_536, 65_537];
    match arg {
        0..=7 => SPECIAL[usize::from(arg)],
        _ => usize::from(arg),
    }
}

/// Parses `data[1..]` as an upgrade request, checking the parser's invariants.
///
/// `data[0]` picks the request size limit (low 3 bits), the endpoint path
/// (next 2 bits) and the allowed origins (next 2 bits). Prefixes of the
/// request are parsed too: verdicts must be final.
pub fn upgrade_request(data: &[u8]) {
    let Some((&knobs, request)) = data.split_first() else {
        return;
    };
    let allowed_origins = allowed_origins(knobs >> 5);
    let endpoints = [Endpoint::plain(
        RouteId(0),
        PATHS[usize::from((knobs >> 3) & 3)],
    )];
    let route = Route {
        endpoints: &endpoints,
        allowed_origins: &allowed_origins,
        max_bytes: MAX_REQUEST[usize::from(knobs & 7)],
        #[cfg(feature = "auth")]
        now: 0,
    };
    check_upgrade(request, &route);
}

/// The nonce the [`origin_response`] seeds answer (RFC 6455's example; its
/// accept key is `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`).
const ORIGIN_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Checks `data[1..]` as an origin's answer to an upgrade request with
/// `ORIGIN_KEY`, checking the check's invariants.
///
/// `data[0]` picks the subprotocols offered (low 2 bits: none, `v1`, or
/// `v1` and `v2`). Prefixes are checked at up to 64 cuts and at every byte
/// of the last 8: a prefix's verdict, once it has one, is the whole
/// response's.
pub fn origin_response(data: &[u8]) {
    let Some((&knobs, response)) = data.split_first() else {
        return;
    };
    let offered: &[String] = &[String::from("v1"), String::from("v2")];
    let offered = &offered[..usize::from(knobs & 3).min(2)];
    let whole = check_response(response, ORIGIN_KEY, offered);
    if let Ok(Some(consumed)) = whole {
        assert!(
            consumed <= response.len(),
            "{consumed} > {}",
            response.len()
        );
        assert!(
            response[..consumed].ends_with(b"\n"),
            "accepted at {consumed} of {} bytes",
            response.len()
        );
    }
    let step = (response.len() / 64).max(1);
    let tail = response.len().saturating_sub(8);
    let cuts = (0..response.len())
        .step_by(step)
        .chain(tail..response.len());
    for cut in cuts {
        let part = check_response(&response[..cut], ORIGIN_KEY, offered);
        if part != Ok(None) {
            assert_eq!(part, whole, "a prefix of {cut} of {} bytes", response.len());
        }
    }
}

/// One decoder event, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owned {
    Data {
        kind: MessageKind,
        payload: Vec<u8>,
        fin: bool,
    },
    Ping(Vec<u8>),
    Pong,
    Close {
        code: Option<u16>,
        reason: String,
    },
}

impl Owned {
    /// The owned form of `event`; none for a frame start, which says
    /// nothing a transcript compares.
    fn of(event: Event<'_>) -> Option<Owned> {
        Some(match event {
            Event::FrameStart => return None,
            Event::Data { kind, payload, fin } => Owned::Data {
                kind,
                payload: payload.to_vec(),
                fin,
            },
            Event::Ping(payload) => Owned::Ping(payload.to_vec()),
            Event::Pong => Owned::Pong,
            Event::Close { code, reason } => Owned::Close {
                code,
                reason: reason.to_owned(),
            },
        })
    }
}

/// What decoding a stream produced, in a form independent of how it was split.
///
/// Consecutive `Data` pieces of one message (with no control event between
/// them) are merged, since where a piece ends depends on where reads end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transcript {
    pub events: Vec<Owned>,
    pub result: Result<(), Violation>,
}

impl Transcript {
    /// Appends `event`, merging it into the previous piece of the same message.
    pub(crate) fn push(&mut self, event: Owned) {
        self.extend(Some(event));
    }

    /// Appends `event` if there is one (see [`Transcript::push`]).
    fn extend(&mut self, event: Option<Owned>) {
        let Some(event) = event else {
            return;
        };
        if let Owned::Data {
            kind: next_kind,
            payload: more,
            fin: next_fin,
        } = &event
        {
            if let Some(Owned::Data { kind, payload, fin }) = self.events.last_mut() {
                if !*fin && kind == next_kind {
                    payload.extend_from_slice(more);
                    *fin = *next_fin;
                    return;
                }
            }
        }
        self.events.push(event);
    }
}

/// Checks each event as the decoder reports it.
struct Checker {
    max_message: usize,
    /// The message being received: its kind and the payload so far.
    message: Option<(MessageKind, Vec<u8>)>,
    closed: bool,
    transcript: Transcript,
}

impl Checker {
    fn see(&mut self, event: Event<'_>) -> Result<(), Violation> {
        assert!(!self.closed, "event after Close: {event:?}");
        match event {
            Event::FrameStart => return Ok(()),
            Event::Data { kind, payload, fin } => {
                assert!(fin || !payload.is_empty(), "empty non-final Data piece");
                let (first_kind, bytes) = self.message.get_or_insert_with(|| (kind, Vec::new()));
                assert_eq!(*first_kind, kind, "a message changed kind");
                bytes.extend_from_slice(payload);
                assert!(
                    bytes.len() <= self.max_message,
                    "{} bytes of message delivered, limit {}",
                    bytes.len(),
                    self.max_message
                );
                if fin {
                    if kind == MessageKind::Text {
                        assert!(std::str::from_utf8(bytes).is_ok(), "invalid UTF-8 text");
                    }
                    self.message = None;
                }
            }
            Event::Ping(payload) => assert!(payload.len() <= MAX_CONTROL, "long ping"),
            Event::Pong => {}
            Event::Close { code, reason } => {
                match code {
                    None => assert!(reason.is_empty(), "close reason without a code"),
                    Some(code) => assert!(
                        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
                        "close code {code} accepted"
                    ),
                }
                assert!(2 + reason.len() <= MAX_CONTROL, "long close reason");
                self.closed = true;
            }
        }
        self.transcript.extend(Owned::of(event));
        Ok(())
    }
}

/// Decodes `stream` in pieces of `next_len()` bytes (0 is an empty read),
/// checking every event and the result; stops at the first violation.
pub(crate) fn decode(
    stream: &[u8],
    max_message: usize,
    mut next_len: impl FnMut() -> usize,
) -> Transcript {
    let mut bytes = stream.to_vec();
    let mut decoder = Decoder::new(max_message);
    let mut inflater = crate::wire::deflate::Inflater::default();
    let mut checker = Checker {
        max_message,
        message: None,
        closed: false,
        transcript: Transcript {
            events: Vec::new(),
            result: Ok(()),
        },
    };
    let mut rest = &mut bytes[..];
    loop {
        let n = next_len().min(rest.len());
        let (chunk, tail) = rest.split_at_mut(n);
        rest = tail;
        let result = decoder.decode(chunk, &mut inflater, &mut |event| checker.see(event));
        if let Err(violation) = result {
            assert!(
                matches!(violation.code, 1002 | 1007 | 1009),
                "close code {} for {:?}",
                violation.code,
                violation.reason
            );
            assert!(!violation.reason.is_empty(), "violation without a reason");
            assert!(!checker.closed, "violation after Close");
            checker.transcript.result = result;
            break;
        }
        if rest.is_empty() {
            break;
        }
    }
    checker.transcript
}

/// Asserts that `split`, decoded in pieces, matches `whole`, decoded in one read.
///
/// Identical, except after invalid UTF-8 (1007): a piece of text that arrived
/// in an earlier read than the bad byte has been delivered already, so `split`
/// may end with more of the failing message than `whole`.
pub(crate) fn assert_same_decoding(whole: &Transcript, split: &Transcript) {
    assert_eq!(whole.result, split.result, "result depends on the split");
    if whole.result.map_err(|v| v.code) != Err(1007) || whole.events == split.events {
        assert_eq!(whole.events, split.events, "events depend on the split");
        return;
    }
    let (w, s) = (&whole.events, &split.events);
    let common = w.len().min(s.len()).saturating_sub(1);
    assert_eq!(w[..common], s[..common], "events depend on the split");
    let extra_text = |piece: &Owned| {
        matches!(
            piece,
            Owned::Data {
                kind: MessageKind::Text,
                fin: false,
                ..
            }
        )
    };
    match (&w[common..], &s[common..]) {
        // `split` delivered more of the failing message.
        (
            [
                Owned::Data {
                    payload: shorter, ..
                },
            ],
            [
                longer @ Owned::Data {
                    payload: longest, ..
                },
            ],
        ) if extra_text(longer) && longest.starts_with(shorter) => {}
        // `split` delivered some of it where `whole` delivered none.
        ([last], [same, extra]) if last == same && extra_text(extra) => {}
        ([], [extra]) if extra_text(extra) => {}
        (tail_w, tail_s) => panic!("events depend on the split: {tail_w:?} vs {tail_s:?}"),
    }
}

/// A control frame for [`build`].
#[derive(Debug, Clone)]
pub(crate) enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

/// Something for [`build`] to send.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// A data message in fragments, each optionally followed by a control
    /// frame (ignored after the last fragment). The fragments of a text
    /// message may split a character; their concatenation must be UTF-8.
    Message {
        kind: MessageKind,
        fragments: Vec<(Vec<u8>, Option<Control>)>,
    },
    Control(Control),
}

/// A stream of valid client frames and what decoding it must give.
#[derive(Debug)]
pub(crate) struct Built {
    pub stream: Vec<u8>,
    pub expected: Transcript,
    /// The longest message's length: the tightest `max_message` it passes.
    pub largest_message: usize,
}

/// Masks `payload` into a client frame (header with the shortest length
/// form). Also the integration tests' frame builder.
pub fn client_frame(first: u8, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

/// Encodes `items` as masked client frames (stopping after a Close) and
/// records the transcript a decoder must produce for them.
pub(crate) fn build(items: &[Item], mask: &mut impl FnMut() -> [u8; 4]) -> Built {
    let mut stream = Vec::new();
    let mut expected = Transcript {
        events: Vec::new(),
        result: Ok(()),
    };
    let mut largest_message = 0;
    for item in items {
        match item {
            Item::Message { kind, fragments } => {
                let mut len = 0;
                for (i, (piece, between)) in fragments.iter().enumerate() {
                    let last = i + 1 == fragments.len();
                    let opcode = if i == 0 { kind.opcode() } else { 0 };
                    let fin = if last { 0x80 } else { 0 };
                    stream.extend(client_frame(fin | opcode, mask(), piece));
                    len += piece.len();
                    if last || !piece.is_empty() {
                        expected.push(Owned::Data {
                            kind: *kind,
                            payload: piece.clone(),
                            fin: last,
                        });
                    }
                    if let (false, Some(between)) = (last, between) {
                        assert!(
                            !matches!(between, Control::Close(..)),
                            "close inside a message"
                        );
                        send_control(between, mask, &mut stream, &mut expected);
                    }
                }
                largest_message = largest_message.max(len);
            }
            Item::Control(c) => {
                if send_control(c, mask, &mut stream, &mut expected) {
                    break;
                }
            }
        }
    }
    Built {
        stream,
        expected,
        largest_message,
    }
}

/// Sends one control frame for [`build`]; true if it was a Close.
fn send_control(
    control: &Control,
    mask: &mut impl FnMut() -> [u8; 4],
    stream: &mut Vec<u8>,
    expected: &mut Transcript,
) -> bool {
    let (opcode, payload, event) = match control {
        Control::Ping(p) => (OP_PING, p.clone(), Owned::Ping(p.clone())),
        Control::Pong(p) => (OP_PONG, p.clone(), Owned::Pong),
        Control::Close(code, reason) => {
            let mut p = Vec::new();
            if let Some(code) = code {
                p.extend_from_slice(&code.to_be_bytes());
                p.extend_from_slice(reason.as_bytes());
            }
            let event = Owned::Close {
                code: *code,
                reason: reason.clone(),
            };
            (OP_CLOSE, p, event)
        }
    };
    stream.extend(client_frame(0x80 | opcode, mask(), &payload));
    expected.push(event);
    matches!(control, Control::Close(..))
}

/// Parses `request` and its prefixes, checking each answer and that verdicts
/// are final: every prefix up to the first verdict (an upgrade's must come
/// with the last byte of its head, not before), every prefix for 64 bytes
/// after it, then a sample of longer ones and the whole request.
pub(crate) fn check_upgrade(request: &[u8], route: &Route<'_>) {
    let len = request.len();
    let max_bytes = route.max_bytes;
    let verdict = |cut: usize| parse_checked(&request[..cut], route);
    let Some((at, first)) = (0..=len).find_map(|cut| match verdict(cut) {
        Parsed::Incomplete => None,
        decided => Some((cut, decided)),
    }) else {
        return;
    };
    if let Parsed::Upgrade { consumed, .. } = first {
        assert_eq!(consumed, at, "upgrade before the end of the head");
    }
    let step = ((len - at) / 32).max(1);
    let later = (at + 1..=len.min(at + 64))
        .chain((at + 65..len).step_by(step))
        .chain([max_bytes, max_bytes + 1, len])
        .filter(|&cut| cut > at && cut <= len);
    for cut in later {
        assert_final(&first, at, &verdict(cut));
    }
}

/// Asserts that `later`, for a longer prefix, keeps the verdict `earlier` got at `at` bytes.
fn assert_final(earlier: &Parsed, at: usize, later: &Parsed) {
    if earlier == later {
        return;
    }
    panic!("verdict changed with more bytes: {earlier:?} at {at} bytes, then {later:?}");
}

/// Parses one buffer and checks the answer on its own.
fn parse_checked(buf: &[u8], route: &Route<'_>) -> Parsed {
    let max_bytes = route.max_bytes;
    let parsed = upgrade::parse_route(buf, route);
    match &parsed {
        Parsed::Incomplete => assert!(
            buf.len() < max_bytes,
            "incomplete at {} bytes, limit {max_bytes}",
            buf.len()
        ),
        Parsed::Upgrade {
            response,
            consumed,
            sse,
            ..
        } => {
            assert!(
                *consumed > 0 && *consumed <= buf.len(),
                "consumed {consumed}"
            );
            assert!(*consumed <= max_bytes, "consumed {consumed} > {max_bytes}");
            assert!(buf[..*consumed].ends_with(b"\n"), "head ends mid-line");
            let text = std::str::from_utf8(response).expect("ASCII response");
            if *sse {
                assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
                assert!(
                    text.contains("\r\nContent-Type: text/event-stream\r\n"),
                    "{text:?}"
                );
                assert!(text.ends_with("\n\n"), "{text:?}");
                return parsed;
            }
            assert!(text.starts_with("HTTP/1.1 101 "), "{text:?}");
            assert!(text.ends_with("\r\n\r\n"), "{text:?}");
            let (_, accept) = text
                .split_once("\r\nSec-WebSocket-Accept: ")
                .expect("an accept header");
            let accept = &accept[..accept.find("\r\n").expect("CRLF")];
            assert!(
                accept.len() == 28
                    && accept.ends_with('=')
                    && accept
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'='),
                "accept key {accept:?}"
            );
        }
        #[cfg(feature = "sse")]
        Parsed::Answer(answer) => {
            let text = std::str::from_utf8(answer).expect("ASCII answer");
            assert!(text.starts_with("HTTP/1.1 204 "), "{text:?}");
            assert!(text.ends_with("\r\n\r\n"), "{text:?}");
            assert_eq!(text.matches("\r\n\r\n").count(), 1, "one head: {text:?}");
        }
        Parsed::Reject(rejection) => {
            let status = rejection.status;
            assert!((400..=599).contains(&status), "status {status}");
            let response = rejection.response();
            let text = std::str::from_utf8(&response).expect("ASCII response");
            let body = format!("{}\n", rejection.why);
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text:?}");
            assert!(text.ends_with(&format!("\r\n\r\n{body}")), "{text:?}");
            assert!(
                text.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
                "{text:?}"
            );
        }
    }
    parsed
}

/// Reads a fuzz input a byte at a time.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }
}

/// The fuzz inputs: the crate's generator, seeded from the input, so they replay exactly.
impl Rng {
    /// A number in `0..n` (`n` > 0), as an index.
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// A read size: log-uniform in 1..=4096, sometimes 0 (an empty read).
    pub(crate) fn chunk_len(&mut self) -> usize {
        let bits = self.index(13);
        if bits == 12 {
            return 0;
        }
        1 + self.index(1 << bits)
    }

    /// A mask, sometimes all zeros.
    pub(crate) fn mask(&mut self) -> [u8; 4] {
        if self.index(8) == 0 {
            return [0; 4];
        }
        (self.next_u64() as u32).to_be_bytes()
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// Valid UTF-8 of exactly `len` bytes, mixing 1- to 4-byte characters.
    pub(crate) fn text(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            let c = match self.index(6) {
                0 => 'é',
                1 => '€',
                2 => '😀',
                3 => char::from_u32(self.index(0x11_0000) as u32).unwrap_or('\u{FFFD}'),
                _ => char::from(b' ' + self.index(95) as u8),
            };
            if s.len() + c.len_utf8() <= len {
                s.push(c);
            } else {
                s.push('x');
            }
        }
        s
    }

    /// A payload of `len` bytes for a message of `kind`.
    pub(crate) fn payload(&mut self, kind: MessageKind, len: usize) -> Vec<u8> {
        match kind {
            MessageKind::Text => self.text(len).into_bytes(),
            MessageKind::Binary => self.bytes(len),
        }
    }
}

/// Finds a token in `data[1..]` presented the way `data[0]` picks (an
/// `Authorization` header, a query, a cookie, a subprotocol list), and
/// checks it against an HS256 key for [`TOKEN_SECRET`] at [`TOKEN_NOW`],
/// checking the invariants above.
#[cfg(feature = "auth")]
pub fn token(data: &[u8]) {
    use crate::{
        config::AuthConfig,
        edge::auth::{Presented, RouteAuth, jwt::Keys},
    };
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let protocols = [text.as_ref()];
    let mut presented = Presented::default();
    match knob & 3 {
        0 => presented.authorization = Some(&text),
        1 => presented.query = &text,
        2 => presented.cookie = Some(&text),
        _ => presented.protocols = &protocols,
    }
    let settings = AuthConfig {
        jwt_leeway: std::time::Duration::from_secs(u64::from(knob >> 2)),
        ..AuthConfig::default()
    };
    let Ok(keys) = Keys::hmac(TOKEN_SECRET, &settings) else {
        panic!("the harness's key is usable");
    };
    let auth = RouteAuth::with_keys(keys, "t");
    let Some(found) = auth.token(&presented) else {
        return;
    };
    assert!(text.contains(found), "{found:?} is not part of {text:?}");
    let Some(keys) = &auth.jwt else {
        return;
    };
    let verdict = keys.verify(found, TOKEN_NOW);
    assert_eq!(
        verdict,
        keys.verify(found, TOKEN_NOW),
        "the same token, another verdict"
    );
    if let Ok(claims) = verdict {
        let alg = jsonwebtoken::decode_header(found).map(|h| h.alg);
        assert_eq!(
            alg.ok(),
            Some(jsonwebtoken::Algorithm::HS256),
            "accepted {found:?}"
        );
        assert!(
            claims.exp + keys.leeway() >= TOKEN_NOW,
            "accepted an expired token: {found:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself: it must notice a decoder that drops or alters events.
    #[test]
    fn split_comparison_catches_differences() {
        let data = |payload: &[u8], fin| Owned::Data {
            kind: MessageKind::Text,
            payload: payload.to_vec(),
            fin,
        };
        let ok = |events| Transcript {
            events,
            result: Ok(()),
        };
        let bad_utf8 = |events| Transcript {
            events,
            result: Err(Violation {
                code: 1007,
                reason: "invalid UTF-8",
            }),
        };
        let caught = |w: Transcript, s: Transcript| {
            std::panic::catch_unwind(|| assert_same_decoding(&w, &s)).is_err()
        };
        assert!(caught(
            ok(vec![data(b"ab", true)]),
            ok(vec![data(b"ab", false)])
        ));
        assert!(caught(ok(vec![Owned::Pong]), ok(vec![])));
        assert!(caught(
            bad_utf8(vec![data(b"ab", false)]),
            bad_utf8(vec![data(b"ax", false)])
        ));
        assert!(!caught(
            bad_utf8(vec![data(b"ab", false)]),
            bad_utf8(vec![data(b"abc", false)])
        ));
        assert!(!caught(
            bad_utf8(vec![Owned::Pong]),
            bad_utf8(vec![Owned::Pong, data(b"a", false)])
        ));
        assert!(caught(
            bad_utf8(vec![Owned::Pong]),
            bad_utf8(vec![data(b"a", false)])
        ));
        // Pieces merge only within a message.
        let mut t = ok(vec![]);
        t.push(data(b"a", false));
        t.push(data(b"b", true));
        t.push(data(b"c", true));
        assert_eq!(t.events, vec![data(b"ab", true), data(b"c", true)]);
    }

    #[test]
    fn built_streams_decode_to_what_was_built() {
        let items = [
            Item::Message {
                kind: MessageKind::Text,
                fragments: vec![
                    (
                        "h€".as_bytes()[..2].to_vec(),
                        Some(Control::Ping(b"p".to_vec())),
                    ),
                    ("h€".as_bytes()[2..].to_vec(), None),
                ],
            },
            Item::Control(Control::Close(Some(1000), "bye".into())),
        ];
        let built = build(&items, &mut || [1, 2, 3, 4]);
        assert_eq!(built.largest_message, 4);
        assert_eq!(built.expected.events.len(), 4);
        assert_eq!(decode(&built.stream, 4, || 3), built.expected);
        assert_eq!(
            decode(&built.stream, 3, || 3).result.map_err(|v| v.code),
            Err(1009)
        );
    }
}
