//! plain ↔ plain inside the kernel: a stream verdict program on relay's SOCKHASH maps.
//!
//! For a connection whose two sides are plain TCP, the worker puts both sockets in two maps:
//! - `MEMBERS`, under their own socket cookie. This map carries the program, so every segment
//!   arriving on a member runs `relay_copy` instead of waking the worker.
//! - `TARGETS`, each under its *peer's* cookie. `relay_copy` looks up its own cookie there and
//!   gets the socket to send to: one lookup, no pair table, and nothing to clean up, since the
//!   kernel removes a closed socket from every map.
//!
//! Both sockets go into `TARGETS` before either goes into `MEMBERS`, so a verdict never runs
//! before its peer is there to receive. A segment whose peer is gone (the pair is being torn
//! down) is dropped: the worker resets the connection in that case anyway.
//!
//! Only bytes are moved. The kernel does not carry a FIN or a reset across a redirect: the
//! worker watches each socket for its peer's end and passes it on (`copy::kernel`).
//!
//! A redirected segment leaves its socket's receive buffer, and its memory charge, at once; it
//! then waits uncharged until the peer socket has room (the kernel's worker sends it). A peer
//! that stops reading, or a kernel worker that falls behind a fast sender, would let the
//! sender go on without bound, since nothing closes its TCP window. So each socket has an
//! allowance (`ALLOWANCE`, set by the worker): the payload bytes the program may move from it
//! in all, kept at most `COPY_WINDOW` (16 MiB) ahead of what the peer socket has taken.
//! - A quarter of the way through an allowance, the program asks the worker for more
//!   (`NOTICES`). The worker raises it as far as the peer has taken: one wakeup per 4 MiB in
//!   steady traffic.
//! - A segment beyond it makes the socket *lagging* (`LEDGER`): this and later segments stay
//!   with the socket (`SK_PASS`), charged to its receive buffer, so TCP's flow control holds
//!   the sender back. The worker copies them, after the peer took every byte moved before.
//! - The program moves segments again once the worker has copied every byte left with the
//!   socket (`CopyAllowance::copied`) and the allowance has room: no byte can overtake an
//!   earlier one either way.
//! - A segment left with a socket is charged to it only once it reaches the socket's queue.
//!   If the socket's psock still holds the other direction's segments waiting to leave through
//!   it (both peers stopped reading), it queues behind them uncharged, and the sender's window
//!   stays open. More left over than the receive buffer could hold (`pass_room`) means that:
//!   the program drops from then on (*overrun*), and the worker resets the connection, so the
//!   loss is seen by both peers.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use relay_common::{COPY_ASK_BELOW, CopyAllowance, CopyLedger};

/// Sockets of installed pairs, under their own cookie; the verdict program is attached here.
#[map]
static MEMBERS: SockHash<u64> = SockHash::with_max_entries(1 << 16, 0);

/// Sockets of installed pairs, under their peer's cookie: where a member's bytes go.
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(1 << 16, 0);

/// Per member, what the program did with its bytes; written by the program only.
#[map]
static LEDGER: HashMap<u64, CopyLedger> =
    HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC as u32);

/// Per member, how many payload bytes the program may move from it in all, and how many of
/// those it left with the socket the worker has copied; written by the worker only.
#[map]
static ALLOWANCE: HashMap<u64, CopyAllowance> =
    HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC as u32);

/// Cookies of members that need the worker: half way through the allowance, or lagging.
#[map]
static NOTICES: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

#[stream_verdict]
pub fn relay_copy(ctx: SkBuffContext) -> u32 {
    // A bare FIN arrives as an empty buffer. Redirected, the kernel's sender would take its
    // zero-length send for a broken pipe and fail the peer socket; ends are the worker's job.
    let len = u64::from(ctx.len());
    if len == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper reads the cookie of the socket the buffer belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // Without a ledger the worker did not install this socket: keep its bytes where they are.
    let Some(ledger) = LEDGER.get_ptr_mut(&cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: a map value, valid for this run; only this program writes it, and runs for one
    // socket do not overlap (they hold the socket's lock).
    let ledger = unsafe { &mut *ledger };
    if ledger.overrun != 0 {
        tell_lagging(ledger, cookie);
        return sk_action::SK_DROP;
    }
    // SAFETY: read-only use of a map value.
    let allowance = unsafe { ALLOWANCE.get(&cookie) }
        .copied()
        .unwrap_or_default();
    let room = ledger.moved + len <= allowance.total;
    if ledger.lagging != 0 {
        if !(room && allowance.copied == ledger.passed) {
            return leave_for_worker(ledger, &allowance, cookie, len);
        }
        // The worker has copied everything left with the socket: moving again keeps order.
        ledger.lag_told = 0;
        // SAFETY: a field of the map value above.
        unsafe { core::ptr::write_volatile(&mut ledger.lagging, 0) };
    } else if !room {
        // SAFETY: as above. Volatile so that the worker, reading the ledger concurrently,
        // never sees `lagging` before the last `moved`.
        unsafe { core::ptr::write_volatile(&mut ledger.lagging, 1) };
        return leave_for_worker(ledger, &allowance, cookie, len);
    }
    // SK_PASS once redirected to the peer's egress, SK_DROP if the peer is gone.
    let verdict = TARGETS.redirect_skb(&ctx, cookie, 0) as u32;
    let moved = ledger.moved + len;
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&mut ledger.moved, moved) };
    if allowance.total - moved < COPY_ASK_BELOW
        && ledger.asked_at != allowance.total
        && NOTICES.output::<u64>(cookie, 0).is_ok()
    {
        ledger.asked_at = allowance.total;
    }
    verdict
}

/// Leaves the segment with its socket, for the worker; counted before the worker can read it.
/// Past `pass_room`, drops it and every later one instead (see the module doc).
fn leave_for_worker(
    ledger: &mut CopyLedger,
    allowance: &CopyAllowance,
    cookie: u64,
    len: u64,
) -> u32 {
    let left = (ledger.passed + len).saturating_sub(allowance.copied);
    if left > allowance.pass_room {
        // SAFETY: a field of the map value the caller holds.
        unsafe { core::ptr::write_volatile(&mut ledger.overrun, 1) };
        ledger.lag_told = 0;
        tell_lagging(ledger, cookie);
        return sk_action::SK_DROP;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&mut ledger.passed, ledger.passed + len) };
    tell_lagging(ledger, cookie);
    sk_action::SK_PASS
}

/// Tells the worker once that `cookie` is lagging (or overran); again on its next segment if
/// the ring was full, so that the worker is never left waiting.
fn tell_lagging(ledger: &mut CopyLedger, cookie: u64) {
    if ledger.lag_told == 0 && NOTICES.output::<u64>(cookie, 0).is_ok() {
        ledger.lag_told = 1;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
