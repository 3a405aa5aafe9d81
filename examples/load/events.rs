//! The load tool's `text/event-stream` reader: a streaming parser over the
//! body of a Server-Sent Events response, the SSE counterpart of `wire.rs`'s
//! frame [`Parser`](super::wire::Parser). Used by `client.rs`'s event loop
//! threads; no socket, no allocation.
//!
//! It keeps, per client, what a load test needs of each event and no more:
//! whether it was named `binary` (wsgate sends a binary message as
//! `event: binary` with its payload in base64) and the first
//! [`DATA_PREFIX`] bytes of its first `data:` line. Bytes arrive in any
//! chunking; lines end with `\n`, `\r\n` or `\r`; a blank line dispatches
//! the event if it had a `data:` field. Comments (`:`), `id:`, `retry:` and
//! any other field are skipped. [`binary_prefix`] decodes the base64 start
//! of a binary event's data back into the payload's first
//! [`PREFIX_LEN`](super::wire::PREFIX_LEN) bytes (its seq and timestamp).

/// Data bytes kept per event: 24 base64 characters are 18 payload bytes,
/// enough for the 16-byte seq and timestamp prefix.
pub const DATA_PREFIX: usize = 24;
/// Field name bytes kept while a line's name is read (`event` is the
/// longest one acted on).
const NAME: usize = 5;
/// Event name bytes kept (`binary`).
const EVENT_NAME: usize = 6;

/// What the current line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the field name (before any `:`).
    Name,
    /// In a `data:` value.
    Data,
    /// In an `event:` value.
    Event,
    /// A comment or a field not acted on: skipped to its end.
    Skip,
}

/// One event as far as the reader keeps it.
#[derive(Debug)]
pub struct Event<'a> {
    /// Named `binary`: its data is the payload in base64.
    pub binary: bool,
    /// The first up to [`DATA_PREFIX`] bytes of its first data line.
    pub data: &'a [u8],
}

/// Streaming `text/event-stream` parser state, one per client (under 50 bytes).
#[derive(Debug)]
pub struct EventReader {
    line: Line,
    /// The current value's leading space is still to be skipped.
    at_value_start: bool,
    /// The last byte was a `\r` (a `\n` right after it ends nothing).
    after_cr: bool,
    name_len: u8,
    name: [u8; NAME],
    /// The event so far has a `data:` field.
    has_data: bool,
    /// Data lines seen in the event so far (only the first one is kept).
    data_lines: u8,
    data_len: u8,
    data: [u8; DATA_PREFIX],
    event_len: u8,
    event: [u8; EVENT_NAME],
}

impl Default for EventReader {
    fn default() -> EventReader {
        EventReader::new()
    }
}

impl EventReader {
    /// A reader at the start of a stream.
    pub fn new() -> EventReader {
        EventReader {
            line: Line::Name,
            at_value_start: false,
            after_cr: false,
            name_len: 0,
            name: [0; NAME],
            has_data: false,
            data_lines: 0,
            data_len: 0,
            data: [0; DATA_PREFIX],
            event_len: 0,
            event: [0; EVENT_NAME],
        }
    }

    /// Parses `bytes`, the next chunk of the stream, calling `on_event` for
    /// every event it completes.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_event: impl FnMut(Event<'_>)) {
        while let Some(&first) = bytes.first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            if self.line == Line::Name {
                bytes = &bytes[1..];
                match first {
                    b'\n' | b'\r' => {
                        self.after_cr = first == b'\r';
                        // A line without a colon is a field with an empty value.
                        let field = self.field();
                        self.end_line(field, &mut on_event);
                    }
                    b':' => {
                        self.line = self.field();
                        self.at_value_start = true;
                    }
                    b => {
                        if usize::from(self.name_len) < NAME {
                            self.name[usize::from(self.name_len)] = b;
                        }
                        self.name_len = self.name_len.saturating_add(1);
                    }
                }
                continue;
            }
            let end = bytes.iter().position(|&b| b == b'\n' || b == b'\r');
            let mut value = &bytes[..end.unwrap_or(bytes.len())];
            if self.at_value_start && !value.is_empty() {
                self.at_value_start = false;
                if value[0] == b' ' {
                    value = &value[1..];
                }
            }
            match self.line {
                Line::Data if self.data_lines == 0 => {
                    keep(&mut self.data, &mut self.data_len, value);
                }
                Line::Event => keep(&mut self.event, &mut self.event_len, value),
                _ => {}
            }
            let Some(end) = end else { break };
            self.after_cr = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            let line = self.line;
            self.end_line(line, &mut on_event);
        }
    }

    /// The field named so far: for a line that is `:` or empty-named
    /// (a comment), or an unknown name, [`Line::Skip`].
    fn field(&self) -> Line {
        let len = usize::from(self.name_len);
        match self.name.get(..len) {
            Some(b"data") => Line::Data,
            Some(b"event") => Line::Event,
            _ => Line::Skip,
        }
    }

    /// Ends the current line, `line` being what it turned out to be; a
    /// blank line dispatches the event.
    fn end_line(&mut self, line: Line, on_event: &mut impl FnMut(Event<'_>)) {
        let blank = self.line == Line::Name && self.name_len == 0;
        match line {
            Line::Data => {
                self.has_data = true;
                self.data_lines = self.data_lines.saturating_add(1);
            }
            Line::Name | Line::Event | Line::Skip => {}
        }
        self.line = Line::Name;
        self.name_len = 0;
        if !blank {
            return;
        }
        if self.has_data {
            on_event(Event {
                binary: self.event[..usize::from(self.event_len)] == *b"binary",
                data: &self.data[..usize::from(self.data_len)],
            });
        }
        self.has_data = false;
        self.data_lines = 0;
        self.data_len = 0;
        self.event_len = 0;
    }
}

