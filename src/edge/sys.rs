//! What the acceptor asks of the operating system beyond std and mio: socket
//! options no safe wrapper offers, set once per client socket, the
//! open-file limit, and its own thread's priority. The crate's only `unsafe`
//! code lives here.
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

/// Adds `by` to the calling thread's nice value (at most 19) and returns
/// the new one. On Linux the nice value belongs to the thread
/// (setpriority(2), NOTES), so the gateway's other threads keep theirs.
///
/// Why: in a reconnect storm the acceptor's upgrades, TLS handshakes and
/// JWT checks compete for the CPU with the lobbies and writers serving the
/// clients already connected. Measured here (README, Who may connect): two
/// gateways, 1 000 clients on a 50 msg/s feed while 20 000 ES256 clients
/// connect, 500 at a time; the readers' p99 242 and 87.7 ms with the
/// acceptor at nice 0, 90.4 and 31.0 ms at nice 10.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
pub(crate) fn lower_thread_priority(by: u8) -> io::Result<i32> {
    // SAFETY: gettid and getpriority take and return plain integers and
    // touch no memory of ours.
    let (tid, current) = unsafe {
        let tid = libc::gettid();
        (
            tid,
            libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t),
        )
    };
    let nice = (current + i32::from(by)).min(19);
    // SAFETY: as above; `tid` is this thread's own id, so only its nice
    // value changes.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(nice)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere the nice value belongs to the whole process: left alone.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn lower_thread_priority(_by: u8) -> io::Result<i32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "a thread's own priority needs Linux",
    ))
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
    #[cfg(target_os = "linux")]
    fn only_the_calling_thread_is_lowered() {
        let own = |tid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            fields[16].parse::<i32>().unwrap()
        };
        // SAFETY: as in `lower_thread_priority`.
        #[allow(unsafe_code)]
        let main = unsafe { libc::gettid() };
        let before = own(main);
        let (tid, nice) = std::thread::spawn(|| {
            #[allow(unsafe_code)]
            // SAFETY: as above.
            let tid = unsafe { libc::gettid() };
            (tid, lower_thread_priority(3).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(nice, (before + 3).min(19));
        assert_ne!(tid, main);
        assert_eq!(own(main), before, "another thread's nice value changed");
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
