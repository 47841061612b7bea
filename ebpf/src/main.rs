//! The enforcement program: a direct-action filter at clsact ingress of every pod's host-side veth (that is,
//! the pod's egress). It passes a packet only if its source is the pod's own address (or, in pool mode, inside
//! the pod's pool) and it carries no tunnel (whose inner source a decapsulating node would trust unchecked),
//! lets through the neighbour discovery a host sends but not what only routers send, and drops everything
//! else, VLAN-tagged frames included, counting why.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]
#![expect(unsafe_code, reason = "eBPF: reading the skb and map values is unsafe by construction")]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use poolwarden_ebpf_common::{
    ARRAY_ENDPOINTS, DEFAULT_DECAP_PORTS, DROP_REPORTS_PER_SECOND, DropEvent, Endpoint, HAS_IPV4, HAS_IPV6, POOL_MODE,
    POOL_NAME_LEN, POOL_SLOTS, PRESENT, TUNNEL_PROTOCOLS, counter_index, reason,
};

/// ifindex of the host-side veth -> the pod it belongs to, for indexes below [`ARRAY_ENDPOINTS`]. Pinned by
/// name, so a restarted agent (and the program instances still attached from before) share it.
#[map]
static ENDPOINTS: Array<Endpoint> = Array::pinned(ARRAY_ENDPOINTS, 0);

/// The same for the (rare) higher indexes; allocated as used (BPF_F_NO_PREALLOC).
#[map]
static ENDPOINTS_HIGH: HashMap<u32, Endpoint> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Packets per (pool slot, reason), per CPU: an array, so counting is a bounds check and an add.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(POOL_SLOTS * reason::COUNT, 0);

/// UDP destination port -> non-zero when something on the node (or a peer) decapsulates what arrives there:
/// the defaults and every VXLAN/GENEVE device's port, written by the agent. The record that outlives the
/// agent (and `poolwarden enforcement status` reads); the program itself reads [`DECAP`].
#[map]
static DECAP_PORTS: Array<u8> = Array::pinned(65_536, 0);

/// The same ports for this program instance: global data (the value of a one-entry array map, which the
/// program addresses directly, so a packet's port costs one load, not a map lookup), with the defaults
/// compiled in. The agent that loaded the instance writes every port it blocks here as well as in
/// [`DECAP_PORTS`], those an earlier agent pinned included, before attaching it anywhere.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.decap_ports")]
static mut DECAP: [u8; 65_536] = decap_defaults();

const fn decap_defaults() -> [u8; 65_536] {
    let mut ports = [0; 65_536];
    let mut i = 0;
    while i < DEFAULT_DECAP_PORTS.len() {
        ports[DEFAULT_DECAP_PORTS[i] as usize] = 1;
        i += 1;
    }
    ports
}

/// Counter slot -> the pool's name (NUL-padded), written by the agent and read by whoever reports the
/// counters (`poolwarden enforcement status` too, with the agent down). The program never reads it.
#[map]
static POOL_NAMES: Array<[u8; POOL_NAME_LEN]> = Array::pinned(POOL_SLOTS, 0);

/// Drop reports for the agent's log, shared (pinned) by every program instance.
#[map]
static DROPS: RingBuf = RingBuf::pinned(64 * 1024, 0);

/// Per CPU: the start of the current one-second window and the reports sent in it.
#[map]
static REPORT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;
const ICMPV6_LISTENER_REPORT: u8 = 131;
const ICMPV6_LISTENER_DONE: u8 = 132;
const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const ICMPV6_LISTENER_REPORT_V2: u8 = 143;

/// The verdict for a pod's packet, counting drops (per pool and reason); what the agent attaches by default.
#[classifier]
pub fn enforce(ctx: TcContext) -> i32 {
    decide::<false>(ctx)
}

/// The same verdict, counting passed packets too (per pool): what the agent attaches with
/// `--count-passed-packets`. A program of its own, so that the default one does not even test whether to
/// count: counting makes the check of an allowed packet about a third dearer, and the test alone costs.
#[classifier]
pub fn enforce_counting(ctx: TcContext) -> i32 {
    decide::<true>(ctx)
}

