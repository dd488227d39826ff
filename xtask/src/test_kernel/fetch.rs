//! A Debian kernel package (`linux-image-<version>.N-M-amd64`, the newest ABI apt knows), downloaded
//! with `apt-get download` and unpacked with `dpkg-deb -x` into [`CACHE`], never installed: the
//! host's /boot and /lib/modules are not touched. `depmod` indexes the unpacked modules (a
//! package ships without `modules.dep`; its postinst makes it). Idempotent and safe against an
//! interrupted run: a package is unpacked into a temporary directory that is renamed into place
//! only when complete, so a directory under its final name is always whole.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::{self, command};

/// Where unpacked kernels live (outside the repo and `target/`, so `cargo clean` keeps them).
pub const CACHE: &str = "/var/cache/xdp-static-nat/kernels";

/// An unpacked kernel package.
pub struct Kernel {
    /// The Debian package, e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package, indexed by depmod.
    pub modules: PathBuf,
}

/// The newest `linux-image-<version>.N-M-amd64` package apt knows (`apt-get update` once if
/// it knows none), downloaded and unpacked into [`CACHE`] unless already there.
pub fn kernel(version: &str) -> Result<Kernel> {
    let package = match newest_package(version)? {
        Some(p) => p,
        None => {
            println!("setup: no linux-image-{version} package known to apt; apt-get update");
            util::run(command("apt-get").arg("update"))?;
            newest_package(version)?.with_context(|| {
                format!(
                    "apt knows no package linux-image-{version}.N-M-amd64 (is the Debian \
                     release's kernel {version}? Debian 12 ships 6.1)"
                )
            })?
        }
    };
    let dir = Path::new(CACHE).join(&package);
    if !dir.is_dir() {
        unpack(&package, &dir)?;
    }
    open(&package, &dir)
}

/// Among apt's package names, `linux-image-<version>.N-M-amd64` with the highest `M` (the
/// ABI; Debian raises it with each kernel update).
fn newest_package(version: &str) -> Result<Option<String>> {
    let prefix = format!("linux-image-{version}.");
    let names = util::output(command("apt-cache").args(["pkgnames", &prefix]))?;
    Ok(names
        .lines()
        .filter_map(|name| abi(name, &prefix).map(|n| (n, name.to_string())))
        .max()
        .map(|(_, name)| name))
}

/// `M` of `<prefix>N-M-amd64`, or None for another flavour (`-cloud-amd64`, `-rt-amd64`,
/// `-unsigned`, `-dbg`).
fn abi(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_suffix("-amd64")?;
    let (minor, abi) = rest.split_once('-')?;
    minor.parse::<u32>().ok()?;
    abi.parse().ok()
}

/// Downloads `package` and unpacks it into `dir` (through a temporary sibling directory).
fn unpack(package: &str, dir: &Path) -> Result<()> {
    util::require_root("unpacking a kernel package into /var/cache")?;
    let cache = dir.parent().context("the kernel cache has no parent")?;
    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let tmp = cache.join(format!(".{package}.tmp-{}", std::process::id()));
    remove_stale(cache)?;
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    println!(
        "setup: downloading and unpacking {package} into {}",
        dir.display()
    );
    util::run(
        command("apt-get")
            .current_dir(&tmp)
            // The download lands in a root-only directory: no need to drop to the _apt user.
            .args(["-o", "APT::Sandbox::User=root", "download", package]),
    )?;
    let deb = fs::read_dir(&tmp)
        .with_context(|| format!("cannot read {}", tmp.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", tmp.display()))?;
    let root = tmp.join("root");
    util::run(command("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
    let release = release_of(&root)?;
    util::run(command("depmod").arg("-b").arg(&root).arg(&release))?;
    match fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another run (another worktree) unpacked the same package meanwhile: keep its copy.
        Err(_) if dir.is_dir() => {
            fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))
        }
    }
}

/// Removes what an interrupted [`unpack`] left behind (a temporary directory whose process
/// is gone).
fn remove_stale(cache: &Path) -> Result<()> {
    for entry in fs::read_dir(cache).with_context(|| format!("cannot read {}", cache.display()))? {
        let path = entry?.path();
        let pid = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with('.'))
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        let stale = pid.is_some_and(|p| !Path::new("/proc").join(p.to_string()).exists());
        if stale {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The modules directory of an unpacked package (`lib/modules`, or `usr/lib/modules` for a
/// package built for a merged /usr).
fn modules_root(root: &Path) -> Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| p.is_dir())
        .with_context(|| format!("{} holds no lib/modules", root.display()))
}

/// The one kernel release the package holds modules for.
fn release_of(root: &Path) -> Result<String> {
    let dir = modules_root(root)?;
    let names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "{} should hold one kernel release, holds {names:?}",
            dir.display()
        ),
    }
}

fn open(package: &str, dir: &Path) -> Result<Kernel> {
    let root = dir.join("root");
    let release = release_of(&root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules = modules_root(&root)?.join(&release);
    for path in [&vmlinuz, &modules.join("modules.dep")] {
        if !path.exists() {
            bail!(
                "{} is missing: remove {} to unpack {package} again",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(Kernel {
        package: package.to_string(),
        release,
        vmlinuz,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::abi;

    #[test]
    fn only_the_plain_amd64_flavour_is_taken() {
        let p = "linux-image-6.1.";
        assert_eq!(abi("linux-image-6.1.0-57-amd64", p), Some(57));
        assert_eq!(abi("linux-image-6.1.0-9-amd64", p), Some(9));
        for other in [
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-rt-amd64",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-dbg",
            "linux-image-6.12.0-57-amd64",
        ] {
            assert_eq!(abi(other, p), None, "{other}");
        }
    }
}
