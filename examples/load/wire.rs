//! WebSocket wire format shared by the load tool's client engine and origin:
//! frame header encoding (masked client frames and unmasked server frames),
//! small fixed-size control frames, and a streaming, allocation-free frame
//! parser that keeps only the first [`TEXT_PREFIX_LEN`] payload bytes of each
//! data message (where the load tool's `seq`/`sent_unix_ns` live: binary, or
//! in base64 in a text message) and the payload
//! of control frames (at most 125 bytes), so its state is a couple of hundred
//! bytes no matter how large messages are.
//!
//! This file is included as a private submodule by both `client.rs` and
//! `origin.rs` (`#[path = "wire.rs"] mod wire;`), so each of them stays
//! self-contained; each uses only part of it.
#![allow(dead_code)]

/// Continuation frame opcode.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame opcode.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame opcode.
pub const OP_BINARY: u8 = 0x2;
/// Close frame opcode.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub const OP_PING: u8 = 0x9;
/// Pong frame opcode.
pub const OP_PONG: u8 = 0xA;

/// Bytes at the start of a load message: `seq: u64 LE` then `sent_unix_ns: u64 LE`.
pub const PREFIX_LEN: usize = 16;
/// Bytes at the start of a text load message: its [`PREFIX_LEN`] bytes in
/// padded standard base64 (what [`encode_text_prefix`] writes).
pub const TEXT_PREFIX_LEN: usize = 24;
/// Largest control frame payload allowed by RFC 6455.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest frame header: 2 bytes + 8-byte extended length + 4-byte mask.
pub const MAX_HEADER: usize = 14;

/// Writes a frame header with FIN set into `out` and returns its length.
/// With `mask` the header carries the masking key (client-to-server frames);
/// the caller must mask the payload with [`apply_mask`].
pub fn encode_header(
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
    out: &mut [u8; MAX_HEADER],
) -> usize {
    out[0] = 0x80 | (opcode & 0x0F);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    n
}

/// Writes `prefix` (seq and timestamp) as the start of a text load
/// message: standard base64 with its `==` padding, so a reader decoding
/// [`TEXT_PREFIX_LEN`] characters stops there whatever text follows.
pub fn encode_text_prefix(prefix: &[u8; PREFIX_LEN], out: &mut [u8; TEXT_PREFIX_LEN]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (chunk, quad) in prefix.chunks(3).zip(out.chunks_mut(4)) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for (i, c) in quad.iter_mut().enumerate() {
            *c = if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            };
        }
    }
}

/// XORs `data` with the masking `key`, starting at payload offset `offset`.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let start = (offset % 4) as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[(start + i) % 4];
    }
}

