//! The source URLs a route may name, and the `host[:port]` grammar they
//! share: what `origin` and `--route PATH=URL` accept.
//!
//! `ws://` and `wss://` parse into an [`OriginUrl`], `redis://`,
//! `rediss://` and `redis+stream://` into a [`RedisUrl`] (with the `redis`
//! feature). Validation checks them here without opening anything
//! ([`check_url`]); the sources (`source/websocket/`, `source/redis.rs`)
//! connect to what these parsers return, and browser origins
//! (`--allowed-origin`) share [`split_host_port`]. So they live below both
//! the configuration and the sources. Pure functions.

use std::fmt;

use crate::error::{Error, Result};

/// The kinds of origin URL.
pub(crate) enum Scheme {
    WebSocket,
    #[cfg(feature = "redis")]
    Redis,
}

/// Which source `url` names, by its scheme, or why none of this build's.
pub(crate) fn scheme(url: &str) -> Result<Scheme> {
    let bad = |why: &str| Err(Error::Config(format!("origin: {:?} {why}", shown(url))));
    if url.is_empty() {
        return Err(Error::Config(
            "origin: an origin URL is required".to_owned(),
        ));
    }
    let Some((scheme, _)) = url.split_once("://") else {
        return bad("is not a valid URL");
    };
    match scheme.to_ascii_lowercase().as_str() {
        "ws" | "wss" => Ok(Scheme::WebSocket),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+stream" | "rediss+stream" => Ok(Scheme::Redis),
        #[cfg(not(feature = "redis"))]
        "redis" | "rediss" | "redis+stream" | "rediss+stream" => {
            bad("is a Redis URL, but this build has no Redis (feature `redis`)")
        }
        _ if scheme.contains(char::is_whitespace) => bad("is not a valid URL"),
        _ if cfg!(feature = "redis") => bad(
            "must start with ws://, wss://, redis://, rediss://, redis+stream:// or rediss+stream://",
        ),
        _ => bad("must start with ws:// or wss://"),
    }
}

/// Checks an origin URL without opening anything or reading any file: its
/// scheme names a source this build has, and the rest parses for it.
pub(crate) fn check_url(url: &str) -> Result<()> {
    match scheme(url)? {
        Scheme::WebSocket => origin_url(url).map(drop),
        #[cfg(feature = "redis")]
        Scheme::Redis => RedisUrl::parse(url).map(drop),
    }
}

/// An origin URL, parsed and checked: `ws://` (or `wss://` in a build with
/// TLS), with a host.
pub(crate) fn origin_url(url: &str) -> Result<OriginUrl> {
    let bad = |why: &str| Error::Config(format!("origin: {:?} {why}", shown(url)));
    let parsed = OriginUrl::parse(url).map_err(bad)?;
    if parsed.secure && !cfg!(feature = "tls") {
        return Err(bad(
            "uses wss://, but this build has no TLS (feature `tls`)",
        ));
    }
    Ok(parsed)
}

/// Whether `authority` is `host[:port]` (an IPv6 address in brackets), as
/// in a URL or a browser origin.
pub(crate) fn is_authority(authority: &str) -> bool {
    split_host_port(authority).is_ok()
}

/// `url` as an error message may show it: any credentials before the
/// host (`user:password@`) replaced by `***`. A URL that fails to parse
/// is echoed so its owner can find it, and must not put a password in a
/// log line or on a terminal for that.
pub(crate) fn shown(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{}", &rest[end..]),
        None => url.to_owned(),
    }
}

/// The host and the port (`None` when absent) of a source URL's authority
/// without credentials (`ws://`, `redis://`, and browser origins too); the
/// error says what is wrong, to follow the URL in a message.
pub(crate) fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), &'static str> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err("has an unclosed IPv6 address");
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address");
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err("has an invalid port"),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host");
    }
    let name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
    if !authority.starts_with('[') && !host.bytes().all(name_byte) {
        return Err("has an invalid host");
    }
    let port = match port {
        None => None,
        // Digits only: u16's parser would take a sign.
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err("has an invalid port"),
        },
        Some(_) => return Err("has an invalid port"),
    };
    Ok((host, port))
}

/// An origin URL, parsed and checked: `ws://` or `wss://`, a host, maybe a
/// port, maybe a path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginUrl {
    /// `wss://`: TLS to the origin.
    pub(crate) secure: bool,
    /// The host name or IP address, without an IPv6 address's brackets.
    pub(crate) host: String,
    /// The port, explicit or the scheme's default.
    pub(crate) port: u16,
    /// The `Host` header: the host as written, and the port unless it is
    /// the scheme's default.
    pub(crate) authority: String,
    /// The request target: the path (`/` at least) and the query.
    pub(crate) target: String,
}

