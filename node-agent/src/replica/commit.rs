//! The commit protocol: the only way a replica's durable state changes.
//! Sync the head's data file (and its directory when the file is new), then
//! one redb transaction with the changed block records (plus whatever the
//! caller adds: a seal, a growth), then free the slots the commit stopped
//! naming.
//!
//! Invariant: a slot is freed (reused or hole-punched) only after a commit
//! that no longer names it has returned.

use std::collections::BTreeSet;

use cairn_api::{BLOCK_SIZE, ChunkSet, snapshot::ReplicaInfo};

use crate::{
    error::{Error, Result, meta},
    meta::{BLOCKS, GROUP_SHIFT, REPLICAS, encode_record},
    replica::layer::slot_runs,
    replica::{Replica, State, write_group},
};

impl Replica {
    /// Makes every write so far durable.
    pub fn flush(&self, epoch: u64) -> Result<()> {
        let mut st = self.write_state()?;
        self.admit(&mut st, epoch)?;
        self.commit(&mut st, |_, _| Ok(())).map_err(|e| self.fail(e))
    }

    /// Flushes at the admitted epoch (the agent's own flush at shutdown).
    pub(crate) fn flush_admitted(&self) -> Result<()> {
        let mut st = self.write_state()?;
        self.commit(&mut st, |_, _| Ok(())).map_err(|e| self.fail(e))
    }

    /// The commit protocol: sync the head's data file (and its directory if
    /// the file is new), then one redb transaction with the head's changed
    /// block records plus `extra`; then free the slots the commit stopped
    /// naming.
    pub(crate) fn commit(
        &self,
        st: &mut State,
        extra: impl FnOnce(&mut State, &redb::WriteTransaction) -> Result<()>,
    ) -> Result<()> {
        let head = st.head_mut();
        let path = head.path().to_path_buf();
        if !st.pending.is_empty()
            && let Some(f) = st.head().file()
        {
            f.sync().map_err(self.io("syncing a layer file", &path))?;
        }
        if st.head().created {
            self.disk
                .sync_dir(&self.dir)
                .map_err(self.io("syncing the replica directory", &self.dir))?;
            st.head_mut().created = false;
        }
        let tx = self.db.begin_write().map_err(meta("committing"))?;
        {
            let mut t = tx.open_table(BLOCKS).map_err(meta("committing block records"))?;
            let head = st.head();
            let groups: BTreeSet<u64> = st.pending.keys().map(|b| b >> GROUP_SHIFT).collect();
            for g in groups {
                write_group(&mut t, &self.volume, head, g)?;
            }
        }
        extra(st, &tx)?;
        tx.commit().map_err(meta("committing"))?;
        // The commit no longer names the slots the pending blocks had.
        let pending = std::mem::take(&mut st.pending);
        let head = st.head_mut();
        let mut holes = Vec::new();
        for (b, prev) in pending {
            let Some(prev) = prev.filter(|p| !p.is_zero()) else { continue };
            match head.map.get(&b) {
                Some(now) if !now.is_zero() && now.slot == prev.slot => {}
                Some(now) if !now.is_zero() => head.free.push(prev.slot),
                _ => holes.push(prev.slot),
            }
        }
        if !holes.is_empty() {
            holes.sort_unstable();
            let file = head.file().expect("freed slots live in a file").clone();
            for (start, n) in slot_runs(&holes) {
                file.punch_hole(start as u64 * BLOCK_SIZE, n as u64 * BLOCK_SIZE)
                    .map_err(self.io("freeing trimmed blocks", &path))?;
            }
            head.free.extend(holes);
        }
        Ok(())
    }

    /// Grows the replica, taking on `add_chunks` of the grown part.
    pub fn grow(&self, new_size: u64, add_chunks: &[u64]) -> Result<ReplicaInfo> {
        {
            let mut st = self.write_state()?;
            let geometry = st
                .geometry
                .grown(new_size)
                .map_err(|source| Error::Geometry { volume: self.volume.clone(), source })?;
            let mut chunks = st.chunks.clone();
            if let ChunkSet::Some(set) = &mut chunks {
                set.extend(add_chunks);
            }
            chunks
                .check(&geometry)
                .map_err(|source| Error::Geometry { volume: self.volume.clone(), source })?;
            let old = (st.geometry, st.chunks.clone());
            st.geometry = geometry;
            st.chunks = chunks;
            let volume = self.volume.clone();
            let res = self.commit(&mut st, |st, tx| {
                let mut t = tx.open_table(REPLICAS).map_err(meta("growing"))?;
                t.insert(volume.as_str(), &encode_record(&st.record())[..])
                    .map_err(meta("growing"))?;
                Ok(())
            });
            if let Err(e) = res {
                (st.geometry, st.chunks) = old;
                return Err(self.fail(e));
            }
        }
        Ok(self.info())
    }
}
