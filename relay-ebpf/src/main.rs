//! relay's data path, attached to each client-facing interface:
//!
//! - `relay_xdp` (XDP): drops every packet addressed to a protected (server, backend port), and
//!   every non-first fragment (IPv4 TCP; IPv6 any) addressed to a protected server, before the
//!   kernel allocates anything for it. It holds while the userspace relay is down: fail closed.
//!   A server marked `require = "esp"` gets only ESP, IKE and path MTU ICMP: everything else
//!   addressed to it is dropped.
//! - `relay_tc` (TC ingress, tcx): steers packets for (server, front port) to the relay's
//!   transparent listener with `bpf_sk_assign` and marks them, so that a policy routing rule
//!   delivers them locally instead of forwarding them. XDP cannot hand a packet to a local
//!   socket; TC can, without rewriting the packet, so the relay sees the client's original
//!   destination as its local address. With no listener (relay restarting), steered packets are
//!   dropped: the client retransmits its SYN and is served by the restarted relay.
//!
//! Both walk the headers with the same functions: Ethernet (up to two 802.1Q/802.1ad tags),
//! IPv4 (with options) or IPv6 (with up to six extension headers), then TCP. The walk yields
//! offsets, not copies: each program reads in place only the fields it needs (XDP the
//! destination address and port; TC also the source, for its socket lookup).
//!
//! Most packets on a client-facing interface belong to no service, so the XDP program is built
//! for them to cost a few loads: the destination port is first looked up in a bitmap of the
//! ports services use, and only a port in it leads to the policy of (address, port). No lookup
//! on the way calls into the kernel: the policy and the protected servers are read from caches
//! (`Array` maps of buckets, whose lookup the verifier inlines, as the bitmap's), and the hash
//! maps behind them, one per address family, are asked only for a key whose bucket overflowed.
//! A hash map lookup is a kernel function call; on the development VM (retpolines, AMD SRSO
//! "safe RET") one costs ~30 ns under `BPF_PROG_TEST_RUN`, where all the rest of the program
//! costs ~10. Every packet moves one per-CPU counter, per service slot.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple,
        xdp_action,
    },
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, SockMap},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use relay_common::{
    ACTION_DROP, ACTION_STEER, Bucket, COUNTER_DROPPED, COUNTER_MALFORMED, COUNTER_NO_LISTENER,
    COUNTER_PASSED, COUNTER_SLOTS, COUNTER_STEERED, COUNTERS, LISTENER_V4, LISTENER_V6,
    POLICY_BUCKETS, PORT_WORDS, Policy, PolicyEntryV4, PolicyEntryV6, PolicyKeyV4, PolicyKeyV6,
    SERVER_BUCKETS, SERVER_ESP_ONLY, STEER_MARK, ServerEntryV4, ServerEntryV6, ServiceName,
    counter_index, policy_bucket_v4, policy_bucket_v6, port_bit, server_bucket_v4,
    server_bucket_v6,
};

// The exact record of the policy and of the protected servers, per address family. The
// programs read them through the caches further down, and only where a cache bucket overflowed.

/// (IPv4 server, port) → what to do and which service counts it.
#[map]
static POLICY_V4: HashMap<PolicyKeyV4, Policy> = HashMap::with_max_entries(4096, 0);

/// (IPv6 server, port) → what to do and which service counts it.
#[map]
static POLICY_V6: HashMap<PolicyKeyV6, Policy> = HashMap::with_max_entries(4096, 0);

/// Protected IPv4 server addresses → counter slot: fragments carry no ports, so they are judged
/// by address alone.
#[map]
static SERVERS_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(2048, 0);

/// Protected IPv6 server addresses → counter slot.
#[map]
static SERVERS_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(2048, 0);

/// One bit per TCP port that a service uses as front or backend port (`port_bit`).
#[map]
static SERVICE_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// The caches of the four hash maps above (`Bucket`): what the programs read first.
#[map]
static POLICY_CACHE_V4: Array<Bucket<PolicyEntryV4>> = Array::with_max_entries(POLICY_BUCKETS, 0);
#[map]
static POLICY_CACHE_V6: Array<Bucket<PolicyEntryV6>> = Array::with_max_entries(POLICY_BUCKETS, 0);
#[map]
static SERVER_CACHE_V4: Array<Bucket<ServerEntryV4>> = Array::with_max_entries(SERVER_BUCKETS, 0);
#[map]
static SERVER_CACHE_V6: Array<Bucket<ServerEntryV6>> = Array::with_max_entries(SERVER_BUCKETS, 0);

