//! A `wss://` client's bytes through its rustls session: the one module of
//! `wire/` that moves bytes to and from a socket, generic over it.
//!
//! The acceptor (`edge/acceptor.rs`) runs the TLS handshake (its records
//! taken in with [`receive`] and processed with [`process`] on a handshake
//! thread, `edge/handshake.rs`) and reads the upgrade request through
//! [`read`]; the client's writer
//! (`delivery/conn.rs`) reads client frames through [`read`] and writes
//! frames through [`encrypt`] and [`flush`]. The session moves with the
//! socket (in the admission, then the writer's attach), so both ends share
//! these few functions and nothing else. The rules they keep:
//!
//! - a session holds at most [`BUFFER_LIMIT`] of encrypted bytes the
//!   socket has not taken ([`limit`]); frames go in only when it has
//!   flushed everything, so a stalled client pins its queue, this, and the
//!   kernel's `--client-unsent`, no more;
//! - what [`read`] returns means what a socket's `read` means: `Ok(0)` the
//!   peer is done, `WouldBlock` nothing more until the socket is readable.
//!
//! Compiled only with the `tls` feature. No thread runs here.

use std::io::{self, IoSlice, Read, Write};

use rustls::ServerConnection;

/// A client's TLS session, boxed: it moves from the acceptor to the
/// manager to a writer, and only `wss://` clients have one.
pub(crate) type Session = Box<ServerConnection>;

/// Most encrypted bytes a session holds that its socket has not taken: one
/// record of 16 KiB of frames. What a write gives it is one record's worth
/// of frames, coalesced (see [`encrypt`]).
pub(crate) const BUFFER_LIMIT: usize = 16 * 1024;

/// Most frames given to a session in one write (as many as a plain vectored
/// write takes).
const MAX_SLICES: usize = 64;

/// What a flush came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// The session holds nothing unsent.
    All,
    /// The socket is full: wait until it is writable.
    Blocked,
}

/// Caps what `session` buffers of encrypted output at [`BUFFER_LIMIT`]
/// (once its handshake is over: the handshake's own messages are not
/// limited by rustls).
pub(crate) fn limit(session: &mut ServerConnection) {
    session.set_buffer_limit(Some(BUFFER_LIMIT));
}

/// Writes what `session` holds for the peer (handshake messages, alerts,
/// records) to `socket`, until it holds nothing or the socket is full.
pub(crate) fn flush(
    session: &mut ServerConnection,
    socket: &mut impl Write,
) -> io::Result<Flushed> {
    while session.wants_write() {
        match session.write_tls(socket) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Flushed::All)
}

