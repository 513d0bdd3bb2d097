//! Frontends: how an open volume head is exposed to the kernel as a block
//! device. A frontend sees the volume only through [`BlockVolume`]
//! (byte-addressed I/O at any offset and length inside the volume), so the
//! same frontend serves a real head and the in-memory volume of the tests.

use std::fmt;

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
