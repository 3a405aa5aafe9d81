//! Server-Sent Events on the client's wire (feature `sse`): the
//! `text/event-stream` form of a message, encoded once per lobby like a
//! WebSocket frame, and the few fixed events around it.
//!
//! A message becomes one event: an `id:` line with its message ID (16
//! lowercase hex digits, [`format_id`]), one `data:` line per line of the
//! payload (a payload's `\r\n`, `\n` and `\r` all split lines, so a
//! browser's `MessageEvent.data` joins them back with `\n`), and the blank
//! line that dispatches it. A binary message is sent as a named event,
//! `event: binary`, whose data is the payload in standard base64 (RFC 4648,
//! padded): an `onmessage` handler never sees it garbled as text.
//! [`reset`] tells a resuming client its Last-Event-ID is not held (it
//! goes on from the live edge); [`heartbeat`] is a comment a writer sends
//! on an idle stream. The bytes ride in a [`Frame`] (its stamp times the
//! delivery), so a client's queue holds them like any frame. Pure
//! functions: no socket, no thread.

use crate::wire::frame::{self, Frame, OP_BINARY};

/// What a heartbeat comment looks like on the wire.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// The event a resuming client gets when its Last-Event-ID is not in its
/// lobby's history (older than it, or never seen there): it goes on live.
const RESET: &[u8] = b"event: reset\ndata: last-event-id not in history; continuing live\n\n";

/// A message ID as it goes on the wire: 16 lowercase hex digits.
pub(crate) fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

/// A message ID read back from a client (`Last-Event-ID`): exactly 16 hex
/// digits (either case); `None` for anything else.
pub(crate) fn parse_id(text: &str) -> Option<u64> {
    if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// The event for the message in WebSocket frame `plain` (as a lobby encoded
/// it), with message ID `id`, stamped like `plain`.
pub(crate) fn event(id: u64, plain: &Frame) -> Frame {
    let (opcode, payload) = frame::opcode_and_payload(plain);
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 3 + 48);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(format_id(id).as_bytes());
    out.push(b'\n');
    if opcode == OP_BINARY {
        out.extend_from_slice(b"event: binary\ndata: ");
        base64(payload, &mut out);
        out.push(b'\n');
    } else {
        for line in lines(payload) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    frame::raw(plain.stamp(), &out)
}

/// The reset event (see the module docs).
pub(crate) fn reset() -> Frame {
    frame::raw(0, RESET)
}

/// A heartbeat comment, which no event handler sees.
pub(crate) fn heartbeat() -> Frame {
    frame::raw(0, HEARTBEAT)
}

/// Whether these bytes are an event (which counts as a delivery): one
/// starts with its `id:` or `event:` line; a comment, or a WebSocket close
/// frame a lobby queued to end the stream, is not one.
pub(crate) fn is_event(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(b'i' | b'e'))
}

/// The lines of `payload`, split at `\r\n`, `\n` or `\r`; an empty payload
/// is one empty line (so it still dispatches an event).
fn lines(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(payload);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(at) => {
                let skip = if text[at..].starts_with(b"\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&text[at + skip..]);
                Some(&text[..at])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// Appends `bytes` in standard, padded base64.
fn base64(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{OP_TEXT, encode_stamped};

    fn text(frame: &Frame) -> String {
        String::from_utf8(frame.to_vec()).unwrap()
    }

    #[test]
    fn a_line_per_data_field_and_the_id_first() {
        let plain = encode_stamped(OP_TEXT, b"one\ntwo\r\nthree\rfour", 77);
        let event = event(0xabc, &plain);
        assert_eq!(
            text(&event),
            "id: 0000000000000abc\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
        );
        assert_eq!(event.stamp(), 77, "timed like its frame");
        let empty = super::event(1, &encode_stamped(OP_TEXT, b"", 0));
        assert_eq!(text(&empty), "id: 0000000000000001\ndata: \n\n");
        let trailing = super::event(1, &encode_stamped(OP_TEXT, b"a\n", 0));
        assert_eq!(text(&trailing), "id: 0000000000000001\ndata: a\ndata: \n\n");
    }

    #[test]
    fn binary_messages_are_named_events_in_base64() {
        let plain = encode_stamped(OP_BINARY, &[0, 1, 2, 0xff, 0xfe], 0);
        assert_eq!(
            text(&event(2, &plain)),
            "id: 0000000000000002\nevent: binary\ndata: AAEC//4=\n\n"
        );
        let mut out = Vec::new();
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
        ] {
            out.clear();
            base64(input, &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }

    #[test]
    fn ids_round_trip_and_anything_else_is_refused() {
        for id in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(parse_id(&format_id(id)), Some(id));
        }
        assert_eq!(parse_id("0123456789ABCDEF"), Some(0x0123_4567_89ab_cdef));
        for bad in [
            "",
            "12",
            "0123456789abcdeg",
            "0123456789abcdef0",
            "+123456789abcdef",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn comments_are_not_events() {
        assert!(!is_event(&heartbeat()));
        assert!(is_event(&reset()));
        assert!(is_event(&event(1, &encode_stamped(OP_TEXT, b"x", 0))));
    }
}
