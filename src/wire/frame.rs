//! WebSocket framing on the client side: server frames out, client frames in.
//!
//! [`encode`] builds an unmasked server frame (header and payload in one shared
//! buffer, behind a thin pointer) that a lobby encodes once and every
//! member's queue shares; a
//! broadcast frame also carries, unsent, the time its lobby encoded it, so a
//! writer can time its delivery.
//! [`Decoder`] is a streaming parser of masked client frames: it unmasks in
//! place, validates RFC 6455 rules as bytes arrive, and keeps no more per
//! client than a frame header, a partial UTF-8 sequence and, while a ping or
//! close frame is arriving, its payload (125 bytes at most). For
//! a client that negotiated permessage-deflate it also takes compressed
//! messages (RSV1): their payload is held until the message is complete
//! (at most the size limit, or [`SKIM_LIMIT`] for a client whose messages
//! are dropped: a longer one is skipped unread), then inflated through its
//! writer's [`Inflater`] (`deflate.rs`), the output counted against the size
//! limit and validated as it comes out. It never panics on any input. Sockets
//! live elsewhere (`delivery/conn.rs`).

use std::{ops::Deref, sync::Arc};

use crate::wire::{
    close::{self, Violation},
    deflate::{self, Inflater},
};

/// An encoded server frame: header and payload (what it derefs to), shared
/// by every client queue, behind the microsecond its lobby encoded it (see
/// [`Frame::stamp`]), which is never sent.
///
/// One pointer wide: every client queue holds `queue_depth` slots of it,
/// idle or not, so a thin pointer (to the shared boxed bytes) saves 8 bytes
/// per slot per client, where a fat `Arc<[u8]>` would cost them. The extra
/// hop lands on a line every client's write reads, so it stays in cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Arc<Box<[u8]>>);

/// Bytes of the stamp before a frame's wire bytes.
const STAMP: usize = 4;

impl Frame {
    /// When a lobby encoded this frame, in microseconds on the gateway's
    /// clock (wrapping every 71 minutes); 0 for frames nobody times.
    pub(crate) fn stamp(&self) -> u32 {
        let mut stamp = [0u8; STAMP];
        stamp.copy_from_slice(&self.0[..STAMP]);
        u32::from_le_bytes(stamp)
    }

    /// Whether two frames share one allocation (one encoding).
    #[cfg(test)]
    pub(crate) fn ptr_eq(a: &Frame, b: &Frame) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl Deref for Frame {
    type Target = [u8];

    /// The bytes that go on the wire.
    fn deref(&self) -> &[u8] {
        &self.0[STAMP..]
    }
}

/// One message's frames as a lobby shares them: `plain` for every client,
/// and `deflated` (RSV1, compressed) for the clients that negotiated
/// permessage-deflate, when a member wanted it and it paid; with feature
/// `sse`, the event-stream form and the resume envelope, plain and
/// compressed likewise, each while a member takes it.
#[derive(Debug, Clone)]
pub(crate) struct Forms {
    /// The uncompressed frame, which any client can take.
    pub plain: Frame,
    /// The compressed frame, if there is one.
    pub deflated: Option<Frame>,
    /// The Server-Sent Events form (`sse.rs`), built while the lobby has an
    /// SSE member.
    #[cfg(feature = "sse")]
    pub sse: Option<Frame>,
    /// The resume envelope (`envelope.rs`), built while the lobby has a
    /// WebSocket member that opted in.
    #[cfg(feature = "sse")]
    pub envelope: Option<Frame>,
    /// The resume envelope compressed (RSV1), built while the lobby has a
    /// resume member that negotiated permessage-deflate, when it paid.
    #[cfg(feature = "sse")]
    pub envelope_deflated: Option<Frame>,
}

/// Of a message's uncompressed and compressed frames, the one a client
/// gets: `deflated` if it negotiated permessage-deflate (`deflate`) and
/// there is one, else `plain` ([`Forms::for_client`]).
pub(crate) fn for_client<'a>(
    plain: &'a Frame,
    deflated: Option<&'a Frame>,
    deflate: bool,
) -> &'a Frame {
    match deflated {
        Some(deflated) if deflate => deflated,
        _ => plain,
    }
}

impl Forms {
    /// A message with only its uncompressed frame.
    #[cfg(test)]
    pub(crate) fn plain(plain: Frame) -> Forms {
        Forms {
            plain,
            deflated: None,
            #[cfg(feature = "sse")]
            sse: None,
            #[cfg(feature = "sse")]
            envelope: None,
            #[cfg(feature = "sse")]
            envelope_deflated: None,
        }
    }

    /// The frame a client gets: compressed if it negotiated that (`deflate`)
    /// and there is a compressed form, else uncompressed.
    pub(crate) fn for_client(&self, deflate: bool) -> &Frame {
        for_client(&self.plain, self.deflated.as_ref(), deflate)
    }

    /// The envelope a resume client gets, if one was built: compressed if
    /// it negotiated that (`deflate`) and there is a compressed envelope,
    /// else uncompressed (RFC 7692 lets any message go out so).
    #[cfg(feature = "sse")]
    pub(crate) fn envelope_for(&self, deflate: bool) -> Option<&Frame> {
        match &self.envelope_deflated {
            Some(deflated) if deflate => Some(deflated),
            _ => self.envelope.as_ref(),
        }
    }

