//! Source-address enforcement in the kernel: the eBPF program from `ebpf/` (embedded in this binary), its
//! endpoint map, its counters, and running it on crafted packets (`BPF_PROG_TEST_RUN`) for tests and
//! benchmarks.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        links::{FdLink, Link as _, LinkOrder, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};
use ipnet::IpNet;
pub use poolwarden_ebpf_common::{
    ARRAY_ENDPOINTS, COUNT_PASSED, DEFAULT_DECAP_PORTS, DROP_REPORTS_PER_SECOND, DropEvent, Endpoint, HAS_IPV4,
    HAS_IPV6, POOL_MODE, POOL_NAME_LEN, POOL_SLOTS, PRESENT, TUNNEL_PROTOCOLS, counter_index, reason,
};
pub use poolwarden_protocol::EnforcementHook;

/// What counters are reported under when their slot has no pool (an interface without an entry, a pod
/// without a pool).
pub const NO_POOL: &str = "<none>";

/// How the agent enforces pods' source addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EnforcementMode {
    /// A pod may send only from its own addresses.
    Strict,
    /// A pod may send from any address of its pools.
    Pool,
    /// No enforcement.
    Off,
}

/// The enforcement object, built for `bpfel-unknown-none` by `build.rs`.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/poolwarden-ebpf"));

/// The program that decides (counting drops), attached by default.
pub const ENFORCE: &str = "enforce";
/// The same, counting passed packets too: attached by an agent run with `--count-passed-packets`.
pub const ENFORCE_COUNTING: &str = "enforce_counting";
/// The program that passes everything (the benchmark's baseline).
pub const PASS: &str = "pass";
/// The least a check of a pod's source by one shared program costs (its endpoint's entry and one comparison):
/// the benchmark's floor, never attached.
pub const FLOOR: &str = "floor";
/// What the program returns for a packet it lets through (`TC_ACT_UNSPEC`, as the kernel reports it).
pub const VERDICT_PASS: u32 = u32::MAX;
/// What the program returns for a packet it drops (`TC_ACT_SHOT`).
pub const VERDICT_DROP: u32 = 2;

/// Errors from loading or driving the program.
#[derive(Debug, thiserror::Error)]
pub enum EnforcementError {
    /// Loading the object or a program failed (the verifier's log is in the message).
    #[error("loading the enforcement program: {0}")]
    Load(String),
    /// A map operation failed.
    #[error("{operation}: {message}")]
    Map {
        /// What was being done.
        operation: String,
        /// The kernel's answer.
        message: String,
    },
}

fn map_error(operation: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> EnforcementError {
    let operation = operation.into();
    move |e| EnforcementError::Map { operation, message: e.to_string() }
}

/// What the agent writes for one pod: its addresses, its pools, and the mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The pod's addresses (at most one per family is enforced).
    pub addresses: Vec<IpAddr>,
    /// The pod's pools (used in pool mode).
    pub pools: Vec<IpNet>,
    /// Pool mode: any source inside the pod's pools passes.
    pub pool_mode: bool,
    /// The pool's counter slot ([`Enforcement::pool_slot`]).
    pub pool_id: u32,
}

impl EndpointSpec {
    /// The map value.
    pub fn entry(&self) -> Endpoint {
        let mut entry = Endpoint { pool_id: self.pool_id, flags: PRESENT, ..Endpoint::default() };
        if self.pool_mode {
            entry.flags |= POOL_MODE;
        }
        // Each family's "pool" starts as the pod's own address alone: a family whose pool is unknown (deleted
        // with --force, say) must not be left as 0/0, which pool mode would read as "every source".
        for address in &self.addresses {
            match address {
                IpAddr::V4(v4) => {
                    entry.ipv4 = v4.octets();
                    entry.pool_ipv4 = v4.octets();
                    entry.pool_ipv4_mask = [0xff; 4];
                    entry.flags |= HAS_IPV4;
                }
                IpAddr::V6(v6) => {
                    entry.ipv6 = v6.octets();
                    entry.pool_ipv6 = v6.octets();
                    entry.pool_ipv6_mask = [0xff; 16];
                    entry.flags |= HAS_IPV6;
                }
            }
        }
        for pool in &self.pools {
            match pool {
                IpNet::V4(net) => {
                    entry.pool_ipv4 = net.network().octets();
                    entry.pool_ipv4_mask = net.netmask().octets();
                }
                IpNet::V6(net) => {
                    entry.pool_ipv6 = net.network().octets();
                    entry.pool_ipv6_mask = net.netmask().octets();
                }
            }
        }
        entry
    }
}

/// The default directory (on bpffs) for the pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/poolwarden";

/// The layout version of the pinned maps: they live in `v<PIN_ABI>/` under the pin directory. Bump it when a
/// map's type, key or value changes; a new agent then loads fresh maps beside the old ones and swaps its
/// program into every pod's filter atomically (see [`Enforcement::enforce`]), so no pod goes unenforced.
pub const PIN_ABI: u32 = 5;

/// The directory of this build's pins under `root`.
pub fn versioned(root: &Path) -> PathBuf {
    root.join(format!("v{PIN_ABI}"))
}

