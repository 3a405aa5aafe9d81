//! Headless Chromium for the tests that need a real browser: the program
//! ([`chromium`]: a test without it is skipped, or fails on CI), a page held
//! open ([`Browser`]) or a run to completion with its output
//! ([`run_chromium`]). Each run gets a fresh profile and is killed with
//! every helper process it started.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

/// The `chromium` program; `None` (the skip said) where it is not
/// installed, for the test to return (see [`require_program`]).
#[track_caller]
pub fn chromium() -> Option<PathBuf> {
    super::require_program("chromium", "apt-get install chromium")
}

/// Headless Chromium showing one page, in a fresh profile, until dropped:
/// then it is killed with every helper process it started (its process
/// group, named by its positive id).
pub struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Browser {
    /// Opens `url` in headless `chromium`.
    pub fn open(chromium: &Path, url: &str) -> Browser {
        let (mut command, profile) = headless(chromium);
        let child = command
            .arg(url)
            .stdout(Stdio::null())
            .spawn()
            .expect("start chromium");
        Browser { child, profile }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        end(&mut self.child, &self.profile);
    }
}

/// Runs headless Chromium with `args` in a fresh profile; its stdout. Killed
/// (with everything it started) if it runs past a minute.
pub fn run_chromium(chromium: &Path, args: &[&str]) -> String {
    let (mut command, profile) = headless(chromium);
    let mut child = command
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("chromium stdout");
    let output = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => break None,
        }
    };
    end(&mut child, &profile);
    let text = output.join().unwrap_or_default();
    assert!(status.is_some(), "chromium ran past its deadline (killed)");
    text
}

/// The command for headless `chromium` in its own process group, with a
/// fresh profile directory (returned, for [`end`] to remove).
fn headless(chromium: &Path) -> (Command, PathBuf) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let profile = std::env::temp_dir().join(format!(
        "wsgate-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    (command, profile)
}

/// Kills `child` with its process group, reaps it and removes its profile.
fn end(child: &mut Child, profile: &Path) {
    // Chromium's helpers (zygote, renderer) share its process group, named
    // by its positive id: never `kill -SIG -PGID`, which procps-ng 4.0.2
    // was seen to turn into a signal to every process (-1).
    let _ = Command::new("pkill")
        .args(["-KILL", "-g", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(profile);
}
