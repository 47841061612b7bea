//! What the `poolwarden` commands print: tables, YAML and JSON for pools, blocks, handles and namespaces,
//! and the IPAM summary. Each function returns the text, so the output is tested without a terminal.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;
use serde_json::json;

use crate::{
    ipam::{Block, check::Snapshot},
    resources::{
        ANNOTATION_IPV4_POOLS, ANNOTATION_IPV6_POOLS, API_VERSION, CALICO_ANNOTATION_IPV4_POOLS,
        CALICO_ANNOTATION_IPV6_POOLS, IpPool, IpamConfig, Namespace, prefix_size, to_yaml_documents,
    },
};

/// How `get` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Aligned columns with more of them.
    Wide,
    /// YAML documents that `apply -f` takes back.
    Yaml,
    /// A JSON list.
    Json,
}

/// Align rows into columns separated by three spaces, as kubectl does.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}   ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn json_list<T: Serialize>(kind: &str, items: &[T]) -> String {
    let items: Vec<_> = items
        .iter()
        .map(|item| {
            let mut value = serde_json::to_value(item).unwrap_or_default();
            if let Some(map) = value.as_object_mut() {
                let api = if kind == "Namespace" { "v1" } else { API_VERSION };
                map.insert("apiVersion".into(), api.into());
                map.insert("kind".into(), kind.into());
            }
            value
        })
        .collect();
    serde_json::to_string_pretty(&json!({ "apiVersion": "v1", "kind": "List", "items": items })).unwrap_or_default()
        + "\n"
}

fn yes_no(b: bool) -> String {
    if b { "true".into() } else { "false".into() }
}

/// `get pools`.
pub fn pools(pools: &[IpPool], format: Format) -> String {
    match format {
        Format::Yaml => to_yaml_documents("IPPool", pools),
        Format::Json => json_list("IPPool", pools),
        Format::Table | Format::Wide => {
            let wide = format == Format::Wide;
            let mut header = vec!["NAME", "CIDR", "BLOCK SIZE", "NAT", "IPIP", "VXLAN", "DISABLED"];
            if wide {
                header.extend(["ALLOWED NAMESPACES", "NAMESPACE SELECTOR", "NODE SELECTOR"]);
            }
            let rows: Vec<Vec<String>> = pools
                .iter()
                .map(|p| {
                    let mut row = vec![
                        p.name().to_string(),
                        p.cidr().to_string(),
                        p.block_size().to_string(),
                        yes_no(p.spec.nat_outgoing),
                        format!("{:?}", p.spec.ipip_mode),
                        format!("{:?}", p.spec.vxlan_mode),
                        yes_no(p.spec.disabled),
                    ];
                    if wide {
                        let allowed = if p.spec.allowed_namespaces.is_empty() {
                            "*".to_string()
                        } else {
                            p.spec.allowed_namespaces.join(",")
                        };
                        row.extend([allowed, p.spec.namespace_selector.to_string(), p.spec.node_selector.to_string()]);
                    }
                    row
                })
                .collect();
            table(&header, &rows)
        }
    }
}

/// `get ipamconfig`.
pub fn config(config: &IpamConfig, format: Format) -> String {
    match format {
        Format::Yaml => to_yaml_documents("IPAMConfig", std::slice::from_ref(config)),
        Format::Json => json_list("IPAMConfig", std::slice::from_ref(config)),
        Format::Table | Format::Wide => {
            let s = &config.spec;
            table(
                &["STRICT AFFINITY", "MAX BLOCKS PER HOST", "REUSE COOLDOWN", "EMPTY BLOCK GRACE"],
                &[vec![
                    yes_no(s.strict_affinity),
                    if s.max_blocks_per_host == 0 { "unlimited".into() } else { s.max_blocks_per_host.to_string() },
                    format!("{}s", s.reuse_cooldown_seconds),
                    format!("{}s", s.empty_block_grace_seconds),
                ]],
            )
        }
    }
}