/// The bpffs magic number (`statfs`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Make sure `dir` is on a bpffs, mounting one at /sys/fs/bpf if that is where it should be and nothing is.
pub fn ensure_bpffs(dir: &Path) -> Result<(), EnforcementError> {
    let on_bpffs = |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let mount_point = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if !on_bpffs(mount_point) {
        let sys = Path::new("/sys/fs/bpf");
        if !dir.starts_with(sys) {
            return Err(EnforcementError::Load(format!(
                "{} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
                dir.display()
            )));
        }
        nix::mount::mount(Some("bpf"), sys, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| EnforcementError::Load(format!("mount bpffs at /sys/fs/bpf: {e}")))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| EnforcementError::Load(format!("create {}: {e}", dir.display())))
}

/// The loaded program and its maps. Maps are pinned by name in the pin directory (so they outlive the agent
/// and a restarted agent adopts them); filters stay in the kernel by themselves, so pods stay enforced while
/// the agent is down.
pub struct Enforcement {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    root: PathBuf,
    /// Interfaces this process attached (or re-attached) the program to.
    attached_here: std::collections::HashSet<u32>,
    /// The interfaces with an entry, kept in step with every write (read from the maps once, at load):
    /// scanning the 65,536-slot array instead would cost a reconcile tens of milliseconds.
    entered: std::collections::BTreeSet<u32>,
    /// Counter slot -> pool name, as pinned in POOL_NAMES (read once, at load, and kept in step).
    names: std::collections::BTreeMap<u32, String>,
    /// The blocked UDP ports as this instance's program reads them (its `.data.decap_ports`), kept in step.
    decap: Box<[u8; DECAP_PORTS_LEN]>,
    /// The program attached from now on counts passed packets ([`ENFORCE_COUNTING`]), and the entries
    /// written from now on record so.
    count_passed: bool,
}

/// The program's own copy of the blocked UDP ports: global data, one byte per port.
const DECAP_DATA: &str = ".data.decap_ports";
const DECAP_PORTS_LEN: usize = 65_536;

/// The priority of our filter at clsact ingress.
const FILTER_PRIORITY: u16 = 1;
/// The handle of our filter (fixed, so a restart or an upgrade finds and replaces it).
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 0x7077);

