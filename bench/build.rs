//! Builds the bench's own XDP programs (`bench-ebpf`) with aya-build so nat-bench can embed
//! them. `bench-parts` compiles nat-ebpf's modules in, so a change there rebuilds it too.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let dir = |name: &str| -> anyhow::Result<String> {
        let p = packages
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| anyhow!("{name} package not found"))?;
        Ok(p.manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {}", p.manifest_path))?
            .to_string())
    };
    println!("cargo:rerun-if-changed={}/src", dir("nat-ebpf")?);
    let root = dir("bench-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bench-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
