//! What an external firewall needs to trust "source in pool X": per pool, its CIDR, the namespaces allowed
//! to use it and those assigned to it, and whether the node masquerades it; rendered as JSON, CSV, an
//! nftables ruleset of named sets, or an `ipset restore` file for iptables. Pure: values in, text out.

use std::fmt::Write as _;

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    ipam::{
        NamespaceInfo,
        selection::{annotated_pools, names_pool, namespace_refusal},
    },
    resources::IpPool,
};

/// The nftables table (and the prefix of the ipset sets) the export defines.
pub const NFT_TABLE: &str = "poolwarden_pools";

/// The first line of the nftables export.
const NFT_HEADER: &str = "# poolwarden firewall export: one named set per pool, in table inet poolwarden_pools.";
/// The first line of the ipset export.
const IPSET_HEADER: &str = "# poolwarden firewall export for iptables: one ipset per pool.";
/// The last line of the nftables and ipset exports: `--watch` prints one export after another, and a
/// loader applies each when it reads this line.
pub const EXPORT_END: &str = "# end of poolwarden firewall export";

/// The temporary set a pool's ipset is filled in before the swap (ipset names are at most 31 bytes). Its
/// `-` never occurs in a [`set_name`], so it can never be another pool's live set.
fn swap_name(set: &str) -> String {
    let mut base = set.to_string();
    base.truncate(26);
    format!("{base}-swap")
}

/// The sets an nftables or ipset export defines (read back from its text, for `--watch`).
pub fn sets_in(export: &str) -> std::collections::BTreeSet<String> {
    let prefix = format!("add set inet {NFT_TABLE} ");
    export
        .lines()
        .filter_map(|line| match line.strip_prefix(&prefix) {
            Some(rest) => rest.split_whitespace().next(),
            None => {
                line.strip_prefix("create ").and_then(|r| r.split_whitespace().next()).filter(|s| !s.ends_with("-swap"))
            }
        })
        .map(str::to_string)
        .collect()
}

/// Lines that empty the sets of pools that were exported before and are gone now, to go before the
/// export's last line: a rule that trusts a deleted pool's set then matches nothing (fails closed).
/// The sets stay, so rules referencing them stay valid. Empty for JSON and CSV.
pub fn flush_gone(export: &str, gone: &std::collections::BTreeSet<String>) -> String {
    let nftables = export.starts_with(NFT_HEADER);
    if !nftables && !export.starts_with(IPSET_HEADER) {
        return String::new();
    }
    let mut out = String::new();
    for set in gone {
        let _ = writeln!(out, "# pool gone: its set stays, empty");
        if nftables {
            let _ = writeln!(out, "flush set inet {NFT_TABLE} {set}");
        } else {
            let _ = writeln!(out, "flush {set}");
        }
    }
    out
}

/// How `firewall export` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// An nftables ruleset (`nft -f`): one named interval set per pool, in table `inet poolwarden_pools`.
    Nftables,
    /// An `ipset restore` file: one `hash:net` set per pool, for iptables' `-m set --match-set`.
    Iptables,
    /// A JSON document.
    Json,
    /// Comma-separated values, one row per pool CIDR.
    Csv,
}

/// Which namespaces may use a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Allowed {
    /// Every namespace (no `allowedNamespaces`, no `namespaceSelector`): written `*`.
    Any(String),
    /// Only these (of the namespaces that exist now).
    Only(Vec<String>),
}

/// One pool, as the firewall team sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolExport {
    /// The pool.
    pub pool: String,
    /// The named set carrying its CIDRs.
    pub set: String,
    /// Its ranges.
    pub cidrs: Vec<IpNet>,
    /// Namespaces the pool admits.
    pub allowed_namespaces: Allowed,
    /// Namespaces whose annotation names this pool (their pods take addresses from it).
    pub assigned_namespaces: Vec<String>,
    /// Whether the node masquerades the pool's traffic to destinations outside every pool (then the
    /// firewall sees node addresses, not pod addresses).
    pub nat_outgoing: bool,
    /// Disabled pools hand out no new addresses; existing pods keep theirs.
    pub disabled: bool,
}

/// The longest set name ipset takes (nftables takes longer ones; one name serves both).
const SET_NAME_MAX: usize = 31;

/// The set name for a pool, unique per pool and at most 31 bytes: `pool_` and the name with `-` as `_`
/// (pool names never contain `_`, so that alone cannot make two the same); a name with a `.` (`a.b` would
/// meet `a-b`) or too long for that keeps a 17-byte prefix and gets 8 hex digits of a hash of the whole name.
pub fn set_name(pool: &str) -> String {
    let body: String = pool.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let plain = format!("pool_{body}");
    if !pool.contains('.') && pool.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && plain.len() <= SET_NAME_MAX
    {
        return plain;
    }
    let hash = pool.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let mut prefix = plain;
    prefix.truncate(SET_NAME_MAX - 9);
    format!("{prefix}_{hash:08x}")
}

