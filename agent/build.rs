//! Builds the eBPF enforcement program with the nightly pinned in `ebpf/rust-toolchain.toml` (with rust-src and
//! bpf-linker: `cargo xtask setup` installs them) and leaves it in OUT_DIR for the agent to embed.
//!
//! The program is built in one target directory shared by every profile and feature set of the agent
//! (`target/ebpf`), so only the first of `cargo clippy`, `build`, `test`, `test --doc` and `build --release`
//! compiles it; the others find it fresh. (aya-build's `build_ebpf` keeps a target directory per OUT_DIR, which
//! compiled it once per profile and feature set: about a minute each on two cores.)

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const PACKAGE: &str = "poolwarden-ebpf";

/// Variables of the outer build that must not reach the program's: its profile's overrides, target and
/// flags, and the build script's own. The registry's and network's settings (CARGO_HOME, CARGO_HTTP_*, ...)
/// and the jobserver (CARGO_MAKEFLAGS) do reach it.
const OUTER_PREFIXES: &[&str] =
    &["CARGO_PROFILE_", "CARGO_BUILD_", "CARGO_TARGET_", "CARGO_CFG_", "CARGO_PKG_", "CARGO_FEATURE_", "DEP_"];
const OUTER: &[&str] = &[
    "CARGO",
    "CARGO_INCREMENTAL",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "NUM_JOBS",
    "OPT_LEVEL",
    "DEBUG",
    "PROFILE",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_LINKER",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
];

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest.parent().context("the agent's manifest has no parent directory")?.to_path_buf();
    let pin = root.join("ebpf/rust-toolchain.toml");
    // The program's sources, its toolchain, and what else decides its build: its profile and its
    // dependencies' versions (the workspace's manifest and lock file).
    for input in [pin.clone(), root.join("ebpf"), root.join("Cargo.toml"), root.join("Cargo.lock")] {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let channel = channel(&pin)?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // Beside the profiles' directories of the target directory OUT_DIR is in (cargo marks its root with
    // CACHEDIR.TAG), wherever CARGO_TARGET_DIR or --target-dir put it.
    let target_dir = out
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| root.join("target"), Path::to_path_buf)
        .join("ebpf");
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", &channel, "cargo", "build", "--package", PACKAGE, "--bins", "--release"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if OUTER_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) || OUTER.contains(&name.as_ref()) {
            cargo.env_remove(name.as_ref());
        }
    }
    // The same flags every time, whatever the agent's build has: the shared build stays fresh.
    cargo.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    );
    let output = cargo.output().with_context(|| format!("run {cargo:?} (is rustup on PATH?)"))?;
    if !output.status.success() {
        bail!(
            "building the eBPF program failed ({}); `cargo xtask setup` installs {channel}, rust-src and \
             bpf-linker:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join(target).join("release").join(PACKAGE);
    std::fs::copy(&built, out.join(PACKAGE))
        .with_context(|| format!("copy {} into {}", built.display(), out.display()))?;
    Ok(())
}

/// The `channel = "nightly-YYYY-MM-DD"` of the pin.
fn channel(pin: &Path) -> anyhow::Result<String> {
    let toml = std::fs::read_to_string(pin).with_context(|| format!("read {}", pin.display()))?;
    toml.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim_start().strip_prefix('=')?.trim();
            Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
        })
        .with_context(|| format!("{} names no channel = \"nightly-YYYY-MM-DD\"", pin.display()))
}
