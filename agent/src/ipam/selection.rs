//! Which pools a pod may take its addresses from.
//!
//! Precedence, per address family: pod annotation > namespace annotation > request (netconf) > every enabled
//! automatic pool that admits the namespace and the node. A pool named at any level must still admit the
//! namespace and the node: a pool bound to namespaces is refused to everyone else, whoever asks for it.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use crate::resources::{
    ANNOTATION_IP_ADDRS, ANNOTATION_IPV4_POOLS, ANNOTATION_IPV6_POOLS, AllowedUse, AssignmentMode,
    CALICO_ANNOTATION_IP_ADDRS, CALICO_ANNOTATION_IPV4_POOLS, CALICO_ANNOTATION_IPV6_POOLS, IpPool,
};

/// The node asking for addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its labels, for `nodeSelector`.
    pub labels: BTreeMap<String, String>,
}

/// The pod's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// The namespace's name.
    pub name: String,
    /// Its labels, for `namespaceSelector`.
    pub labels: BTreeMap<String, String>,
    /// Its annotations (pool assignments).
    pub annotations: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// The namespace Kubernetes would show for a name nobody described.
    pub fn bare(name: &str) -> Self {
        Self {
            name: name.to_string(),
            labels: [("kubernetes.io/metadata.name".to_string(), name.to_string())].into(),
            annotations: BTreeMap::new(),
        }
    }
}

impl From<&NamespaceInfo> for crate::resources::Namespace {
    /// A namespace document for what a directory knows of one.
    fn from(info: &NamespaceInfo) -> Self {
        let mut metadata = crate::resources::ObjectMeta::named(&info.name);
        metadata.labels = info.labels.clone();
        metadata.annotations = info.annotations.clone();
        Self { metadata }
    }
}

/// The pod, when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's name.
    pub name: String,
    /// Its annotations (per-pod pools and fixed addresses).
    pub annotations: BTreeMap<String, String>,
}

/// What the runtime asked for (netconf `pools`, `runtimeConfig.ips`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    /// IPv4 pools, by name or CIDR.
    pub ipv4_pools: Vec<String>,
    /// IPv6 pools, by name or CIDR.
    pub ipv6_pools: Vec<String>,
    /// Specific addresses.
    pub ips: Vec<IpAddr>,
}

impl Requested {
    /// A request naming pools of either family (as a network configuration does), sorted by family; names
    /// that match no pool count as IPv4, so that selection reports them as unknown.
    pub fn from_pool_names(pools: &[IpPool], names: &[String], ips: Vec<IpAddr>) -> Self {
        let (ipv6_pools, ipv4_pools) = names.iter().cloned().partition(|wanted| {
            pools.iter().any(|p| (p.name() == wanted || p.cidr().to_string() == *wanted) && p.is_ipv6())
        });
        Self { ipv4_pools, ipv6_pools, ips }
    }
}

/// Where a pool choice came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChoiceSource {
    /// A pod annotation (the key as written).
    PodAnnotation(String),
    /// A namespace annotation (the key as written).
    NamespaceAnnotation(String),
    /// The network configuration or runtime arguments.
    Request,
    /// No one named a pool: every pool that admits the pod.
    Default,
}

impl fmt::Display for ChoiceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChoiceSource::PodAnnotation(key) => write!(f, "the pod annotation {key}"),
            ChoiceSource::NamespaceAnnotation(key) => write!(f, "the namespace annotation {key}"),
            ChoiceSource::Request => f.write_str("the network configuration"),
            ChoiceSource::Default => f.write_str("the default selection"),
        }
    }
}