impl Enforcement {
    /// Load the object and its programs (this is where the verifier runs), with maps pinned in (and adopted
    /// from) `root/v<PIN_ABI>`; `root` must be on a bpffs (mounted at /sys/fs/bpf if it belongs there).
    pub fn load(root: &Path) -> Result<Self, EnforcementError> {
        let pin_dir = versioned(root);
        ensure_bpffs(&pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&pin_dir);
        let mut ebpf = loader.load(OBJECT).map_err(|e| EnforcementError::Load(e.to_string()))?;
        for name in [ENFORCE, ENFORCE_COUNTING, PASS, FLOOR] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| EnforcementError::Load(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| EnforcementError::Load(e.to_string()))?;
            program.load().map_err(|e| EnforcementError::Load(format!("{name}: {e:?}")))?;
        }
        let entered = read_entries(&pin_dir)?.into_iter().map(|(index, _)| index).collect();
        let names = read_names(&pin_dir)?;
        // What this build's program instance was compiled with (the defaults), which the pinned ports join.
        let decap = Array::<&MapData, [u8; DECAP_PORTS_LEN]>::try_from(
            ebpf.map(DECAP_DATA).ok_or_else(|| EnforcementError::Load(format!("map {DECAP_DATA} missing")))?,
        )
        .and_then(|data| data.get(&0, 0))
        .map(Box::new)
        .map_err(map_error(format!("read {DECAP_DATA}")))?;
        let pinned = read_decap_ports(&pin_dir)?;
        let mut enforcement = Self {
            ebpf,
            pin_dir,
            root: root.to_path_buf(),
            attached_here: Default::default(),
            entered,
            names,
            decap,
            count_passed: false,
        };
        enforcement.block_decap_ports(DEFAULT_DECAP_PORTS.into_iter().chain(pinned))?;
        Ok(enforcement)
    }

    /// Drop what pods send to these UDP ports (whatever the destination): ports where a VXLAN, GENEVE or
    /// FOU device decapsulates. Ports stay blocked once blocked (the map is pinned; a device that goes may
    /// come back). Each goes into the pinned record first, then into this instance's own copy, which its
    /// program reads (programs an earlier agent attached read theirs until this one's replaces them).
    pub fn block_decap_ports(&mut self, ports: impl IntoIterator<Item = u16>) -> Result<(), EnforcementError> {
        let mut map: Array<&mut MapData, u8> = Array::try_from(
            self.ebpf.map_mut("DECAP_PORTS").ok_or_else(|| EnforcementError::Load("map DECAP_PORTS missing".into()))?,
        )
        .map_err(map_error("open DECAP_PORTS"))?;
        let mut new = Vec::new();
        for port in ports {
            map.set(u32::from(port), 1, 0).map_err(map_error(format!("block UDP port {port}")))?;
            if self.decap[usize::from(port)] == 0 {
                new.push(port);
            }
        }
        if !new.is_empty() {
            let mut decap = self.decap.clone();
            for port in new {
                decap[usize::from(port)] = 1;
            }
            let mut data: Array<&mut MapData, [u8; DECAP_PORTS_LEN]> =
                Array::try_from(self.map_mut(DECAP_DATA)?).map_err(map_error(format!("open {DECAP_DATA}")))?;
            data.set(0, *decap, 0).map_err(map_error(format!("write {DECAP_DATA}")))?;
            // Only once the program has them: a failed write is tried again by the next call.
            self.decap = decap;
        }
        Ok(())
    }

    /// Swap this instance's program in wherever a program of ours is attached to interface `ifindex` (the
    /// TCX link pinned for it, or its clsact filter), never attaching anew, and have its entry count passed
    /// packets as this agent does. For an interface with an entry that no endpoint record names (the record
    /// was lost), so that it too runs this build's program, which reads this instance's closed ports: the
    /// program an earlier agent attached reads its own copy, which nobody writes any more. Nothing happens on
    /// an interface that is gone or carries nothing of ours (an index used again by another interface).
    pub fn adopt_unrecorded(&mut self, ifindex: u32) -> Result<(), EnforcementError> {
        if self.attached_here.contains(&ifindex) {
            return Ok(());
        }
        let Some(ifname) = interface_name(ifindex) else { return Ok(()) };
        if !self.swap_into_pinned_tcx(&ifname, ifindex)? {
            let attach_err = |e: String| EnforcementError::Map {
                operation: format!("replace the program on {ifname} (clsact ingress)"),
                message: e,
            };
            let existing =
                SchedClassifierLink::attached(&ifname, TcAttachType::Ingress, FILTER_PRIORITY, FILTER_HANDLE, None)
                    .map_err(|e| attach_err(e.to_string()))?;
            let program = enforce_program(&mut self.ebpf, self.count_passed)?;
            // A replacement only (no NLM_F_CREATE): no filter of ours there is ENOENT, and no clsact qdisc (or a
            // filter of another kind at our priority) EINVAL.
            let id = match program.attach_to_link(existing) {
                Ok(id) => id,
                Err(aya::programs::ProgramError::TcError(TcError::NetlinkError(e)))
                    if matches!(e.raw_os_error(), Some(code) if code == nix::errno::Errno::ENOENT as i32
                        || code == nix::errno::Errno::EINVAL as i32) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(attach_err(e.to_string())),
            };
            let link = program.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            std::mem::forget(link);
        }
        self.attached_here.insert(ifindex);
        if let Some(mut entry) = read_entry(&self.pin_dir, ifindex)? {
            let counting = if self.count_passed { entry.flags | COUNT_PASSED } else { entry.flags & !COUNT_PASSED };
            if counting != entry.flags {
                entry.flags = counting;
                self.write_entry(ifindex, Some(entry))?;
            }
        }
        Ok(())
    }

    /// Whether the program attached now counts passed packets.
    pub fn counts_passed_packets(&self) -> bool {
        self.count_passed
    }

    /// Whether the program attached from now on counts the packets it passes ([`ENFORCE_COUNTING`]; drops
    /// are always counted), as the entries written from now on record (for `enforcement status`). Set before
    /// attaching anything: an interface this process attached keeps its program. Counting makes the check of
    /// an allowed packet about a third dearer (the enforcement bench measures both).
    pub fn count_passed_packets(&mut self, on: bool) {
        self.count_passed = on;
    }

    /// Enforce `spec` on the host-side interface `ifname` (index `ifindex`): the entry first, then the
    /// program as a direct-action `cls_bpf` filter at clsact ingress (the pod's egress), so the program never
    /// runs on it without its entry. The filter sits at a fixed priority and handle: if one is there already
    /// (an earlier run's or an older build's program), it is replaced atomically, never removed and re-added.
    ///
    /// Why not TCX: attaching a TCX link waits for an RCU grace period under RTNL (about 10-15 ms here, and
    /// serialising every netlink user on the node), which would triple the time of a pod's ADD; a netlink
    /// filter's mini-qdisc swap uses an expedited grace period. Netlink filters also stay in the kernel
    /// when this process exits or dies, with no pin needed.
    pub fn enforce(
        &mut self,
        ifname: &str,
        ifindex: u32,
        spec: &EndpointSpec,
        hook: EnforcementHook,
    ) -> Result<(), EnforcementError> {
        self.set_endpoint(ifindex, spec)?;
        self.attach(ifname, ifindex, hook)
    }

    /// Attach the program to `ifname` (index `ifindex`) before its entry is written: until then it drops
    /// everything there (fail closed), so an ADD attaches while it allocates and only writes the entry once
    /// the addresses are known. Idempotent.
    pub fn attach(&mut self, ifname: &str, ifindex: u32, hook: EnforcementHook) -> Result<(), EnforcementError> {
        if self.attached_here.contains(&ifindex) {
            return Ok(());
        }
        if hook == EnforcementHook::Tcx {
            self.attach_tcx(ifname, ifindex)?;
            self.attached_here.insert(ifindex);
            return Ok(());
        }
        let program = enforce_program(&mut self.ebpf, self.count_passed)?;
        let attach_err =
            |e: String| EnforcementError::Map { operation: format!("attach to {ifname} (clsact ingress)"), message: e };
        // Creating the clsact qdisc fails harmlessly when it exists.
        let _ = aya::programs::tc::qdisc_add_clsact(ifname);
        let options = NlOptions { priority: FILTER_PRIORITY, handle: FILTER_HANDLE, classid: None };
        let id = match program.attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::Netlink(options)) {
            Ok(id) => id,
            Err(_) => {
                // A filter is there already: swap our program into it in one netlink request.
                let existing =
                    SchedClassifierLink::attached(ifname, TcAttachType::Ingress, FILTER_PRIORITY, FILTER_HANDLE, None)
                        .map_err(|e| attach_err(e.to_string()))?;
                program.attach_to_link(existing).map_err(|e| attach_err(e.to_string()))?
            }
        };
        // The filter must outlive this process: forget the link instead of letting aya detach it on drop.
        let link = program.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        std::mem::forget(link);
        self.attached_here.insert(ifindex);
        Ok(())
    }

    /// Where the TCX link of interface `ifindex` is pinned under a version directory.
    fn tcx_pin(version_dir: &Path, ifindex: u32) -> PathBuf {
        version_dir.join("tcx").join(ifindex.to_string())
    }

    /// Attach as a TCX link at ingress, pinned (a link lives only as long as something holds it). A link an
    /// earlier run (of this build or an older one) pinned for the interface gets this program swapped in
    /// atomically and is pinned in this build's directory; a pin whose interface is gone (its link is
    /// defunct: the update fails) is removed and a new link made.
    fn attach_tcx(&mut self, ifname: &str, ifindex: u32) -> Result<(), EnforcementError> {
        if self.swap_into_pinned_tcx(ifname, ifindex)? {
            return Ok(());
        }
        let attach_err =
            |e: String| EnforcementError::Map { operation: format!("attach to {ifname} (TCX ingress)"), message: e };
        let pin = Self::tcx_pin(&self.pin_dir, ifindex);
        let program = enforce_program(&mut self.ebpf, self.count_passed)?;
        std::fs::create_dir_all(pin.parent().unwrap_or(&self.pin_dir)).map_err(|e| attach_err(e.to_string()))?;
        let id = program
            .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|e| attach_err(e.to_string()))?;
        let link = program.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        let link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
        link.pin(&pin).map_err(|e| attach_err(e.to_string()))?;
        Ok(())
    }

    /// Swap this program into the TCX link an earlier run (of this build or an older one) pinned for
    /// interface `ifindex`, pinned then in this build's directory; a pin whose interface is gone (its link is
    /// defunct: the update fails) is removed. Whether a link took the program.
    fn swap_into_pinned_tcx(&mut self, ifname: &str, ifindex: u32) -> Result<bool, EnforcementError> {
        let attach_err =
            |e: String| EnforcementError::Map { operation: format!("attach to {ifname} (TCX ingress)"), message: e };
        let pin = Self::tcx_pin(&self.pin_dir, ifindex);
        let earlier: Vec<PathBuf> = std::iter::once(pin.clone())
            .chain(self.older_versions().iter().map(|dir| Self::tcx_pin(dir, ifindex)))
            .filter(|p| p.exists())
            .collect();
        let program = enforce_program(&mut self.ebpf, self.count_passed)?;
        std::fs::create_dir_all(pin.parent().unwrap_or(&self.pin_dir)).map_err(|e| attach_err(e.to_string()))?;
        for existing in earlier {
            let pinned =
                PinnedLink::from_pin(&existing).map_err(|e| attach_err(format!("open {}: {e}", existing.display())))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| attach_err(e.to_string()))?;
            let id = match program.attach_to_link(link) {
                Ok(id) => id,
                // Only a link whose interface is gone (ENOLINK) is dropped; anything else leaves the pinned
                // link (and whatever program it runs) where it is.
                Err(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(nix::errno::Errno::ENOLINK as i32) =>
                {
                    let _ = std::fs::remove_file(&existing);
                    continue;
                }
                Err(e) => return Err(attach_err(e.to_string())),
            };
            if existing != pin {
                let link = program.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                let link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                let _ = std::fs::remove_file(&pin);
                link.pin(&pin).map_err(|e| attach_err(e.to_string()))?;
            } else {
                // Pinned already: let go of this process's handle without detaching anything.
                let link = program.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                drop(FdLink::try_from(link));
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Remove the TCX pins of interfaces that are gone (not in `existing`, this namespace's interface
    /// indexes: their links are defunct, a pin holds nothing else). The pin of an interface that still exists
    /// stays, whoever owns it: removing it would detach the program, and with its entry gone it drops
    /// everything there (fail closed), as a clsact filter does.
    pub fn remove_defunct_tcx_pins(&mut self, existing: &std::collections::BTreeSet<u32>) {
        let dir = self.pin_dir.join("tcx");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let ifindex = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
            if let Some(ifindex) = ifindex.filter(|i| !existing.contains(i)) {
                let _ = std::fs::remove_file(entry.path());
                self.attached_here.remove(&ifindex);
            }
        }
    }

    /// Pin directories of other layout versions (older builds) under the root.
    fn older_versions(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('v')) && *p != self.pin_dir
            })
            .collect()
    }

    /// Once every endpoint's filter runs this build's program: remove what older builds pinned (their maps go
    /// when no program uses them), except the TCX links they pinned for interfaces that still exist (all,
    /// when `existing` is unknown) and that this process did not take over. Unpinning such a link would
    /// detach its program: an interface whose endpoint record was lost has its entry only in the older
    /// build's maps, and keeps that build's program.
    pub fn remove_older_versions(
        &self,
        existing: Option<&std::collections::BTreeSet<u32>>,
    ) -> Result<(), EnforcementError> {
        let failed = |path: &Path| {
            let operation = format!("remove {}", path.display());
            move |e: std::io::Error| EnforcementError::Map { operation, message: e.to_string() }
        };
        let kept = |ifindex: u32| {
            !self.attached_here.contains(&ifindex) && existing.is_none_or(|existing| existing.contains(&ifindex))
        };
        for dir in self.older_versions() {
            let links = dir.join("tcx");
            let held: Vec<PathBuf> = std::fs::read_dir(&links)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_str().and_then(|n| n.parse().ok()).is_some_and(kept))
                .map(|e| e.path())
                .collect();
            if held.is_empty() {
                std::fs::remove_dir_all(&dir).map_err(failed(&dir))?;
                continue;
            }
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path == links {
                    continue;
                }
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).map_err(failed(&path))?;
                } else {
                    std::fs::remove_file(&path).map_err(failed(&path))?;
                }
            }
            for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
                if !held.contains(&entry.path()) {
                    std::fs::remove_file(entry.path()).map_err(failed(&entry.path()))?;
                }
            }
        }
        Ok(())
    }

    /// Take the program off `ifname` (index `ifindex`) if this agent attached it: for a pod whose pool says
    /// `enforcement: Off`, found out only after the program was attached for it.
    pub fn detach(&mut self, ifname: &str, ifindex: u32) -> Result<(), EnforcementError> {
        if !self.attached_here.remove(&ifindex) {
            return Ok(());
        }
        let pin = Self::tcx_pin(&self.pin_dir, ifindex);
        if pin.exists() {
            // Unpinning destroys the link (nothing else holds it): that detaches the program.
            return std::fs::remove_file(&pin).map_err(|e| EnforcementError::Map {
                operation: format!("detach from {ifname} (remove {})", pin.display()),
                message: e.to_string(),
            });
        }
        let link = SchedClassifierLink::attached(ifname, TcAttachType::Ingress, FILTER_PRIORITY, FILTER_HANDLE, None)
            .map_err(|e| EnforcementError::Map {
            operation: format!("find the filter on {ifname}"),
            message: e.to_string(),
        })?;
        link.detach().map_err(|e| EnforcementError::Map {
            operation: format!("detach from {ifname} (clsact ingress)"),
            message: e.to_string(),
        })
    }

    /// Stop enforcing on an interface being removed: its entry goes (its filter goes with the interface;
    /// until then the program drops everything there: fail closed).
    pub fn release(&mut self, ifindex: u32) -> Result<(), EnforcementError> {
        self.attached_here.remove(&ifindex);
        self.remove_endpoint(ifindex)
    }

    /// The ring buffer of drop reports (once: whoever takes it reads it).
    pub fn take_drop_reports(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf.take_map("DROPS").and_then(|map| RingBuf::try_from(map).ok())
    }

    /// The interfaces with an entry in the maps (also those entered by an earlier run).
    pub fn entered(&self) -> Result<Vec<u32>, EnforcementError> {
        Ok(self.entered.iter().copied().collect())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map, EnforcementError> {
        self.ebpf.map_mut(name).ok_or_else(|| EnforcementError::Load(format!("map {name} missing")))
    }

    /// Enforce `spec` on the interface with index `ifindex`.
    pub fn set_endpoint(&mut self, ifindex: u32, spec: &EndpointSpec) -> Result<(), EnforcementError> {
        let mut entry = spec.entry();
        if self.count_passed {
            entry.flags |= COUNT_PASSED;
        }
        self.write_endpoint(ifindex, Some(entry))
    }

    /// Stop enforcing on an interface (its packets are then dropped: fail closed).
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), EnforcementError> {
        self.write_endpoint(ifindex, None)
    }

    fn write_endpoint(&mut self, ifindex: u32, entry: Option<Endpoint>) -> Result<(), EnforcementError> {
        self.write_entry(ifindex, entry)?;
        if entry.is_some() {
            self.entered.insert(ifindex);
        } else {
            self.entered.remove(&ifindex);
        }
        Ok(())
    }

    fn write_entry(&mut self, ifindex: u32, entry: Option<Endpoint>) -> Result<(), EnforcementError> {
        let operation = format!("write endpoint {ifindex}");
        if ifindex < ARRAY_ENDPOINTS {
            let mut array: Array<&mut MapData, Endpoint> =
                Array::try_from(self.map_mut("ENDPOINTS")?).map_err(map_error("open ENDPOINTS"))?;
            return array.set(ifindex, entry.unwrap_or_default(), 0).map_err(map_error(operation));
        }
        let mut high: HashMap<&mut MapData, u32, Endpoint> =
            HashMap::try_from(self.map_mut("ENDPOINTS_HIGH")?).map_err(map_error("open ENDPOINTS_HIGH"))?;
        match entry {
            Some(entry) => high.insert(ifindex, entry, 0).map_err(map_error(operation)),
            None => match high.remove(&ifindex) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_error(operation)(e)),
            },
        }
    }

    /// The counter slot of `pool` on this node: the one it has, or a new one whose counters start at zero.
    /// When every slot is taken, the slots of pools no endpoint entry uses any more are freed first; if none
    /// is, the pool counts under [`NO_POOL`] (slot 0).
    pub fn pool_slot(&mut self, pool: &str) -> Result<u32, EnforcementError> {
        if let Some((slot, _)) = self.names.iter().find(|(_, name)| *name == pool) {
            return Ok(*slot);
        }
        let free = |names: &std::collections::BTreeMap<u32, String>| (1..POOL_SLOTS).find(|s| !names.contains_key(s));
        let slot = match free(&self.names) {
            Some(slot) => slot,
            None => {
                let used: std::collections::BTreeSet<u32> =
                    read_entries(&self.pin_dir)?.into_iter().map(|(_, e)| e.pool_id).collect();
                let unused: Vec<u32> = self.names.keys().copied().filter(|s| !used.contains(s)).collect();
                for slot in unused {
                    self.write_name(slot, None)?;
                }
                match free(&self.names) {
                    Some(slot) => slot,
                    None => return Ok(0),
                }
            }
        };
        self.write_name(slot, Some(pool))?;
        Ok(slot)
    }

    /// Name `slot` (or free it), with its counters zeroed: a new pool never inherits another's packets.
    fn write_name(&mut self, slot: u32, pool: Option<&str>) -> Result<(), EnforcementError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| EnforcementError::Map {
            operation: "count the possible CPUs".into(),
            message: e.to_string(),
        })?;
        let mut counters: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map_mut("COUNTERS")?).map_err(map_error("open COUNTERS"))?;
        for why in 0..reason::COUNT {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                .map_err(|e| EnforcementError::Map { operation: "zero counters".into(), message: e.to_string() })?;
            counters
                .set(counter_index(slot, why), zeros, 0)
                .map_err(map_error(format!("zero the counters of slot {slot}")))?;
        }
        let mut value = [0u8; POOL_NAME_LEN];
        if let Some(pool) = pool {
            let bytes = &pool.as_bytes()[..pool.len().min(POOL_NAME_LEN - 1)];
            value[..bytes.len()].copy_from_slice(bytes);
        }
        let mut names: Array<&mut MapData, [u8; POOL_NAME_LEN]> =
            Array::try_from(self.map_mut("POOL_NAMES")?).map_err(map_error("open POOL_NAMES"))?;
        names.set(slot, value, 0).map_err(map_error(format!("name counter slot {slot}")))?;
        match pool {
            Some(pool) => self.names.insert(slot, pool.to_string()),
            None => self.names.remove(&slot),
        };
        Ok(())
    }

    /// The pool counting in `slot` ([`NO_POOL`] for none).
    pub fn pool_name(&self, slot: u32) -> &str {
        self.names.get(&slot).map_or(NO_POOL, String::as_str)
    }

    /// Every non-zero counter, summed over CPUs: (pool, reason, packets).
    pub fn counts(&self) -> Result<Vec<(String, u32, u64)>, EnforcementError> {
        let map = self.ebpf.map("COUNTERS").ok_or_else(|| EnforcementError::Load("map COUNTERS missing".into()))?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_error("open COUNTERS"))?;
        read_counters(&counters, &self.names)
    }

    /// Run `program` on `packet` (an Ethernet frame) `repeat` times in the kernel, as if it arrived on the
    /// loopback interface (ifindex 1); returns the verdict and the kernel's average time per run.
    pub fn run(&self, program: &str, packet: &[u8], repeat: u32) -> Result<(u32, Duration), EnforcementError> {
        self.run_on(1, program, packet, repeat)
    }

    /// [`Enforcement::run`], with the packet recorded as arriving on interface `ifindex` (the skb's
    /// `ingress_ifindex`, which the program looks its endpoint up by; the device is still the loopback).
    pub fn run_on(
        &self,
        ifindex: u32,
        program: &str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), EnforcementError> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or_else(|| EnforcementError::Load(format!("program {program} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| EnforcementError::Load(e.to_string()))?;
        // The context: the start of a `struct __sk_buff` up to `ingress_ifindex` (its tenth field); the kernel
        // sets the rest.
        let mut context = [0u8; 40];
        context[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        let options =
            TestRunOptions { data_in: Some(packet), ctx_in: Some(&context), repeat, ..TestRunOptions::default() };
        let result = program
            .test_run(options)
            .map_err(|e| EnforcementError::Map { operation: "BPF_PROG_TEST_RUN".into(), message: e.to_string() })?;
        Ok((result.return_value, result.duration))
    }
}

/// The enforcing program of a loaded object.
/// The program this agent attaches: [`ENFORCE_COUNTING`] when it counts passed packets, else [`ENFORCE`].
fn enforce_program(ebpf: &mut Ebpf, count_passed: bool) -> Result<&mut SchedClassifier, EnforcementError> {
    let name = if count_passed { ENFORCE_COUNTING } else { ENFORCE };
    ebpf.program_mut(name)
        .ok_or_else(|| EnforcementError::Load(format!("program {name} missing")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| EnforcementError::Load(e.to_string()))
}

/// The name of the interface with `index` in this network namespace, if there is one (nix's
/// `if_indextoname` answers an empty name for a missing index).
pub fn interface_name(index: u32) -> Option<String> {
    nix::net::if_::if_indextoname(index).ok().and_then(|name| name.into_string().ok()).filter(|name| !name.is_empty())
}

/// What the pinned maps say, read without loading anything (works while the agent is down).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedState {
    /// Interfaces with an entry (enforced).
    pub attached: Vec<u32>,
    /// Endpoint entries: (ifindex, entry).
    pub endpoints: Vec<(u32, Endpoint)>,
    /// Counter slot -> pool name.
    pub pool_names: std::collections::BTreeMap<u32, String>,
    /// Non-zero counters: (pool, reason, packets).
    pub counters: Vec<(String, u32, u64)>,
    /// UDP ports pods may not send to (decapsulating devices listen there).
    pub decap_ports: Vec<u16>,
}

fn open_pinned(pin_dir: &Path, name: &str) -> Result<aya::maps::Map, EnforcementError> {
    aya::maps::MapData::from_pin(pin_dir.join(name))
        .and_then(aya::maps::Map::from_map_data)
        .map_err(map_error(format!("open pinned map {}", pin_dir.join(name).display())))
}

/// The non-zero counters in a COUNTERS map, summed over CPUs, of "no pool" and the named slots.
fn read_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
    names: &std::collections::BTreeMap<u32, String>,
) -> Result<Vec<(String, u32, u64)>, EnforcementError> {
    let mut out = Vec::new();
    let slots = std::iter::once((0, NO_POOL)).chain(names.iter().map(|(slot, name)| (*slot, name.as_str())));
    for (slot, pool) in slots {
        for why in 0..reason::COUNT {
            let total: u64 =
                counters.get(&counter_index(slot, why), 0).map_err(map_error("read COUNTERS"))?.iter().sum();
            if total > 0 {
                out.push((pool.to_string(), why, total));
            }
        }
    }
    Ok(out)
}

/// The named counter slots pinned in `pin_dir`.
fn read_names(pin_dir: &Path) -> Result<std::collections::BTreeMap<u32, String>, EnforcementError> {
    let names: Array<MapData, [u8; POOL_NAME_LEN]> =
        Array::try_from(open_pinned(pin_dir, "POOL_NAMES")?).map_err(map_error("POOL_NAMES"))?;
    let mut out = std::collections::BTreeMap::new();
    for (slot, value) in names.iter().enumerate() {
        let value = value.map_err(map_error("read POOL_NAMES"))?;
        let length = value.iter().position(|b| *b == 0).unwrap_or(value.len());
        if length > 0 {
            out.insert(u32::try_from(slot).unwrap_or(0), String::from_utf8_lossy(&value[..length]).into_owned());
        }
    }
    Ok(out)
}

/// Every endpoint entry pinned in `pin_dir`: (ifindex, entry).
fn read_entries(pin_dir: &Path) -> Result<Vec<(u32, Endpoint)>, EnforcementError> {
    let mut out = Vec::new();
    let endpoints: Array<MapData, Endpoint> =
        Array::try_from(open_pinned(pin_dir, "ENDPOINTS")?).map_err(map_error("ENDPOINTS"))?;
    for (index, entry) in endpoints.iter().enumerate() {
        let entry = entry.map_err(map_error("read ENDPOINTS"))?;
        if entry.flags & PRESENT != 0 {
            out.push((u32::try_from(index).unwrap_or(u32::MAX), entry));
        }
    }
    let high: HashMap<MapData, u32, Endpoint> =
        HashMap::try_from(open_pinned(pin_dir, "ENDPOINTS_HIGH")?).map_err(map_error("ENDPOINTS_HIGH"))?;
    for item in high.iter() {
        out.push(item.map_err(map_error("read ENDPOINTS_HIGH"))?);
    }
    Ok(out)
}

/// The entry of interface `ifindex` pinned in `pin_dir`, if it has one.
fn read_entry(pin_dir: &Path, ifindex: u32) -> Result<Option<Endpoint>, EnforcementError> {
    let entry = if ifindex < ARRAY_ENDPOINTS {
        let endpoints: Array<MapData, Endpoint> =
            Array::try_from(open_pinned(pin_dir, "ENDPOINTS")?).map_err(map_error("ENDPOINTS"))?;
        Some(endpoints.get(&ifindex, 0).map_err(map_error("read ENDPOINTS"))?)
    } else {
        let high: HashMap<MapData, u32, Endpoint> =
            HashMap::try_from(open_pinned(pin_dir, "ENDPOINTS_HIGH")?).map_err(map_error("ENDPOINTS_HIGH"))?;
        match high.get(&ifindex, 0) {
            Ok(entry) => Some(entry),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => return Err(map_error("read ENDPOINTS_HIGH")(e)),
        }
    };
    Ok(entry.filter(|e| e.flags & PRESENT != 0))
}

/// Read the state this build pinned under `root`.
pub fn read_pinned(root: &Path) -> Result<PinnedState, EnforcementError> {
    let pin_dir = &versioned(root);
    let endpoints = read_entries(pin_dir)?;
    let mut state =
        PinnedState { attached: endpoints.iter().map(|(i, _)| *i).collect(), endpoints, ..PinnedState::default() };
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_pinned(pin_dir, "COUNTERS")?).map_err(map_error("COUNTERS"))?;
    state.pool_names = read_names(pin_dir)?;
    state.counters = read_counters(&counters, &state.pool_names)?;
    state.decap_ports = read_decap_ports(pin_dir)?;
    Ok(state)
}

