//! Raw bytes into the client frame decoder: no panic, well-formed events,
//! the same result however the bytes are split into reads.
//! The first byte picks the message size limit and seeds the split.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsgate::fuzz::client_frames(data));
