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
