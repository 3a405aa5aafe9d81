//! Fuzz-corpus replay: every seed input committed under `fuzz/seeds/<target>/`
//! runs through its `wsgate::fuzz` entry point, on stable and without a
//! fuzzer, so CI re-checks the invariants on the inputs the fuzzers found
//! interesting. A fuzzer crash, once fixed, belongs in the seeds too.

use std::panic;
use std::path::{Path, PathBuf};

/// Runs `check` on every file in `fuzz/seeds/<target>/`; fails listing each
/// input that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{}: only {} seeds; the corpus is missing",
        dir.display(),
        files.len()
    );
    let failed: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            panic::catch_unwind(|| check(&data))
                .is_err()
                .then(|| file.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} seeds fail (reproduce with `cargo fuzz run {target} <file>`):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn client_frames_seeds() {
    replay("client_frames", wsgate::fuzz::client_frames);
}

#[test]
fn client_messages_seeds() {
    replay("client_messages", wsgate::fuzz::client_messages);
}

#[test]
fn upgrade_request_seeds() {
    replay("upgrade_request", wsgate::fuzz::upgrade_request);
}

#[test]
fn origin_response_seeds() {
    replay("origin_response", wsgate::fuzz::origin_response);
}

#[cfg(feature = "auth")]
#[test]
fn token_seeds() {
    replay("token", wsgate::fuzz::token);
}
