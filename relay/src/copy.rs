//! Moving bytes both ways between the client side and the backend side of a connection.
//!
//! Half-close is honoured in both directions: when one side finishes sending (TCP FIN, or TLS
//! close_notify), the relay shuts down its write half toward the other side (a FIN, or a
//! close_notify followed by a FIN) and keeps copying the other direction until it finishes too.
//! Bytes are neither lost, duplicated nor reordered: each direction is one ordered stream copy.
//!
//! A connection on which no byte moves in either direction for `idle` is closed.
//!
//! Copies per byte today: one userspace copy per direction for plain (read into a buffer, write
//! from it), plus rustls' own record buffers on TLS sides. The zero-copy issue replaces this with
//! splice(2) and in-place TLS; the byte accounting and half-close contract stay the same.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

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

/// Copies both ways until both directions have finished, an I/O error occurs, or the connection
/// stays idle for `idle`. Returns the bytes moved so far either way.
pub async fn relay<C, B>(client: C, backend: B, idle: Duration) -> (Transfer, Result<(), CopyError>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut client = Metered {
        inner: client,
        read: &up,
        last_activity: &last_activity,
        epoch,
    };
    let mut backend = Metered {
        inner: backend,
        read: &down,
        last_activity: &last_activity,
        epoch,
    };
    let watchdog = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = epoch + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut backend) => r.map(|_| ()).map_err(CopyError::Io),
        () = watchdog => Err(CopyError::Idle(idle)),
    };
    let transfer = Transfer {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    };
    (transfer, result)
}

/// Counts the bytes read from a stream and records when data last moved.
struct Metered<'a, S> {
    inner: S,
    read: &'a AtomicU64,
    last_activity: &'a AtomicU64,
    epoch: Instant,
}

impl<S> Metered<'_, S> {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_activity.store(now, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if n > 0 {
                    self.read.fetch_add(n, Ordering::Relaxed);
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            // A TLS peer that closes TCP without close_notify: every byte before was
            // authenticated record by record, and many clients end this way, so treat it as the
            // end of that direction rather than failing the other one.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            // The peer may already be gone after its own half-close; our FIN is moot then.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => other,
        }
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
        let task = tokio::spawn(relay(client_side, backend_side, Duration::from_secs(5)));
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
        let (transfer, result) = relay(client_side, backend_side, Duration::from_secs(30)).await;
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
        assert_eq!(transfer, Transfer::default());
    }
}
