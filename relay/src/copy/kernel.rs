//! plain → plain inside the kernel: the pair of sockets is handed to the `relay_copy` verdict
//! program ([`crate::sockmap`]), which moves every segment arriving on one socket to the
//! other's send queue. Steady traffic does not wake the worker: the connection's task sleeps
//! until a socket reports its peer's end (`EPOLLRDHUP`) or an error, the program asks for a
//! larger allowance (once per 4 MiB), or the idle timer fires.
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
//! The kernel holds what it moved for a peer that does not read without charging anyone, so
//! the program moves at most [`COPY_WINDOW`] bytes beyond what the other socket has taken
//! (relay-ebpf's `copy.rs`). A quarter of the way, it asks for more ([`Pair::top_up`]). Past
//! it, the direction is *lagging* and its bytes stay in the source socket, where TCP's flow
//! control holds the sender back: the task copies those bytes itself ([`Pair::copy_left`]),
//! after the other socket has taken every byte moved before, until the program can move them
//! again.
//!
//! The sockets are off tokio's reactor while the kernel moves their bytes: tokio would be
//! woken by every segment. One epoll instance per worker ([`Watch`], `kernel/watch.rs`)
//! watches all pairs, for ends, errors and the program's notices only, and wakes the
//! direction concerned.

mod watch;

use std::{
    io,
    io::Write as _,
    net::{Shutdown, TcpStream as StdStream},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::socket::{MsgFlags, recv},
};
use relay_common::{COPY_ASK_BELOW, COPY_WINDOW, CopyAllowance, CopyLedger};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
    time::Instant,
};

use self::watch::Watch;
use super::{CopyError, DRAIN, Peer, PlainCopy, Transfer, reset_after_drain};
use crate::{
    net::io::{bytes_written, set_recv_lowat, socket_cookie, tcp_counts},
    sockmap::{Installed, Pairs},
};

/// The worker's kernel copy: the maps, and the watch over installed pairs.
pub struct KernelCopy {
    pub(super) pairs: Pairs,
    watch: Watch,
}

impl std::fmt::Debug for KernelCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCopy")
    }
}

impl KernelCopy {
    /// Starts the watch's thread. One per process: the program's notices have one reader.
    pub fn new(pairs: Pairs) -> io::Result<&'static KernelCopy> {
        let kc: &'static KernelCopy = Box::leak(Box::new(KernelCopy {
            pairs,
            watch: Watch::new()?,
        }));
        kc.watch.add_notices(kc.pairs.notices_fd())?;
        std::thread::Builder::new()
            .name("kernel-copy".into())
            .spawn(|| kc.watch.run(&kc.pairs))?;
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
    if pair.overran.load(Ordering::Relaxed) {
        // The program has been dropping bytes: nothing is left to deliver, and every moment
        // waited lets the sender send more into the void. Both peers are reset at once.
        for s in [&pair.client, &pair.backend] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    } else if let Err(e) = &result
        && let Some(peer) = e.aborted_by()
    {
        // What the kernel still holds for the other side goes first, then the reset.
        let deadline = Instant::now() + DRAIN;
        let _ = Box::pin(pair.delivered(peer, |_| Instant::now() >= deadline)).await;
        Box::pin(reset_after_drain(pair.socket(peer.other()))).await;
    }
    Ok((pair.transfer(), result))
}

enum Refused {
    Untouched(TcpStream, TcpStream, io::Error),
    Broken(io::Error),
}

/// How [`Pair::copy_left`] ended.
enum Copied {
    /// The program moves the direction's bytes again.
    Resumed,
    /// The direction ended and its end was passed on.
    Ended,
}

