//! `cargo xtask setup|test|demo|bench|fuzz`: everything a new machine needs to build, test, show and measure
//! poolwarden, in Rust, so that nothing depends on a step done by hand.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

mod bench;
mod cluster;
mod cluster_bench;
mod demo;
mod images;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, test, demo and benchmark poolwarden")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; prints what it installs).
    Setup,
    /// Install what is missing, check formatting and lints, and run every test.
    Test,
    /// Run the seed's example on this machine with the embedded datastore.
    Demo {
        /// Keep the datastore (and print where it is) instead of removing it; with --kubernetes, the cluster.
        #[arg(long)]
        keep: bool,
        /// Run the seed's example on a real Kubernetes (cargo xtask cluster) with kubectl, as its text does.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Run the benchmarks and print figures with their peer measured in the same run.
    Bench {
        /// Only this part: `cni` (plugin ADD/DEL against bridge + host-local, agent memory), `enforcement`
        /// (per-packet cost against an empty program), `allocator`, `routes` (10,000 remote blocks against
        /// `ip -batch`), `cluster` (1,000 pods on 10 nodes on etcd against bridge + host-local),
        /// `cost` (per-node reads against cluster size), `datastore` (ADD/DEL latency and requests on etcd with
        /// today's allocator, and with the single-object one on etcd and, with a cluster up, the API server) or
        /// `kubernetes` (a 100-replica deployment on the real cluster against bridge + host-local); and, only
        /// when asked for, `at-rest` (Kubernetes API requests per node per minute at rest with 1, 2 and 1,000
        /// nodes, on a cluster already up).
        #[arg(long)]
        only: Option<String>,
    },
    /// Fuzz the YAML documents, the selector parser, the network configuration and the agent's request
    /// decoder with cargo-fuzz (nightly); `test` runs the last two briefly.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// A real Kubernetes on this machine (built from k8s/go.mod), its nodes in network namespaces.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Build what is missing, then start the control plane and the nodes; prints the kubeconfig's path.
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 1)]
        nodes: u8,
        /// Which build of poolwarden the image carries.
        #[arg(long, value_enum, default_value_t = cluster::Build::Release)]
        build: cluster::Build,
    },
    /// Stop everything `up` started and remove its namespaces, mounts and files.
    Down,
    /// What runs, and the nodes as the API server sees them.
    Status,
    /// Only build the Kubernetes binaries.
    Build,
    /// Install poolwarden on the running cluster with kubectl apply -k (deploy/ with the image changed).
    Install {
        /// Which build of poolwarden the image carries.
        #[arg(long, value_enum, default_value_t = cluster::Build::Release)]
        build: cluster::Build,
    },
}

