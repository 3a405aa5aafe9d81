//! nginx with the nchan module as the relay wsgate is compared with in the
//! `-nchan` scenarios ([`Kind::Nchan`](crate::relay::Kind), its
//! WebSocket subscribers, and `NchanSse`, its EventSource ones): where the
//! two programs are found, and the configuration the bench writes for one
//! run. `relay.rs` starts and stops the process like any relay; nchan
//! dials no origin, so `bridge.rs` publishes the origin's messages into it.
//!
//! [`Nginx::prepare`] makes a directory of its own under the system's temp
//! dir (named after the bench's pid and a counter) holding `nginx.conf`,
//! the error log, the pid file and nginx's temp paths, so that nothing
//! outside it is read or written but the module and, for `wss`, the
//! bench's certificate (`tls.rs`). The directory goes when [`Nginx`] is
//! dropped; a bench killed by a signal leaves it behind.
//!
//! The configuration, and why:
//! - `daemon off; master_process off; worker_processes 1;`: one process,
//!   the child the bench started, does all the work, so `/proc/PID` sees
//!   every cycle (as with wsgate, whose threads are one process);
//!   `worker_connections 16384` for `idle`'s 10 000 clients, and
//!   `multi_accept on`: a busy nginx otherwise accepts one connection per
//!   turn of its event loop, and clients connecting while nchan is writing
//!   messages time out;
//! - the subscribers' server listens on `127.0.0.1:PORT` (with `ssl`, TLS
//!   1.3 only, the bench's leaf and key, ALPN `http/1.1` as nginx offers it
//!   without http2) and has one location, `/sub`, `nchan_subscriber
//!   websocket eventsource` on the fixed channel `feed`, each new
//!   subscriber starting at the newest message (`nchan_subscriber_first_message
//!   newest`: a client joins the live feed, as wsgate's do, rather than
//!   being sent the buffer's back catalogue);
//! - the publisher's server listens on a second plain port with `/pub`,
//!   `nchan_publisher websocket`: each WebSocket message the bridge sends
//!   on its one connection is one published message;
//! - memory: `nchan_message_buffer_length 16` (beside wsgate's
//!   `--queue 16`: past that a message is gone from the channel; nobody
//!   here asks for an old one, since subscribers start at the newest) and
//!   `nchan_message_timeout 10s` bound what the channel holds: at
//!   `saturated`'s 10 000 msg/s × 128 B, 16 messages of well under 1 KiB
//!   each with nchan's headers; at `large`'s 64 KiB, about 1 MiB.
//!   `nchan_shared_memory_size 128m` (the module's default, spelled out)
//!   holds that many times over, with room for messages still being
//!   written to subscribers;
//! - `nchan_subscriber_timeout 0` and no pings: subscribers stay until the
//!   run ends, as wsgate's do.
//!
//! What a saturated nchan does (seen in these runs): it fans each message
//! out to every subscriber as it reads it from the publisher link, so it
//! drops nothing and disconnects nobody (gaps 0) and its RSS stays flat;
//! what it has not read yet waits upstream, in the publisher link's socket
//! buffers and then, once those are full, in the origin, which slows
//! down. Latency grows with the run's length.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::tls::Certs;

/// What to install when nginx or the module is missing.
pub const INSTALL: &str = "apt-get install nginx-light libnginx-mod-nchan";
/// Environment variable naming the nginx binary to run, instead of the
/// first one found.
pub const NGINX_ENV: &str = "WSGATE_BENCH_NGINX";
/// Where an nginx binary is looked for, after `$PATH`.
const NGINX_PATHS: [&str; 2] = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"];
/// Where the nchan module is looked for (Debian and Ubuntu's
/// `libnginx-mod-nchan`, then other layouts).
const MODULE_PATHS: [&str; 3] = [
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/lib64/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
];
/// The subscribers' location.
const SUBSCRIBE: &str = "/sub";
/// The publisher's location.
const PUBLISH: &str = "/pub";

/// Counts the directories made by this bench process.
static RUNS: AtomicU32 = AtomicU32::new(0);

/// The nginx binary and the nchan module found on this machine.
#[derive(Debug, Clone)]
pub struct Install {
    nginx: PathBuf,
    module: PathBuf,
}

