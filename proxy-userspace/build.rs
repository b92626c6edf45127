//! Builds the eBPF datapath (nightly, bpfel-unknown-none, via bpf-linker) and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`, so a plain stable `cargo build` builds both.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../proxy-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    // aya-build watches the eBPF crate only; the map layouts it shares with this crate live
    // in proxy-common, and a stale object would disagree with the agent about them.
    println!("cargo:rerun-if-changed={manifest_dir}/../proxy-common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF datapath (run `cargo xtask setup` if the toolchain is missing)")
}
