//! Heads as frontends see them: [`HeadVolume`] serves a volume head's I/O
//! and [`SnapshotVolume`] a snapshot of it, read-only, through the
//! [`BlockVolume`] seam. Frontend threads (FUSE workers) block on the
//! agent's runtime, which they must not be part of; calls to the local
//! replica run on them directly ([`on_frontend_thread`]).

use std::sync::Arc;

use bytes::Bytes;
use cairn_api::{SnapshotId, block::MAX_IO_BYTES};

use super::{BlockVolume, VolumeIoError};
use crate::{
    head::{HeadError, VolumeHead},
    peer::on_frontend_thread,
};

/// A head as a frontend sees it: the [`BlockVolume`] calls of frontend
/// threads (FUSE workers) run the head's async I/O on the agent's runtime.
#[derive(Debug, Clone)]
pub struct HeadVolume {
    head: Arc<VolumeHead>,
    runtime: tokio::runtime::Handle,
}

impl HeadVolume {
    /// `runtime` must not be driven by the threads that call the
    /// [`BlockVolume`] methods (they block on it).
    pub fn new(head: Arc<VolumeHead>, runtime: tokio::runtime::Handle) -> Self {
        HeadVolume { head, runtime }
    }

    pub fn head(&self) -> &Arc<VolumeHead> {
        &self.head
    }
}

fn frontend_error(e: HeadError) -> VolumeIoError {
    match e {
        HeadError::Range { offset, len, size, .. } => {
            VolumeIoError::OutOfRange { offset, len, size }
        }
        HeadError::Fenced { .. } => VolumeIoError::ReadOnly(e.to_string()),
        HeadError::Placement { .. }
        | HeadError::NoReplica { .. }
        | HeadError::Refused { .. }
        | HeadError::Snapshot { .. }
        | HeadError::MissingPeer { .. }
        | HeadError::Rebuild { .. }
        | HeadError::Unproven { .. }
        | HeadError::DataLoss { .. } => VolumeIoError::Io(e.to_string()),
    }
}

/// Runs a head future to completion on this (frontend) thread.
fn block_on<F: Future>(runtime: &tokio::runtime::Handle, f: F) -> F::Output {
    on_frontend_thread(|| runtime.block_on(f))
}

/// Reads `buf.len()` bytes at `offset` of the head or a snapshot, in
/// requests of at most [`MAX_IO_BYTES`].
fn read_pieces(
    runtime: &tokio::runtime::Handle,
    head: &VolumeHead,
    snapshot: Option<&SnapshotId>,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), VolumeIoError> {
    for (i, part) in buf.chunks_mut(MAX_IO_BYTES as usize).enumerate() {
        let at = offset + (i * MAX_IO_BYTES as usize) as u64;
        let data = block_on(runtime, head.read_view(snapshot, at, part.len() as u64))
            .map_err(frontend_error)?;
        part.copy_from_slice(&data);
    }
    Ok(())
}

impl BlockVolume for HeadVolume {
    fn size(&self) -> u64 {
        self.head.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeIoError> {
        read_pieces(&self.runtime, &self.head, None, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeIoError> {
        for (i, part) in data.chunks(MAX_IO_BYTES as usize).enumerate() {
            let at = offset + (i * MAX_IO_BYTES as usize) as u64;
            block_on(&self.runtime, self.head.write(at, Bytes::copy_from_slice(part)))
                .map_err(frontend_error)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), VolumeIoError> {
        block_on(&self.runtime, self.head.flush()).map_err(frontend_error)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeIoError> {
        block_on(&self.runtime, self.head.trim(offset, len)).map_err(frontend_error)
    }
}

/// A snapshot of a volume, read-only, read through its head from the
/// replicas that sealed it.
#[derive(Debug, Clone)]
pub struct SnapshotVolume {
    head: Arc<VolumeHead>,
    snapshot: SnapshotId,
    runtime: tokio::runtime::Handle,
}

impl SnapshotVolume {
    pub fn new(
        head: Arc<VolumeHead>,
        snapshot: SnapshotId,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        SnapshotVolume { head, snapshot, runtime }
    }

    fn read_only(&self) -> VolumeIoError {
        VolumeIoError::ReadOnly(format!(
            "snapshot {} of volume {} is read-only",
            self.snapshot,
            self.head.volume()
        ))
    }
}

impl BlockVolume for SnapshotVolume {
    fn size(&self) -> u64 {
        self.head.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeIoError> {
        read_pieces(&self.runtime, &self.head, Some(&self.snapshot), offset, buf)
    }

    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), VolumeIoError> {
        Err(self.read_only())
    }

    fn flush(&self) -> Result<(), VolumeIoError> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64) -> Result<(), VolumeIoError> {
        Err(self.read_only())
    }
}
