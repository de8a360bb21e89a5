//! relay's data path, attached to each client-facing interface:
//!
//! - `relay_xdp` (XDP): drops every packet addressed to a protected (server, backend port), and
//!   every non-first fragment (IPv4 TCP; IPv6 any) addressed to a protected server, before the
//!   kernel allocates anything for it. It holds while the userspace relay is down: fail closed.
//! - `relay_tc` (TC ingress, tcx): steers packets for (server, front port) to the relay's
//!   transparent listener with `bpf_sk_assign` and marks them, so that a policy routing rule
//!   delivers them locally instead of forwarding them. XDP cannot hand a packet to a local
//!   socket; TC can, without rewriting the packet, so the relay sees the client's original
//!   destination as its local address. With no listener (relay restarting), steered packets are
//!   dropped: the client retransmits its SYN and is served by the restarted relay.
//!
//! Both parse Ethernet (up to two 802.1Q/802.1ad tags), IPv4 (with options), IPv6 (with up to
//! six extension headers), and TCP, with one parser. Counters are per CPU, per service slot.
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
    ACTION_DROP, ACTION_STEER, Addr, COUNTER_DROPPED, COUNTER_MALFORMED, COUNTER_NO_LISTENER,
    COUNTER_PASSED, COUNTER_SLOTS, COUNTER_STEERED, COUNTERS, LISTENER_V4, LISTENER_V6, Policy,
    PolicyKey, STEER_MARK, ServiceName, counter_index,
};

/// (server, port) → what to do and which service counts it.
#[map]
static POLICY: HashMap<PolicyKey, Policy> = HashMap::with_max_entries(4096, 0);

/// Protected server addresses → counter slot: fragments carry no ports, so they are judged by
/// address alone.
#[map]
static SERVERS: HashMap<Addr, u32> = HashMap::with_max_entries(2048, 0);

#[map]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS * COUNTERS, 0);

/// The relay's transparent listeners (IPv4, IPv6).
#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

