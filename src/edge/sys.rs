//! What the acceptor asks of the operating system beyond std and mio: socket
//! options no safe wrapper offers, set once per client socket, and the
//! open-file limit. The crate's only `unsafe` code lives here.
//!
//! `TCP_NOTSENT_LOWAT` bounds the bytes a socket accepts but has not sent.
//! Without it, a client that stops reading lets send-buffer autotuning
//! absorb megabytes before the gateway's drop-oldest queue sees any
//! backpressure: measured on loopback, 100 stalled clients of a 200 msg/s ×
//! 512 B feed held about 2.8 MB each in Send-Q after 30 s (`ss -tnm`), and
//! read seconds-old frames when they resumed. With a 16 KiB bound the same
//! sockets hold tens of KiB (see the README's hardening figures). Neither
//! socket2 (0.6), rustix (1.1) nor nix (0.32) exposes the option, hence the
//! one `setsockopt` call below.

use std::{io, os::fd::AsRawFd};

use socket2::SockRef;

/// Limits a client socket's send-side buffering: `SO_SNDBUF` to
/// `send_buffer` bytes and unsent bytes to `unsent`, each unless 0.
pub(crate) fn limit_send_buffers(
    stream: &mio::net::TcpStream,
    send_buffer: usize,
    unsent: usize,
) -> io::Result<()> {
    if send_buffer > 0 {
        SockRef::from(stream).set_send_buffer_size(send_buffer)?;
    }
    if unsent > 0 {
        set_notsent_lowat(stream, unsent)?;
    }
    Ok(())
}

/// The process's open-file limit (the soft `RLIMIT_NOFILE`), read from
/// `/proc/self/limits`; `None` where that is not available or unlimited.
pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Sets `TCP_NOTSENT_LOWAT` (Linux, and Apple systems) on `socket`.
#[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
#[allow(unsafe_code)]
fn set_notsent_lowat(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the duration of the call (borrowed
    // from a live socket), and the option value is a c_int passed by pointer
    // with its exact size, as setsockopt(2) requires for this option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere the kernel buffers as it likes.
#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
fn set_notsent_lowat(_socket: &impl AsRawFd, _bytes: usize) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsent_bound_is_set() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let stream = mio::net::TcpStream::from_std(client);
        limit_send_buffers(&stream, 0, 16 * 1024).unwrap();
        assert_eq!(read_notsent_lowat(&stream), 16 * 1024);
    }

    #[test]
    fn the_open_file_limit_is_read() {
        assert!(open_files_limit().is_some_and(|n| n >= 64));
    }

    #[allow(unsafe_code)]
    fn read_notsent_lowat(socket: &impl AsRawFd) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as in `set_notsent_lowat`, with room for the c_int read back.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        value
    }
}
