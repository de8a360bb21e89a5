//! The channel between the supervisor and its worker: typed messages with file descriptors.
//!
//! A `SOCK_SEQPACKET` socketpair keeps message boundaries, and the descriptors attached to a
//! datagram (`SCM_RIGHTS`) arrive with it: this is how listening sockets reach the worker (the
//! supervisor keeps its own copy of every listener, so connections waiting in an accept queue
//! survive a worker that dies, and the next worker accepts them).
//!
//! Messages are encoded with postcard (binary; certificate bytes travel as bytes) and sent as
//! datagrams of at most [`CHUNK`] bytes, a message of [`MAX_MESSAGE`] at most: a receiver's
//! buffer grows with what arrives, and no datagram is larger than the kernel lets one be. A
//! message cut in the middle (its sender or receiver given up on) would leave the next one
//! unreadable, so the channel is shut down instead: the worker then ends and is restarted.
//! Every message carries an id; an answer carries the id of its request. The supervisor's
//! [`Asker`] matches answers to requests, so an answer that comes after its request gave up
//! is dropped (and counted), never taken for the answer to the next request.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::oneshot,
};

/// The largest datagram: far below the kernel's limit for one (the socket's send buffer).
const CHUNK: usize = 32 << 10;
/// The largest message: a configuration with every certificate, key and CA, many times over.
pub const MAX_MESSAGE: usize = 64 << 20;
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

/// A configuration for the worker to serve from now on: the services, the bytes of every file
/// they read (the worker reads no file), the ticket keys, and the listeners attached to this
/// message (`add`, in order) or to stop accepting on (`close`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Apply {
    pub relay: crate::config::RelaySection,
    pub services: Vec<crate::config::Service>,
    pub files: crate::tls::Files,
    pub tickets: Vec<crate::tickets::TicketKey>,
    pub add: Vec<Role>,
    pub close: Vec<Role>,
    /// `[directory]`, ready to connect from a process that reads no file.
    pub directory: Option<crate::directory::Settings>,
}

/// Supervisor to worker.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Apply(Apply),
    /// New session ticket keys, newest first.
    Tickets(Vec<crate::tickets::TicketKey>),
    /// The ACME tls-alpn-01 answers to serve from now on (all of them); answered with
    /// `Applied`.
    Challenges(crate::tls::challenge::AnswerSet),
    /// Whether each `ipsec` service's SA is up (all of them).
    Ipsec(crate::ipsec::PathSet),
    /// Report connection counters.
    Status,
    /// Report the metrics in the exposition format.
    Metrics,
    /// Stop accepting, let connections finish, exit.
    Stop,
    /// Tests only (debug builds): make the worker misbehave on purpose.
    Debug(DebugOp),
}

/// What a test can make a debug build's worker do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DebugOp {
    /// Try to read a file, then to run a program: the sandbox must refuse both.
    Escape,
    /// Answer the next request this many milliseconds late.
    StallNext(u64),
}

/// Worker to supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The answer to `Apply`: `error` if the worker kept its previous services.
    Applied {
        error: Option<String>,
    },
    /// The services' counters, and the directory's state when there is one.
    Status(
        Vec<crate::metrics::ServiceStatus>,
        Option<crate::directory::Status>,
    ),
    Metrics(String),
    /// The answer to `Debug`: what happened.
    Debug(String),
}

/// One message on the wire, with its id.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

/// The worker finds its end of the channel at this descriptor number.
pub const WORKER_FD: RawFd = 3;

/// Both ends of a new channel, close-on-exec: the worker's end is moved to [`WORKER_FD`] in the
/// child only.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// One end of the channel.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// A message's datagrams go out back to back: one sender at a time.
    sending: tokio::sync::Mutex<()>,
}