/// `get blocks`.
pub fn blocks(blocks: &[Block], format: Format) -> String {
    match format {
        Format::Yaml => serde_yaml::to_string(blocks).unwrap_or_default(),
        Format::Json => serde_json::to_string_pretty(blocks).unwrap_or_default() + "\n",
        Format::Table | Format::Wide => {
            let wide = format == Format::Wide;
            let mut header = vec!["CIDR", "POOL", "NODE", "USED", "FREE"];
            if wide {
                header.extend(["SEQUENCE", "BORROWED BY"]);
            }
            let rows: Vec<Vec<String>> = blocks
                .iter()
                .map(|b| {
                    let mut row = vec![
                        b.cidr.to_string(),
                        b.pool.clone(),
                        b.affinity.clone().unwrap_or_else(|| "<none>".into()),
                        b.used().to_string(),
                        b.free_count().to_string(),
                    ];
                    if wide {
                        let mut borrowers: Vec<&str> = b
                            .allocations
                            .values()
                            .filter(|a| Some(&a.node) != b.affinity.as_ref())
                            .map(|a| a.node.as_str())
                            .collect();
                        borrowers.dedup();
                        row.extend([b.sequence.to_string(), borrowers.join(",")]);
                    }
                    row
                })
                .collect();
            table(&header, &rows)
        }
    }
}

/// `get affinities`.
pub fn affinities(snapshot: &Snapshot, format: Format) -> String {
    match format {
        Format::Yaml => serde_yaml::to_string(&snapshot.affinities).unwrap_or_default(),
        Format::Json => serde_json::to_string_pretty(&snapshot.affinities).unwrap_or_default() + "\n",
        Format::Table | Format::Wide => {
            let rows: Vec<Vec<String>> = snapshot
                .affinities
                .iter()
                .map(|a| {
                    let used = snapshot.blocks.iter().find(|b| b.cidr == a.cidr).map_or(0, Block::used);
                    vec![a.node.clone(), a.cidr.to_string(), used.to_string()]
                })
                .collect();
            table(&["NODE", "BLOCK", "USED"], &rows)
        }
    }
}

/// One row of `get handles`: a handle and the addresses it holds.
#[derive(Clone, Debug, Serialize)]
pub struct HandleRow {
    /// The handle.
    pub handle: String,
    /// Its addresses.
    pub addresses: Vec<String>,
    /// The pod's namespace, if recorded.
    pub namespace: Option<String>,
    /// The pod, if recorded.
    pub pod: Option<String>,
    /// The node using the addresses.
    pub node: String,
}

/// The handles of a snapshot with their addresses.
pub fn handle_rows(snapshot: &Snapshot) -> Vec<HandleRow> {
    let mut rows: BTreeMap<&str, HandleRow> = BTreeMap::new();
    for h in &snapshot.handles {
        rows.insert(
            &h.handle,
            HandleRow { handle: h.handle.clone(), addresses: vec![], namespace: None, pod: None, node: String::new() },
        );
    }
    for block in &snapshot.blocks {
        for (ip, a) in block.allocated() {
            if let Some(row) = rows.get_mut(a.handle.as_str()) {
                row.addresses.push(ip.to_string());
                row.namespace.clone_from(&a.namespace);
                row.pod.clone_from(&a.pod);
                row.node.clone_from(&a.node);
            }
        }
    }
    rows.into_values().collect()
}

