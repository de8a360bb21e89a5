//! Types shared by relay's eBPF programs and its userspace: map keys, values, counter layout.
//!
//! Everything is `#[repr(C)]` with explicit padding, because the kernel compares map keys
//! byte for byte: an uninitialised padding byte would make two equal keys differ.
#![no_std]

/// Key of the IPv4 policy: a destination (address, TCP port) in 8 bytes, one word to compare.
/// IPv4 and IPv6 have maps of their own so that an IPv4 packet neither builds nor compares a
/// key sized for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyV4 {
    /// As on the wire (network byte order).
    pub addr: [u8; 4],
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of the IPv6 policy: a destination (address, TCP port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyV6 {
    /// As on the wire (network byte order).
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

impl PolicyKeyV4 {
    pub const fn new(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

impl PolicyKeyV6 {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

/// Words of the bitmap of service ports: one bit for each TCP port that some service uses as
/// its front or backend port. The data path looks a packet's destination port up in it before
/// the policy, so that a packet to any other port costs one array load.
pub const PORT_WORDS: u32 = 65536 / 64;

/// The word of the service-port bitmap that holds `port`, and the port's bit in it.
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1 << (port & 63))
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

/// Entries in a bucket of a cache map.
pub const BUCKET_ENTRIES: usize = 4;

/// Buckets of each policy cache (a power of two); its hash map holds up to twice
/// `MAX_SERVICES` entries.
pub const POLICY_BUCKETS: u32 = 2048;
/// Buckets of each server cache (a power of two).
pub const SERVER_BUCKETS: u32 = 1024;

/// A bucket of a cache map: an `Array` copy of a hash map (policy or servers) that the programs
/// read without calling into the kernel. On this kind of machine a hash map lookup costs a
/// kernel function call, several times what the rest of the XDP program costs; an array lookup
/// is inlined by the verifier. The hash map stays the exact record: a key whose bucket has no
/// room for it is looked up there, which `overflow` says.
///
/// An entry whose value is zero (action 0, slot 0) is empty. Userspace changes a bucket so that
/// a reader that sees some bytes old and some new still finds every key that stays (see
/// relay's `datapath::cache`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket<E> {
    pub entries: [E; BUCKET_ENTRIES],
    /// Non-zero: the hash map may hold keys of this bucket that its entries do not.
    pub overflow: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntryV4 {
    pub key: PolicyKeyV4,
    pub policy: Policy,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntryV6 {
    pub key: PolicyKeyV6,
    pub policy: Policy,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerEntryV4 {
    pub addr: [u8; 4],
    /// Counter slot of the server's (first) service.
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerEntryV6 {
    pub addr: [u8; 16],
    pub slot: u32,
}

/// The bucket of (address, port) in an IPv4 policy cache.
pub const fn policy_bucket_v4(addr: &[u8; 4], port: u16) -> u32 {
    bucket(
        u32::from_ne_bytes(*addr) as u64 | (port as u64) << 32,
        POLICY_BUCKETS,
    )
}

/// The bucket of (address, port) in an IPv6 policy cache.
pub const fn policy_bucket_v6(addr: &[u8; 16], port: u16) -> u32 {
    bucket(fold_v6(addr) as u64 | (port as u64) << 32, POLICY_BUCKETS)
}

/// The bucket of an address in the IPv4 server cache.
pub const fn server_bucket_v4(addr: &[u8; 4]) -> u32 {
    bucket(u32::from_ne_bytes(*addr) as u64, SERVER_BUCKETS)
}

/// The bucket of an address in the IPv6 server cache.
pub const fn server_bucket_v6(addr: &[u8; 16]) -> u32 {
    bucket(fold_v6(addr) as u64, SERVER_BUCKETS)
}

/// An IPv6 address's four words XORed. Native-order words are what the eBPF program loads from
/// the packet, so both sides fold the same bytes alike (the eBPF target's byte order is the
/// host's: bpfel or bpfeb).
const fn fold_v6(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
        ^ u32::from_ne_bytes([a[4], a[5], a[6], a[7]])
        ^ u32::from_ne_bytes([a[8], a[9], a[10], a[11]])
        ^ u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

/// Fibonacci hashing: one multiplication, the top bits. Neighbouring addresses and ports, the
/// usual shape of a configuration, land far apart.
const fn bucket(x: u64, buckets: u32) -> u32 {
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - buckets.trailing_zeros())) as u32
}

/// Set in a protected server's value when only IPsec may reach it (`require = "esp"`): ESP, IKE
/// (UDP 500 and 4500) and the ICMP path MTU discovery needs pass, all else is dropped. The rest
/// of the value is the server's counter slot.
pub const SERVER_ESP_ONLY: u32 = 1 << 31;

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

/// What the kernel copy program has done with one socket's incoming bytes (`LEDGER`, keyed by
/// the socket's cookie). Only the program writes it; the worker creates it and reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyLedger {
    /// Payload bytes redirected to the peer socket.
    pub moved: u64,
    /// Payload bytes left with this socket for the worker to copy, while lagging.
    pub passed: u64,
    /// The allowance for which the program last asked the worker for more (0: not yet).
    pub asked_at: u64,
    /// 1 while the peer is behind: segments stay with this socket (charged to it, so TCP holds
    /// the sender back) and the worker copies them. The program goes back to moving them
    /// itself only once the worker has copied every byte it left (no byte can overtake an
    /// earlier one) and the allowance has room again.
    pub lagging: u32,
    /// 1 once the worker was told about this lag (or overrun).
    pub lag_told: u32,
    /// 1 once more bytes were left with the socket than its receive buffer can hold: they
    /// were not charged to it (see relay-ebpf's `copy.rs`), so the program drops from then on
    /// and the worker resets the connection.
    pub overrun: u32,
    pub _pad: u32,
}

/// What the worker lets the program do with one socket's bytes (`ALLOWANCE`). Only the worker
/// writes it, whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyAllowance {
    /// How many payload bytes the program may move from the socket in all.
    pub total: u64,
    /// How many of the bytes the program left with the socket the worker has copied.
    pub copied: u64,
    /// How many bytes beyond `copied` the program may leave with the socket: more than its
    /// receive buffer holds, so only bytes that escaped its charge reach it.
    pub pass_room: u64,
}

/// Bytes the kernel copy may move from one socket beyond what its peer socket has taken.
/// Redirected bytes wait in the peer's queue without being charged to anyone, so this is what
/// a peer that stops reading can make the kernel hold, per direction. Large enough that the
/// worker's top-up, asked for after a quarter of it, arrives in time at loopback speeds on a
/// busy machine (a window of 4 MiB ran out before the worker's answer came).
pub const COPY_WINDOW: u64 = 16 << 20;

/// The program asks for more once less than this is left of an allowance.
pub const COPY_ASK_BELOW: u64 = COPY_WINDOW / 4 * 3;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no implicit padding (explicit `_pad` fields).
    unsafe impl aya::Pod for super::PolicyKeyV4 {}
    unsafe impl aya::Pod for super::PolicyKeyV6 {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::PolicyEntryV4 {}
    unsafe impl aya::Pod for super::PolicyEntryV6 {}
    unsafe impl aya::Pod for super::ServerEntryV4 {}
    unsafe impl aya::Pod for super::ServerEntryV6 {}
    // SAFETY: four entries (sizes multiples of 4, alignment at most 4) then two u32s: no padding.
    unsafe impl aya::Pod for super::Bucket<super::PolicyEntryV4> {}
    unsafe impl aya::Pod for super::Bucket<super::PolicyEntryV6> {}
    unsafe impl aya::Pod for super::Bucket<super::ServerEntryV4> {}
    unsafe impl aya::Pod for super::Bucket<super::ServerEntryV6> {}
    unsafe impl aya::Pod for super::ServiceName {}
    // SAFETY: u64s, then u32s in pairs: no padding.
    unsafe impl aya::Pod for super::CopyLedger {}
    unsafe impl aya::Pod for super::CopyAllowance {}
}
