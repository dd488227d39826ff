//! natctl builds from nat-api alone, without the eBPF toolchain: its dependency tree holds no
//! aya, aya-build, tokio, nix or nat-userspace, and `cargo build -p natctl` succeeds with no
//! `bpf-linker` on PATH (and no rustup proxies: the toolchain's own cargo and rustc) in a
//! target directory of its own, where nothing nat-userspace's build script made can be
//! reused. Should natctl gain a dependency on the dataplane, both checks fail.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// Crates natctl must not depend on, directly or not.
const FORBIDDEN: &[&str] = &[
    "aya",
    "aya-build",
    "aya-obj",
    "aya-ebpf",
    "tokio",
    "nix",
    "nat-userspace",
    "nat-ebpf",
];

/// The workspace root (natctl's parent directory).
fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// The toolchain's own cargo (not rustup's proxy) and the directory it is in, with rustc.
fn toolchain() -> (PathBuf, PathBuf) {
    let cargo = PathBuf::from(env!("CARGO"));
    let bin = cargo
        .parent()
        .map(Path::to_path_buf)
        .expect("cargo's path has a directory");
    (cargo, bin)
}

/// PATH without any directory that holds a `bpf-linker`, the toolchain's directory first.
fn path_without_bpf_linker(toolchain_bin: &Path) -> OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::iter::once(toolchain_bin.to_path_buf())
        .chain(std::env::split_paths(&path))
        .filter(|d| !d.join("bpf-linker").exists())
        .collect();
    std::env::join_paths(dirs).expect("PATH entries join again")
}

/// `cargo ARGS` in the workspace with the stripped PATH and a target directory of its own.
fn cargo(args: &[&str]) -> Output {
    let (cargo, bin) = toolchain();
    let path = path_without_bpf_linker(&bin);
    assert!(
        std::env::split_paths(&path).all(|d| !d.join("bpf-linker").exists()),
        "bpf-linker is still on PATH"
    );
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("natctl-alone");
    Command::new(&cargo)
        .args(args)
        .current_dir(workspace())
        .env("PATH", &path)
        .env("RUSTC", bin.join("rustc"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.display()))
}

#[test]
fn natctl_depends_on_no_dataplane_crate() {
    let out = cargo(&[
        "tree",
        "-p",
        "natctl",
        "-e",
        "normal,build",
        "--prefix",
        "none",
        "--locked",
        "--offline",
    ]);
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree -p natctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tree.contains("nat-api"),
        "natctl's tree lacks nat-api:\n{tree}"
    );
    let found: std::collections::BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| FORBIDDEN.contains(name))
        .collect();
    assert!(found.is_empty(), "natctl depends on {found:?}:\n{tree}");
}

#[test]
fn natctl_builds_without_bpf_linker() {
    let out = cargo(&["build", "-p", "natctl", "--locked", "--offline"]);
    assert!(
        out.status.success(),
        "cargo build -p natctl without bpf-linker on PATH failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let natctl = Path::new(env!("CARGO_TARGET_TMPDIR")).join("natctl-alone/debug/natctl");
    assert!(natctl.is_file(), "{} was not built", natctl.display());
}
