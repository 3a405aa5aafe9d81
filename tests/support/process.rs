//! The `wsgate` binary as a child process, for tests that need several
//! gateways side by side (a shared port, a load balancer in front): started
//! with the given flags, its addresses read from what it prints, signalled
//! and killed by its PID only, and killed (and reaped) on drop, so a failing
//! test leaves no process behind.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
};

/// A running `wsgate` process.
pub struct GatewayProcess {
    child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The admin server's address, when started with `--admin`.
    pub admin: Option<SocketAddr>,
    /// Kept open: the gateway may print more, and must not get EPIPE.
    _stdout: BufReader<ChildStdout>,
    /// Reads its log as it comes, so logging never blocks on a full pipe.
    stderr: Option<JoinHandle<()>>,
    log: Arc<Mutex<String>>,
}

impl GatewayProcess {
    /// Starts `wsgate` with `args` (which include `--listen`; add `--admin`
    /// for [`GatewayProcess::admin`]); returns once it listens.
    pub fn spawn(args: &[&str]) -> GatewayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsgate");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = {
            let mut err = child.stderr.take().expect("stderr");
            let log = log.clone();
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = err.read(&mut chunk) {
                    log.lock()
                        .expect("log")
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            })
        };
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut next_line = || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            line
        };
        let line = next_line();
        let addr = address_in(&line, "ws://").or_else(|| address_in(&line, "wss://"));
        let admin = args.contains(&"--admin").then(next_line);
        let admin_addr = admin.as_deref().map(|line| address_in(line, "http://"));
        let (Some(addr), None | Some(Some(_))) = (addr, admin_addr) else {
            // Not started as expected: stop it before failing the test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("wsgate printed no address: {line:?} {admin:?}");
        };
        let admin = admin_addr.flatten();
        GatewayProcess {
            child,
            addr,
            admin,
            _stdout: stdout,
            stderr: Some(stderr),
            log,
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `SIG<name>` to this process, by its PID.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} {}", self.pid());
    }

    /// The value of a sample in the admin server's `/metrics`: `name` with
    /// its labels, or a bare name for the sum over every label set (`None`
    /// if the server does not answer or has no such sample).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let admin = self.admin.expect("started with --admin");
        let response = super::http_exchange(
            admin,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let values: Vec<f64> = response
            .lines()
            .filter_map(|line| {
                let (key, value) = line.split_once(' ')?;
                let labels = key.strip_prefix(name)?;
                let whole = labels.is_empty() || (!name.contains('{') && labels.starts_with('{'));
                whole.then(|| value.trim().parse().ok())?
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// The number of clients in each of its lobbies, from the admin
    /// server's `/lobbies` (empty if it does not answer).
    #[cfg(feature = "admin")]
    pub fn lobby_clients(&self) -> Vec<u64> {
        let admin = self.admin.expect("started with --admin");
        let response = super::http_exchange(
            admin,
            "GET /lobbies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        json["lobbies"]
            .as_array()
            .map(|lobbies| {
                lobbies
                    .iter()
                    .map(|l| l["clients"].as_u64().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for the process to exit; its exit code and its whole log.
    pub fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().expect("wait for wsgate");
        if let Some(reader) = self.stderr.take() {
            let _ = reader.join();
        }
        (status.code(), self.log())
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.stderr.take() {
            let _ = reader.join();
        }
    }
}

/// The socket address in the first `scheme…` URL of `line`.
pub fn address_in(line: &str, scheme: &str) -> Option<SocketAddr> {
    let at = line.find(scheme)? + scheme.len();
    line[at..]
        .split(|c| c == '/' || c == ',' || char::is_whitespace(c))
        .next()?
        .parse()
        .ok()
}
