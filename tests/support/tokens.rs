//! Client authentication in the tests: JWTs minted with the keys in
//! `tests/support/keys/` (made for these tests with `openssl genpkey`; they
//! protect nothing), a secret file, and a real HTTP auth service on a
//! loopback port that counts and answers (upgrades that present a token
//! are `upgrade_with` in `mod.rs`).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};

/// The path of a test key file.
pub fn key_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support/keys")
        .join(name)
}

/// A 48-byte HMAC secret.
pub const SECRET: &[u8] = b"the-tests-hmac-secret-that-is-long-enough-000001";

/// A file holding [`SECRET`] (and a newline, as editors leave).
pub fn secret_file(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("wsgate-secret-{}-{tag}", std::process::id()));
    let mut bytes = SECRET.to_vec();
    bytes.push(b'\n');
    std::fs::write(&path, bytes).expect("write the secret file");
    path
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The signing key for `alg`: the secret, or the private key of its kind.
pub fn signing_key(alg: Algorithm) -> EncodingKey {
    let pem = |name: &str| std::fs::read(key_file(name)).expect("read a test key");
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(SECRET),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("ec256.key")).expect("ec256"),
        Algorithm::ES384 => EncodingKey::from_ec_pem(&pem("ec384.key")).expect("ec384"),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed25519.key")).expect("ed25519"),
        _ => EncodingKey::from_rsa_pem(&pem("rsa.key")).expect("rsa"),
    }
}

/// The public key file that verifies `alg`'s tokens.
pub fn public_key_file(alg: Algorithm) -> PathBuf {
    key_file(match alg {
        Algorithm::ES256 => "ec256.pub.pem",
        Algorithm::ES384 => "ec384.pub.pem",
        Algorithm::EdDSA => "ed25519.pub.pem",
        _ => "rsa.pub.pem",
    })
}

/// A token signed for `alg` with `claims`, its header naming `kid` if given.
pub fn mint(alg: Algorithm, claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &signing_key(alg)).expect("sign a token")
}

/// Claims valid for `secs` from now.
pub fn claims_for(secs: u64) -> Value {
    json!({ "sub": "tester", "exp": now() + secs })
}

/// A JWKS file of the public keys of `algs`, each with its `kid` (its
/// algorithm's name), written for test `tag`.
pub fn jwks_file(tag: &str, algs: &[Algorithm]) -> PathBuf {
    let keys: Vec<Value> = algs
        .iter()
        .map(|alg| {
            let kid = format!("{alg:?}");
            if *alg == Algorithm::EdDSA {
                // jsonwebtoken makes no Ed25519 JWK: its public key is the
                // last 32 bytes of the SubjectPublicKeyInfo.
                let der = pem_der(&public_key_file(*alg));
                let x = base64url(&der[der.len() - 32..]);
                return json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid });
            }
            let mut jwk = Jwk::from_encoding_key(&signing_key(*alg), *alg).expect("a jwk");
            jwk.common.key_id = Some(kid);
            serde_json::to_value(jwk).expect("jwk to json")
        })
        .collect();
    let path = std::env::temp_dir().join(format!("wsgate-jwks-{}-{tag}.json", std::process::id()));
    std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write the jwks");
    path
}

/// The DER of a PEM file's first block.
pub fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("read a PEM file");
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = body.bytes().filter(|c| *c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().fold(0u32, |n, d| n << 6 | u32::from(*d)) << (6 * (4 - q.len()));
            let bytes = n.to_be_bytes();
            bytes[1..q.len()].to_vec()
        })
        .collect()
}

/// base64url without padding (RFC 4648, section 5).
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// How a test auth service answers.
#[derive(Debug, Clone)]
pub struct AuthBehaviour {
    /// The status it answers with.
    pub status: u16,
    /// Extra response header lines (each ending in CRLF).
    pub headers: String,
    /// How long it waits before answering.
    pub delay: Duration,
}

impl Default for AuthBehaviour {
    fn default() -> Self {
        AuthBehaviour {
            status: 200,
            headers: String::new(),
            delay: Duration::ZERO,
        }
    }
}

/// A real HTTP/1.1 auth service on a loopback port (keep-alive, one thread
/// per connection): it counts the requests it answers and keeps their heads.
pub struct AuthService {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Requests received, each counted before it is answered.
    pub requests: Arc<AtomicUsize>,
    /// Connections accepted (fewer than requests: kept alive).
    pub connections: Arc<AtomicUsize>,
    /// The request heads received, in order.
    pub heads: Arc<Mutex<Vec<String>>>,
    /// When each answer was sent, in order.
    pub answered: Arc<Mutex<Vec<std::time::Instant>>>,
    thread: Option<JoinHandle<()>>,
}

impl AuthService {
    /// Starts a service answering as `behaviour` says.
    pub fn start(behaviour: AuthBehaviour) -> AuthService {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the auth service");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let (s, r, h, a) = (
            stop.clone(),
            requests.clone(),
            heads.clone(),
            answered.clone(),
        );
        let thread = thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let (s, r, h, a, b) = (
                            s.clone(),
                            r.clone(),
                            h.clone(),
                            a.clone(),
                            behaviour.clone(),
                        );
                        conns.push(thread::spawn(move || serve(stream, &s, &r, &h, &a, &b)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for conn in conns {
                let _ = conn.join();
            }
        });
        AuthService {
            addr,
            stop,
            requests,
            connections,
            heads,
            answered,
            thread: Some(thread),
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/check", self.addr)
    }
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    stop: &AtomicBool,
    requests: &AtomicUsize,
    heads: &Mutex<Vec<String>>,
    answered: &Mutex<Vec<std::time::Instant>>,
    behaviour: &AuthBehaviour,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        heads.lock().expect("heads").push(head);
        // Counted as asked before the answer goes, so a test that has its
        // client's answer sees the question counted.
        requests.fetch_add(1, Ordering::SeqCst);
        thread::sleep(behaviour.delay);
        let body = "ok\n";
        let response = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n{}\r\n{body}",
            behaviour.status,
            body.len(),
            behaviour.headers
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
        answered
            .lock()
            .expect("answered")
            .push(std::time::Instant::now());
    }
}
