//! Builds the eBPF programs (`ebpf/`) for bpfel with the nightly toolchain and bpf-linker, into OUT_DIR, where
//! `include_bytes_aligned!` picks them up. `scripts/setup.sh` installs what this needs.

fn main() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let dir = dir.canonicalize()?;
    let root_dir = dir.to_str().ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", dir.display()))?;
    let pkg = aya_build::Package { name: "tartan-ebpf", root_dir, no_default_features: false, features: &[] };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default())
}