impl Install {
    /// Finds both ([`NGINX_ENV`]'s nginx when set), or says which is
    /// missing and how to install it.
    pub fn find() -> Result<Install, String> {
        if let Some(nginx) = std::env::var_os(NGINX_ENV).map(PathBuf::from) {
            if !nginx.is_file() {
                return Err(format!(
                    "no nginx at {NGINX_ENV}={} ({INSTALL})",
                    nginx.display()
                ));
            }
            return Ok(Install {
                nginx,
                module: find_module()?,
            });
        }
        let on_path = std::env::var_os("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("nginx"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let nginx = on_path
            .into_iter()
            .chain(NGINX_PATHS.iter().map(PathBuf::from))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("no nginx on $PATH or in {NGINX_PATHS:?} ({INSTALL})"))?;
        Ok(Install {
            nginx,
            module: find_module()?,
        })
    }
}

/// The nchan module's file, or what to install.
fn find_module() -> Result<PathBuf, String> {
    MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no nchan module in {MODULE_PATHS:?} ({INSTALL})"))
}

/// One run's nginx configuration and directory; see the module docs.
#[derive(Debug)]
pub struct Nginx {
    /// The nginx binary.
    program: PathBuf,
    dir: PathBuf,
    /// Where the subscribers connect.
    subscribe: SocketAddr,
    /// Where the bridge publishes.
    publish: SocketAddr,
    /// The subscribers' server speaks TLS.
    tls: bool,
}

impl Nginx {
    /// Writes the configuration for `install`'s module, serving the
    /// subscribers over TLS with `tls`'s leaf when given, on two free
    /// ports of 127.0.0.1.
    pub fn prepare(install: &Install, tls: Option<&Certs>) -> Result<Nginx, String> {
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("wsgate-bench-nchan-{}-{run}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // From here on the guard owns the directory: every early return removes it.
        let nginx = Nginx {
            program: install.nginx.clone(),
            dir,
            subscribe: free_port()?,
            publish: free_port()?,
            tls: tls.is_some(),
        };
        let config = nginx.config(&install.module, tls);
        let path = nginx.dir.join("nginx.conf");
        std::fs::write(&path, config)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(nginx)
    }

    /// The nginx binary.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// nginx's arguments: this directory as its prefix, its configuration
    /// and error log there.
    pub fn args(&self) -> [PathBuf; 6] {
        [
            "-p".into(),
            self.dir.clone(),
            "-c".into(),
            self.dir.join("nginx.conf"),
            "-e".into(),
            self.dir.join("error.log"),
        ]
    }

    /// The addresses nginx listens on once started.
    pub fn listening(&self) -> [SocketAddr; 2] {
        [self.subscribe, self.publish]
    }

    /// The URL the clients connect to (the bench's leaf is for
    /// `127.0.0.1` too).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{SUBSCRIBE}", self.subscribe)
    }

    /// The URL the bridge publishes to.
    pub fn publish_url(&self) -> String {
        format!("ws://{}{PUBLISH}", self.publish)
    }

    /// The error log's last lines, to say why nginx failed.
    pub fn error_tail(&self) -> String {
        let path = self.dir.join("error.log");
        match std::fs::read_to_string(&path) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(3)..].join(" | ")
            }
            Err(e) => format!("cannot read {}: {e}", path.display()),
        }
    }

    /// The configuration file's text; the module docs say why each line.
    fn config(&self, module: &Path, tls: Option<&Certs>) -> String {
        let dir = self.dir.display();
        let temp_paths: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("    {t}_temp_path {dir}/{t};\n"))
            .collect();
        let (ssl, certificate) = match tls {
            Some(certs) => (
                " ssl",
                format!(
                    "        ssl_certificate {};\n        ssl_certificate_key {};\n        \
                     ssl_protocols TLSv1.3;\n",
                    certs.cert.display(),
                    certs.key.display()
                ),
            ),
            None => ("", String::new()),
        };
        format!(
            "# One run of wsgate's fanout bench (benches/fanout/nchan.rs says why each line).
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 16384;
    multi_accept on;
}}
http {{
    access_log off;
    tcp_nodelay on;
{temp_paths}    nchan_shared_memory_size 128m;
    server {{
        listen {subscribe}{ssl};
{certificate}        location = {SUBSCRIBE} {{
            nchan_subscriber websocket eventsource;
            nchan_channel_id feed;
            nchan_subscriber_first_message newest;
            nchan_subscriber_timeout 0;
        }}
    }}
    server {{
        listen {publish};
        location = {PUBLISH} {{
            nchan_publisher websocket;
            nchan_channel_id feed;
            nchan_message_buffer_length 16;
            nchan_message_timeout 10s;
        }}
    }}
}}
",
            module = module.display(),
            subscribe = self.subscribe,
            publish = self.publish,
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("bench: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A port of 127.0.0.1 free a moment ago (bound to port 0, then released
/// for nginx to bind: another process could take it in between, and nginx
/// would then fail to start, saying so).
fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("cannot find a free port for nginx: {e}"))
}
