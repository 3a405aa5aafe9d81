//! Who may connect to a route: [`AuthConfig`], its defaults and its
//! validation.
//!
//! A route checks a client's JWT against keys it was given (a secret, a
//! public key or a JWKS file), or asks an auth service (`url`, nginx's
//! `auth_request`), or both; with neither, anyone who reaches the listener
//! may connect. The keys themselves are read at start and on every reload
//! (`edge/auth/`), never here: validation reads no file. A secret is named by
//! a file or an environment variable, never written in the configuration, so
//! `--print-config` cannot show it.

use std::{path::PathBuf, time::Duration};

#[cfg(feature = "config-file")]
use serde::{Deserialize, Serialize};

#[cfg(feature = "auth")]
use crate::config::{
    syntax::{is_header_name, is_query_name, is_token},
    url::{is_authority, shown},
};
use crate::error::{Error, Result};

/// The JWT algorithms a key may be pinned to.
#[cfg(feature = "auth")]
pub(crate) const ALGORITHMS: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// How a route authenticates its clients. Per route: a route's own table
/// (`[route.auth]`) replaces the top level's (`[auth]`) whole, so an empty
/// one makes a public route. With no key and no [`AuthConfig::url`], a route
/// admits anyone. Needs the `auth` feature: a build without it refuses a
/// configuration that asks for auth rather than admit everyone.
///
/// A client presents its token in an `Authorization: Bearer` header, in
/// the query parameter [`AuthConfig::token_param`], in the cookie
/// [`AuthConfig::token_cookie`], or as a `bearer.TOKEN` entry of its
/// `Sec-WebSocket-Protocol` list (which is never answered back): browsers
/// cannot set headers on a WebSocket or an EventSource.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct AuthConfig {
    /// File holding the HMAC secret that signs clients' JWTs (its bytes,
    /// a trailing newline removed). Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwt_secret_file: Option<PathBuf>,
    /// Environment variable holding the HMAC secret, instead of a file.
    /// Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwt_secret_env: Option<String>,
    /// PEM file of the public key that verifies clients' JWTs: RSA (RS256
    /// unless [`AuthConfig::jwt_algorithm`] says RS384, RS512 or PS256…),
    /// EC P-256 (ES256), EC P-384 (ES384) or Ed25519 (EdDSA). Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`) of the keys that verify clients' JWTs,
    /// chosen by the token's `kid`; each key is pinned to its `alg`, or to
    /// the one its type implies. Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwks_file: Option<PathBuf>,
    /// The algorithm a secret or an RSA key is pinned to (`HS256`,
    /// `HS384`, `HS512`; `RS256`, `RS384`, `RS512`, `PS256`, `PS384`,
    /// `PS512`); a token whose header names another is refused. EC and
    /// Ed25519 keys imply theirs. Defaults to HS256 for a secret and RS256
    /// for an RSA key.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwt_algorithm: Option<String>,
    /// The `iss` a token must carry, if set. Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwt_issuer: Option<String>,
    /// The `aud` a token must carry (or list), if set. Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`; a connection is closed at
    /// `exp` plus this. Defaults to 30 s.
    #[cfg_attr(feature = "config-file", serde(with = "super::syntax::duration"))]
    pub jwt_leeway: Duration,
    /// The claim listing what a token may open: an array of targets, each a
    /// route path (`"/trades"`), a path and a query for a route keyed by
    /// query (`"/book?symbol=btc"`: that key only), or `"*"`. A token
    /// without the claim may open every route that trusts its key.
    /// Defaults to `wsgate`.
    pub jwt_claim: String,
    /// Query parameter a token may come in (never passed upstream, logged
    /// or counted). Defaults to `access_token`.
    pub token_param: String,
    /// Cookie a token may come in, if set. Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub token_cookie: Option<String>,
    /// URL of an auth service asked about each upgrade (`http://`, or
    /// `https://` with the `tls` feature): it gets the request's path and
    /// query, its `Cookie`, `Authorization` and `Origin` headers and the
    /// client's address; 2xx admits, 401 and 403 are passed on, anything
    /// else or no answer within [`AuthConfig::timeout`] is 503. Defaults
    /// to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "Option::is_none")
    )]
    pub url: Option<String>,
    /// Longest wait for the auth service. Defaults to 2 s.
    #[cfg_attr(feature = "config-file", serde(with = "super::syntax::duration"))]
    pub timeout: Duration,
    /// Header carrying the client's address to the auth service. Defaults
    /// to `X-Forwarded-For`.
    pub client_header: String,
    /// How long the auth service's yes is remembered for the same
    /// credentials (never longer than an expiry it gives); 0 asks every
    /// time. Defaults to 10 s.
    #[cfg_attr(feature = "config-file", serde(with = "super::syntax::duration"))]
    pub cache_ttl: Duration,
    /// Most answers remembered; the oldest goes first. Defaults to 10 000.
    pub cache_size: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret_file: None,
            jwt_secret_env: None,
            jwt_public_key: None,
            jwks_file: None,
            jwt_algorithm: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            jwt_claim: "wsgate".to_owned(),
            token_param: "access_token".to_owned(),
            token_cookie: None,
            url: None,
            timeout: Duration::from_secs(2),
            client_header: "X-Forwarded-For".to_owned(),
            cache_ttl: Duration::from_secs(10),
            cache_size: 10_000,
        }
    }
}

