//! plain → plain inside the kernel: the pair of sockets is handed to the `relay_copy` verdict
//! program ([`crate::sockmap`]), which moves every segment arriving on one socket to the
//! other's send queue. Steady traffic never wakes the worker: the connection's task sleeps
//! until a socket reports its peer's end (`EPOLLRDHUP`) or an error, or until the idle timer.
//!
//! The kernel moves bytes but not ends, so the task does what splice's pumps do at an end:
//! - a peer's FIN: once the other socket has taken every byte that arrived before it (its
//!   written count reaches the source's received count), the relay shuts down its write half
//!   toward the other peer; the other direction goes on;
//! - a reset or error: the other side is reset once it has taken and acknowledged what came
//!   before (bounded by [`DRAIN`]), as with splice.
//!
//! Byte counts come from the kernel: what a socket received from its peer
//! (`tcpi_bytes_received`, less the one sequence number a FIN takes) is what the relay moved
//! from it. Nothing is read by the relay before the pair is installed; bytes already queued
//! then are handed to the program by `SO_RCVLOWAT` ([`set_recv_lowat`]).
//!
//! Only established connections can join the maps: a peer that has already sent its FIN when
//! the pair would be installed (a request sent and half-closed before the backend answered
//! the connect) is copied by splice instead.
//!
//! The sockets are taken off tokio's reactor for the pair's life: tokio would be woken by
//! every segment. One epoll instance per worker ([`Watch`]) watches all pairs, for ends and
//! errors only, and wakes the one task concerned.

use std::{
    collections::HashMap,
    io,
    net::{Shutdown, TcpStream as StdStream},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
    time::Instant,
};

use super::{CopyError, DRAIN, Peer, PlainCopy, Transfer, reset_after_drain};
use crate::{
    net::io::{bytes_written, set_recv_lowat, socket_cookie, tcp_counts},
    sockmap::{InstallError, Pairs},
};

/// The worker's kernel copy: the maps, and the watch over installed pairs.
pub struct KernelCopy {
    pairs: Pairs,
    watch: Watch,
}

impl std::fmt::Debug for KernelCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCopy")
    }
}

impl KernelCopy {
    /// Must be called inside the runtime: the watch's task starts here.
    pub fn new(pairs: Pairs) -> io::Result<&'static KernelCopy> {
        let kc: &'static KernelCopy = Box::leak(Box::new(KernelCopy {
            pairs,
            watch: Watch::new()?,
        }));
        tokio::spawn(kc.watch.run());
        Ok(kc)
    }
}

/// Copies both ways between two plain sockets in the kernel; gives them back if the pair
/// cannot be installed (the caller copies them itself then).
pub(super) async fn relay_in_kernel(
    kc: &'static KernelCopy,
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
) -> Result<(Transfer, Result<(), CopyError>), (TcpStream, TcpStream, io::Error)> {
    let pair = match Pair::install(kc, client, backend) {
        Ok(p) => p,
        Err(Refused::Untouched(c, b, e)) => return Err((c, b, e)),
        Err(Refused::Broken(e)) => {
            let fail = CopyError::Io {
                peer: Peer::Client,
                error: e,
            };
            let transfer = Transfer {
                path: Some(PlainCopy::Kernel),
                ..Transfer::default()
            };
            return Ok((transfer, Err(fail)));
        }
    };
    let result = pair.run(idle).await;
    if let Err(e) = &result
        && let Some(peer) = e.aborted_by()
    {
        // What the kernel still holds for the other side goes first, then the reset.
        let deadline = Instant::now() + DRAIN;
        let _ = Box::pin(pair.delivered(peer, || Instant::now() >= deadline)).await;
        Box::pin(reset_after_drain(pair.socket(peer.other()))).await;
    }
    Ok((pair.transfer(), result))
}

enum Refused {
    Untouched(TcpStream, TcpStream, io::Error),
    Broken(io::Error),
}

/// An installed pair; dropping it closes both sockets, which takes them out of the maps.
struct Pair {
    client: StdStream,
    backend: StdStream,
    /// Bytes the relay wrote itself before the kernel took over (a PROXY header).
    backend_base: u64,
    client_base: u64,
    /// Whether the client's, then the backend's, FIN arrived: it counts in
    /// `tcpi_bytes_received` as one byte that is not payload.
    fin: [AtomicBool; 2],
    token: u64,
    woken: Arc<Notify>,
    watch: &'static Watch,
}

