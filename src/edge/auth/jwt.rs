//! JWT verification: a route's keys, each pinned to one algorithm, and the
//! check of a token against them.
//!
//! [`Keys::load`] reads a secret (file or environment variable), a PEM
//! public key or a JWKS file on the thread that starts or reloads the
//! gateway; [`Keys::verify`] runs on the acceptor thread at the upgrade:
//! pure CPU, no I/O, no allocation beyond the token's claims. A token is
//! refused unless its header names exactly the algorithm its key is pinned
//! to (no `none`, no HS256 signed with a public key as its secret), its
//! signature verifies, and its `exp`, `nbf`, `iss` and `aud` hold. The
//! signature is checked by `jsonwebtoken`; the clock checks are done here,
//! against the time the caller passes, so they are exact and testable.

use std::{fmt, fs, path::Path, str::FromStr};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::{Map, Value};

use crate::{
    config::AuthConfig,
    error::{Error, Result},
};

/// A verified token's claims that matter to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claims {
    /// Its `exp`, in seconds since the Unix epoch.
    pub exp: u64,
    /// What its claim (`AuthConfig::jwt_claim`) lists, raw: `None` when
    /// the token has no such claim (it may open any route).
    pub allowed: Option<Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Malformed, wrong algorithm, unknown key, bad signature, wrong
    /// issuer or audience: the token is not one of ours.
    Invalid(&'static str),
    /// Past its `exp`, or before its `nbf` (the leeway allowed).
    Expired,
}

/// One verifying key and the one algorithm it accepts.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// The checks `jsonwebtoken` makes for it: this algorithm alone, and
    /// the route's issuer and audience (made once, not per token).
    validation: Validation,
}

/// A route's JWT keys and the claims it checks.
pub(crate) struct Keys {
    keys: Vec<Key>,
    leeway: u64,
    claim: String,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material: a secret must not reach a log line.
        let algs: Vec<String> = self
            .keys
            .iter()
            .map(|k| match &k.kid {
                Some(kid) => format!("{:?} ({kid})", k.alg),
                None => format!("{:?}", k.alg),
            })
            .collect();
        f.debug_struct("Keys").field("keys", &algs).finish()
    }
}

impl Keys {
    /// Reads the key `auth` names; `None` when it names none. Fails naming
    /// the file (never its content) when it cannot be read or used.
    pub(crate) fn load(auth: &AuthConfig) -> Result<Option<Keys>> {
        let pinned = match &auth.jwt_algorithm {
            Some(name) => Some(
                Algorithm::from_str(name)
                    .map_err(|_| Error::Config(format!("auth.jwt_algorithm: {name:?}")))?,
            ),
            None => None,
        };
        let keys = if let Some(path) = &auth.jwt_secret_file {
            let bytes = read(path, "jwt_secret_file")?;
            vec![secret_key(&bytes, pinned, "jwt_secret_file")?]
        } else if let Some(var) = &auth.jwt_secret_env {
            let value = std::env::var_os(var)
                .ok_or_else(|| Error::Config(format!("auth.jwt_secret_env: {var} is not set")))?;
            vec![secret_key(
                value.as_encoded_bytes(),
                pinned,
                "jwt_secret_env",
            )?]
        } else if let Some(path) = &auth.jwt_public_key {
            let pem = read(path, "jwt_public_key")?;
            vec![public_key(&pem, pinned).map_err(|why| {
                Error::Config(format!("auth.jwt_public_key: {}: {why}", path.display()))
            })?]
        } else if let Some(path) = &auth.jwks_file {
            let text = read(path, "jwks_file")?;
            jwks(&text).map_err(|why| {
                Error::Config(format!("auth.jwks_file: {}: {why}", path.display()))
            })?
        } else {
            return Ok(None);
        };
        Ok(Some(Keys::with(keys, auth)))
    }

