//! `natOutgoing`: traffic from a NAT pool to destinations outside every pool is masqueraded to the node's
//! address, in an nftables table the agent owns (`inet poolwarden_nat`) and replaces whole, atomically, each
//! time the pools change; nothing else in the ruleset is touched. Pools with `natOutgoing: false` keep
//! their pods' addresses visible to the external firewall.
//!
//! The ruleset goes through `nft -f -` in one transaction (as kube-proxy's nftables mode does): one process
//! per change of the pools, not per packet path or per pod.

use std::{io::Write as _, process::Stdio};

use ipnet::IpNet;

use crate::resources::IpPool;

/// The table the agent owns.
pub const TABLE: &str = "poolwarden_nat";

/// Errors programming NAT.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not be run.
    #[error("natOutgoing needs the nft command (Debian package nftables): {0}")]
    Missing(std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft refused the {TABLE} ruleset: {0}")]
    Refused(String),
}

fn elements(nets: &[IpNet]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The nftables script that makes the table match `pools`: it replaces the table when some pool has
/// `natOutgoing`, and removes it when none does. (`add table` first, so the `delete` never fails.)
pub fn script(pools: &[IpPool]) -> String {
    let mut out = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
    let of = |v6: bool, nat_only: bool| -> Vec<IpNet> {
        pools.iter().filter(|p| p.is_ipv6() == v6 && (!nat_only || p.spec.nat_outgoing)).map(IpPool::cidr).collect()
    };
    let families = [(false, "ip", "ipv4_addr", "4"), (true, "ip6", "ipv6_addr", "6")];
    if families.iter().all(|(v6, ..)| of(*v6, true).is_empty()) {
        return out;
    }
    out.push_str(&format!("table inet {TABLE} {{\n"));
    let mut rules = String::new();
    for (v6, proto, kind, suffix) in families {
        let (all, nat) = (of(v6, false), of(v6, true));
        if nat.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\tset pools{suffix} {{\n\t\ttype {kind}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
            elements(&all)
        ));
        out.push_str(&format!(
            "\tset nat{suffix} {{\n\t\ttype {kind}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
            elements(&nat)
        ));
        rules.push_str(&format!("\t\t{proto} saddr @nat{suffix} {proto} daddr != @pools{suffix} masquerade\n"));
    }
    out.push_str("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
    out.push_str(&rules);
    out.push_str("\t}\n}\n");
    out
}

/// Run an nftables script in one transaction.
pub fn run_nft(script: &str) -> Result<(), NatError> {
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NatError::Missing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| NatError::Refused(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| NatError::Refused(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NatError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// The agent's NAT table: applied when the pools change (and once at start, whatever was there before).
#[derive(Default)]
pub struct Nat {
    applied: std::sync::Mutex<Option<String>>,
}

impl Nat {
    /// Make the table match `pools`; returns whether anything was written. Without any NAT pool and
    /// without `nft` installed there is nothing to do, and that is no error.
    pub fn apply(&self, pools: &[IpPool]) -> Result<bool, NatError> {
        let wanted = script(pools);
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.as_deref() == Some(wanted.as_str()) {
            return Ok(false);
        }
        match run_nft(&wanted) {
            Err(NatError::Missing(_)) if !pools.iter().any(|p| p.spec.nat_outgoing) => {}
            other => other?,
        }
        *applied = Some(wanted);
        Ok(true)
    }

    /// Remove the table (uninstall).
    pub fn remove() -> Result<(), NatError> {
        run_nft(&script(&[]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Resource, parse_documents};

    fn pools(yaml: &str) -> Vec<IpPool> {
        parse_documents("p.yaml", yaml)
            .unwrap()
            .into_iter()
            .filter_map(|d| if let Resource::IpPool(p) = d.resource { Some(p) } else { None })
            .collect()
    }

    #[test]
    fn masquerades_nat_pools_to_destinations_outside_every_pool() {
        let pools = pools(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.1.0.0/24, natOutgoing: true}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.2.0.0/24}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: c}\nspec: {cidr: \"fd00::/120\"}\n",
        );
        let text = script(&pools);
        assert!(
            text.contains(
                "set pools4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.1.0.0/24, 10.2.0.0/24 }"
            ),
            "{text}"
        );
        assert!(
            text.contains("set nat4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.1.0.0/24 }"),
            "{text}"
        );
        assert!(text.contains("ip saddr @nat4 ip daddr != @pools4 masquerade"), "{text}");
        assert!(!text.contains("ip6 saddr"), "no IPv6 pool has NAT: {text}");
    }

    #[test]
    fn no_nat_pool_removes_the_table() {
        assert_eq!(script(&[]), format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"));
    }
}
