//! Bytes into the HTTP upgrade parser: no panic, well-formed answers,
//! verdicts that more bytes never change. The first byte picks the size
//! limit and the endpoint path.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsgate::fuzz::upgrade_request(data));
