//! The text forms of settings: durations, headers, HTTP tokens and query
//! names, as flags and config files write them and validation checks them.
//!
//! Validation (`validate.rs`), the config file (serde, through the `with`
//! modules here), the CLI and the WebSocket origin's upgrade
//! (`source/websocket/handshake.rs`, which writes the configured headers)
//! all read these, so they live below all of them. Pure functions.

use std::time::Duration;

/// Parses a duration: `250ms`, `10s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 && n * scale < 1e9 => {
            Ok(Duration::from_secs_f64(n * scale))
        }
        _ => Err(format!("{s:?} is not a duration like 250ms, 10s or 2m")),
    }
}

/// Writes a duration the way [`parse_duration`] reads it back.
#[cfg(feature = "config-file")]
pub(crate) fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Splits an origin header written `Name: value`.
pub fn parse_header(header: &str) -> std::result::Result<(String, String), String> {
    match header.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("{header:?} is not of the form 'Name: value'")),
    }
}

/// A subprotocol name: an HTTP token (no separators, no spaces).
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A query parameter name the gateway keys lobbies by: letters, digits,
/// `-`, `_` and `.` (nothing that needs escaping).
pub(crate) fn is_query_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Durations in config files: `250ms`, `10s`, `2m`, or a bare number of
/// seconds (the same form as the command line's).
#[cfg(feature = "config-file")]
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(D::Error::custom)
    }
}

/// Origin headers in config files: `"Name: value"` strings (the command
/// line's form).
#[cfg(feature = "config-file")]
pub(crate) mod headers {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(
        headers: &[(String, String)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(headers.iter().map(|(n, v)| format!("{n}: {v}")))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, String)>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|h| super::parse_header(h).map_err(D::Error::custom))
            .collect()
    }
}

/// [`headers`] for a route's optional override.
#[cfg(feature = "config-file")]
pub(crate) mod opt_headers {
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        headers: &Option<Vec<(String, String)>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match headers {
            Some(headers) => super::headers::serialize(headers, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<(String, String)>>, D::Error> {
        super::headers::deserialize(d).map(Some)
    }
}

/// Request headers the upgrade itself sets; configured headers may not.
const RESERVED: [&str; 6] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
];

/// Whether `name` may be configured as an origin request header: an HTTP
/// token (RFC 9110, section 5.6.2) the upgrade does not set itself. `Host`
/// may be set: it replaces the URL's.
pub(crate) fn is_header_name(name: &str) -> bool {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !name.is_empty()
        && name.bytes().all(tchar)
        && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// Whether `value` may be sent as a header value: visible ASCII, spaces
/// and tabs, nothing that could end the line.
pub(crate) fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_and_values_are_checked() {
        assert!(
            is_header_name("Authorization")
                && is_header_name("X-Feed_Key")
                && is_header_name("Host")
        );
        for bad in [
            "",
            "Bad Name",
            "X:y",
            "Sec-WebSocket-Key",
            "connection",
            "UPGRADE",
        ] {
            assert!(!is_header_name(bad), "{bad:?}");
        }
        assert!(is_header_value("Bearer abc\t=") && is_header_value(""));
        assert!(!is_header_value("a\r\nX-Injected: 1") && !is_header_value("caf\u{e9}"));
    }
}
