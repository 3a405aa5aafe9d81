//! The text forms of settings: durations, headers, HTTP tokens and query
//! names, as flags and config files write them and validation checks them.
//!
//! Validation (`validate.rs`), the config file (serde, through the `with`
//! modules here), the CLI and the WebSocket origin's upgrade
//! (`source/websocket/handshake.rs`, which writes the configured headers)
//! all read these, so they live below all of them. Pure functions.

use std::time::Duration;

/// Parses a duration: `250ms`, `10s`, `2m`, or a bare number of seconds,
/// each a decimal number (`1.5s`) below a billion seconds, exact to the
/// nanosecond.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let (number, nanos_per_billionth) = if let Some(n) = s.strip_suffix("ms") {
        (n, Scale::Down(1000))
    } else if let Some(n) = s.strip_suffix('s') {
        (n, Scale::Up(1))
    } else if let Some(n) = s.strip_suffix('m') {
        (n, Scale::Up(60))
    } else {
        (s, Scale::Up(1))
    };
    let nanos = billionths(number.trim()).map(|b| match nanos_per_billionth {
        Scale::Up(by) => b.saturating_mul(by),
        Scale::Down(by) => b / by,
    });
    match nanos {
        Some(n) if n < 1_000_000_000 * 1_000_000_000 => Ok(Duration::from_nanos(n as u64)),
        _ => Err(format!("{s:?} is not a duration like 250ms, 10s or 2m")),
    }
}

/// How a unit's billionths become nanoseconds.
enum Scale {
    Up(u128),
    Down(u128),
}

/// Parses a fraction of one: a decimal number above 0 and at most 1
/// (`0.9`, `.5`, `1`).
pub fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    match billionths(s.trim()) {
        Some(b) if b > 0 && b <= 1_000_000_000 => Ok(b as f64 / 1e9),
        _ => Err(format!(
            "{s:?} is not a fraction above 0 and at most 1, like 0.9"
        )),
    }
}

/// A non-negative decimal number (`12`, `0.25`, `.5`) in billionths, its
/// digits after the ninth decimal dropped; `None` if it is not one or has
/// over 20 digits before the point. Read without floating point, whose
/// parser would add 13 KB to the smallest build (README, Footprint).
fn billionths(s: &str) -> Option<u128> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || whole.len() > 20 {
        return None;
    }
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    let mut n = whole
        .bytes()
        .fold(0u128, |n, b| n * 10 + u128::from(b - b'0'));
    for at in 0..9 {
        let digit = fraction.as_bytes().get(at).map_or(0, |b| b - b'0');
        n = n * 10 + u128::from(digit);
    }
    Some(n)
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
    fn durations_and_fractions_are_decimal_numbers() {
        let ms = |n| Ok(Duration::from_millis(n));
        assert_eq!(parse_duration("250ms"), ms(250));
        assert_eq!(parse_duration("1.5s"), ms(1500));
        assert_eq!(parse_duration(" 2 "), ms(2000));
        assert_eq!(parse_duration("10 s"), ms(10_000));
        assert_eq!(parse_duration("0.25m"), ms(15_000));
        assert_eq!(parse_duration(".5"), ms(500));
        assert_eq!(parse_duration("0.0000015s"), Ok(Duration::from_nanos(1500)));
        assert_eq!(
            parse_duration("1.0000000019s"),
            Ok(Duration::from_nanos(1_000_000_001))
        );
        assert_eq!(parse_duration("0.5ms"), Ok(Duration::from_micros(500)));
        assert_eq!(
            parse_duration("999999999s"),
            Ok(Duration::from_secs(999_999_999))
        );
        for bad in [
            "",
            "s",
            ".",
            "-1s",
            "1e3",
            "1.2.3s",
            "inf",
            "1000000000s",
            "x",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration(&"9".repeat(40)).is_err());
        assert_eq!(parse_fraction("0.9"), Ok(0.9));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert_eq!(parse_fraction(".5"), Ok(0.5));
        for bad in ["0", "0.0", "1.01", "-0.5", "", "half"] {
            assert!(parse_fraction(bad).is_err(), "{bad:?}");
        }
    }

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