/// Reads decrypted bytes into `buf`, reading and processing records from
/// `socket` (and writing what the handshake answers) as needed. `Ok(0)`:
/// the peer closed (with or without `close_notify`); `WouldBlock`: nothing
/// until the socket is readable again; `InvalidData`: the peer broke the
/// protocol (garbage, a failed handshake), and the alert that says so has
/// been written if the socket took it.
pub(crate) fn read(
    session: &mut ServerConnection,
    socket: &mut (impl Read + Write),
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        match session.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        // Handshake answers first: the peer waits for them.
        flush(session, socket)?;
        match session.read_tls(socket) {
            Ok(0) => return Ok(0),
            Ok(_) => {
                if let Err(e) = process(session) {
                    let _ = flush(session, socket);
                    return Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes what `session` has to say, then reads what `socket` holds into
/// it without processing it: for a handshake whose records are processed
/// on another thread ([`process`]). `Ok(false)`: the peer closed;
/// `WouldBlock`: nothing until the socket is readable again.
pub(crate) fn receive(
    session: &mut ServerConnection,
    socket: &mut (impl Read + Write),
) -> io::Result<bool> {
    flush(session, socket)?;
    loop {
        match session.read_tls(socket) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Processes the records `session` has received: in a handshake, its CPU
/// (a key exchange, a signature). `InvalidData`: the peer broke the
/// protocol, and the alert that says so waits in the session.
pub(crate) fn process(session: &mut ServerConnection) -> io::Result<()> {
    session
        .process_new_packets()
        .map(drop)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Encrypts `frames` (the first from `offset` on) into `session`,
/// coalesced into records of up to 16 KiB, as much as its buffer limit
/// takes, then flushes what the socket takes. Returns the bytes of frames
/// taken (a vectored write's count); `WouldBlock` if the session still held
/// unsent bytes, so took nothing. Unsent records stay in the session for
/// the next [`flush`].
pub(crate) fn encrypt<'a>(
    session: &mut ServerConnection,
    socket: &mut impl Write,
    frames: impl Iterator<Item = &'a [u8]>,
    offset: usize,
) -> io::Result<usize> {
    if flush(session, socket)? == Flushed::Blocked {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let mut count = 0;
    for (slot, frame) in slices.iter_mut().zip(frames) {
        let start = if count == 0 { offset } else { 0 };
        *slot = IoSlice::new(frame.get(start..).unwrap_or_default());
        count += 1;
    }
    let taken = session.writer().write_vectored(&slices[..count])?;
    if taken == 0 && slices[..count].iter().any(|s| !s.is_empty()) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    flush(session, socket)?;
    Ok(taken)
}

/// Writes `bytes` (a close frame, an HTTP answer) through `session` at
/// once, as far as the socket takes it: for a connection about to be dropped.
pub(crate) fn write_now(session: &mut ServerConnection, socket: &mut impl Write, bytes: &[u8]) {
    let _ = session.writer().write(bytes);
    let _ = flush(session, socket);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{
        ClientConfig, ClientConnection, RootCertStore, ServerConfig,
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    };

    use super::*;

    /// A socket that takes nothing (a client that stopped reading), or
    /// everything into `taken`.
    struct Socket {
        full: bool,
        taken: Vec<u8>,
    }

    impl Write for Socket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.full {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.taken.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A server session past its handshake with an in-memory client.
    fn session() -> (ServerConnection, ClientConnection) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        let mut client =
            ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
        while server.is_handshaking() || client.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        // The tickets the server sent after its handshake.
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        client.read_tls(&mut &wire[..]).unwrap();
        client.process_new_packets().unwrap();
        (server, client)
    }

    #[test]
    fn a_stalled_client_pins_one_record_whatever_is_offered() {
        let (mut server, _client) = session();
        limit(&mut server);
        let frames: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1024]).collect();
        let mut stalled = Socket {
            full: true,
            taken: Vec::new(),
        };
        // 64 KiB offered at once: one record's worth is taken.
        let taken = encrypt(&mut server, &mut stalled, frames.iter().map(|f| &f[..]), 0).unwrap();
        assert_eq!(taken, BUFFER_LIMIT);
        // While that waits, nothing more goes in.
        let again = encrypt(&mut server, &mut stalled, frames.iter().map(|f| &f[..]), 0);
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(flush(&mut server, &mut stalled).unwrap(), Flushed::Blocked);
        // The socket drains: one record (plus its overhead) comes out.
        stalled.full = false;
        assert_eq!(flush(&mut server, &mut stalled).unwrap(), Flushed::All);
        let record = stalled.taken.len();
        assert!(
            (BUFFER_LIMIT..BUFFER_LIMIT + 64).contains(&record),
            "{record} bytes"
        );
    }

    #[test]
    fn frames_coalesce_into_records_and_read_back_in_order() {
        let (mut server, mut client) = session();
        limit(&mut server);
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100]).collect();
        let mut socket = Socket {
            full: false,
            taken: Vec::new(),
        };
        let taken = encrypt(&mut server, &mut socket, frames.iter().map(|f| &f[..]), 30).unwrap();
        assert_eq!(taken, 970, "the first frame from its offset on");
        // One record: 970 bytes and one record's overhead (TLS 1.3: 22).
        assert!(socket.taken.len() < 970 + 64, "{}", socket.taken.len());
        client.read_tls(&mut &socket.taken[..]).unwrap();
        client.process_new_packets().unwrap();
        let mut plain = Vec::new();
        let _ = client.reader().read_to_end(&mut plain);
        let want: Vec<u8> = frames.concat()[30..].to_vec();
        assert_eq!(plain, want);
    }
}
