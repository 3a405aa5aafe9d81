//! Embedding wsgate: this program publishes its own ticks to browser clients.
//!
//! `cargo run --release --example embed`, then in a browser's console:
//! `new WebSocket("ws://127.0.0.1:8080/").onmessage = (e) => console.log(e.data)`.
//! Every tick is encoded once and shared by every client; a slow client
//! loses its oldest ticks and never holds up the others, nor this loop.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wsgate::{Config, Gateway};

fn main() -> Result<(), wsgate::Error> {
    let mut config = Config::default();
    config.listen = ([127, 0, 0, 1], 8080).into();
    let mut builder = Gateway::builder(config);
    let publisher = builder.publisher();
    let gateway = builder.start()?;
    println!("browsers connect to ws://{}/", gateway.local_addr());

    for tick in 0u64.. {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        publisher.publish_text(format!(r#"{{"tick":{tick},"ms":{ms}}}"#));
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}