/// Debian packages the build and the tests use.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    // (command or file that proves it is installed, package)
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("arping", "iputils-arping"),
    ("curl", "curl"),
    ("iptables", "iptables"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("/bin/busybox", "busybox-static"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    // etcd-client's build compiles etcd's protobuf definitions.
    ("protoc", "protobuf-compiler"),
    ("/usr/include/google/protobuf/descriptor.proto", "libprotobuf-dev"),
    // The etcd TLS test makes its certificates with it.
    ("openssl", "openssl"),
    // natOutgoing's masquerade table, and loading the firewall export in the tests.
    ("nft", "nftables"),
    ("ipset", "ipset"),
    // The test cluster's container runtime (cargo xtask cluster), and what kube-proxy needs.
    ("containerd", "containerd"),
    ("conntrack", "conntrack"),
    // The test cluster's image carries the debug build without its debug information.
    ("objcopy", "binutils"),
];

/// PyPI packages the tests use: (module that proves it is installed, requirement).
const PYPI_PACKAGES: &[(&str, &str)] = &[
    // Validates deploy/ against the Kubernetes 1.30 and 1.37 schemas it carries (offline).
    ("kubernetes_validate", "kubernetes-validate==1.37.0"),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match cli.command {
        Task::Setup => setup(),
        Task::Test => test(),
        Task::Demo { keep, kubernetes } => {
            setup()?;
            if kubernetes { cluster::demo(&root, keep) } else { demo::run(&root, keep) }
        }
        Task::Bench { only } => bench(&root, only.as_deref()),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Cluster { command } => match command {
            ClusterCommand::Up { nodes, build } => cluster::up(&root, nodes, build).map(|_| ()),
            ClusterCommand::Down => cluster::down(&root),
            ClusterCommand::Status => cluster::status(&root),
            ClusterCommand::Build => cluster::build(&root).map(|_| ()),
            ClusterCommand::Install { build } => cluster::install(&root, build),
        },
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Build the CNI plugin as it ships: statically linked. The runtime execs it on the node itself, from
/// `/opt/cni/bin`, where the image's C library is not; and a static binary starts without the dynamic loader
/// (about 0.3 ms of every ADD and DEL here). `--target` keeps `crt-static` off build scripts and proc-macros,
/// which cannot be static. Returns the binary's path; fails if what was built is dynamic after all.
pub fn build_plugin(root: &Path, release: bool) -> Result<PathBuf> {
    let rustc = Command::new("rustc").arg("-vV").output().context("run rustc -vV")?;
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")?;
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if host.ends_with("-gnu") {
        rustflags.push_str(" -C target-feature=+crt-static");
    }
    let mut args = vec!["build", "-p", "poolwarden-cni", "--bin", "poolwarden-cni", "--target", &host];
    if release {
        args.push("--release");
    }
    run_with_env("cargo", &args, &[("RUSTFLAGS", rustflags.trim())])?;
    let plugin = root.join("target").join(&host).join(if release { "release" } else { "debug" }).join("poolwarden-cni");
    if elf_interpreter(&std::fs::read(&plugin).with_context(|| format!("read {}", plugin.display()))?) {
        bail!("{} was linked dynamically; the plugin must be static", plugin.display());
    }
    Ok(plugin)
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (is dynamically linked).
fn elf_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let word =
        |at: usize, n: usize| elf.get(at..at + n).map(|b| b.iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x)));
    if !elf.starts_with(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (word(0x20, 8), word(0x36, 2), word(0x38, 2)) else {
        return false;
    };
    (0..phnum).any(|i| word((phoff + i * phentsize) as usize, 4) == Some(u64::from(PT_INTERP)))
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    run_with_env(program, args, &[])
}

fn run_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_command(name: &str) -> bool {
    if name.starts_with('/') {
        return Path::new(name).exists();
    }
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(name).is_file())
}

fn setup() -> Result<()> {
    let missing: Vec<&str> =
        DEBIAN_PACKAGES.iter().filter(|(command, _)| !have_command(command)).map(|&(_, package)| package).collect();
    if missing.is_empty() {
        eprintln!(
            "setup: Debian packages present: {}",
            DEBIAN_PACKAGES.iter().map(|p| p.1).collect::<Vec<_>>().join(" ")
        );
    } else {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        run("apt-get", &["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        run("apt-get", &args)?;
    }
    for component in ["rustfmt", "clippy"] {
        let installed = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(component)))
            .unwrap_or(false);
        if installed {
            eprintln!("setup: rust component {component} present");
        } else {
            eprintln!("setup: installing rust component {component}");
            run("rustup", &["component", "add", component])?;
        }
    }
    for (module, requirement) in PYPI_PACKAGES {
        if succeeds("python3", &["-c", &format!("import {module}")]) {
            eprintln!("setup: {requirement} present");
        } else {
            eprintln!("setup: installing {requirement} from PyPI");
            run("python3", &["-m", "pip", "install", "-q", "--root-user-action=ignore", requirement])?;
        }
    }
    setup_ebpf_toolchain()?;
    Ok(())
}

/// The dated nightly the eBPF program builds with (`ebpf/rust-toolchain.toml`; agent/build.rs reads the same file).
fn ebpf_toolchain() -> Result<String> {
    toolchain_channel(include_str!("../../ebpf/rust-toolchain.toml"))
        .context("ebpf/rust-toolchain.toml names no channel = \"nightly-YYYY-MM-DD\"")
}

/// The `channel = "..."` of a rust-toolchain.toml.
fn toolchain_channel(toml: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let value = line.trim().strip_prefix("channel")?.trim_start().strip_prefix('=')?.trim();
        Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
    })
}

/// Installs a toolchain (minimal profile) and the given components with rustup when they are missing.
fn ensure_toolchain(toolchain: &str, components: &[&str]) -> Result<()> {
    if succeeds("rustup", &["run", toolchain, "rustc", "--version"]) {
        eprintln!("setup: toolchain {toolchain} present");
    } else {
        eprintln!("setup: installing toolchain {toolchain}");
        run("rustup", &["toolchain", "install", toolchain, "--profile", "minimal"])?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for component in components {
        if installed.lines().any(|l| l.starts_with(component)) {
            eprintln!("setup: {toolchain} {component} present");
        } else {
            eprintln!("setup: installing {toolchain} {component}");
            run("rustup", &["component", "add", component, "--toolchain", toolchain])?;
        }
    }
    Ok(())
}

/// What building the eBPF program needs: the pinned nightly with rust-src, and bpf-linker linked against that
/// nightly's own LLVM (through a prefix directory of symlinks that must outlive the install: bpf-linker keeps an
/// rpath to it). A bpf-linker linked against another toolchain's LLVM is rebuilt.
fn setup_ebpf_toolchain() -> Result<()> {
    let nightly = ebpf_toolchain()?;
    ensure_toolchain(&nightly, &["rust-src"])?;
    let sysroot = Command::new("rustup").args(["run", &nightly, "rustc", "--print", "sysroot"]).output()?;
    let lib = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm.trim_start_matches("libLLVM.so.").split('.').next().unwrap_or_default().to_string();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".local/share/poolwarden/llvm");
    // The prefix records which toolchain's LLVM bpf-linker was built against.
    let built_for = prefix.join("toolchain");
    let current = std::fs::read_to_string(&built_for).is_ok_and(|t| t.trim() == nightly);
    if current && succeeds("bpf-linker", &["--version"]) {
        eprintln!("setup: bpf-linker present (built against {nightly}'s LLVM)");
        return Ok(());
    }
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
    }
    eprintln!("setup: installing bpf-linker 0.13.0 against {nightly}'s LLVM {major} ({})", prefix.display());
    run_with_env(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--force",
            "--version",
            "0.13.0",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ],
        &[("LLVM_PREFIX", &prefix.display().to_string())],
    )?;
    if !succeeds("bpf-linker", &["--version"]) {
        bail!("bpf-linker was installed but `bpf-linker --version` fails (is ~/.cargo/bin on PATH?)");
    }
    std::fs::write(&built_for, format!("{nightly}\n"))?;
    Ok(())
}

