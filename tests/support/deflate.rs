//! permessage-deflate as a client does it, with flate2 directly (never the
//! gateway's code): inflating what the gateway compressed, compressing what
//! a client sends.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// A message payload inflated as RFC 7692 §7.2.2 says (the tail put back).
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend([0x00, 0x00, 0xff, 0xff]);
    let mut raw = Decompress::new(false);
    let mut out = Vec::with_capacity(64 * 1024);
    while (raw.total_in() as usize) < input.len() {
        out.reserve(64 * 1024);
        let at = raw.total_in() as usize;
        raw.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
            .expect("valid DEFLATE");
    }
    out
}

/// `payload` compressed as a client would (its sync-flush tail removed).
pub fn deflate(payload: &[u8]) -> Vec<u8> {
    let mut raw = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(payload.len() / 100 + 1024);
    loop {
        out.reserve(64 * 1024);
        let at = raw.total_in() as usize;
        let status = raw
            .compress_vec(&payload[at..], &mut out, FlushCompress::Sync)
            .expect("deflate");
        if raw.total_in() as usize == payload.len()
            && status == Status::Ok
            && out.len() < out.capacity()
        {
            break;
        }
    }
    assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}