#[map]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS * COUNTERS, 0);

/// The relay's transparent listeners (IPv4, IPv6).
#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

/// Slot → service name; written and read by userspace only (`relay status` with the relay down).
#[map]
static NAMES: Array<ServiceName> = Array::with_max_entries(COUNTER_SLOTS, 0);

const ETH_HLEN: usize = 14;
// Ethertypes as loaded from the packet (network byte order), so none needs swapping.
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
/// The fragment offset bits of IPv4's flags-and-offset field, as loaded.
const IPV4_FRAG_OFFSET: u16 = 0x1fffu16.to_be();
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_ICMPV6: u8 = 58;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// Header offsets beyond this are not parsed (keeps the verifier's offset ranges bounded).
const MAX_L4_OFFSET: usize = 512;
const MAX_IPV6_EXT_HEADERS: usize = 6;

// ---------------------------------------------------------------- reading the packet

/// The address of `len` bytes at `off` in the packet [data, end), if the packet holds them all.
#[inline(always)]
fn bytes(data: usize, end: usize, off: usize, len: usize) -> Option<usize> {
    let at = data + off;
    if at + len > end {
        return None;
    }
    Some(at)
}

/// The `T` at `at + off`.
///
/// # Safety
/// `[at + off, at + off + size_of::<T>())` lies within bytes that [`bytes`] returned.
#[inline(always)]
unsafe fn read<T: Copy>(at: usize, off: usize) -> T {
    // SAFETY: in bounds by the caller's contract; packets have no alignment to rely on.
    unsafe { ((at + off) as *const T).read_unaligned() }
}

/// The `T` at `off` in the packet, if the packet holds all of it.
#[inline(always)]
fn load<T: Copy>(data: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: `bytes` checked the whole `T`.
    bytes(data, end, off, mem::size_of::<T>()).map(|at| unsafe { read(at, 0) })
}

// ---------------------------------------------------------------- the header walk

/// The ethertype (as loaded) and offset of the network header, after Ethernet and up to two
/// VLAN tags (802.1ad outer, 802.1Q inner: QinQ); `None` if cut short.
#[inline(always)]
fn network_header(data: usize, end: usize) -> Option<(u16, usize)> {
    let vlan = |t: u16| t == ETH_P_8021Q || t == ETH_P_8021AD;
    let mut ethertype = load::<u16>(data, end, 12)?;
    let mut l3 = ETH_HLEN;
    if vlan(ethertype) {
        ethertype = load::<u16>(data, end, l3 + 2)?;
        l3 += 4;
        if vlan(ethertype) {
            ethertype = load::<u16>(data, end, l3 + 2)?;
            l3 += 4;
        }
    }
    Some((ethertype, l3))
}

/// What the walk found in an IP header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Cut short before the destination address.
    Cut,
    /// The destination address is readable; the rest is cut short or inconsistent.
    Malformed,
    /// A non-first fragment that may belong to a TCP segment: no ports to judge.
    Fragment,
    /// Not TCP (non-first IPv4 fragments of other protocols too): the protocol, its header
    /// at the offset returned beside (0 for a non-first fragment, which has none).
    Other(u8),
    /// TCP, its header at the offset returned beside.
    Tcp,
}

/// The IPv4 header at `l3`: what it carries and, for TCP, where the TCP header starts.
#[inline(always)]
fn walk_v4(data: usize, end: usize, l3: usize) -> (Kind, usize) {
    let Some(ip) = bytes(data, end, l3, IPV4_HLEN) else {
        return (Kind::Cut, 0);
    };
    // SAFETY: version/IHL, flags/fragment offset and protocol lie within the fixed header.
    let (vihl, frag, proto): (u8, u16, u8) = unsafe { (read(ip, 0), read(ip, 6), read(ip, 9)) };
    let ihl = (vihl & 0x0f) as usize * 4;
    if vihl >> 4 != 4 || ihl < IPV4_HLEN {
        return (Kind::Malformed, 0);
    }
    let tcp = proto == IPPROTO_TCP;
    if frag & IPV4_FRAG_OFFSET != 0 {
        return (
            if tcp {
                Kind::Fragment
            } else {
                Kind::Other(proto)
            },
            0,
        );
    }
    if !tcp {
        return (Kind::Other(proto), l3 + ihl);
    }
    // IP options end where IHL says; the TCP header follows.
    (Kind::Tcp, l3 + ihl)
}