impl Pair {
    fn install(
        kc: &'static KernelCopy,
        client: TcpStream,
        backend: TcpStream,
    ) -> Result<Pair, Refused> {
        let untouched = |c, b, e| Refused::Untouched(c, b, e);
        let ids = socket_cookie(&client)
            .and_then(|c| Ok((c, socket_cookie(&backend)?)))
            .and_then(|ids| Ok((ids, bytes_written(&client)?, bytes_written(&backend)?)));
        let ((client_id, backend_id), client_base, backend_base) = match ids {
            Ok(v) => v,
            Err(e) => return Err(untouched(client, backend, e)),
        };
        // Off tokio's reactor: it would be woken by every segment the kernel moves.
        let (client, backend) = match (client.into_std(), backend.into_std()) {
            (Ok(c), Ok(b)) => (c, b),
            (Err(e), _) | (_, Err(e)) => return Err(Refused::Broken(e)),
        };
        let (token, woken) = match kc.watch.add(&client, &backend) {
            Ok(w) => w,
            Err(e) => return Err(back_to_tokio(client, backend, e)),
        };
        match kc
            .pairs
            .install((client.as_fd(), client_id), (backend.as_fd(), backend_id))
        {
            Ok(()) => {}
            Err(InstallError::Untouched(e)) => {
                kc.watch.remove(token, &client, &backend);
                return Err(back_to_tokio(client, backend, e));
            }
            Err(e @ InstallError::HalfInstalled(_)) => {
                kc.watch.remove(token, &client, &backend);
                return Err(Refused::Broken(io::Error::other(e)));
            }
        }
        let pair = Pair {
            client,
            backend,
            backend_base,
            client_base,
            fin: [AtomicBool::new(false), AtomicBool::new(false)],
            token,
            woken,
            watch: &kc.watch,
        };
        // Bytes that arrived before the pair was installed wait in the receive queues: this
        // hands them to the program, ahead of anything arriving later.
        for s in [&pair.client, &pair.backend] {
            if let Err(e) = set_recv_lowat(s, 1) {
                return Err(Refused::Broken(e));
            }
        }
        Ok(pair)
    }

    /// Bytes the relay wrote into the socket that `from`'s bytes go to, before the kernel did.
    fn base(&self, from: Peer) -> u64 {
        match from {
            Peer::Client => self.backend_base,
            Peer::Backend => self.client_base,
        }
    }

    /// The socket `peer` sends to the relay on.
    fn socket(&self, peer: Peer) -> &StdStream {
        match peer {
            Peer::Client => &self.client,
            Peer::Backend => &self.backend,
        }
    }

    fn fin(&self, peer: Peer) -> &AtomicBool {
        &self.fin[peer as usize]
    }

    /// Payload bytes that arrived from `peer`.
    fn received(&self, peer: Peer) -> io::Result<u64> {
        let fin = self.fin(peer).load(Ordering::Relaxed);
        Ok(tcp_counts(self.socket(peer))?.received - u64::from(fin))
    }

    fn transfer(&self) -> Transfer {
        Transfer {
            up: self.received(Peer::Client).unwrap_or(0),
            down: self.received(Peer::Backend).unwrap_or(0),
            path: Some(PlainCopy::Kernel),
        }
    }

