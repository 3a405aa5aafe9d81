//! The resume envelope on a WebSocket client's wire (feature `sse`, which
//! carries message IDs): the form of a message that a client which opted
//! in with the [`PROTOCOL`] subprotocol gets, encoded once per lobby like
//! the plain frame, and the one fixed message around it.
//!
//! A message in its envelope is a frame with the origin message's opcode
//! whose payload is the message ID (16 lowercase hex digits, as an SSE
//! `id:` line carries it), one space, then the origin payload unchanged:
//! in JavaScript `data.slice(0, 16)` is the ID and `data.slice(17)` the
//! message; a binary message has the same 17 ASCII bytes in front. Text
//! stays valid UTF-8. [`reset`] is a text message of exactly `reset`
//! (never 17 bytes or more with a space at 16, so never taken for an
//! envelope): the ID the client resumed after is not in its lobby's
//! history, and what follows is the live stream. An envelope is a frame
//! like any other: a lobby compresses it (once, `wire/deflate.rs`) for the
//! resume clients that negotiated permessage-deflate, and the payload that
//! comes out of inflating it is this one. Pure functions: no socket, no
//! thread.

use crate::wire::frame::{self, Frame, OP_TEXT};

/// The subprotocol a WebSocket client offers to get envelopes and resume.
pub(crate) const PROTOCOL: &str = "wsgate.resume.v1";

/// The payload of the reset message.
const RESET: &[u8] = b"reset";

/// The envelope of the message in WebSocket frame `plain` (as a lobby
/// encoded it), with message ID `id`, stamped like `plain`.
pub(crate) fn envelope(id: u64, plain: &Frame) -> Frame {
    let (opcode, payload) = frame::opcode_and_payload(plain);
    let mut prefix = [b' '; 17];
    let hex = format!("{id:016x}");
    prefix[..16].copy_from_slice(hex.as_bytes());
    frame::encode_prefixed(opcode, &prefix, payload, plain.stamp())
}

/// The reset message (see the module docs).
pub(crate) fn reset() -> Frame {
    frame::encode(OP_TEXT, RESET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{OP_BINARY, encode_stamped};

    #[test]
    fn the_id_a_space_and_the_payload_with_the_same_opcode() {
        let plain = encode_stamped(OP_TEXT, b"{\"seq\":1}", 77);
        let sealed = envelope(0xabc, &plain);
        assert_eq!(
            frame::opcode_and_payload(&sealed),
            (OP_TEXT, &b"0000000000000abc {\"seq\":1}"[..])
        );
        assert_eq!(sealed.stamp(), 77, "timed like its frame");
        // Past 125 bytes, the length takes the extended form.
        let long = vec![7u8; 200];
        let sealed = envelope(u64::MAX, &encode_stamped(OP_BINARY, &long, 0));
        let (opcode, payload) = frame::opcode_and_payload(&sealed);
        assert_eq!(opcode, OP_BINARY);
        assert_eq!(&payload[..17], b"ffffffffffffffff ");
        assert_eq!(&payload[17..], &long[..]);
        assert_eq!(sealed[1], 126);
    }

    #[test]
    fn the_reset_is_a_short_text_message() {
        assert_eq!(
            frame::opcode_and_payload(&reset()),
            (OP_TEXT, &b"reset"[..])
        );
    }
}