/// The IPv6 header at `l3` and its extension headers: what they carry and, for TCP, where the
/// TCP header starts.
#[inline(always)]
fn walk_v6(data: usize, end: usize, l3: usize) -> (Kind, usize) {
    let Some(ip) = bytes(data, end, l3, IPV6_HLEN) else {
        return (Kind::Cut, 0);
    };
    // SAFETY: version and next header lie within the fixed header.
    let (version, mut next): (u8, u8) = unsafe { (read(ip, 0), read(ip, 6)) };
    if version >> 4 != 6 {
        return (Kind::Malformed, 0);
    }
    let mut off = l3 + IPV6_HLEN;
    let mut n = 0;
    while n < MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPPROTO_TCP => return (Kind::Tcp, off),
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let Some([following, units]) = load::<[u8; 2]>(data, end, off) else {
                    return (Kind::Malformed, 0);
                };
                next = following;
                (units as usize + 1) * 8
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let Some([following, units]) = load::<[u8; 2]>(data, end, off) else {
                    return (Kind::Malformed, 0);
                };
                next = following;
                (units as usize + 2) * 4
            }
            44 => {
                let Some(h) = bytes(data, end, off, 8) else {
                    return (Kind::Malformed, 0);
                };
                // SAFETY: next header and fragment offset lie within the 8 bytes checked.
                let (following, offset): (u8, [u8; 2]) = unsafe { (read(h, 0), read(h, 2)) };
                if u16::from_be_bytes(offset) & 0xfff8 != 0 {
                    // The next-header chain of a non-first fragment can hide TCP behind
                    // options, so any protocol counts.
                    return (Kind::Fragment, 0);
                }
                next = following;
                8
            }
            _ => return (Kind::Other(next), off),
        };
        off += len;
        if off > MAX_L4_OFFSET {
            return (Kind::Malformed, 0);
        }
        n += 1;
    }
    if next == IPPROTO_TCP {
        (Kind::Tcp, off)
    } else {
        // Too many extension headers to judge.
        (Kind::Malformed, 0)
    }
}

/// The TCP destination port (host byte order) of the TCP header at `l4`, if readable. The port
/// alone decides the policy: a segment whose ports are readable is judged on them even if the
/// rest of its header is cut short.
#[inline(always)]
fn dport(data: usize, end: usize, l4: usize) -> Option<u16> {
    if l4 > MAX_L4_OFFSET {
        return None;
    }
    // Both ports, as a segment with only half of them is no segment.
    let tcp = bytes(data, end, l4, 4)?;
    // SAFETY: the destination port lies within the 4 bytes checked.
    Some(u16::from_be(unsafe { read::<u16>(tcp, 2) }))
}

// ---------------------------------------------------------------- lookups

#[inline(always)]
fn bit_set(map: &Array<u64>, (word, bit): (u32, u64)) -> bool {
    map.get(word).is_some_and(|w| *w & bit != 0)
}

/// Whether any service uses `port` as front or backend port: if not, no policy applies.
#[inline(always)]
fn service_port(port: u16) -> bool {
    bit_set(&SERVICE_PORTS, port_bit(port))
}

/// What a cache says of a key: its entry's value, or `Err` if the hash map behind it must be
/// asked (the key's bucket overflowed).
#[inline(always)]
fn cached<E, V: Copy>(
    bucket: Option<&Bucket<E>>,
    value: impl Fn(&E) -> Option<V>,
) -> Result<Option<V>, ()> {
    // Every bucket exists (arrays are preallocated); `None` is the verifier's bounds check.
    let Some(bucket) = bucket else {
        return Err(());
    };
    for e in &bucket.entries {
        if let Some(v) = value(e) {
            return Ok(Some(v));
        }
    }
    if bucket.overflow != 0 {
        Err(())
    } else {
        Ok(None)
    }
}

#[inline(always)]
fn policy_v4(dst: [u8; 4], port: u16) -> Option<Policy> {
    if !service_port(port) {
        return None;
    }
    let key = PolicyKeyV4::new(dst, port);
    let bucket = POLICY_CACHE_V4.get(policy_bucket_v4(&dst, port));
    // An entry is empty while its action is 0.
    let found = cached(bucket, |e| {
        (e.policy.action != 0 && e.key == key).then_some(e.policy)
    });
    // SAFETY: the value is copied out before any map update could free it.
    found.unwrap_or_else(|()| unsafe { POLICY_V4.get(key).copied() })
}