/// Why no pool could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// A named pool does not exist.
    #[error("pool {pool:?} named by {named_by} does not exist")]
    UnknownPool {
        /// The name or CIDR as written.
        pool: String,
        /// Who named it.
        named_by: ChoiceSource,
    },
    /// A pool of the wrong family was named.
    #[error("pool {pool:?} named by {named_by} is {actual}, not {expected}")]
    WrongFamily {
        /// The pool.
        pool: String,
        /// Who named it.
        named_by: ChoiceSource,
        /// The family expected at that place.
        expected: &'static str,
        /// The pool's family.
        actual: &'static str,
    },
    /// A named pool is disabled.
    #[error("pool {pool:?} named by {named_by} is disabled")]
    Disabled {
        /// The pool.
        pool: String,
        /// Who named it.
        named_by: ChoiceSource,
    },
    /// A pool refuses the namespace, node or use.
    #[error("pool {pool:?} (named by {named_by}) refuses namespace {namespace:?} on node {node:?}: {rule}")]
    Refused {
        /// The pool.
        pool: String,
        /// Who named it.
        named_by: ChoiceSource,
        /// The namespace refused.
        namespace: String,
        /// The node.
        node: String,
        /// The rule that refuses it.
        rule: String,
    },
    /// No pool admits the namespace at all.
    #[error("no pool admits namespace {namespace:?} on node {node:?}{hint}")]
    NoPool {
        /// The namespace.
        namespace: String,
        /// The node.
        node: String,
        /// Extra help: which pools exist but refuse.
        hint: String,
    },
    /// An annotation's value cannot be read.
    #[error("annotation {key} on {object}: {message}")]
    BadAnnotation {
        /// `namespace "x"` or `pod "ns/p"`.
        object: String,
        /// The annotation key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Two fixed addresses of one family were asked for: a pod gets one address per family.
    #[error(
        "addresses {first} and {second} (asked for by {named_by}) are both {family}: a pod gets at most one address of each family"
    )]
    OneAddressPerFamily {
        /// The first address of the family.
        first: IpAddr,
        /// Another of the same family.
        second: IpAddr,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// Who asked.
        named_by: ChoiceSource,
    },
    /// A requested address lies in no pool.
    #[error("address {ip} (asked for by {named_by}) is in no pool")]
    AddressOutsidePools {
        /// The address.
        ip: IpAddr,
        /// Who asked.
        named_by: ChoiceSource,
    },
}

/// The pools (and fixed addresses) a pod may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection<'p> {
    /// IPv4 pools, in preference order.
    pub ipv4: Vec<&'p IpPool>,
    /// Where the IPv4 choice came from.
    pub ipv4_source: ChoiceSource,
    /// IPv6 pools, in preference order.
    pub ipv6: Vec<&'p IpPool>,
    /// Where the IPv6 choice came from.
    pub ipv6_source: ChoiceSource,
    /// Fixed addresses with their pools; when present, only these are assigned.
    pub ips: Vec<(IpAddr, &'p IpPool)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn of(pool: &IpPool) -> Self {
        if pool.is_ipv6() { Family::V6 } else { Family::V4 }
    }
}

/// Why a pool refuses this namespace (on any node), if it does.
pub fn namespace_refusal(pool: &IpPool, namespace: &NamespaceInfo) -> Option<String> {
    let spec = &pool.spec;
    if !spec.allowed_namespaces.is_empty() && !spec.allowed_namespaces.contains(&namespace.name) {
        return Some(format!("the pool is bound to namespaces {:?} (allowedNamespaces)", spec.allowed_namespaces));
    }
    if !spec.namespace_selector.matches(&namespace.labels) {
        return Some(format!(
            "namespaceSelector {:?} does not match the namespace's labels",
            spec.namespace_selector.as_str()
        ));
    }
    None
}

/// The pools a namespace's (or, when given, a pod's) annotation names for `ipv6`'s family, as written,
/// with the annotation key; `None` when neither annotates that family.
pub fn annotated_pools(
    namespace: &NamespaceInfo,
    pod: Option<&PodInfo>,
    ipv6: bool,
) -> Option<(&'static str, Result<Vec<String>, SelectionError>)> {
    let keys = if ipv6 {
        [ANNOTATION_IPV6_POOLS, CALICO_ANNOTATION_IPV6_POOLS]
    } else {
        [ANNOTATION_IPV4_POOLS, CALICO_ANNOTATION_IPV4_POOLS]
    };
    if let Some(pod) = pod
        && let Some((key, value)) = annotation(&pod.annotations, keys)
    {
        return Some((key, parse_list(&format!("pod \"{}/{}\"", namespace.name, pod.name), key, value)));
    }
    let (key, value) = annotation(&namespace.annotations, keys)?;
    Some((key, parse_list(&format!("namespace {:?}", namespace.name), key, value)))
}

