//! The poolwarden CNI plugin: wires a pod's network namespace with a veth pair and the addresses the node
//! agent allocates, and the protocol it speaks to the agent.

pub mod netlink;
pub mod plugin;
pub use poolwarden_protocol as protocol;
pub mod spec;