    /// Bytes of every form held.
    pub(crate) fn len(&self) -> usize {
        let len = self.plain.len() + self.deflated.as_ref().map_or(0, |d| d.len());
        #[cfg(feature = "sse")]
        let len = len
            + self.sse.as_ref().map_or(0, |s| s.len())
            + self.envelope.as_ref().map_or(0, |e| e.len())
            + self.envelope_deflated.as_ref().map_or(0, |e| e.len());
        len
    }
}

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Largest payload a control frame may carry (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Encodes one unmasked, final server frame.
pub(crate) fn encode(opcode: u8, payload: &[u8]) -> Frame {
    encode_stamped(opcode, payload, 0)
}

/// Encodes one unmasked, final server frame, stamped with the microsecond
/// `stamp` (see [`Frame::stamp`]).
pub(crate) fn encode_stamped(opcode: u8, payload: &[u8], stamp: u32) -> Frame {
    encode_first_byte(0x80 | opcode, payload, stamp)
}

/// Encodes one final server frame carrying a permessage-deflate compressed
/// payload (RSV1 set), stamped like [`encode_stamped`].
pub(crate) fn encode_deflated(opcode: u8, compressed: &[u8], stamp: u32) -> Frame {
    encode_first_byte(0x80 | RSV1 | opcode, compressed, stamp)
}

/// The RSV1 bit: set on the first frame of a compressed message (RFC 7692 §6).
pub(crate) const RSV1: u8 = 0x40;

/// Whether a server frame carries a compressed message.
pub(crate) fn is_deflated(frame: &Frame) -> bool {
    frame.first().is_some_and(|b| b & RSV1 != 0)
}

/// A server frame's opcode and payload.
pub(crate) fn opcode_and_payload(frame: &Frame) -> (u8, &[u8]) {
    let bytes: &[u8] = frame;
    let opcode = bytes.first().map_or(0, |b| b & 0x0F);
    let start = match bytes.get(1).map(|b| b & 0x7F) {
        Some(127) => 10,
        Some(126) => 4,
        _ => 2,
    };
    (opcode, bytes.get(start..).unwrap_or_default())
}

fn encode_first_byte(first: u8, payload: &[u8], stamp: u32) -> Frame {
    encode_parts(first, &[], payload, stamp)
}

/// Encodes one unmasked, final server frame whose payload is `prefix`
/// then `payload` (no copy of them joined first), stamped like
/// [`encode_stamped`].
#[cfg(feature = "sse")]
pub(crate) fn encode_prefixed(opcode: u8, prefix: &[u8], payload: &[u8], stamp: u32) -> Frame {
    encode_parts(0x80 | opcode, prefix, payload, stamp)
}

fn encode_parts(first: u8, prefix: &[u8], payload: &[u8], stamp: u32) -> Frame {
    let mut header = [0u8; 10];
    header[0] = first;
    let len = prefix.len() + payload.len();
    let header_len = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    stamped(stamp, [&header[..header_len], prefix, payload])
}

/// `parts` behind `stamp`, as one frame in an exactly sized buffer.
fn stamped<const N: usize>(stamp: u32, parts: [&[u8]; N]) -> Frame {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut bytes = Vec::with_capacity(STAMP + len);
    bytes.extend_from_slice(&stamp.to_le_bytes());
    for part in parts {
        bytes.extend_from_slice(part);
    }
    Frame(Arc::new(bytes.into_boxed_slice()))
}

/// Bytes that are not a WebSocket frame (an SSE event, `sse.rs`) as a
/// [`Frame`], stamped like [`encode_stamped`].
#[cfg(feature = "sse")]
pub(crate) fn raw(stamp: u32, bytes: &[u8]) -> Frame {
    stamped(stamp, [bytes, &[]])
}

/// Encodes a server close frame with `code` and a reason (cut to fit 123 bytes).
pub(crate) fn encode_close(code: u16, reason: &str) -> Frame {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload[..2 + end])
}

/// Whether a data message is text or binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// UTF-8 text (opcode 1).
    Text,
    /// Binary (opcode 2).
    Binary,
}

impl MessageKind {
    /// The opcode that starts a message of this kind.
    pub(crate) fn opcode(self) -> u8 {
        match self {
            MessageKind::Text => OP_TEXT,
            MessageKind::Binary => OP_BINARY,
        }
    }
}

/// Something the decoder found in the client's byte stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// A frame's header was read and is valid; its payload follows. Every
    /// frame, data or control, starts with one (so limits can count frames
    /// before anything in them is acted on).
    FrameStart,
    /// A piece of a data message's payload, unmasked; `fin` on the last piece.
    Data {
        kind: MessageKind,
        payload: &'a [u8],
        fin: bool,
    },
    /// A ping with its payload, to be answered with a pong carrying the same.
    Ping(&'a [u8]),
    /// A pong (nothing to do but note the client is alive).
    Pong,
    /// A valid close frame; the decoder ignores all input after it.
    Close { code: Option<u16>, reason: &'a str },
}

const fn protocol(reason: &'static str) -> Violation {
    Violation {
        code: close::PROTOCOL_ERROR,
        reason,
    }
}

const INVALID_UTF8: Violation = Violation {
    code: close::INVALID_PAYLOAD,
    reason: "invalid UTF-8",
};

/// The frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct FrameState {
    opcode: u8,
    fin: bool,
    remaining: u64,
    is_empty: bool,
    mask: [u8; 4],
    mask_pos: u8,
}

