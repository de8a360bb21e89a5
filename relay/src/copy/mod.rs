//! Moving bytes both ways between the client side and the backend side of a connection.
//!
//! Half-close is honoured in both directions: when one side finishes sending (TCP FIN, or TLS
//! close_notify), the relay shuts down its write half toward the other side (a FIN, or a
//! close_notify followed by a FIN) and keeps copying the other direction until it finishes too.
//! Bytes are neither lost, duplicated nor reordered: each direction is one ordered pump.
//! A connection on which no byte moves in either direction for `idle` is closed.
//!
//! **An abort stays an abort.** A side that ends badly — a TLS peer that closes without
//! close_notify (a truncation an attacker can forge with one FIN), sends a record that breaks
//! the protocol, sends a fatal alert, or resets its TCP connection — makes the relay reset the
//! *other* side, once that side has acknowledged every byte the relay already forwarded to it
//! (bounded by [`DRAIN`]): the other application sees `ECONNRESET` after the last good byte,
//! never an end of stream that would make a truncated request look complete. A TLS peer that
//! broke the protocol is first sent the fatal alert RFC 8446 names for what it did
//! ([`RecordError::alert`]). Only a clean end — close_notify, or a FIN from a plain peer —
//! travels on as a clean end.
//!
//! Each direction is one of three pumps, chosen by the levels of its two sides:
//! - **plain → plain** (`relay_tcp`): `splice(2)` from the source socket into a pipe and from
//!   the pipe into the destination socket: the payload never enters user space. Pipes come from
//!   a per-thread pool and are held only while data is in flight. Where no pipe can be had
//!   (out of file descriptors) the chunk goes through a pooled buffer instead.
//! - **plain → TLS** (`seal_pump`): one `readv(2)` puts the plaintext straight where the
//!   records' payloads go in a pooled buffer, laid out record after record with room for
//!   each header and tag; the records are sealed there, in place, and written out with one
//!   `write(2)`.
//! - **TLS → anything** (`open_pump`): records are read into a pooled buffer and opened in
//!   place; toward plain, the plaintexts are written from there with one `writev(2)`; toward
//!   TLS, each is copied once into the other side's record, which is sealed in place.
//!
//! Everything the relay sends toward one TLS peer goes through that side's [`TlsOut`]: the
//! data of the other direction, and what the side's own reader owes its peer (a KeyUpdate in
//! answer to one, a `no_renegotiation` warning, a fatal alert). Its lock keeps the records
//! leaving in the order their sequence numbers were given.
//!
//! Buffers come from a per-thread [`pool`], are taken only when the source has data and
//! handed back as soon as it is written (or, for TLS input, as soon as no partial record is
//! left), so an idle connection holds no data buffer. Their size adapts to the flow: 4 KiB to
//! start (interactive traffic), doubling up to `max_buffer` while reads fill them (bulk),
//! shrinking again when they don't — the ztunnel approach. A TLS input buffer grows to hold
//! at least one whole record (up to 18 KiB) whatever `max_buffer` says.
//!
//! Userspace copies of each payload byte, per direction, after the handshake (the kernel's
//! copies between socket buffers and these buffers are not counted; decryption and
//! encryption run in place and are not copies):
//!
//! | inbound → outbound | client → backend | backend → client |
//! |---|---|---|
//! | plain → plain | 0 (splice) | 0 (splice) |
//! | plain → tls, plain → mtls | 0 (read into the record, sealed in place) | 0 (opened in place, written from there) |
//! | tls → plain, mtls → plain | 0 (opened in place, written from there) | 0 (read into the record, sealed in place) |
//! | tls/mtls → tls/mtls (4 pairs) | 1 (out of one record into the other) | 1 |
//!
//! Two rarer copies exist and are counted in [`copied_bytes`] with the one above, so the
//! benchmark can report measured copies per byte: a partial record moved to the front of its
//! buffer when the buffer's end is reached, and bytes that arrived together with the end of a
//! handshake, moved from the handshake's buffer into a pooled one.
//!
//! A connection's task lives as long as the connection, so its size is memory per connection.
//! The long-lived futures here are `fn … -> impl Future { async move { … } }` rather than
//! `async fn`: an `async fn` keeps its arguments twice (as given, and moved into its body), an
//! `async move` block once. Futures are pinned where they are declared for the same reason,
//! and what runs only while bytes are in flight (writes, sealing) is boxed.
#![allow(clippy::manual_async_fn)]

