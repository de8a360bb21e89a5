//! Socket I/O the pumps and handshakes share: whole writes (vectored, as few system calls as
//! the socket allows), half-close, readiness waits small enough to sit in every idle
//! connection's task, and how much a peer has not acknowledged yet.

use std::{
    io::{self, IoSlice},
    os::fd::AsRawFd as _,
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
pub fn unacknowledged(socket: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which points to `n`;
    // the descriptor is open for the duration of the call. Neither nix nor socket2 offers it.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}
