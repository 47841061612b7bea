//! The plugin<->agent protocol: one JSON request per connection on the agent's Unix socket, ended by a
//! newline or by the client closing its side, one JSON response, then the connection closes. Requests and
//! responses are versioned by their shape; unknown fields are refused so a mismatched plugin and agent fail
//! loudly instead of half-working.
//!
//! An ADD with [`AddRequest::host_index_follows`] keeps the client's side open after the request: the plugin
//! creates the veth while the agent allocates, then writes the host side's interface index on a line of its
//! own once that side is up (and closes). Closing without it tells the agent the veth could not be made,
//! so the agent gives the addresses back at once instead of waiting for an interface that will not come.
//!
//! This crate is what the plugin, the CLI and the agent share, and nothing else: the agent does not link the
//! plugin.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The agent's default socket.
pub const DEFAULT_SOCKET: &str = "/run/poolwarden/agent.sock";

/// The largest request the agent reads, and the largest answer the plugin reads, in bytes. The CLI reads
/// answers of any size (a `firewall export` of many pools is larger).
pub const MAX_MESSAGE: usize = 1 << 20;

/// How long the agent waits for a request's line once a client has connected: a client that connects and
/// says nothing is dropped, not kept forever.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The CNI error codes (spec section "Error"), and ours from 100 on.
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

/// The node's side of an attachment's veth: a hash of container ID and interface name, so that DEL finds it
/// without state, and so that the agent acts on no host interface but the one this attachment's plugin made.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    format!("pw{}", &format!("{:016x}", attachment_hash(container_id, ifname))[..13])
}