/// Streaming parser of client frames.
#[derive(Debug)]
pub(crate) struct Decoder {
    max_message: u64,
    header: [u8; 14],
    header_len: u8,
    frame: Option<FrameState>,
    message: Option<MessageKind>,
    message_len: u64,
    utf8: Utf8Validator,
    /// The buffers of a ping or close frame being read and of a compressed
    /// message; allocated only while one is (an idle client carries one
    /// null pointer).
    spill: Option<Box<Spill>>,
    closed: bool,
    /// The client negotiated permessage-deflate: RSV1 marks a compressed message.
    deflate: bool,
    /// How the message being received arrives.
    carried: Carried,
    /// Data messages are dropped unread (nothing forwards them), so a
    /// compressed one longer than [`SKIM_LIMIT`] is skipped, not buffered.
    skim: bool,
}

/// What a decoder buffers, only while it has something to buffer.
#[derive(Debug, Default)]
struct Spill {
    /// The current ping or close frame's payload (a pong's is not kept).
    control: Vec<u8>,
    /// The compressed message's payload so far (at most the size limit,
    /// or [`SKIM_LIMIT`] when skimming), released once it is inflated.
    deflated: Vec<u8>,
}

/// How a data message arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// Uncompressed: validated and handed on as it comes.
    Plain,
    /// Compressed: buffered, inflated once whole.
    Deflated,
    /// Compressed, and too long to keep for a skimming decoder: skipped.
    Skipped,
}

/// The most compressed bytes a skimming decoder keeps to inflate and
/// validate a message it will drop: a browser's small messages fit; past it
/// the message is skipped unread, so a client stalling halfway through a
/// large compressed message holds under two pages (the buffer's capacity),
/// not the size limit.
pub(crate) const SKIM_LIMIT: usize = 4096;

impl Decoder {
    /// A decoder that refuses messages above `max_message` bytes with 1009.
    pub(crate) fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message: max_message as u64,
            header: [0; 14],
            header_len: 0,
            frame: None,
            message: None,
            message_len: 0,
            utf8: Utf8Validator::default(),
            spill: None,
            closed: false,
            deflate: false,
            carried: Carried::Plain,
            skim: false,
        }
    }

    /// The same decoder, taking compressed messages if the client
    /// negotiated permessage-deflate (`deflate`).
    pub(crate) fn with_deflate(mut self, deflate: bool) -> Decoder {
        self.deflate = deflate;
        self
    }

    /// The same decoder for a client whose data messages are dropped
    /// (`skim`): compressed messages longer than [`SKIM_LIMIT`] are skipped
    /// unread instead of buffered to be inflated and validated.
    pub(crate) fn skimming(mut self, skim: bool) -> Decoder {
        self.skim = skim;
        self
    }

    /// Decodes `input` (unmasking it in place), calling `on` for each event;
    /// a complete compressed message is inflated through `inflater`.
    ///
    /// Stops at the first violation, its own or one `on` returns (a limit the
    /// caller enforces); the caller closes the client with it.
    pub(crate) fn decode(
        &mut self,
        mut input: &mut [u8],
        inflater: &mut Inflater,
        on: &mut impl FnMut(Event<'_>) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        while !input.is_empty() && !self.closed {
            let Some(frame) = self.frame.as_mut() else {
                let taken = self.read_header(input)?;
                input = &mut input[taken..];
                if self.frame.is_some() {
                    on(Event::FrameStart)?;
                }
                if self.frame.is_some_and(|f| f.remaining == 0) {
                    self.finish_frame(inflater, on)?;
                }
                continue;
            };
            let n = usize::try_from(frame.remaining).map_or(input.len(), |r| r.min(input.len()));
            let (chunk, rest) = input.split_at_mut(n);
            input = rest;
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte ^= frame.mask[(usize::from(frame.mask_pos) + i) & 3];
            }
            frame.mask_pos = ((usize::from(frame.mask_pos) + n) & 3) as u8;
            frame.remaining -= n as u64;
            let frame = *frame;
            if frame.opcode == OP_PONG {
                // Nothing in a pong is used.
            } else if frame.opcode & 0x8 != 0 {
                self.spill().control.extend_from_slice(chunk);
            } else if self.carried == Carried::Deflated {
                let skim = self.skim;
                let spill = self.spill();
                if skim && spill.deflated.len() + chunk.len() > SKIM_LIMIT {
                    spill.deflated = Vec::new();
                    self.carried = Carried::Skipped;
                    self.release_spill();
                } else {
                    // Inflated once whole (`finish_frame`).
                    spill.deflated.extend_from_slice(chunk);
                }
            } else if self.carried == Carried::Plain {
                let kind = self.message.unwrap_or(MessageKind::Binary);
                if kind == MessageKind::Text {
                    self.utf8.feed(chunk)?;
                }
                let fin = frame.fin && frame.remaining == 0;
                if fin {
                    self.utf8.finish()?;
                }
                if !chunk.is_empty() {
                    on(Event::Data {
                        kind,
                        payload: chunk,
                        fin,
                    })?;
                }
            }
            if frame.remaining == 0 {
                self.finish_frame(inflater, on)?;
            }
        }
        Ok(())
    }

    /// Takes header bytes from `input`; returns how many it took.
    fn read_header(&mut self, input: &[u8]) -> Result<usize, Violation> {
        let mut taken = 0;
        loop {
            let need = header_size(&self.header[..usize::from(self.header_len)]);
            if usize::from(self.header_len) == need {
                break;
            }
            let Some(&byte) = input.get(taken) else {
                return Ok(taken);
            };
            self.header[usize::from(self.header_len)] = byte;
            self.header_len += 1;
            taken += 1;
        }
        self.header_len = 0;
        self.start_frame()?;
        Ok(taken)
    }

    /// Validates a complete header and makes its frame current.
    fn start_frame(&mut self) -> Result<(), Violation> {
        let h = &self.header;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0F;
        // RSV1 starts a compressed message, if the client negotiated them;
        // it is never set on a continuation or a control frame (RFC 7692 §6).
        let is_compressed = h[0] & RSV1 != 0;
        let rsv1_allowed = self.deflate && matches!(opcode, OP_TEXT | OP_BINARY);
        if h[0] & 0x30 != 0 || (is_compressed && !rsv1_allowed) {
            return Err(protocol("reserved bits set"));
        }
        if h[1] & 0x80 == 0 {
            return Err(protocol("unmasked client frame"));
        }
        let (len, mask_at) = match h[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 {
            return Err(protocol("frame length out of range"));
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&h[mask_at..mask_at + 4]);
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(protocol("fragmented control frame"));
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(protocol("control frame too long"));
                }
                if let Some(spill) = self.spill.as_mut() {
                    spill.control.clear();
                }
            }
            OP_CONTINUATION => {
                if self.message.is_none() {
                    return Err(protocol("continuation outside a message"));
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    return Err(protocol("new message inside a fragmented one"));
                }
                self.message = Some(if opcode == OP_TEXT {
                    MessageKind::Text
                } else {
                    MessageKind::Binary
                });
                self.message_len = 0;
                self.carried = if is_compressed {
                    Carried::Deflated
                } else {
                    Carried::Plain
                };
            }
            _ => return Err(protocol("unknown opcode")),
        }
        if opcode & 0x8 == 0 {
            self.message_len = self.message_len.saturating_add(len);
            if self.message_len > self.max_message {
                return Err(Violation {
                    code: close::TOO_BIG,
                    reason: "message too big",
                });
            }
        }
        self.frame = Some(FrameState {
            opcode,
            fin,
            remaining: len,
            is_empty: len == 0,
            mask,
            mask_pos: 0,
        });
        Ok(())
    }

    /// Completes the current frame once its whole payload has been read.
    fn finish_frame(
        &mut self,
        inflater: &mut Inflater,
        on: &mut impl FnMut(Event<'_>) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        let Some(frame) = self.frame.take() else {
            return Ok(());
        };
        let control = self
            .spill
            .as_mut()
            .map(|s| std::mem::take(&mut s.control))
            .unwrap_or_default();
        let payload = &control[..];
        match frame.opcode {
            OP_PING => on(Event::Ping(payload))?,
            OP_PONG => on(Event::Pong)?,
            OP_CLOSE => {
                let (code, reason) = parse_close(payload)?;
                self.closed = true;
                on(Event::Close { code, reason })?;
            }
            _ => {
                if frame.fin {
                    let kind = self.message.take().unwrap_or(MessageKind::Binary);
                    match std::mem::replace(&mut self.carried, Carried::Plain) {
                        Carried::Skipped => {}
                        Carried::Deflated => self.inflate(kind, inflater, on)?,
                        Carried::Plain if frame.is_empty => {
                            self.utf8.finish()?;
                            on(Event::Data {
                                kind,
                                payload: &[],
                                fin: true,
                            })?;
                        }
                        Carried::Plain => {}
                    }
                    self.message_len = 0;
                }
            }
        }
        self.release_spill();
        Ok(())
    }

    /// The buffers, allocated on first use.
    fn spill(&mut self) -> &mut Spill {
        self.spill.get_or_insert_with(Box::default)
    }

    /// Frees the buffers once neither holds anything.
    fn release_spill(&mut self) {
        if self
            .spill
            .as_ref()
            .is_some_and(|s| s.control.is_empty() && s.deflated.is_empty())
        {
            self.spill = None;
        }
    }
}

