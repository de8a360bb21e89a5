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

use std::{
    cell::RefCell,
    fmt,
    io::{self, IoSlice, IoSliceMut},
    mem,
    ops::Range,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use rustls::{AlertDescription, ContentType};
use tokio::{io::Interest, net::TcpStream, sync::Mutex, time::Instant};
use tokio_util::either::Either;

use crate::tls::{
    handshake::Established,
    record::{Content, HEADER, MAX_PLAINTEXT, Opener, RecordError, Sealer, Session, record_len},
};

/// Largest data buffer a connection may hold per direction unless configured otherwise.
pub const DEFAULT_MAX_BUFFER: usize = 64 << 10;
/// Size a direction starts with (and shrinks back to): interactive traffic fits.
const MIN_BUFFER: usize = 4 << 10;
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

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// From the client to the backend.
    pub up: u64,
    /// From the backend to the client.
    pub down: u64,
}

/// One of the two peers of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Client,
    Backend,
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

/// How a connection copies: idle limit and the largest buffer per direction.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub idle: Duration,
    pub max_buffer: usize,
}

impl Limits {
    pub fn idle(idle: Duration) -> Limits {
        Limits {
            idle,
            max_buffer: DEFAULT_MAX_BUFFER,
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

/// Everything the relay sends toward one TLS peer. The data of the other direction and the
/// answers this side's own reader owes (KeyUpdate, `no_renegotiation`, a fatal alert) are
/// sealed and written under one lock (it lives with the side's keys, in its `Established`),
/// so records leave in the order of their sequence numbers however the two directions
/// interleave.
///
/// The reader never waits for the lock to answer a KeyUpdate or a renegotiation: when the
/// other direction holds it (blocked on a peer that does not read while it writes, maybe), the
/// answer stays owed in the session and goes out first with the next records that direction
/// seals.
#[derive(Clone, Copy)]
struct TlsOut<'a> {
    sealer: &'a Mutex<Sealer>,
    session: &'a Session,
}

impl TlsOut<'_> {
    /// Owes the peer one answer, and sends what is owed now if the writer is free.
    async fn answer(&self, to: &Sink<'_>) -> Result<(), CopyError> {
        self.session.owe_answer();
        let Ok(mut sealer) = self.sealer.try_lock() else {
            return Ok(());
        };
        let records = sealer
            .answers(self.session)
            .map_err(|e| to.tls_error(e, None))?;
        write_all(to.socket, &[&records])
            .await
            .map_err(|e| to.io(e))
    }

    /// Seals one record with `make` and writes it to `to`, after what is owed.
    async fn send(
        &self,
        to: &Sink<'_>,
        make: impl FnOnce(&mut Sealer) -> Result<Vec<u8>, RecordError>,
    ) -> Result<(), CopyError> {
        let mut sealer = self.sealer.lock().await;
        let records = sealer
            .answers(self.session)
            .and_then(|mut records| {
                records.extend(make(&mut sealer)?);
                Ok(records)
            })
            .map_err(|e| to.tls_error(e, None))?;
        write_all(to.socket, &[&records])
            .await
            .map_err(|e| to.io(e))
    }

    /// Tells the peer why the relay ends the connection, if there is an alert for it; bounded
    /// by [`ALERT_WAIT`]. Returns the alert that was sent.
    async fn fatal(&self, to: &Sink<'_>, error: &RecordError) -> Option<AlertDescription> {
        let alert = error.alert()?;
        let sent = tokio::time::timeout(ALERT_WAIT, self.send(to, |s| s.fatal(alert))).await;
        matches!(sent, Ok(Ok(()))).then_some(alert)
    }

    /// The records due before application data: what is owed, and a KeyUpdate near the key's
    /// limit. `Err` when the key is used up and cannot be renewed (TLS 1.2): the peer has then
    /// been sent a close_notify, and the connection ends.
    async fn before_data(&self, sealer: &mut Sealer, to: &Sink<'_>) -> Result<Vec<u8>, CopyError> {
        let mut records = sealer
            .answers(self.session)
            .map_err(|e| to.tls_error(e, None))?;
        match sealer.before_data(self.session) {
            Ok(renewal) => {
                records.extend(renewal.unwrap_or_default());
                Ok(records)
            }
            Err(RecordError::Exhausted) => {
                let goodbye = sealer.close_notify().map_err(|e| to.tls_error(e, None))?;
                records.extend(goodbye);
                let _ = write_all(to.socket, &[&records]).await;
                let _ = shutdown_write(to.socket);
                Err(to.tls_error(RecordError::Exhausted, Some(AlertDescription::CloseNotify)))
            }
            Err(e) => Err(to.tls_error(e, None)),
        }
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

/// The receiving half of a TLS side, with the bytes that followed its handshake.
struct Opening<'a> {
    opener: &'a mut Opener,
    session: &'a Session,
    incoming: &'a mut Vec<u8>,
}

/// A TLS side's halves, borrowed from where the handshake left them: the receiving half (for
/// the direction from this side) and the sending half (for everything toward it).
fn halves(tls: Option<&mut Established>) -> (Option<Opening<'_>>, Option<TlsOut<'_>>) {
    let Some(Established {
        session,
        opener,
        sealer,
        incoming,
    }) = tls
    else {
        return (None, None);
    };
    let opening = Opening {
        opener,
        session,
        incoming,
    };
    (Some(opening), Some(TlsOut { sealer, session }))
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
            return relay_tcp(client, backend, limits).await;
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
async fn reset_after_drain(other: &TcpStream) {
    let deadline = Instant::now() + DRAIN;
    let mut pause = Duration::from_millis(1);
    while unacknowledged(other).is_ok_and(|n| n > 0) && Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
}

/// Bytes written to `socket` that its peer has not acknowledged yet (`SIOCOUTQ`).
fn unacknowledged(socket: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which points to `n`;
    // the descriptor is open for the duration of the call. Neither nix nor socket2 offers it.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
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

/// Waits until `s` may have bytes to read (a small future, unlike `TcpStream::readable`'s:
/// this wait is where an idle connection spends its life).
async fn readable(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` may take bytes: as [`readable`], a small future where the pump keeps it.
async fn writable(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

// The pumps keep little across their wait for input: what they await while bytes are in
// flight (writes, sealing) is boxed, so an idle connection's task stays small.

/// plain → TLS: plaintext read straight into record payloads, sealed in place.
fn seal_pump<'a>(
    from: Source<'a>,
    to: Sink<'a>,
    meter: &'a Meter,
    counter: &'a AtomicU64,
    max: usize,
) -> impl Future<Output = Result<(), CopyError>> + 'a {
    async move {
        let Some(out) = to.tls else {
            unreachable!("seal_pump is chosen for a TLS destination");
        };
        let mut size = MIN_BUFFER;
        loop {
            readable(from.socket).await.map_err(|e| from.io(e))?;
            let mut buf = pool::take(size);
            let slots = Slots::new(out, buf.len());
            let n = match from.socket.try_read_vectored(&mut slots.payloads(&mut buf)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(from.io(e)),
            };
            if n == 0 {
                drop(buf);
                return Box::pin(finish(&to)).await;
            }
            meter.moved(counter, n);
            Box::pin(send_slots(out, &to, &slots, &mut buf, n)).await?;
            drop(buf);
            meter.touch();
            size = adapt(size, n == slots.capacity, n, max);
        }
    }
}

/// Seals the `n` bytes read into `slots` and writes the records, after any record due first.
async fn send_slots(
    out: &TlsOut<'_>,
    to: &Sink<'_>,
    slots: &Slots,
    buf: &mut [u8],
    n: usize,
) -> Result<(), CopyError> {
    let mut sealer = out.sealer.lock().await;
    let control = out.before_data(&mut sealer, to).await?;
    let len = slots
        .seal(&mut sealer, buf, n)
        .map_err(|e| to.tls_error(e, None))?;
    write_all(to.socket, &[&control, &buf[..len]])
        .await
        .map_err(|e| to.io(e))
}

/// TLS → plain or TLS: records opened in place, their plaintexts passed on from there.
fn open_pump<'a>(
    from: Source<'a>,
    opening: Opening<'a>,
    reply: &'a TlsOut<'a>,
    to: Sink<'a>,
    meter: &'a Meter,
    counter: &'a AtomicU64,
    max: usize,
) -> impl Future<Output = Result<(), CopyError>> + 'a {
    async move {
        let mut received = Received::new(mem::take(opening.incoming));
        let mut size = MIN_BUFFER;
        loop {
            let mut ranges = Vec::new();
            let (opened_to, event) =
                match received.open(opening.opener, opening.session, &mut ranges) {
                    Ok(opened) => opened,
                    Err(error) => {
                        let pass = (&to, &received.buf[..], &ranges[..], meter, counter);
                        return Box::pin(fail(from.back(reply), *reply, error, pass)).await;
                    }
                };
            // A KeyUpdate answer first: it must precede the relay's next data toward this peer.
            if event == Event::Answer {
                Box::pin(async { reply.answer(&from.back(reply)).await }).await?;
            }
            if !ranges.is_empty() {
                let n = ranges.iter().map(|r| r.len()).sum();
                meter.moved(counter, n);
                Box::pin(deliver(&to, &received.buf, &ranges)).await?;
                meter.touch();
            }
            drop(ranges);
            let opened_any = opened_to > received.start;
            received.consume_to(opened_to);
            if event == Event::Close {
                return Box::pin(finish(&to)).await;
            }
            if opened_any {
                continue;
            }
            readable(from.socket).await.map_err(|e| from.io(e))?;
            match received.fill(from.socket, size).map_err(|e| from.io(e))? {
                None => {}
                Some((0, _)) => {
                    // No close_notify: whatever came before was authenticated record by
                    // record, but the end was not; the other side is reset (module doc).
                    return Err(CopyError::Truncated {
                        peer: from.peer,
                        mid_record: !received.is_empty(),
                    });
                }
                Some((n, filled)) => size = adapt(size, filled, n, max),
            }
        }
    }
}

/// A TLS peer broke the protocol: it is told (the fatal alert the error calls for), the data
/// authenticated before the bad record is passed on, and the direction ends with the error.
async fn fail(
    back: Sink<'_>,
    reply: TlsOut<'_>,
    error: RecordError,
    (to, buf, ranges, meter, counter): (&Sink<'_>, &[u8], &[Range<usize>], &Meter, &AtomicU64),
) -> Result<(), CopyError> {
    let answered = reply.fatal(&back, &error).await;
    if !ranges.is_empty() {
        meter.moved(counter, ranges.iter().map(|r| r.len()).sum());
        deliver(to, buf, ranges).await?;
    }
    Err(back.tls_error(error, answered))
}

/// Passes plaintexts on: written as they are toward plain, sealed into records toward TLS.
async fn deliver(to: &Sink<'_>, buf: &[u8], ranges: &[Range<usize>]) -> Result<(), CopyError> {
    let Some(out) = to.tls else {
        let mut slices: Vec<IoSlice<'_>> = ranges
            .iter()
            .map(|r| IoSlice::new(&buf[r.clone()]))
            .collect();
        return write_all_slices(to.socket, &mut slices)
            .await
            .map_err(|e| to.io(e));
    };
    let mut sealer = out.sealer.lock().await;
    let control = out.before_data(&mut sealer, to).await?;
    write_all(to.socket, &[&control])
        .await
        .map_err(|e| to.io(e))?;
    let chunks = ranges
        .iter()
        .flat_map(|r| buf[r.clone()].chunks(MAX_PLAINTEXT))
        .collect::<Vec<_>>();
    // As many records per write as fit a buffer of the largest pooled size.
    let (start, overhead) = out.session.layout();
    for group in chunks.chunks(pool::LARGEST / (MAX_PLAINTEXT + overhead)) {
        let bytes: usize = group.iter().map(|c| c.len()).sum();
        let mut records = pool::take(bytes + group.len() * overhead);
        let mut len = 0;
        for chunk in group {
            records[len + start..len + start + chunk.len()].copy_from_slice(chunk);
            len += sealer
                .seal(
                    ContentType::ApplicationData,
                    &mut records[len..],
                    chunk.len(),
                )
                .map_err(|e| to.tls_error(e, None))?;
        }
        copied(bytes);
        write_all(to.socket, &[&records[..len]])
            .await
            .map_err(|e| to.io(e))?;
    }
    Ok(())
}

/// The clean end of a direction: a close_notify toward TLS, then a FIN.
async fn finish(to: &Sink<'_>) -> Result<(), CopyError> {
    if let Some(out) = to.tls {
        match out.send(to, Sealer::close_notify).await {
            // The peer stopped reading after its own close: our goodbye is moot.
            Err(CopyError::Io { error, .. })
                if matches!(
                    error.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected
                ) =>
            {
                return Ok(());
            }
            other => other?,
        }
    }
    shutdown_write(to.socket).map_err(|e| to.io(e))
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

/// Where records go in a send buffer: back to back, each with room for its header (and
/// explicit nonce) before and its type byte and tag after up to 2^14 plaintext bytes. Records
/// filled in order are contiguous, so the sealed ones leave in one write.
struct Slots {
    offset: usize,
    overhead: usize,
    stride: usize,
    /// Plaintext bytes the buffer holds in all.
    capacity: usize,
}

impl Slots {
    fn new(out: &TlsOut<'_>, len: usize) -> Slots {
        let (offset, overhead) = out.session.layout();
        let stride = overhead + MAX_PLAINTEXT;
        let full = len / stride;
        let rest = (len % stride).saturating_sub(overhead);
        Slots {
            offset,
            overhead,
            stride,
            capacity: full * MAX_PLAINTEXT + rest,
        }
    }

    /// The payload area of every record slot, for one `readv`.
    fn payloads<'b>(&self, buf: &'b mut [u8]) -> Vec<IoSliceMut<'b>> {
        let trailer = self.overhead - self.offset;
        buf.chunks_mut(self.stride)
            .filter(|slot| slot.len() > self.overhead)
            .map(|slot| {
                let end = slot.len() - trailer;
                IoSliceMut::new(&mut slot[self.offset..end])
            })
            .collect()
    }

    /// Seals the `n` bytes read into the slots; returns the length of the records.
    fn seal(
        &self,
        sealer: &mut Sealer,
        buf: &mut [u8],
        mut n: usize,
    ) -> Result<usize, RecordError> {
        let mut len = 0;
        for slot in buf.chunks_mut(self.stride) {
            if n == 0 {
                break;
            }
            let take = n.min(slot.len() - self.overhead);
            // Every slot but the last is full, so each record starts where the last ended.
            len += sealer.seal(ContentType::ApplicationData, slot, take)?;
            n -= take;
        }
        Ok(len)
    }
}

/// What stopped [`Received::open`] before the records it holds ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    None,
    /// The peer's close_notify.
    Close,
    /// The peer is owed an answer: a KeyUpdate of the relay's, or a `no_renegotiation`.
    Answer,
}

/// Received TLS bytes in a pooled buffer: whole records are opened in place; a partial one
/// waits at `start..end` for the rest. No buffer is held while nothing is pending.
struct Received {
    buf: pool::Buf,
    start: usize,
    end: usize,
    /// The length of the last record opened: bulk senders send records of one length.
    last_record: usize,
}

impl Received {
    /// Starts with the bytes that followed a handshake.
    fn new(leftover: Vec<u8>) -> Received {
        let mut received = Received {
            buf: pool::Buf::none(),
            start: 0,
            end: 0,
            last_record: 0,
        };
        if !leftover.is_empty() {
            received.buf = pool::take(leftover.len().max(MIN_BUFFER));
            received.buf[..leftover.len()].copy_from_slice(&leftover);
            received.end = leftover.len();
            copied(leftover.len());
        }
        received
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Opens the whole records from `start`, at most [`BATCH`]; the plaintexts' places go to
    /// `ranges`. Returns where the opened records end and what stopped the batch early (the
    /// peer's close_notify, an answer it is owed), or the error of the first record that broke
    /// the protocol (`ranges` then holds the data before it).
    fn open(
        &mut self,
        opener: &mut Opener,
        session: &Session,
        ranges: &mut Vec<Range<usize>>,
    ) -> Result<(usize, Event), RecordError> {
        let mut pos = self.start;
        while ranges.len() < BATCH {
            let len = match record_len(&self.buf[pos..self.end])? {
                Some(len) if pos + len <= self.end => len,
                _ => break,
            };
            let content = opener.open(session, &mut self.buf[pos..pos + len])?;
            self.last_record = len;
            let record = pos;
            pos += len;
            match content {
                Content::Data(r) if !r.is_empty() => ranges.push(record + r.start..record + r.end),
                Content::Data(_) | Content::Control => {}
                Content::CloseNotify => return Ok((pos, Event::Close)),
                Content::KeyUpdateRequested | Content::Renegotiation => {
                    return Ok((pos, Event::Answer));
                }
            }
        }
        Ok((pos, Event::None))
    }

    /// Everything before `pos` was passed on; with nothing left, the buffer goes back.
    fn consume_to(&mut self, pos: usize) {
        self.start = pos;
        if self.is_empty() {
            self.buf = pool::Buf::none();
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what `from` has now: `None` if nothing, 0 bytes at its end; and whether the read
    /// took all it could.
    fn fill(&mut self, from: &TcpStream, size: usize) -> io::Result<Option<(usize, bool)>> {
        self.make_room(size);
        let limit = self.read_limit();
        match from.try_read(&mut self.buf[self.end..limit]) {
            Ok(n) => {
                self.end += n;
                Ok(Some((n, self.end == limit)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.is_empty() {
                    self.consume_to(0);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Where this read should stop: where a record is expected to end, so that no partial
    /// record is left at the buffer's end to be moved to its front before the next read. The
    /// pending record's header tells where it ends; the records after it are expected to be as
    /// long as the last one (a bulk sender fills every record). A wrong guess costs nothing
    /// but the move it tried to avoid.
    fn read_limit(&self) -> usize {
        let len = self.buf.len();
        let mut boundary = match record_len(&self.buf[self.start..self.end]) {
            Ok(Some(record)) => self.start + record,
            Ok(None) if self.is_empty() => self.start,
            _ => return len,
        };
        if self.last_record == 0 || boundary > len {
            return len;
        }
        while boundary + self.last_record <= len {
            boundary += self.last_record;
        }
        if boundary > self.end { boundary } else { len }
    }

    /// Makes sure the partial record at `start` can arrive whole, and that there is room to
    /// read into: a buffer if none is held, the partial record moved to the front when the
    /// end is reached, or a larger buffer when the record is longer than this one. A header
    /// that does not parse is left for [`Received::open`] to answer.
    fn make_room(&mut self, size: usize) {
        if self.buf.is_empty() {
            self.buf = pool::take(size);
            return;
        }
        let pending = self.end - self.start;
        let record = record_len(&self.buf[self.start..self.end])
            .ok()
            .flatten()
            .unwrap_or(HEADER);
        let needed = record.max(pending + 1);
        if self.start + needed <= self.buf.len() {
            return;
        }
        if needed <= self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
        } else {
            let mut bigger = pool::take(needed.max(size));
            bigger[..pending].copy_from_slice(&self.buf[self.start..self.end]);
            self.buf = bigger;
        }
        copied(pending);
        self.start = 0;
        self.end = pending;
    }
}

/// Writes `parts` in order, whole, with as few system calls as the socket allows.
pub async fn write_all(to: &TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    write_all_slices(to, &mut slices).await
}

async fn write_all_slices(to: &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
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

/// Copies both ways between two plain TCP sockets with `splice(2)`.
fn relay_tcp(
    client: TcpStream,
    backend: TcpStream,
    limits: Limits,
) -> impl Future<Output = (Transfer, Result<(), CopyError>)> {
    async move {
        let meter = Meter::new();
        let max = limits.max_buffer.max(MIN_BUFFER);
        let result = {
            tokio::pin! {
                let up = splice_pump(
                    Source { socket: &client, peer: Peer::Client },
                    Sink { socket: &backend, peer: Peer::Backend, tls: None },
                    &meter, &meter.up, max,
                );
                let down = splice_pump(
                    Source { socket: &backend, peer: Peer::Backend },
                    Sink { socket: &client, peer: Peer::Client, tls: None },
                    &meter, &meter.down, max,
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

/// One direction, socket → pipe → socket.
fn splice_pump<'a>(
    from: Source<'a>,
    to: Sink<'a>,
    meter: &'a Meter,
    counter: &'a AtomicU64,
    max: usize,
) -> impl Future<Output = Result<(), CopyError>> + 'a {
    async move {
        loop {
            readable(from.socket).await.map_err(|e| from.io(e))?;
            let Some(pipe) = pipes::take() else {
                // No pipe to be had: move this chunk through a pooled buffer instead.
                match Box::pin(buffered_chunk(&from, &to, meter, counter, max)).await? {
                    0 => return shutdown_write(to.socket).map_err(|e| to.io(e)),
                    _ => continue,
                }
            };
            let n = match from.socket.try_io(Interest::READABLE, || {
                splice(from.socket.as_raw_fd(), pipe.w(), pipes::PIPE_SIZE)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipes::give(pipe);
                    continue;
                }
                Err(e) => return Err(from.io(e)),
            };
            if n == 0 {
                pipes::give(pipe);
                return shutdown_write(to.socket).map_err(|e| to.io(e));
            }
            meter.moved(counter, n);
            let mut left = n;
            while left > 0 {
                writable(to.socket).await.map_err(|e| to.io(e))?;
                match to.socket.try_io(Interest::WRITABLE, || {
                    splice(pipe.r(), to.socket.as_raw_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The pipe still holds data: it is dropped (closed), not pooled.
                    Err(e) => return Err(to.io(e)),
                }
            }
            meter.touch();
            pipes::give(pipe);
        }
    }
}

/// Moves what `from` has now through a pooled buffer; 0 means end of stream.
async fn buffered_chunk(
    from: &Source<'_>,
    to: &Sink<'_>,
    meter: &Meter,
    counter: &AtomicU64,
    max: usize,
) -> Result<usize, CopyError> {
    let mut buf = pool::take(max);
    let n = match from.socket.try_read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(usize::MAX),
        Err(e) => return Err(from.io(e)),
    };
    meter.moved(counter, n);
    write_all(to.socket, &[&buf[..n]])
        .await
        .map_err(|e| to.io(e))?;
    Ok(n)
}

fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (owned by the caller's
    // socket and pipe); null offsets mean "current position", as sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub mod pool {
    use super::*;

    const CLASSES: usize = 6; // 4, 8, 16, 32, 64, 128 KiB
    const KEEP: usize = 64;

    thread_local! {
        static FREE: RefCell<[Vec<Box<[u8]>>; CLASSES]> = RefCell::new(Default::default());
        static IN_USE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    /// Buffers taken on this thread and not given back yet (tests: idle holds none).
    pub fn in_use() -> isize {
        IN_USE.with(|c| c.get())
    }

    fn class(size: usize) -> usize {
        let mut c = 0;
        while c + 1 < CLASSES && (MIN_BUFFER << c) < size {
            c += 1;
        }
        c
    }

    /// The largest pooled buffer.
    pub const LARGEST: usize = MIN_BUFFER << (CLASSES - 1);

    /// A data buffer that goes back to the pool when dropped.
    pub struct Buf(Box<[u8]>);

    impl Buf {
        /// No buffer at all (holds no memory).
        pub fn none() -> Buf {
            Buf(Box::default())
        }
    }

    impl std::ops::Deref for Buf {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.0
        }
    }

    impl std::ops::DerefMut for Buf {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            give(std::mem::take(&mut self.0));
        }
    }

    /// A buffer of at least `size` bytes: rounded up to its class, or of exactly `size` (and not
    /// pooled) above [`LARGEST`].
    pub fn take(size: usize) -> Buf {
        IN_USE.with(|n| n.set(n.get() + 1));
        if size > LARGEST {
            return Buf(vec![0u8; size].into_boxed_slice());
        }
        let c = class(size);
        Buf(FREE
            .with(|f| f.borrow_mut()[c].pop())
            .unwrap_or_else(|| vec![0u8; MIN_BUFFER << c].into_boxed_slice()))
    }

    fn give(buf: Box<[u8]>) {
        if buf.is_empty() {
            return;
        }
        IN_USE.with(|n| n.set(n.get() - 1));
        let c = class(buf.len());
        if MIN_BUFFER << c != buf.len() {
            return;
        }
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f[c].len() < KEEP {
                f[c].push(buf);
            }
        });
    }
}

/// Per-thread pool of non-blocking pipes for splice. A pipe is given back only when empty.
mod pipes {
    use super::*;

    const KEEP: usize = 64;
    pub const PIPE_SIZE: usize = 256 << 10;

    pub struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    impl Pipe {
        pub fn r(&self) -> RawFd {
            self.r.as_raw_fd()
        }
        pub fn w(&self) -> RawFd {
            self.w.as_raw_fd()
        }
    }

    thread_local! {
        static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// A pooled or new pipe; `None` when none can be created (e.g. out of descriptors).
    pub fn take() -> Option<Pipe> {
        if let Some(p) = FREE.with(|f| f.borrow_mut().pop()) {
            return Some(p);
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // A bigger pipe moves a bulk flow in fewer splices; its pages exist only while full.
        // SAFETY: fcntl on a descriptor we own; failure leaves the default size, which works.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        // SAFETY: both descriptors were just created and are owned by nobody else.
        Some(unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    pub fn give(p: Pipe) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(p);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::tls::{
        ServerSide, handshake,
        testing::{SUITES, Tls, name, tcp_pair},
    };

    /// A TLS client (tokio-rustls) connected to the relay's TLS server side.
    async fn inbound(tls: &Tls) -> (tokio_rustls::client::TlsStream<TcpStream>, Side) {
        let (peer, ours) = tcp_pair().await;
        let server = ServerSide::with_config(tls.server(true));
        let (peer, accepted) = tokio::join!(
            TlsConnector::from(tls.client(false)).connect(name(), peer),
            handshake::accept(&ours, &server)
        );
        let accepted = accepted.unwrap();
        (
            peer.unwrap(),
            Side::Tls(ours, Box::new(accepted.established)),
        )
    }

    /// The relay's TLS client side connected to a TLS server (tokio-rustls).
    async fn outbound(
        tls: &Tls,
        config: Arc<rustls::ClientConfig>,
    ) -> (tokio_rustls::server::TlsStream<TcpStream>, Side) {
        let (ours, peer) = tcp_pair().await;
        let (established, peer) = tokio::join!(
            handshake::connect(&ours, config, name()),
            TlsAcceptor::from(tls.server(false)).accept(peer)
        );
        (
            peer.unwrap(),
            Side::Tls(ours, Box::new(established.unwrap())),
        )
    }

    /// Sends `up` from the client, half-closes, checks the backend got exactly that, then sends
    /// `down` from the backend after the half-close and checks the client got exactly that.
    async fn exchange(
        mut client: impl AsyncRead + AsyncWrite + Unpin,
        mut backend: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        relay: tokio::task::JoinHandle<(Transfer, Result<(), CopyError>)>,
        up: usize,
        down: usize,
    ) {
        let request: Vec<u8> = (0..up).map(|i| (i * 7 + i / 251) as u8).collect();
        let answer: Vec<u8> = (0..down).map(|i| (i * 13 + i / 241) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.map(|_| (backend, got))
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let (mut backend, got) = reader.await.unwrap().unwrap();
        assert!(
            got == request,
            "client → backend: {} of {up} bytes, or different",
            got.len()
        );
        backend.write_all(&answer).await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(
            got == answer,
            "backend → client: {} of {down} bytes, or different",
            got.len()
        );
        let (transfer, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!(
            transfer,
            Transfer {
                up: up as u64,
                down: down as u64
            }
        );
    }

    fn spawn_relay(
        client: Side,
        backend: Side,
    ) -> tokio::task::JoinHandle<(Transfer, Result<(), CopyError>)> {
        tokio::spawn(relay(
            client,
            backend,
            Limits::idle(Duration::from_secs(10)),
        ))
    }

    #[tokio::test]
    async fn tls_to_plain_keeps_every_byte_with_every_suite() {
        for suite in SUITES {
            let tls = Tls::new(suite);
            let (client, client_side) = inbound(&tls).await;
            let (backend_side, backend) = tcp_pair().await;
            let relay = spawn_relay(client_side, Side::Plain(backend_side));
            exchange(client, backend, relay, 3_000_000, 1_000_000).await;
        }
    }

    #[tokio::test]
    async fn plain_to_tls_keeps_every_byte_with_every_suite() {
        for suite in SUITES {
            let tls = Tls::new(suite);
            let (client, client_side) = tcp_pair().await;
            let (backend, backend_side) = outbound(&tls, tls.client(true)).await;
            let relay = spawn_relay(Side::Plain(client_side), backend_side);
            exchange(client, backend, relay, 1_000_000, 3_000_000).await;
        }
    }

    #[tokio::test]
    async fn tls_to_tls_keeps_every_byte_across_versions() {
        // TLS 1.3 toward the client, TLS 1.2 toward the backend, and the other way round.
        for (front, back) in [(SUITES[1], SUITES[3]), (SUITES[5], SUITES[2])] {
            let (front, back) = (Tls::new(front), Tls::new(back));
            let (client, client_side) = inbound(&front).await;
            let (backend, backend_side) = outbound(&back, back.client(true)).await;
            let relay = spawn_relay(client_side, backend_side);
            exchange(client, backend, relay, 2_000_000, 2_000_000).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_half_closes_right_after_resuming_gets_its_answer() {
        let tls = Tls::new(SUITES[0]);
        let client_config = tls.client(false);
        let server = Arc::new(ServerSide::with_config(tls.server(true)));
        for round in 0..3 {
            let (peer, ours) = tcp_pair().await;
            let server = Arc::clone(&server);
            let accept = tokio::spawn(async move {
                let accepted = handshake::accept(&ours, &server).await;
                (ours, accepted)
            });
            let mut client = TlsConnector::from(Arc::clone(&client_config))
                .connect(name(), peer)
                .await
                .unwrap();
            // close_notify right behind the Finished, often in the same read of the relay's.
            client.shutdown().await.unwrap();
            let (ours, accepted) = accept.await.unwrap();
            let accepted = accepted.unwrap();
            assert_eq!(accepted.facts.resumed, round > 0, "connection {round}");
            let (backend_side, backend) = tcp_pair().await;
            let relay = spawn_relay(
                Side::Tls(ours, Box::new(accepted.established)),
                Side::Plain(backend_side),
            );
            exchange(client, backend, relay, 0, 70_000).await;
        }
    }

    #[tokio::test]
    async fn small_messages_cross_one_by_one() {
        // Interactive traffic: each message must arrive before the next is sent.
        let tls = Tls::new(SUITES[0]);
        let (mut client, client_side) = inbound(&tls).await;
        let (backend_side, mut backend) = tcp_pair().await;
        let relay = spawn_relay(client_side, Side::Plain(backend_side));
        for i in 0..50u8 {
            let message = vec![i; 1 + usize::from(i) * 37];
            client.write_all(&message).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0; message.len()];
            backend.read_exact(&mut got).await.unwrap();
            assert_eq!(got, message);
            backend.write_all(&message).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, message);
        }
        drop((client, backend));
        let _ = relay.await;
    }

    #[tokio::test]
    async fn key_updates_are_followed_both_ways() {
        let tls = Tls::new(SUITES[0]);
        let (mut client, client_side) = inbound(&tls).await;
        let (mut backend, backend_side) = outbound(&tls, tls.client(true)).await;
        let relay = spawn_relay(client_side, backend_side);
        for round in 0..4u8 {
            // Each peer asks for a KeyUpdate: the relay must renew its receiving key, and its
            // sending key before its next record, or the peer fails to decrypt.
            if round % 2 == 0 {
                client.get_mut().1.refresh_traffic_keys().unwrap();
            } else {
                backend.get_mut().1.refresh_traffic_keys().unwrap();
            }
            let message = vec![round; 100_000];
            client.write_all(&message).await.unwrap();
            let mut got = vec![0; message.len()];
            backend.read_exact(&mut got).await.unwrap();
            assert!(got == message, "round {round}: client → backend");
            backend.write_all(&message).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert!(got == message, "round {round}: backend → client");
        }
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        let (_, result) = relay.await.unwrap();
        result.unwrap();
    }

    #[tokio::test]
    async fn tickets_from_the_backend_resume_the_next_connection() {
        let tls = Tls::new(SUITES[0]);
        let config = tls.client(true);
        let server = tls.server(false);
        for round in 0..2 {
            let (ours, peer) = tcp_pair().await;
            let (established, peer) = tokio::join!(
                handshake::connect(&ours, Arc::clone(&config), name()),
                TlsAcceptor::from(Arc::clone(&server)).accept(peer)
            );
            let mut backend = peer.unwrap();
            let kind = backend.get_ref().1.handshake_kind();
            let expected = [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed][round];
            assert_eq!(kind, Some(expected), "connection {round}");
            let (mut client, client_side) = tcp_pair().await;
            let relay = spawn_relay(
                Side::Plain(client_side),
                Side::Tls(ours, Box::new(established.unwrap())),
            );
            // The tickets travel ahead of this answer: the relay hands them to rustls.
            backend.write_all(b"hello").await.unwrap();
            backend.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.shutdown().await.unwrap();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            relay.await.unwrap().1.unwrap();
        }
    }

    #[tokio::test]
    async fn a_forged_record_is_answered_with_bad_record_mac_and_the_backend_is_reset() {
        let tls = Tls::new(SUITES[0]);
        let (mut client, client_side) = inbound(&tls).await;
        let (backend_side, mut backend) = tcp_pair().await;
        let relay = spawn_relay(client_side, Side::Plain(backend_side));
        client.write_all(b"genuine").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0; 7];
        backend.read_exact(&mut got).await.unwrap();
        // A well-formed record whose tag cannot verify.
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend([0x5a; 40]);
        client.get_mut().0.write_all(&forged).await.unwrap();
        let (_, result) = relay.await.unwrap();
        let error = result.unwrap_err();
        assert!(
            matches!(
                &error,
                CopyError::Tls {
                    peer: Peer::Client,
                    error,
                    answered: Some(AlertDescription::BadRecordMac),
                } if matches!(**error, RecordError::Decrypt)
            ),
            "{error}"
        );
        // The client was told, under the relay's current key.
        let told = client.read(&mut [0; 16]).await.unwrap_err().to_string();
        assert!(told.contains("BadRecordMac"), "{told}");
        // Nothing of the forged record reached the backend, and it sees an abort, not an end.
        let mut rest = Vec::new();
        let end = backend.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_tls_client_that_closes_without_close_notify_gets_the_backend_reset() {
        let tls = Tls::new(SUITES[3]);
        let (mut client, client_side) = inbound(&tls).await;
        let (backend_side, mut backend) = tcp_pair().await;
        let relay = spawn_relay(client_side, Side::Plain(backend_side));
        // Half a request, then a FIN that an attacker on the path could have forged.
        let half = b"POST /transfer HTTP/1.1\r\nContent-Le";
        client.write_all(half).await.unwrap();
        client.flush().await.unwrap();
        client.get_mut().0.shutdown().await.unwrap();
        let mut got = Vec::new();
        let end = backend.read_to_end(&mut got).await;
        // Every byte forwarded arrives (the relay waits for the backend's acknowledgement)...
        assert_eq!(got, half);
        // ...and then a reset, never the EOF a complete request would end with.
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        let (transfer, result) = relay.await.unwrap();
        assert!(
            matches!(
                result,
                Err(CopyError::Truncated {
                    peer: Peer::Client,
                    mid_record: false
                })
            ),
            "{result:?}"
        );
        assert_eq!(transfer.up, half.len() as u64);
    }

    #[tokio::test]
    async fn a_backend_reset_resets_the_client_after_what_was_sent() {
        let tls = Tls::new(SUITES[0]);
        let (mut client, client_side) = tcp_pair().await;
        let (mut backend, backend_side) = outbound(&tls, tls.client(true)).await;
        let relay = spawn_relay(Side::Plain(client_side), backend_side);
        backend.write_all(&[9; 100_000]).await.unwrap();
        backend.flush().await.unwrap();
        // The backend's TLS ends without close_notify: a truncation toward a plain client.
        backend.get_mut().0.shutdown().await.unwrap();
        let mut got = Vec::new();
        let end = client.read_to_end(&mut got).await;
        assert_eq!(got.len(), 100_000, "every byte before the abort arrives");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        let (_, result) = relay.await.unwrap();
        assert!(
            matches!(
                result,
                Err(CopyError::Truncated {
                    peer: Peer::Backend,
                    ..
                })
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_worn_tls12_key_ends_the_connection_with_close_notify() {
        let tls = Tls::new(SUITES[4]);
        let (mut client, client_side) = inbound(&tls).await;
        let Side::Tls(socket, mut established) = client_side else {
            unreachable!()
        };
        established.sealer.get_mut().wear_out_after(3);
        let (backend_side, mut backend) = tcp_pair().await;
        let relay = spawn_relay(Side::Tls(socket, established), Side::Plain(backend_side));
        // One record per chunk, each read before the next is sent: three arrive...
        for i in 0..3u8 {
            backend.write_all(&[i; 100]).await.unwrap();
            let mut got = [0; 100];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i; 100]);
        }
        // ...then the key may not seal another: a close_notify instead.
        backend.write_all(&[3; 100]).await.unwrap();
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("a clean close_notify");
        assert!(rest.is_empty(), "{} bytes after the limit", rest.len());
        let (_, result) = relay.await.unwrap();
        assert!(
            matches!(
                &result,
                Err(CopyError::Tls {
                    error,
                    answered: Some(AlertDescription::CloseNotify),
                    ..
                }) if matches!(**error, RecordError::Exhausted)
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_quiet_tls_connection_holds_no_buffer() {
        let tls = Tls::new(SUITES[0]);
        let (mut client, client_side) = inbound(&tls).await;
        let (mut backend, backend_side) = outbound(&tls, tls.client(true)).await;
        let relay = spawn_relay(client_side, backend_side);
        let chunk = vec![7u8; 300_000];
        client.write_all(&chunk).await.unwrap();
        let mut got = vec![0u8; chunk.len()];
        backend.read_exact(&mut got).await.unwrap();
        backend.write_all(&chunk).await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        // Both directions now wait for data: neither may keep a buffer meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool::in_use(), 0, "buffers held by an idle connection");
        drop((client, backend));
        let _ = relay.await.unwrap();
        assert_eq!(pool::in_use(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (_client, client_side) = tcp_pair().await;
        let (backend_side, _backend) = tcp_pair().await;
        let (transfer, result) = relay(
            Side::Plain(client_side),
            Side::Plain(backend_side),
            Limits::idle(Duration::from_millis(200)),
        )
        .await;
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
        assert_eq!(transfer, Transfer::default());
    }

    #[tokio::test]
    async fn splice_keeps_every_byte_and_half_closes_both_ways() {
        let (client, client_side) = tcp_pair().await;
        let (backend_side, backend) = tcp_pair().await;
        let relay = spawn_relay(Side::Plain(client_side), Side::Plain(backend_side));
        exchange(client, backend, relay, 5_000_000, 11).await;
    }

    #[tokio::test]
    async fn splice_reports_a_reset() {
        let (client, client_side) = tcp_pair().await;
        let (backend_side, backend) = tcp_pair().await;
        let task = spawn_relay(Side::Plain(client_side), Side::Plain(backend_side));
        // SO_LINGER 0: close sends a reset instead of a FIN.
        socket2::SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let (_, result) = task.await.unwrap();
        assert!(
            matches!(
                result,
                Err(CopyError::Io {
                    peer: Peer::Backend,
                    ..
                })
            ),
            "{result:?}"
        );
        // The backend's abort reaches the client as an abort.
        let mut client = client;
        let end = client.read(&mut [0; 16]).await;
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }
}