mod kernel;
mod records;
mod splice;
#[cfg(test)]
mod tests;

use std::{
    fmt, io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use rustls::AlertDescription;
use tokio::{net::TcpStream, time::Instant};
use tokio_util::either::Either;

use crate::{
    net::{io::unacknowledged, pool::MIN as MIN_BUFFER},
    tls::{handshake::Established, record::RecordError},
};
use records::{Opening, TlsOut, halves, open_pump, seal_pump};
use splice::{relay_tcp, splice_pump};

/// Largest data buffer a connection may hold per direction unless configured otherwise.
pub const DEFAULT_MAX_BUFFER: usize = 64 << 10;
/// Records opened before their plaintexts are passed on.
const BATCH: usize = 16;
/// The longest wait for the other side to acknowledge what it was sent before it is reset.
pub const DRAIN: Duration = Duration::from_secs(5);
/// The longest wait to hand a peer its fatal alert (its socket may be full: it stopped
/// reading).
const ALERT_WAIT: Duration = Duration::from_secs(1);

/// Payload bytes copied in user space by this process (see the module doc), for the
/// `relay_copied_bytes_total` metric.
static COPIED: AtomicU64 = AtomicU64::new(0);

pub fn copied_bytes() -> u64 {
    COPIED.load(Ordering::Relaxed)
}

fn copied(n: usize) {
    COPIED.fetch_add(n as u64, Ordering::Relaxed);
}

pub use kernel::KernelCopy;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// From the client to the backend.
    pub up: u64,
    /// From the backend to the client.
    pub down: u64,
    /// How a plain ↔ plain connection was copied (`None` when a side is TLS).
    pub path: Option<PlainCopy>,
    /// Of `up + down`, the bytes the kernel copy program moved itself (the rest, the worker).
    pub in_kernel: u64,
}

/// The ways of copying plain ↔ plain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainCopy {
    /// By the `relay_copy` verdict program: no byte wakes the worker.
    Kernel,
    /// In the kernel until a peer fell a window behind, then that direction by the worker
    /// (`copy::kernel`).
    Lagged,
    /// By `splice(2)` through a pipe: the fallback.
    Splice,
}

impl PlainCopy {
    pub const ALL: [PlainCopy; 3] = [PlainCopy::Kernel, PlainCopy::Lagged, PlainCopy::Splice];

    pub fn label(self) -> &'static str {
        match self {
            PlainCopy::Kernel => "kernel",
            PlainCopy::Lagged => "kernel_lagged",
            PlainCopy::Splice => "splice",
        }
    }
}

/// One of the two peers of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Client,
    Backend,
}

impl Peer {
    fn other(self) -> Peer {
        match self {
            Peer::Client => Peer::Backend,
            Peer::Backend => Peer::Client,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Client => "client",
            Peer::Backend => "backend",
        })
    }
}

/// Why a relayed connection ended, when it did not end with both sides closing cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// A socket failed: a reset, most often.
    #[error("{peer}: {error}")]
    Io { peer: Peer, error: io::Error },
    /// A TLS peer broke the record protocol (or the relay's key toward it is used up);
    /// `answered` is the alert it was sent.
    #[error("{peer}: {error}{}", answered.map(|a| format!(" (answered {a:?})")).unwrap_or_default())]
    Tls {
        peer: Peer,
        error: Box<RecordError>,
        answered: Option<AlertDescription>,
    },
    /// A TLS peer closed its connection without close_notify.
    #[error("{peer} closed {} without close_notify", if *.mid_record { "in the middle of a record" } else { "its TLS side" })]
    Truncated { peer: Peer, mid_record: bool },
}

impl CopyError {
    /// The peer whose abort ended the connection: the other one is reset.
    pub fn aborted_by(&self) -> Option<Peer> {
        match self {
            CopyError::Idle(_) => None,
            CopyError::Io { peer, .. }
            | CopyError::Tls { peer, .. }
            | CopyError::Truncated { peer, .. } => Some(*peer),
        }
    }
}

