//! Bytes into the check of an origin's upgrade response: no panic,
//! verdicts that more bytes never change, acceptances that end with the
//! head. The first byte picks the subprotocols offered.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsgate::fuzz::origin_response(data));
