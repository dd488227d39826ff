//! A directory this process created for sockets, configs and logs; removed on drop.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `$TMPDIR/NAME`, which must not exist yet (names come from
    /// [`crate::unique_stem`]).
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// Creates `$TMPDIR/<prefix><pid>-<n>` ([`crate::unique_stem`]).
    pub fn unique(prefix: &str) -> anyhow::Result<Self> {
        Self::create(&crate::unique_stem(prefix))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cleanup: removing {}: {e}", self.0.display());
        }
    }
}
