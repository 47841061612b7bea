//! poolwarden: per-namespace IP address management with kernel enforcement.
//!
//! This crate holds the node agent and the `poolwarden` CLI. The layers, from the bottom: [`resources`]
//! (the documents users write), [`ipam`] (pure allocation logic), [`store`] (the datastore), [`catalog`] and
//! [`allocator`] (the operations that turn decisions into datastore transactions), [`cluster`] (what nodes
//! share), [`dataplane`] (the kernel objects), [`commands`] (the CLI) and [`daemon`] (the agent).

pub mod allocator;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod daemon;
pub mod dataplane;
pub mod directory;
pub mod firewall;
pub mod ipam;
pub mod k8s;
pub mod migrate;
pub mod objects;
pub mod resources;
pub mod store;
