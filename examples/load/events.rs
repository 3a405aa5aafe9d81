//! The load tool's `text/event-stream` reader: a streaming parser over the
//! body of a Server-Sent Events response, the SSE counterpart of `wire.rs`'s
//! frame [`Parser`](super::wire::Parser). Used by `client.rs`'s event loop
//! threads; no socket, no allocation.
//!
//! It keeps, per client, what a load test needs of each event and no more:
//! whether it was named `reset` (wsgate's answer to a `Last-Event-ID` it
//! cannot serve), and the first [`DATA_PREFIX`] bytes of its first `data:`
//! line: base64 either way, whether wsgate sent a binary message as
//! `event: binary` with its payload in base64, or a text message (the load
//! origin's text mode) as itself. Bytes arrive in any chunking; lines end
//! with `\n`, `\r\n` or `\r`; a blank line dispatches the event if it had
//! a `data:` field. Comments (`:`), `retry:` and any other field are
//! skipped. [`binary_prefix`] decodes the base64 start of an event's
//! data back into the payload's first [`PREFIX_LEN`](super::wire::PREFIX_LEN)
//! bytes (its seq and timestamp).
//!
//! `id:` lines are kept as the specification's "last event ID": an `id:`
//! value is taken when its event is dispatched (by its blank line, data or
//! not), so an event cut short by the stream's end never counts, and the
//! ID stays until another replaces it. [`EventReader::last_id`] is what a
//! reconnecting client sends as `Last-Event-ID`; [`EventReader::resuming`]
//! starts the reader over on a new stream with that ID kept. Only
//! wsgate's IDs are understood (16 hex digits, [`parse_id`]); any other
//! value, or an empty `id:` line, clears the last ID, as a browser's
//! would be reset by an empty one.

/// Data bytes kept per event: 24 base64 characters are 18 payload bytes,
/// enough for the 16-byte seq and timestamp prefix.
pub const DATA_PREFIX: usize = 24;
/// Field name bytes kept while a line's name is read (`event` is the
/// longest one acted on).
const NAME: usize = 5;
/// Event name bytes kept: `reset`, and one more to tell it from longer
/// names.
const EVENT_NAME: usize = 6;
/// ID value bytes kept: a wsgate message ID is 16 hex digits.
const ID: usize = 16;

/// What the current line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the field name (before any `:`).
    Name,
    /// In a `data:` value.
    Data,
    /// In an `event:` value.
    Event,
    /// In an `id:` value.
    Id,
    /// A comment or a field not acted on: skipped to its end.
    Skip,
}

/// One event as far as the reader keeps it.
#[derive(Debug)]
pub struct Event<'a> {
    /// Named `reset`: the server could not resume from the `Last-Event-ID`
    /// sent and goes on live.
    pub reset: bool,
    /// The first up to [`DATA_PREFIX`] bytes of its first data line.
    pub data: &'a [u8],
}

/// Streaming `text/event-stream` parser state, one per client (under 80 bytes).
#[derive(Debug, Clone)]
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
    /// Bytes of the current event's `id:` value (saturating: more than
    /// [`ID`] is no wsgate ID), and whether the event had one.
    id_len: u8,
    has_id: bool,
    id: [u8; ID],
    /// The last event ID: of the last dispatched event that had an `id:`.
    last_id: Option<u64>,
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
            id_len: 0,
            has_id: false,
            id: [0; ID],
            last_id: None,
        }
    }

    /// A reader at the start of a new stream that resumes an old one: its
    /// last event ID is `last_id` (what the request's `Last-Event-ID` said).
    pub fn resuming(last_id: Option<u64>) -> EventReader {
        EventReader {
            last_id,
            ..EventReader::new()
        }
    }

    /// The last event ID the stream gave (see the module docs), the value
    /// to send as `Last-Event-ID` on reconnecting.
    pub fn last_id(&self) -> Option<u64> {
        self.last_id
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
                        let field = self.start_value();
                        self.end_line(field, &mut on_event);
                    }
                    b':' => {
                        self.line = self.start_value();
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
                Line::Id => {
                    // Past ID bytes only the length grows: no wsgate ID.
                    if let Some(room) = self.id.get_mut(usize::from(self.id_len)..) {
                        let take = value.len().min(room.len());
                        room[..take].copy_from_slice(&value[..take]);
                    }
                    let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
                    self.id_len = self.id_len.saturating_add(len);
                }
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
            Some(b"id") => Line::Id,
            _ => Line::Skip,
        }
    }

    /// The field named so far, its value about to start: an `id:` value
    /// replaces any earlier one of the same event.
    fn start_value(&mut self) -> Line {
        let field = self.field();
        if field == Line::Id {
            self.id_len = 0;
        }
        field
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
            // A later `id:` line in the same event replaces an earlier one.
            Line::Id => self.has_id = true,
            Line::Name | Line::Event | Line::Skip => {}
        }
        self.line = Line::Name;
        self.name_len = 0;
        if !blank {
            return;
        }
        if self.has_id {
            self.last_id = self.id.get(..usize::from(self.id_len)).and_then(parse_id);
        }
        if self.has_data {
            let name = &self.event[..usize::from(self.event_len)];
            on_event(Event {
                reset: name == b"reset",
                data: &self.data[..usize::from(self.data_len)],
            });
        }
        self.has_id = false;
        self.id_len = 0;
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

