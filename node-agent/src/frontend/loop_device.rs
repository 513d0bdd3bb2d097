//! Loop devices over a frontend's file: attached and detached with
//! `losetup`, asking the kernel who uses them (the backing files in sysfs,
//! the mounts in `/proc/self/mountinfo`, read by `cairn-host`). Invariant: a loop device is
//! detached only when no filesystem is mounted on it and it is still backed
//! by the file it was attached to, so a volume is never pulled from under a
//! mounted filesystem and a device reused by someone else is never touched.

use std::{
    ffi::OsStr,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

// The kernel's view of loop devices (backing files, sysfs, mounts) is the
// host crate's, shared with the CSI node plugin; re-exported so this module
// stays the one place the agent's frontends ask about loop devices.
pub use cairn_host::loop_device::{
    SECTOR_SIZE, backing_file, detaching, devices_backed_by, mounted_at,
};
use cairn_host::{
    command,
    loop_device::{FileId, backing_id},
    sysfs,
};
use tracing::{info, warn};

use super::FrontendError;

const LOSETUP_ADVICE: &str = "the agent needs root and a free loop device (modprobe loop; in a container, /dev/loop-control and the /dev/loop* nodes must be present)";
/// How long a detach waits for the kernel to let go of the backing file
/// (it defers the detach while something, such as udev's probe, has the
/// device open).
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// A loop device attached to a file. Detached by [`LoopDevice::detach`] or,
/// best effort, on drop.
#[derive(Debug)]
pub struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
    /// The backing file's identity: its path can change (a FUSE mount
    /// detached lazily under the device), this cannot.
    id: FileId,
    direct_io: bool,
    attached: bool,
}

/// Attaches `file` to a free loop device with 4096-byte sectors. With
/// `direct_io`, asks for direct I/O (no page cache between the loop device
/// and the file); if the kernel refuses it for this file, attaches with
/// buffered I/O and logs a warning. [`LoopDevice::direct_io`] tells which.
pub fn attach(file: &Path, direct_io: bool) -> Result<LoopDevice, FrontendError> {
    let backing_error = |source| FrontendError::BackingFile { path: file.to_path_buf(), source };
    let backing = std::path::absolute(file).map_err(backing_error)?;
    let meta = fs::metadata(&backing).map_err(backing_error)?;
    let id = (meta.dev(), meta.ino());
    if direct_io {
        let before = devices_backed_by(&backing);
        match losetup_attach(&backing, true) {
            Ok(device) => return Ok(attached(device, backing, id)),
            Err(e @ FrontendError::Command { .. }) => {
                // losetup may have attached the device and failed only to
                // switch direct I/O on: keep that device, buffered.
                let now = devices_backed_by(&backing);
                if let Some(device) = now.into_iter().find(|d| !before.contains(d)) {
                    warn!(device = %device.display(), error = %e, "direct I/O refused; the loop device runs buffered");
                    return Ok(attached(device, backing, id));
                }
                warn!(file = %backing.display(), error = %e, "direct I/O refused; attaching with buffered I/O");
            }
            Err(e) => return Err(e),
        }
    }
    let device = losetup_attach(&backing, false)?;
    Ok(attached(device, backing, id))
}

fn attached(device: PathBuf, backing: PathBuf, id: FileId) -> LoopDevice {
    let direct_io = sysfs::read(&device, "loop/dio").is_some_and(|v| v == "1");
    info!(device = %device.display(), file = %backing.display(), direct_io, "loop device attached");
    LoopDevice { device, backing, id, direct_io, attached: true }
}

fn losetup_attach(file: &Path, direct_io: bool) -> Result<PathBuf, FrontendError> {
    let sector = SECTOR_SIZE.to_string();
    let mut args: Vec<&OsStr> =
        vec!["--find".as_ref(), "--show".as_ref(), "--sector-size".as_ref(), sector.as_ref()];
    if direct_io {
        args.push("--direct-io=on".as_ref());
    }
    args.push(file.as_os_str());
    let output = run("losetup", &args, LOSETUP_ADVICE)?;
    let device = PathBuf::from(output.trim());
    let is_loop = device
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(|n| n.strip_prefix("loop"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    if !is_loop || !device.starts_with("/dev") {
        return Err(FrontendError::Output { command: command::line("losetup", &args), output });
    }
    Ok(device)
}

impl LoopDevice {
    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.device
    }

    /// The file behind the device (absolute path).
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Whether the device does direct I/O to its file (as the kernel reports
    /// it in sysfs after the attach).
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Detaches the device and waits until the kernel has let go of the
    /// file. Refused while a filesystem is mounted on the device. A device
    /// found detached, or backed by another file (detached and reused by
    /// someone else), is left alone. Detaching twice is a no-op.
    pub fn detach(&mut self) -> Result<(), FrontendError> {
        if !self.attached {
            return Ok(());
        }
        if let Some(mountpoint) = mounted_at(&self.device) {
            return Err(FrontendError::LoopMounted { device: self.device.clone(), mountpoint });
        }
        if !self.still_ours() {
            self.attached = false;
            return Ok(());
        }
        run("losetup", &["--detach".as_ref(), self.device.as_os_str()], LOSETUP_ADVICE)?;
        let deadline = Instant::now() + DETACH_WAIT;
        while backing_id(&self.device) == Some(self.id) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if backing_id(&self.device) == Some(self.id) {
            warn!(device = %self.device.display(), "loop device still open elsewhere; it detaches when the last user closes it");
        }
        self.attached = false;
        info!(device = %self.device.display(), file = %self.backing.display(), "loop device detached");
        Ok(())
    }

    fn still_ours(&self) -> bool {
        match backing_id(&self.device) {
            Some(id) if id == self.id => true,
            Some(_) => {
                warn!(device = %self.device.display(), file = %self.backing.display(), "loop device was detached and reused by someone else; leaving it alone");
                false
            }
            None => false,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match self.detach() {
            Ok(()) => {}
            Err(FrontendError::LoopMounted { device, mountpoint }) => {
                // The kernel defers the detach of an open device until its
                // last user (the mounted filesystem) lets go.
                warn!(device = %device.display(), mountpoint = %mountpoint.display(), "loop device dropped while mounted; it detaches when unmounted");
                if self.still_ours()
                    && let Err(e) =
                        run("losetup", &["--detach".as_ref(), device.as_os_str()], LOSETUP_ADVICE)
                {
                    warn!(error = %e, "deferred detach failed");
                }
            }
            Err(e) => warn!(error = %e, "loop device detach at drop failed"),
        }
    }
}

/// Runs a command; its trimmed stdout, or an error with its stderr.
fn run(program: &str, args: &[&OsStr], advice: &'static str) -> Result<String, FrontendError> {
    let command = command::line(program, args);
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source: io::Error| FrontendError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(FrontendError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            advice,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
