//! What touches the kernel: routes, eBPF enforcement, and what this kernel can and cannot do for a pool.

pub mod enforcement;
pub mod nat;
pub mod overlay;
pub mod routes;

use crate::resources::{EncapMode, IpPool};

/// Why the encapsulation a pool asks for is not applied on this node (`None`: it asks for none, or for
/// `vxlanMode`, which is). Pods' traffic between nodes is then routed unencapsulated, so the nodes must share
/// a layer-2 segment (or the network must route the pool's CIDR); saying so is better than ignoring the field.
pub fn encapsulation_not_applied(pool: &IpPool) -> Option<String> {
    let unencapsulated = "traffic between nodes is routed without encapsulation, so the nodes must share a \
                          layer-2 segment or the network must route the pool's CIDR (vxlanMode encapsulates)";
    if pool.spec.ipip_mode != EncapMode::Never {
        let kernel = if std::path::Path::new("/sys/module/ipip").exists() {
            "poolwarden does not build IP-in-IP tunnels"
        } else {
            "this kernel has no ipip module"
        };
        return Some(format!(
            "pool {}: ipipMode {:?} is not applied: {kernel}; {unencapsulated}",
            pool.name(),
            pool.spec.ipip_mode
        ));
    }
    None
}

/// The sysctl that lets this node forward each family's packets between its pods' interfaces and its uplink.
const FORWARDING: [(bool, &str); 2] =
    [(false, "/proc/sys/net/ipv4/ip_forward"), (true, "/proc/sys/net/ipv6/conf/all/forwarding")];

/// Turn forwarding on for the families of `pools` this node may use (in the agent's network namespace, the
/// node's), as a pod network needs: a pod's packets to another node, and another node's to a pod, are
/// forwarded. IPv6 is turned on only when an enabled IPv6 pool selects this node (`labels`), since it also
/// stops the node's interfaces that accept router advertisements from doing so (`accept_ra` 1; 2 keeps
/// accepting them). Returns the sysctls that were off and were turned on.
pub fn ensure_forwarding(
    pools: &[IpPool],
    labels: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<Vec<&'static str>> {
    let mut changed = Vec::new();
    for (ipv6, path) in FORWARDING {
        if !pools.iter().any(|p| p.is_ipv6() == ipv6 && !p.spec.disabled && p.spec.node_selector.matches(labels)) {
            continue;
        }
        if std::fs::read_to_string(path)?.trim() != "1" {
            std::fs::write(path, "1")?;
            changed.push(path);
        }
    }
    Ok(changed)
}