/// A wsgate message ID: exactly 16 hex digits (either case); `None` for
/// anything else.
pub fn parse_id(text: &[u8]) -> Option<u64> {
    if text.len() != ID || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| u64::from_str_radix(t, 16).ok())
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

    fn events(stream: &[u8], step: usize) -> Vec<Vec<u8>> {
        let mut reader = EventReader::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(step) {
            reader.feed(chunk, |e| out.push(e.data.to_vec()));
        }
        out
    }

    #[test]
    fn events_in_any_chunking() {
        let stream = b"retry: 1000\n\n: heartbeat\n\nid: 00000000000000ab\nevent: binary\n\
                       data: AAECAwQFBgcICQoLDA0ODxAREhMUFRYX\n\n\
                       id: 00000000000000ac\r\ndata: one\r\ndata: two\r\rdata:x\n\n";
        let want = vec![
            b"AAECAwQFBgcICQoLDA0ODxAR".to_vec(),
            b"one".to_vec(),
            b"x".to_vec(),
        ];
        for step in 1..=stream.len() {
            assert_eq!(events(stream, step), want, "step {step}");
        }
    }

    #[test]
    fn only_events_with_data_dispatch() {
        assert!(events(b"id: 1\n\nevent: binary\n\n: c\n\n", 3).is_empty());
        assert_eq!(events(b"data\n\n", 1), vec![Vec::new()]);
        assert_eq!(events(b"event: other\ndata: a\n\n", 2), vec![b"a".to_vec()]);
    }

    #[test]
    fn the_last_id_is_taken_at_dispatch() {
        let a = b"id: 00000000000000ab\nevent: binary\ndata: AAAA\n\n";
        let b = b"id: 00000000000000AC\ndata: x\n\n";
        let cut = b"id: 00000000000000ad\ndata: y\n";
        let mut stream = [&a[..], b, cut].concat();
        for step in 1..=stream.len() {
            let mut reader = EventReader::new();
            let mut seen = Vec::new();
            for chunk in stream.chunks(step) {
                reader.feed(chunk, |e| seen.push(e.data.to_vec()));
            }
            // The event cut short by the stream's end is not dispatched,
            // and its ID is not taken.
            assert_eq!(seen, [b"AAAA".to_vec(), b"x".to_vec()], "step {step}");
            assert_eq!(reader.last_id(), Some(0xac), "step {step}");
        }
        // An event without an ID keeps the last one; a second `id:` line
        // replaces the first; a value that is no wsgate ID clears it.
        stream = b"id: 00000000000000ab\n\ndata: z\n\n".to_vec();
        let mut reader = EventReader::new();
        reader.feed(&stream, |_| {});
        assert_eq!(reader.last_id(), Some(0xab));
        reader.feed(b"id: 1\nid: 00000000000000f0\ndata: w\n\n", |_| {});
        assert_eq!(reader.last_id(), Some(0xf0));
        reader.feed(b"id: 00000000000000f00\ndata: w\n\n", |_| {});
        assert_eq!(reader.last_id(), None);
        reader.feed(b"id: 00000000000000f1\n\nid\n\n", |_| {});
        assert_eq!(reader.last_id(), None);
    }

    #[test]
    fn a_resuming_reader_keeps_the_id_and_sees_resets() {
        let mut reader = EventReader::resuming(Some(7));
        let mut resets = Vec::new();
        // What wsgate sends for an ID it cannot serve, then a live event.
        let stream = b"retry: 1000\n\nevent: reset\ndata: last-event-id not in history; \
                       continuing live\n\nid: 0000000000000009\nevent: binary\ndata: AAAA\n\n";
        reader.feed(stream, |e| resets.push(e.reset));
        assert_eq!(resets, [true, false]);
        assert_eq!(reader.last_id(), Some(9));
        assert_eq!(EventReader::resuming(Some(7)).last_id(), Some(7));
    }

    #[test]
    fn parses_ids() {
        assert_eq!(parse_id(b"5c1f0b9a2d3e4f60"), Some(0x5c1f_0b9a_2d3e_4f60));
        assert_eq!(parse_id(b"FFFFFFFFFFFFFFFF"), Some(u64::MAX));
        assert_eq!(parse_id(b"5c1f0b9a2d3e4f6"), None);
        assert_eq!(parse_id(b"5c1f0b9a2d3e4f6g"), None);
        assert_eq!(parse_id(b"+c1f0b9a2d3e4f60"), None);
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