#[inline(always)]
fn decide<const COUNT_PASSES: bool>(ctx: TcContext) -> i32 {
    // The interface the packet arrived on, which the kernel records (`skb_iif`) before the ingress hook runs:
    // one load, where `ifindex` reads it through the skb's device (two, one after the other).
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // The entry's flags are tested once for the common case (present, with IPv4), and for presence only
    // when that does not decide.
    let verdict = match entry_of(ifindex) {
        Some(endpoint) => match common(&ctx, endpoint) {
            // Straight out: the common case shares no code with the others' ending.
            Some(reason::PASSED) => {
                if COUNT_PASSES {
                    count(endpoint.pool_id, reason::PASSED);
                }
                return TC_ACT_UNSPEC;
            }
            Some(verdict) => Ok((endpoint, verdict)),
            None if endpoint.flags & PRESENT == 0 => Err(()),
            None => Ok((endpoint, check(&ctx, endpoint).unwrap_or(reason::OTHER))),
        },
        None => Err(()),
    };
    let Ok((endpoint, verdict)) = verdict else {
        report(&ctx, ifindex, 0, reason::NO_ENDPOINT);
        return drop(0, reason::NO_ENDPOINT);
    };
    if verdict == reason::PASSED {
        if COUNT_PASSES {
            count(endpoint.pool_id, reason::PASSED);
        }
        // UNSPEC, not OK: other TC programs on the interface still run.
        TC_ACT_UNSPEC
    } else {
        report(&ctx, ifindex, endpoint.pool_id, verdict);
        drop(endpoint.pool_id, verdict)
    }
}

/// The pod whose host-side veth has index `ifindex`.
#[inline(always)]
fn endpoint_of(ifindex: u32) -> Option<&'static Endpoint> {
    entry_of(ifindex).filter(|e| e.flags & PRESENT != 0)
}

/// The entry of index `ifindex`, present or not (array slots exist for every index below
/// [`ARRAY_ENDPOINTS`]).
#[inline(always)]
fn entry_of(ifindex: u32) -> Option<&'static Endpoint> {
    if ifindex < ARRAY_ENDPOINTS { ENDPOINTS.get(ifindex) } else { high_entry(ifindex) }
}

/// The entry of an index past the array's, in a function of its own (a BPF-to-BPF call, on this rare path
/// only): inlined, LLVM may merge its lookup with the array's into one helper call whose map is known only at
/// run time, which the verifier cannot turn into the array's bounds check and load, so every packet would pay
/// a real call.
#[inline(never)]
fn high_entry(ifindex: u32) -> Option<&'static Endpoint> {
    unsafe { ENDPOINTS_HIGH.get(&ifindex) }
}

/// Tell the agent about a drop, at most [`DROP_REPORTS_PER_SECOND`] per CPU, so a flood of spoofed
/// packets cannot flood the agent or its log (the counters still count every packet).
#[inline(always)]
fn report(ctx: &TcContext, ifindex: u32, pool_id: u32, why: u32) {
    let Some(budget) = REPORT_BUDGET.get_ptr_mut(0) else { return };
    let now = unsafe { bpf_ktime_get_ns() };
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget[0]) > 1_000_000_000 {
        budget[0] = now;
        budget[1] = 0;
    }
    if budget[1] >= DROP_REPORTS_PER_SECOND {
        return;
    }
    budget[1] += 1;
    let mut event = DropEvent { ifindex, reason: why, pool_id, family: 0, source: [0; 16] };
    match read::<u16>(ctx, 12).map(u16::from_be) {
        Ok(ETH_P_IP) => {
            if let Ok(source) = read::<[u8; 4]>(ctx, ETH_HLEN + 12) {
                event.family = 4;
                event.source[..4].copy_from_slice(&source);
            }
        }
        Ok(ETH_P_IPV6) => {
            if let Ok(source) = read::<[u8; 16]>(ctx, ETH_HLEN + 8) {
                event.family = 6;
                event.source = source;
            }
        }
        Ok(ETH_P_ARP) => {
            if let Ok(source) = read::<[u8; 4]>(ctx, ETH_HLEN + 14) {
                event.family = 4;
                event.source[..4].copy_from_slice(&source);
            }
        }
        _ => {}
    }
    let _ = DROPS.output::<DropEvent>(&event, 0);
}