/// Slot → service name; written and read by userspace only (`relay status` with the relay down).
#[map]
static NAMES: Array<ServiceName> = Array::with_max_entries(COUNTER_SLOTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// Header offsets beyond this are not parsed (keeps the verifier's offset ranges bounded).
const MAX_L4_OFFSET: usize = 512;
const MAX_IPV6_EXT_HEADERS: usize = 6;

#[inline(always)]
fn count(slot: u32, counter: u32) {
    if let Some(p) = COUNTERS_MAP.get_ptr_mut(counter_index(slot, counter)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// The counter slot of a protected server address, if it is one.
#[inline(always)]
fn protected(addr: &Addr) -> Option<u32> {
    // SAFETY: the value is copied out before any map update could free it.
    unsafe { SERVERS.get(addr).copied() }
}

/// A TCP segment's identity, as far as steering needs it.
#[derive(Clone, Copy)]
struct Flow {
    dst: Addr,
    /// Source and destination as network-order words, for `bpf_sock_tuple`.
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport_be: u16,
    dport_be: u16,
    dport: u16,
    syn_only: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    NotIp,
    /// Headers cut short or inconsistent.
    Malformed,
    /// A non-first fragment: no ports to judge.
    Fragment,
    /// Not TCP.
    Other,
    Tcp,
}

/// What the parser found. A plain struct, every field always initialised, rather than an enum
/// with payloads: moving such an enum copies undefined padding bytes, which the verifier
/// rejects as reads of uninitialised registers.
#[derive(Clone, Copy)]
struct Parsed {
    kind: Kind,
    /// `flow.dst` was readable (always true for `Fragment`, `Other`, `Tcp`).
    dst_known: bool,
    /// For a fragment: it may belong to a TCP segment.
    tcp: bool,
    flow: Flow,
}

impl Parsed {
    const fn new(kind: Kind) -> Self {
        Parsed {
            kind,
            dst_known: false,
            tcp: false,
            flow: Flow {
                dst: Addr::v4([0; 4]),
                saddr: [0; 4],
                daddr: [0; 4],
                sport_be: 0,
                dport_be: 0,
                dport: 0,
                syn_only: false,
            },
        }
    }

    #[inline(always)]
    fn with_dst(kind: Kind, dst: Addr) -> Self {
        let mut p = Self::new(kind);
        p.dst_known = true;
        p.flow.dst = dst;
        p
    }
}

/// Bounds-checked pointer to a `T` at `offset` in [data, data_end).
#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    let start = data + offset;
    if start + mem::size_of::<T>() > data_end {
        return None;
    }
    Some(start as *const T)
}

#[inline(always)]
fn read<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies within the packet.
    ptr_at::<T>(data, data_end, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn parse(data: usize, data_end: usize) -> Parsed {
    let Some(mut ethertype) = read::<[u8; 2]>(data, data_end, 12).map(u16::from_be_bytes) else {
        return Parsed::new(Kind::Malformed);
    };
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner): QinQ.
    let mut tags = 0;
    while tags < 2 && (ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD) {
        let Some(inner) = read::<[u8; 2]>(data, data_end, l3 + 2).map(u16::from_be_bytes) else {
            return Parsed::new(Kind::Malformed);
        };
        ethertype = inner;
        l3 += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_v4(data, data_end, l3),
        ETH_P_IPV6 => parse_v6(data, data_end, l3),
        _ => Parsed::new(Kind::NotIp),
    }
}

#[inline(always)]
fn parse_v4(data: usize, data_end: usize, l3: usize) -> Parsed {
    let Some(ip) = read::<[u8; 20]>(data, data_end, l3) else {
        return Parsed::new(Kind::Malformed);
    };
    let dst = Addr::v4([ip[16], ip[17], ip[18], ip[19]]);
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Parsed::with_dst(Kind::Malformed, dst);
    }
    let tcp = ip[9] == IPPROTO_TCP;
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if frag_offset != 0 {
        let mut p = Parsed::with_dst(Kind::Fragment, dst);
        p.tcp = tcp;
        return p;
    }
    if !tcp {
        return Parsed::with_dst(Kind::Other, dst);
    }
    let mut p = Parsed::with_dst(Kind::Tcp, dst);
    p.flow.saddr[0] = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    p.flow.daddr[0] = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // IP options end where IHL says; the TCP header must follow within the packet.
    if !read_ports(data, data_end, l3 + ihl, &mut p.flow) {
        p.kind = Kind::Malformed;
    }
    p
}

#[inline(always)]
fn parse_v6(data: usize, data_end: usize, l3: usize) -> Parsed {
    let Some(ip) = read::<[u8; IPV6_HLEN]>(data, data_end, l3) else {
        return Parsed::new(Kind::Malformed);
    };
    let mut dst_bytes = [0u8; 16];
    dst_bytes.copy_from_slice(&ip[24..40]);
    let dst = Addr::v6(dst_bytes);
    if ip[0] >> 4 != 6 {
        return Parsed::with_dst(Kind::Malformed, dst);
    }
    let mut next = ip[6];
    let mut off = l3 + IPV6_HLEN;
    let mut n = 0;
    while n < MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let Some(h) = read::<[u8; 2]>(data, data_end, off) else {
                    return Parsed::with_dst(Kind::Malformed, dst);
                };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let Some(h) = read::<[u8; 2]>(data, data_end, off) else {
                    return Parsed::with_dst(Kind::Malformed, dst);
                };
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            44 => {
                let Some(h) = read::<[u8; 8]>(data, data_end, off) else {
                    return Parsed::with_dst(Kind::Malformed, dst);
                };
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    // The next-header chain of a non-first fragment can hide TCP behind
                    // options, so any protocol counts.
                    let mut p = Parsed::with_dst(Kind::Fragment, dst);
                    p.tcp = true;
                    return p;
                }
                next = h[0];
                off += 8;
            }
            _ => return Parsed::with_dst(Kind::Other, dst),
        }
        if off > MAX_L4_OFFSET {
            return Parsed::with_dst(Kind::Malformed, dst);
        }
        n += 1;
    }
    if next != IPPROTO_TCP {
        // Too many extension headers to judge.
        return Parsed::with_dst(Kind::Malformed, dst);
    }
    let mut p = Parsed::with_dst(Kind::Tcp, dst);
    let mut i = 0;
    while i < 4 {
        let s = 8 + i * 4;
        let d = 24 + i * 4;
        p.flow.saddr[i] = u32::from_ne_bytes([ip[s], ip[s + 1], ip[s + 2], ip[s + 3]]);
        p.flow.daddr[i] = u32::from_ne_bytes([ip[d], ip[d + 1], ip[d + 2], ip[d + 3]]);
        i += 1;
    }
    if !read_ports(data, data_end, off, &mut p.flow) {
        p.kind = Kind::Malformed;
    }
    p
}

/// Reads ports (and, when present, flags) of the TCP header at `off`. The ports alone decide
/// the policy: a segment whose ports are readable is judged on them even if the rest of its
/// header is cut short.
#[inline(always)]
fn read_ports(data: usize, data_end: usize, off: usize, flow: &mut Flow) -> bool {
    if off > MAX_L4_OFFSET {
        return false;
    }
    let Some(ports) = read::<[u8; 4]>(data, data_end, off) else {
        return false;
    };
    flow.sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    flow.dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    flow.dport = u16::from_be_bytes([ports[2], ports[3]]);
    if let Some(flags) = read::<u8>(data, data_end, off + 13) {
        flow.syn_only = flags & 0x12 == 0x02; // SYN without ACK
    }
    true
}

