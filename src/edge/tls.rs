//! `wss://` for clients: the client listener's rustls server configuration.
//!
//! Built from [`Config::tls_cert`](crate::Config::tls_cert) and
//! [`Config::tls_key`](crate::Config::tls_key), the default certificate,
//! and the certificates served by name ([`Config::tls`](crate::Config::tls),
//! picked by the client's SNI in [`ByName`]) when the gateway starts and
//! again at each reload (on the reloading thread, never the acceptor's), and
//! handed to the acceptor, which starts every new connection's session from
//! the newest one: clients already connected keep their sessions, so a
//! rotation drops nobody. A reload keeps the ticket keys and the session
//! cache, so clients resume across a rotation. TLS 1.3 and 1.2 (the key
//! exchanges, signatures and ticket keys of aws-lc-rs, whose handshakes
//! cost less than ring's; the cipher suites' record protection of ring,
//! whose AES-GCM costs less than aws-lc-rs's on this machine: see
//! [`provider`]), ALPN `http/1.1`, stateless session tickets (TLS 1.3 and
//! 1.2) and a session-id cache (TLS 1.2).
//!
//! The handshake itself is driven by the acceptor (`acceptor.rs`), its
//! costly part processed there or on the TLS handshake threads
//! (`handshake.rs`), the records after it on the client's writer, all
//! through `wire/tls.rs`. Compiled only with the `tls` feature.

use std::{collections::HashMap, io, path::Path, sync::Arc};

use rustls::{
    ServerConfig, ServerConnection,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{
        ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
        StoresServerSessions,
    },
    sign::CertifiedKey,
};

use crate::{
    config::{Config, DEFAULT_CERT_NAME},
    error::{Error, Result},
    stats::{TLS_SUITES, TlsFailure},
};

/// TLS 1.2 sessions remembered for resumption by session id (TLS 1.3 and
/// most TLS 1.2 clients use tickets, which cost no memory here).
const SESSION_CACHE: usize = 4096;

/// The client listener's TLS: the configuration new sessions start from.
#[derive(Debug, Clone)]
pub(crate) struct ServerTls {
    /// What new sessions start from.
    pub config: Arc<ServerConfig>,
    /// Each certificate's name in metrics (`default`, or the first server
    /// name of a `[[tls.cert]]`) and when its leaf expires, in seconds
    /// since the Unix epoch (`None` if its DER could not be read for it);
    /// the default first.
    pub expiry: Vec<(String, Option<u64>)>,
}

impl ServerTls {
    /// Reads every certificate chain and key of `config`: the default pair
    /// (`tls_cert`, `tls_key`) and each `[[tls.cert]]`. `None` if it has no
    /// default pair. `running`, at a reload, lends its ticket keys and
    /// session cache so that sessions resume across the rotation. If any
    /// pair cannot be used, nothing is: the [`Error::Config`] names the
    /// files of every pair that failed.
    pub(crate) fn load(config: &Config, running: Option<&ServerTls>) -> Result<Option<ServerTls>> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(None);
        };
        let provider = Arc::new(provider());
        let mut failed = Vec::new();
        let mut expiry = Vec::new();
        let default = match certified(cert, key, &provider) {
            Ok((certified, not_after)) => {
                expiry.push((DEFAULT_CERT_NAME.to_owned(), not_after));
                Some(certified)
            }
            Err(e) => {
                failed.push(format!("tls_cert, tls_key: {e}"));
                None
            }
        };
        let mut names = ByName::default();
        for entry in &config.tls.certs {
            let first = entry.server_names.first().map_or("", String::as_str);
            match certified(&entry.cert, &entry.key, &provider) {
                Ok((certified, not_after)) => {
                    expiry.push((first.to_ascii_lowercase(), not_after));
                    for name in &entry.server_names {
                        let name = name.to_ascii_lowercase();
                        match name.strip_prefix("*.") {
                            Some(parent) => names
                                .wildcard
                                .insert(parent.to_owned(), Arc::clone(&certified)),
                            None => names.exact.insert(name, Arc::clone(&certified)),
                        };
                    }
                }
                Err(e) => failed.push(format!("tls.cert {first}: {e}")),
            }
        }
        let Some(default) = default.filter(|_| failed.is_empty()) else {
            return Err(Error::Config(failed.join("; ")));
        };
        names.default = Some(default);
        let (ticketer, sessions) = match running {
            Some(running) => (
                Arc::clone(&running.config.ticketer),
                Arc::clone(&running.config.session_storage),
            ),
            None => (new_ticketer()?, new_session_cache()),
        };
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::Config(format!("tls: setup failed: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(names));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.ticketer = ticketer;
        server.session_storage = sessions;
        Ok(Some(ServerTls {
            config: Arc::new(server),
            expiry,
        }))
    }

    /// A session for a connection just accepted.
    pub(crate) fn session(&self) -> std::result::Result<Box<ServerConnection>, rustls::Error> {
        ServerConnection::new(Arc::clone(&self.config)).map(Box::new)
    }
}

/// The chain at `cert` with the key at `key`, checked to belong together,
/// and when its leaf expires; the error names the file at fault.
fn certified(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> std::result::Result<(Arc<CertifiedKey>, Option<u64>), String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{} holds no certificate", cert.display()));
    };
    let not_after = not_after(leaf);
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        format!(
            "{} and {} are not a usable pair: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok((Arc::new(certified), not_after))
}