/// A program that passes everything: the baseline the benchmark measures against.
#[classifier]
pub fn pass(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// The least any check of a pod's source by one program shared by every pod costs: its endpoint's entry and
/// one comparison of an IPv4 source with its address (nothing counted, nothing else checked). The benchmark
/// measures it beside [`enforce`] and [`pass`]; it is never attached.
#[classifier]
pub fn floor(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let Some(endpoint) = endpoint_of(ifindex) else { return TC_ACT_SHOT as i32 };
    let start = ctx.data();
    if start + ETH_HLEN + 20 <= ctx.data_end() {
        // SAFETY: within the 34 bytes checked just above.
        if unsafe { load::<4, { ETH_HLEN + 12 }>(start) } == u64::from(u32::from_ne_bytes(endpoint.ipv4)) {
            return TC_ACT_UNSPEC;
        }
    }
    TC_ACT_SHOT as i32
}

#[inline(always)]
fn drop(pool_id: u32, why: u32) -> i32 {
    count(pool_id, why);
    TC_ACT_SHOT as i32
}

#[inline(always)]
fn count(pool_id: u32, why: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(counter_index(pool_id, why)) {
        // Per-CPU: no other CPU writes this slot, so a plain increment is exact.
        unsafe { *counter += 1 };
    }
}

/// A pointer to a `T` at `offset` in the packet, if the packet is that long (direct packet access: no
/// helper call per read).
#[inline(always)]
fn at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, i64> {
    let needed = offset + core::mem::size_of::<T>();
    if ctx.data() + needed > ctx.data_end() {
        // Headers not in the linear part of the skb (rare): pull them in once, then look again.
        ctx.pull_data(needed as u32)?;
        if ctx.data() + needed > ctx.data_end() {
            return Err(-1);
        }
    }
    Ok((ctx.data() + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, i64> {
    at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// One load of `SIZE` (1, 2 or 4) bytes at `start + OFFSET` in the packet, zero-extended to 64 bits: the BPF
/// instruction itself, with the offset in it. The instruction has no alignment requirement where the CPU has
/// none (the verifier checks), but a Rust read of a `u32` does, and an unaligned one is split by LLVM into four
/// byte loads; and a 64-bit result needs no zero extension before a comparison.
///
/// SAFETY: `start + OFFSET .. start + OFFSET + SIZE` must be within the packet (checked against its end).
#[inline(always)]
unsafe fn load<const SIZE: usize, const OFFSET: usize>(start: usize) -> u64 {
    let value: u64;
    // SAFETY: a read of bytes the caller checked, with no other effect.
    unsafe {
        match SIZE {
            1 => core::arch::asm!("{v} = *(u8 *)({p} + {o})", p = in(reg) start, o = const OFFSET,
                v = lateout(reg) value, options(pure, readonly, nostack, preserves_flags)),
            2 => core::arch::asm!("{v} = *(u16 *)({p} + {o})", p = in(reg) start, o = const OFFSET,
                v = lateout(reg) value, options(pure, readonly, nostack, preserves_flags)),
            _ => core::arch::asm!("{v} = *(u32 *)({p} + {o})", p = in(reg) start, o = const OFFSET,
                v = lateout(reg) value, options(pure, readonly, nostack, preserves_flags)),
        }
    };
    value
}

/// The verdict for the common case, in one bounds check and a few loads. For a present entry with IPv4, an
/// untagged Ethernet frame with IPv4 without options whose source is not the pod's (nor, in pool mode, in its
/// pool) is spoofed; from it, one that is not a later fragment and carries TCP, or UDP to a port nothing
/// decapsulates, passes. `None` for anything else: [`check`] decides, from the start (ARP, IPv6, fragments,
/// options, ICMP, tunnels...). Everything it decides, `check` would decide the same way.
#[inline(always)]
fn common(ctx: &TcContext, endpoint: &Endpoint) -> Option<u32> {
    let start = ctx.data();
    if start + ETH_HLEN + 24 > ctx.data_end() || endpoint.flags & (PRESENT | HAS_IPV4) != PRESENT | HAS_IPV4 {
        return None;
    }
    // The kernel takes one 802.1Q/802.1ad tag off before this hook and keeps it in the skb: see `check`.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return None;
    }
    // SAFETY (every load below): within the 38 bytes checked above.
    // Ethertype, version and header length in one word.
    let head = unsafe { load::<4, 12>(start) };
    if head & u64::from(u32::from_ne_bytes([0xff, 0xff, 0xff, 0]))
        != u64::from(u32::from_ne_bytes([0x08, 0x00, 0x45, 0]))
    {
        return None;
    }
    let source = unsafe { load::<4, { ETH_HLEN + 12 }>(start) };
    if source != u64::from(u32::from_ne_bytes(endpoint.ipv4))
        && (endpoint.flags & POOL_MODE == 0
            || source & u64::from(u32::from_ne_bytes(endpoint.pool_ipv4_mask))
                != u64::from(u32::from_ne_bytes(endpoint.pool_ipv4)))
    {
        return Some(reason::SPOOFED_IPV4);
    }
    // Flags with the fragment offset, TTL and protocol in one word, masked to the offset and the protocol: no
    // offset (so the transport header follows) and TCP, or UDP to a port nothing decapsulates.
    match unsafe { load::<4, { ETH_HLEN + 6 }>(start) } & OFFSET_AND_PROTOCOL {
        TCP_UNFRAGMENTED => Some(reason::PASSED),
        UDP_UNFRAGMENTED if !decapsulated_at(u16::from_be(unsafe { load::<2, { ETH_HLEN + 22 }>(start) } as u16)) => {
            Some(reason::PASSED)
        }
        _ => None,
    }
}

/// The fragment offset and the protocol in the IPv4 header's word of flags, offset, TTL and protocol. Widened
/// with its sign, so that on a little-endian machine it fits an instruction's immediate (which the machine
/// widens that way): the loaded word's upper half is zero either way.
const OFFSET_AND_PROTOCOL: u64 = u32::from_ne_bytes([0x1f, 0xff, 0, 0xff]) as i32 as i64 as u64;
/// That word, masked, for TCP and no fragment offset.
const TCP_UNFRAGMENTED: u64 = u32::from_ne_bytes([0, 0, 0, IPPROTO_TCP]) as u64;
/// The same for UDP.
const UDP_UNFRAGMENTED: u64 = u32::from_ne_bytes([0, 0, 0, IPPROTO_UDP]) as u64;

/// Read a `T` at an offset the verifier only knows a range of: the pointer is made once and checked against
/// the packet's end itself (so the verifier ties the check to the access), with the load helper for headers
/// outside the linear part.
#[inline(always)]
fn read_variable<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, i64> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return ctx.load(offset);
    }
    Ok(unsafe { core::ptr::read_unaligned(start as *const T) })
}

#[inline(always)]
fn in_prefix<const N: usize>(address: &[u8; N], network: &[u8; N], mask: &[u8; N]) -> bool {
    let mut i = 0;
    while i < N {
        if address[i] & mask[i] != network[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn check(ctx: &TcContext, endpoint: &Endpoint) -> Result<u32, i64> {
    // The kernel takes one 802.1Q/802.1ad tag off before this hook and keeps it in the skb (VID 0 included):
    // a frame the pod tagged is judged by that, not by the inner header that is left.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Ok(reason::VLAN);
    }
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => check_ipv4(ctx, endpoint),
        ETH_P_IPV6 => check_ipv6(ctx, endpoint),
        ETH_P_ARP => {
            // Ethernet/IPv4 ARP: the sender protocol address is 14 bytes into the ARP header.
            let sender: [u8; 4] = read(ctx, ETH_HLEN + 14)?;
            Ok(if endpoint.flags & HAS_IPV4 != 0 && sender == endpoint.ipv4 {
                reason::PASSED
            } else {
                reason::SPOOFED_ARP
            })
        }
        ETH_P_8021Q | ETH_P_8021AD => Ok(reason::VLAN),
        _ => Ok(reason::OTHER),
    }
}

#[inline(always)]
fn check_ipv4(ctx: &TcContext, endpoint: &Endpoint) -> Result<u32, i64> {
    if endpoint.flags & HAS_IPV4 == 0 {
        return Ok(reason::NO_IPV4);
    }
    // The fixed header in one read (one bounds check).
    let header: [u8; 20] = read(ctx, ETH_HLEN)?;
    let header_length = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_length < 20 {
        return Ok(reason::OTHER);
    }
    let source = [header[12], header[13], header[14], header[15]];
    let own = source == endpoint.ipv4;
    let pooled = endpoint.flags & POOL_MODE != 0 && in_prefix(&source, &endpoint.pool_ipv4, &endpoint.pool_ipv4_mask);
    if !own && !pooled {
        return Ok(reason::SPOOFED_IPV4);
    }
    // A fragment after the first carries no transport header: the first one's verdict decides (the kernel
    // reassembles nothing without it, and drops overlapping fragments).
    if u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
        return Ok(reason::PASSED);
    }
    carried(ctx, header[9], ETH_HLEN + header_length)
}

/// What an IP packet from an allowed source carries: tunnels are dropped, anything else passes.
#[inline(always)]
fn carried(ctx: &TcContext, protocol: u8, transport: usize) -> Result<u32, i64> {
    if protocol == IPPROTO_TCP {
        return Ok(reason::PASSED);
    }
    if TUNNEL_PROTOCOLS.contains(&protocol) {
        return Ok(reason::ENCAPSULATED);
    }
    if protocol == IPPROTO_UDP && decapsulated_at(u16::from_be(read_variable::<u16>(ctx, transport + 2)?)) {
        return Ok(reason::ENCAPSULATED);
    }
    Ok(reason::PASSED)
}

/// Whether something on the node (or a peer) decapsulates what arrives at UDP port `port`.
#[inline(always)]
fn decapsulated_at(port: u16) -> bool {
    // SAFETY: a read within the array (a u16 index); volatile, as the agent writes it after the build.
    unsafe { core::ptr::read_volatile(&raw const DECAP[usize::from(port)]) != 0 }
}

/// How many IPv6 extension headers the program follows before giving up (and dropping: no pod needs more).
const MAX_EXTENSION_HEADERS: usize = 6;

#[inline(always)]
fn check_ipv6(ctx: &TcContext, endpoint: &Endpoint) -> Result<u32, i64> {
    if endpoint.flags & HAS_IPV6 == 0 {
        // Router and neighbour discovery included: a pod without IPv6 has no business on it.
        return Ok(reason::NO_IPV6);
    }
    // Version to source address in one read (one bounds check).
    let header: [u8; 24] = read(ctx, ETH_HLEN)?;
    if header[0] >> 4 != 6 {
        return Ok(reason::OTHER);
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&header[8..24]);
    // Walk the extension headers to the transport header (offsets are variable: loaded through the helper).
    let mut next_header = header[6];
    let mut offset = ETH_HLEN + 40;
    let mut later_fragment = false;
    let mut done = false;
    // One more round than headers followed: the last must find the transport header.
    for _ in 0..=MAX_EXTENSION_HEADERS {
        match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let header: [u8; 2] = ctx.load(offset)?;
                next_header = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let header: [u8; 4] = ctx.load(offset)?;
                next_header = header[0];
                later_fragment = u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0;
                offset += 8;
                if later_fragment {
                    done = true;
                    break;
                }
            }
            IPPROTO_AH => {
                let header: [u8; 2] = ctx.load(offset)?;
                next_header = header[0];
                offset += (usize::from(header[1]) + 2) * 4;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Ok(reason::OTHER);
    }
    let link_local = source[0] == 0xfe && source[1] & 0xc0 == 0x80;
    if next_header == IPPROTO_ICMPV6 && !later_fragment {
        let icmp_type: u8 = ctx.load(offset)?;
        match icmp_type {
            // What a host sends: router and neighbour solicitation, neighbour advertisement, listener
            // reports (v1, v2) and done, from link-local or (duplicate address detection) the unspecified
            // address, as the RFCs require, or from its own address.
            ICMPV6_ROUTER_SOLICITATION
            | ICMPV6_NEIGHBOUR_SOLICITATION
            | ICMPV6_NEIGHBOUR_ADVERTISEMENT
            | ICMPV6_LISTENER_REPORT
            | ICMPV6_LISTENER_DONE
            | ICMPV6_LISTENER_REPORT_V2 => {
                if icmp_type == ICMPV6_NEIGHBOUR_ADVERTISEMENT {
                    let target: [u8; 16] = ctx.load(offset + 8)?;
                    let target_link_local = target[0] == 0xfe && target[1] & 0xc0 == 0x80;
                    if target != endpoint.ipv6 && !target_link_local {
                        return Ok(reason::SPOOFED_NEIGHBOUR);
                    }
                }
                if link_local || source == [0u8; 16] {
                    return Ok(reason::PASSED);
                }
            }
            // What only routers send: listener query, router advertisement, redirect, router renumbering,
            // certification path advertisement (SEND), multicast router advertisement and termination.
            130 | 134 | 137 | 138 | 149 | 151 | 153 => return Ok(reason::FORBIDDEN_ICMPV6),
            _ => {}
        }
    }
    let own = source == endpoint.ipv6;
    let pooled = endpoint.flags & POOL_MODE != 0 && in_prefix(&source, &endpoint.pool_ipv6, &endpoint.pool_ipv6_mask);
    if !own && !pooled {
        return Ok(reason::SPOOFED_IPV6);
    }
    if later_fragment {
        return Ok(reason::PASSED);
    }
    carried(ctx, next_header, offset)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