impl OriginUrl {
    /// Parses `url`; the error says what is wrong with it, to follow the URL
    /// in a message.
    pub(crate) fn parse(url: &str) -> Result<OriginUrl, &'static str> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err("is not a valid URL");
        };
        let secure = match scheme.to_ascii_lowercase().as_str() {
            "ws" => false,
            "wss" => true,
            _ => return Err("must start with ws:// or wss://"),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        if target.contains('#') {
            return Err("has a fragment, which a WebSocket URL cannot have");
        }
        if !target.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("has characters in its path that must be percent-encoded");
        }
        if authority.contains('@') {
            return Err("has credentials in it; send them with origin_headers instead");
        }
        let (host, port) = split_host_port(authority)?;
        let default_port = if secure { 443 } else { 80 };
        let port = port.unwrap_or(default_port);
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let target = match target.strip_prefix('?') {
            Some(_) => format!("/{target}"),
            None if target.is_empty() => "/".to_owned(),
            None => target.to_owned(),
        };
        Ok(OriginUrl {
            secure,
            host: host.to_owned(),
            port,
            authority,
            target,
        })
    }
}

impl fmt::Display for OriginUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.secure { "wss" } else { "ws" };
        write!(f, "{scheme}://{}{}", self.authority, self.target)
    }
}

#[cfg(feature = "redis")]
/// What a Redis origin URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisUrl {
    pub(crate) is_tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: i64,
    pub(crate) mode: Mode,
}

#[cfg(feature = "redis")]
/// What a Redis source's lobby reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Messages published on a channel.
    PubSub { channel: String },
    /// Entries of a stream: the value of one field of each.
    Stream { key: String, field: String },
}

#[cfg(feature = "redis")]
impl RedisUrl {
    /// Parses `redis://[[user]:password@]host[:port][/db]/channel` (or
    /// `rediss://` for TLS), and `redis+stream://…/key[?field=NAME]`
    /// (`rediss+stream://` for TLS). The path's first segment is the
    /// database when it is all digits and more follows; user, password,
    /// channel and key are percent-decoded.
    pub(crate) fn parse(url: &str) -> Result<RedisUrl> {
        let bad = |why: &str| Err(Error::Config(format!("origin: {:?} {why}", shown(url))));
        let Some((scheme, rest)) = url.split_once("://") else {
            return bad("is not a valid URL");
        };
        let (is_tls, is_stream) = match scheme.to_ascii_lowercase().as_str() {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+stream" => (false, true),
            "rediss+stream" => (true, true),
            _ => return bad("is not a Redis URL"),
        };
        if is_tls && !cfg!(feature = "tls") {
            return bad("uses TLS, but this build has no TLS (feature `tls`)");
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = info.split_once(':').unwrap_or((info, ""));
                let user = (!user.is_empty()).then(|| decode(user)).transpose();
                let pass = (!pass.is_empty()).then(|| decode(pass)).transpose();
                match (user, pass) {
                    (Ok(user), Ok(pass)) => (user, pass),
                    _ => return bad("has a malformed user or password"),
                }
            }
        };
        let (host, port) = match split_host_port(hostport) {
            Ok((host, port)) => (host, port.unwrap_or(6379)),
            Err(why) => return bad(why),
        };
        let (db, name) = match path.split_once('/') {
            Some((db, name)) if !db.is_empty() && db.bytes().all(|b| b.is_ascii_digit()) => {
                match db.parse::<i64>() {
                    Ok(db) => (db, name),
                    Err(_) => return bad("has a bad database number"),
                }
            }
            _ => (0, path),
        };
        let Ok(name) = decode(name) else {
            return bad("has a malformed channel or key");
        };
        if name.is_empty() {
            return bad(if is_stream {
                "names no stream key (…/KEY)"
            } else {
                "names no channel (…/CHANNEL)"
            });
        }
        let mut field = "data".to_owned();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("field", value)) if is_stream && !value.is_empty() => match decode(value) {
                    Ok(value) => field = value,
                    Err(_) => return bad("has a malformed field name"),
                },
                _ => {
                    return bad("takes no query but ?field=NAME (on a redis+stream:// URL)");
                }
            }
        }
        let mode = if is_stream {
            Mode::Stream { key: name, field }
        } else {
            Mode::PubSub { channel: name }
        };
        Ok(RedisUrl {
            is_tls,
            host: host.to_owned(),
            port,
            username,
            password,
            db,
            mode,
        })
    }
}

