//! The config file: [`Config::from_toml`] reads TOML onto a [`Config`]
//! through serde, and [`Config::to_toml`] writes one back (`--print-config`).
//! How durations and headers are written lives in `syntax.rs`. Built only
//! with the `config-file` feature; nothing here reads a file itself.

use crate::{
    config::Config,
    error::{Error, Result},
};

impl Config {
    /// Parses a TOML config file's text (see the README for an annotated
    /// example); every setting it leaves out keeps its default. An unknown
    /// key, a wrong type or a bad duration is an [`Error::Config`] that
    /// starts with `line N:` and names the key. It is not validated yet:
    /// command-line flags may still override it.
    pub fn from_toml(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().split(", expected one of").next().unwrap_or("");
            let Some(span) = e.span() else {
                return Error::Config(message.to_owned());
            };
            let key_of = |line: &str| {
                line.split_once('=')
                    .map(|(key, _)| key.trim().to_owned())
                    .filter(|key| !key.is_empty() && !key.starts_with('['))
            };
            let mut line = text[..span.start.min(text.len())].lines().count().max(1);
            // An unknown key's span can be its whole table: find the key.
            if let Some(unknown) = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
            {
                if let Some(n) = text
                    .lines()
                    .enumerate()
                    .skip(line - 1)
                    .find(|(_, l)| key_of(l).as_deref() == Some(unknown))
                    .map(|(n, _)| n + 1)
                {
                    line = n;
                }
            }
            let key = text.lines().nth(line - 1).and_then(key_of);
            Error::Config(match key {
                Some(key) => format!("line {line}: {key}: {message}"),
                None => format!("line {line}: {message}"),
            })
        })
    }

    /// The configuration as a TOML file (every setting, defaults included).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}
