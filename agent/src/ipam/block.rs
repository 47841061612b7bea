//! A block: a slice of a pool that one node claims, with its allocations and a free list.
//!
//! The free list is a FIFO ordered by release time, so picking the next address is O(1) whatever the number
//! of addresses allocated, and a released address goes to the back: it is handed out again only after every
//! address released before it, and never before the reuse cooldown has passed.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The handle (one per container and interface) that owns the address.
    pub handle: String,
    /// The node the address is used on (differs from the block's affinity when borrowed).
    pub node: String,
    /// The pod's namespace, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The block's sequence number when this address was assigned: tells a reassigned address from the
    /// old allocation a garbage collector saw.
    pub sequence: u64,
    /// What the node's agent keeps of the attachment (container, interfaces, network namespace, ...), with
    /// the address it is about: the single-object allocator's endpoint record (the multi-key allocator keeps
    /// endpoint records apart and leaves this empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// The owner of an address being assigned: everything in [`Allocation`] except the sequence number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// The handle.
    pub handle: String,
    /// The node using the address.
    pub node: String,
    /// The pod's namespace.
    pub namespace: Option<String>,
    /// The pod's name.
    pub pod: Option<String>,
    /// The attachment's attributes.
    pub attributes: BTreeMap<String, String>,
}

/// Why an address in a block could not be assigned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The address is not in this block.
    #[error("{ip} is not in block {block}")]
    OutOfBlock {
        /// The address.
        ip: IpAddr,
        /// The block.
        block: IpNet,
    },
    /// The address is already in use.
    #[error("{ip} is already in use by {handle}")]
    InUse {
        /// The address.
        ip: IpAddr,
        /// Its holder.
        handle: String,
    },
    /// The address was released too recently to be reused.
    #[error("{ip} was released {ago}s ago and cannot be reused for another {remaining}s (reuseCooldownSeconds)")]
    CoolingDown {
        /// The address.
        ip: IpAddr,
        /// Seconds since its release.
        ago: u64,
        /// Seconds until it can be reused.
        remaining: u64,
    },
}

/// A block of addresses and who holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The block's range.
    pub cidr: IpNet,
    /// The pool the block was cut from.
    pub pool: String,
    /// The node the block is affine to (`None` once its node is gone and it awaits release).
    pub affinity: Option<String>,
    /// Incremented at every assignment; see [`Allocation::sequence`].
    pub sequence: u64,
    /// Allocated addresses by ordinal (offset from the block's first address).
    pub allocations: BTreeMap<u32, Allocation>,
    /// Free ordinals with the time (seconds since the epoch) they were released, oldest release first.
    free: VecDeque<(u32, u64)>,
    /// When the last address was released, if the block is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_since: Option<u64>,
}

impl Block {
    /// A new, empty block affine to `node`.
    pub fn new(cidr: IpNet, pool: &str, node: &str, now: u64) -> Self {
        let size = u32::try_from(crate::resources::prefix_size(cidr)).unwrap_or(u32::MAX);
        Self {
            cidr,
            pool: pool.to_string(),
            affinity: Some(node.to_string()),
            sequence: 0,
            allocations: BTreeMap::new(),
            free: (0..size).map(|ordinal| (ordinal, 0)).collect(),
            empty_since: Some(now),
        }
    }

    /// How many addresses the block has.
    pub fn size(&self) -> u32 {
        u32::try_from(self.allocations.len() + self.free.len()).unwrap_or(u32::MAX)
    }

    /// How many addresses are allocated.
    pub fn used(&self) -> u32 {
        u32::try_from(self.allocations.len()).unwrap_or(u32::MAX)
    }

    /// How many addresses are free, including those still cooling down.
    pub fn free_count(&self) -> u32 {
        u32::try_from(self.free.len()).unwrap_or(u32::MAX)
    }

