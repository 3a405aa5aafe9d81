//! No secret in any HTTP answer or log line. The real `wsgate` binary runs
//! at `--log-level debug` with every kind of credential it holds: a Redis
//! password in an origin URL (a live server that requires it, the same
//! server with a wrong one, and a port where nothing listens), an origin
//! header, an HMAC secret for clients' JWTs, an admin token; clients
//! present tokens every way (header, query, subprotocol, cookie), good and
//! bad. Then everything it answered, `--print-config` and everything it
//! printed until SIGTERM are searched for each secret.

mod support;

use std::{
    io::{BufRead, BufReader, ErrorKind, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use jsonwebtoken::Algorithm;
use serde_json::json;
use support::*;

const REDIS_PASSWORD: &str = "s3cr3t-redis-pass";
const WRONG_REDIS_PASSWORD: &str = "wr0ng-redis-pass";
const ORIGIN_SECRET: &str = "0r1g1n-header-secret";
const ADMIN_TOKEN: &str = "adm1n-t0ken-n3ver-sh0wn-4242";

#[test]
fn no_secret_in_any_http_answer_printed_config_or_log_line() {
    let Some(redis) = RedisServer::start_with(&["--requirepass", REDIS_PASSWORD]) else {
        return;
    };
    let origin = TestOrigin::start();
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("address").port()
    };
    let dir = std::env::temp_dir().join(format!("wsgate-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let admin_token_file = dir.join("admin-token");
    std::fs::write(&admin_token_file, format!("{ADMIN_TOKEN}\n")).expect("write the token");
    let config_file = dir.join("wsgate.toml");
    // The WebSocket route first: the binary prints the others' URLs.
    std::fs::write(
        &config_file,
        format!(
            r#"
[[route]]
path = "/ws"
origin = "{ws}"
origin_headers = ["Authorization: Bearer {ORIGIN_SECRET}"]
pass_query = true
query_params = ["symbol"]

[[route]]
path = "/redis"
origin = "redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/ch"

[[route]]
path = "/redis-wrong"
origin = "redis://:{WRONG_REDIS_PASSWORD}@127.0.0.1:{port}/ch"

[[route]]
path = "/redis-down"
origin = "redis://:{REDIS_PASSWORD}@127.0.0.1:{dead}/ch"
"#,
            ws = origin.url(),
            port = redis.port(),
        ),
    )
    .expect("write the config file");
    let secret_file = secret_file("secrets");
    let args = [
        "--config",
        path_str(&config_file),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        path_str(&admin_token_file),
        "--jwt-secret-file",
        path_str(&secret_file),
        "--token-cookie",
        "wsgate_token",
        "--origin-backoff-min",
        "50ms",
        "--origin-backoff-max",
        "200ms",
        "--log-level",
        "debug",
    ];

    let token = mint(Algorithm::HS256, &claims_for(600), None);
    let forged = {
        let key =
            jsonwebtoken::EncodingKey::from_secret(b"not-the-gateways-secret-0123456789abcdef");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims_for(600),
            &key,
        )
        .expect("sign")
    };
    let only_redis = mint(
        Algorithm::HS256,
        &json!({ "exp": now() + 600, "wsgate": ["/redis"] }),
        None,
    );
    let signature = |t: &str| t.rsplit('.').next().expect("a signature").to_owned();
    let secrets: Vec<(&str, String)> = vec![
        ("the Redis password", REDIS_PASSWORD.into()),
        ("the wrong Redis password", WRONG_REDIS_PASSWORD.into()),
        ("the origin header's value", ORIGIN_SECRET.into()),
        (
            "the HMAC secret",
            String::from_utf8(SECRET.to_vec()).expect("text"),
        ),
        ("the admin token", ADMIN_TOKEN.into()),
        ("the client's JWT", token.clone()),
        ("the client's JWT signature", signature(&token)),
        ("the forged JWT's signature", signature(&forged)),
        ("the forbidden JWT's signature", signature(&only_redis)),
    ];

    let gw = Wsgate::spawn(&args);
    let mut answers: Vec<(String, String)> = Vec::new();

    // Clients that get in, a token each way, on every route.
    let mut admitted = Vec::new();
    for (what, target, extra) in [
        (
            "header",
            "/ws?symbol=btc".to_owned(),
            format!("Authorization: Bearer {token}\r\n"),
        ),
        (
            "query",
            format!("/redis?access_token={token}"),
            String::new(),
        ),
        (
            "subprotocol",
            "/redis-wrong".to_owned(),
            format!("Sec-WebSocket-Protocol: bearer.{token}\r\n"),
        ),
        (
            "cookie",
            "/redis-down".to_owned(),
            format!("Cookie: a=b; wsgate_token={token}\r\n"),
        ),
    ] {
        let (stream, head) = upgrade_with(gw.addr, &target, &extra);
        assert_eq!(status_of(&head), 101, "{what}: {head}");
        answers.push((format!("the {what} client's 101"), head));
        admitted.push((what, stream));
    }
    // And some that do not.
    for (what, target, extra, status) in [
        (
            "forged token",
            "/ws?symbol=btc".to_owned(),
            format!("Authorization: Bearer {forged}\r\n"),
            401,
        ),
        (
            "forged token in the query",
            format!("/ws?symbol=btc&access_token={forged}"),
            String::new(),
            401,
        ),
        ("no token", "/ws?symbol=btc".to_owned(), String::new(), 401),
        (
            "token for another route",
            "/ws?symbol=btc".to_owned(),
            format!("Authorization: Bearer {only_redis}\r\n"),
            403,
        ),
        (
            "unknown path",
            format!("/nowhere?access_token={token}"),
            String::new(),
            404,
        ),
    ] {
        let answer = http_exchange(gw.addr, &upgrade_request(&target, &extra));
        assert_eq!(status_of(&answer), status, "{what}: {answer}");
        answers.push((format!("the {what} refusal"), answer));
    }

    // The credentials are in use: the origin got its header, the live
    // Redis route delivers, the wrong password and the dead port fail.
    let got = receive_while(&mut admitted[0].1, || {
        origin.send_seq(1);
    });
    assert_eq!(got, b"1");
    let sent_header = origin.events().iter().any(|e| {
        matches!(e, OriginEvent::Connected { headers, .. }
            if headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("authorization")
                && v.contains(ORIGIN_SECRET)))
    });
    assert!(sent_header, "the origin header never reached the origin");
    let mut con = redis.connect().expect("a connection to redis");
    let got = receive_while(&mut admitted[1].1, || {
        redis.publish(&mut con, "ch", "r1");
    });
    assert_eq!(got, b"r1");
    let failures = |cause: &str| {
        metric(
            gw.admin,
            &format!("wsgate_origin_failures_total{{cause=\"{cause}\"}}"),
        )
    };
    wait_until("a refused AUTH and a refused connect", || {
        failures("upgrade") >= 1.0 && failures("connect") >= 2.0
    });
    // A reload reads the files again.
    gw.signal("HUP");
    wait_until("the reload", || {
        gw.printed().contains("configuration reloaded")
    });

    // Every admin answer, with the token, without it and with a wrong one.
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    for path in ["/", "/metrics", "/lobbies", "/livez", "/readyz", "/nope"] {
        for (how, auth) in [
            ("with the token", bearer.as_str()),
            ("without a token", ""),
            (
                "with a wrong token",
                "Authorization: Bearer adm1n-t0ken-n3ver-sh0wn-4243\r\n",
            ),
        ] {
            let answer = http_exchange(
                gw.admin,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
            );
            assert!(answer.starts_with("HTTP/1.1 "), "{path} {how}: {answer}");
            answers.push((format!("admin {path} {how}"), answer));
        }
    }
    let post = http_exchange(
        gw.admin,
        &format!("POST /metrics HTTP/1.1\r\nHost: x\r\n{bearer}Content-Length: 0\r\n\r\n"),
    );
    answers.push(("admin POST /metrics".into(), post));
    for (what, answer) in &answers {
        let wanted = match what.as_str() {
            "admin /metrics without a token" | "admin /metrics with a wrong token" => Some(401),
            "admin /lobbies without a token" | "admin /lobbies with a wrong token" => Some(401),
            "admin /metrics with the token" | "admin /lobbies with the token" => Some(200),
            "admin /nope with the token" => Some(404),
            "admin POST /metrics" => Some(405),
            _ => None,
        };
        if let Some(status) = wanted {
            assert_eq!(status_of(answer), status, "{what}: {answer}");
        }
    }
    let metrics = &answers
        .iter()
        .find(|(what, _)| what == "admin /metrics with the token")
        .expect("the metrics")
        .1;
    assert!(
        metrics.contains(r#"wsgate_auth_total{route="/ws",result="invalid"} 2"#),
        "{metrics}"
    );

    let printed = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .arg("--print-config")
        .output()
        .expect("run wsgate --print-config");
    assert_eq!(printed.status.code(), Some(0), "{printed:?}");
    let config_text = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(config_text.contains("[[route]]"), "{config_text}");
    answers.push(("--print-config".into(), config_text));
    answers.push((
        "--print-config's stderr".into(),
        String::from_utf8_lossy(&printed.stderr).into_owned(),
    ));

    drop(admitted);
    gw.signal("TERM");
    let (code, stdout, stderr) = gw.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopped: clients served"), "{stderr}");
    // What was logged at debug: the refusals, the admin requests.
    assert!(stderr.contains("refused with 401"), "{stderr}");
    assert!(stderr.contains("refused with 403"), "{stderr}");
    assert!(stderr.contains("admin: 127.0.0.1"), "{stderr}");
    // And the Redis failures: the wrong password, the dead port.
    assert!(
        stderr.matches(": cannot connect: ").count() >= 3,
        "{stderr}"
    );

    let mut leaks = Vec::new();
    for (what, text) in &answers {
        for (secret, value) in &secrets {
            for line in text.lines().filter(|l| l.contains(value.as_str())) {
                leaks.push(format!("{secret} in {what}: {line}"));
            }
        }
    }
    let lines: Vec<(&str, &str)> = stdout
        .lines()
        .map(|l| ("stdout", l))
        .chain(stderr.lines().map(|l| ("stderr", l)))
        .collect();
    for (stream, line) in &lines {
        for (secret, value) in &secrets {
            if line.contains(value.as_str()) {
                leaks.push(format!("{secret} on {stream}: {line}"));
            }
        }
    }
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
    println!(
        "checked {} log lines ({} on stdout) and {} HTTP answers and printouts for {} secrets",
        lines.len(),
        stdout.lines().count(),
        answers.len(),
        secrets.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&secret_file);
}

/// The payload of the first text message `client` (upgraded by hand)
/// receives while `send` is called again and again: until the client's
/// lobby has it, what its upstream sends does not reach it.
#[track_caller]
fn receive_while(client: &mut TcpStream, mut send: impl FnMut()) -> Vec<u8> {
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let end = Instant::now() + DEADLINE;
    loop {
        send();
        match read_server_frame(client) {
            Ok((1, payload)) => break payload,
            Ok((opcode, _)) => panic!("opcode {opcode} before a text message"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(Instant::now() < end, "no message before the deadline");
            }
            Err(e) => panic!("no message: {e}"),
        }
    }
}

/// An upgrade request for `target` with `extra` header lines.
fn upgrade_request(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// The sum of the samples `name` (with its labels) in `/metrics`, asked
/// with the admin token; 0 if there are none.
fn metric(admin: SocketAddr, name: &str) -> f64 {
    let answer = http_exchange(
        admin,
        &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"),
    );
    answer
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .sum()
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// The `wsgate` binary as a child process with everything it prints kept:
/// standard output (every line, not only the first ones that name its
/// addresses) and its log. Signalled by its PID; killed and reaped on drop.
struct Wsgate {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Wsgate {
    /// Starts `wsgate` with `args` (with `--admin`); returns once it has
    /// printed both addresses.
    fn spawn(args: &[&str]) -> Wsgate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsgate");
        let keep = |mut from: Box<dyn Read + Send>, into: Arc<Mutex<String>>| {
            thread::spawn(move || {
                let mut reader = BufReader::new(&mut from);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    into.lock().expect("output").push_str(&line);
                    line.clear();
                }
            })
        };
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            keep(
                Box::new(child.stdout.take().expect("stdout")),
                stdout.clone(),
            ),
            keep(
                Box::new(child.stderr.take().expect("stderr")),
                stderr.clone(),
            ),
        ];
        let mut gw = Wsgate {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            stdout,
            stderr,
            readers,
        };
        let end = Instant::now() + DEADLINE;
        loop {
            let out = gw.stdout.lock().expect("stdout").clone();
            let admin = out.lines().find_map(|l| address_in(l, "http://"));
            if let Some(found) = address_in(&out, "ws://").zip(admin) {
                (gw.addr, gw.admin) = found;
                return gw;
            }
            let exited = gw.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < end,
                "wsgate printed no addresses (exit: {exited:?}):\n{}",
                gw.printed()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything printed so far, standard output then the log.
    fn printed(&self) -> String {
        let out = self.stdout.lock().expect("stdout").clone();
        out + &self.stderr.lock().expect("stderr")
    }

    /// Sends `SIG<name>`, by its PID.
    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} {}", self.child.id());
    }

    /// Waits for it to exit: its exit code, its standard output and its log.
    fn wait(mut self) -> (Option<i32>, String, String) {
        let status = self.child.wait().expect("wait for wsgate");
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let out = self.stdout.lock().expect("stdout").clone();
        let err = self.stderr.lock().expect("stderr").clone();
        (status.code(), out, err)
    }
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}
