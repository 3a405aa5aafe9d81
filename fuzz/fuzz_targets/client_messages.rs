//! Valid masked client frames built from the input (sizes, fragments,
//! interleaved control frames, masks, read splits) decode to exactly the
//! messages they were built from.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsgate::fuzz::client_messages(data));
