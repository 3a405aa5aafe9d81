//! `wss://` from a real browser: headless Chromium opens a WebSocket to a
//! gateway serving TLS (`tls_cert`, `tls_key`) with a certificate from a
//! private CA the test makes with rcgen, fed by the in-process origin.
//! Chromium does not know that CA. Without help it refuses the certificate,
//! and the page never opens: the proof that the connection is TLS and is
//! checked. Then it trusts the leaf's key through
//! `--ignore-certificate-errors-spki-list` (the base64 SHA-256 of the key's
//! SubjectPublicKeyInfo) and receives every message in order. Pages are
//! served from loopback and report back to the test ([`Pages`]).

mod support;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, PublicKeyData,
};
use sha2::{Digest, Sha256};
use support::*;
use tungstenite::Message;

/// Messages the origin sends to the page once it is in.
const N: usize = 5;

#[test]
fn chromium_receives_over_wss_once_it_trusts_the_key_and_refuses_before() {
    let Some(chromium) = chromium() else {
        return;
    };
    let (chain_pem, key) = private_ca_leaf();
    let dir = std::env::temp_dir().join(format!("wsgate-tls-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let (cert_file, key_file) = (dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, chain_pem).expect("write the chain");
    std::fs::write(&key_file, key.serialize_pem()).expect("write the key");

    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.tls_cert = Some(cert_file);
    config.tls_key = Some(key_file);
    let gw = start_gateway(config);
    let url = format!("wss://localhost:{}/", gw.local_addr().port());
    let pages = Pages::start(vec![
        ("/untrusted", page("untrusted", &url)),
        ("/trusted", page("trusted", &url)),
    ]);

    // The CA is unknown to Chromium: the handshake fails, the page sees an
    // error and an abnormal close, and never an open.
    let browser = Browser::open(&chromium, &pages.url("/untrusted"));
    let refused = pages.wait_for_prefix("untrusted", "close-");
    drop(browser);
    assert_eq!(refused.get("opened"), "false", "{refused:?}");
    assert_eq!(refused.get("event"), "close-1006", "{refused:?}");
    wait_until("the refused handshake counted", || {
        gw.stats().tls_handshakes_failed >= 1
    });
    let stats = gw.stats();
    assert_eq!(
        (stats.tls_handshakes_ok, stats.clients),
        (0, 0),
        "{stats:?}"
    );

    // Trusting the leaf's key, the same page gets in and receives.
    let spki = base64::engine::general_purpose::STANDARD
        .encode(Sha256::digest(key.subject_public_key_info()));
    let trust = format!("--ignore-certificate-errors-spki-list={spki}");
    let browser = Browser::open_with(&chromium, &[&trust], &pages.url("/trusted"));
    let opened = pages.wait_for("trusted", "open");
    assert_eq!(opened.get("opened"), "true", "{opened:?}");
    wait_placed(&gw, 1);
    wait_until("an origin connection", || origin.open() >= 1);
    for n in 1..=N {
        origin.send(Message::text(format!("tls-{n}")));
    }
    let received = pages.wait_for("trusted", "received");
    let expected: Vec<String> = (1..=N).map(|n| format!("tls-{n}")).collect();
    assert_eq!(received.get("got"), expected.join("_"), "{received:?}");
    assert!(gw.stats().tls_handshakes_ok >= 1, "{:?}", gw.stats());
    drop(browser);
    wait_until("the browser's client gone", || gw.stats().clients == 0);
    gw.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A certificate for `localhost`, signed by a CA made here and trusted by
/// no one: the chain's PEM (leaf first) and the leaf's key.
fn private_ca_leaf() -> (String, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "wsgate browser test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key"))
        .expect("the CA");
    let key = KeyPair::generate().expect("a leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("leaf params")
        .signed_by(&key, &ca)
        .expect("the leaf");
    (format!("{}{}", leaf.pem(), ca.pem()), key)
}

/// A page that opens a WebSocket to `url` and reports to its server:
/// `open`, `received` (with what it got) once it has [`N`] messages,
/// `error`, and `close-CODE`.
fn page(way: &str, url: &str) -> String {
    format!(
        r#"<!doctype html><title>wsgate wss {way}</title><script>
const got = [];
let opened = false;
function report(event) {{
  const q = new URLSearchParams({{ way: "{way}", event, opened: String(opened), got: got.join("_") }});
  fetch("/report?" + q, {{ cache: "no-store" }});
}}
const ws = new WebSocket("{url}");
ws.onopen = () => {{ opened = true; report("open"); }};
ws.onmessage = (e) => {{ got.push(e.data); if (got.length === {N}) report("received"); }};
ws.onerror = () => report("error");
ws.onclose = (e) => report("close-" + e.code);
</script>"#
    )
}
