//! The CNI specification's data: network configuration in, results and errors out, for every version
//! runtimes send (0.3.0 to 1.1.0). A result of any of them parses into one model ([`CniResult`], which is
//! 1.x's), and [`encode_result`] writes it in the version the configuration asks for, as libcni's
//! `types/040` and `types/100` convert: `ips[].version` before 1.0.0, 1.1.0's interface and route fields only
//! in 1.1.0.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The first version with CHECK.
pub const CHECK_SINCE: &str = "0.4.0";

/// The first version with GC and STATUS.
pub const GC_SINCE: &str = "1.1.0";

/// Whether version `a` is at least `b` (both `x.y.z`; anything unparsable is older than everything).
pub fn version_at_least(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Option<(u32, u32, u32)> {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
        let triple = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(triple)
    };
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

/// `result` as the configuration's `version` writes it: before 1.0.0 each address says its family
/// (`"version": "4"` or `"6"`); fields that only 1.1.0 defines are dropped from older versions' results.
pub fn encode_result(result: &CniResult, version: &str) -> Value {
    let mut result = result.clone();
    result.cni_version = version.to_string();
    if !version_at_least(version, "1.1.0") {
        for interface in &mut result.interfaces {
            interface.extra.clear();
        }
        for route in &mut result.routes {
            route.extra.clear();
        }
    }
    let mut value = serde_json::to_value(&result).unwrap_or(Value::Null);
    if !version_at_least(version, "1.0.0")
        && let Some(ips) = value.get_mut("ips").and_then(Value::as_array_mut)
    {
        for (ip, parsed) in ips.iter_mut().zip(&result.ips) {
            if let Some(ip) = ip.as_object_mut() {
                let family = if parsed.address.addr().is_ipv4() { "4" } else { "6" };
                ip.insert("version".into(), Value::String(family.into()));
            }
        }
    }
    value
}

/// The name this plugin answers to in `type` (and `ipam.type`).
pub const PLUGIN_TYPE: &str = "poolwarden-cni";

pub use poolwarden_protocol::code;

/// A CNI error as printed on stdout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    /// The version of the request (or the newest we speak).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The error code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// The detail.
    pub details: String,
}

impl CniError {
    /// An error with a code, message and detail.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { cni_version: "1.1.0".into(), code, msg: msg.into(), details: details.into() }
    }
}

/// Options poolwarden reads from the network configuration (top level, or the `ipam` section in IPAM-only mode).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Options {
    /// The agent's socket.
    #[serde(default)]
    pub socket: Option<String>,
    /// Pools to use when no annotation names any (names or CIDRs).
    #[serde(default)]
    pub pools: Vec<String>,
    /// MTU of the pod's interface.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// IPAM-only: the subnet whose prefix length the result reports (default: the pool's).
    #[serde(default)]
    pub subnet: Option<IpNet>,
    /// IPAM-only: the gateway the result reports (keep it outside the pool).
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Where the agent attaches enforcement: `clsact` (default) or `tcx`, which a chain with `bandwidth`
    /// after poolwarden needs (it also follows from `runtimeConfig.bandwidth`, with the `bandwidth`
    /// capability declared).
    #[serde(rename = "enforcementHook", default, skip_serializing_if = "Option::is_none")]
    pub enforcement_hook: Option<crate::protocol::EnforcementHook>,
    /// IPAM-only: enforce the pod's source address on the node's side of its veth (the bridge port the main
    /// plugin made), as the agent does on its own veths.
    #[serde(default)]
    pub enforce: bool,
    /// IPAM-only, as host-local's: the first address that may be given (in `subnet`).
    #[serde(rename = "rangeStart", default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    /// IPAM-only, as host-local's: the last address that may be given (in `subnet`).
    #[serde(rename = "rangeEnd", default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    /// IPAM-only, as host-local's: one set of ranges per family; the first range of each set gives that
    /// family's `subnet`, `rangeStart`, `rangeEnd` and `gateway`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<Vec<RangeEntry>>,
    /// IPAM-only: routes the result reports (the main plugin installs them in the pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// One of host-local's `ranges`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeEntry {
    /// The subnet.
    pub subnet: IpNet,
    /// The first address that may be given.
    #[serde(rename = "rangeStart", default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    /// The last address that may be given.
    #[serde(rename = "rangeEnd", default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    /// The gateway (default: the subnet's first address after its network address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// The network configuration given on stdin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    /// The spec version the runtime speaks.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// For GC/STATUS: the versions of the list.
    #[serde(rename = "cniVersions", default, skip_serializing_if = "Vec::is_empty")]
    pub cni_versions: Vec<String>,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// The plugin type.
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Our options, when we are the main plugin.
    #[serde(flatten)]
    pub options: Options,
    /// The IPAM section; when its type is ours and the main type is not, we are only the IPAM plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSection>,
    /// The previous plugin's result in a chain.
    #[serde(rename = "prevResult", default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// Runtime-provided values (`ips`).
    #[serde(rename = "runtimeConfig", default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<RuntimeConfig>,
    /// GC: the attachments to keep.
    #[serde(rename = "cni.dev/valid-attachments", default, skip_serializing_if = "Option::is_none")]
    pub valid_attachments: Option<Vec<crate::protocol::Attachment>>,
}