impl AuthConfig {
    /// Whether clients of this route must be authenticated: it has a key
    /// or an auth service.
    pub fn is_enabled(&self) -> bool {
        self.has_jwt() || self.url.is_some()
    }

    /// Whether it checks JWTs (it names a key).
    pub(crate) fn has_jwt(&self) -> bool {
        self.jwt_secret_file.is_some()
            || self.jwt_secret_env.is_some()
            || self.jwt_public_key.is_some()
            || self.jwks_file.is_some()
    }

    /// Checks the settings (no file is read), naming the first bad one. A
    /// build without the `auth` feature refuses any auth rather than admit
    /// everyone.
    #[cfg(not(feature = "auth"))]
    pub(crate) fn validate(&self, _query_params: &[String]) -> Result<()> {
        if self.is_enabled() {
            return Err(Error::Config(
                "auth: asks for client authentication, but this build has none (feature `auth`)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks the settings (no file is read), naming the first bad one.
    #[cfg(feature = "auth")]
    pub(crate) fn validate(&self, query_params: &[String]) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("auth.{msg}")));
        let keys = [
            self.jwt_secret_file.is_some(),
            self.jwt_secret_env.is_some(),
            self.jwt_public_key.is_some(),
            self.jwks_file.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            return bad(
                "jwt_secret_file, jwt_secret_env, jwt_public_key and jwks_file: name one key source"
                    .into(),
            );
        }
        if let Some(var) = &self.jwt_secret_env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return bad(format!("jwt_secret_env: {var:?} is not a variable name"));
            }
        }
        if let Some(alg) = &self.jwt_algorithm {
            if !ALGORITHMS.contains(&alg.as_str()) {
                return bad(format!(
                    "jwt_algorithm: {alg:?} is not one of {}",
                    ALGORITHMS.join(", ")
                ));
            }
            let secret = self.jwt_secret_file.is_some() || self.jwt_secret_env.is_some();
            if self.jwks_file.is_some() {
                return bad("jwt_algorithm: a JWKS key carries its own alg".into());
            }
            if !secret && self.jwt_public_key.is_none() {
                return bad("jwt_algorithm: pins a key; name jwt_secret_file, jwt_secret_env or jwt_public_key".into());
            }
            if secret != alg.starts_with("HS") {
                return bad(format!(
                    "jwt_algorithm: {alg} does not fit the key (a secret signs HS256/384/512, a public key the others)"
                ));
            }
        }
        if self.jwt_claim.is_empty() {
            return bad("jwt_claim: must name a claim".into());
        }
        if !is_query_name(&self.token_param) {
            return bad(format!(
                "token_param: {:?} is not a query parameter name (letters, digits, -_.)",
                self.token_param
            ));
        }
        if query_params.contains(&self.token_param) {
            return bad(format!(
                "token_param: {:?} is also a query_params key, which would pass tokens upstream",
                self.token_param
            ));
        }
        if let Some(cookie) = &self.token_cookie {
            if !is_token(cookie) {
                return bad(format!("token_cookie: {cookie:?} is not a cookie name"));
            }
        }
        if let Some(url) = &self.url {
            let rest = match url.split_once("://") {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => {
                    if !cfg!(feature = "tls") {
                        return bad(format!(
                            "url: {:?} uses https, but this build has no TLS (feature `tls`)",
                            shown(url)
                        ));
                    }
                    rest
                }
                _ => {
                    return bad(format!(
                        "url: {:?} must start with http:// or https://",
                        shown(url)
                    ));
                }
            };
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            if authority.contains('@') || !is_authority(authority) {
                return bad(format!("url: {:?} has no valid host[:port]", shown(url)));
            }
            if !url.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(format!(
                    "url: {:?} has characters that must be escaped",
                    shown(url)
                ));
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return bad("timeout: must be between 1ms and 60s".into());
        }
        if !is_header_name(&self.client_header) {
            return bad(format!(
                "client_header: {:?} is not a header name the request may carry",
                self.client_header
            ));
        }
        if self.cache_size > 1_000_000 {
            return bad("cache_size: at most 1000000".into());
        }
        Ok(())
    }
}