/// Picks a connection's certificate by the name its client asks for (SNI):
/// an exact name first, then a wildcard over the name's parent, then the
/// default (for any other name, or none).
#[derive(Debug, Default)]
struct ByName {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the name a `*.` wildcard stands over: `b.example` for `*.b.example`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello.server_name().and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.exact
                .get(&name)
                .or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent)
                })
                .cloned()
        });
        by_name.or_else(|| self.default.clone())
    }
}

/// Why a handshake that `read` (`wire/tls.rs`) ended with `error` failed.
pub(crate) fn failure(error: &io::Error) -> TlsFailure {
    let Some(error) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return TlsFailure::Other;
    };
    match error {
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::PeerMisbehaved(_) => TlsFailure::BadMessage,
        rustls::Error::PeerIncompatible(_) => TlsFailure::Incompatible,
        rustls::Error::AlertReceived(_) => TlsFailure::PeerAlert,
        _ => TlsFailure::Other,
    }
}

/// The place in [`TLS_SUITES`] of the cipher suite `session` negotiated.
pub(crate) fn suite(session: &ServerConnection) -> Option<usize> {
    let name = session.negotiated_cipher_suite()?.suite().as_str()?;
    TLS_SUITES.iter().position(|s| *s == name)
}

/// The client listener's cryptography: aws-lc-rs for the handshake (its
/// key exchanges and signatures: 0.48-0.50x nginx's CPU per TLS 1.3
/// handshake, ring 0.58-0.68x) and ring's cipher suites for the records
/// (its AES-GCM: 64 KiB messages to 200 clients cost 75-78 us per delivery
/// against 87-99 with aws-lc-rs's, in the same runs; README, wss:// for
/// clients). Both are in every `tls` build already.
fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: rustls::crypto::ring::default_provider().cipher_suites,
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

fn new_ticketer() -> Result<Arc<dyn ProducesTickets>> {
    rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| Error::Config(format!("tls: cannot make session ticket keys: {e}")))
}

fn new_session_cache() -> Arc<dyn StoresServerSessions> {
    ServerSessionMemoryCache::new(SESSION_CACHE)
}

/// The `notAfter` of a DER certificate, in seconds since the Unix epoch:
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE {
/// notBefore, notAfter }, .. }, .. } (RFC 5280 §4.1).
fn not_after(der: &[u8]) -> Option<u64> {
    let (cert, _) = element(der, 0x30)?;
    let (mut tbs, _) = element(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs, 0xa0)?.1;
    }
    for _ in 0..3 {
        // serialNumber, signature, issuer
        let tag = *tbs.first()?;
        tbs = element(tbs, tag)?.1;
    }
    let (validity, _) = element(tbs, 0x30)?;
    let tag = *validity.first()?;
    let (_, rest) = element(validity, tag)?;
    let tag = *rest.first()?;
    let (time, _) = element(rest, tag)?;
    match tag {
        0x17 => der_time(time, 2),
        0x18 => der_time(time, 4),
        _ => None,
    }
}

/// The contents of the DER element at the start of `input`, if its tag is
/// `tag`, and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let count = usize::from(len & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(count)?;
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    rest.split_at_checked(len)
}

/// A UTCTime (`year_digits` 2: YYMMDDHHMMSSZ, years 1950 to 2049) or
/// GeneralizedTime (4: YYYYMMDDHHMMSSZ) as seconds since the Unix epoch.
fn der_time(text: &[u8], year_digits: usize) -> Option<u64> {
    if text.len() != year_digits + 11 || text.last() != Some(&b'Z') {
        return None;
    }
    let number = |at: usize, len: usize| -> Option<u64> {
        text.get(at..at + len)?.iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    };
    let mut year = number(0, year_digits)?;
    if year_digits == 2 {
        year += if year < 50 { 2000 } else { 1900 };
    }
    let at = year_digits;
    let (month, day) = (number(at, 2)?, number(at + 2, 2)?);
    let (hour, minute, second) = (number(at + 4, 2)?, number(at + 6, 2)?, number(at + 8, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, date_time_ymd};

    #[test]
    fn the_expiry_is_read_from_the_leaf() {
        for (year, month, day, unix) in [
            (2030, 1, 2, 1_893_542_400),
            (2049, 12, 31, 2_524_521_600),
            (2051, 3, 1, 2_561_241_600),
            (1999, 7, 4, 931_046_400),
        ] {
            let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params.not_after = date_time_ymd(year, month, day);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(not_after(cert.der()), Some(unix), "{year}-{month}-{day}");
        }
        assert_eq!(not_after(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(not_after(b""), None);
    }

    #[test]
    fn dates_count_from_the_epoch() {
        assert_eq!(der_time(b"700101000000Z", 2), Some(0));
        assert_eq!(der_time(b"19700102000001Z", 4), Some(86_401));
        assert_eq!(der_time(b"000229120000Z", 2), Some(951_825_600));
        assert_eq!(der_time(b"0002291200Z", 2), None);
        assert_eq!(der_time(b"001329120000Z", 2), None);
    }
}
