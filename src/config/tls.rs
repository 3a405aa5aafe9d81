//! The client listener's certificates chosen by name: [`TlsConfig`],
//! [`SniCert`] and their validation.
//!
//! [`Config::tls_cert`](crate::Config::tls_cert) and
//! [`Config::tls_key`](crate::Config::tls_key) are the default
//! certificate; each [`SniCert`] is served instead to clients that ask for
//! one of its names (SNI). The files are read when the gateway starts and
//! on every reload (`edge/tls.rs`), never here: validation reads no file.

use std::{collections::HashSet, path::PathBuf};

#[cfg(feature = "config-file")]
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `[tls]` table of a config file: the certificates served by name,
/// beside the default one ([`Config::tls_cert`](crate::Config::tls_cert),
/// [`Config::tls_key`](crate::Config::tls_key)).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct TlsConfig {
    /// Certificates served to clients that ask for one of their names
    /// (SNI): a client whose name no entry lists, or that sends none (an
    /// address, an old client), gets the default certificate, which they
    /// need. An exact name is preferred to a wildcard. In a config file,
    /// `[[tls.cert]]` tables. Re-read on reload with the default one.
    /// Defaults to none.
    #[cfg_attr(feature = "config-file", serde(rename = "cert"))]
    pub certs: Vec<SniCert>,
}

impl TlsConfig {
    /// Whether it lists no certificate.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// One certificate served by name: a `[[tls.cert]]` table.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct SniCert {
    /// The server names it is served for: host names (`a.example`,
    /// matched whatever their case) or wildcards of one leftmost label
    /// (`*.b.example` matches `x.b.example`, not `b.example` nor
    /// `y.x.b.example`). A name may be listed once across the entries.
    /// The first one names the certificate in metrics.
    pub server_names: Vec<String>,
    /// PEM file of its certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl SniCert {
    /// A certificate served for `server_names` from these files.
    pub fn new(
        server_names: impl IntoIterator<Item = impl Into<String>>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> SniCert {
        SniCert {
            server_names: server_names.into_iter().map(Into::into).collect(),
            cert: cert.into(),
            key: key.into(),
        }
    }
}

/// The label of the default certificate in metrics: no server name may
/// take it.
pub(crate) const DEFAULT_NAME: &str = "default";

impl TlsConfig {
    /// Checks the certificates served by name: each has names, a chain and
    /// a key; every name is a host name or a wildcard, listed once; and
    /// there is a default certificate to serve the others (`has_default`:
    /// [`Config::tls_cert`](crate::Config::tls_cert) is set).
    pub(super) fn validate(&self, has_default: bool) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        if !has_default {
            return Err(Error::Config(
                "tls.cert: certificates by name need a default one too \
                 (tls_cert and tls_key), served to clients that ask for another name or none"
                    .into(),
            ));
        }
        let mut seen = HashSet::new();
        for (index, entry) in self.certs.iter().enumerate() {
            let which = match entry.server_names.first() {
                Some(name) => format!("tls.cert {name}"),
                None => format!("tls.cert #{}", index + 1),
            };
            let bad = |what: String| Err(Error::Config(format!("{which}: {what}")));
            if entry.server_names.is_empty() {
                return bad("server_names: lists no name".into());
            }
            if entry.cert.as_os_str().is_empty() {
                return bad("cert: missing (the PEM file of its certificate chain)".into());
            }
            if entry.key.as_os_str().is_empty() {
                return bad("key: missing (the PEM file of its private key)".into());
            }
            for name in &entry.server_names {
                if let Err(why) = check_server_name(name) {
                    return bad(format!("server_names: {name:?} {why}"));
                }
                if !seen.insert(name.to_ascii_lowercase()) {
                    return bad(format!("server_names: {name} is listed twice"));
                }
            }
        }
        Ok(())
    }
}

