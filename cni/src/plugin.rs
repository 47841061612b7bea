//! The one dispatcher for ADD, DEL, CHECK, VERSION, STATUS and GC, with the environment, stdin and stdout
//! passed in so that it runs in-process in tests exactly as the binary runs it.

use std::{collections::HashMap, fs::File, io::Write, net::IpAddr, os::unix::fs::MetadataExt, path::Path};

use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{
    netlink::{self, GATEWAY_V4, GATEWAY_V6},
    protocol::{self, AddRequest, AssignedIp, DelRequest, GcRequest, Request, Response},
    spec::{
        CHECK_SINCE, CniError, CniResult, GC_SINCE, Interface, IpConfig, NetConf, Options, PLUGIN_TYPE, Route,
        SUPPORTED_VERSIONS, code, encode_result, version_at_least,
    },
};

/// The largest network configuration read from stdin (a chain's prevResult included).
pub const MAX_STDIN: usize = 16 << 20;

/// What the runtime passed: the `CNI_*` environment and the network configuration on stdin.
pub struct Invocation<'a> {
    /// The process environment (only `CNI_*` variables are read).
    pub env: &'a HashMap<String, String>,
    /// The network configuration.
    pub stdin: &'a [u8],
    /// `CNI_*` variables whose name or value is not UTF-8 (the binary reads the environment as bytes).
    pub unreadable: &'a [String],
}

/// Run one plugin invocation; writes the result or the error JSON to `stdout` and returns the exit code.
pub fn run(invocation: &Invocation<'_>, stdout: &mut dyn Write) -> i32 {
    match dispatch(invocation) {
        Ok(Some(output)) => {
            let _ = writeln!(stdout, "{output}");
            0
        }
        Ok(None) => 0,
        Err(mut err) => {
            if let Ok(conf) = serde_json::from_slice::<NetConf>(invocation.stdin)
                && SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str())
            {
                err.cni_version = conf.cni_version;
            }
            let _ = writeln!(stdout, "{}", serde_json::to_string(&err).unwrap_or_default());
            1
        }
    }
}

struct Env<'a> {
    vars: &'a HashMap<String, String>,
}

impl Env<'_> {
    fn require(&self, name: &str) -> Result<String, CniError> {
        match self.vars.get(name).filter(|v| !v.is_empty()) {
            Some(value) => Ok(value.clone()),
            None => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("{name} is not set"),
                format!("the runtime must set {name}"),
            )),
        }
    }

    fn optional(&self, name: &str) -> Option<String> {
        self.vars.get(name).filter(|v| !v.is_empty()).cloned()
    }

    fn args(&self) -> Result<HashMap<String, String>, CniError> {
        parse_cni_args(&self.optional("CNI_ARGS").unwrap_or_default())
    }
}

/// `CNI_ARGS`: `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is set, as the spec says.
pub fn parse_cni_args(raw: &str) -> Result<HashMap<String, String>, CniError> {
    let mut args = HashMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE in {raw:?}"),
            )
        })?;
        args.insert(k.to_string(), v.to_string());
    }
    let ignore_unknown = args.get("IgnoreUnknown").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    const KNOWN: &[&str] =
        &["IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"];
    if !ignore_unknown && let Some(unknown) = args.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_ARGS has unknown key {unknown}"),
            "set IgnoreUnknown=1 to pass keys this plugin does not know",
        ));
    }
    Ok(args)
}

/// Parse and check the network configuration: valid JSON, a supported `cniVersion`.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(stdin)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = if inner.is_data() && path != "." {
                format!("the network configuration's {path} is not valid")
            } else {
                "the network configuration on stdin is not valid JSON".into()
            };
            CniError::new(code::DECODE_FAILURE, msg, inner.to_string())
        })?;
    if conf.cni_version.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "cniVersion is missing from the network configuration",
            "set \"cniVersion\": \"1.0.0\"",
        ));
    }
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "name is missing from the network configuration",
            "the spec requires every network configuration to have a name",
        ));
    }
    poolwarden_protocol::validate_network_name(&conf.name).map_err(|why| {
        CniError::new(code::INVALID_CONFIG, format!("network name {:?} is not valid", conf.name), why)
    })?;
    Ok(conf)
}

