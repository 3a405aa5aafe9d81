//! The programs some tests need besides the gateway (redis-server, haproxy,
//! chromium, a C compiler): found on `PATH`, or the test is skipped in one
//! line the test runner cannot hide. On CI (the `CI` environment variable
//! set, as `.ci/run` sets it) a missing program fails the test instead: a
//! skip there would pass what was never run.

use std::{io::Write, path::PathBuf};

/// The program `name` on `PATH`. Where it is missing: on CI, panics naming
/// it and `install` (how to install it); elsewhere, says the test is skipped
/// and returns `None`, for the test to return at once.
#[track_caller]
pub fn require_program(name: &str, install: &str) -> Option<PathBuf> {
    if let Some(path) = super::find_on_path(name) {
        return Some(path);
    }
    let on_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !on_ci,
        "{name} is required on CI (CI is set) and is not on PATH: {install}"
    );
    // Straight to the process's stderr: the test harness captures print!
    // and eprint! of passing tests, not writes to the stream itself.
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(
        std::io::stderr().lock(),
        "skipped: {name} not found ({install}): {test}"
    );
    None
}