/// An installed pair; dropping it closes both sockets, which takes them out of the maps.
struct Pair {
    client: StdStream,
    backend: StdStream,
    /// The client's, then the backend's socket cookie: their keys in the maps and the watch.
    cookies: [u64; 2],
    /// Bytes the relay wrote itself before the kernel took over (a PROXY header).
    backend_base: u64,
    client_base: u64,
    /// Whether the client's, then the backend's, FIN arrived: it counts in
    /// `tcpi_bytes_received` as one byte that is not payload.
    fin: [AtomicBool; 2],
    /// The allowance last given for the client's, then the backend's, bytes.
    allowed: [AtomicU64; 2],
    /// Whether the client → backend, then the backend → client direction went to the worker.
    lagged: [AtomicBool; 2],
    /// Bytes the program left with the client's, then the backend's socket that this task
    /// copied.
    copied: [AtomicU64; 2],
    /// Whether the client's, then the backend's bytes never go through the program (the
    /// socket could not join the maps as a member, or left them).
    worker_only: [AtomicBool; 2],
    /// Whether a FIN toward the client, then the backend, waits for [`Pair::settle_owed_end`].
    owed_end: [AtomicBool; 2],
    /// The `copied` the program last heard of, per direction.
    published: [AtomicU64; 2],
    /// Whether the program overran on either socket (see [`Pair::ledger`]).
    overran: AtomicBool,
    /// Wakes the client → backend, then the backend → client direction.
    woken: [Arc<Notify>; 2],
    kc: &'static KernelCopy,
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
        let cookies = [client_id, backend_id];
        let sockets = [client.as_fd(), backend.as_fd()];
        let woken = match kc.watch.add(sockets, cookies) {
            Ok(w) => w,
            Err(e) => return Err(back_to_tokio(client, backend, e)),
        };
        let installed = match kc
            .pairs
            .install((client.as_fd(), client_id), (backend.as_fd(), backend_id))
        {
            Ok(installed) => installed,
            Err(e) => {
                kc.watch.remove([client.as_fd(), backend.as_fd()], cookies);
                return Err(back_to_tokio(client, backend, e));
            }
        };
        let pair = Pair {
            client,
            backend,
            cookies,
            backend_base,
            client_base,
            fin: [AtomicBool::new(false), AtomicBool::new(false)],
            allowed: [AtomicU64::new(COPY_WINDOW), AtomicU64::new(COPY_WINDOW)],
            lagged: [AtomicBool::new(false), AtomicBool::new(false)],
            copied: [AtomicU64::new(0), AtomicU64::new(0)],
            // A client that ended between the two installs is copied by this task.
            worker_only: [
                AtomicBool::new(installed == Installed::BackendOnly),
                AtomicBool::new(false),
            ],
            owed_end: [AtomicBool::new(false), AtomicBool::new(false)],
            published: [AtomicU64::new(0), AtomicU64::new(0)],
            overran: AtomicBool::new(false),
            woken,
            kc,
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

    /// Bytes from `from` that the other side's socket has taken.
    fn taken(&self, from: Peer) -> Result<u64, CopyError> {
        let to = self.socket(from.other());
        let written = bytes_written(to).map_err(|e| io_error(e, from.other()))?;
        Ok(written.saturating_sub(self.base(from)))
    }

    /// The program's ledger of `from`'s bytes; an error once it overran (more left with the
    /// socket than its buffer holds: both peers stopped reading), after which the program
    /// drops `from`'s bytes, so the connection must end with resets both ways.
    fn ledger(&self, from: Peer) -> Result<CopyLedger, CopyError> {
        let cookie = self.cookies[from as usize];
        let ledger = self
            .kc
            .pairs
            .ledger(cookie)
            .map_err(|e| io_error(e, from))?;
        if ledger.overrun != 0 {
            self.overran.store(true, Ordering::Relaxed);
            let why = "kernel copy limit: the peer kept sending while neither peer read";
            return Err(io_error(io::Error::other(why), from));
        }
        Ok(ledger)
    }

    fn transfer(&self) -> Transfer {
        let lagged = self.lagged.iter().any(|l| l.load(Ordering::Relaxed));
        let in_kernel = self
            .cookies
            .iter()
            .filter_map(|cookie| self.kc.pairs.ledger(*cookie).ok())
            .map(|l| l.moved)
            .sum();
        Transfer {
            in_kernel,
            up: self.received(Peer::Client).unwrap_or(0),
            down: self.received(Peer::Backend).unwrap_or(0),
            path: Some(if lagged {
                PlainCopy::Lagged
            } else {
                PlainCopy::Kernel
            }),
        }
    }

    /// Waits until the other side's socket has taken every byte that arrived from `from`
    /// (beyond what the relay wrote there itself). `Ok(false)` if `give_up`, given how long
    /// nothing has been taken, says so first.
    async fn delivered(
        &self,
        from: Peer,
        give_up: impl Fn(Duration) -> bool,
    ) -> Result<bool, CopyError> {
        let received = || self.received(from).map_err(|e| io_error(e, from));
        self.taken_up_to(from, received, give_up).await
    }

    /// Waits until the other side's socket has taken `want()` bytes from `from`. A slow reader
    /// is not a stalled one: `give_up` is asked with the time since the last byte was taken.
    async fn taken_up_to(
        &self,
        from: Peer,
        want: impl Fn() -> Result<u64, CopyError>,
        give_up: impl Fn(Duration) -> bool,
    ) -> Result<bool, CopyError> {
        let to = self.socket(from.other());
        let mut pause = Duration::from_micros(50);
        let (mut last, mut since) = (None, Instant::now());
        loop {
            let taken = self.taken(from)?;
            if taken >= want()? {
                return Ok(true);
            }
            if last != Some(taken) {
                (last, since) = (Some(taken), Instant::now());
            }
            if let Some(e) = to.take_error().map_err(|e| io_error(e, from.other()))? {
                return Err(io_error(e, from.other()));
            }
            if give_up(since.elapsed()) {
                return Ok(false);
            }
            // The kernel's worker sends what it holds as soon as the socket has room; this
            // wait happens once per direction, at its end or when it starts lagging.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Until both peers have ended cleanly (each end passed on), one fails, or nothing moves
    /// for `idle`.
    async fn run(&self, idle: Duration) -> Result<(), CopyError> {
        let both = async {
            tokio::try_join!(
                self.direction(Peer::Client, idle),
                self.direction(Peer::Backend, idle)
            )
        };
        tokio::select! {
            r = both => r.map(|_| ()),
            e = self.idle(idle) => Err(e),
        }
    }

    /// One direction: moved by the kernel; while the other side lags, copied by this task
    /// ([`Pair::copy_left`]); its end passed on.
    async fn direction(&self, from: Peer, idle: Duration) -> Result<(), CopyError> {
        let src = self.socket(from);
        loop {
            let ledger = self.ledger(from)?;
            if self.left_with_socket(&ledger, from) {
                if let Copied::Ended = self.copy_left(from, idle).await? {
                    return Ok(());
                }
                continue;
            }
            self.settle_owed_end(from)?;
            self.top_up(from, ledger.moved)?;
            match ended(src, from)? {
                End::No => {}
                End::Fin => {
                    // A segment left for this task may still be on its way to the queue.
                    if self.left_with_socket(&self.ledger(from)?, from) {
                        continue;
                    }
                    return self.pass_end(from, idle).await;
                }
                End::LeftTheMaps => {
                    // Both ends' FINs are through, so the socket left the maps; its last
                    // segment (data with the FIN) came after and waits in its queue.
                    self.worker_only[from as usize].store(true, Ordering::Relaxed);
                    continue;
                }
            }
            self.woken[from as usize].notified().await;
        }
    }

    /// Sends the FIN owed toward `peer` ([`Pair::pass_end`]) once this task no longer copies
    /// `peer`'s bytes out of its socket's queue.
    fn settle_owed_end(&self, peer: Peer) -> Result<(), CopyError> {
        if self.owed_end[peer as usize].swap(false, Ordering::Relaxed) {
            shutdown_write(self.socket(peer)).map_err(|e| io_error(e, peer))?;
        }
        Ok(())
    }

    /// Whether the program is leaving `from`'s bytes with its socket, or left some that this
    /// task has not copied yet.
    fn left_with_socket(&self, ledger: &CopyLedger, from: Peer) -> bool {
        ledger.lagging != 0
            || ledger.passed > self.copied[from as usize].load(Ordering::Relaxed)
            || self.worker_only[from as usize].load(Ordering::Relaxed)
    }

    /// `from` has ended its stream: once the other side has taken every byte before the end,
    /// the relay ends its own stream toward it. Not while this task copies the other side's
    /// bytes out of its socket's queue: with both FINs through, the socket leaves the maps and
    /// the kernel frees that queue. The FIN is then owed, and sent once the other direction
    /// is done with the queue ([`Pair::settle_owed_end`]).
    async fn pass_end(&self, from: Peer, idle: Duration) -> Result<(), CopyError> {
        self.fin(from).store(true, Ordering::Relaxed);
        if !self.delivered(from, |stalled| stalled >= idle).await? {
            return Err(CopyError::Idle(idle));
        }
        let to = from.other();
        if !self.fin(to).load(Ordering::Relaxed) && self.left_with_socket(&self.ledger(to)?, to) {
            self.owed_end[to as usize].store(true, Ordering::Relaxed);
            return Ok(());
        }
        shutdown_write(self.socket(to)).map_err(|e| io_error(e, to))?;
        self.settle_owed_end(from)
    }

    /// Bytes from `from` that the kernel, not this task, handed to the other side's socket.
    fn kernel_taken(&self, from: Peer) -> Result<u64, CopyError> {
        let copied = self.copied[from as usize].load(Ordering::Relaxed);
        Ok(self.taken(from)?.saturating_sub(copied))
    }

    /// Publishes `from`'s allowance once less than [`COPY_ASK_BELOW`] of it is left (when
    /// the program asks).
    fn top_up(&self, from: Peer, moved: u64) -> Result<(), CopyError> {
        let allowed = self.allowed[from as usize].load(Ordering::Relaxed);
        if allowed.saturating_sub(moved) >= COPY_ASK_BELOW {
            return Ok(());
        }
        self.publish(from)
    }

    /// Tells the program what it may do with `from`'s bytes: move them up to [`COPY_WINDOW`]
    /// beyond what the other side has taken (never less than before), and how many of those it
    /// left with the socket this task has copied.
    fn publish(&self, from: Peer) -> Result<(), CopyError> {
        let allowed = self.allowed[from as usize].load(Ordering::Relaxed);
        let total = (self.kernel_taken(from)? + COPY_WINDOW).max(allowed);
        let allowance = CopyAllowance {
            total,
            copied: self.copied[from as usize].load(Ordering::Relaxed),
            pass_room: self.kc.pairs.pass_room(self.socket(from).as_fd()),
        };
        let cookie = self.cookies[from as usize];
        self.kc
            .pairs
            .allow(cookie, allowance)
            .map_err(|e| io_error(e, from))?;
        self.allowed[from as usize].store(total, Ordering::Relaxed);
        self.published[from as usize].store(allowance.copied, Ordering::Relaxed);
        Ok(())
    }

    /// Copies what the program left with `from`'s socket while the other side lagged: each
    /// byte after every byte the kernel moved before it. Until the program moves bytes again
    /// (`Resumed`), or `from` ends (`Ended`, the end passed on).
    async fn copy_left(&self, from: Peer, idle: Duration) -> Result<Copied, CopyError> {
        self.lagged[from as usize].store(true, Ordering::Relaxed);
        let to = from.other();
        let reg = |s: &StdStream, interest, peer| {
            let s = s.try_clone().map_err(|e| io_error(e, peer))?;
            // SAFETY: the AsyncFd owns this duplicate, which stays open as long as it does.
            unsafe { AsyncFd::register_with_interest(s, interest) }
                .map_err(|e| io_error(io::Error::other(e.to_string()), peer))
        };
        // On tokio's reactor only while lagging: in the kernel, every segment would wake it.
        let src = reg(self.socket(from), Interest::READABLE, from)?;
        let dst = reg(self.socket(to), Interest::WRITABLE, to)?;
        let copied = &self.copied[from as usize];
        let mut buf = vec![0u8; 64 << 10];
        // The program may have moved bytes since this task last looked (it can only after
        // this task said it copied everything): those go out before anything read now.
        let mut moved_may_have_grown = true;
        let mut end_seen: Option<Instant> = None;
        loop {
            // The program's notices still count here: it may have overrun, leaving nothing
            // to read (see `Pair::ledger`).
            let mut ready = tokio::select! {
                ready = src.readable() => ready.map_err(|e| io_error(e, from))?,
                () = self.woken[from as usize].notified() => {
                    self.ledger(from)?;
                    continue;
                }
            };
            let read = ready.try_io(|s| {
                recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
            });
            let n = match read {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(io_error(e, from)),
                Err(_would_block) => {
                    // All copied: the program may move bytes again once the allowance has
                    // room. It learns that from here.
                    self.publish(from)?;
                    moved_may_have_grown = true;
                    if !self.left_with_socket(&self.ledger(from)?, from) {
                        return Ok(Copied::Resumed);
                    }
                    continue;
                }
            };
            if n == 0 {
                // The end; the bytes before it may still be on their way to the queue.
                if self.ledger(from)?.passed > copied.load(Ordering::Relaxed) {
                    let closed = tcp_counts(self.socket(from)).is_ok_and(|c| c.closed);
                    if closed {
                        // The socket left the maps and the kernel freed its queue with them
                        // (a FIN toward it was already out when it lagged): say so with a
                        // reset rather than end the stream short.
                        let why = "kernel copy: the socket closed before its bytes were copied";
                        return Err(io_error(io::Error::other(why), from));
                    }
                    if end_seen.get_or_insert_with(Instant::now).elapsed() >= idle {
                        return Err(CopyError::Idle(idle));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                return self.pass_end(from, idle).await.map(|()| Copied::Ended);
            }
            if moved_may_have_grown {
                let moved = self.ledger(from)?.moved;
                let want = || Ok(moved + copied.load(Ordering::Relaxed));
                let give_up = |stalled| stalled >= idle;
                if !Box::pin(self.taken_up_to(from, want, give_up)).await? {
                    return Err(CopyError::Idle(idle));
                }
                moved_may_have_grown = false;
            }
            let mut off = 0;
            while off < n {
                off += dst
                    .async_io(Interest::WRITABLE, |s| (&*s).write(&buf[off..n]))
                    .await
                    .map_err(|e| io_error(e, to))?;
            }
            let now = copied.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            // The program weighs what it leaves with the socket against what this task says
            // it copied: say so as it goes, not only when the queue runs dry.
            if now - self.published[from as usize].load(Ordering::Relaxed) >= COPY_WINDOW / 16 {
                self.publish(from)?;
            }
        }
    }

    /// Ends when neither peer has sent anything, nor taken anything, for `idle`: the kernel
    /// says when data last arrived, and what each peer acknowledged so far shows whether a
    /// slow reader is still reading (a peer that never reads only answers window probes).
    async fn idle(&self, idle: Duration) -> CopyError {
        let (mut last_acked, mut acked_at) = (None, Instant::now());
        loop {
            let counts: Vec<_> = [&self.client, &self.backend]
                .iter()
                .filter_map(|s| tcp_counts(*s).ok())
                .collect();
            let acked = counts.iter().map(|c| c.acked).sum::<u64>();
            if last_acked != Some(acked) {
                (last_acked, acked_at) = (Some(acked), Instant::now());
            }
            let quiet = counts
                .iter()
                .map(|c| Duration::from_millis(c.since_data_in_ms.into()))
                .min()
                .unwrap_or_default()
                .min(acked_at.elapsed());
            if quiet >= idle {
                return CopyError::Idle(idle);
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let sockets = [self.client.as_fd(), self.backend.as_fd()];
        self.kc.watch.remove(sockets, self.cookies);
        self.kc.pairs.forget(self.cookies);
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

/// What [`ended`] found.
enum End {
    No,
    /// The peer's FIN, after every byte before it.
    Fin,
    /// Bytes wait in a socket that has left the maps: no program will take them.
    LeftTheMaps,
}

/// Whether `from`'s peer has ended its stream, or failed (`Err`). Peeks, so that a byte the
/// program has not taken yet stays where it is.
fn ended(from: &StdStream, peer: Peer) -> Result<End, CopyError> {
    if let Some(e) = from.take_error().map_err(|e| io_error(e, peer))? {
        return Err(io_error(e, peer));
    }
    let mut byte = [0u8; 1];
    match recv(
        from.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => Ok(End::Fin),
        // A byte the program is about to take, unless the socket is no longer in the maps.
        Ok(_) if tcp_counts(from).is_ok_and(|c| c.closed) => Ok(End::LeftTheMaps),
        Ok(_) => Ok(End::No),
        Err(Errno::EAGAIN) => Ok(End::No),
        Err(e) => Err(io_error(e.into(), peer)),
    }
}

fn shutdown_write(to: &StdStream) -> io::Result<()> {
    match to.shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