impl Decoder {
    /// Inflates the compressed message just received, handing its output
    /// on as data events; the output counts against the size limit as it
    /// is produced, and text is validated as it comes out.
    fn inflate(
        &mut self,
        kind: MessageKind,
        inflater: &mut Inflater,
        on: &mut impl FnMut(Event<'_>) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        let mut input = self
            .spill
            .as_mut()
            .map(|s| std::mem::take(&mut s.deflated))
            .unwrap_or_default();
        deflate::restore_tail(&mut input);
        let utf8 = &mut self.utf8;
        inflater.inflate(&input, self.max_message, &mut |payload, fin| {
            if kind == MessageKind::Text {
                utf8.feed(payload)?;
                if fin {
                    utf8.finish()?;
                }
            }
            on(Event::Data { kind, payload, fin })
        })
    }
}

/// Bytes a header needs, given the bytes read so far (2, then the full size).
fn header_size(read: &[u8]) -> usize {
    match read.get(1) {
        None => 2,
        Some(b1) => {
            let ext = match b1 & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
            2 + ext + mask
        }
    }
}

/// Splits and validates a close payload into its code and reason.
fn parse_close(payload: &[u8]) -> Result<(Option<u16>, &str), Violation> {
    match payload {
        [] => Ok((None, "")),
        [_] => Err(protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| INVALID_UTF8)?;
            Ok((Some(code), reason))
        }
    }
}

/// Close codes a peer may send (RFC 6455 §7.4 and the IANA registry).
fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Validates UTF-8 across chunk boundaries, holding at most one partial sequence.
#[derive(Debug, Default)]
struct Utf8Validator {
    partial: [u8; 4],
    len: usize,
}