/// Whether `name` is a host name a client may ask for (letters, digits and
/// hyphens in dot-separated labels of up to 63, 253 in all) or a wildcard
/// `*.` followed by one of at least two labels; `Err` says why not.
fn check_server_name(name: &str) -> Result<(), &'static str> {
    if name.eq_ignore_ascii_case(DEFAULT_NAME) {
        return Err("is the default certificate's label");
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.len() > 253 {
        return Err("is longer than 253 bytes");
    }
    let labels: Vec<&str> = host.split('.').collect();
    if host.len() < name.len() && labels.len() < 2 {
        return Err("is a wildcard over a top-level domain");
    }
    for label in &labels {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err("is not a host name (a wildcard is `*.` then a name)");
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("is an address, which clients do not send as a name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn with(certs: Vec<SniCert>) -> Config {
        let mut c = Config {
            origin: "ws://127.0.0.1:1/".into(),
            tls_cert: Some("/default.pem".into()),
            tls_key: Some("/default.key".into()),
            ..Config::default()
        };
        c.tls.certs = certs;
        c
    }

    fn error(c: &Config) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn names_are_host_names_or_one_label_wildcards() {
        for good in [
            "a.example",
            "A-1.Example",
            "*.b.example",
            "localhost",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(check_server_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "*",
            "*.com",
            "a.*.example",
            "a..example",
            "a.example.",
            "-a.example",
            "a_b.example",
            "a b",
            "10.0.0.1",
            "*b.example",
            "default",
            "a.example:443",
        ] {
            assert!(check_server_name(bad).is_err(), "{bad}");
        }
        assert!(check_server_name(&format!("{}.example", "a".repeat(64))).is_err());
    }

    #[test]
    fn each_entry_is_checked_and_named() {
        let ok = with(vec![
            SniCert::new(["a.example"], "/a.pem", "/a.key"),
            SniCert::new(["*.b.example", "b.example"], "/b.pem", "/b.key"),
        ]);
        ok.validate().unwrap();

        let twice = with(vec![
            SniCert::new(["a.example"], "/a.pem", "/a.key"),
            SniCert::new(["c.example", "A.example"], "/c.pem", "/c.key"),
        ]);
        let err = error(&twice);
        assert!(
            err.contains("tls.cert c.example") && err.contains("A.example is listed twice"),
            "{err}"
        );

        let no_key = with(vec![SniCert::new(["a.example"], "/a.pem", "")]);
        let err = error(&no_key);
        assert!(err.contains("tls.cert a.example: key: missing"), "{err}");
        let no_cert = with(vec![SniCert::new(["a.example"], "", "/a.key")]);
        assert!(error(&no_cert).contains("cert: missing"));
        let nameless = with(vec![SniCert::new(Vec::<String>::new(), "/a.pem", "/a.key")]);
        assert!(error(&nameless).contains("tls.cert #1: server_names: lists no name"));
        let bad_name = with(vec![SniCert::new(["a.*.example"], "/a.pem", "/a.key")]);
        assert!(error(&bad_name).contains("\"a.*.example\" is not a host name"));

        let mut no_default = with(vec![SniCert::new(["a.example"], "/a.pem", "/a.key")]);
        no_default.tls_cert = None;
        no_default.tls_key = None;
        assert!(error(&no_default).contains("need a default one too"));
    }

    #[test]
    fn a_second_listener_needs_a_certificate_and_its_own_address() {
        let mut c = with(Vec::new());
        c.listen = "127.0.0.1:8080".parse().unwrap();
        c.tls_listen = Some("127.0.0.1:8443".parse().unwrap());
        c.validate().unwrap();
        c.tls_listen = Some(c.listen);
        assert!(error(&c).contains("tls_listen: 127.0.0.1:8080 is the plain listener's"));
        c.tls_listen = Some("127.0.0.1:8443".parse().unwrap());
        c.tls_cert = None;
        c.tls_key = None;
        assert!(error(&c).contains("tls_listen: a wss:// listener needs a certificate"));
    }

    #[cfg(feature = "config-file")]
    #[test]
    fn the_file_form_is_tls_cert_tables() {
        let c = Config::from_toml(
            "tls_cert = \"/d.pem\"\ntls_key = \"/d.key\"\n\
             [[tls.cert]]\nserver_names = [\"a.example\", \"*.b.example\"]\n\
             cert = \"/a.pem\"\nkey = \"/a.key\"\n",
        )
        .unwrap();
        assert_eq!(
            c.tls.certs,
            [SniCert::new(
                ["a.example", "*.b.example"],
                "/a.pem",
                "/a.key"
            )]
        );
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        let err = Config::from_toml("[[tls.cert]]\nnames = [\"a.example\"]\n").unwrap_err();
        assert!(err.to_string().contains("names"), "{err}");
    }
}
