//! The plugin<->agent protocol: one JSON request per connection on the agent's Unix socket, ended by a
//! newline or by the client closing its side, one JSON response, then the connection closes. Requests and
//! responses are versioned by their shape; unknown fields are refused so a mismatched plugin and agent fail
//! loudly instead of half-working.
//!
//! An ADD with [`AddRequest::host_index_follows`] keeps the client's side open after the request: the plugin
//! creates the veth while the agent allocates, then writes the host side's interface index on a line of its
//! own once that side is up (and closes). Closing without it tells the agent the veth could not be made,
//! so the agent gives the addresses back at once instead of waiting for an interface that will not come.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The agent's default socket.
pub const DEFAULT_SOCKET: &str = "/run/poolwarden/agent.sock";

/// The largest request or response accepted, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What the plugin (or the CLI) asks the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Allocate addresses for an attachment and program the host side.
    Add(AddRequest),
    /// Release an attachment's addresses and remove what the agent programmed for it.
    Del(DelRequest),
    /// Whether the agent is ready to serve ADDs on this node.
    Status,
    /// Release every attachment on this node that is not in the list.
    Gc(GcRequest),
    /// A `poolwarden` command, run by the agent because it holds the datastore.
    Cli(CliRequest),
}

/// A command line forwarded by `poolwarden` to the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliRequest {
    /// The arguments after the program name, with file paths made absolute.
    pub args: Vec<String>,
    /// Standard input, for `apply -f -`.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// An ADD.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub netns: String,
    /// `K8S_POD_NAMESPACE` (empty: `default`).
    #[serde(default)]
    pub namespace: String,
    /// `K8S_POD_NAME`.
    #[serde(default)]
    pub pod: String,
    /// The host side of the pod's veth, which the plugin creates while the agent allocates (the agent waits
    /// for it); empty in IPAM-only mode (nothing to route to).
    #[serde(default)]
    pub host_ifname: String,
    /// Pools from the network configuration (names or CIDRs, either family).
    #[serde(default)]
    pub pools: Vec<String>,
    /// Specific addresses (`runtimeConfig.ips`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The plugin writes the host interface's index on this connection once it is up (see the module's
    /// documentation); otherwise the agent waits for an interface named `host_ifname` to come up.
    #[serde(default)]
    pub host_index_follows: bool,
    /// Where enforcement attaches on the host side.
    #[serde(default)]
    pub hook: EnforcementHook,
    /// IPAM-only with `enforce`: the node's side of the pod's veth, which the main plugin (a bridge) made and
    /// enslaved. The agent enforces there and routes nothing to it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge_port: String,
    /// The network configuration's `name`: a CNI GC is scoped to its network.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
}

/// Where the agent attaches a pod's enforcement program on its host side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementHook {
    /// A `cls_bpf` filter on the host side's clsact qdisc: the cheapest attach (well under a millisecond),
    /// but it holds the interface's ingress qdisc slot.
    #[default]
    Clsact,
    /// A TCX link (no qdisc; pinned so that it outlives the agent), for chains where a plugin after
    /// poolwarden puts an ingress qdisc on the host side (Debian's `bandwidth`, for an egress limit). Its attach
    /// waits for an RCU grace period, so only pods that need it pay for it.
    Tcx,
}

/// A DEL.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The host side of the pod's veth, which the agent removes after answering (empty in IPAM-only mode).
    #[serde(default)]
    pub host_ifname: String,
}

/// One attachment that GC must keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface.
    pub ifname: String,
}

/// A GC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Everything of `network` still in use on this node.
    pub valid_attachments: Vec<Attachment>,
    /// The network the GC is for: only its attachments are candidates.
    #[serde(default)]
    pub network: String,
}

/// One assigned address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedIp {
    /// The address with its prefix as configured in the pod (/32 or /128).
    pub address: IpNet,
    /// The pool it came from.
    pub pool: String,
    /// The pool's range (what an IPAM-only result reports as the subnet unless told otherwise).
    pub pool_cidr: IpNet,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Response {
    /// ADD succeeded.
    Added {
        /// The addresses, IPv4 first.
        ips: Vec<AssignedIp>,
    },
    /// DEL succeeded (also when there was nothing to delete).
    Deleted {
        /// The addresses released.
        released: Vec<IpAddr>,
    },
    /// STATUS: ready.
    Ready,
    /// GC done.
    Collected {
        /// The addresses released.
        released: Vec<IpAddr>,
    },
    /// What a forwarded command printed, and its exit code.
    CliOutput {
        /// Standard output.
        stdout: String,
        /// Standard error.
        stderr: String,
        /// Exit code.
        exit: u8,
    },
    /// Something failed.
    Error(ErrorReply),
}

/// A failure, with the CNI error code the plugin must report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// A CNI error code (see [`crate::spec::code`]).
    pub code: u32,
    /// What went wrong, naming what the user configured.
    pub msg: String,
    /// More detail.
    #[serde(default)]
    pub details: String,
}
