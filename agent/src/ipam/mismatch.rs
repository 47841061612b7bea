//! Pods whose address no longer matches what their namespace (or pod) now asks for: a namespace's
//! annotation changed after its pods were created, or a pool was re-bound. Existing pods keep their
//! addresses (changing them would break connections); this lists them so an operator can recreate them.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use super::{
    Block, NamespaceInfo, PodInfo,
    selection::{annotated_pools, annotation, names_pool, namespace_refusal},
};
use crate::resources::{ANNOTATION_IP_ADDRS, CALICO_ANNOTATION_IP_ADDRS, IpPool};

/// One pod whose address is not where it would go now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod.
    pub pod: String,
    /// The address it holds.
    pub address: IpAddr,
    /// The pool the address is in.
    pub pool: String,
    /// What it would get now, and why.
    pub expected: String,
}

/// The allocations in `blocks` that the current pools, namespaces and (when known) pods would not make.
/// `pods` maps (namespace, pod) to the pod's annotations where they are known; a pod annotated with fixed
/// addresses that include its address is never a mismatch.
pub fn mismatched(
    blocks: &[Block],
    pools: &[IpPool],
    namespaces: &BTreeMap<String, NamespaceInfo>,
    pods: &BTreeMap<(String, String), PodInfo>,
) -> Vec<Mismatch> {
    let mut found = Vec::new();
    for block in blocks {
        for (address, allocation) in block.allocated() {
            let Some(ns_name) = allocation.namespace.as_deref() else { continue };
            let pod_name = allocation.pod.clone().unwrap_or_default();
            let namespace = namespaces.get(ns_name).cloned().unwrap_or_else(|| NamespaceInfo::bare(ns_name));
            let pod = pods.get(&(ns_name.to_string(), pod_name.clone()));
            let mismatch = |expected: String| Mismatch {
                namespace: ns_name.to_string(),
                pod: pod_name.clone(),
                address,
                pool: block.pool.clone(),
                expected,
            };
            if let Some(pod) = pod
                && let Some((_, fixed)) =
                    annotation(&pod.annotations, [ANNOTATION_IP_ADDRS, CALICO_ANNOTATION_IP_ADDRS])
                && serde_json::from_str::<Vec<String>>(fixed)
                    .is_ok_and(|ips| ips.iter().any(|ip| ip.parse() == Ok(address)))
            {
                continue;
            }
            let Some(pool) = pools.iter().find(|p| p.name() == block.pool) else {
                found.push(mismatch(format!("pool {:?} no longer exists", block.pool)));
                continue;
            };
            if let Some(rule) = namespace_refusal(pool, &namespace) {
                found.push(mismatch(format!("the pool now refuses the namespace: {rule}")));
                continue;
            }
            match annotated_pools(&namespace, pod, address.is_ipv6()) {
                Some((key, Ok(names))) if !names.iter().any(|n| names_pool(n, pool)) => {
                    let owner = if pod.is_some_and(|p| p.annotations.contains_key(key)) { "pod" } else { "namespace" };
                    found.push(mismatch(format!("{} ({owner} annotation {key})", names.join(","))));
                }
                Some((key, Err(e))) => found.push(mismatch(format!("unreadable annotation {key}: {e}"))),
                _ => {}
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ipam::Owner,
        resources::{Resource, parse_documents},
    };

    fn pools() -> Vec<IpPool> {
        let yaml = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: external-pool}\nspec: {cidr: 10.10.0.0/24, blockSize: 29}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: internal-pool}\nspec: {cidr: 10.20.0.0/24, blockSize: 29}\n";
        parse_documents("p.yaml", yaml)
            .unwrap()
            .into_iter()
            .filter_map(|d| if let Resource::IpPool(p) = d.resource { Some(p) } else { None })
            .collect()
    }

    fn owner(ns: &str, pod: &str) -> Owner {
        Owner {
            handle: format!("{ns}.{pod}"),
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            node: "n1".into(),
            ..Owner::default()
        }
    }

    #[test]
    fn lists_pods_left_in_a_pool_their_namespace_no_longer_names() {
        let pools = pools();
        let mut block = Block::new("10.10.0.0/29".parse().unwrap(), "external-pool", "n1", 0);
        block.assign_ip("10.10.0.1".parse().unwrap(), &owner("tenant", "old"), 0, 0).unwrap();
        block.assign_ip("10.10.0.2".parse().unwrap(), &owner("tenant", "pinned"), 0, 0).unwrap();
        block.assign_ip("10.10.0.3".parse().unwrap(), &owner("other", "fine"), 0, 0).unwrap();
        let annotate = |v: &str| NamespaceInfo {
            name: "tenant".into(),
            labels: BTreeMap::new(),
            annotations: [("poolwarden.io/ipv4pools".to_string(), v.to_string())].into(),
        };
        let pinned = PodInfo {
            name: "pinned".into(),
            annotations: [("poolwarden.io/ipAddrs".to_string(), "[\"10.10.0.2\"]".to_string())].into(),
        };
        let pods = [(("tenant".to_string(), "pinned".to_string()), pinned)].into();

        let before = [("tenant".to_string(), annotate("[\"external-pool\"]"))].into();
        assert!(mismatched(std::slice::from_ref(&block), &pools, &before, &pods).is_empty());

        let after = [("tenant".to_string(), annotate("[\"internal-pool\"]"))].into();
        let found = mismatched(std::slice::from_ref(&block), &pools, &after, &pods);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].pod.as_str(), found[0].address.to_string()), ("old", "10.10.0.1".to_string()));
        assert_eq!(found[0].expected, "internal-pool (namespace annotation poolwarden.io/ipv4pools)");

        let found = mismatched(std::slice::from_ref(&block), &pools[1..], &before, &pods);
        assert!(found.iter().any(|m| m.expected.contains("no longer exists")), "{found:?}");
    }
}
