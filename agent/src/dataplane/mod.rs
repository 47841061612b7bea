//! What touches the kernel: routes now; eBPF enforcement and NAT join here.

pub mod enforcement;
pub mod routes;
