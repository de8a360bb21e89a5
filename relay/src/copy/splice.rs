//! plain → plain: `splice(2)` from the source socket into a pipe and from the pipe into the
//! destination socket, so the payload never enters user space.

use std::{io, sync::atomic::AtomicU64};

use tokio::{io::Interest, net::TcpStream};

use super::{
    CopyError, Limits, MIN_BUFFER, Meter, Peer, Sink, Source, Transfer, both_ways,
    other_than_aborted, reset_after_drain,
};
use crate::net::{
    io::{readable, shutdown_write, writable, write_all},
    pipe::{self, splice},
    pool,
};

/// Copies both ways between two plain TCP sockets with `splice(2)`.
pub(super) fn relay_tcp(
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
pub(super) fn splice_pump<'a>(
    from: Source<'a>,
    to: Sink<'a>,
    meter: &'a Meter,
    counter: &'a AtomicU64,
    max: usize,
) -> impl Future<Output = Result<(), CopyError>> + 'a {
    async move {
        loop {
            readable(from.socket).await.map_err(|e| from.io(e))?;
            let Some(pipe) = pipe::take() else {
                // No pipe to be had: move this chunk through a pooled buffer instead.
                match Box::pin(buffered_chunk(&from, &to, meter, counter, max)).await? {
                    0 => return shutdown_write(to.socket).map_err(|e| to.io(e)),
                    _ => continue,
                }
            };
            // Not `read_drained`: splice stops when the pipe runs out of slots (16 by default),
            // so a short splice does not mean the socket has no more.
            let n = match from.socket.try_io(Interest::READABLE, || {
                splice(from.socket, pipe.w(), pipe::PIPE_SIZE)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipe::give(pipe);
                    continue;
                }
                Err(e) => return Err(from.io(e)),
            };
            if n == 0 {
                pipe::give(pipe);
                return shutdown_write(to.socket).map_err(|e| to.io(e));
            }
            meter.moved(counter, n);
            let mut left = n;
            while left > 0 {
                writable(to.socket).await.map_err(|e| to.io(e))?;
                match to
                    .socket
                    .try_io(Interest::WRITABLE, || splice(pipe.r(), to.socket, left))
                {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The pipe still holds data: it is dropped (closed), not pooled.
                    Err(e) => return Err(to.io(e)),
                }
            }
            meter.touch();
            pipe::give(pipe);
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