/// The UDP ports blocked in the record pinned in `pin_dir`.
fn read_decap_ports(pin_dir: &Path) -> Result<Vec<u16>, EnforcementError> {
    let ports: Array<MapData, u8> =
        Array::try_from(open_pinned(pin_dir, "DECAP_PORTS")?).map_err(map_error("DECAP_PORTS"))?;
    let mut out = Vec::new();
    for (port, blocked) in ports.iter().enumerate() {
        if blocked.map_err(map_error("read DECAP_PORTS"))? != 0 {
            out.push(u16::try_from(port).unwrap_or(u16::MAX));
        }
    }
    Ok(out)
}

/// Decode one drop report.
pub fn decode_drop(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let mut source = [0u8; 16];
    source.copy_from_slice(&bytes[16..32]);
    Some(DropEvent { ifindex: word(0), reason: word(4), pool_id: word(8), family: word(12), source })
}

/// A drop report's source address, if it has one.
pub fn drop_source(event: &DropEvent) -> Option<IpAddr> {
    match event.family {
        4 => Some(IpAddr::from([event.source[0], event.source[1], event.source[2], event.source[3]])),
        6 => Some(IpAddr::from(event.source)),
        _ => None,
    }
}

/// Frames for tests and benchmarks: Ethernet frames with valid IPv4 header checksums (what a real receiver
/// checks before anything else), so they can be sent on a real link as well as run with `BPF_PROG_TEST_RUN`.
pub mod frames {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The MACs of the frames below (destination, source), unless a caller builds its own header.
    pub const MACS: ([u8; 6], [u8; 6]) = ([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);

    /// An Ethernet frame.
    pub fn ethernet(destination: [u8; 6], source: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = destination.to_vec();
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 =
            bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 packet (no Ethernet header): `options` (a multiple of 4 bytes), `fragment` the flags and
    /// offset field (0x2000 = more fragments; the low 13 bits the offset in 8-byte units).
    pub fn ipv4_packet(
        source: Ipv4Addr,
        destination: Ipv4Addr,
        protocol: u8,
        options: &[u8],
        fragment: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let header_length = 20 + options.len();
        let total = u16::try_from(header_length + payload.len()).unwrap_or(u16::MAX);
        let mut packet = vec![0x40 | (header_length / 4) as u8, 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0x12, 0x34]);
        packet.extend_from_slice(&fragment.to_be_bytes());
        packet.extend_from_slice(&[64, protocol, 0, 0]);
        packet.extend_from_slice(&source.octets());
        packet.extend_from_slice(&destination.octets());
        packet.extend_from_slice(options);
        let sum = checksum(&packet);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        packet.extend_from_slice(payload);
        packet
    }

    /// An IPv6 packet (no Ethernet header) whose payload starts with `next_header`'s header.
    pub fn ipv6_packet(source: Ipv6Addr, destination: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&u16::try_from(payload.len()).unwrap_or(u16::MAX).to_be_bytes());
        packet.extend_from_slice(&[next_header, 255]);
        packet.extend_from_slice(&source.octets());
        packet.extend_from_slice(&destination.octets());
        packet.extend_from_slice(payload);
        packet
    }

