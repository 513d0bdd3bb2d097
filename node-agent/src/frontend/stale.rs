//! FUSE mounts left behind by an agent that died (SIGKILL, a crash): their
//! server is gone, so every access fails with "Transport endpoint is not
//! connected" and a new head cannot be mounted at the same place. At start
//! the agent detaches them (lazily, so a loop device still holding a file
//! in one keeps it until it is detached) and says which loop devices, and
//! which filesystems on them, were on the dead volume.

use std::{
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use cairn_host::{
    loop_device::{devices_backed_under, mounted_at},
    mountinfo,
};

/// What was found and done for one dead mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleMount {
    pub mountpoint: PathBuf,
    /// Loop devices that were attached to its file, and where each one's
    /// filesystem is mounted, if it is: these need `umount` and
    /// `losetup -d` by whoever mounted them.
    pub loop_devices: Vec<(PathBuf, Option<PathBuf>)>,
    /// Whether the lazy unmount succeeded (else: why not).
    pub detached: Result<(), String>,
}

/// The `fuse.cairn` mounts under `dir` in this mount namespace.
pub fn cairn_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    mountinfo::mounts()
        .into_iter()
        .filter(|m| m.fstype == "fuse.cairn" && m.mountpoint.starts_with(&dir))
        .map(|m| m.mountpoint)
        .collect()
}

/// True when the FUSE server of the mount at `mountpoint` is gone: the
/// kernel answers ENOTCONN. A live mount (another agent's, sharing the
/// directory) answers and is left alone.
fn is_dead(mountpoint: &Path) -> bool {
    matches!(fs::metadata(mountpoint), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Detaches every dead `fuse.cairn` mount under `dir` (call it before this
/// agent mounts anything there) and reports each.
pub fn clean_stale_mounts(dir: &Path) -> Vec<StaleMount> {
    cairn_mounts_under(dir)
        .into_iter()
        .filter(|m| is_dead(m))
        .map(|mountpoint| {
            let loop_devices = devices_backed_under(&mountpoint)
                .into_iter()
                .map(|d| (d.clone(), mounted_at(&d)))
                .collect();
            let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
                .expect("mountinfo paths have no NUL");
            // SAFETY: umount2 reads a NUL-terminated path and keeps nothing.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let detached =
                if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error().to_string()) };
            StaleMount { mountpoint, loop_devices, detached }
        })
        .collect()
}