/// Appends as much of `value` to `buf[..*len]` as fits.
fn keep<const N: usize>(buf: &mut [u8; N], len: &mut u8, value: &[u8]) {
    let at = usize::from(*len);
    let take = value.len().min(N - at);
    buf[at..at + take].copy_from_slice(&value[..take]);
    *len += take as u8;
}

/// Decodes the standard base64 `text` (its first [`DATA_PREFIX`]
/// characters, padded or not) into `out`; the number of bytes decoded, or
/// `None` if a character is not base64.
pub fn binary_prefix(text: &[u8], out: &mut [u8; DATA_PREFIX / 4 * 3]) -> Option<usize> {
    let mut len = 0;
    for quad in text.chunks(4).take(DATA_PREFIX / 4) {
        let mut n = 0u32;
        let mut digits = 0u32;
        for &c in quad {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' => break,
                _ => return None,
            };
            n |= u32::from(v) << (18 - 6 * digits);
            digits += 1;
        }
        // 2 digits are 1 byte, 3 are 2, 4 are 3.
        for i in 0..digits.saturating_sub(1) {
            out[len] = (n >> (16 - 8 * i)) as u8;
            len += 1;
        }
        if digits < 4 {
            break;
        }
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(stream: &[u8], step: usize) -> Vec<(bool, Vec<u8>)> {
        let mut reader = EventReader::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(step) {
            reader.feed(chunk, |e| out.push((e.binary, e.data.to_vec())));
        }
        out
    }

    #[test]
    fn events_in_any_chunking() {
        let stream = b"retry: 1000\n\n: heartbeat\n\nid: 00000000000000ab\nevent: binary\n\
                       data: AAECAwQFBgcICQoLDA0ODxAREhMUFRYX\n\n\
                       id: 00000000000000ac\r\ndata: one\r\ndata: two\r\rdata:x\n\n";
        let want = vec![
            (true, b"AAECAwQFBgcICQoLDA0ODxAR".to_vec()),
            (false, b"one".to_vec()),
            (false, b"x".to_vec()),
        ];
        for step in 1..=stream.len() {
            assert_eq!(events(stream, step), want, "step {step}");
        }
    }

    #[test]
    fn only_events_with_data_dispatch() {
        assert!(events(b"id: 1\n\nevent: binary\n\n: c\n\n", 3).is_empty());
        assert_eq!(events(b"data\n\n", 1), vec![(false, Vec::new())]);
        assert_eq!(
            events(b"event: other\ndata: a\n\n", 2),
            vec![(false, b"a".to_vec())]
        );
    }

    #[test]
    fn decodes_base64_prefixes() {
        let mut out = [0u8; 18];
        let n = binary_prefix(b"AAECAwQFBgcICQoLDA0ODxAR", &mut out);
        assert_eq!(n, Some(18));
        assert_eq!(out, std::array::from_fn(|i| i as u8));
        assert_eq!(binary_prefix(b"AAEC//4=", &mut out), Some(5));
        assert_eq!(out[..5], [0, 1, 2, 0xff, 0xfe]);
        assert_eq!(binary_prefix(b"Zg==", &mut out), Some(1));
        assert_eq!(binary_prefix(b"Zm8", &mut out), Some(2));
        assert_eq!(binary_prefix(b"Z!", &mut out), None);
    }
}