/// Whether a pool name or CIDR as written in an annotation means `pool`.
pub fn names_pool(written: &str, pool: &IpPool) -> bool {
    written == pool.name() || written.parse::<ipnet::IpNet>().is_ok_and(|net| net == pool.cidr())
}

/// Why a pool refuses this namespace on this node, if it does.
pub fn refusal(pool: &IpPool, namespace: &NamespaceInfo, node: &NodeInfo) -> Option<String> {
    let spec = &pool.spec;
    if let Some(rule) = namespace_refusal(pool, namespace) {
        return Some(rule);
    }
    if !spec.node_selector.matches(&node.labels) {
        return Some(format!("nodeSelector {:?} does not match the node's labels", spec.node_selector.as_str()));
    }
    if !spec.allowed_uses.contains(&AllowedUse::Workload) {
        return Some("allowedUses does not include Workload".to_string());
    }
    None
}

/// The first of `keys` present in `annotations`, with its value.
pub(crate) fn annotation<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: [&'static str; 2],
) -> Option<(&'static str, &'a str)> {
    keys.iter().find_map(|&k| annotations.get(k).map(|v| (k, v.as_str())))
}

fn parse_list(object: &str, key: &str, value: &str) -> Result<Vec<String>, SelectionError> {
    serde_json::from_str(value).map_err(|_| SelectionError::BadAnnotation {
        object: object.to_string(),
        key: key.to_string(),
        message: format!("{value:?} is not a JSON list of strings, for example '[\"pool-a\"]'"),
    })
}

fn find_pool<'p>(pools: &'p [IpPool], wanted: &str) -> Option<&'p IpPool> {
    pools.iter().find(|p| p.name() == wanted).or_else(|| {
        let net: ipnet::IpNet = wanted.parse().ok()?;
        pools.iter().find(|p| p.cidr() == net)
    })
}