#[inline(always)]
fn policy(flow: &Flow) -> Option<Policy> {
    // SAFETY: the value is copied out at once.
    unsafe { POLICY.get(&PolicyKey::new(flow.dst, flow.dport)).copied() }
}

/// The counter slot of the packet's destination if it is a protected server.
#[inline(always)]
fn server_slot(p: &Parsed) -> Option<u32> {
    if p.dst_known {
        protected(&p.flow.dst)
    } else {
        None
    }
}

// ---------------------------------------------------------------- XDP: drop

#[xdp]
pub fn relay_xdp(ctx: XdpContext) -> u32 {
    let p = parse(ctx.data(), ctx.data_end());
    match p.kind {
        Kind::Tcp => match policy(&p.flow) {
            Some(pol) if pol.action == ACTION_DROP => {
                count(pol.slot, COUNTER_DROPPED);
                xdp_action::XDP_DROP
            }
            // Steered flows are counted by the TC program, which steers them.
            Some(_) => xdp_action::XDP_PASS,
            None => {
                count(server_slot(&p).unwrap_or(0), COUNTER_PASSED);
                xdp_action::XDP_PASS
            }
        },
        Kind::Fragment => match server_slot(&p) {
            Some(slot) if p.tcp => {
                count(slot, COUNTER_DROPPED);
                xdp_action::XDP_DROP
            }
            slot => {
                count(slot.unwrap_or(0), COUNTER_PASSED);
                xdp_action::XDP_PASS
            }
        },
        // What cannot be parsed cannot be proven harmless: drop it if it heads for a
        // protected server, let the kernel judge it otherwise.
        Kind::Malformed => match server_slot(&p) {
            Some(slot) => {
                count(slot, COUNTER_MALFORMED);
                xdp_action::XDP_DROP
            }
            None => {
                count(0, COUNTER_MALFORMED);
                xdp_action::XDP_PASS
            }
        },
        Kind::Other | Kind::NotIp => {
            count(server_slot(&p).unwrap_or(0), COUNTER_PASSED);
            xdp_action::XDP_PASS
        }
    }
}

// ---------------------------------------------------------------- TC ingress: steer

#[classifier]
pub fn relay_tc(ctx: TcContext) -> i32 {
    let mut parsed = parse(ctx.data(), ctx.data_end());
    if parsed.kind == Kind::Malformed {
        // Headers may sit outside the linear part of the skb: pull them in and look again.
        let len = if ctx.len() < 256 { ctx.len() } else { 256 };
        if ctx.pull_data(len).is_ok() {
            parsed = parse(ctx.data(), ctx.data_end());
        }
    }
    if parsed.kind != Kind::Tcp {
        return TC_ACT_OK;
    }
    let flow = parsed.flow;
    match policy(&flow) {
        Some(p) if p.action == ACTION_STEER => steer(&ctx, &flow, p.slot),
        // Defence in depth: should XDP be detached, the backend port still stays shut here.
        Some(p) if p.action == ACTION_DROP => {
            count(p.slot, COUNTER_DROPPED);
            TC_ACT_SHOT
        }
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn steer(ctx: &TcContext, flow: &Flow, slot: u32) -> i32 {
    let v6 = flow.dst.family == relay_common::FAMILY_V6;
    // SAFETY: bpf_sock_tuple is plain data; zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let tuple_len = if v6 {
        tuple.__bindgen_anon_1.ipv6.saddr = flow.saddr;
        tuple.__bindgen_anon_1.ipv6.daddr = flow.daddr;
        tuple.__bindgen_anon_1.ipv6.sport = flow.sport_be;
        tuple.__bindgen_anon_1.ipv6.dport = flow.dport_be;
        36u32
    } else {
        tuple.__bindgen_anon_1.ipv4.saddr = flow.saddr[0];
        tuple.__bindgen_anon_1.ipv4.daddr = flow.daddr[0];
        tuple.__bindgen_anon_1.ipv4.sport = flow.sport_be;
        tuple.__bindgen_anon_1.ipv4.dport = flow.dport_be;
        12u32
    };
    let skb = ctx.as_ptr();
    // 1. A segment of a connection the relay already has (or is accepting): its own socket.
    if !flow.syn_only {
        // SAFETY: helper call with a valid tuple of the given length.
        let sk = unsafe {
            bpf_skc_lookup_tcp(skb, &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0)
        };
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
