//! Pages for a headless browser (`browser.rs`): a small HTTP server on
//! loopback that serves each page by path and keeps what the pages report
//! back (`GET /report?name=value&...`), for the test to wait on.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use super::wait_until;

/// What a page reported: the parameters of its `/report?` request.
#[derive(Debug, Clone)]
pub struct Report(Vec<(String, String)>);

impl Report {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

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
        wait_until(&format!("the {way} page to report {prefix}"), || {
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
