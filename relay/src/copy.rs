//! Moving bytes both ways between the client side and the backend side of a connection.
//!
//! Half-close is honoured in both directions: when one side finishes sending (TCP FIN, or TLS
//! close_notify), the relay shuts down its write half toward the other side (a FIN, or a
//! close_notify followed by a FIN) and keeps copying the other direction until it finishes too.
//! Bytes are neither lost, duplicated nor reordered: each direction is one ordered pump.
//! A connection on which no byte moves in either direction for `idle` is closed.
//!
//! Two pumps, chosen per connection:
//! - **plain ↔ plain** ([`relay_tcp`]): `splice(2)` from the source socket into a pipe and from
//!   the pipe into the destination socket: the payload never enters user space. Pipes come from
//!   a per-thread pool and are held only while data is in flight. Where no pipe can be had
//!   (out of file descriptors) the chunk goes through a pooled buffer instead.
//! - **anything with TLS** ([`relay`]): read into a pooled buffer, write it out. The buffer is
//!   taken from the per-thread [`pool`] only when the source has data and handed back as soon
//!   as it is written, so an idle connection holds no data buffer. Its size adapts to the flow:
//!   4 KiB to start (interactive traffic), doubling up to `max_buffer` while reads fill it
//!   (bulk), shrinking again when they don't — the ztunnel approach.
//!
//! Userspace copies per byte, per direction (kernel socket copies not counted; "rustls" is the
//! copy between rustls' record buffer and ours, decryption and encryption themselves run in
//! place in rustls' buffers):
//!
//! | inbound → outbound | client → backend | backend → client |
//! |---|---|---|
//! | plain → plain | 0 (splice) | 0 (splice) |
//! | plain → tls, plain → mtls | 1 (rustls: plaintext into a record) | 1 (rustls: plaintext out of a record) |
//! | tls → plain, mtls → plain | 1 (rustls: plaintext out of a record) | 1 (rustls: plaintext into a record) |
//! | tls/mtls → tls/mtls (4 pairs) | 2 (out of one record, into the other) | 2 |
//!
//! The remaining copy on TLS sides is rustls' buffered `Connection` API; its unbuffered API
//! would let records be decrypted in place and written from there (not done yet).

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, Interest, ReadBuf},
    net::TcpStream,
    time::Instant,
};

/// Largest data buffer a connection may hold per direction unless configured otherwise.
pub const DEFAULT_MAX_BUFFER: usize = 64 << 10;
/// Size a direction starts with (and shrinks back to): interactive traffic fits.
const MIN_BUFFER: usize = 4 << 10;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// From the client to the backend.
    pub up: u64,
    /// From the backend to the client.
    pub down: u64,
}

/// Why a relayed connection ended, when it did not end with both sides closing cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
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
async fn both_ways(
    meter: &Meter,
    idle: Duration,
    up: impl Future<Output = io::Result<()>>,
    down: impl Future<Output = io::Result<()>>,
) -> Result<(), CopyError> {
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()).map_err(CopyError::Io),
        () = meter.idle(idle) => Err(CopyError::Idle(idle)),
    }
}

/// Copies both ways between any two streams (TLS on either side) through pooled buffers.
/// Returns the bytes moved either way, also when it fails.
pub async fn relay<C, B>(client: C, backend: B, limits: Limits) -> (Transfer, Result<(), CopyError>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let meter = Meter::new();
    let (client_r, client_w) = tokio::io::split(client);
    let (backend_r, backend_w) = tokio::io::split(backend);
    let max = limits.max_buffer.max(MIN_BUFFER);
    let up = pump(client_r, backend_w, &meter, &meter.up, max);
    let down = pump(backend_r, client_w, &meter, &meter.down, max);
    let result = both_ways(&meter, limits.idle, up, down).await;
    (meter.transfer(), result)
}

/// One direction through pooled, adaptively sized buffers.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    meter: &Meter,
    counter: &AtomicU64,
    max: usize,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut size = MIN_BUFFER;
    loop {
        // The buffer goes back to the pool whenever the source has nothing to give, so a
        // quiet direction holds none.
        let read = poll_fn(|cx| {
            let mut buf = pool::take(size);
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut from).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    pool::give(buf);
                    Poll::Pending
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    Poll::Ready(Ok((buf, n)))
                }
                // A TLS peer that closes TCP without close_notify: every byte before was
                // authenticated record by record, and many clients end this way, so treat it
                // as the end of this direction rather than failing the other one.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    let n = 0;
                    Poll::Ready(Ok((buf, n)))
                }
                Poll::Ready(Err(e)) => {
                    pool::give(buf);
                    Poll::Ready(Err(e))
                }
            }
        })
        .await;
        let (buf, n) = read?;
        if n == 0 {
            pool::give(buf);
            return half_close(&mut to).await;
        }
        meter.moved(counter, n);
        let written = async {
            to.write_all(&buf[..n]).await?;
            to.flush().await
        }
        .await;
        let filled = n == buf.len();
        pool::give(buf);
        written?;
        meter.touch();
        size = if filled {
            (size * 2).min(max)
        } else if n < size / 4 {
            (size / 2).max(MIN_BUFFER)
        } else {
            size
        };
    }
}

