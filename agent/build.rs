//! Builds the eBPF enforcement program (nightly, rust-src, bpf-linker: `cargo xtask setup` installs them) and
//! leaves it in OUT_DIR for the agent to embed.

fn main() -> anyhow::Result<()> {
    let package = aya_build::Package { name: "poolwarden-ebpf", root_dir: "../ebpf", ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("nightly"))
}