impl Utf8Validator {
    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Violation> {
        if self.len > 0 {
            let need = match self.partial[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (need - self.len).min(chunk.len());
            self.partial[self.len..self.len + take].copy_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            let have = self.len + take;
            match std::str::from_utf8(&self.partial[..have]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.len = have;
                    return Ok(());
                }
                Err(_) => return Err(INVALID_UTF8),
            }
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &chunk[e.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.len = tail.len();
                Ok(())
            }
            Err(_) => Err(INVALID_UTF8),
        }
    }

    fn finish(&mut self) -> Result<(), Violation> {
        let incomplete = self.len > 0;
        self.len = 0;
        if incomplete {
            Err(INVALID_UTF8)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        crate::fuzz::client_frame(first, [0x11, 0x22, 0x33, 0x44], payload)
    }

    /// Feeds `bytes` in pieces of `step`, collecting events as owned values.
    fn decode_all(bytes: &[u8], step: usize) -> (Vec<String>, Result<(), Violation>) {
        let mut dec = Decoder::new(1024);
        let mut seen = Vec::new();
        let mut buf = bytes.to_vec();
        for piece in buf.chunks_mut(step) {
            let r = dec.decode(piece, &mut Inflater::default(), &mut |e| {
                if e != Event::FrameStart {
                    seen.push(format!("{e:?}"));
                }
                Ok(())
            });
            if r.is_err() {
                return (seen, r);
            }
        }
        (seen, Ok(()))
    }

    #[test]
    fn encodes_each_length_form() {
        assert_eq!(&encode(OP_TEXT, b"hi")[..], b"\x81\x02hi");
        let f = encode(OP_BINARY, &[7; 300]);
        assert_eq!(&f[..4], &[0x82, 126, 1, 44]);
        assert_eq!(f.len(), 304);
        let f = encode(OP_BINARY, &[7; 70_000]);
        assert_eq!(&f[..2], &[0x82, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
        assert_eq!(&encode_close(1000, "bye")[..], b"\x88\x05\x03\xe8bye");
    }

    #[test]
    fn decodes_messages_split_anywhere() {
        let mut bytes = client_frame(0x81, "héllo".as_bytes());
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x88, &[0x03, 0xe8]));
        for step in 1..bytes.len() {
            let (events, r) = decode_all(&bytes, step);
            assert_eq!(r, Ok(()));
            let text: String = events
                .iter()
                .filter(|e| e.starts_with("Data"))
                .cloned()
                .collect();
            assert!(text.contains("fin: true"), "step {step}: {events:?}");
            assert!(events.iter().any(|e| e == "Ping([112])"));
            assert_eq!(
                events.last().unwrap(),
                "Close { code: Some(1000), reason: \"\" }"
            );
        }
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let mut bytes = client_frame(0x01, b"ab");
        bytes.extend(client_frame(0x89, b""));
        bytes.extend(client_frame(0x80, b"cd"));
        let (events, r) = decode_all(&bytes, bytes.len());
        assert_eq!(r, Ok(()));
        assert_eq!(events.len(), 3);
        assert!(events[2].contains("fin: true"));
    }

    #[test]
    fn rejects_protocol_violations() {
        let cases: &[(Vec<u8>, u16)] = &[
            (vec![0x81, 0x00], 1002),                  // unmasked
            (client_frame(0xC1, b"x"), 1002),          // RSV1
            (client_frame(0x83, b"x"), 1002),          // reserved opcode
            (client_frame(0x09, b"x"), 1002),          // fragmented ping
            (client_frame(0x89, &[0; 126]), 1002),     // long ping
            (client_frame(0x80, b"x"), 1002),          // stray continuation
            (client_frame(0x88, &[3]), 1002),          // 1-byte close
            (client_frame(0x88, &[0x03, 0xed]), 1002), // close 1005
            (client_frame(0x81, &[0xff]), 1007),       // bad UTF-8
            (client_frame(0x82, &[0; 1025]), 1009),    // too big
        ];
        for (bytes, code) in cases {
            let (_, r) = decode_all(bytes, 1);
            assert_eq!(r.map_err(|v| v.code), Err(*code), "{bytes:x?}");
        }
        let mut two_starts = client_frame(0x01, b"a");
        two_starts.extend(client_frame(0x01, b"b"));
        assert_eq!(decode_all(&two_starts, 3).1.map_err(|v| v.code), Err(1002));
    }

    #[test]
    fn utf8_split_across_frames_is_accepted_and_truncation_is_not() {
        let euro = "€".as_bytes();
        let mut bytes = client_frame(0x01, &euro[..1]);
        bytes.extend(client_frame(0x00, &euro[1..2]));
        bytes.extend(client_frame(0x80, &euro[2..]));
        assert_eq!(decode_all(&bytes, 1).1, Ok(()));
        let cut = client_frame(0x81, &euro[..2]);
        assert_eq!(decode_all(&cut, 1).1.map_err(|v| v.code), Err(1007));
    }

    /// A whole message as a test collects it.
    #[cfg(feature = "compression")]
    type Whole = (MessageKind, Vec<u8>);

    /// Decodes `bytes` for a client that negotiated permessage-deflate, in
    /// pieces of `step`; the messages and the result.
    #[cfg(feature = "compression")]
    fn decode_deflate(
        bytes: &[u8],
        step: usize,
        max: usize,
    ) -> (Vec<Whole>, Result<(), Violation>) {
        let mut dec = Decoder::new(max).with_deflate(true);
        let mut inflater = Inflater::default();
        let mut messages = Vec::new();
        let mut current = Vec::new();
        let mut buf = bytes.to_vec();
        for piece in buf.chunks_mut(step) {
            let r = dec.decode(piece, &mut inflater, &mut |e| {
                if let Event::Data { kind, payload, fin } = e {
                    current.extend_from_slice(payload);
                    if fin {
                        messages.push((kind, std::mem::take(&mut current)));
                    }
                }
                Ok(())
            });
            if r.is_err() {
                return (messages, r);
            }
        }
        (messages, Ok(()))
    }

    /// `payload` deflated as a permessage-deflate message.
    #[cfg(feature = "compression")]
    fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut deflater = crate::wire::deflate::Deflater::new();
        deflater.compress(payload).expect("compressible").to_vec()
    }

