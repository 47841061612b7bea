//! The kernel work of the plugin, over rtnetlink: the veth pair, and the pod side of it (name, address,
//! link-local gateway and routes) configured from inside the pod's network namespace.

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
    neighbour::NeighbourState,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The pod's IPv4 gateway: link-local, answered by a static neighbour entry for the host side's MAC.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A failed kernel operation.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct NetlinkError {
    /// What was being done, naming the interface or namespace.
    pub operation: String,
    /// The kernel's answer.
    pub message: String,
}

fn fail(operation: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let operation = operation.into();
    move |e| NetlinkError { operation, message: e.to_string() }
}

/// Whether an rtnetlink error is "no such device" (ENODEV) or "not found" (ENOENT, ESRCH).
fn is_not_found(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(msg) if matches!(msg.raw_code(), -19 | -2 | -3))
}

/// A netlink connection in the calling thread's network namespace, driven by the current runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| NetlinkError { operation: "open netlink".into(), message: e.to_string() })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Run `work` with a netlink connection inside the network namespace at `netns`, on a thread of its own
/// (a thread's namespace is its own; the caller's is untouched).
pub fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let shown = netns.display().to_string();
    let file = File::open(netns)
        .map_err(|e| NetlinkError { operation: format!("open netns {shown}"), message: e.to_string() })?;
    spawn_in_netns(file, shown, work)
        .blocking_recv()
        .map_err(|_| NetlinkError { operation: "netns worker".into(), message: "panicked".into() })?
}

/// Run `work` on a thread of its own inside the network namespace `netns` (a netlink socket opened there),
/// without waiting for it: the answer arrives on the returned channel. `in_netns` waits instead.
pub fn spawn_in_netns<T, F, Fut>(
    netns: File,
    shown: String,
    work: F,
) -> tokio::sync::oneshot::Receiver<Result<T, NetlinkError>>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let (answer, answered) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetlinkError { operation: format!("enter netns {shown}"), message: e.to_string() })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetlinkError { operation: "start runtime".into(), message: e.to_string() })?;
            runtime.block_on(async move { work(connect()?).await })
        })();
        let _ = answer.send(result);
    });
    answered
}

/// A link's index and MAC address, by name.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>)>, NetlinkError> {
    match handle.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(Some(link)) => Ok(Some((link.header.index, mac_of(&link)))),
        Ok(None) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(fail(format!("look up link {name}"))(e)),
    }
}

fn mac_of(link: &LinkMessage) -> Vec<u8> {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// For veth `ifname` whose peer is in another namespace: (the peer's index there, `ifname`'s own index).
pub async fn veth_peer_index(handle: &Handle, ifname: &str) -> Result<Option<(u32, u32)>, NetlinkError> {
    let link = match handle.link().get().match_name(ifname.to_string()).execute().try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => return Ok(None),
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(fail(format!("look up link {ifname}"))(e)),
    };
    let is_veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, netlink_packet_route::link::LinkInfo::Kind(netlink_packet_route::link::InfoKind::Veth))))
    });
    let peer_elsewhere = link.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
    Ok(link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Link(index) if is_veth && peer_elsewhere => Some(*index),
            _ => None,
        })
        .map(|peer| (peer, link.header.index)))
}

/// The name of the link with `index` in this namespace, whether it is enslaved to a bridge (or any other
/// controller), and the index of its peer (`IFLA_LINK`) if it has one.
pub async fn link_name_by_index(
    handle: &Handle,
    index: u32,
) -> Result<Option<(String, bool, Option<u32>)>, NetlinkError> {
    match handle.link().get().match_index(index).execute().try_next().await {
        Ok(Some(link)) => {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            });
            let enslaved = link.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(_)));
            let peer = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Link(peer) => Some(*peer),
                _ => None,
            });
            Ok(name.map(|n| (n, enslaved, peer)))
        }
        Ok(None) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(fail(format!("look up link {index}"))(e)),
    }
}

/// Format a MAC address as the CNI result shows it.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Whether an rtnetlink error is "exists" (EEXIST).
fn is_exists(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(msg) if msg.raw_code() == -17)
}

