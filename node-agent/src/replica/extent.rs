//! Extents: runs of blocks that sit in consecutive slots of one layer file,
//! so a read becomes one file read per extent. Resolving a read walks the
//! merged index (head) or the layers (snapshot) once over the range; large
//! reads are split over the cores, each part read and checked (CRC32C) by
//! one worker.
//!
//! Invariant: every byte handed back was read from a slot a committed or
//! pending entry names and matched that entry's CRC32C, or is a zero block.

use std::sync::{Arc, TryLockError};

use cairn_api::{BLOCK_SIZE, SnapshotId, block::MAX_IO_BYTES};

use crate::{
    disk::DiskFile,
    error::{Error, Result},
    meta::Entry,
    replica::{PARALLEL_BYTES, Replica, State},
};

const BS: usize = BLOCK_SIZE as usize;
/// The largest piece one worker reads of a long extent.
const PIECE_BLOCKS: usize = 64;

/// One file read: `count` blocks from `slot` of layer `layer`, landing at
/// block `pos` of the caller's buffer.
#[derive(Debug, Clone, Copy)]
struct Extent {
    pos: usize,
    layer: usize,
    slot: u32,
    count: usize,
}

impl Replica {
    /// Reads whole blocks of the head, or of a snapshot. Every block's
    /// CRC32C is checked; a mismatch is an error, never data.
    pub fn read(&self, offset: u64, len: u64, snapshot: Option<&SnapshotId>) -> Result<Vec<u8>> {
        if len > MAX_IO_BYTES {
            // Refused before allocating: check_range names the limit.
            let st = self.read_state()?;
            self.check_range(&st, offset, len, MAX_IO_BYTES, st.geometry.size())?;
        }
        let mut out = vec![0u8; len as usize];
        self.read_into(offset, &mut out, snapshot)?;
        Ok(out)
    }

    /// Like [`Replica::read`], into the caller's buffer (whose length is the
    /// read length).
    pub fn read_into(
        &self,
        offset: u64,
        buf: &mut [u8],
        snapshot: Option<&SnapshotId>,
    ) -> Result<()> {
        let st = self.read_state()?;
        self.read_locked(&st, offset, buf, snapshot)
    }

    /// [`Replica::read`] of fewer than [`PARALLEL_BYTES`], if no writer holds
    /// the replica's lock now; `None`, with nothing done, otherwise. For
    /// async threads, which must not wait behind a commit.
    pub fn try_read(
        &self,
        offset: u64,
        len: u64,
        snapshot: Option<&SnapshotId>,
    ) -> Option<Result<Vec<u8>>> {
        if len >= PARALLEL_BYTES as u64 {
            return None;
        }
        if let Err(e) = self.check_serving() {
            return Some(Err(e));
        }
        let st = match self.state.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let mut out = vec![0u8; len as usize];
        Some(self.read_locked(&st, offset, &mut out, snapshot).map(|()| out))
    }

    fn read_locked(
        &self,
        st: &State,
        offset: u64,
        buf: &mut [u8],
        snapshot: Option<&SnapshotId>,
    ) -> Result<()> {
        let (top, size) = match snapshot {
            None => (st.layers.len() - 1, st.geometry.size()),
            Some(id) => {
                let i = st.snapshot_index(&self.volume, id)?;
                (i, st.layers[i].snapshot.as_ref().expect("sealed").size)
            }
        };
        let range = self.check_range(st, offset, buf.len() as u64, MAX_IO_BYTES, size)?;
        let n = range.count() as usize;
        // Resolve every block to (layer index, entry) or zero.
        let mut found: Vec<Option<(usize, Entry)>> = vec![None; n];
        if snapshot.is_none() {
            for (b, newest) in st.merged.range(range.blocks()) {
                found[(b - range.start()) as usize] =
                    Some((st.layer_index(newest.layer), newest.entry));
            }
        } else {
            let mut decided = vec![false; n];
            for li in (0..=top).rev() {
                for (b, e) in st.layers[li].map.range(range.blocks()) {
                    let pos = (b - range.start()) as usize;
                    if !decided[pos] {
                        decided[pos] = true;
                        found[pos] = (!e.is_zero()).then_some((li, *e));
                    }
                }
            }
        }
        let mut extents: Vec<Extent> = Vec::new();
        for (pos, hit) in found.iter().enumerate() {
            let Some((li, e)) = hit else {
                buf[pos * BS..(pos + 1) * BS].fill(0);
                continue;
            };
            match extents.last_mut() {
                Some(x)
                    if x.layer == *li
                        && x.pos + x.count == pos
                        && x.slot + x.count as u32 == e.slot
                        && x.count < PIECE_BLOCKS =>
                {
                    x.count += 1
                }
                _ => extents.push(Extent { pos, layer: *li, slot: e.slot, count: 1 }),
            }
        }
        // Hand each extent its own part of the buffer, then read them.
        let mut parts: Vec<(Extent, &mut [u8])> = Vec::with_capacity(extents.len());
        let mut rest = &mut buf[..];
        let mut at = 0;
        for x in extents {
            let (_, tail) = rest.split_at_mut((x.pos - at) * BS);
            let (mine, tail) = tail.split_at_mut(x.count * BS);
            parts.push((x, mine));
            rest = tail;
            at = x.pos + x.count;
        }
        let read_one = |(x, out): &mut (Extent, &mut [u8])| -> Result<()> {
            let layer = &st.layers[x.layer];
            let file: &Arc<dyn DiskFile> =
                layer.file().expect("a layer with data blocks has a file");
            file.read_at(out, x.slot as u64 * BLOCK_SIZE)
                .map_err(|e| self.io("reading blocks", layer.path())(e))?;
            for (j, d) in out.chunks_exact(BS).enumerate() {
                let pos = x.pos + j;
                let (_, e) = found[pos].expect("resolved");
                self.verify(st, range.start() + pos as u64, d, &e, layer)?;
            }
            Ok(())
        };
        let res = if buf_len(&parts) >= PARALLEL_BYTES && parts.len() > 1 {
            use rayon::prelude::*;
            parts.par_iter_mut().try_for_each(read_one)
        } else {
            parts.iter_mut().try_for_each(read_one)
        };
        res.map_err(|e| match e {
            e @ Error::Io { .. } => self.fail(e),
            e => e,
        })
    }
}

fn buf_len(parts: &[(Extent, &mut [u8])]) -> usize {
    parts.iter().map(|(_, b)| b.len()).sum()
}