    #[cfg(feature = "compression")]
    #[test]
    fn compressed_messages_are_inflated_whole_or_fragmented() {
        let text = "{\"bid\":1.5,\"ask\":1.6}".repeat(40);
        let packed = deflated(text.as_bytes());
        let mut bytes = client_frame(0xC1, &packed); // FIN, RSV1, text
        let (head, tail) = packed.split_at(packed.len() / 2);
        bytes.extend(client_frame(0x41, head)); // RSV1 on the first frame only
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x80, tail));
        bytes.extend(client_frame(0x82, b"plain")); // uncompressed still fine
        for step in [1, 7, bytes.len()] {
            let (messages, r) = decode_deflate(&bytes, step, 4096);
            assert_eq!(r, Ok(()), "step {step}");
            let text = (MessageKind::Text, text.as_bytes().to_vec());
            let plain = (MessageKind::Binary, b"plain".to_vec());
            assert_eq!(messages, [text.clone(), text, plain], "step {step}");
        }
    }

    #[cfg(feature = "compression")]
    #[test]
    fn compressed_messages_break_rules_as_plain_ones_do() {
        let packed = deflated(&[b'a'; 600]);
        let mut continuation = client_frame(0x41, &packed[..3]);
        continuation.extend(client_frame(0xC0, &packed[3..]));
        let cases: &[(Vec<u8>, u16)] = &[
            (continuation, 1002),                                // RSV1 on a continuation
            (client_frame(0xC9, b""), 1002),                     // RSV1 on a ping
            (client_frame(0xA1, b"x"), 1002),                    // RSV2
            (client_frame(0xC1, &deflated(&[0xff; 300])), 1007), // not UTF-8 once inflated
            (client_frame(0xC2, &[0xff; 8]), 1007),              // not DEFLATE
            (client_frame(0xC2, &packed), 1009),                 // inflates past the limit
        ];
        for (bytes, code) in cases {
            let (_, r) = decode_deflate(bytes, 5, 512);
            assert_eq!(r.map_err(|v| v.code), Err(*code), "{bytes:x?}");
        }
        // Without the negotiation RSV1 is a protocol error, as before.
        let (_, r) = decode_all(&client_frame(0xC1, &packed), 1);
        assert_eq!(r.map_err(|v| v.code), Err(1002));
    }

    #[cfg(feature = "compression")]
    #[test]
    fn a_bomb_stops_at_the_limit_not_at_its_end() {
        // 64 MiB of zeros in about 64 KiB: refused once 1 MiB has come out.
        let packed = deflated(&vec![0; 64 << 20]);
        assert!(packed.len() < 100 << 10, "{}", packed.len());
        let mut dec = Decoder::new(1 << 20).with_deflate(true);
        let mut inflater = Inflater::default();
        let mut out = 0;
        let mut bytes = client_frame(0xC2, &packed);
        let r = dec.decode(&mut bytes, &mut inflater, &mut |e| {
            if let Event::Data { payload, .. } = e {
                out += payload.len();
            }
            Ok(())
        });
        assert_eq!(r.map_err(|v| v.code), Err(1009));
        assert!(out <= 1 << 20, "{out} bytes handed on");
    }

    #[cfg(feature = "compression")]
    #[test]
    fn a_skimming_decoder_skips_long_compressed_messages_and_checks_short_ones() {
        // Hex digits of a multiplicative hash: about half of it survives deflate.
        let noise: String = (0u32..3000)
            .map(|i| format!("{:08x}", i.wrapping_mul(2_654_435_761)))
            .collect();
        let long = deflated(noise.as_bytes());
        assert!(long.len() > 2 * SKIM_LIMIT, "{}", long.len());
        let short = "{\"bid\":1.5}".repeat(30);
        let mut bytes = client_frame(0xC1, &long);
        bytes.extend(client_frame(0xC1, &deflated(short.as_bytes())));
        bytes.extend(client_frame(0xC1, &deflated(&[0xff; 300])));
        let mut dec = Decoder::new(64 << 10).with_deflate(true).skimming(true);
        let mut inflater = Inflater::default();
        let mut texts = Vec::new();
        let mut result = Ok(());
        for piece in bytes.chunks_mut(100) {
            result = dec.decode(piece, &mut inflater, &mut |e| {
                if let Event::Data { payload, .. } = e {
                    texts.push(payload.to_vec());
                }
                Ok(())
            });
            assert!(dec.spill.as_ref().map_or(0, |s| s.deflated.capacity()) < 2 * SKIM_LIMIT);
            if result.is_err() {
                break;
            }
        }
        // The long message is skipped unread, the short one inflated, and
        // the one that is not UTF-8 once inflated still closes with 1007.
        assert_eq!(texts, [short.into_bytes()]);
        assert_eq!(result.map_err(|v| v.code), Err(1007));
    }

    #[test]
    fn input_after_close_is_ignored() {
        let mut bytes = client_frame(0x88, b"");
        bytes.extend([0xff, 0xff, 0xff]);
        let (events, r) = decode_all(&bytes, bytes.len());
        assert_eq!(r, Ok(()));
        assert_eq!(events.len(), 1);
    }
}

