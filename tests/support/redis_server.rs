//! A real `redis-server` per test: started as a child process on a free
//! loopback port (no persistence), killed by its PID. Never the system's
//! service. Where the program is missing, the test is skipped (on CI: fails;
//! see [`require_program`]).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{DEADLINE, require_program};

/// A `redis-server` child process, killed (and reaped) on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    password: Option<String>,
}

impl RedisServer {
    /// Starts one on a free port; `None` (the skip said) if the program is
    /// not installed.
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// Starts one with extra arguments (`--requirepass x`, say).
    pub fn start_with(args: &[&str]) -> Option<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        RedisServer::start_on(port, args)
    }

    /// Starts one on `port` (to restart a killed one where it was).
    pub fn start_on(port: u16, args: &[&str]) -> Option<RedisServer> {
        let program = require_program("redis-server", "apt-get install redis-server")?;
        let child = Command::new(program)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--loglevel", "warning"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        let password = args
            .windows(2)
            .find(|w| w[0] == "--requirepass")
            .map(|w| w[1].to_owned());
        let server = RedisServer {
            child,
            port,
            password,
        };
        let end = Instant::now() + DEADLINE;
        while server.query(&mut redis::cmd("PING")).is_err() {
            assert!(Instant::now() < end, "redis-server did not come up");
            thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The origin URL of a pub/sub channel on this server.
    pub fn channel_url(&self, channel: &str) -> String {
        format!("redis://127.0.0.1:{}/{channel}", self.port)
    }

    /// The origin URL of a stream on this server.
    pub fn stream_url(&self, key: &str) -> String {
        format!("redis+stream://127.0.0.1:{}/{key}", self.port)
    }

    /// A connection of the test's own.
    pub fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let auth = match &self.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{}/", self.port))?;
        client.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// Runs one command on a new connection.
    pub fn query(&self, cmd: &mut redis::Cmd) -> redis::RedisResult<redis::Value> {
        let mut con = self.connect()?;
        cmd.query(&mut con)
    }

    /// `PUBLISH channel message`: how many subscribers got it.
    pub fn publish(&self, con: &mut redis::Connection, channel: &str, message: &str) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query(con)
            .expect("PUBLISH")
    }

    /// The ids of the gateway's connections (named `wsgate-lobby-N`).
    pub fn gateway_clients(&self) -> Vec<u64> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut self.connect().expect("connect"))
            .expect("CLIENT LIST");
        list.lines()
            .filter(|l| l.contains(" name=wsgate-lobby-"))
            .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect()
    }

    /// Stops the server (SIGSTOP, by its PID): it holds its connections
    /// and answers nothing until [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -{name} {}", self.child.id());
    }

    /// Kills the server (SIGKILL) and waits for it: its port is free again.
    pub fn kill(mut self) -> u16 {
        self.halt();
        let end = Instant::now() + DEADLINE;
        while TcpStream::connect(self.addr()).is_ok() {
            assert!(Instant::now() < end, "redis-server still answers");
            thread::sleep(Duration::from_millis(10));
        }
        self.port
    }

    fn halt(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.halt();
    }
}
