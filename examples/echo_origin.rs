//! A WebSocket echo server to stand in for an origin, used by the
//! conformance run (`.ci/conformance`): `cargo run --example echo_origin --
//! 127.0.0.1:0` prints `echo origin on ws://ADDR/`. Every text or binary
//! message is sent back on the same connection; one thread per connection; it
//! runs until killed.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
};

use tungstenite::{Message, protocol::WebSocketConfig};

fn main() -> ExitCode {
    let addr: SocketAddr = match std::env::args().nth(1).unwrap_or_default().parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!("usage: echo_origin HOST:PORT");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("echo_origin: cannot listen on {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    match listener.local_addr() {
        Ok(bound) => println!("echo origin on ws://{bound}/"),
        Err(e) => {
            eprintln!("echo_origin: {e}");
            return ExitCode::from(2);
        }
    }
    for stream in listener.incoming().flatten() {
        thread::spawn(move || echo(stream));
    }
    ExitCode::SUCCESS
}

fn echo(stream: TcpStream) {
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let Ok(mut ws) = tungstenite::accept_with_config(stream, Some(config)) else {
        return;
    };
    while let Ok(message) = ws.read() {
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            _ => continue,
        };
        if ws.send(reply).is_err() {
            return;
        }
    }
}