    /// Keys for an HMAC `secret` pinned to HS256, with the checks `auth`
    /// describes (the fuzz harness's and the tests').
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn hmac(secret: &[u8], auth: &AuthConfig) -> Result<Keys> {
        Ok(Keys::with(vec![secret_key(secret, None, "test")?], auth))
    }

    fn with(mut keys: Vec<Key>, auth: &AuthConfig) -> Keys {
        for key in &mut keys {
            let validation = &mut key.validation;
            validation.algorithms = vec![key.alg];
            validation.validate_exp = false;
            validation.validate_nbf = false;
            validation.required_spec_claims.clear();
            validation.validate_aud = auth.jwt_audience.is_some();
            if let Some(aud) = &auth.jwt_audience {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            if let Some(iss) = &auth.jwt_issuer {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".to_owned());
            }
        }
        Keys {
            keys,
            leeway: auth.jwt_leeway.as_secs_f64().ceil() as u64,
            claim: auth.jwt_claim.clone(),
        }
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<Claims, Refused> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Refused::Invalid("malformed token"))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or(Refused::Invalid("unknown kid"))?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return Err(Refused::Invalid("the token names no kid")),
        };
        if header.alg != key.alg {
            return Err(Refused::Invalid("algorithm not the key's"));
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                Refused::Invalid(match e.kind() {
                    K::InvalidSignature => "bad signature",
                    K::InvalidIssuer => "wrong issuer",
                    K::InvalidAudience => "wrong audience",
                    K::MissingRequiredClaim(_) => "a required claim is missing",
                    K::InvalidAlgorithm => "algorithm not the key's",
                    _ => "malformed token",
                })
            })?;
        let claims = data.claims;
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(Refused::Invalid("no exp"))?;
        if now > exp.saturating_add(self.leeway) {
            return Err(Refused::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_u64().ok_or(Refused::Invalid("malformed nbf"))?;
            if nbf > now.saturating_add(self.leeway) {
                return Err(Refused::Expired);
            }
        }
        let allowed = match claims.get(&self.claim) {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()
                    .ok_or(Refused::Invalid("the claim lists a non-string"))?,
            ),
            Some(_) => return Err(Refused::Invalid("the claim is not a list")),
        };
        Ok(Claims { exp, allowed })
    }

    /// The leeway allowed on `exp`, in seconds (a connection outlives its
    /// token's `exp` by this much).
    pub(crate) fn leeway(&self) -> u64 {
        self.leeway
    }
}

fn read(path: &Path, setting: &str) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::Config(format!("auth.{setting}: {}: {e}", path.display())))
}

/// An HMAC key from a secret's bytes (a trailing newline, as editors and
/// `echo` leave, is not part of it).
fn secret_key(bytes: &[u8], pinned: Option<Algorithm>, setting: &str) -> Result<Key> {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.len() < 32 {
        return Err(Error::Config(format!(
            "auth.{setting}: the secret has {} bytes; HMAC needs at least 32",
            bytes.len()
        )));
    }
    Ok(Key {
        kid: None,
        alg: pinned.unwrap_or(Algorithm::HS256),
        key: DecodingKey::from_secret(bytes),
        validation: Validation::default(),
    })
}

/// A public key from PEM: its type says its algorithm family (RSA: RS256
/// unless `pinned` says another RSA one).
fn public_key(pem: &[u8], pinned: Option<Algorithm>) -> Result<Key, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not PEM text".to_owned())?;
    let rsa = DecodingKey::from_rsa_pem(pem).ok();
    let (key, alg) = if let Some(key) = rsa {
        let alg = pinned.unwrap_or(Algorithm::RS256);
        if !is_rsa(alg) {
            return Err(format!("an RSA key cannot verify {alg:?}"));
        }
        (key, alg)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let der = ::pem::parse(text).map_err(|e| e.to_string())?;
        let alg = match ec_curve(der.contents()) {
            Some(alg) => alg,
            None => return Err("an EC key on a curve other than P-256 or P-384".to_owned()),
        };
        if pinned.is_some_and(|p| p != alg) {
            return Err(format!("a key for {alg:?} cannot verify {pinned:?}"));
        }
        (key, alg)
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        if pinned.is_some_and(|p| p != Algorithm::EdDSA) {
            return Err(format!("an Ed25519 key cannot verify {pinned:?}"));
        }
        (key, Algorithm::EdDSA)
    } else {
        return Err("not a PEM RSA, EC (P-256, P-384) or Ed25519 public key".to_owned());
    };
    Ok(Key {
        kid: None,
        alg,
        key,
        validation: Validation::default(),
    })
}

