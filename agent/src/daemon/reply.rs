//! The one place where the agent's errors become CNI error replies: which code the runtime sees for each
//! failure, and the hint it carries. Wiring one attachment (ADD, DEL, CHECK, a CNI GC) fails with a
//! [`WiringError`], STATUS with a [`StatusError`]; only the request handler turns them into [`ErrorReply`].
//! Node reconciliation (`ReconcileError`) and garbage collection (`CollectError`) answer no request: their
//! errors are logged by the tasks that run them.

use poolwarden_protocol::{ErrorReply, code};

use super::wiring::WiringError;
use crate::{
    allocator::AllocError,
    dataplane::routes::RouteError,
    directory::DirectoryError,
    ipam::{SelectionError, selection::ChoiceSource},
    store::StoreError,
};

/// Why STATUS says an ADD would not get an address here now.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No pool's nodeSelector matches this node (or every matching pool is disabled).
    #[error("no pool may be used on node {node}")]
    NoPool {
        /// This node.
        node: String,
    },
    /// The pools this node may use have no free address.
    #[error("the pools node {node} may use are exhausted: {}", pools.join(", "))]
    Exhausted {
        /// This node.
        node: String,
        /// The pools it may use.
        pools: Vec<String>,
    },
    /// Reading the datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the allocations failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

fn reply(code: u32, msg: impl Into<String>, details: impl Into<String>) -> ErrorReply {
    ErrorReply { code, msg: msg.into(), details: details.into() }
}

impl From<StoreError> for ErrorReply {
    fn from(err: StoreError) -> Self {
        reply(code::IO_FAILURE, "the datastore failed", err.to_string())
    }
}

impl From<RouteError> for ErrorReply {
    fn from(err: RouteError) -> Self {
        reply(code::IO_FAILURE, "programming the node's routes failed", err.to_string())
    }
}

/// A lookup of a namespace, pod or node failed: try again later when the API server could not answer.
impl From<DirectoryError> for ErrorReply {
    fn from(err: DirectoryError) -> Self {
        let message = err.to_string();
        match err {
            DirectoryError::Unreachable { .. } => {
                reply(code::TRY_AGAIN_LATER, message, "the API server did not answer; kubelet retries the ADD")
            }
            DirectoryError::NotFound { .. } => {
                reply(code::TRY_AGAIN_LATER, message, "the pod's objects are not visible to the agent yet")
            }
            DirectoryError::Refused { .. } => reply(
                code::TRY_AGAIN_LATER,
                message,
                "check the agent's ServiceAccount: it needs get/list/watch on namespaces, pods and nodes",
            ),
            DirectoryError::Store(e) => e.into(),
        }
    }
}

impl From<AllocError> for ErrorReply {
    fn from(err: AllocError) -> Self {
        let message = err.to_string();
        match err {
            AllocError::Selection(
                SelectionError::UnknownPool { named_by: ChoiceSource::Request, .. }
                | SelectionError::WrongFamily { named_by: ChoiceSource::Request, .. },
            ) => reply(code::INVALID_CONFIG, message, "fix `pools` in the network configuration"),
            AllocError::Selection(_) => reply(code::IPAM_REFUSED, message, "pool selection refused the request"),
            AllocError::Exhausted { .. } | AllocError::AddressUnavailable { .. } | AllocError::Reassigned { .. } => {
                reply(code::IPAM_REFUSED, message, "no address could be allocated")
            }
            AllocError::Attributes { .. } => reply(
                code::INVALID_ENVIRONMENT,
                message,
                "the runtime's container ID, interface name or network namespace path is longer than an allocation carries",
            ),
            AllocError::Contention { .. } | AllocError::PoolChanged { .. } | AllocError::NodesUnknown { .. } => {
                reply(code::TRY_AGAIN_LATER, message, "retry the request")
            }
            AllocError::Store(e) => e.into(),
            AllocError::Objects(e) => reply(code::IO_FAILURE, "the datastore failed", e.to_string()),
        }
    }
}

impl From<WiringError> for ErrorReply {
    fn from(err: WiringError) -> Self {
        let message = err.to_string();
        match err {
            WiringError::Invalid { rule, .. } => reply(code::INVALID_ENVIRONMENT, message, rule),
            WiringError::HostInterface { detail, .. } => reply(code::INTERFACE_SETUP, message, detail),
            WiringError::Busy { key } => reply(code::TRY_AGAIN_LATER, message, key),
            WiringError::NoAddress { .. } => {
                reply(code::UNKNOWN_CONTAINER, message, "its ADD was never made here, or its addresses were released")
            }
            WiringError::OtherAddresses { reported, held, .. } => reply(
                code::INTERFACE_SETUP,
                message,
                format!("the result says {reported:?}; the datastore says {held:?}"),
            ),
            WiringError::Enforcement { source, .. } => reply(code::INTERFACE_SETUP, message, source.to_string()),
            WiringError::EnforcementRelease(source) => reply(code::IO_FAILURE, message, source.to_string()),
            WiringError::Store(e) => e.into(),
            WiringError::Alloc(e) => e.into(),
            WiringError::Routes(e) => e.into(),
            WiringError::Directory(e) => e.into(),
        }
    }
}

impl From<StatusError> for ErrorReply {
    fn from(err: StatusError) -> Self {
        let message = err.to_string();
        match err {
            StatusError::NoPool { .. } => reply(
                code::LIMITED_CONNECTIVITY_NO_ADDRESSES,
                message,
                "apply an IPPool whose nodeSelector matches this node",
            ),
            StatusError::Exhausted { .. } => {
                reply(code::LIMITED_CONNECTIVITY_NO_ADDRESSES, message, "free addresses or add a pool")
            }
            StatusError::Store(e) => e.into(),
            StatusError::Alloc(e) => e.into(),
        }
    }
}
