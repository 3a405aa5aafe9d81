//! The `wsgate` binary: usage errors, the demo, and signals.

mod support;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
};

use support::*;

fn wsgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .output()
        .expect("run wsgate")
}

#[test]
fn bad_flags_exit_2_with_one_clear_line() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--origin", "ws://h/", "--lobby-capacity", "0"],
            "capacity",
        ),
        (&["--origin", "ws://h/", "--queue", "0"], "queue"),
        (&["--origin", "http://h/"], "ws://"),
        (&["--origin", "not a url"], "not a valid URL"),
        (&["--origin", "ws://h/", "--queue", "many"], "queue"),
        (&["--origin", "ws://h/", "--listen", "nowhere"], "listen"),
        (&["--origin", "ws://h/", "--listen", &busy], "cannot listen"),
        (&["--origin", "ws://h/", "--bogus"], "bogus"),
        (&["--origin", "ws://h/", "--log-level", "loud"], "log"),
        (&[], "--origin"),
        (&["--demo", "--origin", "ws://h/"], "either"),
    ];
    for (args, needle) in cases {
        let out = wsgate(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_exits_0() {
    let out = wsgate(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--lobby-capacity"));
}

/// A child process killed (and reaped) if the test ends early; if the test
/// fails, the child's log is printed.
struct Reaper(Child, std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("wsgate's log:\n{log}");
        }
        let _ = std::fs::remove_file(&self.1);
    }
}

#[test]
fn demo_serves_ticks_and_sigterm_stops_it_cleanly() {
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("demo-{}.log", std::process::id()));
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--demo", "--listen", "127.0.0.1:0", "--log-level", "debug"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start wsgate --demo"),
        log,
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line.split_whitespace().last().expect("a URL").to_owned();
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("no address in {line:?}"));

    let mut client = ws_client(addr);
    for _ in 0..3 {
        let tick = recv_text(&mut client);
        assert!(
            tick.starts_with("{\"seq\":") && tick.contains("\"ts_ms\":"),
            "{tick}"
        );
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let close = recv_close(&mut client);
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