/// `get handles`.
pub fn handles(snapshot: &Snapshot, format: Format) -> String {
    let rows = handle_rows(snapshot);
    match format {
        Format::Yaml => serde_yaml::to_string(&rows).unwrap_or_default(),
        Format::Json => serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n",
        Format::Table | Format::Wide => table(
            &["HANDLE", "ADDRESSES", "NAMESPACE", "POD", "NODE"],
            &rows
                .into_iter()
                .map(|r| {
                    vec![
                        r.handle,
                        r.addresses.join(","),
                        r.namespace.unwrap_or_default(),
                        r.pod.unwrap_or_default(),
                        r.node,
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

fn pools_annotation(ns: &Namespace, keys: [&str; 2]) -> String {
    keys.iter()
        .find_map(|k| ns.metadata.annotations.get(*k))
        .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
        .map_or_else(|| "<any>".to_string(), |v| v.join(","))
}

/// `get namespaces`.
pub fn namespaces(namespaces: &[Namespace], format: Format) -> String {
    match format {
        Format::Yaml => to_yaml_documents("Namespace", namespaces),
        Format::Json => json_list("Namespace", namespaces),
        Format::Table | Format::Wide => {
            let rows: Vec<Vec<String>> = namespaces
                .iter()
                .map(|ns| {
                    let labels: Vec<String> = ns.metadata.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        ns.name().to_string(),
                        pools_annotation(ns, [ANNOTATION_IPV4_POOLS, CALICO_ANNOTATION_IPV4_POOLS]),
                        pools_annotation(ns, [ANNOTATION_IPV6_POOLS, CALICO_ANNOTATION_IPV6_POOLS]),
                        labels.join(","),
                    ]
                })
                .collect();
            table(&["NAME", "IPV4 POOLS", "IPV6 POOLS", "LABELS"], &rows)
        }
    }
}

/// `get nodes`: the nodes registered in the datastore (alive while their agents are).
pub fn nodes(nodes: &[crate::cluster::NodeRecord], format: Format) -> String {
    match format {
        Format::Yaml => serde_yaml::to_string(nodes).unwrap_or_default(),
        Format::Json => serde_json::to_string_pretty(nodes).map(|s| s + "\n").unwrap_or_default(),
        Format::Table | Format::Wide => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let addresses: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
                    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![n.name.clone(), addresses.join(","), labels.join(",")]
                })
                .collect();
            table(&["NAME", "ADDRESSES", "LABELS"], &rows)
        }
    }
}

/// A utilisation bar: `[#####...............]  25.0%`.
pub fn bar(used: u128, total: u128) -> String {
    const WIDTH: u128 = 20;
    let filled = if total == 0 { 0 } else { (used * WIDTH).div_ceil(total).min(WIDTH) };
    let percent = if total == 0 { 0.0 } else { used as f64 * 100.0 / total as f64 };
    format!(
        "[{}{}] {percent:5.1}%",
        "#".repeat(usize::try_from(filled).unwrap_or(0)),
        ".".repeat(usize::try_from(WIDTH - filled).unwrap_or(0))
    )
}

/// `ipam show`: per pool, what is claimed and used.
pub fn ipam_show(snapshot: &Snapshot) -> String {
    let rows: Vec<Vec<String>> = snapshot
        .pools
        .iter()
        .map(|pool| {
            let blocks: Vec<&Block> = snapshot.blocks.iter().filter(|b| pool.cidr().contains(&b.cidr)).collect();
            let used = snapshot.used_in(pool);
            let size = pool.size();
            let total_blocks = prefix_size(pool.cidr()) / prefix_size(ipnet_of(pool));
            vec![
                pool.name().to_string(),
                pool.cidr().to_string(),
                format!("/{}", pool.block_size()),
                format!("{}/{}", blocks.len(), total_blocks),
                used.to_string(),
                (size - used).to_string(),
                bar(used, size),
            ]
        })
        .collect();
    table(&["POOL", "CIDR", "BLOCK SIZE", "BLOCKS", "USED", "FREE", "UTILISATION"], &rows)
}

fn ipnet_of(pool: &IpPool) -> ipnet::IpNet {
    ipnet::IpNet::new(pool.cidr().network(), pool.block_size()).unwrap_or(pool.cidr())
}

/// `ipam show --blocks`: per block, its node and use.
pub fn ipam_show_blocks(snapshot: &Snapshot) -> String {
    let rows: Vec<Vec<String>> = snapshot
        .blocks
        .iter()
        .map(|b| {
            vec![
                b.cidr.to_string(),
                b.pool.clone(),
                b.affinity.clone().unwrap_or_else(|| "<none>".into()),
                format!("{}/{}", b.used(), b.size()),
                bar(u128::from(b.used()), u128::from(b.size())),
            ]
        })
        .collect();
    table(&["BLOCK", "POOL", "NODE", "USED", "UTILISATION"], &rows)
}

/// `ipam show --mismatched`.
pub fn mismatched(found: &[crate::ipam::mismatch::Mismatch]) -> String {
    if found.is_empty() {
        return "no pod holds an address outside the pools its namespace asks for\n".to_string();
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|m| vec![m.namespace.clone(), m.pod.clone(), m.address.to_string(), m.pool.clone(), m.expected.clone()])
        .collect();
    table(&["NAMESPACE", "POD", "ADDRESS", "POOL", "WOULD GET NOW"], &rows)
}
