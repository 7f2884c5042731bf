//! TCP options of the worker's connections to Postgres that sqlx 0.9.0 leaves unset.
//!
//! - `TCP_NODELAY`: without it, the message that ends a COPY waits for the server's
//!   delayed ACK of the data before it (up to 40 ms on Linux), so every COPY of a few
//!   rows costs 40 ms (sqlx issue #4335; sqlx sets it again after 0.9.0).
//! - Keepalive probes: a server that vanished without closing the connection (a host
//!   gone, a network cut) is noticed within about 25 s instead of never.
//!
//! sqlx does not hand out its sockets, so after each connect the process's own sockets
//! whose peer is the Postgres server are found and set. Only on Linux (`/proc`).

use std::net::SocketAddr;
use std::time::Duration;

/// Sets the options on every socket of this process connected to one of `server`.
#[cfg(target_os = "linux")]
pub(super) fn tune(server: &[SocketAddr]) {
    use std::os::fd::{BorrowedFd, RawFd};
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor was open a moment ago and is only borrowed for the calls
        // below. Were it closed meanwhile, they fail with EBADF; were its number reused,
        // the peer check below decides as for any other socket.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let to_server = socket
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|peer| server.contains(&peer));
        if to_server {
            let _ = socket.set_tcp_nodelay(true);
            let _ = socket.set_tcp_keepalive(&keepalive);
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn tune(_server: &[SocketAddr]) {}