/// Whether we run as the `ipam` of another plugin, and the options that apply.
pub fn mode(conf: &NetConf) -> Result<(bool, Options), CniError> {
    match &conf.ipam {
        Some(ipam) if ipam.plugin_type == PLUGIN_TYPE && conf.plugin_type != PLUGIN_TYPE => {
            Ok((true, ipam.options.clone()))
        }
        _ if conf.plugin_type == PLUGIN_TYPE => Ok((false, conf.options.clone())),
        _ => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("type is {:?}", conf.plugin_type),
            format!(
                "poolwarden-cni runs as \"type\": \"{PLUGIN_TYPE}\" or as \"ipam\": {{\"type\": \"{PLUGIN_TYPE}\"}}"
            ),
        )),
    }
}

fn dispatch(invocation: &Invocation<'_>) -> Result<Option<String>, CniError> {
    if let Some(name) = invocation.unreadable.first() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("{name} is not UTF-8"),
            "CNI variables must be UTF-8 text",
        ));
    }
    let env = Env { vars: invocation.env };
    let command = env.require("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string()));
    }
    if invocation.stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "the network configuration on stdin is too large",
            format!("more than {MAX_STDIN} bytes"),
        ));
    }
    let conf = parse_conf(invocation.stdin)?;
    let since = |first: &str| {
        if version_at_least(&conf.cni_version, first) {
            Ok(())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("{command} is not part of cniVersion {}", conf.cni_version),
                format!("{command} needs a configuration of cniVersion {first} or later"),
            ))
        }
    };
    match command.as_str() {
        "GC" | "STATUS" => since(GC_SINCE)?,
        "ADD" | "DEL" | "CHECK" => {
            if command == "CHECK" {
                since(CHECK_SINCE)?;
            }
            let id = env.require("CNI_CONTAINERID")?;
            poolwarden_protocol::validate_container_id(&id).map_err(|why| {
                CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_CONTAINERID {id:?} is not valid"), why)
            })?;
            let ifname = env.require("CNI_IFNAME")?;
            poolwarden_protocol::validate_ifname(&ifname).map_err(|why| {
                CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_IFNAME {ifname:?} is not valid"), why)
            })?;
        }
        _ => {}
    }
    let (ipam_only, options) = mode(&conf)?;
    let socket = options.socket.clone().unwrap_or_else(|| protocol::DEFAULT_SOCKET.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start the plugin's runtime", e.to_string()))?;
    match command.as_str() {
        "ADD" => runtime.block_on(add(&env, &conf, ipam_only, &options, &socket)).map(Some),
        "DEL" => runtime.block_on(del(&env, ipam_only, &socket)).map(|()| None),
        "CHECK" => runtime.block_on(check(&env, &conf, ipam_only, &socket)).map(|()| None),
        "STATUS" => runtime.block_on(status(&socket)).map(|()| None),
        "GC" => runtime.block_on(gc(&conf, &socket)).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_COMMAND {other:?} is not a CNI command"),
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    }
}

/// Ask the agent, mapping transport failures to "try again later".
pub async fn call_agent(socket: &str, request: &Request) -> Result<Response, CniError> {
    send_to_agent(socket, request).await?.answer().await
}

/// A request the agent has received, its answer still to come.
pub struct Pending {
    answer: tokio::net::unix::OwnedReadHalf,
    announcer: Option<HostAnnouncer>,
    socket: String,
}

/// The open side of an ADD whose host interface index follows the request
/// ([`AddRequest::host_index_follows`]). Dropped without [`HostAnnouncer::up`], it closes the connection,
/// which tells the agent the host interface will not come.
pub struct HostAnnouncer(tokio::net::unix::OwnedWriteHalf);

impl HostAnnouncer {
    /// Tell the agent the host interface is up, with its index.
    pub async fn up(mut self, ifindex: u32) -> std::io::Result<()> {
        self.0.write_all(format!("{ifindex}\n").as_bytes()).await?;
        self.0.shutdown().await
    }
}

fn agent_unreachable(socket: &str) -> impl Fn(std::io::Error) -> CniError + '_ {
    move |e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the poolwarden agent is not reachable at {socket}"),
            format!("{e}; is `poolwarden agent` running on this node?"),
        )
    }
}

/// Send `request` to the agent at `socket` (one connection per request, closed for writing when sent, unless
/// an ADD's host interface index follows: see [`Pending::announcer`]).
pub async fn send_to_agent(socket: &str, request: &Request) -> Result<Pending, CniError> {
    let unreachable = agent_unreachable(socket);
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(&unreachable)?;
    let mut body =
        serde_json::to_vec(request).map_err(|e| CniError::new(code::IO_FAILURE, "encode request", e.to_string()))?;
    body.push(b'\n');
    let (answer, mut writer) = stream.into_split();
    writer.write_all(&body).await.map_err(&unreachable)?;
    let announcer = if matches!(request, Request::Add(add) if add.host_index_follows) {
        Some(HostAnnouncer(writer))
    } else {
        writer.shutdown().await.map_err(&unreachable)?;
        None
    };
    Ok(Pending { answer, announcer, socket: socket.to_string() })
}