/// Create the veth pair with `host` in this namespace, up and with the MAC `host_mac`, and `peer` created
/// directly inside `netns` (creating it there, rather than moving it, spares the kernel's network-namespace
/// move, which waits for an RCU grace period: about 25 ms here) and left down. A host side left behind by an
/// earlier attempt of the same ADD is deleted and the pair made again. Returns the host side's index.
///
/// The host side comes up in the same request, but it has no carrier (and so no IPv6 link-local address,
/// no duplicate address detection) until the caller brings the peer up, which it does only after this
/// returns, when the host side's IPv6 settings are in place.
pub async fn create_veth(
    handle: &Handle,
    host: &str,
    peer: &str,
    netns: &File,
    mtu: Option<u32>,
    host_mac: &[u8],
) -> Result<u32, NetlinkError> {
    let add = || {
        let mut peer_message =
            LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_string()).setns_by_fd(netns.as_raw_fd());
        let mut veth = LinkVeth::new(host, peer).address(host_mac.to_vec()).up();
        if let Some(mtu) = mtu {
            veth = veth.mtu(mtu);
            peer_message = peer_message.mtu(mtu);
        }
        let veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message.build())));
        handle.link().add(veth.build()).execute()
    };
    let failed = || fail(format!("create veth {host} with {peer} in the pod's netns"));
    match add().await {
        Ok(()) => {}
        // A retried ADD for the same attachment starts from a clean slate.
        Err(e) if is_exists(&e) => {
            if !delete_link(handle, host).await? {
                return Err(failed()(e));
            }
            add().await.map_err(failed())?;
        }
        Err(e) => return Err(failed()(e)),
    }
    // The host side's link-local address must be usable at once: it is the source of the neighbour
    // solicitations that reach the pod's IPv6 address, and duplicate address detection would hold it back
    // (and drop the pod's first packets) for a second. Router advertisements are not its business.
    for (knob, value) in [("accept_dad", "0"), ("accept_ra", "0")] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{host}/{knob}"), value);
    }
    nix::net::if_::if_nametoindex(host)
        .map_err(|e| NetlinkError { operation: format!("find {host} after creating it"), message: e.to_string() })
}

/// The host side's MAC address: locally administered and unicast, the rest the low 40 bits of `seed` (the
/// hash the host side's name is made from). Each veth is a link of its own, so it need not be unique; being set in the request that makes
/// the veth, the pod side's neighbour entry for its gateway needs no lookup of the host side.
pub fn host_mac(seed: u64) -> Vec<u8> {
    let b = seed.to_be_bytes();
    vec![0x02, b[3], b[4], b[5], b[6], b[7]]
}

/// Delete a link by name; `Ok(false)` when it did not exist.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetlinkError> {
    let Some((index, _)) = link_by_name(handle, name).await? else { return Ok(false) };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(fail(format!("delete link {name}"))(e)),
    }
}

/// Bring the pod's loopback up: the first thing done in the pod's namespace, needing nothing of the veth.
pub async fn loopback_up(handle: &Handle) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_name("lo").up().build())
        .execute()
        .await
        .map_err(fail("set lo up in the pod's netns"))
}

/// Inside the pod's namespace, once the veth exists and before its addresses are known: bring the pod's
/// interface `ifname` up and route IPv4 through the link-local gateway (answered by a permanent neighbour
/// entry for the host side's MAC, `host_mac`): none of that needs the address, so only the address itself
/// waits for the agent. Returns the interface's index and MAC.
pub async fn prepare_pod(handle: &Handle, ifname: &str, host_mac: &[u8]) -> Result<(u32, Vec<u8>), NetlinkError> {
    // The calling thread is in the pod's namespace, so the lookup (an ioctl) is made there.
    let index = nix::net::if_::if_nametoindex(ifname)
        .map_err(|e| NetlinkError { operation: format!("find {ifname} in the pod's netns"), message: e.to_string() })?;
    let up = async {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(fail(format!("set {ifname} up")))
    };
    let (up, found) = futures::join!(up, link_by_name(handle, ifname));
    up?;
    let (_, mac) = found?.ok_or_else(|| NetlinkError {
        operation: format!("find {ifname} in the pod's netns"),
        message: "not there".into(),
    })?;
    route_via_gateway(handle, index, ifname, GATEWAY_V4.into(), host_mac).await?;
    Ok((index, mac))
}

