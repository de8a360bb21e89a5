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
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::SockHash,
    programs::SkBuffContext,
};

/// Sockets of installed pairs, under their own cookie; the verdict program is attached here.
#[map]
static MEMBERS: SockHash<u64> = SockHash::with_max_entries(1 << 16, 0);

/// Sockets of installed pairs, under their peer's cookie: where a member's bytes go.
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(1 << 16, 0);

#[stream_verdict]
pub fn relay_copy(ctx: SkBuffContext) -> u32 {
    // A bare FIN arrives as an empty buffer. Redirected, the kernel's sender would take its
    // zero-length send for a broken pipe and fail the peer socket; ends are the worker's job.
    if ctx.len() == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper reads the cookie of the socket the buffer belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SK_PASS once redirected to the peer's egress, SK_DROP if the peer is gone.
    TARGETS.redirect_skb(&ctx, cookie, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