    /// Whether nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty()
    }

    /// How many addresses could be assigned now, honouring the cooldown.
    pub fn available(&self, now: u64, cooldown: u64) -> u32 {
        let ready = self.free.iter().take_while(|&&(_, released)| reusable(released, now, cooldown)).count();
        u32::try_from(ready).unwrap_or(u32::MAX)
    }

    /// Whether an address can be assigned now (O(1)).
    pub fn has_available(&self, now: u64, cooldown: u64) -> bool {
        self.free.front().is_some_and(|&(_, released)| reusable(released, now, cooldown))
    }

    /// Whether the block may go back to its pool at `now`: nothing allocated, and every released address past
    /// its cooldown (given back sooner, it could be cut again with that address free at once).
    pub fn may_go_back(&self, now: u64, cooldown: u64) -> bool {
        self.is_empty() && now >= self.cooled_down_at(cooldown)
    }

    /// The time after which no address of this block is still cooling down.
    pub fn cooled_down_at(&self, cooldown: u64) -> u64 {
        // The newest release, wherever it is: a block released from by several processes (borrowers, a
        // collector) may hold their stamps out of order when their clocks differ.
        let newest = self.free.iter().map(|&(_, released)| released).max().unwrap_or(0);
        if newest == 0 { 0 } else { newest + cooldown }
    }

    /// Assign the address that has been free the longest, if one is past its cooldown.
    pub fn assign_next(&mut self, owner: &Owner, now: u64, cooldown: u64) -> Option<IpAddr> {
        if !self.has_available(now, cooldown) {
            return None;
        }
        let (ordinal, _) = self.free.pop_front()?;
        self.record(ordinal, owner);
        Some(self.address(ordinal))
    }

    /// Assign the address that has been free the longest among those `allowed`, if one is past its cooldown
    /// (an IPAM-only attachment's range: see [`super::Eligible`]).
    pub fn assign_next_where(
        &mut self,
        owner: &Owner,
        now: u64,
        cooldown: u64,
        allowed: impl Fn(IpAddr) -> bool,
    ) -> Option<IpAddr> {
        let index = self
            .free
            .iter()
            .take_while(|&&(_, released)| reusable(released, now, cooldown))
            .position(|&(ordinal, _)| allowed(self.address(ordinal)))?;
        let (ordinal, _) = self.free.remove(index)?;
        self.record(ordinal, owner);
        Some(self.address(ordinal))
    }

    /// Assign one specific address.
    pub fn assign_ip(&mut self, ip: IpAddr, owner: &Owner, now: u64, cooldown: u64) -> Result<(), BlockError> {
        let ordinal = self.ordinal(ip)?;
        if let Some(existing) = self.allocations.get(&ordinal) {
            return Err(BlockError::InUse { ip, handle: existing.handle.clone() });
        }
        let index =
            self.free.iter().position(|&(o, _)| o == ordinal).ok_or(BlockError::OutOfBlock { ip, block: self.cidr })?;
        let released = self.free[index].1;
        if !reusable(released, now, cooldown) {
            let ago = now.saturating_sub(released);
            return Err(BlockError::CoolingDown { ip, ago, remaining: cooldown - ago });
        }
        self.free.remove(index);
        self.record(ordinal, owner);
        Ok(())
    }

    fn record(&mut self, ordinal: u32, owner: &Owner) {
        self.sequence += 1;
        self.empty_since = None;
        self.allocations.insert(
            ordinal,
            Allocation {
                handle: owner.handle.clone(),
                node: owner.node.clone(),
                namespace: owner.namespace.clone(),
                pod: owner.pod.clone(),
                sequence: self.sequence,
                attributes: owner.attributes.clone(),
            },
        );
    }

    /// Release one address; returns who held it, or `None` if it was free.
    pub fn release_ip(&mut self, ip: IpAddr, now: u64) -> Option<Allocation> {
        let ordinal = self.ordinal(ip).ok()?;
        let allocation = self.allocations.remove(&ordinal)?;
        self.free.push_back((ordinal, now.max(1)));
        if self.allocations.is_empty() {
            self.empty_since = Some(now);
        }
        Some(allocation)
    }

    /// Release every address held by `handle`; returns them.
    pub fn release_handle(&mut self, handle: &str, now: u64) -> Vec<IpAddr> {
        let ips = self.ips_of(handle);
        for ip in &ips {
            self.release_ip(*ip, now);
        }
        ips
    }

    /// Whether `handle` holds an address here.
    pub fn holds(&self, handle: &str) -> bool {
        self.allocations.values().any(|a| a.handle == handle)
    }

    /// The addresses held by `handle`.
    pub fn ips_of(&self, handle: &str) -> Vec<IpAddr> {
        self.allocations.iter().filter(|(_, a)| a.handle == handle).map(|(&o, _)| self.address(o)).collect()
    }

    /// The allocation of one address, if any.
    pub fn allocation(&self, ip: IpAddr) -> Option<&Allocation> {
        self.ordinal(ip).ok().and_then(|o| self.allocations.get(&o))
    }

    /// Every allocated address with its holder.
    pub fn allocated(&self) -> impl Iterator<Item = (IpAddr, &Allocation)> {
        self.allocations.iter().map(|(&o, a)| (self.address(o), a))
    }

    /// The address at an ordinal.
    pub fn address(&self, ordinal: u32) -> IpAddr {
        from_u128(self.cidr.network(), to_u128(self.cidr.network()) + u128::from(ordinal))
    }

    fn ordinal(&self, ip: IpAddr) -> Result<u32, BlockError> {
        if !self.cidr.contains(&ip) {
            return Err(BlockError::OutOfBlock { ip, block: self.cidr });
        }
        u32::try_from(to_u128(ip) - to_u128(self.cidr.network()))
            .map_err(|_| BlockError::OutOfBlock { ip, block: self.cidr })
    }

    /// Internal consistency: every ordinal is either allocated or free, exactly once.
    pub fn is_consistent(&self) -> bool {
        let size = crate::resources::prefix_size(self.cidr);
        let mut seen = vec![false; usize::try_from(size).unwrap_or(0)];
        let ordinals = self.allocations.keys().copied().chain(self.free.iter().map(|&(o, _)| o));
        for ordinal in ordinals {
            match seen.get_mut(ordinal as usize) {
                Some(slot) if !*slot => *slot = true,
                _ => return false,
            }
        }
        seen.iter().all(|&s| s)
    }
}