impl Pending {
    /// For an ADD whose host interface index follows the request: the side that tells the agent.
    pub fn announcer(&mut self) -> Option<HostAnnouncer> {
        self.announcer.take()
    }

    /// The agent's answer.
    pub async fn answer(self) -> Result<Response, CniError> {
        let unreachable = agent_unreachable(&self.socket);
        // An announcer not taken is closed now: the agent must not wait for an index that will not come.
        drop(self.announcer);
        protocol::read_response(self.answer, Some(protocol::MAX_MESSAGE)).await.map_err(|e| match e {
            protocol::CallError::Unreachable(e) => unreachable(e),
            other => CniError::new(code::IO_FAILURE, "the agent's answer could not be read", other.to_string()),
        })
    }
}

pub use poolwarden_protocol::host_ifname;

fn fnv(container_id: &str, ifname: &str) -> u64 {
    poolwarden_protocol::attachment_hash(container_id, ifname)
}

/// Open `CNI_NETNS`: it must be a network namespace, and not the plugin's own (the node's), whose routes a
/// pod's setup would replace. The error says which rule the path broke.
pub fn open_netns(path: &str) -> Result<File, CniError> {
    let refused = |why: String| {
        CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_NETNS {path} is not a pod's network namespace"), why)
    };
    let cannot_open = |e: std::io::Error| {
        CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_NETNS {path} cannot be opened"), e.to_string())
    };
    if !path.starts_with('/') {
        return Err(refused("it is not an absolute path".into()));
    }
    let metadata = std::fs::metadata(path).map_err(cannot_open)?;
    if metadata.is_dir() {
        return Err(refused("it is a directory".into()));
    }
    // A namespace file is a regular file of nsfs; anything else is refused before it is opened (opening a
    // FIFO would block).
    if !metadata.is_file() {
        return Err(refused(format!("it is {}", kind_of(&metadata))));
    }
    let file = File::open(path).map_err(cannot_open)?;
    // A namespace is a file of nsfs; that it is a network namespace, setns tells (on a thread of its own,
    // which ends there).
    let nsfs = nix::sys::statfs::fstatfs(&file).map(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
    if !nsfs.unwrap_or(false) {
        return Err(refused("it is a regular file, not a namespace".into()));
    }
    let probe = file.try_clone().map_err(cannot_open)?;
    let network = std::thread::spawn(move || nix::sched::setns(&probe, nix::sched::CloneFlags::CLONE_NEWNET))
        .join()
        .map_err(|_| refused("checking it failed".into()))?;
    if let Err(e) = network {
        return Err(refused(format!("it is a namespace, but not a network namespace ({e})")));
    }
    let own = std::fs::metadata("/proc/self/ns/net").map_err(cannot_open)?;
    let opened = file.metadata().map_err(cannot_open)?;
    if (opened.dev(), opened.ino()) == (own.dev(), own.ino()) {
        return Err(refused("it is the node's own network namespace (the plugin's)".into()));
    }
    Ok(file)
}

fn kind_of(metadata: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = metadata.file_type();
    if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "an unknown kind of file"
    }
}

fn netlink_error(e: netlink::NetlinkError) -> CniError {
    CniError::new(code::INTERFACE_SETUP, format!("setting up the pod's interface failed: {}", e.operation), e.message)
}

fn agent_refusal(reply: protocol::ErrorReply) -> CniError {
    CniError::new(reply.code, reply.msg, reply.details)
}

