//! Loop devices over the agent's FUSE file of a head: the block device a
//! staged volume is formatted, mounted or bind-mounted from. The kernel is
//! the record of which device serves which file (`/sys/block/loopN/loop/
//! backing_file`), so a restarted node plugin finds its devices again.
//! Invariant: a device is detached only while it is still backed by the
//! volume's file, and never while a filesystem on it is mounted.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

// The kernel's view of loop devices is the host crate's (the agent's FUSE
// frontend attaches loop devices the same way).
pub use cairn_host::loop_device::{backing_file, devices_backed_by as backed_by};
use cairn_host::{
    loop_device::{SECTOR_SIZE, mounted_at},
    sysfs,
};

use super::{Error, run};
/// How long a detach waits for the kernel to let go of the device.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// Whether the device refuses writes (attached with --read-only).
pub fn read_only(device: &Path) -> bool {
    sysfs::read(device, "ro").is_some_and(|v| v.trim() == "1")
}

/// The device's size in bytes, as the kernel has it now.
pub fn size(device: &Path) -> Option<u64> {
    sysfs::read(device, "size")?.trim().parse::<u64>().ok().map(|sectors| sectors * 512)
}

/// The writable loop device serving `file`: an attached one if there is
/// one (a repeated stage, a restarted plugin), else a new one.
pub async fn attach(file: &Path) -> Result<PathBuf, Error> {
    attach_mode(file, false).await
}

/// A read-only loop device over `file`, for read-only raw block
/// publishing: a read-only bind mount does not stop writes to a device
/// node, a read-only device does.
pub async fn attach_read_only(file: &Path) -> Result<PathBuf, Error> {
    attach_mode(file, true).await
}

/// Attaches with direct I/O (no page cache between the device and the
/// file), or buffered if the kernel refuses direct I/O for it.
async fn attach_mode(file: &Path, ro: bool) -> Result<PathBuf, Error> {
    let existing = || backed_by(file).into_iter().find(|d| read_only(d) == ro);
    if let Some(device) = existing() {
        return Ok(device);
    }
    let sector = SECTOR_SIZE.to_string();
    let args = |direct: bool| {
        let mut a: Vec<&OsStr> =
            vec!["--find".as_ref(), "--show".as_ref(), "--sector-size".as_ref(), sector.as_ref()];
        if ro {
            a.push("--read-only".as_ref());
        }
        if direct {
            a.push("--direct-io=on".as_ref());
        }
        a.push(file.as_os_str());
        a
    };
    let device = match run("losetup", &args(true)).await {
        Ok(out) => PathBuf::from(out),
        Err(e) => match existing() {
            // Attached, but direct I/O could not be switched on.
            Some(device) => {
                tracing::warn!(device = %device.display(), error = %e, "direct I/O refused; the loop device runs buffered");
                device
            }
            None => {
                tracing::warn!(file = %file.display(), error = %e, "attaching with direct I/O failed; trying buffered");
                PathBuf::from(run("losetup", &args(false)).await?)
            }
        },
    };
    if backing_file(&device).as_deref() != Some(file) {
        return Err(Error::Device {
            device,
            why: format!("losetup attached it, but it is not backed by {}", file.display()),
        });
    }
    tracing::info!(device = %device.display(), file = %file.display(), read_only = ro, "loop device attached");
    Ok(device)
}

/// Detaches every loop device backed by `file`; refused while a filesystem
/// on one is mounted. Waits until the kernel has let go.
pub async fn detach(file: &Path) -> Result<(), Error> {
    for device in backed_by(file) {
        detach_one(&device, file).await?;
    }
    Ok(())
}

/// Detaches `device` if it is still backed by `file`.
pub async fn detach_one(device: &Path, file: &Path) -> Result<(), Error> {
    if backing_file(device).as_deref() != Some(file) {
        return Ok(());
    }
    if let Some(m) = mounted_at(device) {
        return Err(Error::Device {
            device: device.to_path_buf(),
            why: format!("a filesystem on it is mounted at {}: unmount it first", m.display()),
        });
    }
    run("losetup", &["--detach".as_ref(), device.as_os_str()]).await?;
    let deadline = Instant::now() + DETACH_WAIT;
    while backing_file(device).as_deref() == Some(file) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if backing_file(device).as_deref() == Some(file) {
        tracing::warn!(device = %device.display(), "loop device still open elsewhere; it detaches when its last user closes it");
    }
    tracing::info!(device = %device.display(), file = %file.display(), "loop device detached");
    Ok(())
}

/// Makes the device take the file's current size (after the volume grew).
pub async fn refresh(device: &Path) -> Result<(), Error> {
    run("losetup", &["--set-capacity".as_ref(), device.as_os_str()]).await.map(drop)
}