    /// A UDP datagram (checksum 0: none, which IPv4 allows).
    pub fn udp(source_port: u16, destination_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut datagram = source_port.to_be_bytes().to_vec();
        datagram.extend_from_slice(&destination_port.to_be_bytes());
        datagram.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap_or(u16::MAX).to_be_bytes());
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend_from_slice(payload);
        datagram
    }

    /// A VXLAN (or, with its port, VXLAN-GPE-less GENEVE-like) header with `vni`, then the inner frame.
    pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
        let mut payload = vec![0x08, 0, 0, 0];
        payload.extend_from_slice(&(vni << 8).to_be_bytes());
        payload.extend_from_slice(inner);
        payload
    }

    /// A GENEVE header (no options) carrying an Ethernet frame with `vni`.
    pub fn geneve(vni: u32, inner: &[u8]) -> Vec<u8> {
        let mut payload = vec![0, 0, 0x65, 0x58];
        payload.extend_from_slice(&(vni << 8).to_be_bytes());
        payload.extend_from_slice(inner);
        payload
    }

    /// A GRE header (no key, no checksum) carrying `protocol` (0x0800 IPv4, 0x6558 Ethernet for GRETAP).
    pub fn gre(protocol: u16, inner: &[u8]) -> Vec<u8> {
        let mut payload = vec![0, 0];
        payload.extend_from_slice(&protocol.to_be_bytes());
        payload.extend_from_slice(inner);
        payload
    }

    /// An ICMPv6 message (checksum left 0; the program does not check it).
    pub fn icmpv6(icmp_type: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![icmp_type, 0, 0, 0];
        message.extend_from_slice(body);
        message
    }

    /// A neighbour advertisement body for `target` (flags: solicited, override).
    pub fn neighbour_advertisement(target: Ipv6Addr) -> Vec<u8> {
        let mut message = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        message.extend_from_slice(&target.octets());
        message
    }

    /// An IPv4 UDP packet from `source`.
    pub fn ipv4(source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
        let packet = ipv4_packet(source, destination, 17, &[], 0, &udp(12345, 53, &[]));
        ethernet(MACS.0, MACS.1, 0x0800, &packet)
    }

    /// An IPv6 packet from `source` with `next_header` and, for ICMPv6, `icmp_type` as its first byte.
    pub fn ipv6(source: Ipv6Addr, destination: Ipv6Addr, next_header: u8, icmp_type: u8) -> Vec<u8> {
        let packet = ipv6_packet(source, destination, next_header, &[icmp_type, 0, 0, 0, 0, 0, 0, 0]);
        ethernet(MACS.0, MACS.1, 0x86dd, &packet)
    }

    /// An ARP request whose sender protocol address is `sender`.
    pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut body = vec![0, 1, 0x08, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 2];
        body.extend_from_slice(&sender.octets());
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&target.octets());
        ethernet(MACS.0, MACS.1, 0x0806, &body)
    }

    /// A frame with an 802.1Q (`tpid` 0x8100) or 802.1ad (0x88a8) tag of `vid` inserted after the MACs.
    pub fn tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(&tpid.to_be_bytes());
        tagged.extend_from_slice(&vid.to_be_bytes());
        tagged.extend_from_slice(&frame[12..]);
        tagged
    }

    /// An 802.1Q-tagged IPv4 packet.
    pub fn vlan(source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
        tagged(&ipv4(source, destination), 0x8100, 42)
    }
}