/// How a connection copies: idle limit, the largest buffer per direction, and the kernel copy
/// for plain ↔ plain where the worker has one.
#[derive(Clone, Copy)]
pub struct Limits {
    pub idle: Duration,
    pub max_buffer: usize,
    pub kernel: Option<&'static KernelCopy>,
}

impl Limits {
    pub fn idle(idle: Duration) -> Limits {
        Limits {
            idle,
            max_buffer: DEFAULT_MAX_BUFFER,
            kernel: None,
        }
    }
}

/// One side of a connection, established at its level.
pub enum Side {
    Plain(TcpStream),
    Tls(TcpStream, Box<Established>),
}

impl Side {
    fn into_parts(self) -> (TcpStream, Option<Box<Established>>) {
        match self {
            Side::Plain(socket) => (socket, None),
            Side::Tls(socket, established) => (socket, Some(established)),
        }
    }
}

/// Byte counts and the time data last moved, shared by both directions and the watchdog.
struct Meter {
    epoch: Instant,
    last_activity: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    fn new() -> Meter {
        Meter {
            epoch: Instant::now(),
            last_activity: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_activity.store(now, Ordering::Relaxed);
    }

    fn moved(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn transfer(&self) -> Transfer {
        Transfer {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
            path: None,
            in_kernel: 0,
        }
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_activity.load(Ordering::Relaxed));
            let deadline = self.epoch + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Runs both directions until both have finished, one fails, or the connection idles.
///
/// The directions are borrowed, pinned where their caller created them: moving them in would
/// store them twice in the connection's task, which lives as long as the connection.
fn both_ways<U, D>(
    meter: &Meter,
    idle: Duration,
    mut up: Pin<&mut U>,
    mut down: Pin<&mut D>,
) -> impl Future<Output = Result<(), CopyError>>
where
    U: Future<Output = Result<(), CopyError>>,
    D: Future<Output = Result<(), CopyError>>,
{
    async move {
        let (mut up_done, mut down_done) = (false, false);
        let quiet = meter.idle(idle);
        tokio::pin!(quiet);
        while !(up_done && down_done) {
            tokio::select! {
                r = up.as_mut(), if !up_done => {
                    r?;
                    up_done = true;
                }
                r = down.as_mut(), if !down_done => {
                    r?;
                    down_done = true;
                }
                () = &mut quiet => return Err(CopyError::Idle(idle)),
            }
        }
        Ok(())
    }
}

/// Where a direction reads from. A TLS peer's receiving half travels beside it, to the one
/// pump that uses it (kept out of here: every pump's state holds its `Source`).
#[derive(Clone, Copy)]
struct Source<'a> {
    socket: &'a TcpStream,
    peer: Peer,
}

/// Where a direction delivers: a socket, with the sending half of its TLS peer.
struct Sink<'a> {
    socket: &'a TcpStream,
    peer: Peer,
    tls: Option<&'a TlsOut<'a>>,
}

impl Sink<'_> {
    fn io(&self, error: io::Error) -> CopyError {
        CopyError::Io {
            peer: self.peer,
            error,
        }
    }

    fn tls_error(&self, error: RecordError, answered: Option<AlertDescription>) -> CopyError {
        CopyError::Tls {
            peer: self.peer,
            error: Box::new(error),
            answered,
        }
    }
}

impl<'a> Source<'a> {
    /// The same socket, seen as where the answers its TLS peer is owed go.
    fn back(self, reply: &'a TlsOut<'a>) -> Sink<'a> {
        Sink {
            socket: self.socket,
            peer: self.peer,
            tls: Some(reply),
        }
    }

    fn io(&self, error: io::Error) -> CopyError {
        CopyError::Io {
            peer: self.peer,
            error,
        }
    }
}