/// A complete control frame (or any frame with a payload of at most 125
/// bytes) in a fixed buffer, ready to write.
#[derive(Clone, Copy)]
pub struct SmallFrame {
    buf: [u8; MAX_HEADER + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl SmallFrame {
    /// Encodes a frame; `payload` is truncated to 125 bytes. With `mask` the
    /// frame is a masked client frame, without it an unmasked server frame.
    pub fn new(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> SmallFrame {
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        let mut hdr = [0u8; MAX_HEADER];
        let h = encode_header(opcode, payload.len() as u64, mask, &mut hdr);
        let mut buf = [0u8; MAX_HEADER + MAX_CONTROL_PAYLOAD];
        buf[..h].copy_from_slice(&hdr[..h]);
        buf[h..h + payload.len()].copy_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut buf[h..h + payload.len()], key, 0);
        }
        SmallFrame {
            buf,
            len: (h + payload.len()) as u8,
        }
    }

    /// A Close frame carrying `code` (no reason text).
    pub fn close(code: u16, mask: Option<[u8; 4]>) -> SmallFrame {
        SmallFrame::new(OP_CLOSE, &code.to_be_bytes(), mask)
    }

    /// The encoded frame bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// What the parser reports, in stream order.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A complete data message (all its fragments). `prefix` holds its first
    /// (up to [`TEXT_PREFIX_LEN`]) payload bytes, unmasked; `len` is its full length.
    Message {
        /// True for binary, false for text.
        binary: bool,
        /// Total payload length of the message.
        len: u64,
        /// The first `min(len, TEXT_PREFIX_LEN)` payload bytes (empty if
        /// compressed).
        prefix: &'a [u8],
        /// The compressed payload of a permessage-deflate message (RSV1),
        /// up to [`MAX_DEFLATED`] bytes; empty if not compressed.
        deflated: &'a [u8],
    },
    /// A Ping with its payload.
    Ping(&'a [u8]),
    /// A Pong with its payload.
    Pong(&'a [u8]),
    /// A Close with its payload (status code and reason, possibly empty).
    Close(&'a [u8]),
}

/// Protocol violations detected by [`Parser`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// RSV bits set although no extension was negotiated.
    ReservedBits,
    /// A frame was masked when it must not be, or the reverse.
    Masking,
    /// An unknown opcode.
    Opcode(u8),
    /// A control frame longer than 125 bytes or fragmented.
    BadControlFrame,
    /// A continuation frame outside a fragmented message.
    UnexpectedContinuation,
    /// A new data frame inside an unfinished fragmented message.
    ExpectedContinuation,
    /// A 64-bit length with the most significant bit set.
    Length,
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtocolError::ReservedBits => f.write_str("reserved bits set"),
            ProtocolError::Masking => f.write_str("wrong masking"),
            ProtocolError::Opcode(op) => write!(f, "unknown opcode {op:#x}"),
            ProtocolError::BadControlFrame => f.write_str("bad control frame"),
            ProtocolError::UnexpectedContinuation => f.write_str("unexpected continuation frame"),
            ProtocolError::ExpectedContinuation => f.write_str("expected continuation frame"),
            ProtocolError::Length => f.write_str("bad frame length"),
        }
    }
}

/// Streaming WebSocket frame parser. Feed it bytes in chunks of any size;
/// it never allocates and never buffers data payloads.
pub struct Parser {
    expect_masked: bool,
    in_payload: bool,
    hdr_len: u8,
    hdr_need: u8,
    opcode: u8,
    fin: bool,
    masked: bool,
    /// Opcode of the data message in progress (text/binary), 0 if none.
    msg_opcode: u8,
    prefix_len: u8,
    ctrl_len: u8,
    mask: [u8; 4],
    hdr: [u8; MAX_HEADER],
    prefix: [u8; TEXT_PREFIX_LEN],
    frame_len: u64,
    frame_pos: u64,
    msg_len: u64,
    ctrl: [u8; MAX_CONTROL_PAYLOAD],
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// The message in progress is compressed.
    compressed: bool,
    /// Its compressed payload (allocated on the first compressed message).
    deflated: Vec<u8>,
}

/// Most compressed payload bytes kept of a message (enough for the
/// bench's messages; a longer one is reported cut short).
pub const MAX_DEFLATED: usize = 16 * 1024;

impl Parser {
    /// A parser for frames sent by a server (`expect_masked = false`, used by
    /// clients) or by a client (`expect_masked = true`, used by servers).
    pub fn new(expect_masked: bool) -> Parser {
        Parser {
            expect_masked,
            in_payload: false,
            hdr_len: 0,
            hdr_need: 2,
            opcode: 0,
            fin: false,
            masked: false,
            msg_opcode: 0,
            prefix_len: 0,
            ctrl_len: 0,
            mask: [0; 4],
            hdr: [0; MAX_HEADER],
            prefix: [0; TEXT_PREFIX_LEN],
            frame_len: 0,
            frame_pos: 0,
            msg_len: 0,
            ctrl: [0; MAX_CONTROL_PAYLOAD],
            deflate: false,
            compressed: false,
            deflated: Vec::new(),
        }
    }

    /// The same parser for a connection that negotiated permessage-deflate.
    pub fn with_deflate(mut self, deflate: bool) -> Parser {
        self.deflate = deflate;
        self
    }

