//! `wss://` origins: a private CA through `origin_ca`, and the failures that
//! must be retried (wrong CA, wrong host name). The origin is an in-process
//! rustls server whose certificates come from a test CA made with rcgen.
#![cfg(feature = "tls")]

mod support;

use std::{path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// Writes the CA certificate to a PEM file for the gateway's `origin_ca`.
    fn pem_file(&self) -> TempFile {
        // Tests run in parallel: each file gets its own name.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("wsgate-test-{}-{n}.pem", std::process::id()));
        std::fs::write(&path, self.issuer.pem()).unwrap();
        TempFile(path)
    }

    /// A TLS server configuration for `host`, signed by this CA.
    fn server_config(&self, host: &str) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tls_origin(config: Arc<rustls::ServerConfig>) -> TestOrigin {
    TestOrigin::start_with(OriginOptions {
        tls: Some(config),
        ..OriginOptions::default()
    })
}

/// A gateway dialling `origin` as `wss://host`, trusting only `ca`; the CA
/// file lives as long as the returned guard.
fn gateway_trusting(origin: &TestOrigin, host: &str, ca: &Ca) -> (wsgate::GatewayHandle, TempFile) {
    let mut config = test_config(&format!("wss://{host}:{}/feed", origin.addr().port()));
    let ca_file = ca.pem_file();
    config.origin_ca = Some(ca_file.0.clone());
    (start_gateway(config), ca_file)
}

#[test]
fn wss_with_a_private_ca_delivers() {
    let ca = Ca::new();
    let origin = tls_origin(ca.server_config("localhost"));
    let (gw, _ca_file) = gateway_trusting(&origin, "localhost", &ca);
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("the TLS origin connection", || origin.open() == 1);
    origin.send_seq(42);
    assert_eq!(recv_text(&mut client), "42");
    assert_eq!(gw.stats().origin_failed_tls, 0);
}

#[test]
fn the_wrong_ca_fails_and_keeps_retrying() {
    let origin = tls_origin(Ca::new().server_config("localhost"));
    let (gw, _ca_file) = gateway_trusting(&origin, "localhost", &Ca::new());
    let _client = connect_clients(&gw, 1);
    wait_until("repeated TLS failures", || {
        gw.stats().origin_failed_tls >= 3
    });
    assert_eq!(origin.accepted(), 0);
    assert_eq!(gw.stats().origin_connections, 0);
}

#[test]
fn the_wrong_host_name_fails_and_keeps_retrying() {
    let ca = Ca::new();
    let origin = tls_origin(ca.server_config("feed.example"));
    let (gw, _ca_file) = gateway_trusting(&origin, "localhost", &ca);
    let _client = connect_clients(&gw, 1);
    wait_until("repeated TLS failures", || {
        gw.stats().origin_failed_tls >= 3
    });
    assert_eq!(origin.accepted(), 0);
}

#[test]
fn an_unreadable_ca_file_is_a_start_up_error() {
    let mut config = test_config("wss://localhost:1/");
    config.origin_ca = Some(PathBuf::from("/nonexistent/ca.pem"));
    let err = wsgate::Gateway::start(config).unwrap_err();
    assert!(err.to_string().contains("origin CA"), "{err}");
}
