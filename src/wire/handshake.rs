//! What both WebSocket upgrades compute: the accept key that answers a
//! request's key (RFC 6455, section 4.2.2), and the base64 it is written in.
//!
//! The client upgrade (`edge/upgrade.rs`) answers with it; the origin's
//! upgrade (`source/websocket/handshake.rs`) checks the origin's answer
//! with it. Pure functions; nothing runs here.

use sha1::{Digest, Sha1};

/// The `Sec-WebSocket-Accept` value that answers the request key `key`
/// (RFC 6455, section 4.2.2): base64 of the SHA-1 of the key and the
/// protocol's GUID.
pub(crate) fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    base64(&sha1.finalize())
}

/// Standard base64 with padding (RFC 4648, section 4): the accept key and
/// the origin upgrade's nonce, each a few bytes, so no table crate.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        // RFC 6455, section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn base64_pads_as_rfc_4648_says() {
        // RFC 4648, section 10.
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ];
        for (plain, coded) in cases {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
        }
    }
}