/// FNV-1a of container ID, a NUL, and interface name (the seed of the host side's name and MAC).
pub fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A container ID as the CNI spec allows it: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`. The error names the rule broken.
pub fn validate_container_id(id: &str) -> Result<(), String> {
    validate_identifier(id)
}

/// A network name as the CNI spec allows it (the same rule as a container ID).
pub fn validate_network_name(name: &str) -> Result<(), String> {
    validate_identifier(name)
}

fn validate_identifier(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    match chars.next() {
        None => return Err("it is empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!("it must start with a letter or digit, not {c:?}"));
        }
        Some(_) => {}
    }
    match chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        Some(c) => Err(format!("{c:?} is not allowed (only letters, digits, '_', '.' and '-')")),
        None => Ok(()),
    }
}

/// An interface name as Linux and the CNI spec allow it: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > 15 {
        return Err(format!("it is {} bytes long; Linux allows 15", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an interface name"));
    }
    match name.chars().find(|c| matches!(c, '/' | ':') || c.is_whitespace() || c.is_control()) {
        Some(c) => Err(format!("{c:?} is not allowed in an interface name")),
        None => Ok(()),
    }
}

/// Decode a request as the agent does: at most [`MAX_MESSAGE`] bytes of JSON naming a known command with no
/// unknown field. The error is the agent's reply (code 6).
pub fn decode_request(body: &[u8]) -> Result<Request, ErrorReply> {
    if body.len() > MAX_MESSAGE {
        return Err(ErrorReply {
            code: code::DECODE_FAILURE,
            msg: "request too large".into(),
            details: format!("more than {MAX_MESSAGE} bytes"),
        });
    }
    serde_json::from_slice(body).map_err(|e| ErrorReply {
        code: code::DECODE_FAILURE,
        msg: "the request could not be decoded".into(),
        details: e.to_string(),
    })
}

/// Why a call to the agent got no answer.
#[derive(Debug)]
pub enum CallError {
    /// Connecting, sending or reading failed.
    Unreachable(std::io::Error),
    /// The answer was longer than the caller reads.
    TooLarge(usize),
    /// The answer was not a [`Response`].
    Undecodable(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "{e}"),
            Self::TooLarge(limit) => write!(f, "the answer is longer than {limit} bytes"),
            Self::Undecodable(detail) => write!(f, "the answer could not be read: {detail}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Send one request and read its answer, at most `limit` bytes of it (`None`: any size).
pub async fn call(socket: &str, request: &Request, limit: Option<usize>) -> Result<Response, CallError> {
    let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(CallError::Unreachable)?;
    let mut body = serde_json::to_vec(request).map_err(|e| CallError::Undecodable(e.to_string()))?;
    body.push(b'\n');
    stream.write_all(&body).await.map_err(CallError::Unreachable)?;
    stream.shutdown().await.map_err(CallError::Unreachable)?;
    read_response(stream, limit).await
}

/// Read an answer to its end: at most `limit` bytes (`None`: any size).
pub async fn read_response(
    reader: impl tokio::io::AsyncRead + Unpin,
    limit: Option<usize>,
) -> Result<Response, CallError> {
    let mut reply = Vec::new();
    match limit {
        Some(limit) => {
            reader.take(limit as u64 + 1).read_to_end(&mut reply).await.map_err(CallError::Unreachable)?;
            if reply.len() > limit {
                return Err(CallError::TooLarge(limit));
            }
        }
        None => {
            let mut reader = reader;
            reader.read_to_end(&mut reply).await.map_err(CallError::Unreachable)?;
        }
    }
    serde_json::from_slice(&reply).map_err(|e| {
        CallError::Undecodable(format!("{e}: {}", String::from_utf8_lossy(&reply[..reply.len().min(512)])))
    })
}

/// What the plugin (or the CLI) asks the agent.
#[expect(
    clippy::large_enum_variant,
    reason = "one request per connection, decoded once and moved into its handler: an ADD's size costs nothing"
)]
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
    /// IPAM-only CHECK: whether the attachment still holds these addresses.
    Check(CheckRequest),
}

/// A CHECK of an IPAM-only attachment: the agent answers [`Response::Checked`] when the attachment's
/// allocation holds exactly `ips`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The addresses the ADD result reported.
    pub ips: Vec<IpAddr>,
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
    /// `K8S_POD_UID` (containerd and CRI-O pass it): which pod of that name, so the agent can tell when the
    /// pod is gone from the API even if another of the same name exists.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
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
    /// IPAM-only: the addresses the attachment may be given, as host-local would give them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam_range: Option<Box<IpamRange>>,
}

/// IPAM-only mode's range, from the `ipam` section (each list has at most one entry per family): addresses
/// come from the pools, but only those inside `subnets` (none for a family: the pool's range), never a
/// subnet's network or IPv4 broadcast address nor a gateway, and within the range's start and end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamRange {
    /// The subnets the result reports.
    #[serde(default)]
    pub subnets: Vec<IpNet>,
    /// `rangeStart`.
    #[serde(default)]
    pub starts: Vec<IpAddr>,
    /// `rangeEnd`.
    #[serde(default)]
    pub ends: Vec<IpAddr>,
    /// The gateways the result reports.
    #[serde(default)]
    pub gateways: Vec<IpAddr>,
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
    /// CHECK: the allocation is as the result says.
    Checked,
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
    /// A CNI error code (see [`code`]).
    pub code: u32,
    /// What went wrong, naming what the user configured.
    pub msg: String,
    /// More detail.
    #[serde(default)]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_follow_the_spec() {
        for good in ["a", "0", "abc-DEF_1.2", "f00d"] {
            assert!(validate_container_id(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", ".a", "_a", "a/b", "../x", "a b", "a\nb", "é", "a:b"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names_follow_linux() {
        for good in ["eth0", "net1", "a", "123456789012345", "e-th_0.1"] {
            assert!(validate_ifname(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "1234567890123456", "a/b", "a:b", "a b", "a\tb", "a\0"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_names_fit_and_differ() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert!(a.len() <= 15 && a.starts_with("pw"), "{a}");
        assert_ne!(a, host_ifname("0123456789abcdef", "net1"));
        assert!(validate_ifname(&a).is_ok());
    }
}