/// The neighbour entry for `gateway` (the host side's MAC), a link-scope route to it (IPv4), and the
/// default route through it, on the pod's interface `index`.
async fn route_via_gateway(
    handle: &Handle,
    index: u32,
    ifname: &str,
    gateway: IpAddr,
    host_mac: &[u8],
) -> Result<(), NetlinkError> {
    // The neighbour entry and the route to the gateway are independent: both are queued at once, and the
    // connection sends the second as soon as the first is answered (not after a trip back through here).
    let neighbour = async {
        handle
            .neighbours()
            .add(index, gateway)
            .link_layer_address(host_mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(fail(format!("add neighbour {gateway} on {ifname}")))
    };
    let to_gateway = async {
        if gateway.is_ipv4() {
            handle
                .route()
                .add(gateway_route(index, gateway)?)
                .replace()
                .execute()
                .await
                .map_err(fail(format!("route {gateway} dev {ifname}")))?;
        }
        Ok(())
    };
    let (neighbour, to_gateway) = futures::join!(neighbour, to_gateway);
    neighbour?;
    to_gateway?;
    handle
        .route()
        .add(default_route(index, gateway)?)
        .replace()
        .execute()
        .await
        .map_err(fail(format!("default route via {gateway} on {ifname}")))
}

fn build_failed(e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError { operation: "build route".into(), message: e.to_string() }
}

/// The link-scope route to an IPv4 `gateway` on the pod's interface `index`.
fn gateway_route(index: u32, gateway: IpAddr) -> Result<RouteMessage, NetlinkError> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(gateway, 32)
        .map_err(build_failed)?
        .output_interface(index)
        .scope(RouteScope::Link)
        .build())
}

/// The default route via `gateway` on the pod's interface `index`.
fn default_route(index: u32, gateway: IpAddr) -> Result<RouteMessage, NetlinkError> {
    let any: IpAddr = if gateway.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(any, 0)
        .map_err(build_failed)?
        .gateway(gateway)
        .map_err(build_failed)?
        .output_interface(index)
        .build())
}

/// Give the pod's interface (`index`, prepared by [`prepare_pod`]) its addresses; an IPv6 address also gets
/// its default route via the IPv6 link-local gateway, and a pod without an IPv4 address loses the IPv4
/// default route [`prepare_pod`] made for it.
pub async fn address_pod(
    handle: &Handle,
    index: u32,
    ifname: &str,
    addresses: &[IpNet],
    host_mac: &[u8],
) -> Result<(), NetlinkError> {
    if addresses.iter().any(|a| a.addr().is_ipv6()) {
        // Duplicate address detection would hold the address back for a second; the address is ours alone.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0");
    }
    for address in addresses {
        handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .execute()
            .await
            .map_err(fail(format!("add {address} to {ifname}")))?;
        if address.addr().is_ipv6() {
            route_via_gateway(handle, index, ifname, GATEWAY_V6.into(), host_mac).await?;
        }
    }
    if !addresses.iter().any(|a| a.addr().is_ipv4()) {
        for route in [default_route(index, GATEWAY_V4.into())?, gateway_route(index, GATEWAY_V4.into())?] {
            handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(fail(format!("remove the IPv4 routes from {ifname}, which has no IPv4 address")))?;
        }
    }
    Ok(())
}

/// What CHECK finds wrong with the pod's interface, if anything.
pub async fn check_pod(handle: Handle, ifname: String, addresses: Vec<IpNet>) -> Result<Vec<String>, NetlinkError> {
    let mut problems = Vec::new();
    let Some((index, _)) = link_by_name(&handle, &ifname).await? else {
        return Ok(vec![format!("interface {ifname} does not exist in the pod's netns")]);
    };
    let mut present = Vec::new();
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    while let Some(message) = stream.try_next().await.map_err(fail(format!("list addresses of {ifname}")))? {
        for attribute in &message.attributes {
            if let AddressAttribute::Address(ip) = attribute {
                present.push(*ip);
            }
        }
    }
    for address in &addresses {
        if !present.contains(&address.addr()) {
            problems.push(format!("{ifname} lacks address {address}"));
        }
    }
    for family_v4 in [true, false] {
        if !addresses.iter().any(|a| a.addr().is_ipv4() == family_v4) {
            continue;
        }
        let query = if family_v4 {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        };
        let mut routes = handle.route().get(query).execute();
        let mut has_default = false;
        while let Some(route) = routes.try_next().await.map_err(fail("list routes"))? {
            let dst = route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(_) | RouteAddress::Inet6(_))));
            if route.header.destination_prefix_length == 0 && !dst {
                has_default = true;
            }
        }
        if !has_default {
            problems.push(format!("no {} default route in the pod's netns", if family_v4 { "IPv4" } else { "IPv6" }));
        }
    }
    Ok(problems)
}