    /// Waits until the other side's socket has taken every byte that arrived from `from`
    /// (beyond what the relay wrote there itself). `Ok(false)` if `give_up` says so first.
    async fn delivered(&self, from: Peer, give_up: impl Fn() -> bool) -> Result<bool, CopyError> {
        let to = self.socket(from.other());
        let base = self.base(from);
        let mut pause = Duration::from_micros(50);
        loop {
            let received = self.received(from).map_err(|e| io_error(e, from))?;
            let written = bytes_written(to).map_err(|e| io_error(e, from.other()))?;
            if written.saturating_sub(base) >= received {
                return Ok(true);
            }
            if let Some(e) = to.take_error().map_err(|e| io_error(e, from.other()))? {
                return Err(io_error(e, from.other()));
            }
            if give_up() {
                return Ok(false);
            }
            // The kernel's worker sends what it holds as soon as the socket has room; this
            // wait happens once per direction, at its end.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Until both peers have ended cleanly (each end passed on), one fails, or nothing moves
    /// for `idle`.
    async fn run(&self, idle: Duration) -> Result<(), CopyError> {
        let (mut up_done, mut down_done) = (false, false);
        loop {
            for (done, from, to, peer) in [
                (&mut up_done, &self.client, &self.backend, Peer::Client),
                (&mut down_done, &self.backend, &self.client, Peer::Backend),
            ] {
                if *done {
                    continue;
                }
                if ended(from, peer)? {
                    self.fin(peer).store(true, Ordering::Relaxed);
                    let quiet_since = Instant::now();
                    let stalled = || quiet_since.elapsed() >= idle;
                    if !self.delivered(peer, stalled).await? {
                        return Err(CopyError::Idle(idle));
                    }
                    shutdown_write(to).map_err(|e| io_error(e, peer.other()))?;
                    *done = true;
                }
            }
            if up_done && down_done {
                return Ok(());
            }
            // The data keeps the connection alive: the kernel says when it last arrived.
            let quiet = [&self.client, &self.backend]
                .iter()
                .filter_map(|s| tcp_counts(*s).ok())
                .map(|c| Duration::from_millis(c.since_data_in_ms.into()))
                .min()
                .unwrap_or_default();
            if quiet >= idle {
                return Err(CopyError::Idle(idle));
            }
            tokio::select! {
                () = self.woken.notified() => {}
                () = tokio::time::sleep(idle - quiet) => {}
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.watch.remove(self.token, &self.client, &self.backend);
    }
}

fn back_to_tokio(client: StdStream, backend: StdStream, e: io::Error) -> Refused {
    match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
        (Ok(c), Ok(b)) => Refused::Untouched(c, b, e),
        (Err(e), _) | (_, Err(e)) => Refused::Broken(e),
    }
}

fn io_error(error: io::Error, peer: Peer) -> CopyError {
    CopyError::Io { peer, error }
}

/// Whether `from`'s peer has ended its stream (`Ok(true)`), or failed (`Err`). Peeks, so that a
/// byte the program has not taken yet stays where it is.
fn ended(from: &StdStream, peer: Peer) -> Result<bool, CopyError> {
    if let Some(e) = from.take_error().map_err(|e| io_error(e, peer))? {
        return Err(io_error(e, peer));
    }
    let mut byte = [0u8; 1];
    match nix::sys::socket::recv(
        from.as_raw_fd(),
        &mut byte,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => Ok(true),
        // A byte the program is about to take: not an end yet.
        Ok(_) => Ok(false),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(io_error(e.into(), peer)),
    }
}

fn shutdown_write(to: &StdStream) -> io::Result<()> {
    match to.shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// One epoll instance for every installed pair of the worker, registered for ends and
/// errors only (`EPOLLRDHUP`, and the `EPOLLERR`/`EPOLLHUP` epoll always reports): a segment
/// that the program moves does not wake it.
struct Watch {
    epoll: Epoll,
    /// The same instance, as tokio waits on it.
    ready: AsyncFd<OwnedFd>,
    tasks: Mutex<HashMap<u64, Arc<Notify>>>,
    next: AtomicU64,
}

impl Watch {
    fn new() -> io::Result<Watch> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let dup = epoll.0.try_clone()?;
        // SAFETY: the descriptor stays open and unchanged for as long as the AsyncFd owns it.
        let ready = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Watch {
            epoll,
            ready,
            tasks: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        })
    }

    fn add(&self, a: &StdStream, b: &StdStream) -> io::Result<(u64, Arc<Notify>)> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let woken = Arc::new(Notify::new());
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token, Arc::clone(&woken));
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        for s in [a, b] {
            if let Err(e) = self.epoll.add(s, EpollEvent::new(flags, token)) {
                self.remove(token, a, b);
                return Err(e.into());
            }
        }
        Ok((token, woken))
    }

    fn remove(&self, token: u64, a: &StdStream, b: &StdStream) {
        for s in [a, b] {
            let _ = self.epoll.delete(s);
        }
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
    }

    async fn run(&'static self) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let Ok(mut ready) = self.ready.readable().await else {
                return;
            };
            let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("kernel copy watch failed: {e}");
                    return;
                }
            };
            if n < events.len() {
                ready.clear_ready();
            }
            let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            for e in &events[..n] {
                if let Some(task) = tasks.get(&e.data()) {
                    task.notify_one();
                }
            }
        }
    }
}
