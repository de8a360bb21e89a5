//! The empty XDP program: passes every packet and does nothing else. Never attached; the cost
//! test runs it beside `relay_xdp` so that the figures of `BPF_PROG_TEST_RUN` can be read as
//! "relay's program minus the harness" (the empty program's cost is the harness's own).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn empty_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
