//! The node's routes, over rtnetlink: a blackhole route for every block affine to this node, a /32 (or
//! /128) route per local pod to its host veth, and routes via other nodes' addresses to the blocks (and
//! borrowed addresses) they hold. Every route carries [`ROUTE_PROTOCOL`], which is how the agent
//! finds exactly its own routes after a restart and never touches anyone else's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// The route protocol number on every route poolwarden writes (`ip route show proto 97`).
pub const ROUTE_PROTOCOL: u8 = 97;

/// The link group a pod's host interface joins on DEL; the reaper deletes the whole group in one request.
/// Unregistering devices waits for an RCU grace period (about 20 ms here) once per request, not per device,
/// so one request for many devices is nearly as cheap as one for a single device.
pub const RETIRED_LINK_GROUP: u32 = 0x7077;

/// How many route requests are in flight on the netlink socket at once when programming many.
const IN_FLIGHT: usize = 64;

/// A route the agent owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OwnedRoute {
    /// Traffic to unused addresses of a block owned here dies here instead of looping.
    Blackhole(IpNet),
    /// A local pod's address, to its host veth (by interface index).
    Endpoint(IpAddr, u32),
    /// A block (or one borrowed address) another node holds, via that node's address.
    Remote(IpNet, IpAddr),
    /// The same through the VXLAN overlay: via the node's address, on-link on the overlay device (by index).
    Overlay(IpNet, IpAddr, u32),
}

impl OwnedRoute {
    fn destination(&self) -> IpNet {
        match self {
            OwnedRoute::Blackhole(net) | OwnedRoute::Remote(net, _) | OwnedRoute::Overlay(net, _, _) => *net,
            OwnedRoute::Endpoint(ip, _) => IpNet::from(*ip),
        }
    }
}

/// Errors from route programming.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A netlink request failed.
    #[error("{operation}: {message}")]
    Netlink {
        /// What was being done, naming the route or interface.
        operation: String,
        /// The kernel's answer.
        message: String,
    },
}

pub(super) fn netlink(operation: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    let operation = operation.into();
    move |e| RouteError::Netlink { operation, message: e.to_string() }
}

fn is_missing(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(msg) if matches!(msg.raw_code(), -2 | -3 | -19))
}

/// What the agent needs of the kernel's routing: its own routes, by protocol.
#[derive(Clone)]
pub struct Routes {
    pub(super) handle: Handle,
}

