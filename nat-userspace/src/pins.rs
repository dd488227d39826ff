//! bpffs layout and mounting. natd pins every map under `DIR/maps/NAME` and the XDP link of
//! every interface under `DIR/links/IFNAME`, so the fast path outlives natd and a new natd
//! adopts it (hitless restart and upgrade).
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// Default `--bpffs`.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/xdp-static-nat";
/// Where bpffs is conventionally mounted.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not on a bpf filesystem (mount one there: mount -t bpf bpf {0})")]
    NotBpffs(PathBuf),
}

/// Pin locations under one directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

impl PinDir {
    /// Prepares `root`: mounts bpffs on /sys/fs/bpf if `root` is under it and nothing is
    /// mounted there, then creates `root/maps` and `root/links` (0700).
    pub fn prepare(root: &Path) -> Result<Self, PinError> {
        let io = |source| PinError::Io {
            path: root.to_path_buf(),
            source,
        };
        let base = Path::new(BPFFS_ROOT);
        if root.starts_with(base) && !is_bpffs(base) {
            nix::mount::mount(
                Some("bpf"),
                base,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| io(e.into()))?;
            log::info!("mounted bpffs on {BPFFS_ROOT}");
        }
        let dir = Self {
            root: root.to_path_buf(),
        };
        for d in [dir.root.clone(), dir.maps(), dir.links()] {
            let io = |source| PinError::Io {
                path: d.clone(),
                source,
            };
            std::fs::create_dir_all(&d).map_err(io)?;
            // Whatever the umask: whoever may unlink a link pin may detach XDP.
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        if !is_bpffs(&dir.root) {
            return Err(PinError::NotBpffs(dir.root));
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, iface: &str) -> PathBuf {
        self.links().join(iface)
    }

    /// Removes every pin and the directories (natd --detach-on-exit).
    pub fn remove_all(&self) -> Result<(), PinError> {
        for d in [self.links(), self.maps()] {
            if let Ok(entries) = std::fs::read_dir(&d) {
                for e in entries.flatten() {
                    let p = e.path();
                    std::fs::remove_file(&p).map_err(|source| PinError::Io {
                        path: p.clone(),
                        source,
                    })?;
                }
            }
            let _ = std::fs::remove_dir(&d);
        }
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }
}
