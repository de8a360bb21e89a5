//! The pumps with a TLS end: plaintext read straight into record slots and sealed in place
//! (plain → TLS), records opened in place and their plaintexts passed on (TLS → anything), and
//! the one place where everything sent toward a TLS peer is sealed in order ([`TlsOut`]).

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem,
    ops::Range,
    sync::atomic::AtomicU64,
};

use rustls::{AlertDescription, ContentType};
use tokio::{net::TcpStream, sync::Mutex};

use super::{ALERT_WAIT, BATCH, CopyError, MIN_BUFFER, Meter, Sink, Source, adapt, copied};
use crate::{
    net::{
        io::{read_drained, readable, shutdown_write, write_all, write_all_slices},
        pool,
    },
    tls::{
        handshake::Established,
        record::{
            Content, HEADER, MAX_PLAINTEXT, Opener, RecordError, Sealer, Session, record_len,
        },
    },
};

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
pub(super) struct TlsOut<'a> {
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

/// The receiving half of a TLS side, with the bytes that followed its handshake.
pub(super) struct Opening<'a> {
    opener: &'a mut Opener,
    session: &'a Session,
    incoming: &'a mut Vec<u8>,
}

/// A TLS side's halves, borrowed from where the handshake left them: the receiving half (for
/// the direction from this side) and the sending half (for everything toward it).
pub(super) fn halves(tls: Option<&mut Established>) -> (Option<Opening<'_>>, Option<TlsOut<'_>>) {
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

// The pumps keep little across their wait for input: what they await while bytes are in
// flight (writes, sealing) is boxed, so an idle connection's task stays small.

/// plain → TLS: plaintext read straight into record payloads, sealed in place.
pub(super) fn seal_pump<'a>(
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
            let mut payloads = slots.payloads(&mut buf);
            let wanted = payloads.iter().map(|p| p.len()).sum();
            let read = read_drained(from.socket, wanted, || {
                nix::sys::uio::readv(from.socket, &mut payloads).map_err(io::Error::from)
            });
            drop(payloads);
            let n = match read {
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
pub(super) fn open_pump<'a>(
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
        let room = &mut self.buf[self.end..limit];
        let wanted = room.len();
        match read_drained(from, wanted, || {
            nix::unistd::read(from, room).map_err(io::Error::from)
        }) {
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
