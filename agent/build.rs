//! Builds the eBPF enforcement program with the nightly pinned in `ebpf/rust-toolchain.toml` (with rust-src and
//! bpf-linker: `cargo xtask setup` installs them) and leaves it in OUT_DIR for the agent to embed.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let pin = "../ebpf/rust-toolchain.toml";
    println!("cargo:rerun-if-changed={pin}");
    let toml = std::fs::read_to_string(pin).with_context(|| format!("read {pin}"))?;
    let channel = toml
        .lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim_start().strip_prefix('=')?.trim();
            value.strip_prefix('"')?.strip_suffix('"')
        })
        .with_context(|| format!("{pin} names no channel = \"nightly-YYYY-MM-DD\""))?;
    let package = aya_build::Package { name: "poolwarden-ebpf", root_dir: "../ebpf", ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(channel))
}