/// The export of `pools` (only `only` when given), with namespaces evaluated against `namespaces`.
pub fn export(pools: &[IpPool], namespaces: &[NamespaceInfo], only: Option<&str>) -> Vec<PoolExport> {
    pools
        .iter()
        .filter(|p| only.is_none_or(|name| p.name() == name))
        .map(|pool| {
            let unrestricted = pool.spec.allowed_namespaces.is_empty() && pool.spec.namespace_selector.is_all();
            let allowed = if unrestricted {
                Allowed::Any("*".to_string())
            } else {
                Allowed::Only(
                    namespaces
                        .iter()
                        .filter(|ns| namespace_refusal(pool, ns).is_none())
                        .map(|ns| ns.name.clone())
                        .collect(),
                )
            };
            let assigned = namespaces
                .iter()
                .filter(|ns| {
                    matches!(annotated_pools(ns, None, pool.is_ipv6()), Some((_, Ok(names)))
                        if names.iter().any(|n| names_pool(n, pool)))
                })
                .map(|ns| ns.name.clone())
                .collect();
            PoolExport {
                pool: pool.name().to_string(),
                set: set_name(pool.name()),
                cidrs: vec![pool.cidr()],
                allowed_namespaces: allowed,
                assigned_namespaces: assigned,
                nat_outgoing: pool.spec.nat_outgoing,
                disabled: pool.spec.disabled,
            }
        })
        .collect()
}

fn allowed_text(allowed: &Allowed, separator: &str) -> String {
    match allowed {
        Allowed::Any(all) => all.clone(),
        Allowed::Only(names) if names.is_empty() => "<none>".to_string(),
        Allowed::Only(names) => names.join(separator),
    }
}

fn summary(p: &PoolExport) -> String {
    let assigned = if p.assigned_namespaces.is_empty() { "<none>".into() } else { p.assigned_namespaces.join(",") };
    let nat = if p.nat_outgoing {
        "natOutgoing: masqueraded to the node's address outside the pools"
    } else {
        "natOutgoing: off, pod addresses reach the firewall"
    };
    format!(
        "pool {}: allowed namespaces {}; assigned to {}; {nat}{}",
        p.pool,
        allowed_text(&p.allowed_namespaces, ","),
        assigned,
        if p.disabled { "; disabled" } else { "" }
    )
}

/// Render the export.
pub fn render(pools: &[PoolExport], format: ExportFormat) -> String {
    render_with_retired(pools, &[], format)
}

/// Render the export, emptying the sets of deleted pools (`retired`: set name, IPv6) in the nftables and
/// ipset formats: their sets stay, so rules naming them stay valid, and match nothing.
pub fn render_with_retired(pools: &[PoolExport], retired: &[(String, bool)], format: ExportFormat) -> String {
    let text = render_pools(pools, format);
    let mut flush = String::new();
    for (set, ipv6) in retired {
        match format {
            ExportFormat::Nftables => {
                let kind = if *ipv6 { "ipv6_addr" } else { "ipv4_addr" };
                let _ = writeln!(flush, "# deleted pool: its set stays, empty");
                let _ = writeln!(flush, "add set inet {NFT_TABLE} {set} {{ type {kind}; flags interval; }}");
                let _ = writeln!(flush, "flush set inet {NFT_TABLE} {set}");
            }
            ExportFormat::Iptables => {
                let family = if *ipv6 { "inet6" } else { "inet" };
                let _ = writeln!(flush, "# deleted pool: its set stays, empty");
                let _ = writeln!(flush, "create {set} hash:net family {family}");
                let _ = writeln!(flush, "flush {set}");
            }
            ExportFormat::Json | ExportFormat::Csv => {}
        }
    }
    match text.strip_suffix(&format!("{EXPORT_END}\n")) {
        Some(body) if !flush.is_empty() => format!("{body}{flush}{EXPORT_END}\n"),
        _ => text,
    }
}

