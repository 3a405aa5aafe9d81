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
    fn pem_file(&self, name: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("wsgate-test-{}-{name}.pem", std::process::id()));
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

fn wss_url(origin: &TestOrigin, host: &str) -> String {
    format!("wss://{host}:{}/feed", origin.addr().port())
}

#[test]
fn wss_with_a_private_ca_delivers() {
    let ca = Ca::new();
    let origin = tls_origin(ca.server_config("localhost"));
    let mut config = test_config(&wss_url(&origin, "localhost"));
    let ca_file = ca.pem_file("good");
    config.origin_ca = Some(ca_file.0.clone());
    let gw = start_gateway(config);
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("the TLS origin connection", || origin.open() == 1);
    origin.send_seq(42);
    assert_eq!(recv_text(&mut client), "42");
    assert_eq!(gw.stats().origin_failed_tls, 0);
}

#[test]
fn the_wrong_ca_fails_and_keeps_retrying() {
    let origin = tls_origin(Ca::new().server_config("localhost"));
    let mut config = test_config(&wss_url(&origin, "localhost"));
    let ca_file = Ca::new().pem_file("other");
    config.origin_ca = Some(ca_file.0.clone());
    let gw = start_gateway(config);
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
    let mut config = test_config(&wss_url(&origin, "localhost"));
    let ca_file = ca.pem_file("host");
    config.origin_ca = Some(ca_file.0.clone());
    let gw = start_gateway(config);
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
