//! What the enforcement program and the agent agree on: the endpoint entry per host interface, and the
//! counter keys. Every type is `#[repr(C)]` without padding, so both sides read the same bytes.
#![no_std]

/// The endpoint has an IPv4 address.
pub const HAS_IPV4: u32 = 1;
/// The endpoint has an IPv6 address.
pub const HAS_IPV6: u32 = 1 << 1;
/// Pool mode: any source inside the endpoint's pool passes, not only its own address.
pub const POOL_MODE: u32 = 1 << 2;
/// The entry is in use (array slots exist for every index; this marks the ones that hold a pod).
pub const PRESENT: u32 = 1 << 3;
/// The agent that wrote the entry counts the packets passed there (per pool, under [`reason::PASSED`]): it
/// attaches the program that does. A record for `poolwarden enforcement status`; the programs ignore it.
pub const COUNT_PASSED: u32 = 1 << 4;

/// Interfaces with an index below this have their entry in an array (a lookup the verifier turns into a
/// bounds check and a load); higher indexes, rare, in a hash map.
pub const ARRAY_ENDPOINTS: u32 = 65_536;

/// The entry for one pod's host-side interface, keyed by its ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod's IPv4 address, in network byte order as it appears in the packet.
    pub ipv4: [u8; 4],
    /// The IPv4 pool's network, network byte order.
    pub pool_ipv4: [u8; 4],
    /// The IPv4 pool's netmask, network byte order.
    pub pool_ipv4_mask: [u8; 4],
    /// `HAS_IPV4 | HAS_IPV6 | POOL_MODE | PRESENT | COUNT_PASSED`.
    pub flags: u32,
    /// The pod's IPv6 address.
    pub ipv6: [u8; 16],
    /// The IPv6 pool's network.
    pub pool_ipv6: [u8; 16],
    /// The IPv6 pool's netmask.
    pub pool_ipv6_mask: [u8; 16],
    /// The pool's counter slot on this node (see [`POOL_SLOTS`]).
    pub pool_id: u32,
    /// Explicit padding to a multiple of 8, so the struct has none the compiler adds.
    pub reserved: u32,
}

/// Why a packet was dropped or passed: the counter's second key part.
pub mod reason {
    /// Passed: the source is the pod's own address (or, in pool mode, in its pool).
    pub const PASSED: u32 = 0;
    /// Dropped: IPv4 source not the pod's.
    pub const SPOOFED_IPV4: u32 = 1;
    /// Dropped: IPv6 source not the pod's.
    pub const SPOOFED_IPV6: u32 = 2;
    /// Dropped: IPv6 from a pod that has no IPv6 address.
    pub const NO_IPV6: u32 = 3;
    /// Dropped: IPv4 from a pod that has no IPv4 address.
    pub const NO_IPV4: u32 = 4;
    /// Dropped: ARP whose sender address is not the pod's.
    pub const SPOOFED_ARP: u32 = 5;
    /// Dropped: a VLAN-tagged frame (a tag the kernel stripped before the hook, or one still in the frame).
    pub const VLAN: u32 = 6;
    /// Dropped: the interface has no endpoint entry (fail closed).
    pub const NO_ENDPOINT: u32 = 7;
    /// Dropped: another ethertype, a malformed or truncated header, or an IPv6 extension header chain
    /// longer than the program follows.
    pub const OTHER: u32 = 8;
    /// Dropped: a tunnel packet from the pod's own address (IP-in-IP, SIT, IPv6-in-IPv6, GRE, EtherIP, L2TP,
    /// MPLS-in-IP, or UDP to a port a decapsulating device listens on: VXLAN, GENEVE, FOU/GUE). A node or a
    /// peer that decapsulates it would deliver an inner packet whose source nobody checked.
    pub const ENCAPSULATED: u32 = 9;
    /// Dropped: ICMPv6 that only routers send (router advertisement, redirect, multicast listener query,
    /// router renumbering, multicast router advertisement).
    pub const FORBIDDEN_ICMPV6: u32 = 10;
    /// Dropped: a neighbour advertisement for an address that is not the pod's (nor link-local).
    pub const SPOOFED_NEIGHBOUR: u32 = 11;
    /// How many reasons there are.
    pub const COUNT: u32 = 12;

    /// The reason's name, as metrics and `poolwarden enforcement status` show it.
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            PASSED => "passed",
            SPOOFED_IPV4 => "spoofed_ipv4",
            SPOOFED_IPV6 => "spoofed_ipv6",
            NO_IPV6 => "no_ipv6",
            NO_IPV4 => "no_ipv4",
            SPOOFED_ARP => "spoofed_arp",
            VLAN => "vlan",
            NO_ENDPOINT => "no_endpoint",
            ENCAPSULATED => "encapsulated",
            FORBIDDEN_ICMPV6 => "forbidden_icmpv6",
            SPOOFED_NEIGHBOUR => "spoofed_neighbour",
            _ => "other",
        }
    }
}

/// A dropped packet reported to the agent (rate-limited in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// The host-side interface it arrived on.
    pub ifindex: u32,
    /// One of [`reason`].
    pub reason: u32,
    /// The endpoint's pool id (0 when there is no endpoint).
    pub pool_id: u32,
    /// 4 or 6 when `source` holds an address (IPv4 in its first four bytes), 0 otherwise.
    pub family: u32,
    /// The packet's source address.
    pub source: [u8; 16],
}

/// UDP ports a pod may never send to, whoever the destination: the decapsulating ports of VXLAN (IANA 4789,
/// and Linux's historical 8472), VXLAN-GPE (4790) and GENEVE (6081). The agent adds the port of every
/// VXLAN and GENEVE device it finds on the node to the `DECAP_PORTS` map besides these.
pub const DEFAULT_DECAP_PORTS: [u16; 4] = [4789, 4790, 6081, 8472];

/// IP protocol numbers that carry a packet whose own source a receiver that decapsulates would trust:
/// IPv4 (4, IP-in-IP), IPv6 (41, SIT and IPv6-in-IP), GRE (47, also GRETAP and ERSPAN), EtherIP (97),
/// L2TPv3 (115), MPLS-in-IP (137), Ethernet (143, as SRv6 carries it).
pub const TUNNEL_PROTOCOLS: [u8; 7] = [4, 41, 47, 97, 115, 137, 143];

/// How many drop reports each CPU may send per second; the counters count everything regardless.
pub const DROP_REPORTS_PER_SECOND: u64 = 100;

/// How many pools a node counts separately. The agent gives each pool that has an endpoint on the node a
/// slot of its own (1 and up; 0 is "no pool"), records the slot's pool name in the pinned `POOL_NAMES` map,
/// and writes the slot into the endpoints' `pool_id`: two pools never share a counter.
pub const POOL_SLOTS: u32 = 1024;

/// The bytes of a pool name in `POOL_NAMES` (NUL-padded; Kubernetes names are at most 253 bytes).
pub const POOL_NAME_LEN: usize = 256;

/// The counters array index of (pool slot, reason); slots out of range count as "no pool".
pub const fn counter_index(slot: u32, why: u32) -> u32 {
    let slot = if slot < POOL_SLOTS { slot } else { 0 };
    slot * reason::COUNT + why
}

#[cfg(feature = "user")]
mod user {
    #![expect(unsafe_code, reason = "aya::Pod is an unsafe marker: these types are repr(C) without padding")]
    // SAFETY: repr(C), only integer arrays and integers, sizes multiple of their alignment, no padding.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: repr(C), four u32 and a byte array: 32 bytes, no padding.
    unsafe impl aya::Pod for super::DropEvent {}
}
