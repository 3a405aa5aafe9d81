//! The certificates of the `wss-` scenarios: a throwaway CA and a leaf for
//! `localhost` and `127.0.0.1` that it signs, made with rcgen when the bench
//! starts (only if a `wss-` scenario was selected) and written as PEM files
//! into a directory of their own under the system's temp dir. wsgate serves
//! the leaf (`--tls-cert`, `--tls-key`), the clients trust the CA
//! (`client::Config::tls_ca`). The directory goes when [`Certs`] is dropped;
//! a bench killed by a signal leaves it behind (a few KiB, named after the
//! bench's pid).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The PEM files of one bench run's CA and leaf; see the module docs.
#[derive(Debug)]
pub struct Certs {
    dir: PathBuf,
    /// The CA certificate the clients trust.
    pub ca: PathBuf,
    /// The leaf's chain (leaf, then CA) wsgate serves.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

impl Certs {
    /// Makes the CA and the leaf and writes them out.
    pub fn generate() -> Result<Certs, String> {
        let failed = |e: rcgen::Error| format!("cannot make the wss certificates: {e}");
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsgate bench CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(failed)?)
            .map_err(failed)?;
        let key = KeyPair::generate().map_err(failed)?;
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let leaf = CertificateParams::new(names)
            .and_then(|params| params.signed_by(&key, &issuer))
            .map_err(failed)?;

        let dir = std::env::temp_dir().join(format!("wsgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // From here on the guard owns the directory: every early return removes it.
        let certs = Certs {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        let chain = format!("{}{}", leaf.pem(), issuer.pem());
        for (path, pem) in [
            (&certs.ca, issuer.pem()),
            (&certs.cert, chain),
            (&certs.key, key.serialize_pem()),
        ] {
            std::fs::write(path, pem)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(certs)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("bench: cannot remove {}: {e}", self.dir.display());
        }
    }
}
