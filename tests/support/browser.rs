//! Headless Chromium for the tests that need a real browser: the program
//! ([`chromium`]: a test without it is skipped, or fails on CI), a page held
//! open ([`Browser`]) or a run to completion with its output
//! ([`run_chromium`]), and a loopback server for the pages it shows, which
//! report back what they saw ([`Pages`]). Each run gets a fresh profile and
//! is killed with every helper process it started.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
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
        Browser::open_with(chromium, &[], url)
    }

    /// Opens `url` in headless `chromium` started with the further `flags`.
    pub fn open_with(chromium: &Path, flags: &[&str], url: &str) -> Browser {
        let (mut command, profile) = headless(chromium);
        let child = command
            .args(flags)
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

/// What a page reported: the parameters of its `/report?` request.
#[derive(Debug, Clone)]
pub struct Report(Vec<(String, String)>);

impl Report {
    /// The parameters of a query string (`a=1&b=2`).
    pub fn parse(query: &str) -> Report {
        Report(
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// A parameter's value ("" if absent). The pages' values need no
    /// decoding: letters, digits, `-` and `_`.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Whether this is page `way` reporting `event`.
    pub fn is(&self, way: &str, event: &str) -> bool {
        self.get("way") == way && self.get("event") == event
    }
}

/// An HTTP server on loopback, in a thread until dropped: it serves pages
/// by path and keeps what they report (`GET /report?...`).
pub struct Pages {
    addr: SocketAddr,
    reports: Arc<Mutex<Vec<Report>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pages {
    /// Serves `pages` (path, HTML) on 127.0.0.1 port 0.
    pub fn start(pages: Vec<(&'static str, String)>) -> Pages {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (flag, kept) = (stop.clone(), reports.clone());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split(' ').nth(1).unwrap_or("");
                let (status, body) = if let Some(query) = target.strip_prefix("/report?") {
                    kept.lock().expect("reports").push(Report::parse(query));
                    ("204 No Content", "")
                } else if let Some((_, page)) = pages.iter().find(|(path, _)| *path == target) {
                    ("200 OK", page.as_str())
                } else {
                    ("404 Not Found", "")
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
            }
        });
        Pages {
            addr,
            reports,
            stop,
            thread: Some(thread),
        }
    }

    /// The `http://` URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every report so far, in arrival order.
    pub fn reports(&self) -> Vec<Report> {
        self.reports.lock().expect("reports").clone()
    }

    /// Waits for the page `way` to report `event`.
    #[track_caller]
    pub fn wait_for(&self, way: &str, event: &str) -> Report {
        self.wait_for_prefix(way, event)
    }

    /// Waits for the page `way` to report an event starting with `prefix`.
    #[track_caller]
    pub fn wait_for_prefix(&self, way: &str, prefix: &str) -> Report {
        let mut found = None;
        super::wait_until(&format!("the {way} page to report {prefix}"), || {
            found = self
                .reports()
                .into_iter()
                .find(|r| r.get("way") == way && r.get("event").starts_with(prefix));
            found.is_some()
        });
        found.expect("a report")
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