/// Which kind of key an algorithm needs: a secret, RSA, EC or Ed25519.
fn family(alg: Algorithm) -> u8 {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => 0,
        Algorithm::ES256 | Algorithm::ES384 => 2,
        Algorithm::EdDSA => 3,
        _ => 1,
    }
}

fn is_rsa(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    )
}

/// The algorithm of an EC public key, from its curve's object identifier
/// in the key's DER: P-256 (1.2.840.10045.3.1.7) or P-384 (1.3.132.0.34).
fn ec_curve(der: &[u8]) -> Option<Algorithm> {
    const P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    if has(P256) {
        Some(Algorithm::ES256)
    } else if has(P384) {
        Some(Algorithm::ES384)
    } else {
        None
    }
}

/// The keys of a JWKS, each pinned to its `alg` or the one its type
/// implies (RSA: RS256, EC: its curve's, OKP: EdDSA, oct: HS256).
fn jwks(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    if set.keys.is_empty() {
        return Err("has no keys".to_owned());
    }
    let mut keys = Vec::new();
    for jwk in &set.keys {
        use jsonwebtoken::jwk::{AlgorithmParameters as P, EllipticCurve as C, KeyAlgorithm};
        let implied = match &jwk.algorithm {
            P::RSA(_) => Algorithm::RS256,
            P::EllipticCurve(ec) => match ec.curve {
                C::P256 => Algorithm::ES256,
                C::P384 => Algorithm::ES384,
                _ => return Err(format!("key {:?}: unsupported curve", jwk.common.key_id)),
            },
            P::OctetKeyPair(okp) if okp.curve == C::Ed25519 => Algorithm::EdDSA,
            P::OctetKeyPair(_) => {
                return Err(format!("key {:?}: unsupported curve", jwk.common.key_id));
            }
            P::OctetKey(_) => Algorithm::HS256,
        };
        let alg = match jwk.common.key_algorithm {
            None => implied,
            Some(named) => {
                let alg = match named {
                    KeyAlgorithm::HS256 => Algorithm::HS256,
                    KeyAlgorithm::HS384 => Algorithm::HS384,
                    KeyAlgorithm::HS512 => Algorithm::HS512,
                    KeyAlgorithm::RS256 => Algorithm::RS256,
                    KeyAlgorithm::RS384 => Algorithm::RS384,
                    KeyAlgorithm::RS512 => Algorithm::RS512,
                    KeyAlgorithm::PS256 => Algorithm::PS256,
                    KeyAlgorithm::PS384 => Algorithm::PS384,
                    KeyAlgorithm::PS512 => Algorithm::PS512,
                    KeyAlgorithm::ES256 => Algorithm::ES256,
                    KeyAlgorithm::ES384 => Algorithm::ES384,
                    KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                    _ => return Err(format!("key {:?}: unsupported alg", jwk.common.key_id)),
                };
                let curve_bound = matches!(
                    implied,
                    Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA
                );
                if family(alg) != family(implied) || (curve_bound && alg != implied) {
                    return Err(format!(
                        "key {:?}: alg does not fit its type",
                        jwk.common.key_id
                    ));
                }
                alg
            }
        };
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| format!("key {:?}: {e}", jwk.common.key_id))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
            validation: Validation::default(),
        });
    }
    if set.keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err("has several keys, not each with a kid".to_owned());
    }
    Ok(keys)
}