/// The header of every datagram: the message's total length, then its bytes.
const LEN: usize = 4;

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
        Ok(Channel {
            fd,
            sending: tokio::sync::Mutex::new(()),
        })
    }

    /// The worker's end, inherited at [`WORKER_FD`] (to wrap with [`Channel::new`] once the
    /// runtime runs).
    pub fn inherited_fd() -> io::Result<OwnedFd> {
        // SAFETY: the supervisor placed our end of the socketpair at WORKER_FD before exec, and
        // nothing else in this process owns that descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(WORKER_FD) };
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Ok(fd)
    }

    /// Sends one message (with `fds`, attached to its first datagram).
    pub async fn send<T: Serialize>(
        &self,
        msg: &Envelope<T>,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let body = postcard::to_stdvec(msg).map_err(io::Error::other)?;
        if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(io::Error::other("handoff message too large"));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let len = (body.len() as u32).to_be_bytes();
        let _one_at_a_time = self.sending.lock().await;
        let mut whole = Whole::new(self);
        for (i, chunk) in body.chunks(CHUNK).enumerate() {
            let first = i == 0;
            let parts = [
                IoSlice::new(if first { &len } else { &[] }),
                IoSlice::new(chunk),
            ];
            loop {
                let mut guard = self.fd.writable().await?;
                let sent = guard.try_io(|inner| {
                    let rights = [ControlMessage::ScmRights(&raw)];
                    let cmsgs: &[ControlMessage<'_>] = if first && !raw.is_empty() {
                        &rights
                    } else {
                        &[]
                    };
                    sendmsg::<()>(
                        inner.as_fd().as_raw_fd(),
                        &parts,
                        cmsgs,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(io::Error::from)
                });
                match sent {
                    Ok(result) => {
                        result?;
                        break;
                    }
                    Err(_would_block) => continue,
                }
            }
            whole.started();
        }
        whole.done();
        Ok(())
    }

    /// The next message and its descriptors; `None` when the other end has closed.
    pub async fn recv<T: DeserializeOwned>(
        &self,
    ) -> io::Result<Option<(Envelope<T>, Vec<OwnedFd>)>> {
        let mut fds = Vec::new();
        let Some(first) = self.datagram(&mut fds).await? else {
            return Ok(None);
        };
        let mut whole = Whole::new(self);
        whole.started();
        let Some((len, rest)) = first.split_first_chunk::<LEN>() else {
            return Err(io::Error::other("handoff datagram without a header"));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_MESSAGE || rest.len() > len {
            return Err(io::Error::other("handoff message of a wrong length"));
        }
        // Grown as datagrams arrive: the announced length is the peer's word, not memory yet.
        let mut body = Vec::with_capacity(len.min(CHUNK));
        body.extend_from_slice(rest);
        while body.len() < len {
            let Some(more) = self.datagram(&mut fds).await? else {
                return Err(io::Error::other("handoff channel closed in a message"));
            };
            if body.len() + more.len() > len {
                return Err(io::Error::other("handoff message longer than announced"));
            }
            body.extend_from_slice(&more);
        }
        whole.done();
        let msg = postcard::from_bytes(&body).map_err(io::Error::other)?;
        Ok(Some((msg, fds)))
    }

    /// One datagram, sized by a peek at its length; `None` at the end.
    async fn datagram(&self, fds: &mut Vec<OwnedFd>) -> io::Result<Option<Vec<u8>>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let got = guard.try_io(|inner| {
                let fd = inner.as_fd().as_raw_fd();
                // MSG_TRUNC with MSG_PEEK tells a datagram's real length without taking it.
                let mut probe = [0u8; 1];
                let mut iov = [IoSliceMut::new(&mut probe)];
                let peeked =
                    recvmsg::<()>(fd, &mut iov, None, MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC)?;
                if peeked.bytes == 0 {
                    return Ok(None);
                }
                if peeked.bytes > CHUNK + LEN {
                    return Err(io::Error::other("handoff datagram too large"));
                }
                let mut buf = vec![0u8; peeked.bytes];
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
                for c in msg.cmsgs()? {
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
                    return Err(io::Error::other("handoff datagram truncated"));
                }
                let n = msg.bytes;
                buf.truncate(n);
                Ok(Some(buf))
            });
            match got {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Shuts the channel down when dropped between a message's first datagram and its last: the
/// other end can no longer tell where the next message starts.
struct Whole<'a> {
    channel: &'a Channel,
    cut: bool,
}

impl<'a> Whole<'a> {
    fn new(channel: &'a Channel) -> Whole<'a> {
        Whole {
            channel,
            cut: false,
        }
    }

    fn started(&mut self) {
        self.cut = true;
    }

    fn done(&mut self) {
        self.cut = false;
    }
}

impl Drop for Whole<'_> {
    fn drop(&mut self) {
        if self.cut {
            tracing::warn!("handoff message cut in the middle: closing the channel");
            let _ = nix::sys::socket::shutdown(
                self.channel.fd.get_ref().as_raw_fd(),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

/// The supervisor's side of the channel: requests with ids, answers matched to them.
pub struct Asker {
    channel: Channel,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<FromWorker>>>,
    /// Answers that came after their request gave up.
    late: AtomicU64,
}

impl Asker {
    /// Wraps the channel; `answers` must then run (in a task) to deliver the answers.
    pub fn new(channel: Channel) -> Arc<Asker> {
        Arc::new(Asker {
            channel,
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            late: AtomicU64::new(0),
        })
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<FromWorker>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the worker's answers until the channel closes, handing each to its request.
    pub async fn answers(&self) {
        while let Ok(Some((msg, _))) = self.channel.recv::<FromWorker>().await {
            let Envelope { id, body } = msg;
            match self.waiting().remove(&id) {
                Some(request) => {
                    let _ = request.send(body);
                }
                None => {
                    self.late.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(id, "late answer from the worker dropped");
                }
            }
        }
        // The worker is gone: its pending requests fail now rather than at their timeout.
        self.waiting().clear();
    }

    /// Sends `msg` (with `fds`) and waits up to `limit` for its answer.
    pub async fn ask(
        &self,
        msg: ToWorker,
        fds: &[BorrowedFd<'_>],
        limit: Duration,
    ) -> anyhow::Result<FromWorker> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id, tx);
        let exchange = async {
            self.channel.send(&Envelope { id, body: msg }, fds).await?;
            rx.await
                .map_err(|_| anyhow::anyhow!("the worker closed the channel"))
        };
        let answer = tokio::time::timeout(limit, exchange).await;
        self.waiting().remove(&id);
        match answer {
            Ok(answer) => answer,
            Err(_) => Err(anyhow::anyhow!(
                "the worker did not answer within {limit:?}"
            )),
        }
    }

    /// Sends `msg` with no answer expected.
    pub async fn tell(&self, msg: ToWorker) -> io::Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.channel.send(&Envelope { id, body: msg }, &[]).await
    }

    /// Answers dropped because they came too late.
    pub fn late_answers(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_larger_than_a_datagram_arrives_whole_with_its_descriptors() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let (r, w) = nix::unistd::pipe().unwrap();
        let big = vec![7u8; 3 * CHUNK + 5];
        let msg = Envelope {
            id: 9,
            body: FromWorker::Metrics(String::from_utf8(big.clone()).unwrap()),
        };
        let fds = [r.as_fd(), w.as_fd()];
        let (sent, got) = tokio::join!(a.send(&msg, &fds), b.recv());
        sent.unwrap();
        let (got, fds) = got.unwrap().unwrap();
        assert_eq!(got.id, 9);
        assert!(matches!(got.body, FromWorker::Metrics(m) if m.as_bytes() == big));
        assert_eq!(fds.len(), 2);
    }

    #[tokio::test]
    async fn a_message_given_up_on_in_the_middle_closes_the_channel() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        // Far more than the socket buffers hold while nobody reads: the send stalls mid-way.
        let msg = Envelope {
            id: 1,
            body: FromWorker::Metrics("x".repeat(64 * CHUNK)),
        };
        let sent = tokio::time::timeout(Duration::from_millis(100), a.send(&msg, &[])).await;
        assert!(sent.is_err(), "the send was still under way");
        // The receiver gets the message's beginning, then the end of the channel: never a
        // next message read from the middle of this one.
        let got = b.recv::<FromWorker>().await;
        assert!(got.is_err(), "{got:?}");
        let again = Envelope {
            id: 2,
            body: FromWorker::Metrics("next".into()),
        };
        assert!(a.send(&again, &[]).await.is_err(), "the channel is closed");
    }

    #[tokio::test]
    async fn a_late_answer_is_not_taken_for_the_next_one() {
        let (a, b) = pair().unwrap();
        let asker = Asker::new(Channel::new(a).unwrap());
        let worker = Channel::new(b).unwrap();
        let reader = {
            let asker = Arc::clone(&asker);
            tokio::spawn(async move { asker.answers().await })
        };
        // The first request gives up before its answer; the answer comes afterwards.
        let first = asker
            .ask(ToWorker::Status, &[], Duration::from_millis(50))
            .await;
        assert!(first.is_err());
        let (request, _) = worker.recv::<ToWorker>().await.unwrap().unwrap();
        worker
            .send(
                &Envelope {
                    id: request.id,
                    body: FromWorker::Metrics("stale".into()),
                },
                &[],
            )
            .await
            .unwrap();
        // The second request gets its own answer, not the stale one.
        let second = tokio::spawn({
            let asker = Arc::clone(&asker);
            async move {
                asker
                    .ask(ToWorker::Metrics, &[], Duration::from_secs(5))
                    .await
            }
        });
        let (request, _) = worker.recv::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(request.body, ToWorker::Metrics));
        worker
            .send(
                &Envelope {
                    id: request.id,
                    body: FromWorker::Metrics("fresh".into()),
                },
                &[],
            )
            .await
            .unwrap();
        let answer = second.await.unwrap().unwrap();
        assert!(matches!(answer, FromWorker::Metrics(m) if m == "fresh"));
        assert_eq!(asker.late_answers(), 1);
        drop(worker);
        reader.await.unwrap();
    }
}
