//! TLS for `wss://` origins: the rustls client configuration.
//!
//! Built once at start-up from the configuration (the webpki roots, or a
//! private CA from a PEM file) and shared by every lobby; the handshake itself
//! is driven by the WebSocket origin link (`websocket/`); a
//! `rediss://` source uses the redis crate's own rustls setup. Compiled
//! only with the `tls` feature.

use std::{path::Path, sync::Arc};

use rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};
use rustls_pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// The client configuration for origin connections, trusting `ca` if given
/// and the webpki roots otherwise.
pub(crate) fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::Config(format!("cannot read origin CA {}: {e}", path.display()))
                })?;
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "origin CA {} holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    Error::Config(format!("origin CA {} is not usable: {e}", path.display()))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
