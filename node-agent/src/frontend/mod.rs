//! Frontends: how an open volume head is exposed to the kernel as a block
//! device. A frontend sees the volume only through [`BlockVolume`]
//! (byte-addressed I/O at any offset and length inside the volume), so the
//! same frontend serves a real head and the in-memory volume of the tests.

pub mod fuse;
pub mod head_volume;
pub mod loop_device;
pub mod stale;

use std::{fmt, io, path::PathBuf};

/// Why a volume I/O failed, as a frontend reports it to the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeIoError {
    /// The range is not inside the volume (EINVAL / ENOSPC at the edge).
    #[error("range [{offset}, {offset}+{len}) is outside the {size}-byte volume")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The head can no longer write (fenced by a newer head, read-only).
    #[error("volume is read-only here: {0}")]
    ReadOnly(String),
    /// Any other failure (no in-sync replica, I/O error, checksum error).
    #[error("{0}")]
    Io(String),
}

/// A volume as a frontend sees it.
pub trait BlockVolume: Send + Sync + fmt::Debug + 'static {
    /// Size in bytes (a multiple of 4096).
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeIoError>;
    /// Writes `data` at `offset`; durable only after [`BlockVolume::flush`].
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeIoError>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> Result<(), VolumeIoError>;
    /// Discards `[offset, offset + len)`: it reads as zeros afterwards.
    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeIoError>;
}

/// Why a frontend could not be set up or taken down. Each says which
/// command, path or device, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("file name {name:?} cannot name the volume's file in a FUSE mount: {reason}")]
    FileName { name: String, reason: &'static str },
    #[error("mount point {path}: {source}; create it as an empty directory first")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "could not mount FUSE at {mountpoint}: {source}; the agent needs root (CAP_SYS_ADMIN) and /dev/fuse (modprobe fuse; in a container, pass the device /dev/fuse)"
    )]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{file} is still attached to loop device {}: detach it first (LoopDevice::detach, or `losetup -d {}`), after unmounting any filesystem on it",
        list(.devices), list(.devices)
    )]
    Attached { file: PathBuf, devices: Vec<PathBuf> },
    #[error(
        "could not unmount the FUSE mount at {mountpoint}: {source} (busy: something still has it open, `fuser -vm {mountpoint}` shows what; invalid argument: it was unmounted by someone else)"
    )]
    Unmount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the FUSE session at {mountpoint} ended with an error: {source}")]
    Session {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("backing file {path}: {source}")]
    BackingFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run `{command}`: {source}; install util-linux (losetup, mount) on the node")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}; {advice}")]
    Command { command: String, status: String, stderr: String, advice: &'static str },
    #[error("`{command}` printed {output:?}, not the path of a loop device")]
    Output { command: String, output: String },
    #[error(
        "loop device {device} is mounted at {mountpoint}: unmount it first (`umount {mountpoint}`)"
    )]
    LoopMounted { device: PathBuf, mountpoint: PathBuf },
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
