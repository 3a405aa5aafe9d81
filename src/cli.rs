//! Command-line flags, and their mapping onto a [`wsgate::Config`].
//!
//! Only parsing and mapping live here; `main.rs` runs the gateway.

use std::{net::SocketAddr, time::Duration};

use argh::FromArgs;
use log::LevelFilter;
use wsgate::{Config, Error};

/// wsgate: one origin WebSocket feed, fanned out to many clients.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// address clients connect to (default 127.0.0.1:8080)
    #[argh(option, default = "SocketAddr::from(([127, 0, 0, 1], 8080))")]
    pub listen: SocketAddr,

    /// upstream WebSocket URL, ws://host[:port]/path (required unless --demo)
    #[argh(option)]
    pub origin: Option<String>,

    /// clients per lobby, hence per origin connection (default 512)
    #[argh(option, default = "512")]
    pub lobby_capacity: usize,

    /// frames queued per client before the oldest is dropped (default 16)
    #[argh(option, default = "16")]
    pub queue: usize,

    /// writer threads serving client sockets (default 2)
    #[argh(option, default = "2")]
    pub writers: usize,

    /// seconds an empty lobby lingers before its thread ends (default 5)
    #[argh(option, default = "5")]
    pub lobby_linger: u64,

    /// log level: off, error, warn, info, debug or trace (default info)
    #[argh(option, default = "LevelFilter::Info")]
    pub log_level: LevelFilter,

    /// run an embedded demo origin and point the gateway at it
    #[argh(switch)]
    pub demo: bool,
}

impl Cli {
    /// The gateway configuration these flags describe. The origin is left
    /// empty for `--demo`, which fills it once the demo origin is up.
    pub fn config(&self) -> Result<Config, Error> {
        let origin = match (&self.origin, self.demo) {
            (Some(_), true) => {
                return Err(Error::Config(
                    "use either --origin or --demo, not both".into(),
                ));
            }
            (None, false) => {
                return Err(Error::Config(
                    "--origin URL is required (or try --demo)".into(),
                ));
            }
            (Some(origin), false) => origin.clone(),
            (None, true) => String::new(),
        };
        let mut config = Config::default();
        config.listen = self.listen;
        config.origin = origin;
        config.lobby_capacity = self.lobby_capacity;
        config.queue_depth = self.queue;
        config.writers = self.writers;
        config.lobby_linger = Duration::from_secs(self.lobby_linger);
        Ok(config)
    }
}
