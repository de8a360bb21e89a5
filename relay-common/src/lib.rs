//! Types shared by relay's eBPF programs and its userspace: map keys, values, counter layout.
//!
//! Everything is `#[repr(C)]` with explicit padding, because the kernel compares map keys
//! byte for byte: an uninitialised padding byte would make two equal keys differ.
#![no_std]

/// Key of the policy map: a destination (address, TCP port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub addr: Addr,
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// An IPv4 or IPv6 address as the data path sees it: IPv4 in the first 4 bytes, rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addr {
    pub bytes: [u8; 16],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

impl Addr {
    pub const fn v4(a: [u8; 4]) -> Self {
        Self {
            bytes: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            family: FAMILY_V4,
            _pad: [0; 3],
        }
    }

    pub const fn v6(bytes: [u8; 16]) -> Self {
        Self {
            bytes,
            family: FAMILY_V6,
            _pad: [0; 3],
        }
    }
}

impl PolicyKey {
    pub const fn new(addr: Addr, port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

/// Value of the policy map: what to do with the flow, and which service counts it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `ACTION_STEER` or `ACTION_DROP`.
    pub action: u32,
    /// Counter slot of the service (1..MAX_SERVICES); slot 0 counts what belongs to none.
    pub slot: u32,
}

/// (server, front port): steered to the relay by the TC ingress program.
pub const ACTION_STEER: u32 = 1;
/// (server, backend port): dropped by XDP on client-facing interfaces.
pub const ACTION_DROP: u32 = 2;

/// Services the data path can tell apart; the counter array has one slot more (slot 0).
pub const MAX_SERVICES: u32 = 1023;

/// What a counter counts; the per-CPU counter array holds `slot * COUNTERS + counter`.
pub const COUNTER_STEERED: u32 = 0;
pub const COUNTER_DROPPED: u32 = 1;
pub const COUNTER_PASSED: u32 = 2;
pub const COUNTER_MALFORMED: u32 = 3;
/// A steered packet found no relay listener (relay down): dropped, so the flow fails closed.
pub const COUNTER_NO_LISTENER: u32 = 4;
pub const COUNTERS: u32 = 5;
pub const COUNTER_SLOTS: u32 = MAX_SERVICES + 1;

/// Index of `counter` of `slot` in the counter array.
pub const fn counter_index(slot: u32, counter: u32) -> u32 {
    slot * COUNTERS + counter
}

/// SOCKMAP indices of the relay's transparent listeners.
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;

/// skb mark the TC program sets on steered packets; a policy routing rule sends marked packets
/// to a table whose only route is `local`, so the kernel delivers them to the assigned socket
/// instead of forwarding them to the server.
pub const STEER_MARK: u32 = 0x5e1a_0000;
pub const STEER_MARK_MASK: u32 = 0xffff_0000;

/// A service name in the names map (for `relay status` without a running relay).
pub const NAME_LEN: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub len: u32,
    pub bytes: [u8; NAME_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no implicit padding (explicit `_pad` fields).
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::ServiceName {}
}