/// The `ipam` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamSection {
    /// The IPAM plugin type.
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Our options in IPAM-only mode.
    #[serde(flatten)]
    pub options: Options,
}

/// `runtimeConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// Requested addresses, with or without a prefix length.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The pod's traffic limits (the `bandwidth` capability): a plugin after us shapes the host side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<serde_json::Value>,
}

/// An interface in a result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The netns path, for interfaces inside the container.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// What later versions add (1.1.0's `mtu`, `socketPath`, `pciID`), kept from a chain's earlier plugins.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, Value>,
}

/// An address in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with prefix.
    pub address: IpNet,
    /// The gateway, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Before 1.0.0: `"4"` or `"6"` (read and checked, written by [`encode_result`]).
    #[serde(default, skip_serializing)]
    pub version: Option<String>,
}

/// A route in a result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// The destination.
    pub dst: IpNet,
    /// The next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// What later versions add (1.1.0's `mtu`, `advmss`, `priority`, `table`, `scope`).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, Value>,
}

/// A result, as printed after ADD.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    /// The version of the request.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Interfaces created.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes configured in the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS (we set none, but pass through what a chain had).
    #[serde(default)]
    pub dns: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn results_convert_between_versions_as_libcni_does() {
        // A 0.3.1 result (with ips[].version) and a 1.1.0 one (with route and interface fields of 1.1.0)
        // parse into one model.
        let old: CniResult = serde_json::from_value(json!({
            "cniVersion": "0.3.1",
            "interfaces": [ { "name": "eth0", "sandbox": "/var/run/netns/x" } ],
            "ips": [ { "version": "4", "address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0 } ],
            "routes": [ { "dst": "0.0.0.0/0" } ],
            "dns": {}
        }))
        .expect("0.3.1");
        let new: CniResult = serde_json::from_value(json!({
            "cniVersion": "1.1.0",
            "interfaces": [ { "name": "eth0", "sandbox": "/var/run/netns/x", "mtu": 1400 } ],
            "ips": [ { "address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0 } ],
            "routes": [ { "dst": "0.0.0.0/0", "table": 100 } ],
            "dns": {}
        }))
        .expect("1.1.0");
        assert_eq!(
            old.ips,
            new.ips.iter().map(|ip| IpConfig { version: Some("4".into()), ..ip.clone() }).collect::<Vec<_>>()
        );

        let v031 = encode_result(&new, "0.3.1");
        assert_eq!(v031["cniVersion"], "0.3.1");
        assert_eq!(v031["ips"][0]["version"], "4");
        assert!(v031["interfaces"][0].get("mtu").is_none() && v031["routes"][0].get("table").is_none(), "{v031}");
        let v100 = encode_result(&old, "1.0.0");
        assert!(v100["ips"][0].get("version").is_none(), "{v100}");
        let v110 = encode_result(&new, "1.1.0");
        assert_eq!(
            (v110["interfaces"][0]["mtu"].clone(), v110["routes"][0]["table"].clone()),
            (json!(1400), json!(100))
        );
        let v6: CniResult =
            serde_json::from_value(json!({ "cniVersion": "1.0.0", "ips": [ { "address": "fd00::2/64" } ] }))
                .expect("v6");
        assert_eq!(encode_result(&v6, "0.4.0")["ips"][0]["version"], "6");
    }

    #[test]
    fn versions_compare_by_number() {
        assert!(version_at_least("1.1.0", "0.4.0") && version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0") && !version_at_least("0.10", "0.4.0"));
        assert!(version_at_least("0.10.0", "0.4.0"));
    }
}