fn reusable(released: u64, now: u64, cooldown: u64) -> bool {
    released == 0 || now >= released.saturating_add(cooldown)
}

/// An address as a number, for arithmetic on ranges.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of the same family as `like` with numeric value `n`.
pub fn from_u128(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(handle: &str) -> Owner {
        Owner { handle: handle.into(), node: "n1".into(), ..Owner::default() }
    }

    #[test]
    fn hands_out_in_order_and_reuses_oldest_release_after_cooldown() {
        let mut block = Block::new("10.0.0.8/29".parse().unwrap(), "p", "n1", 100);
        let ips: Vec<_> = (0..8).map(|i| block.assign_next(&owner(&format!("h{i}")), 100, 30).unwrap()).collect();
        assert_eq!(ips[0], "10.0.0.8".parse::<IpAddr>().unwrap());
        assert_eq!(ips[7], "10.0.0.15".parse::<IpAddr>().unwrap());
        assert_eq!(block.assign_next(&owner("x"), 100, 30), None, "full block");
        block.release_ip(ips[3], 200);
        block.release_ip(ips[1], 210);
        assert_eq!(block.assign_next(&owner("x"), 229, 30), None, "still cooling down");
        assert_eq!(block.available(230, 30), 1);
        assert_eq!(block.assign_next(&owner("x"), 230, 30), Some(ips[3]), "oldest release first");
        assert!(matches!(
            block.assign_ip(ips[1], &owner("y"), 235, 30),
            Err(BlockError::CoolingDown { remaining: 5, .. })
        ));
        assert!(block.is_consistent());
    }

    #[test]
    fn release_by_handle_frees_all_of_them() {
        let mut block = Block::new("fd00::/126".parse().unwrap(), "p", "n1", 0);
        block.assign_ip("fd00::2".parse().unwrap(), &owner("a"), 0, 0).unwrap();
        block.assign_next(&owner("a"), 0, 0).unwrap();
        block.assign_next(&owner("b"), 0, 0).unwrap();
        assert!(matches!(
            block.assign_ip("fd00::2".parse().unwrap(), &owner("c"), 0, 0),
            Err(BlockError::InUse { .. })
        ));
        assert_eq!(block.release_handle("a", 5).len(), 2);
        assert_eq!(block.used(), 1);
        assert_eq!(block.empty_since, None);
        block.release_handle("b", 6);
        assert_eq!(block.empty_since, Some(6));
        assert!(block.is_consistent());
    }
}