fn render_pools(pools: &[PoolExport], format: ExportFormat) -> String {
    let mut out = String::new();
    match format {
        ExportFormat::Json => {
            out = serde_json::to_string_pretty(&serde_json::json!({ "pools": pools })).unwrap_or_default() + "\n";
        }
        ExportFormat::Csv => {
            out.push_str("pool,cidr,family,allowed_namespaces,assigned_namespaces,nat_outgoing,disabled\n");
            for p in pools {
                for cidr in &p.cidrs {
                    let family = if cidr.addr().is_ipv6() { "ipv6" } else { "ipv4" };
                    let _ = writeln!(
                        out,
                        "{},{cidr},{family},{},{},{},{}",
                        p.pool,
                        allowed_text(&p.allowed_namespaces, ";"),
                        p.assigned_namespaces.join(";"),
                        p.nat_outgoing,
                        p.disabled
                    );
                }
            }
        }
        ExportFormat::Nftables => {
            let _ = writeln!(out, "{NFT_HEADER}");
            let _ = writeln!(
                out,
                "# `nft -f FILE` applies it as one transaction: it creates the table and the sets when missing"
            );
            let _ = writeln!(
                out,
                "# and replaces each set's elements, and touches nothing else: chains of your own in the table"
            );
            let _ =
                writeln!(out, "# (e.g. `ip saddr @pool_x accept`; sets are only usable from their own table) survive.");
            let _ = writeln!(out, "add table inet {NFT_TABLE}");
            for p in pools {
                let _ = writeln!(out, "# {}", summary(p));
                let kind = if p.cidrs.iter().all(|c| c.addr().is_ipv6()) { "ipv6_addr" } else { "ipv4_addr" };
                let _ = writeln!(out, "add set inet {NFT_TABLE} {} {{ type {kind}; flags interval; }}", p.set);
                let _ = writeln!(out, "flush set inet {NFT_TABLE} {}", p.set);
                if !p.cidrs.is_empty() {
                    let elements: Vec<String> = p.cidrs.iter().map(ToString::to_string).collect();
                    let _ = writeln!(out, "add element inet {NFT_TABLE} {} {{ {} }}", p.set, elements.join(", "));
                }
            }
            let _ = writeln!(out, "{EXPORT_END}");
        }
        ExportFormat::Iptables => {
            let _ = writeln!(out, "{IPSET_HEADER}");
            let _ = writeln!(
                out,
                "# Load with `ipset restore -exist < FILE`: each set is filled as a temporary set and swapped"
            );
            let _ = writeln!(out, "# in, so a packet never meets it half-filled; then match with");
            let _ = writeln!(
                out,
                "# `iptables -A FORWARD -m set --match-set pool_x src -j ACCEPT` (ip6tables for IPv6 sets)."
            );
            for p in pools {
                let _ = writeln!(out, "# {}", summary(p));
                let family = if p.cidrs.iter().all(|c| c.addr().is_ipv6()) { "inet6" } else { "inet" };
                let swap = swap_name(&p.set);
                let _ = writeln!(out, "create {} hash:net family {family}", p.set);
                let _ = writeln!(out, "create {swap} hash:net family {family}");
                let _ = writeln!(out, "flush {swap}");
                for cidr in &p.cidrs {
                    let _ = writeln!(out, "add {swap} {cidr}");
                }
                let _ = writeln!(out, "swap {swap} {}", p.set);
                let _ = writeln!(out, "destroy {swap}");
            }
            let _ = writeln!(out, "{EXPORT_END}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Resource, parse_documents};

    fn pools() -> Vec<IpPool> {
        let yaml = r#"
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: external-pool}
spec: {cidr: 10.10.0.0/24, blockSize: 29, natOutgoing: false, allowedNamespaces: [external-ns]}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: internal-pool}
spec: {cidr: 10.20.0.0/24, blockSize: 29, natOutgoing: true}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: v6-pool}
spec: {cidr: "fd00:10::/120", namespaceSelector: "team == 'blue'"}
"#;
        parse_documents("pools.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|d| match d.resource {
                Resource::IpPool(p) => p,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn ns(name: &str, labels: &[(&str, &str)], v4: Option<&str>) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: v4.map(|v| ("poolwarden.io/ipv4pools".to_string(), v.to_string())).into_iter().collect(),
        }
    }

    fn namespaces() -> Vec<NamespaceInfo> {
        vec![
            ns("external-ns", &[], Some("[\"external-pool\"]")),
            ns("internal-ns", &[("team", "blue")], Some("[\"10.20.0.0/24\"]")),
            ns("other", &[], None),
        ]
    }

    #[test]
    fn allowed_and_assigned_namespaces_per_pool() {
        let export = export(&pools(), &namespaces(), None);
        assert_eq!(export[0].allowed_namespaces, Allowed::Only(vec!["external-ns".into()]));
        assert_eq!(export[0].assigned_namespaces, vec!["external-ns".to_string()]);
        assert_eq!(export[1].allowed_namespaces, Allowed::Any("*".into()));
        assert_eq!(export[1].assigned_namespaces, vec!["internal-ns".to_string()], "named by CIDR");
        assert!(export[1].nat_outgoing);
        assert_eq!(export[2].allowed_namespaces, Allowed::Only(vec!["internal-ns".into()]));
        assert_eq!(export[2].set, "pool_v6_pool");
        assert_eq!(super::export(&pools(), &namespaces(), Some("internal-pool")).len(), 1);
    }

    #[test]
    fn renders_every_format() {
        let export = export(&pools(), &namespaces(), None);
        let nft = render(&export, ExportFormat::Nftables);
        assert!(
            nft.contains(
                "add set inet poolwarden_pools pool_external_pool { type ipv4_addr; flags interval; }\n\
                 flush set inet poolwarden_pools pool_external_pool\n\
                 add element inet poolwarden_pools pool_external_pool { 10.10.0.0/24 }\n"
            ),
            "{nft}"
        );
        assert!(nft.contains("add set inet poolwarden_pools pool_v6_pool { type ipv6_addr;"), "{nft}");
        // Nothing that would take the admin's chains with it.
        let commands: Vec<&str> = nft.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            commands.iter().all(|l| !l.contains("delete") && !l.contains("flush table") && !l.contains("chain")),
            "{nft}"
        );
        assert!(nft.ends_with(&format!("{EXPORT_END}\n")));
        let ipset = render(&export, ExportFormat::Iptables);
        assert!(
            ipset.contains(
                "create pool_internal_pool hash:net family inet\ncreate pool_internal_pool-swap hash:net family inet\n\
                 flush pool_internal_pool-swap\nadd pool_internal_pool-swap 10.20.0.0/24\n\
                 swap pool_internal_pool-swap pool_internal_pool\ndestroy pool_internal_pool-swap\n"
            ),
            "{ipset}"
        );
        assert!(!ipset.contains("flush pool_internal_pool\n"), "the live set is never flushed: {ipset}");
        assert!(ipset.contains("create pool_v6_pool hash:net family inet6"), "{ipset}");
        let sets: Vec<String> = sets_in(&nft).into_iter().collect();
        assert_eq!(sets, ["pool_external_pool", "pool_internal_pool", "pool_v6_pool"]);
        assert_eq!(sets_in(&ipset), sets_in(&nft));
        let gone = ["pool_old".to_string()].into_iter().collect();
        assert_eq!(
            flush_gone(&nft, &gone),
            "# pool gone: its set stays, empty\nflush set inet poolwarden_pools pool_old\n"
        );
        assert_eq!(flush_gone(&ipset, &gone), "# pool gone: its set stays, empty\nflush pool_old\n");
        assert_eq!(flush_gone("pool,cidr\n", &gone), "");
        assert_eq!(swap_name(&set_name(&"x".repeat(40))).len(), 31);
        // Deleted pools' sets are emptied by every load, before the end marker.
        let retired = [("pool_gone".to_string(), false)];
        let nft = render_with_retired(&export, &retired, ExportFormat::Nftables);
        assert!(
            nft.ends_with(&format!(
                "add set inet poolwarden_pools pool_gone {{ type ipv4_addr; flags interval; }}\n\
             flush set inet poolwarden_pools pool_gone\n{EXPORT_END}\n"
            )),
            "{nft}"
        );
        let ipset = render_with_retired(&export, &retired, ExportFormat::Iptables);
        assert!(ipset.contains("create pool_gone hash:net family inet\nflush pool_gone\n"), "{ipset}");
        assert_eq!(render_with_retired(&export, &retired, ExportFormat::Csv), render(&export, ExportFormat::Csv));
        // Unique and short enough for ipset, whatever the pool's name.
        assert_eq!(set_name("external-pool"), "pool_external_pool");
        assert_ne!(set_name("a-b"), set_name("a.b"));
        let long = "a-very-long-pool-name-for-the-payments-team";
        assert!(set_name(long).len() <= 31 && set_name(long).starts_with("pool_a_very_long_"), "{}", set_name(long));
        assert_ne!(set_name(long), set_name(&format!("{long}-2")));
        let csv = render(&export, ExportFormat::Csv);
        assert!(csv.contains("\nexternal-pool,10.10.0.0/24,ipv4,external-ns,external-ns,false,false\n"), "{csv}");
        assert!(csv.contains("\ninternal-pool,10.20.0.0/24,ipv4,*,internal-ns,true,false\n"), "{csv}");
        let json: serde_json::Value = serde_json::from_str(&render(&export, ExportFormat::Json)).unwrap();
        assert_eq!(json["pools"][0]["allowedNamespaces"], serde_json::json!(["external-ns"]));
        assert_eq!(json["pools"][1]["allowedNamespaces"], "*");
        assert_eq!(json["pools"][1]["natOutgoing"], true);
    }
}