#[cfg(test)]
mod props {
    //! Property tests of [`Decoder`] over generated streams. The invariants
    //! are checked by `crate::fuzz`, which the fuzz targets share: no panic,
    //! well-formed events, no message above the limit, no event after Close,
    //! and the same transcript however the stream is split into reads.

    use super::*;
    use crate::fuzz::{self, Control, Item, Transcript};
    use crate::source::rng::Rng;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// Size limits at the edges of each length form, and none.
    fn max_message() -> impl Strategy<Value = usize> {
        prop_oneof![
            Just(0),
            Just(1),
            Just(125),
            Just(126),
            Just(65_536),
            Just(usize::MAX),
            0..2048usize,
        ]
    }

    /// Read sizes, cycled to split a stream; 0 is an empty read.
    fn reads() -> impl Strategy<Value = Vec<usize>> {
        vec(
            prop_oneof![3 => 1..4usize, 1 => Just(0usize), 2 => 1..600usize],
            1..12,
        )
        .prop_map(|mut reads| {
            reads.push(1); // never only empty reads
            reads
        })
    }

    fn split(reads: &[usize]) -> impl FnMut() -> usize + '_ {
        let mut i = 0;
        move || {
            i += 1;
            reads[(i - 1) % reads.len()]
        }
    }

    /// A close payload with a valid code and a UTF-8 reason.
    fn close_payload() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![
                Just(1000u16),
                Just(1003),
                Just(1014),
                Just(3000),
                Just(4999)
            ],
            "\\PC{0,20}",
        )
            .prop_map(|(code, reason)| {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                p
            })
    }

    /// One frame, mostly valid: now and then unmasked, with reserved bits,
    /// an unknown opcode, a long control payload or invalid UTF-8.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let opcode = prop_oneof![
            4 => prop_oneof![Just(OP_CONTINUATION), Just(OP_TEXT), Just(OP_BINARY)],
            3 => prop_oneof![Just(OP_CLOSE), Just(OP_PING), Just(OP_PONG)],
            1 => 0..16u8,
        ];
        let payload = prop_oneof![
            Just(Vec::new()),
            vec(any::<u8>(), 0..40),
            "\\PC{0,20}".prop_map(String::into_bytes),
            // Text cut anywhere, perhaps inside a character.
            ("\\PC{0,12}", any::<Index>())
                .prop_map(|(s, cut)| s.as_bytes()[..cut.index(s.len() + 1)].to_vec()),
            close_payload(),
            vec(any::<u8>(), 120..130),
            vec(any::<u8>(), 0..300),
        ];
        let rsv = prop_oneof![9 => Just(0u8), 1 => 1..8u8];
        let masked = prop_oneof![9 => Just(true), 1 => Just(false)];
        (
            any::<bool>(),
            rsv,
            opcode,
            masked,
            payload,
            any::<[u8; 4]>(),
        )
            .prop_map(|(fin, rsv, opcode, masked, payload, mask)| {
                let first = u8::from(fin) << 7 | rsv << 4 | opcode;
                if masked {
                    return fuzz::client_frame(first, mask, &payload);
                }
                let mut frame = fuzz::client_frame(first, [0; 4], &payload);
                frame[1] &= 0x7F;
                let mask_at = match frame[1] {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                frame.drain(mask_at..mask_at + 4);
                frame
            })
    }

    /// Message sizes, the length-form boundaries among them.
    fn size() -> impl Strategy<Value = usize> {
        prop_oneof![
            2 => prop_oneof![Just(0usize), Just(1), Just(125), Just(126), Just(127)],
            1 => prop_oneof![Just(65_535usize), Just(65_536)],
            6 => 0..300usize,
        ]
    }

    fn control() -> impl Strategy<Value = Control> {
        prop_oneof![
            vec(any::<u8>(), 0..=125).prop_map(Control::Ping),
            vec(any::<u8>(), 0..=125).prop_map(Control::Pong),
        ]
    }

    /// A data message in up to 4 fragments (which may split a character),
    /// with control frames between them.
    fn message() -> impl Strategy<Value = Item> {
        let cuts = vec((any::<Index>(), proptest::option::of(control())), 0..4);
        (any::<bool>(), size(), any::<u64>(), cuts).prop_map(|(text, len, seed, cuts)| {
            let kind = if text {
                MessageKind::Text
            } else {
                MessageKind::Binary
            };
            let payload = Rng::new(seed).payload(kind, len);
            let mut at: Vec<usize> = cuts.iter().map(|(i, _)| i.index(len + 1)).collect();
            at.sort_unstable();
            let mut fragments = Vec::new();
            let mut start = 0;
            for (end, (_, between)) in at.into_iter().zip(cuts) {
                fragments.push((payload[start..end].to_vec(), between));
                start = end;
            }
            fragments.push((payload[start..].to_vec(), None));
            Item::Message { kind, fragments }
        })
    }

    fn close() -> impl Strategy<Value = Control> {
        prop_oneof![
            Just(Control::Close(None, String::new())),
            (
                prop_oneof![Just(1000u16), Just(1001), Just(1011), Just(4000)],
                "\\PC{0,40}"
            )
                .prop_map(|(code, mut reason)| {
                    while reason.len() > 123 {
                        reason.pop();
                    }
                    Control::Close(Some(code), reason)
                }),
        ]
    }

    /// Decodes `stream` whole, a byte at a time (if short) and in `reads`,
    /// asserts all agree, and returns the whole decoding.
    fn decode_every_way(stream: &[u8], max_message: usize, reads: &[usize]) -> Transcript {
        let whole = fuzz::decode(stream, max_message, || usize::MAX);
        if stream.len() <= 4096 {
            fuzz::assert_same_decoding(&whole, &fuzz::decode(stream, max_message, || 1));
        }
        fuzz::assert_same_decoding(&whole, &fuzz::decode(stream, max_message, split(reads)));
        whole
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_decode_alike_however_split(
            stream in vec(any::<u8>(), 0..600),
            max in max_message(),
            reads in reads(),
        ) {
            decode_every_way(&stream, max, &reads);
            fuzz::client_frames(&stream);
        }

        #[test]
        fn near_valid_streams_decode_alike_however_split(
            frames in vec(frame(), 0..8),
            garbage in vec(any::<u8>(), 0..4),
            max in max_message(),
            reads in reads(),
        ) {
            let mut stream = frames.concat();
            stream.extend(garbage);
            decode_every_way(&stream, max, &reads);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn valid_frames_decode_to_the_messages_sent(
            items in vec(prop_oneof![4 => message(), 1 => control().prop_map(Item::Control)], 0..6),
            close in proptest::option::of(close()),
            mask_seed in any::<u64>(),
            trailing in vec(any::<u8>(), 0..8),
            reads in reads(),
        ) {
            let mut items = items;
            items.extend(close.map(Item::Control));
            let mut masks = Rng::new(mask_seed);
            let built = fuzz::build(&items, &mut || masks.mask());
            let mut stream = built.stream;
            let closed = matches!(items.last(), Some(Item::Control(Control::Close(..))));
            if closed {
                stream.extend(trailing); // ignored after a Close
            }
            let limit = built.largest_message;
            let decoded = decode_every_way(&stream, limit, &reads);
            prop_assert_eq!(decoded, built.expected);
            if limit > 0 {
                let over = fuzz::decode(&stream, limit - 1, split(&reads));
                prop_assert_eq!(over.result.map_err(|v| v.code), Err(close::TOO_BIG));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Text, perhaps made invalid by one edit, in fragments that may
        /// split characters (and may end with an empty one): accepted exactly
        /// when the whole message is UTF-8, refused with 1007 otherwise.
        #[test]
        fn text_is_refused_exactly_when_not_utf8(
            text in "\\PC{0,16}",
            edit in (0..4u8, any::<Index>(), any::<u8>()),
            cuts in vec(any::<Index>(), 0..4),
            empty_tail in any::<bool>(),
            mask in any::<[u8; 4]>(),
            reads in reads(),
        ) {
            let mut payload = text.into_bytes();
            let (how, at, byte) = edit;
            let i = at.index(payload.len() + 1);
            match how {
                0 => payload.truncate(i),
                1 if i < payload.len() => payload[i] = byte,
                2 => payload.insert(i, byte),
                _ => {}
            }
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
            at.sort_unstable();
            at.push(payload.len());
            let mut pieces = Vec::new();
            let mut start = 0;
            for end in at {
                pieces.push(&payload[start..end]);
                start = end;
            }
            if empty_tail {
                pieces.push(&[]);
            }
            let mut stream = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                let opcode = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
                stream.extend(fuzz::client_frame(fin | opcode, mask, piece));
            }
            let decoded = decode_every_way(&stream, usize::MAX, &reads);
            if std::str::from_utf8(&payload).is_ok() {
                prop_assert_eq!(decoded.result, Ok(()));
                let expected = fuzz::Owned::Data {
                    kind: MessageKind::Text,
                    payload: payload.clone(),
                    fin: true,
                };
                prop_assert_eq!(decoded.events, vec![expected]);
            } else {
                prop_assert_eq!(decoded.result, Err(INVALID_UTF8));
            }
        }
    }

    /// Every length boundary, for both kinds, in one frame and in fragments
    /// with a ping between them, split into odd reads.
    #[test]
    fn boundary_sizes_round_trip() {
        let mut rng = Rng::new(7);
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 65_537] {
            for kind in [MessageKind::Text, MessageKind::Binary] {
                let payload = rng.payload(kind, len);
                let whole = Item::Message {
                    kind,
                    fragments: vec![(payload.clone(), None)],
                };
                let (a, b) = payload.split_at(len / 3);
                let ping = Some(Control::Ping(b"are you there".to_vec()));
                let fragmented = Item::Message {
                    kind,
                    fragments: vec![(a.to_vec(), ping), (b.to_vec(), None)],
                };
                for item in [whole, fragmented] {
                    let built = fuzz::build(std::slice::from_ref(&item), &mut || rng.mask());
                    let decoded = fuzz::decode(&built.stream, len, || rng.chunk_len());
                    assert_eq!(decoded, built.expected, "{len} bytes of {kind:?}");
                    let payloads: Vec<u8> = decoded
                        .events
                        .iter()
                        .flat_map(|e| match e {
                            fuzz::Owned::Data { payload, .. } => payload.clone(),
                            _ => Vec::new(),
                        })
                        .collect();
                    assert_eq!(payloads, payload, "{len} bytes of {kind:?}");
                }
            }
        }
    }
}