async fn half_close<W: AsyncWrite + Unpin>(to: &mut W) -> io::Result<()> {
    match to.shutdown().await {
        // The peer may already be gone after its own half-close; our FIN is moot then.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Copies both ways between two plain TCP sockets with `splice(2)`.
pub async fn relay_tcp(
    client: TcpStream,
    backend: TcpStream,
    limits: Limits,
) -> (Transfer, Result<(), CopyError>) {
    let meter = Meter::new();
    let max = limits.max_buffer.max(MIN_BUFFER);
    let up = splice_pump(&client, &backend, &meter, &meter.up, max);
    let down = splice_pump(&backend, &client, &meter, &meter.down, max);
    let result = both_ways(&meter, limits.idle, up, down).await;
    (meter.transfer(), result)
}

/// One direction, socket → pipe → socket.
async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    meter: &Meter,
    counter: &AtomicU64,
    max: usize,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let Some(pipe) = pipes::take() else {
            // No pipe to be had: move this chunk through a pooled buffer instead.
            match buffered_chunk(from, to, meter, counter, max).await? {
                0 => return shutdown_write(to),
                _ => continue,
            }
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.w(), pipes::PIPE_SIZE)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipes::give(pipe);
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            pipes::give(pipe);
            return shutdown_write(to);
        }
        meter.moved(counter, n);
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.r(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The pipe still holds data: it is dropped (closed), not pooled.
                Err(e) => return Err(e),
            }
        }
        meter.touch();
        pipes::give(pipe);
    }
}

/// Moves what `from` has now through a pooled buffer; 0 means end of stream.
async fn buffered_chunk(
    from: &TcpStream,
    to: &TcpStream,
    meter: &Meter,
    counter: &AtomicU64,
    max: usize,
) -> io::Result<usize> {
    let mut buf = pool::take(max);
    let result = async {
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(usize::MAX),
            Err(e) => return Err(e),
        };
        meter.moved(counter, n);
        let mut done = 0;
        while done < n {
            to.writable().await?;
            match to.try_write(&buf[done..n]) {
                Ok(m) => done += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    .await;
    pool::give(std::mem::take(&mut buf));
    result
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

/// Per-thread pool of data buffers in a few size classes. A connection takes one while it has
/// bytes in flight and gives it back right after; the pool keeps a bounded number per class so
/// a burst does not stay resident.
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

    /// A buffer of at least `size` bytes (rounded up to its class, at most 128 KiB).
    pub fn take(size: usize) -> Box<[u8]> {
        let c = class(size);
        IN_USE.with(|n| n.set(n.get() + 1));
        FREE.with(|f| f.borrow_mut()[c].pop())
            .unwrap_or_else(|| vec![0u8; MIN_BUFFER << c].into_boxed_slice())
    }

    pub fn give(buf: Box<[u8]>) {
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    #[tokio::test]
    async fn half_close_both_ways_keeps_every_byte() {
        let (mut client, client_side) = duplex(1024);
        let (backend_side, mut backend) = duplex(1024);
        let task = tokio::spawn(relay(
            client_side,
            backend_side,
            Limits::idle(Duration::from_secs(5)),
        ));
        let request: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            (backend, got)
        });
        if let Err(e) = client.write_all(&request).await {
            panic!("write: {e}; relay ended with {:?}", task.await.unwrap());
        }
        client.shutdown().await.unwrap();
        let (mut backend, got) = reader.await.unwrap();
        assert_eq!(
            got, request,
            "client->backend bytes after client half-close"
        );
        // The backend answers after the client has half-closed.
        backend.write_all(b"response").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"response");
        let (transfer, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(
            transfer,
            Transfer {
                up: 100_000,
                down: 8
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_is_closed() {
        let (_client, client_side) = duplex(64);
        let (backend_side, _backend) = duplex(64);
        let (transfer, result) = relay(
            client_side,
            backend_side,
            Limits::idle(Duration::from_secs(30)),
        )
        .await;
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
        assert_eq!(transfer, Transfer::default());
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffer() {
        let (mut client, client_side) = duplex(1 << 20);
        let (backend_side, mut backend) = duplex(1 << 20);
        let task = tokio::spawn(relay(
            client_side,
            backend_side,
            Limits::idle(Duration::from_secs(30)),
        ));
        let chunk = vec![7u8; 300_000];
        client.write_all(&chunk).await.unwrap();
        let mut got = vec![0u8; chunk.len()];
        backend.read_exact(&mut got).await.unwrap();
        assert_eq!(got, chunk);
        // Both directions are now waiting for data: neither may keep a buffer meanwhile.
        tokio::task::yield_now().await;
        assert_eq!(pool::in_use(), 0, "buffers held by an idle connection");
        drop((client, backend));
        let (transfer, _) = task.await.unwrap();
        assert_eq!(transfer.up, 300_000);
        assert_eq!(pool::in_use(), 0);
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn splice_keeps_every_byte_and_half_closes_both_ways() {
        let (mut client, client_side) = tcp_pair().await;
        let (backend_side, mut backend) = tcp_pair().await;
        let task = tokio::spawn(relay_tcp(
            client_side,
            backend_side,
            Limits::idle(Duration::from_secs(10)),
        ));
        let request: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            (backend, got)
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let (mut backend, got) = reader.await.unwrap();
        assert!(got == request, "client->backend bytes differ after splice");
        backend.write_all(b"late answer").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"late answer");
        let (transfer, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(
            transfer,
            Transfer {
                up: 5_000_000,
                down: 11
            }
        );
    }

    #[tokio::test]
    async fn splice_reports_a_reset() {
        let (client, client_side) = tcp_pair().await;
        let (backend_side, backend) = tcp_pair().await;
        let task = tokio::spawn(relay_tcp(
            client_side,
            backend_side,
            Limits::idle(Duration::from_secs(10)),
        ));
        // SO_LINGER 0: close sends a reset instead of a FIN.
        socket2::SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let (_, result) = task.await.unwrap();
        assert!(matches!(result, Err(CopyError::Io(_))), "{result:?}");
        drop(client);
    }
}