/// IPAM-only with `enforce`: the node's side of the veth the main plugin made for the pod (`ifname` in the
/// pod's namespace, its peer here, enslaved to a bridge). Found from the pod's side, so it is the pod's own
/// port and nothing the runtime could name otherwise.
async fn bridge_port(netns_path: &str, ifname: &str) -> Result<String, CniError> {
    let inside = ifname.to_string();
    let netns = open_netns(netns_path)?;
    let peer = netlink::spawn_in_netns(netns, netns_path.to_string(), move |handle| async move {
        netlink::veth_peer_index(&handle, &inside).await
    })
    .await
    .map_err(|_| CniError::new(code::IO_FAILURE, "netns worker", "panicked"))?
    .map_err(netlink_error)?
    .ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("ipam.enforce: {ifname} in {netns_path} is not a veth"),
            "enforcement in IPAM-only mode needs a main plugin that gives the pod a veth (bridge, ptp)",
        )
    })?;
    let (peer, inside_index) = peer;
    let handle = netlink::connect().map_err(netlink_error)?;
    // The peer's index is one of its own namespace's: the link found here must point back at the pod's side.
    match netlink::link_name_by_index(&handle, peer).await.map_err(netlink_error)? {
        Some((name, true, Some(back))) if back == inside_index => Ok(name),
        Some((name, false, Some(back))) if back == inside_index => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("ipam.enforce: {name}, the node's side of {ifname}, is not a bridge port"),
            "",
        )),
        _ => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("ipam.enforce: the peer of {ifname} is not in this namespace"),
            "",
        )),
    }
}

/// One family's range in IPAM-only mode, host-local's way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyRange {
    /// The subnet the result reports.
    pub subnet: IpNet,
    /// The first address that may be given.
    pub start: Option<IpAddr>,
    /// The last address that may be given.
    pub end: Option<IpAddr>,
    /// The gateway the result reports (never given to a pod): the subnet's first address after its network
    /// address unless configured.
    pub gateway: Option<IpAddr>,
}

/// The IPAM-only ranges (at most one per family) from `ranges` or from `subnet`, `rangeStart`, `rangeEnd` and
/// `gateway`, each checked: addresses of the subnet's family inside it, start before end.
pub fn family_ranges(options: &Options) -> Result<Vec<FamilyRange>, CniError> {
    let invalid = |field: &str, why: String| CniError::new(code::INVALID_CONFIG, format!("ipam.{field}: {why}"), "");
    let mut entries: Vec<(String, crate::spec::RangeEntry)> = Vec::new();
    for (n, set) in options.ranges.iter().enumerate() {
        let first = set.first().ok_or_else(|| invalid(&format!("ranges[{n}]"), "is empty".into()))?;
        entries.push((format!("ranges[{n}][0]"), first.clone()));
    }
    if let Some(subnet) = options.subnet {
        let gateway = options.gateway.filter(|g| g.is_ipv4() == subnet.addr().is_ipv4());
        let entry =
            crate::spec::RangeEntry { subnet, range_start: options.range_start, range_end: options.range_end, gateway };
        entries.push(("subnet".into(), entry));
    } else if let Some(field) = [("rangeStart", options.range_start), ("rangeEnd", options.range_end)]
        .iter()
        .find_map(|(field, value)| value.map(|_| *field))
    {
        return Err(invalid(field, "needs a subnet".into()));
    }
    let mut ranges: Vec<FamilyRange> = Vec::new();
    for (field, entry) in entries {
        let subnet = entry.subnet.trunc();
        if ranges.iter().any(|r| r.subnet.addr().is_ipv4() == subnet.addr().is_ipv4()) {
            return Err(invalid(&field, format!("a second range of {subnet}'s family; give one per family")));
        }
        for (name, value) in
            [("rangeStart", entry.range_start), ("rangeEnd", entry.range_end), ("gateway", entry.gateway)]
        {
            if let Some(ip) = value
                && !subnet.contains(&ip)
            {
                return Err(invalid(&field, format!("{name} {ip} is not in subnet {subnet}")));
            }
        }
        if let (Some(start), Some(end)) = (entry.range_start, entry.range_end)
            && start > end
        {
            return Err(invalid(&field, format!("rangeStart {start} is after rangeEnd {end}")));
        }
        let gateway = entry.gateway.or_else(|| {
            let first = subnet.hosts().next()?;
            (subnet.prefix_len() < subnet.max_prefix_len() - 1).then_some(first)
        });
        ranges.push(FamilyRange { subnet, start: entry.range_start, end: entry.range_end, gateway });
    }
    Ok(ranges)
}

/// Where the agent attaches the pod's enforcement: TCX when a chained `bandwidth` will want the host side's
/// ingress qdisc (the runtime passes limits, or the configuration says so), else the cheaper clsact filter.
fn enforcement_hook(conf: &NetConf, options: &Options) -> protocol::EnforcementHook {
    if conf.runtime_config.as_ref().is_some_and(|r| r.bandwidth.is_some()) {
        protocol::EnforcementHook::Tcx
    } else {
        options.enforcement_hook.unwrap_or_default()
    }
}