    /// Parses `buf`, calling `on_frame` for every complete message and
    /// control frame. Stops at the first protocol error.
    pub fn feed(
        &mut self,
        buf: &[u8],
        mut on_frame: impl FnMut(Frame<'_>),
    ) -> Result<(), ProtocolError> {
        let mut i = 0;
        while i < buf.len() {
            if !self.in_payload {
                let have = usize::from(self.hdr_len);
                let need = usize::from(self.hdr_need);
                let take = (need - have).min(buf.len() - i);
                self.hdr[have..have + take].copy_from_slice(&buf[i..i + take]);
                self.hdr_len += take as u8;
                i += take;
                if self.hdr_len < self.hdr_need {
                    continue;
                }
                if self.hdr_need == 2 {
                    self.hdr_need = self.check_first_two()?;
                    if self.hdr_need > 2 {
                        continue;
                    }
                }
                self.start_frame()?;
                if self.frame_len == 0 {
                    self.end_frame(&mut on_frame);
                }
            } else {
                let left = self.frame_len - self.frame_pos;
                let take = (left.min((buf.len() - i) as u64)) as usize;
                self.keep(&buf[i..i + take]);
                self.frame_pos += take as u64;
                i += take;
                if self.frame_pos == self.frame_len {
                    self.end_frame(&mut on_frame);
                }
            }
        }
        Ok(())
    }

    /// Validates the first two header bytes; returns the full header length.
    fn check_first_two(&mut self) -> Result<u8, ProtocolError> {
        let b0 = self.hdr[0];
        let b1 = self.hdr[1];
        let rsv1_ok = self.deflate && matches!(b0 & 0x0F, OP_TEXT | OP_BINARY);
        if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !rsv1_ok) {
            return Err(ProtocolError::ReservedBits);
        }
        let masked = b1 & 0x80 != 0;
        if masked != self.expect_masked {
            return Err(ProtocolError::Masking);
        }
        let opcode = b0 & 0x0F;
        let fin = b0 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len7 > MAX_CONTROL_PAYLOAD as u8 {
                    return Err(ProtocolError::BadControlFrame);
                }
            }
            OP_CONTINUATION => {
                if self.msg_opcode == 0 {
                    return Err(ProtocolError::UnexpectedContinuation);
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.msg_opcode != 0 {
                    return Err(ProtocolError::ExpectedContinuation);
                }
            }
            other => return Err(ProtocolError::Opcode(other)),
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Ok(2 + ext + if masked { 4 } else { 0 })
    }