/// Copies both ways between the client and the backend, each at its level. Returns the bytes
/// moved either way, also when it fails; a side whose peer aborted has the other one reset
/// (see the module doc) before this returns.
pub fn relay(
    client: Side,
    backend: Side,
    limits: Limits,
) -> impl Future<Output = (Transfer, Result<(), CopyError>)> {
    // Taken apart before the task: its captures are stored for its whole life.
    let (client, mut client_tls) = client.into_parts();
    let (backend, mut backend_tls) = backend.into_parts();
    async move {
        if client_tls.is_none() && backend_tls.is_none() {
            return relay_plain(client, backend, limits).await;
        }
        let meter = Meter::new();
        let max = limits.max_buffer.max(MIN_BUFFER);
        let (client_in, client_out) = halves(client_tls.as_deref_mut());
        let (backend_in, backend_out) = halves(backend_tls.as_deref_mut());
        let result = {
            // Declared pinned: a future moved after creation would be stored twice in the task.
            tokio::pin! {
                let up = pump(
                    Source { socket: &client, peer: Peer::Client },
                    client_in.zip(client_out.as_ref()),
                    Sink { socket: &backend, peer: Peer::Backend, tls: backend_out.as_ref() },
                    (&meter, &meter.up),
                    max,
                );
                let down = pump(
                    Source { socket: &backend, peer: Peer::Backend },
                    backend_in.zip(backend_out.as_ref()),
                    Sink { socket: &client, peer: Peer::Client, tls: client_out.as_ref() },
                    (&meter, &meter.down),
                    max,
                );
            }
            both_ways(&meter, limits.idle, up, down).await
        };
        if let Some(other) = other_than_aborted(&result, &client, &backend) {
            Box::pin(reset_after_drain(other)).await;
        }
        (meter.transfer(), result)
    }
}

/// plain ↔ plain: in the kernel where the worker can, else with splice.
async fn relay_plain(
    client: TcpStream,
    backend: TcpStream,
    limits: Limits,
) -> (Transfer, Result<(), CopyError>) {
    let (client, backend) = match limits.kernel {
        Some(kc) => match Box::pin(kernel::relay_in_kernel(kc, client, backend, limits.idle)).await
        {
            Ok(done) => return done,
            Err((client, backend, e)) => {
                tracing::debug!("kernel copy unavailable for this connection, splicing: {e}");
                (client, backend)
            }
        },
        None => (client, backend),
    };
    let (mut transfer, result) = relay_tcp(client, backend, limits).await;
    transfer.path = Some(PlainCopy::Splice);
    (transfer, result)
}

/// The peer to reset after the other one aborted (see the module doc), if one did.
fn other_than_aborted<'s>(
    result: &Result<(), CopyError>,
    client: &'s TcpStream,
    backend: &'s TcpStream,
) -> Option<&'s TcpStream> {
    match result.as_ref().err()?.aborted_by()? {
        Peer::Client => Some(backend),
        Peer::Backend => Some(client),
    }
}

/// Resets `other` once it has acknowledged what it was sent (or [`DRAIN`] has passed):
/// `SO_LINGER` 0 makes the close a reset. Awaited boxed: the wait is rare, and its timer would
/// otherwise sit in every connection's task.
async fn reset_after_drain(other: &(impl std::os::fd::AsFd + std::os::fd::AsRawFd)) {
    let deadline = Instant::now() + DRAIN;
    let mut pause = Duration::from_millis(1);
    while unacknowledged(other).is_ok_and(|n| n > 0) && Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
}

/// One direction, chosen by the levels of its two ends: `tls` is the source's receiving half
/// and where its answers go, for a TLS source. Not an `async fn`: that would hold its
/// arguments beside the pump it awaits.
fn pump<'a>(
    from: Source<'a>,
    tls: Option<(Opening<'a>, &'a TlsOut<'a>)>,
    to: Sink<'a>,
    (meter, counter): (&'a Meter, &'a AtomicU64),
    max: usize,
) -> impl Future<Output = Result<(), CopyError>> + 'a {
    match (tls, to.tls.is_some()) {
        (Some((opening, reply)), _) => Either::Left(Either::Left(open_pump(
            from, opening, reply, to, meter, counter, max,
        ))),
        (None, true) => Either::Left(Either::Right(seal_pump(from, to, meter, counter, max))),
        (None, false) => Either::Right(splice_pump(from, to, meter, counter, max)),
    }
}

fn adapt(size: usize, filled: bool, n: usize, max: usize) -> usize {
    if filled {
        (size * 2).min(max)
    } else if n < size / 4 {
        (size / 2).max(MIN_BUFFER)
    } else {
        size
    }
}
