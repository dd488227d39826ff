//! `cargo xtask setup`: installs what building and testing need on a fresh Debian 12 machine
//! that has rustup with stable and nightly toolchains. Idempotent: each step checks first,
//! skips when already done, and prints one line.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::{self, command};

/// Debian packages the tests, the demo and the benchmarks call.
const DEB_PACKAGES: &[&str] = &[
    "nftables",
    // The `conntrack` tool: the tests read and write the kernel's connection table with it
    // (natd speaks ctnetlink itself).
    "conntrack",
    "iproute2",
    "iputils-ping",
    "iputils-arping",
    "netcat-openbsd",
    "ethtool",
    "tcpdump",
    "procps",
    "util-linux",
    "kmod",
    // e2e_ops: a real Prometheus server scrapes natd, and promtool checks its exposition.
    "prometheus",
    // `cargo xtask bench`: CloudStack's iptables static NAT, for comparison; e2e_policy_kernel:
    // a CloudStack router's iptables in front of `natd --policy kernel`.
    "iptables",
    // `cargo xtask test-kernel`: boots Debian's 6.1 kernel with a static busybox initramfs.
    "qemu-system-x86",
    "busybox-static",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Installed if no `cargo fuzz` works (`cargo xtask fuzz`, `cargo xtask test`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run() -> Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    stable_components()?;
    bpf_linker()?;
    cargo_fuzz()?;
    // The kernel `cargo xtask test-kernel` boots (Debian 12's 6.1), unpacked into /var/cache.
    crate::test_kernel::fetch_default()?;
    Ok(())
}

/// cargo-fuzz, which builds and runs the fuzz targets (with the nightly toolchain, which
/// `nightly_rust_src` already requires).
fn cargo_fuzz() -> Result<()> {
    if util::succeeds(util::cargo().args(["fuzz", "--version"])) {
        println!("setup: cargo-fuzz ok");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    util::run(
        util::cargo()
            // Outside the repo, so its cargo config cannot leak into the install.
            .current_dir(util::home_dir()?)
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .arg("--root")
            .arg(util::cargo_home()?),
    )?;
    if !util::succeeds(util::cargo().args(["fuzz", "--version"])) {
        bail!("cargo-fuzz was installed but `cargo fuzz --version` still fails");
    }
    println!("setup: cargo-fuzz ok");
    Ok(())
}

fn deb_installed(pkg: &str) -> bool {
    command("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        println!("setup: debian packages ok");
        return Ok(());
    }
    println!("setup: installing debian packages: {}", missing.join(" "));
    util::require_root("installing Debian packages with apt-get")?;
    util::run(command("apt-get").arg("update"))?;
    util::run(
        command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Installed components of `toolchain` (None = the active one), without target suffixes kept.
fn installed_components(toolchain: Option<&str>) -> Result<Vec<String>> {
    let mut cmd = command("rustup");
    cmd.args(["component", "list", "--installed"]);
    if let Some(tc) = toolchain {
        cmd.args(["--toolchain", tc]);
    }
    Ok(util::output(&mut cmd)?
        .lines()
        .map(|l| l.trim().to_owned())
        .collect())
}

fn has_component(installed: &[String], name: &str) -> bool {
    installed
        .iter()
        .any(|c| c == name || c.starts_with(&format!("{name}-")))
}

fn nightly_rust_src() -> Result<()> {
    let installed = installed_components(Some("nightly"))
        .context("the `nightly` toolchain is required (rustup toolchain install nightly)")?;
    if has_component(&installed, "rust-src") {
        println!("setup: nightly rust-src ok");
        return Ok(());
    }
    println!("setup: installing nightly rust-src");
    util::run(command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// rustfmt and clippy for the active toolchain: `cargo xtask test` runs both.
fn stable_components() -> Result<()> {
    let installed = installed_components(None)?;
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !has_component(&installed, c))
        .collect();
    if missing.is_empty() {
        println!("setup: rustfmt and clippy ok");
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" and "));
    util::run(command("rustup").args(["component", "add"]).args(&missing))
}

/// The nightly toolchain's libLLVM and the prefix dir bpf-linker is built and linked against.
struct Llvm {
    /// e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`
    file_name: String,
    /// `<prefix>/lib`, holding the two symlinks; bpf-linker's rpath points here.
    lib_dir: PathBuf,
    prefix: PathBuf,
    /// e.g. `llvm-22`
    feature: String,
}

fn nightly_llvm() -> Result<Llvm> {
    let sysroot =
        util::output(command("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("cannot find the nightly toolchain's sysroot")?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let mut names: Vec<String> = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("cannot read {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libLLVM.so."))
        .collect();
    names.sort();
    let Some(file_name) = names.into_iter().next() else {
        bail!("no libLLVM.so.* in {}", sysroot_lib.display());
    };
    let major: String = file_name["libLLVM.so.".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.is_empty() {
        bail!("cannot read the LLVM major version from {file_name}");
    }
    let data_home = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => util::home_dir()?.join(".local/share"),
    };
    let prefix = data_home
        .join("xdp-static-nat")
        .join(format!("llvm-{file_name}"));
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("cannot create {}", lib_dir.display()))?;
    let target = sysroot_lib.join(&file_name);
    ensure_symlink(&target, &lib_dir.join("libLLVM.so"))?;
    ensure_symlink(&target, &lib_dir.join(&file_name))?;
    Ok(Llvm {
        file_name,
        lib_dir,
        prefix,
        feature: format!("llvm-{major}"),
    })
}

fn ensure_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

/// Why the bpf-linker on PATH is not usable, or None if it works and loads `llvm`'s libLLVM.
fn bpf_linker_problem(llvm: &Llvm) -> Option<String> {
    let Some(bin) = util::find_on_path("bpf-linker") else {
        return Some("not found on PATH".into());
    };
    if !util::succeeds(command(&bin).arg("--version")) {
        return Some(format!("{} --version fails", bin.display()));
    }
    let ldd = match util::output(command("ldd").arg(&bin)) {
        Ok(out) => out,
        Err(e) => return Some(format!("{e:#}")),
    };
    let wanted = llvm.lib_dir.join(&llvm.file_name);
    let resolved = ldd.lines().find_map(|line| {
        let (name, rest) = line.trim().split_once(" => ")?;
        name.starts_with("libLLVM")
            .then(|| rest.split(" (").next().unwrap_or(rest).trim())
    });
    match resolved {
        Some(path) if Path::new(path) == wanted => None,
        Some(path) => Some(format!("{} loads libLLVM from {path}", bin.display())),
        None => Some(format!(
            "{} does not link libLLVM dynamically",
            bin.display()
        )),
    }
}

fn bpf_linker() -> Result<()> {
    let llvm = nightly_llvm()?;
    let Some(problem) = bpf_linker_problem(&llvm) else {
        println!("setup: bpf-linker ok");
        return Ok(());
    };
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} with {} against {} ({problem})",
        llvm.feature,
        llvm.prefix.display()
    );
    let root = util::cargo_home()?;
    util::run(
        util::cargo()
            // Outside the repo, so its cargo config cannot leak into the install.
            .current_dir(util::home_dir()?)
            .env("LLVM_PREFIX", &llvm.prefix)
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--locked",
                "--no-default-features",
                "--features",
                &llvm.feature,
            ])
            .arg("--force")
            .arg("--root")
            .arg(&root),
    )?;
    if let Some(problem) = bpf_linker_problem(&llvm) {
        bail!(
            "bpf-linker was installed into {} but is still unusable: {problem}",
            root.join("bin").display()
        );
    }
    println!("setup: bpf-linker ok");
    Ok(())
}