#[cfg(feature = "redis")]
/// Percent-decodes a URL component (as UTF-8).
fn decode(text: &str) -> std::result::Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(drop)?;
            out.push(u8::from_str_radix(hex, 16).map_err(drop)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> OriginUrl {
        OriginUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_scheme_picks_the_source() {
        assert!(check_url("ws://h/").is_ok());
        assert!(check_url("WSS://h:443/x").is_ok() == cfg!(feature = "tls"));
        for bad in ["", "http://h/", "h", "ws://", "ws:// bad", "redis//h"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_url("redis://127.0.0.1:6379/feed").is_ok(),
            cfg!(feature = "redis")
        );
        assert_eq!(
            check_url("redis+stream://127.0.0.1/events").is_ok(),
            cfg!(feature = "redis")
        );
    }

    #[test]
    fn urls_parse_into_host_port_and_target() {
        let u = url("ws://feed.example:9000/prices?pair=btc");
        assert_eq!(
            (u.secure, u.host.as_str(), u.port),
            (false, "feed.example", 9000)
        );
        assert_eq!(u.to_string(), "ws://feed.example:9000/prices?pair=btc");
        let u = url("WSS://Feed.example");
        assert_eq!((u.secure, u.port, u.target.as_str()), (true, 443, "/"));
        assert_eq!(u.authority, "Feed.example");
        let u = url("ws://[::1]:8080?x=1");
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        assert_eq!(u.to_string(), "ws://[::1]:8080/?x=1");
        assert_eq!(url("ws://10.0.0.5:80/").authority, "10.0.0.5");
    }

    #[test]
    fn bad_origin_urls_say_what_is_wrong() {
        for (bad, why) in [
            ("feed.example", "is not a valid URL"),
            ("http://feed.example/", "must start with ws:// or wss://"),
            ("ws:///path", "has no host"),
            ("ws://:9000/", "has no host"),
            ("ws://feed.example:0/", "has an invalid port"),
            ("ws://feed.example:70000/", "has an invalid port"),
            ("ws://feed.example:/", "has an invalid port"),
            ("ws://feed.example:+80/", "has an invalid port"),
            ("ws://[::1]x/", "has an invalid port"),
            ("ws://[::1/", "has an unclosed IPv6 address"),
            ("ws://[nope]/", "has an invalid IPv6 address"),
            (
                "ws://user:pw@feed.example/",
                "has credentials in it; send them with origin_headers instead",
            ),
            ("ws://feed example/", "has an invalid host"),
            (
                "ws://feed.example/a b",
                "has characters in its path that must be percent-encoded",
            ),
            (
                "ws://feed.example/a\r\nX: y",
                "has characters in its path that must be percent-encoded",
            ),
            (
                "ws://feed.example/#top",
                "has a fragment, which a WebSocket URL cannot have",
            ),
        ] {
            assert_eq!(OriginUrl::parse(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn shown_hides_credentials_and_keeps_the_rest() {
        for (url, expected) in [
            ("ws://u:p@h:9/a?b=c", "ws://***@h:9/a?b=c"),
            ("redis://:p@w@h/ch", "redis://***@h/ch"),
            ("ws://h/a@b", "ws://h/a@b"),
            ("ws://h", "ws://h"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(shown(url), expected, "{url}");
        }
    }

    #[cfg(feature = "redis")]
    fn redis(url: &str) -> RedisUrl {
        RedisUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    #[cfg(feature = "redis")]
    fn urls_name_server_credentials_database_and_channel() {
        let url = redis("redis://127.0.0.1:6380/prices");
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("127.0.0.1", 6380, 0)
        );
        assert_eq!(
            url.mode,
            Mode::PubSub {
                channel: "prices".into()
            }
        );
        assert_eq!((url.username, url.password), (None, None));

        let url = redis("redis://:s%40cret@cache.internal/2/prices/eu");
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("cache.internal", 6379, 2)
        );
        assert_eq!(url.password.as_deref(), Some("s@cret"));
        assert_eq!(
            url.mode,
            Mode::PubSub {
                channel: "prices/eu".into()
            }
        );

        let url = redis("redis://feeder:pw@[::1]:7000/7");
        assert_eq!((url.host.as_str(), url.port), ("::1", 7000));
        assert_eq!(url.username.as_deref(), Some("feeder"));
        // A lone segment is the channel, digits or not.
        assert_eq!(
            (url.db, url.mode),
            (
                0,
                Mode::PubSub {
                    channel: "7".into()
                }
            )
        );

        let url = redis("redis+stream://h/3/events?field=payload");
        assert_eq!(url.db, 3);
        assert_eq!(
            url.mode,
            Mode::Stream {
                key: "events".into(),
                field: "payload".into()
            }
        );
        let url = redis("redis+stream://h/events");
        assert_eq!(
            url.mode,
            Mode::Stream {
                key: "events".into(),
                field: "data".into()
            }
        );
        assert_eq!(
            RedisUrl::parse("rediss://h/c").is_ok(),
            cfg!(feature = "tls")
        );
    }

    #[test]
    #[cfg(feature = "redis")]
    fn bad_redis_urls_say_what_is_wrong() {
        for (url, why) in [
            ("redis://h", "no channel"),
            ("redis://h/", "no channel"),
            ("redis+stream://h/", "no stream key"),
            ("redis://h:0/c", "port"),
            ("redis://h:x/c", "port"),
            ("redis:///c", "no host"),
            ("redis://h/c?field=x", "query"),
            ("redis+stream://h/k?count=3", "query"),
            ("redis://h/%zz", "malformed"),
            ("redis://[::1/c", "IPv6"),
        ] {
            let err = RedisUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }
}