fn test() -> Result<()> {
    setup()?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    // The eBPF crate builds only for the BPF target (agent/build.rs does that); everything else for the host.
    run("cargo", &["clippy", "--workspace", "--exclude", "poolwarden-ebpf", "--all-targets", "--", "-D", "warnings"])?;
    // The privileged tests exec the workspace's binaries, and must not skip themselves in CI.
    run("cargo", &["build", "--workspace", "--exclude", "poolwarden-ebpf", "--bins"])?;
    // The tests run the plugin as it ships.
    let plugin = build_plugin(&workspace_root(), false)?;
    run_with_env(
        "cargo",
        &["test", "--workspace", "--exclude", "poolwarden-ebpf", "--all-targets"],
        &[("POOLWARDEN_REQUIRE_PRIVILEGED", "1"), ("POOLWARDEN_CNI_PLUGIN", &plugin.to_string_lossy())],
    )?;
    run("cargo", &["test", "--workspace", "--exclude", "poolwarden-ebpf", "--doc"])?;
    fuzz_targets(TEST_FUZZ_TARGETS, TEST_FUZZ_SECONDS)?;
    cluster_tests(&workspace_root())
}

/// The tests that need a real Kubernetes: bring the cluster up (building Kubernetes the first time), install
/// poolwarden on it, run them, and take it down whatever happened.
fn cluster_tests(root: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let outcome = (|| {
        // The debug build the workspace's tests have just made (an optimised one would compile everything again).
        cluster::up(root, 2, cluster::Build::Debug)?;
        cluster::install(root, cluster::Build::Debug)?;
        let dir = cluster::state_dir(root);
        run_with_env(
            "cargo",
            // One at a time: one restarts every agent, another starts 200 pods.
            &["test", "-p", "poolwarden-tests", "--test", "k8s_cluster", "--", "--test-threads=1"],
            &[("POOLWARDEN_CLUSTER", &dir.to_string_lossy()), ("POOLWARDEN_REQUIRE_CLUSTER", "1")],
        )
    })();
    if outcome.is_err() {
        agent_logs(root);
    }
    let down = cluster::down(root);
    eprintln!("cluster tests: {:.0?} (build, up, install, tests, down)", started.elapsed());
    outcome.and(down)
}