async fn add(
    env: &Env<'_>,
    conf: &NetConf,
    ipam_only: bool,
    options: &Options,
    socket: &str,
) -> Result<String, CniError> {
    let container_id = env.require("CNI_CONTAINERID")?;
    let ifname = env.require("CNI_IFNAME")?;
    let netns_path = env.require("CNI_NETNS")?;
    let args = env.args()?;
    let netns = open_netns(&netns_path)?;
    if let Some(mtu) = options.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is out of range"),
            "Linux takes 68 to 65535",
        ));
    }
    let mut ips = Vec::new();
    for requested in conf.runtime_config.iter().flat_map(|r| &r.ips) {
        let ip = requested.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()).ok_or_else(|| {
            CniError::new(code::INVALID_CONFIG, format!("runtimeConfig.ips: {requested:?} is not an address"), "")
        })?;
        ips.push(ip);
    }
    let mut request = AddRequest {
        container_id: container_id.clone(),
        ifname: ifname.clone(),
        netns: netns_path.clone(),
        namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_else(|| "default".into()),
        pod: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        pod_uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        host_ifname: String::new(),
        pools: options.pools.clone(),
        ips,
        host_index_follows: false,
        hook: enforcement_hook(conf, options),
        bridge_port: String::new(),
        network: conf.name.clone(),
        ipam_range: None,
    };

    if ipam_only {
        let ranges = family_ranges(options)?;
        request.ipam_range = Some(Box::new(protocol::IpamRange {
            subnets: ranges.iter().map(|r| r.subnet).collect(),
            starts: ranges.iter().filter_map(|r| r.start).collect(),
            ends: ranges.iter().filter_map(|r| r.end).collect(),
            gateways: ranges.iter().filter_map(|r| r.gateway).chain(options.gateway).collect(),
        }));
        if options.enforce {
            request.bridge_port = bridge_port(&netns_path, &ifname).await?;
        }
        let assigned = agent_add(socket, &request).await?;
        // The main plugin (a bridge, say) puts the address on a shared segment: report the segment's prefix
        // and gateway, and the configured routes, as host-local does.
        let ip_config = |a: &AssignedIp| {
            let same_family = |ip: &IpAddr| ip.is_ipv4() == a.address.addr().is_ipv4();
            let range = ranges.iter().find(|r| same_family(&r.subnet.addr()));
            let prefix = range.map_or(a.pool_cidr, |r| r.subnet).prefix_len();
            IpConfig {
                address: IpNet::new(a.address.addr(), prefix).unwrap_or(a.address),
                gateway: range.and_then(|r| r.gateway).or(options.gateway.filter(same_family)),
                interface: None,
                version: None,
            }
        };
        let result = CniResult {
            cni_version: conf.cni_version.clone(),
            interfaces: vec![],
            ips: assigned.iter().map(ip_config).collect(),
            routes: options.routes.clone(),
            dns: Value::Object(Default::default()),
        };
        return Ok(encode_result(&result, &conf.cni_version).to_string());
    }

    let host = host_ifname(&container_id, &ifname);
    let host_mac = netlink::host_mac(fnv(&container_id, &ifname));
    let handle = netlink::connect().map_err(netlink_error)?;
    request.host_ifname = host.clone();
    request.host_index_follows = true;
    // The request goes out first: the agent allocates (and attaches enforcement to the host side once it
    // hears the host side's index) while the veth is made and the pod side prepared in the pod's namespace;
    // only the addresses wait for the agent's answer.
    let mut pending = send_to_agent(socket, &Request::Add(request.clone())).await?;
    let announcer = pending.announcer();
    let (made_tx, made_rx) = tokio::sync::oneshot::channel::<()>();
    let (addresses_tx, addresses_rx) = tokio::sync::oneshot::channel::<Vec<IpNet>>();
    let pod_netns = netns.try_clone().map_err(|e| {
        CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_NETNS {netns_path} cannot be opened"), e.to_string())
    })?;
    // The pod side's worker starts at once: its thread, its netlink socket in the pod's namespace and the
    // pod's loopback are ready while the veth is made. `Ok(None)`: the veth was not made.
    let (pod_ifname, mac) = (ifname.clone(), host_mac.clone());
    let pod = netlink::spawn_in_netns(pod_netns, netns_path.clone(), move |h| async move {
        netlink::loopback_up(&h).await?;
        if made_rx.await.is_err() {
            return Ok(None);
        }
        let (index, pod_mac) = netlink::prepare_pod(&h, &pod_ifname, &mac).await?;
        // No addresses: the ADD failed elsewhere and is being rolled back.
        let Ok(addresses) = addresses_rx.await else { return Ok(Some(pod_mac)) };
        netlink::address_pod(&h, index, &pod_ifname, &addresses, &mac).await?;
        Ok(Some(pod_mac))
    });
    let make_host_side = async {
        // The pod side is created in the pod's namespace under its final name.
        let host_index = netlink::create_veth(&handle, &host, &ifname, &netns, options.mtu, &host_mac).await?;
        // Only now may the pod side come up (see create_veth).
        let _ = made_tx.send(());
        if let Some(announcer) = announcer {
            // If the agent is gone, its answer says so.
            let _ = announcer.up(host_index).await;
        }
        Ok::<_, netlink::NetlinkError>(())
    };
    let answer = async { added(pending.answer().await?) };
    let (answered, made) = tokio::join!(answer, make_host_side);
    let release = || async {
        let del = DelRequest { container_id: container_id.clone(), ifname: ifname.clone(), host_ifname: String::new() };
        let _ = call_agent(socket, &Request::Del(del)).await;
        let _ = netlink::delete_link(&handle, &host).await;
    };
    let assigned = match (made, answered) {
        (Ok(()), Ok(assigned)) => assigned,
        (Err(err), answered) => {
            // The worker stops at once whether or not it saw the veth made.
            drop(addresses_tx);
            let _ = pod.await;
            if answered.is_ok() {
                release().await;
            } else {
                let _ = netlink::delete_link(&handle, &host).await;
            }
            return Err(netlink_error(err));
        }
        (Ok(()), Err(err)) => {
            // The pod-side worker sees no addresses coming and stops.
            drop(addresses_tx);
            let _ = pod.await;
            let _ = netlink::delete_link(&handle, &host).await;
            return Err(err);
        }
    };
    let assigned: Vec<IpNet> = assigned.into_iter().map(|a| a.address).collect();
    let _ = addresses_tx.send(assigned.clone());
    let stopped =
        |message: &str| netlink::NetlinkError { operation: "pod setup worker".into(), message: message.into() };
    let configured = pod
        .await
        .unwrap_or_else(|_| Err(stopped("it stopped")))
        .and_then(|mac| mac.ok_or_else(|| stopped("it did not see the veth made")));
    let pod_mac = match configured {
        Ok(mac) => mac,
        Err(err) => {
            release().await;
            return Err(netlink_error(err));
        }
    };

    let result = build_result(conf, &host, &host_mac, &ifname, &pod_mac, &request.netns, &assigned);
    Ok(encode_result(&result, &conf.cni_version).to_string())
}

