//! The CNI specification's data: network configuration in, results and errors out (spec 1.0.0 and 1.1.0).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// The name this plugin answers to in `type` (and `ipam.type`).
pub const PLUGIN_TYPE: &str = "poolwarden-cni";

/// The CNI error codes (spec section "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs (the agent is unreachable).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: no address can be allocated (the pools this node may use are exhausted).
    pub const LIMITED_CONNECTIVITY_NO_ADDRESSES: u32 = 51;
    /// Ours: the agent refused the request (pool refused, unknown pool, exhausted).
    pub const IPAM_REFUSED: u32 = 100;
    /// Ours: setting up the pod's interface failed.
    pub const INTERFACE_SETUP: u32 = 101;
}

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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The netns path, for interfaces inside the container.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
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
}

/// A route in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The destination.
    pub dst: IpNet,
    /// The next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// A result, as printed after ADD.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