/// What the agents said last (warnings and errors of the whole run, then the last lines), so a failed cluster test
/// can be explained from the CI output after the cluster is gone.
fn agent_logs(root: &Path) {
    let pods = cluster::kubectl_output(
        root,
        &["-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=poolwarden", "-o", "name"],
    );
    for pod in pods.unwrap_or_default().lines() {
        let Ok(log) = cluster::kubectl_output(root, &["-n", "kube-system", "logs", pod, "--tail=-1"]) else {
            continue;
        };
        let lines: Vec<&str> = log.lines().collect();
        let warnings: Vec<&str> = lines.iter().copied().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        eprintln!("== {pod}: {} lines; its last 40 warnings and errors:", lines.len());
        for line in &warnings[warnings.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
        eprintln!("== {pod}: its last 40 lines:");
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
}

fn bench(root: &Path, only: Option<&str>) -> Result<()> {
    setup()?;
    if only.is_none_or(|o| o == "cni") {
        bench::run(root)?;
    }
    if only.is_none_or(|o| o == "enforcement") {
        run("cargo", &["bench", "-p", "poolwarden", "--bench", "enforcement"])?;
    }
    if only.is_none_or(|o| o == "allocator") {
        run("cargo", &["bench", "-p", "poolwarden", "--bench", "allocator"])?;
    }
    if only.is_none_or(|o| o == "routes") {
        run("cargo", &["bench", "-p", "poolwarden", "--bench", "routes"])?;
    }
    if only.is_none_or(|o| o == "cluster") {
        // The cluster bench runs the release binaries next to it.
        run("cargo", &["build", "--release", "-p", "poolwarden", "-p", "poolwarden-cni", "--bins"])?;
        run("cargo", &["bench", "-p", "poolwarden-tests", "--bench", "cluster"])?;
    }
    if only.is_none_or(|o| o == "cost") {
        // What one node's periodic actions read from etcd with 10, 100 and 1,000 nodes (issue 14).
        run("cargo", &["bench", "-p", "poolwarden-tests", "--bench", "cost"])?;
    }
    if only.is_none_or(|o| o == "datastore") {
        // With a cluster up (cargo xtask cluster up), its API server is measured too.
        run("cargo", &["bench", "-p", "poolwarden-tests", "--bench", "datastore"])?;
    }
    if only.is_none_or(|o| o == "kubernetes") {
        cluster_bench::run(root)?;
    }
    if only == Some("at-rest") {
        // Needs a cluster up (cargo xtask cluster up --nodes 2 && cargo xtask cluster install). It counts
        // requests, not time: the tests' build does (an optimised one would compile everything again).
        run("cargo", &["test", "-p", "poolwarden-tests", "--bench", "at_rest", "--", "--bench"])?;
    }
    Ok(())
}

/// (fuzz directory, target)
const FUZZ_TARGETS: &[(&str, &str)] =
    &[("agent/fuzz", "documents"), ("agent/fuzz", "selector"), ("cni/fuzz", "netconf"), ("protocol/fuzz", "request")];

/// What a hostile runtime or socket client controls: fuzzed on every `cargo xtask test`, briefly.
const TEST_FUZZ_TARGETS: &[(&str, &str)] = &[("cni/fuzz", "netconf"), ("protocol/fuzz", "request")];

/// Seconds each of [`TEST_FUZZ_TARGETS`] runs in `cargo xtask test`.
const TEST_FUZZ_SECONDS: u64 = 20;

fn fuzz(seconds: u64) -> Result<()> {
    setup()?;
    fuzz_targets(FUZZ_TARGETS, seconds)
}

fn fuzz_targets(targets: &[(&str, &str)], seconds: u64) -> Result<()> {
    let nightly = ebpf_toolchain()?;
    if !succeeds("cargo", &["fuzz", "--version"]) {
        eprintln!("setup: installing cargo-fuzz");
        run("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    let max_time = format!("-max_total_time={seconds}");
    for (fuzz_dir, target) in targets {
        // New inputs go to corpus/ (ignored by git); the committed seeds/ start each run.
        let corpus = format!("{fuzz_dir}/corpus/{target}");
        let seeds = format!("{fuzz_dir}/seeds/{target}");
        std::fs::create_dir_all(&corpus)?;
        run(
            "cargo",
            &[&format!("+{nightly}"), "fuzz", "run", "--fuzz-dir", fuzz_dir, target, &corpus, &seeds, "--", &max_time],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{elf_interpreter, toolchain_channel};

    #[test]
    fn the_ebpf_toolchain_is_a_dated_nightly() {
        let channel = super::ebpf_toolchain().expect("ebpf/rust-toolchain.toml names a channel");
        let date = channel.strip_prefix("nightly-").expect("a nightly");
        assert!(date.len() == 10 && date.chars().filter(|c| *c == '-').count() == 2, "{channel} is not dated");
        assert_eq!(
            toolchain_channel("[toolchain]\nchannel= \"nightly-2026-01-02\"\n").as_deref(),
            Some("nightly-2026-01-02")
        );
        assert_eq!(toolchain_channel("channels = 1\n"), None);
    }

    /// A 64-bit little-endian ELF header with one program header of type `p_type` right after it.
    fn elf_with_segment(p_type: u32) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf[0x40..0x44].copy_from_slice(&p_type.to_le_bytes());
        elf
    }

    #[test]
    fn a_dynamic_executable_asks_for_an_interpreter() {
        // /bin/sh on Debian is dynamically linked; a truncated or foreign file is not an ELF that asks.
        let sh = std::fs::read("/bin/sh").expect("read /bin/sh");
        assert!(elf_interpreter(&sh));
        assert!(!elf_interpreter(&sh[..0x30]));
        assert!(!elf_interpreter(b"#!/bin/sh\necho not an ELF file at all, but long enough to be read as one\n"));
        // What tells them apart is the PT_INTERP segment (3), not a PT_LOAD (1) alone.
        assert!(elf_interpreter(&elf_with_segment(3)));
        assert!(!elf_interpreter(&elf_with_segment(1)));
    }
}