fn build_result(
    conf: &NetConf,
    host: &str,
    host_mac: &[u8],
    ifname: &str,
    pod_mac: &[u8],
    netns: &str,
    assigned: &[IpNet],
) -> CniResult {
    // A chain's earlier plugins keep their interfaces; ours are appended and indexed after them.
    let mut result: CniResult = conf
        .prev_result
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_else(|| CniResult { dns: Value::Object(Default::default()), ..Default::default() });
    result.cni_version = conf.cni_version.clone();
    let base = result.interfaces.len();
    result.interfaces.push(Interface {
        name: host.to_string(),
        mac: netlink::format_mac(host_mac),
        sandbox: String::new(),
        extra: Default::default(),
    });
    result.interfaces.push(Interface {
        name: ifname.to_string(),
        mac: netlink::format_mac(pod_mac),
        sandbox: netns.to_string(),
        extra: Default::default(),
    });
    for address in assigned {
        let gateway: IpAddr = if address.addr().is_ipv4() { GATEWAY_V4.into() } else { GATEWAY_V6.into() };
        result.ips.push(IpConfig {
            address: *address,
            gateway: Some(gateway),
            interface: Some(base + 1),
            version: None,
        });
        let default: IpNet = if address.addr().is_ipv4() {
            "0.0.0.0/0".parse().unwrap_or(*address)
        } else {
            "::/0".parse().unwrap_or(*address)
        };
        result.routes.push(Route { dst: default, gw: Some(gateway), extra: Default::default() });
    }
    result
}

async fn agent_add(socket: &str, request: &AddRequest) -> Result<Vec<AssignedIp>, CniError> {
    added(call_agent(socket, &Request::Add(request.clone())).await?)
}

fn added(response: Response) -> Result<Vec<AssignedIp>, CniError> {
    match response {
        Response::Added { ips } => Ok(ips),
        Response::Error(reply) => Err(agent_refusal(reply)),
        other => Err(CniError::new(code::IO_FAILURE, "unexpected answer from the agent", format!("{other:?}"))),
    }
}

