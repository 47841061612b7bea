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

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest.parent().context("the agent's manifest has no parent directory")?.to_path_buf();
    let pin = root.join("ebpf/rust-toolchain.toml");
    let ebpf = root.join("ebpf");
    println!("cargo:rerun-if-changed={}", pin.display());
    println!("cargo:rerun-if-changed={}", ebpf.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let channel = channel(&pin)?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("ebpf"),
        None => root.join("target/ebpf"),
    };
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", &channel, "cargo", "build", "--package", PACKAGE, "--bins", "--release"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root)
        // The same flags every time, whatever the agent's build has: the shared build stays fresh.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR");
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
