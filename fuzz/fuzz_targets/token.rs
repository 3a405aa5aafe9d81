//! Bytes into a request's token sources and the JWT check: no panic, a
//! token found is part of the request, one verdict per token, and only a
//! token with the pinned algorithm and an unexpired `exp` accepted. The
//! first byte picks the source and the leeway.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsgate::fuzz::token(data));