/// Choose the pools for a pod.
pub fn select<'p>(
    pools: &'p [IpPool],
    node: &NodeInfo,
    namespace: &NamespaceInfo,
    pod: Option<&PodInfo>,
    requested: &Requested,
) -> Result<Selection<'p>, SelectionError> {
    let pod_object = pod.map(|p| format!("pod \"{}/{}\"", namespace.name, p.name));
    let ns_object = format!("namespace {:?}", namespace.name);
    let admit = |pool: &'p IpPool, source: &ChoiceSource| -> Result<&'p IpPool, SelectionError> {
        if pool.spec.disabled {
            return Err(SelectionError::Disabled { pool: pool.name().to_string(), named_by: source.clone() });
        }
        match refusal(pool, namespace, node) {
            Some(rule) => Err(SelectionError::Refused {
                pool: pool.name().to_string(),
                named_by: source.clone(),
                namespace: namespace.name.clone(),
                node: node.name.clone(),
                rule,
            }),
            None => Ok(pool),
        }
    };

    // Fixed addresses: the pod annotation, else the request.
    let mut fixed: Option<(ChoiceSource, Vec<IpAddr>)> = None;
    if let (Some(pod), Some(object)) = (pod, &pod_object)
        && let Some((key, value)) = annotation(&pod.annotations, [ANNOTATION_IP_ADDRS, CALICO_ANNOTATION_IP_ADDRS])
    {
        let ips = parse_list(object, key, value)?
            .iter()
            .map(|s| {
                s.parse::<IpAddr>().map_err(|_| SelectionError::BadAnnotation {
                    object: object.clone(),
                    key: key.to_string(),
                    message: format!("{s:?} is not an IP address"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        fixed = Some((ChoiceSource::PodAnnotation(key.to_string()), ips));
    } else if !requested.ips.is_empty() {
        fixed = Some((ChoiceSource::Request, requested.ips.clone()));
    }
    if let Some((source, ips)) = fixed {
        for (i, first) in ips.iter().enumerate() {
            if let Some(second) = ips[i + 1..].iter().find(|ip| ip.is_ipv6() == first.is_ipv6()) {
                return Err(SelectionError::OneAddressPerFamily {
                    first: *first,
                    second: *second,
                    family: if first.is_ipv6() { "IPv6" } else { "IPv4" },
                    named_by: source,
                });
            }
        }
        let mut chosen = Vec::new();
        for ip in ips {
            let pool = pools
                .iter()
                .find(|p| p.contains(ip))
                .ok_or_else(|| SelectionError::AddressOutsidePools { ip, named_by: source.clone() })?;
            chosen.push((ip, admit(pool, &source)?));
        }
        return Ok(Selection {
            ipv4: vec![],
            ipv4_source: source.clone(),
            ipv6: vec![],
            ipv6_source: source,
            ips: chosen,
        });
    }

    let by_family = |family: Family| -> Result<(Vec<&'p IpPool>, ChoiceSource), SelectionError> {
        let keys = match family {
            Family::V4 => [ANNOTATION_IPV4_POOLS, CALICO_ANNOTATION_IPV4_POOLS],
            Family::V6 => [ANNOTATION_IPV6_POOLS, CALICO_ANNOTATION_IPV6_POOLS],
        };
        let mut named: Option<(ChoiceSource, Vec<String>)> = None;
        if let (Some(pod), Some(object)) = (pod, &pod_object)
            && let Some((key, value)) = annotation(&pod.annotations, keys)
        {
            named = Some((ChoiceSource::PodAnnotation(key.to_string()), parse_list(object, key, value)?));
        }
        if named.is_none()
            && let Some((key, value)) = annotation(&namespace.annotations, keys)
        {
            named = Some((ChoiceSource::NamespaceAnnotation(key.to_string()), parse_list(&ns_object, key, value)?));
        }
        if named.is_none() {
            let list = match family {
                Family::V4 => &requested.ipv4_pools,
                Family::V6 => &requested.ipv6_pools,
            };
            if !list.is_empty() {
                named = Some((ChoiceSource::Request, list.clone()));
            }
        }
        match named {
            Some((source, names)) => {
                let mut chosen = Vec::new();
                for name in names {
                    let pool = find_pool(pools, &name)
                        .ok_or_else(|| SelectionError::UnknownPool { pool: name.clone(), named_by: source.clone() })?;
                    if Family::of(pool) != family {
                        return Err(SelectionError::WrongFamily {
                            pool: name,
                            named_by: source,
                            expected: family.name(),
                            actual: Family::of(pool).name(),
                        });
                    }
                    chosen.push(admit(pool, &source)?);
                }
                Ok((chosen, source))
            }
            None => {
                let chosen = pools
                    .iter()
                    .filter(|p| {
                        Family::of(p) == family
                            && !p.spec.disabled
                            && p.spec.assignment_mode == AssignmentMode::Automatic
                    })
                    .filter(|p| refusal(p, namespace, node).is_none())
                    .collect();
                Ok((chosen, ChoiceSource::Default))
            }
        }
    };
    let (ipv4, ipv4_source) = by_family(Family::V4)?;
    let (ipv6, ipv6_source) = by_family(Family::V6)?;
    if ipv4.is_empty() && ipv6.is_empty() {
        let refusing: Vec<String> = pools
            .iter()
            .filter_map(|p| refusal(p, namespace, node).map(|why| format!("{}: {why}", p.name())))
            .collect();
        let hint = if pools.is_empty() {
            ": no IPPool exists; apply one with `poolwarden apply -f pools.yaml`".to_string()
        } else if refusing.is_empty() {
            ": every pool is disabled or manual".to_string()
        } else {
            format!(" ({})", refusing.join("; "))
        };
        return Err(SelectionError::NoPool { namespace: namespace.name.clone(), node: node.name.clone(), hint });
    }
    Ok(Selection { ipv4, ipv4_source, ipv6, ipv6_source, ips: vec![] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{IpPoolSpec, ObjectMeta, Selector};

    fn pool(name: &str, cidr: &str, allowed: &[&str]) -> IpPool {
        IpPool {
            metadata: ObjectMeta::named(name),
            spec: IpPoolSpec {
                cidr: cidr.parse().unwrap(),
                block_size: Some(29),
                disabled: false,
                node_selector: Selector::all(),
                namespace_selector: Selector::all(),
                allowed_namespaces: allowed.iter().map(|s| s.to_string()).collect(),
                nat_outgoing: false,
                ipip_mode: Default::default(),
                vxlan_mode: Default::default(),
                allowed_uses: vec![AllowedUse::Workload, AllowedUse::Tunnel],
                disable_bgp_export: false,
                assignment_mode: AssignmentMode::Automatic,
                enforcement: None,
            },
        }
    }

    fn ns(name: &str, annotations: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn names(pools: &[&IpPool]) -> Vec<String> {
        pools.iter().map(|p| p.name().to_string()).collect()
    }

    #[test]
    fn precedence_and_binding() {
        let pools = vec![
            pool("external-pool", "172.16.0.0/26", &["external-ns"]),
            pool("internal-pool", "192.168.0.0/24", &[]),
            pool("six", "fd00::/120", &[]),
        ];
        let node = NodeInfo { name: "n1".into(), labels: BTreeMap::new() };
        let ext = ns("external-ns", &[(ANNOTATION_IPV4_POOLS, "[\"external-pool\"]")]);
        let sel = select(&pools, &node, &ext, None, &Requested::default()).unwrap();
        assert_eq!(names(&sel.ipv4), ["external-pool"]);
        assert_eq!(sel.ipv4_source, ChoiceSource::NamespaceAnnotation(ANNOTATION_IPV4_POOLS.into()));
        assert_eq!(names(&sel.ipv6), ["six"], "IPv6 falls back to the default selection");

        // The bound pool is not in anyone else's default selection...
        let other = ns("default", &[]);
        assert_eq!(names(&select(&pools, &node, &other, None, &Requested::default()).unwrap().ipv4), ["internal-pool"]);
        // ...and a pod annotation naming it is refused, naming the pool and the rule.
        let pod = PodInfo {
            name: "sneaky".into(),
            annotations: [(CALICO_ANNOTATION_IPV4_POOLS.to_string(), "[\"external-pool\"]".to_string())].into(),
        };
        let err = select(&pools, &node, &other, Some(&pod), &Requested::default()).unwrap_err();
        assert!(matches!(&err, SelectionError::Refused { pool, .. } if pool == "external-pool"), "{err}");
        assert!(err.to_string().contains("allowedNamespaces"), "{err}");

        // Pod annotation beats the namespace annotation; pools may be given by CIDR.
        let pod = PodInfo {
            name: "p".into(),
            annotations: [(ANNOTATION_IPV4_POOLS.to_string(), "[\"192.168.0.0/24\"]".to_string())].into(),
        };
        assert_eq!(
            names(&select(&pools, &node, &ext, Some(&pod), &Requested::default()).unwrap().ipv4),
            ["internal-pool"]
        );

        let err = select(
            &pools,
            &node,
            &ext,
            None,
            &Requested { ipv4_pools: vec![], ipv6_pools: vec![], ips: vec!["10.9.9.9".parse().unwrap()] },
        )
        .unwrap_err();
        assert!(matches!(err, SelectionError::AddressOutsidePools { .. }));

        // One fixed address per family: two IPv4 addresses are refused, naming both (they looped as "try
        // again" before); one of each family is fine.
        let fixed = |ips: &str| PodInfo {
            name: "fixed".into(),
            annotations: [(ANNOTATION_IP_ADDRS.to_string(), ips.to_string())].into(),
        };
        let err = select(
            &pools,
            &node,
            &other,
            Some(&fixed("[\"192.168.0.5\", \"fd00::5\", \"192.168.0.6\"]")),
            &Requested::default(),
        )
        .unwrap_err();
        assert!(matches!(err, SelectionError::OneAddressPerFamily { family: "IPv4", .. }), "{err}");
        assert!(err.to_string().contains("192.168.0.5 and 192.168.0.6"), "{err}");
        let both = select(&pools, &node, &other, Some(&fixed("[\"192.168.0.5\", \"fd00::5\"]")), &Requested::default())
            .unwrap();
        assert_eq!(both.ips.len(), 2);
        let wrong = ns("x", &[(ANNOTATION_IPV4_POOLS, "[\"six\"]")]);
        assert!(matches!(
            select(&pools, &node, &wrong, None, &Requested::default()),
            Err(SelectionError::WrongFamily { .. })
        ));
    }
}