impl Routes {
    /// Open a netlink connection in this process's network namespace.
    pub fn connect() -> Result<Self, RouteError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| RouteError::Netlink { operation: "open netlink".into(), message: e.to_string() })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The interface index of a link, by name.
    pub async fn ifindex(&self, name: &str) -> Result<Option<u32>, RouteError> {
        match self.handle.link().get().match_name(name.to_string()).execute().try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(netlink(format!("look up link {name}"))(e)),
        }
    }

    /// The index of link `name` once it is administratively up (`None` while it is missing or down): routes
    /// through a link that is down are refused.
    pub async fn ifindex_when_up(&self, name: &str) -> Result<Option<u32>, RouteError> {
        use netlink_packet_route::link::LinkFlags;
        match self.handle.link().get().match_name(name.to_string()).execute().try_next().await {
            Ok(link) => Ok(link.filter(|l| l.header.flags.contains(LinkFlags::Up)).map(|l| l.header.index)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(netlink(format!("look up link {name}"))(e)),
        }
    }

    /// The addresses other nodes can reach this one at, with their prefix (the subnet they are on): every
    /// global address of this namespace, loopback ranges excepted, in interface order.
    pub async fn global_addresses(&self) -> Result<Vec<IpNet>, RouteError> {
        use netlink_packet_route::address::{AddressAttribute, AddressScope};
        let mut found = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(message) = addresses.try_next().await.map_err(netlink("list addresses"))? {
            if message.header.scope != AddressScope::Universe {
                continue;
            }
            for attribute in &message.attributes {
                if let AddressAttribute::Address(ip) = attribute
                    && !ip.is_loopback()
                    && let Ok(net) = IpNet::new(*ip, message.header.prefix_len)
                {
                    found.push((message.header.index, net));
                }
            }
        }
        found.sort();
        Ok(found.into_iter().map(|(_, net)| net).collect())
    }

    /// The index of every interface in this namespace.
    pub async fn link_indexes(&self) -> Result<BTreeSet<u32>, RouteError> {
        let mut indexes = BTreeSet::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(netlink("list links"))? {
            indexes.insert(link.header.index);
        }
        Ok(indexes)
    }

    /// The index of `name` if it is a bridge port the way a main plugin's pod veth is: a veth enslaved to a
    /// controller, whose peer is in another namespace. Anything else (the node's uplink, say) is not.
    pub async fn bridge_port(&self, name: &str) -> Result<Option<u32>, RouteError> {
        let link = match self.handle.link().get().match_name(name.to_string()).execute().try_next().await {
            Ok(link) => link,
            Err(e) if is_missing(&e) => None,
            Err(e) => return Err(netlink(format!("look up link {name}"))(e)),
        };
        Ok(link.and_then(|link| {
            let facts = VethFacts::of(&link)?;
            facts.enslaved.then_some(link.header.index)
        }))
    }

    /// The interface at `index`, if it is the node's side of a pod's veth: a veth whose peer is in another
    /// namespace and that no bridge holds. Returns its name and whether it is up.
    pub async fn pod_veth(&self, index: u32) -> Result<Option<(String, bool)>, RouteError> {
        let link = match self.handle.link().get().match_index(index).execute().try_next().await {
            Ok(link) => link,
            Err(e) if is_missing(&e) => None,
            Err(e) => return Err(netlink(format!("look up link {index}"))(e)),
        };
        Ok(link.and_then(|link| {
            let facts = VethFacts::of(&link)?;
            (!facts.enslaved).then_some((facts.name, facts.up))
        }))
    }

    /// The UDP ports on which a VXLAN or GENEVE device of this namespace decapsulates what arrives (ours and
    /// anyone else's): a pod must never send there, or the inner packet's source goes unchecked.
    pub async fn decap_ports(&self) -> Result<BTreeSet<u16>, RouteError> {
        use netlink_packet_route::link::{InfoData, InfoGeneve, InfoVxlan, LinkAttribute, LinkInfo};
        let mut ports = BTreeSet::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(netlink("list links"))? {
            let infos =
                link.attributes.iter().filter_map(|a| if let LinkAttribute::LinkInfo(i) = a { Some(i) } else { None });
            for info in infos.flatten() {
                match info {
                    LinkInfo::Data(InfoData::Vxlan(vxlan)) => ports.extend(vxlan.iter().filter_map(|a| match a {
                        InfoVxlan::Port(port) if *port != 0 => Some(*port),
                        _ => None,
                    })),
                    LinkInfo::Data(InfoData::Geneve(geneve)) => ports.extend(geneve.iter().filter_map(|a| match a {
                        InfoGeneve::Port(port) if *port != 0 => Some(*port),
                        _ => None,
                    })),
                    _ => {}
                }
            }
        }
        Ok(ports)
    }

    /// Mark a link (by index: a new link may take its name meanwhile) for the next [`Routes::reap`], and take
    /// it down so nothing more goes through it.
    pub async fn retire_link(&self, index: u32) -> Result<(), RouteError> {
        let message = LinkUnspec::new_with_index(index).link_group(RETIRED_LINK_GROUP).down().build();
        match self.handle.link().set(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(netlink(format!("retire link {index}"))(e)),
        }
    }

    /// Delete every retired link in one request.
    pub async fn reap(&self) -> Result<(), RouteError> {
        let message = LinkMessageBuilder::<LinkUnspec>::new().link_group(RETIRED_LINK_GROUP).build();
        match self.handle.link().del_with_message(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(netlink("delete the retired links")(e)),
        }
    }

    fn message(route: &OwnedRoute) -> Result<RouteMessage, RouteError> {
        let destination = route.destination();
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(destination.network(), destination.prefix_len())
            .map_err(|e| RouteError::Netlink { operation: format!("build route {route:?}"), message: e.to_string() })?
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        Ok(match route {
            OwnedRoute::Blackhole(_) => builder.kind(RouteType::BlackHole),
            OwnedRoute::Endpoint(_, ifindex) => builder.output_interface(*ifindex),
            OwnedRoute::Remote(_, gateway) | OwnedRoute::Overlay(_, gateway, _) => {
                let via = builder.gateway(*gateway).map_err(|e| RouteError::Netlink {
                    operation: format!("build route {route:?}"),
                    message: e.to_string(),
                })?;
                match route {
                    OwnedRoute::Overlay(_, _, ifindex) => via.output_interface(*ifindex).onlink(),
                    _ => via,
                }
            }
        }
        .build())
    }

    /// Add or replace one route.
    pub async fn install(&self, route: &OwnedRoute) -> Result<(), RouteError> {
        self.handle
            .route()
            .add(Self::message(route)?)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add route {route:?}")))
    }

    /// Remove one route; a route already gone is not an error.
    pub async fn remove(&self, route: &OwnedRoute) -> Result<(), RouteError> {
        match self.handle.route().del(Self::message(route)?).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(netlink(format!("delete route {route:?}"))(e)),
        }
    }

    /// Every route in the main table carrying our protocol.
    pub async fn owned(&self) -> Result<BTreeSet<OwnedRoute>, RouteError> {
        let mut found = BTreeSet::new();
        for query in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
            let mut routes = self.handle.route().get(query).execute();
            while let Some(route) = routes.try_next().await.map_err(netlink("list routes"))? {
                if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let mut destination = None;
                let mut oif = None;
                let mut gateway = None;
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = Some(IpAddr::V4(*a)),
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => destination = Some(IpAddr::V6(*a)),
                        RouteAttribute::Oif(index) => oif = Some(*index),
                        _ => {}
                    }
                }
                let Some(destination) = destination else { continue };
                let Ok(net) = IpNet::new(destination, route.header.destination_prefix_length) else { continue };
                if route.header.kind == RouteType::BlackHole {
                    found.insert(OwnedRoute::Blackhole(net));
                } else if let (Some(gateway), Some(oif), true) =
                    (gateway, oif, route.header.flags.contains(RouteFlags::Onlink))
                {
                    found.insert(OwnedRoute::Overlay(net, gateway, oif));
                } else if let Some(gateway) = gateway {
                    found.insert(OwnedRoute::Remote(net, gateway));
                } else if let Some(oif) = oif {
                    found.insert(OwnedRoute::Endpoint(destination, oif));
                }
            }
        }
        Ok(found)
    }

    /// Make the kernel's routes with our protocol exactly `desired`: add what is missing, remove what is
    /// extra, with many requests in flight on one netlink socket. Returns (added, removed).
    pub async fn reconcile(&self, desired: &BTreeSet<OwnedRoute>) -> Result<(usize, usize), RouteError> {
        let current = self.owned().await?;
        // An endpoint whose interface changed is replaced, not added next to its old route.
        let current_by_destination: BTreeMap<IpNet, &OwnedRoute> =
            current.iter().map(|r| (r.destination(), r)).collect();
        let desired_destinations: BTreeSet<IpNet> = desired.iter().map(OwnedRoute::destination).collect();
        let to_add: Vec<&OwnedRoute> =
            desired.iter().filter(|r| current_by_destination.get(&r.destination()) != Some(r)).collect();
        let to_remove: Vec<&OwnedRoute> =
            current.iter().filter(|r| !desired_destinations.contains(&r.destination())).collect();
        let added = to_add.len();
        let removed = to_remove.len();
        let removals = to_remove.into_iter().cloned().map(|route| {
            let routes = self.clone();
            async move { routes.remove(&route).await }
        });
        let mut results: Vec<Result<(), RouteError>> =
            stream::iter(removals).buffer_unordered(IN_FLIGHT).collect().await;
        let additions = to_add.into_iter().cloned().map(|route| {
            let routes = self.clone();
            async move { routes.install(&route).await }
        });
        // One route the kernel refuses (a gateway not on-link, say) does not keep the others from being
        // programmed; the first refusal is reported once everything else is in place.
        results.extend(stream::iter(additions).buffer_unordered(IN_FLIGHT).collect::<Vec<_>>().await);
        results.into_iter().collect::<Result<(), _>>()?;
        Ok((added, removed))
    }
}

/// What makes a link a pod's veth: the facts of a veth whose peer is in another namespace.
struct VethFacts {
    name: String,
    up: bool,
    /// A bridge (or other controller) holds it.
    enslaved: bool,
}

impl VethFacts {
    /// `None` unless `link` is a veth whose peer is in another namespace.
    fn of(link: &netlink_packet_route::link::LinkMessage) -> Option<Self> {
        use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
        let veth = link.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        });
        let peer_elsewhere = link.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        if !(veth && peer_elsewhere) {
            return None;
        }
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
        Some(Self {
            name,
            up: link.header.flags.contains(LinkFlags::Up),
            enslaved: link.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(_))),
        })
    }
}
