//! Reads through the head: from the local replica when it is in sync, else
//! from the in-sync replicas in turn.
//!
//! Invariant: a bad block on the last in-sync copy of its chunk fails the
//! read that touches it (DATA_LOSS) and nothing else: no replica is marked
//! out of sync for it, so nothing deletes the only copy.

use super::*;

impl VolumeHead {
    /// Reads `len` bytes at any offset.
    pub async fn read(&self, offset: u64, len: u64) -> HeadResult<Bytes> {
        self.read_view(None, offset, len).await
    }

    /// Reads `len` bytes at any offset of snapshot `snapshot`, from the
    /// in-sync replicas (the snapshot was sealed on all of them).
    pub async fn read_snapshot(
        &self,
        snapshot: &SnapshotId,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        self.read_view(Some(snapshot), offset, len).await
    }

    /// Reads the head (`None`) or a snapshot at any offset.
    pub async fn read_view(
        &self,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        self.check_fenced()?;
        self.check_range(offset, len)?;
        let start = offset / BS * BS;
        let stop = (offset + len).div_ceil(BS) * BS;
        let all = self.read_aligned(snapshot, start, stop - start).await?;
        Ok(all.slice((offset - start) as usize..(offset - start + len) as usize))
    }

    pub(super) async fn read_aligned(
        &self,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        let pieces = self.pieces(offset, len);
        if let [(chunk, off, len)] = pieces[..] {
            return self.read_piece(snapshot, chunk, off, len).await;
        }
        let parts =
            join_all(pieces.iter().map(|&(c, o, l)| self.read_piece(snapshot, c, o, l))).await;
        let mut out = Vec::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out.into())
    }

    /// Reads one piece from the local replica if in sync, else from the
    /// in-sync replicas in turn; a replica that fails is marked out of
    /// sync and the next is tried. A replica with a bad block is marked only
    /// once another one returned the data: when every in-sync replica has
    /// it bad, the read fails (DATA_LOSS) and all of them are kept.
    async fn read_piece(
        &self,
        snapshot: Option<&SnapshotId>,
        chunk: u64,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        let mut corrupt: Vec<(usize, PeerError)> = Vec::new();
        loop {
            let mut live = self.in_sync(chunk)?;
            live.retain(|a| corrupt.iter().all(|(c, _)| c != a));
            if live.is_empty() {
                let detail = corrupt.iter().map(|(_, e)| e.to_string()).collect::<Vec<_>>();
                return Err(HeadError::DataLoss {
                    volume: self.spec.volume.clone(),
                    detail: detail.join("; "),
                });
            }
            let pick = match self.local.and_then(|l| live.iter().position(|&a| a == l)) {
                Some(i) => i,
                None => self.next_read.fetch_add(1, Ordering::Relaxed) % live.len(),
            };
            let a = live.swap_remove(pick);
            match self.peers[a].read(&self.spec.volume, snapshot, offset, len).await {
                Ok(data) => {
                    for (bad, e) in corrupt {
                        self.absorb(bad, e)?;
                    }
                    return Ok(data);
                }
                Err(e) if e.kind == PeerErrorKind::Corrupt => corrupt.push((a, e)),
                Err(e) => self.absorb(a, e)?,
            }
        }
    }
}