#[inline(always)]
fn policy_v6(dst: &[u8; 16], port: u16) -> Option<Policy> {
    if !service_port(port) {
        return None;
    }
    let key = PolicyKeyV6::new(*dst, port);
    let bucket = POLICY_CACHE_V6.get(policy_bucket_v6(dst, port));
    let found = cached(bucket, |e| {
        (e.policy.action != 0 && e.key == key).then_some(e.policy)
    });
    // SAFETY: the value is copied out before any map update could free it.
    found.unwrap_or_else(|()| unsafe { POLICY_V6.get(key).copied() })
}

/// The counter slot of the protected IPv4 server `dst`, if it is one.
#[inline(always)]
fn server_v4(dst: &[u8; 4]) -> Option<u32> {
    let bucket = SERVER_CACHE_V4.get(server_bucket_v4(dst));
    // An entry is empty while its slot is 0.
    let found = cached(bucket, |e| {
        (e.slot != 0 && e.addr == *dst).then_some(e.slot)
    });
    // SAFETY: the value is copied out before any map update could free it.
    found.unwrap_or_else(|()| unsafe { SERVERS_V4.get(dst).copied() })
}

/// The counter slot of the protected IPv6 server `dst`, if it is one.
#[inline(always)]
fn server_v6(dst: &[u8; 16]) -> Option<u32> {
    let bucket = SERVER_CACHE_V6.get(server_bucket_v6(dst));
    let found = cached(bucket, |e| {
        (e.slot != 0 && e.addr == *dst).then_some(e.slot)
    });
    // SAFETY: the value is copied out before any map update could free it.
    found.unwrap_or_else(|()| unsafe { SERVERS_V6.get(dst).copied() })
}

