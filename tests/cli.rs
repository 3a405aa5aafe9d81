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
#[cfg(not(feature = "config-file"))]
fn a_build_without_config_files_refuses_them_with_one_line() {
    for args in [
        &["--config", "/nonexistent.toml"][..],
        &["--origin", "ws://h/", "--print-config"],
    ] {
        let out = wsgate(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("config-file"), "{args:?}: {stderr}");
    }
}

#[test]
#[cfg(feature = "config-file")]
fn config_file_errors_name_the_file_line_and_key_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("wsgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "unknown key",
            "origin = \"ws://h/\"\nlobby_capacty = 5\n",
            ":2",
            "lobby_capacty",
        ),
        (
            "wrong type",
            "origin = \"ws://h/\"\n\nqueue_depth = \"x\"\n",
            ":3",
            "queue_depth",
        ),
        (
            "bad duration",
            "drain_timeout = \"soon\"\norigin = \"ws://h/\"\n",
            ":1",
            "drain_timeout",
        ),
        (
            "bad value",
            "origin = \"ws://h/\"\nlobby_capacity = 0\n",
            ":2",
            "lobby_capacity",
        ),
        (
            "a route's bad value",
            "[[route]]\npath = \"/a\"\norigin = \"ws://h/\"\nlobby_capacity = 0\n",
            ":4",
            "route /a: lobby_capacity",
        ),
    ];
    for (what, text, line, key) in cases {
        let file = dir.join("wsgate.toml");
        std::fs::write(&file, text).unwrap();
        let out = wsgate(&[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr}");
        let at = format!("{}{line}", file.display());
        assert!(
            stderr.contains(&at) && stderr.contains(key),
            "{what}: wanted {at} and {key} in {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg(feature = "config-file")]
fn print_config_shows_every_setting_in_the_file_form() {
    let out = wsgate(&[
        "--origin",
        "ws://h/",
        "--queue-depth",
        "9",
        "--print-config",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let config = wsgate::Config::from_toml(&text).expect("a config file");
    assert_eq!(config.queue_depth, 9);
    assert_eq!(config.origin, "ws://h/");
    assert!(text.contains("drain_timeout = \"5s\""), "{text}");
}

#[test]
fn a_closed_standard_output_does_not_stop_the_gateway() {
    // The start-up banner names every route, one line each with its path
    // and upstream: this many outgrow a pipe's buffer (64 KiB on Linux)
    // three times over, so the gateway is still printing when its reader
    // goes away, and the rest of its writes to standard output fail (EPIPE).
    const ROUTES: usize = 512;
    const PIPE_BUFFER: usize = 64 * 1024;
    let origin = TestOrigin::start();
    let routes: Vec<String> = (0..ROUTES)
        .map(|i| format!("/{i:0>400}={}", origin.url()))
        .collect();
    let banner: usize = routes.iter().map(String::len).sum();
    assert!(banner > 3 * PIPE_BUFFER, "a banner of {banner} bytes");
    let last = routes[ROUTES - 1].split_once('=').expect("PATH=URL").0;
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("closed-stdout-{}.log", std::process::id()));
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--listen", "127.0.0.1:0"])
            .args(routes.iter().flat_map(|r| ["--route", r.as_str()]))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start wsgate"),
        log.clone(),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    // Whoever read our first line goes away before the rest is printed.
    drop(stdout);
    let addr: SocketAddr =
        address_in(&line, "ws://").unwrap_or_else(|| panic!("no address in {line:?}"));
    let logged = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };

    // The last route's line went to the closed pipe; the route serves.
    let stream = std::net::TcpStream::connect(addr).expect("still listening");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let (mut client, _) =
        tungstenite::client(format!("ws://{addr}{last}"), stream).expect("still serving");
    wait_until("its upstream", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(recv_text(&mut client), "1");
    assert!(child.0.try_wait().unwrap().is_none(), "still running");

    // Later output (a reload, its log lines) does not stop it either.
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &child.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -{name}");
    };
    signal("HUP");
    wait_until("the reload", || {
        logged(&format!("configuration reloaded: {ROUTES} routes"))
    });
    origin.send_seq(2);
    assert_eq!(recv_text(&mut client), "2");

    // And it stops cleanly: 1001 to its client, the final counters, exit 0.
    signal("TERM");
    let close = recv_close(&mut client);
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    drop(client);
    let status = child.0.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("stopped: clients served 1,"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn help_exits_0() {
    let out = wsgate(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--lobby-capacity") && help.contains("--route"),
        "{help}"
    );
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
