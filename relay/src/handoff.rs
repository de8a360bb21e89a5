//! The channel between the supervisor and its worker: JSON messages with file descriptors.
//!
//! A `SOCK_SEQPACKET` socketpair keeps message boundaries, so one `sendmsg` is one message and
//! the descriptors attached to it (`SCM_RIGHTS`) arrive with it. This is how listening sockets
//! reach the worker: the supervisor keeps its own copy of every listener, so connections waiting
//! in an accept queue survive a worker that dies, and the next worker accepts them.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{Interest, unix::AsyncFd};

/// Largest message: a config with every certificate, key and CA inlined.
const MAX_MESSAGE: usize = 8 << 20;
/// Most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;

/// Which listener a descriptor is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The `listen` socket of an explicit-mode service.
    Service(String),
    /// The transparent listeners that steered connections arrive on.
    TransparentV4,
    TransparentV6,
}

/// Supervisor to worker. Sent a few times in a worker's life: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Serve these services from now on. `files` holds every certificate, key and CA they
    /// read; `add` names the listeners attached to this message, in order; `close` the ones
    /// to stop accepting on.
    Apply {
        relay: crate::config::RelaySection,
        services: Vec<crate::config::Service>,
        files: Vec<(std::path::PathBuf, Vec<u8>)>,
        tickets: Vec<crate::tickets::TicketKey>,
        add: Vec<Role>,
        close: Vec<Role>,
    },
    /// New session ticket keys, newest first.
    Tickets(Vec<crate::tickets::TicketKey>),
    /// Report connection counters.
    Status,
    /// Report the metrics in the exposition format.
    Metrics,
    /// Stop accepting, let connections finish, exit.
    Stop,
}

/// Worker to supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The answer to `Apply`: `error` if the worker kept its previous services.
    Applied {
        error: Option<String>,
    },
    Status(Vec<crate::metrics::ServiceStatus>),
    Metrics(String),
}

/// The worker finds its end of the channel at this descriptor number.
pub const WORKER_FD: RawFd = 3;

pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

/// Both ends of a new channel, close-on-exec: the worker's end is moved to [`WORKER_FD`] in the
/// child only.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    for fd in [&a, &b] {
        setsockopt(fd, sockopt::SndBuf, &MAX_MESSAGE)?;
        setsockopt(fd, sockopt::RcvBuf, &MAX_MESSAGE)?;
    }
    Ok((a, b))
}

impl Channel {
    /// Wraps one end of [`pair`]; must run inside the tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: the OwnedFd stays open and unchanged for as long as the AsyncFd owns it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Channel { fd })
    }

    /// The worker's end, inherited at [`WORKER_FD`].
    pub fn inherited() -> io::Result<Channel> {
        // SAFETY: the supervisor placed our end of the socketpair at WORKER_FD before exec, and
        // nothing else in this process owns that descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(WORKER_FD) };
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Self::new(fd)
    }

    pub async fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
        if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(io::Error::other("handoff message too large"));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let r = guard.try_io(|inner| {
                let cmsgs = if raw.is_empty() {
                    vec![]
                } else {
                    vec![ControlMessage::ScmRights(&raw)]
                };
                sendmsg::<()>(
                    inner.as_fd().as_raw_fd(),
                    &[IoSlice::new(&body)],
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match r {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message and its descriptors; `None` when the other end has closed.
    pub async fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|inner| {
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(
                    inner.as_fd().as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        // SAFETY: descriptors just received by this process; we own them now.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                    return Err(io::Error::other("handoff message truncated"));
                }
                Ok((msg.bytes, fds))
            });
            match r {
                Ok(Ok((0, _))) => return Ok(None),
                Ok(Ok((n, fds))) => {
                    let msg = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
                    return Ok(Some((msg, fds)));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