async fn del(env: &Env<'_>, ipam_only: bool, socket: &str) -> Result<(), CniError> {
    let container_id = env.require("CNI_CONTAINERID")?;
    let ifname = env.require("CNI_IFNAME")?;
    env.args()?;
    // The agent removes the host side (and the pod side with it) after answering: the kernel takes ~20 ms
    // to unregister a device, which the runtime need not wait for.
    let host_ifname = if ipam_only { String::new() } else { host_ifname(&container_id, &ifname) };
    match call_agent(socket, &Request::Del(DelRequest { container_id, ifname, host_ifname })).await? {
        Response::Deleted { .. } => Ok(()),
        Response::Error(reply) => Err(agent_refusal(reply)),
        other => Err(CniError::new(code::IO_FAILURE, "unexpected answer from the agent", format!("{other:?}"))),
    }
}

async fn check(env: &Env<'_>, conf: &NetConf, ipam_only: bool, socket: &str) -> Result<(), CniError> {
    let ifname = env.require("CNI_IFNAME")?;
    let netns = env.require("CNI_NETNS")?;
    let container_id = env.require("CNI_CONTAINERID")?;
    let prev: CniResult = conf.prev_result.clone().and_then(|v| serde_json::from_value(v).ok()).ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult", "the runtime must pass the ADD result")
    })?;
    if ipam_only {
        // As host-local: the allocation the result reports must still be this attachment's.
        open_netns(&netns)?;
        let ips = prev.ips.iter().map(|ip| ip.address.addr()).collect();
        let request = protocol::CheckRequest { container_id, ifname, ips };
        return match call_agent(socket, &Request::Check(request)).await? {
            Response::Checked => Ok(()),
            Response::Error(reply) => Err(agent_refusal(reply)),
            other => Err(CniError::new(code::IO_FAILURE, "unexpected answer from the agent", format!("{other:?}"))),
        };
    }
    let sandbox = prev.interfaces.iter().position(|i| i.name == ifname && !i.sandbox.is_empty());
    let addresses: Vec<IpNet> = prev.ips.iter().filter(|ip| ip.interface == sandbox).map(|ip| ip.address).collect();
    open_netns(&netns)?;
    let problems = tokio::task::spawn_blocking(move || {
        netlink::in_netns(Path::new(&netns), move |h| netlink::check_pod(h, ifname, addresses))
    })
    .await
    .map_err(|e| CniError::new(code::IO_FAILURE, "check worker failed", e.to_string()))?
    .map_err(netlink_error)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::INTERFACE_SETUP,
            "the pod's network does not match the ADD result",
            problems.join("; "),
        ))
    }
}

async fn status(socket: &str) -> Result<(), CniError> {
    match call_agent(socket, &Request::Status).await {
        Ok(Response::Ready) => Ok(()),
        Ok(Response::Error(reply)) => Err(agent_refusal(reply)),
        Ok(other) => {
            Err(CniError::new(code::PLUGIN_NOT_AVAILABLE, "unexpected answer from the agent", format!("{other:?}")))
        }
        Err(err) => Err(CniError { code: code::PLUGIN_NOT_AVAILABLE, ..err }),
    }
}

async fn gc(conf: &NetConf, socket: &str) -> Result<(), CniError> {
    // Without the list of what is still in use, nothing can be known to be unused: a no-op, not "none".
    let Some(valid_attachments) = conf.valid_attachments.clone() else { return Ok(()) };
    let request = GcRequest { valid_attachments, network: conf.name.clone() };
    match call_agent(socket, &Request::Gc(request)).await? {
        Response::Collected { .. } => Ok(()),
        Response::Error(reply) => Err(agent_refusal(reply)),
        other => Err(CniError::new(code::IO_FAILURE, "unexpected answer from the agent", format!("{other:?}"))),
    }
}

#[cfg(test)]
mod hook_tests {
    use super::*;

