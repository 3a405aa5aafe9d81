//! A Server-Sent Events client for the tests: one GET over a real socket,
//! the response head checked, then the event stream parsed as a browser's
//! EventSource parses it (fields, comments, multi-line data).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
};

use super::{DEADLINE, read_http_head};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its `id:` field, if it had one.
    pub id: Option<String>,
    /// Its `event:` field (the type), if it had one.
    pub event: Option<String>,
    /// Its `data:` lines, joined with `\n`.
    pub data: String,
}

/// An open event stream.
#[derive(Debug)]
pub struct SseClient {
    reader: BufReader<TcpStream>,
    /// The response head.
    pub head: String,
    /// The last `retry:` hint seen, in milliseconds.
    pub retry: Option<u64>,
    /// Heartbeat (and other) comments seen.
    pub comments: usize,
}

/// The GET request for an event stream at `target` with `headers` (each
/// `Name: value`).
pub fn sse_request(target: &str, headers: &[&str]) -> String {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

/// Opens an event stream at `target` on the gateway at `addr`; panics
/// unless it is answered 200 `text/event-stream`.
#[track_caller]
pub fn sse_client(addr: SocketAddr, target: &str, headers: &[&str]) -> SseClient {
    try_sse_client(addr, target, headers).unwrap_or_else(|e| panic!("{e}"))
}

/// Opens an event stream as [`sse_client`] does; what went wrong (no
/// connection, another answer) instead of a panic, for a client that
/// retries.
pub fn try_sse_client(
    addr: SocketAddr,
    target: &str,
    headers: &[&str],
) -> Result<SseClient, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| format!("read timeout: {e}"))?;
    stream
        .write_all(sse_request(target, headers).as_bytes())
        .map_err(|e| format!("send request: {e}"))?;
    let head = read_http_head(&mut stream);
    let is_stream = head.starts_with("HTTP/1.1 200 ")
        && head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream");
    if !is_stream {
        return Err(format!("not an event stream: {head:?}"));
    }
    Ok(SseClient {
        reader: BufReader::new(stream),
        head,
        retry: None,
        comments: 0,
    })
}

impl SseClient {
    /// The next event; `None` when the stream ends (or fails) first.
    pub fn next(&mut self) -> Option<Event> {
        let mut id = None;
        let mut event = None;
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                // A blank line dispatches the event, if it has data.
                if let Some(data) = data.take() {
                    return Some(Event { id, event, data });
                }
                event = None;
                continue;
            }
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = Some(value.to_owned()),
                "retry" => self.retry = value.parse().ok(),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
    }

    /// The next event; panics if the stream ends first.
    #[track_caller]
    pub fn event(&mut self) -> Event {
        self.next().expect("an event before the stream ended")
    }

    /// The next message's data and ID, which it must have.
    #[track_caller]
    pub fn message(&mut self) -> (String, String) {
        let event = self.event();
        assert_eq!(event.event, None, "{event:?}");
        let id = event.id.expect("an id");
        (event.data, id)
    }
}

/// An event stream read on a thread of its own, as fast as events come.
pub struct SseFollower {
    events: Arc<Mutex<Vec<Event>>>,
    thread: Option<JoinHandle<()>>,
}

impl SseFollower {
    /// Reads `client` until its stream ends.
    pub fn spawn(mut client: SseClient) -> SseFollower {
        let events = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&events);
        let thread = thread::spawn(move || {
            while let Some(event) = client.next() {
                shared.lock().unwrap().push(event);
            }
        });
        SseFollower {
            events,
            thread: Some(thread),
        }
    }

    /// Events read so far.
    pub fn count(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// The events read so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Whether the stream has ended.
    pub fn has_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}
