//! Socket I/O the pumps and handshakes share: whole writes (vectored, as few system calls as
//! the socket allows), half-close, readiness waits small enough to sit in every idle
//! connection's task, and how much a peer has not acknowledged yet.

use std::{
    io::{self, IoSlice},
    os::fd::AsRawFd,
};

use tokio::net::TcpStream;

/// Writes `parts` in order, whole, with as few system calls as the socket allows.
pub async fn write_all(to: &TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    write_all_slices(to, &mut slices).await
}

pub async fn write_all_slices(to: &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        to.writable().await?;
        match to.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Reads from `s` with `read`, which asks for `wanted` bytes. A read that returns fewer (the
/// socket had no more) makes tokio forget the socket's readiness, as a `WouldBlock` would: the
/// next wait then goes to epoll at once, instead of first costing a read that fails. tokio
/// keeps the readiness if an event arrived since it was observed, so none is lost.
///
/// Only for `read`/`readv`, which TCP returns short only when its receive queue is empty;
/// not for `splice`, which also stops when the pipe runs out of slots.
pub fn read_drained(
    s: &TcpStream,
    wanted: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = None;
    let result = s.try_io(tokio::io::Interest::READABLE, || {
        let n = read()?;
        if n > 0 && n < wanted {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, short) {
        (Err(_), Some(n)) => Ok(n),
        (result, _) => result,
    }
}

/// Waits until `s` may have bytes to read (a small future, unlike `TcpStream::readable`'s:
/// this wait is where an idle connection spends its life).
pub async fn readable(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` may take bytes: as [`readable`], a small future where the pump keeps it.
pub async fn writable(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

/// Bytes written to `socket` that its peer has not acknowledged yet (`SIOCOUTQ`).
pub fn unacknowledged(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which points to `n`;
    // the descriptor is open for the duration of the call. Neither nix nor socket2 offers it.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// What the kernel knows of a TCP connection's traffic, for copies it makes itself.
#[derive(Clone, Copy, Debug)]
pub struct TcpCounts {
    /// Payload bytes received from the peer (`tcpi_bytes_received`).
    pub received: u64,
    /// Payload bytes the peer acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Milliseconds since payload last arrived.
    pub since_data_in_ms: u32,
    /// Whether the connection is closed (`TCP_CLOSE`): both ends' FINs exchanged, or reset.
    pub closed: bool,
}

/// Reads [`TcpCounts`] (`TCP_INFO`).
pub fn tcp_counts(socket: &impl AsRawFd) -> io::Result<TcpCounts> {
    // SAFETY: an all-zero tcp_info is a valid value of the plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`, which is that large; the
    // descriptor is open for the call. Neither nix nor socket2 offers TCP_INFO.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpCounts {
        received: info.tcpi_bytes_received,
        acked: info.tcpi_bytes_acked,
        since_data_in_ms: info.tcpi_last_data_recv,
        // TCP_CLOSE of include/net/tcp_states.h (the libc crate has it for Hurd only).
        closed: info.tcpi_state == 7,
    })
}

/// Bytes written into `socket` so far: acknowledged plus still queued. Never more than the
/// truth: the acknowledged count is read first, and whatever is acknowledged in between only
/// leaves the queue.
pub fn bytes_written(socket: &impl AsRawFd) -> io::Result<u64> {
    let acked = tcp_counts(socket)?.acked;
    Ok(acked + unacknowledged(socket)? as u64)
}

/// The socket's cookie (`SO_COOKIE`): the kernel's unique, never reused id of the socket,
/// which eBPF programs see too.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes one u64 into `cookie`; the descriptor is open for the call.
    // Neither nix nor socket2 offers it.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Sets `SO_RCVLOWAT`. The kernel then checks at once whether data is waiting, and if so
/// calls the socket's data-ready hook: that is what hands bytes queued before a socket joined
/// a SOCKHASH to its verdict program.
pub fn set_recv_lowat(socket: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: SO_RCVLOWAT reads one int from `bytes`; the descriptor is open for the call.
    // socket2 does not offer it, nix only on other systems.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