    #[test]
    fn tcx_when_the_chain_shapes_the_pod() {
        let parse = |json: &str| serde_json::from_str::<NetConf>(json).expect("netconf");
        let plain = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"poolwarden-cni"}"#);
        assert_eq!(enforcement_hook(&plain, &plain.options), protocol::EnforcementHook::Clsact);
        let asked = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"poolwarden-cni","enforcementHook":"tcx"}"#);
        assert_eq!(enforcement_hook(&asked, &asked.options), protocol::EnforcementHook::Tcx);
        let limited = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"poolwarden-cni","runtimeConfig":{"bandwidth":{"egressRate":1000}}}"#,
        );
        assert_eq!(enforcement_hook(&limited, &limited.options), protocol::EnforcementHook::Tcx);
        assert!(
            serde_json::from_str::<NetConf>(r#"{"type":"x","enforcementHook":"xdp"}"#).is_err(),
            "unknown hooks are refused"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invoke(vars: &[(&str, &str)], stdin: &str) -> (i32, Value) {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut out = Vec::new();
        let code = run(&Invocation { env: &env, stdin: stdin.as_bytes(), unreadable: &[] }, &mut out);
        let value = if out.is_empty() { Value::Null } else { serde_json::from_slice(&out).expect("stdout is JSON") };
        (code, value)
    }

    const CONF: &str =
        r#"{"cniVersion":"1.1.0","name":"pw","type":"poolwarden-cni","socket":"/nonexistent/agent.sock"}"#;

    #[test]
    fn host_side_macs_are_unicast_locally_administered_and_per_attachment() {
        let a = netlink::host_mac(fnv("c1", "eth0"));
        let b = netlink::host_mac(fnv("c2", "eth0"));
        assert_eq!(a.len(), 6);
        assert_eq!(a[0] & 0b11, 0b10, "locally administered, not multicast: {a:02x?}");
        assert_ne!(a, b);
        assert_eq!(a, netlink::host_mac(fnv("c1", "eth0")), "the same attachment gets the same MAC");
    }

    #[test]
    fn version_lists_what_we_speak() {
        let (code, out) = invoke(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(code, 0);
        assert_eq!(out["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    }

    #[test]
    fn input_errors_carry_spec_codes_and_name_the_problem() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/netns"),
        ];
        for (what, vars, stdin, want_code, fragment) in [
            ("malformed JSON", &add[..], "{not json", code::DECODE_FAILURE, "not valid JSON"),
            (
                "missing cniVersion",
                &add[..],
                r#"{"name":"pw","type":"poolwarden-cni"}"#,
                code::INVALID_CONFIG,
                "cniVersion is missing",
            ),
            (
                "unsupported version",
                &add[..],
                r#"{"cniVersion":"9.9.9","type":"poolwarden-cni"}"#,
                code::INCOMPATIBLE_VERSION,
                "9.9.9 is not supported",
            ),
            (
                "wrong type",
                &add[..],
                r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
                code::INVALID_CONFIG,
                "type is \"bridge\"",
            ),
            ("missing CNI_NETNS", &add[..3], CONF, code::INVALID_ENVIRONMENT, "CNI_NETNS is not set"),
            (
                "netns that does not exist",
                &add[..],
                CONF,
                code::INVALID_ENVIRONMENT,
                "CNI_NETNS /nonexistent/netns cannot be opened",
            ),
            ("missing command", &[][..], CONF, code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set"),
            (
                "agent down at STATUS",
                &[("CNI_COMMAND", "STATUS")][..],
                CONF,
                code::PLUGIN_NOT_AVAILABLE,
                "not reachable",
            ),
            (
                "agent down at DEL",
                &[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")][..],
                CONF,
                code::TRY_AGAIN_LATER,
                "not reachable",
            ),
        ] {
            let (exit, out) = invoke(vars, stdin);
            assert_eq!(exit, 1, "{what}");
            assert_eq!(out["code"], want_code, "{what}: {out}");
            assert!(out["msg"].as_str().unwrap().contains(fragment), "{what}: {out}");
            assert!(out.get("details").is_some(), "{what}: details present");
        }
    }

    #[test]
    fn cni_args_need_ignore_unknown_for_foreign_keys() {
        let env: HashMap<String, String> = [("CNI_ARGS".to_string(), "K8S_POD_NAME=x;FOO=1".to_string())].into();
        assert!(Env { vars: &env }.args().unwrap_err().msg.contains("unknown key FOO"));
        let env: HashMap<String, String> =
            [("CNI_ARGS".to_string(), "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;FOO=1".to_string())].into();
        let args = Env { vars: &env }.args().unwrap();
        assert_eq!((args["K8S_POD_NAMESPACE"].as_str(), args["K8S_POD_NAME"].as_str()), ("ns", "p"));
    }

    #[test]
    fn host_names_fit_and_differ() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert!(a.len() <= 15 && a.starts_with("pw"), "{a}");
        assert_ne!(a, host_ifname("0123456789abcdef", "net1"));
    }
}
