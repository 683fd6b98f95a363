//! A hugetlbfs mount of our own for the QEMUs' RAM files (none may be
//! mounted on the host, and QEMU's `mem-path` needs a file on one).

use std::path::PathBuf;

use super::error::QemuError;

/// hugetlbfs mounted on a directory of the work directory; unmounted when
/// dropped.
#[derive(Debug)]
pub(super) struct HugetlbfsMount(PathBuf);

impl HugetlbfsMount {
    /// Mounts hugetlbfs (2 MiB pages) on `dir`, created if needed. Needs root.
    pub(super) fn new(dir: PathBuf) -> Result<Self, QemuError> {
        std::fs::create_dir_all(&dir).map_err(|source| QemuError::MountPoint { path: dir.clone(), source })?;
        let status = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "pageserver-demo"])
            .arg(&dir)
            .status()
            .map_err(|source| QemuError::MountCommand { path: dir.clone(), source })?;
        if !status.success() {
            return Err(QemuError::MountFailed { path: dir, status });
        }
        Ok(Self(dir))
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