#[inline(always)]
fn count(slot: u32, counter: u32) {
    if let Some(p) = COUNTERS_MAP.get_ptr_mut(counter_index(slot, counter)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

// ---------------------------------------------------------------- XDP: drop

#[inline(always)]
fn pass(slot: u32, counter: u32) -> u32 {
    count(slot, counter);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop_counted(slot: u32, counter: u32) -> u32 {
    count(slot, counter);
    xdp_action::XDP_DROP
}

/// A packet that heads for (server, port) with this policy.
#[inline(always)]
fn by_policy(p: Policy) -> u32 {
    if p.action == ACTION_DROP {
        drop_counted(p.slot, COUNTER_DROPPED)
    } else {
        // Steered flows are counted by the TC program, which steers them.
        xdp_action::XDP_PASS
    }
}

/// A packet without ports to judge it by, judged by the server it heads for (`server`, its
/// value in the servers map); `l4` is where a non-TCP protocol's header starts.
#[inline(always)]
fn by_server(kind: Kind, server: Option<u32>, data: usize, end: usize, l4: usize) -> u32 {
    if let Some(v) = server
        && v & SERVER_ESP_ONLY != 0
    {
        let slot = v & !SERVER_ESP_ONLY;
        let allowed = match kind {
            Kind::Other(proto) => ipsec_or_pmtu(proto, data, end, l4),
            _ => false,
        };
        return if allowed {
            pass(slot, COUNTER_PASSED)
        } else {
            drop_counted(slot, COUNTER_DROPPED)
        };
    }
    match (kind, server) {
        (Kind::Fragment, Some(slot)) => drop_counted(slot, COUNTER_DROPPED),
        (Kind::Fragment | Kind::Other(_), slot) => pass(slot.unwrap_or(0), COUNTER_PASSED),
        // What cannot be parsed cannot be proven harmless: drop it if it heads for a
        // protected server, let the kernel judge it otherwise.
        (Kind::Cut | Kind::Malformed | Kind::Tcp, Some(slot)) => {
            drop_counted(slot, COUNTER_MALFORMED)
        }
        (Kind::Cut | Kind::Malformed | Kind::Tcp, None) => pass(0, COUNTER_MALFORMED),
    }
}

/// What may reach a server that only IPsec may reach: ESP, IKE (UDP to 500 or 4500), and
/// the ICMP that path MTU discovery (and, for IPv6, neighbour discovery) needs.
#[inline(always)]
fn ipsec_or_pmtu(proto: u8, data: usize, end: usize, l4: usize) -> bool {
    if proto == IPPROTO_ESP {
        return true;
    }
    // A non-first fragment has no header to judge: only ESP's pass.
    if l4 == 0 || l4 > MAX_L4_OFFSET {
        return false;
    }
    match proto {
        // UDP's destination port sits where TCP's does.
        IPPROTO_UDP => matches!(dport(data, end, l4), Some(500 | 4500)),
        // Destination unreachable, fragmentation needed.
        IPPROTO_ICMP => load::<[u8; 2]>(data, end, l4) == Some([3, 4]),
        // Packet too big; router and neighbour solicitation and advertisement, redirect. Type
        // and code are read together: the verifier cannot bound a one-byte read here.
        IPPROTO_ICMPV6 => {
            load::<[u8; 2]>(data, end, l4).is_some_and(|[t, _]| t == 2 || (133..=137).contains(&t))
        }
        _ => false,
    }
}

/// A TCP segment no policy covers: passed, unless its server is one only IPsec may reach.
#[inline(always)]
fn no_policy(server: Option<u32>) -> u32 {
    match server {
        Some(v) if v & SERVER_ESP_ONLY != 0 => drop_counted(v & !SERVER_ESP_ONLY, COUNTER_DROPPED),
        v => pass(v.unwrap_or(0), COUNTER_PASSED),
    }
}

#[xdp]
pub fn relay_xdp(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    match network_header(data, end) {
        Some((ETH_P_IP, l3)) => xdp_v4(data, end, l3),
        Some((ETH_P_IPV6, l3)) => xdp_v6(data, end, l3),
        // No address, so no service to count it for.
        Some(_) => pass(0, COUNTER_PASSED),
        None => pass(0, COUNTER_MALFORMED),
    }
}

#[inline(always)]
fn xdp_v4(data: usize, end: usize, l3: usize) -> u32 {
    let (kind, l4) = walk_v4(data, end, l3);
    let Some(dst) = load::<[u8; 4]>(data, end, l3 + 16) else {
        return pass(0, COUNTER_MALFORMED);
    };
    if kind != Kind::Tcp {
        return by_server(kind, server_v4(&dst), data, end, l4);
    }
    let Some(port) = dport(data, end, l4) else {
        return by_server(Kind::Malformed, server_v4(&dst), data, end, 0);
    };
    match policy_v4(dst, port) {
        Some(p) => by_policy(p),
        None => no_policy(server_v4(&dst)),
    }
}

#[inline(always)]
fn xdp_v6(data: usize, end: usize, l3: usize) -> u32 {
    let (kind, l4) = walk_v6(data, end, l3);
    let Some(at) = bytes(data, end, l3 + 24, 16) else {
        return pass(0, COUNTER_MALFORMED);
    };
    // SAFETY: 16 bytes within the packet; a byte array needs no alignment. Read in place: the
    // server lookup takes its key straight from the packet.
    let dst: &[u8; 16] = unsafe { &*(at as *const [u8; 16]) };
    if kind != Kind::Tcp {
        return by_server(kind, server_v6(dst), data, end, l4);
    }
    let Some(port) = dport(data, end, l4) else {
        return by_server(Kind::Malformed, server_v6(dst), data, end, 0);
    };
    match policy_v6(dst, port) {
        Some(p) => by_policy(p),
        None => no_policy(server_v6(dst)),
    }
}

// ---------------------------------------------------------------- TC ingress: steer

#[classifier]
pub fn relay_tc(ctx: TcContext) -> i32 {
    if let Some(verdict) = tc_verdict(&ctx) {
        return verdict;
    }
    // Headers may sit outside the linear part of the skb: pull them in and look again.
    let len = if ctx.len() < 256 { ctx.len() } else { 256 };
    if ctx.pull_data(len).is_ok()
        && let Some(verdict) = tc_verdict(&ctx)
    {
        return verdict;
    }
    TC_ACT_OK
}

/// The verdict on a packet, or `None` if its headers are cut short (in the linear part).
#[inline(always)]
fn tc_verdict(ctx: &TcContext) -> Option<i32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let (ethertype, l3) = network_header(data, end)?;
    let v6 = match ethertype {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return Some(TC_ACT_OK),
    };
    let (kind, l4) = if v6 {
        walk_v6(data, end, l3)
    } else {
        walk_v4(data, end, l3)
    };
    match kind {
        Kind::Tcp => {}
        Kind::Cut | Kind::Malformed => return None,
        Kind::Fragment | Kind::Other(_) => return Some(TC_ACT_OK),
    }
    let port = dport(data, end, l4)?;
    let ip = bytes(data, end, l3, if v6 { IPV6_HLEN } else { IPV4_HLEN })?;
    let tcp = bytes(data, end, l4, 4)?;
    let policy = if v6 {
        // SAFETY: the destination address lies within the IPv6 header.
        policy_v6(unsafe { &*((ip + 24) as *const [u8; 16]) }, port)
    } else {
        // SAFETY: the destination address lies within the IPv4 header.
        policy_v4(unsafe { read(ip, 16) }, port)
    };
    let Some(p) = policy else {
        return Some(TC_ACT_OK);
    };
    match p.action {
        ACTION_STEER => {
            let syn_only = load::<u8>(data, end, l4 + 13).is_some_and(|f| f & 0x12 == 0x02);
            // SAFETY: bpf_sock_tuple is plain data; zero is a valid value.
            let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
            // SAFETY: addresses within the IP header, ports within the 4 TCP bytes checked.
            let tuple_len = unsafe {
                if v6 {
                    tuple.__bindgen_anon_1.ipv6.saddr = read(ip, 8);
                    tuple.__bindgen_anon_1.ipv6.daddr = read(ip, 24);
                    tuple.__bindgen_anon_1.ipv6.sport = read(tcp, 0);
                    tuple.__bindgen_anon_1.ipv6.dport = read(tcp, 2);
                    36u32
                } else {
                    tuple.__bindgen_anon_1.ipv4.saddr = read(ip, 12);
                    tuple.__bindgen_anon_1.ipv4.daddr = read(ip, 16);
                    tuple.__bindgen_anon_1.ipv4.sport = read(tcp, 0);
                    tuple.__bindgen_anon_1.ipv4.dport = read(tcp, 2);
                    12u32
                }
            };
            Some(steer(ctx, &mut tuple, tuple_len, v6, syn_only, p.slot))
        }
        // Defence in depth: should XDP be detached, the backend port still stays shut here.
        ACTION_DROP => {
            count(p.slot, COUNTER_DROPPED);
            Some(TC_ACT_SHOT)
        }
        _ => Some(TC_ACT_OK),
    }
}

#[inline(always)]
fn steer(
    ctx: &TcContext,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
    v6: bool,
    syn_only: bool,
    slot: u32,
) -> i32 {
    let skb = ctx.as_ptr();
    // 1. A segment of a connection the relay already has (or is accepting): its own socket.
    if !syn_only {
        // SAFETY: helper call with a valid tuple of the given length.
        let sk =
            unsafe { bpf_skc_lookup_tcp(skb, tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
        if !sk.is_null() {
            // SAFETY: non-null socket returned by the lookup; released below.
            let state = unsafe { (*sk).state };
            if state != BPF_TCP_LISTEN {
                // SAFETY: assigning and releasing the referenced socket.
                let r = unsafe { bpf_sk_assign(skb, sk.cast(), 0) };
                unsafe { bpf_sk_release(sk.cast()) };
                return assigned(ctx, r, slot);
            }
            // SAFETY: releasing the reference taken by the lookup.
            unsafe { bpf_sk_release(sk.cast()) };
        }
    }
    // 2. A new connection: the relay's transparent listener.
    let index: u32 = if v6 { LISTENER_V6 } else { LISTENER_V4 };
    // SAFETY: SOCKMAP lookup from a TC program returns a referenced socket or null.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(LISTENERS) as *mut c_void,
            core::ptr::addr_of!(index) as *const c_void,
        )
    } as *mut bpf_sock;
    if sk.is_null() {
        count(slot, COUNTER_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    // SAFETY: assigning and releasing the referenced socket.
    let r = unsafe { bpf_sk_assign(skb, sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    assigned(ctx, r, slot)
}

#[inline(always)]
fn assigned(ctx: &TcContext, result: i64, slot: u32) -> i32 {
    if result != 0 {
        debug!(ctx, "bpf_sk_assign failed: {}", result);
        count(slot, COUNTER_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    ctx.set_mark(STEER_MARK);
    count(slot, COUNTER_STEERED);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