    /// Decodes the complete header and enters the payload state.
    fn start_frame(&mut self) -> Result<(), ProtocolError> {
        let b0 = self.hdr[0];
        let b1 = self.hdr[1];
        self.opcode = b0 & 0x0F;
        self.fin = b0 & 0x80 != 0;
        self.masked = b1 & 0x80 != 0;
        let (len, mut at) = match b1 & 0x7F {
            126 => (u64::from(u16::from_be_bytes([self.hdr[2], self.hdr[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.hdr[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 {
            return Err(ProtocolError::Length);
        }
        if self.masked {
            self.mask.copy_from_slice(&self.hdr[at..at + 4]);
            at += 4;
        }
        debug_assert_eq!(at, usize::from(self.hdr_need));
        if matches!(self.opcode, OP_TEXT | OP_BINARY) {
            self.msg_opcode = self.opcode;
            self.msg_len = 0;
            self.prefix_len = 0;
            self.compressed = b0 & 0x40 != 0;
            self.deflated.clear();
        }
        self.ctrl_len = 0;
        self.frame_len = len;
        self.frame_pos = 0;
        self.in_payload = true;
        Ok(())
    }

    /// Keeps the payload bytes we care about (control payloads, data prefix).
    fn keep(&mut self, chunk: &[u8]) {
        if self.compressed && self.opcode < OP_CLOSE {
            let n = (MAX_DEFLATED - self.deflated.len()).min(chunk.len());
            let at = self.deflated.len();
            self.deflated.extend_from_slice(&chunk[..n]);
            if self.masked {
                apply_mask(&mut self.deflated[at..], self.mask, self.frame_pos);
            }
            return;
        }
        let (dst, dst_len, cap): (&mut [u8], &mut u8, usize) = if self.opcode >= OP_CLOSE {
            (&mut self.ctrl[..], &mut self.ctrl_len, MAX_CONTROL_PAYLOAD)
        } else {
            (&mut self.prefix[..], &mut self.prefix_len, TEXT_PREFIX_LEN)
        };
        let have = usize::from(*dst_len);
        let n = (cap - have).min(chunk.len());
        if n == 0 {
            return;
        }
        dst[have..have + n].copy_from_slice(&chunk[..n]);
        if self.masked {
            apply_mask(&mut dst[have..have + n], self.mask, self.frame_pos);
        }
        *dst_len += n as u8;
    }

    /// Finishes the current frame and reports it if it completes something.
    fn end_frame(&mut self, on_frame: &mut impl FnMut(Frame<'_>)) {
        self.in_payload = false;
        self.hdr_len = 0;
        self.hdr_need = 2;
        let ctrl = &self.ctrl[..usize::from(self.ctrl_len)];
        match self.opcode {
            OP_PING => on_frame(Frame::Ping(ctrl)),
            OP_PONG => on_frame(Frame::Pong(ctrl)),
            OP_CLOSE => on_frame(Frame::Close(ctrl)),
            _ => {
                self.msg_len += self.frame_len;
                if self.fin {
                    let binary = self.msg_opcode == OP_BINARY;
                    self.msg_opcode = 0;
                    on_frame(Frame::Message {
                        binary,
                        len: self.msg_len,
                        prefix: &self.prefix[..usize::from(self.prefix_len)],
                        deflated: if self.compressed { &self.deflated } else { &[] },
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(p: &mut Parser, bytes: &[u8], step: usize) -> Vec<String> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(step) {
            p.feed(chunk, |f| out.push(format!("{f:?}"))).unwrap();
        }
        out
    }

    #[test]
    fn text_prefix_is_padded_base64() {
        let prefix: [u8; PREFIX_LEN] = std::array::from_fn(|i| i as u8);
        let mut out = [0u8; TEXT_PREFIX_LEN];
        encode_text_prefix(&prefix, &mut out);
        assert_eq!(&out, b"AAECAwQFBgcICQoLDA0ODw==");
    }

    #[test]
    fn round_trip_any_chunking() {
        let mut bytes = Vec::new();
        let mut hdr = [0u8; MAX_HEADER];
        let payload: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let key = [1, 2, 3, 4];
        let n = encode_header(OP_BINARY, payload.len() as u64, Some(key), &mut hdr);
        bytes.extend_from_slice(&hdr[..n]);
        let mut masked = payload.clone();
        apply_mask(&mut masked, key, 0);
        bytes.extend_from_slice(&masked);
        bytes.extend_from_slice(SmallFrame::new(OP_PING, b"hi", Some(key)).as_bytes());
        bytes.extend_from_slice(SmallFrame::close(1000, Some(key)).as_bytes());
        let whole = collect(&mut Parser::new(true), &bytes, bytes.len());
        assert_eq!(whole.len(), 3);
        for step in [1, 3, 7, 1000] {
            assert_eq!(collect(&mut Parser::new(true), &bytes, step), whole);
        }
        assert!(whole[0].contains("len: 70000"));
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let mut bytes = Vec::new();
        let mut hdr = [0u8; MAX_HEADER];
        // Text "abc" split as "a" (no FIN), Ping, "bc" (continuation, FIN).
        let n = encode_header(OP_TEXT, 1, None, &mut hdr);
        hdr[0] &= 0x7F; // clear FIN
        bytes.extend_from_slice(&hdr[..n]);
        bytes.push(b'a');
        bytes.extend_from_slice(SmallFrame::new(OP_PING, b"p", None).as_bytes());
        let n = encode_header(OP_CONTINUATION, 2, None, &mut hdr);
        bytes.extend_from_slice(&hdr[..n]);
        bytes.extend_from_slice(b"bc");
        let got = collect(&mut Parser::new(false), &bytes, 1);
        assert_eq!(got.len(), 2);
        assert!(got[0].starts_with("Ping"));
        assert!(got[1].contains("binary: false, len: 3"));
        // A masked frame is an error for a client-side parser.
        let masked = SmallFrame::new(OP_PING, b"x", Some([9, 9, 9, 9]));
        assert_eq!(
            Parser::new(false)
                .feed(masked.as_bytes(), |_| {})
                .unwrap_err(),
            ProtocolError::Masking
        );
    }
}
