//! Snapshots of a replica: sealing the head (O(1) in the volume size: a
//! commit of what changed and a pointer move), listing, digests per chunk,
//! and deletion by folding a layer into the next.
//!
//! Invariants: a sealed layer's existing entries never change; a snapshot
//! is sealed by one redb commit (never half there) and deleted by one (gone
//! or whole); deleting snapshot k keeps the content as of every other
//! snapshot, and of the head, unchanged.

use std::collections::{BTreeMap, BTreeSet};

use cairn_api::{
    BLOCK_SIZE, SnapshotId,
    digest::{Accumulator, Digest},
    snapshot::SnapshotInfo,
};
use redb::ReadableTable;

use crate::{
    error::{Error, Result, meta},
    meta::{
        BLOCKS, CHUNK_ACC, Entry, GROUP_SHIFT, REPLICAS, SnapshotRecord, encode_accs, encode_record,
    },
    replica::layer::Layer,
    replica::{Newest, Replica, State, write_group},
};

const BS: usize = BLOCK_SIZE as usize;

fn info(layer: &Layer) -> Option<SnapshotInfo> {
    let s = layer.snapshot.as_ref()?;
    Some(SnapshotInfo {
        id: s.id.clone(),
        generation: s.generation,
        digest: Accumulator(s.acc).digest(s.size),
        size: s.size,
        changed_blocks: layer.map.len() as u64,
        sealed_at_unix: s.sealed_at_unix,
        divergent: s.divergent,
    })
}

impl Replica {
    /// Seals the head as snapshot `id` and opens an empty head.
    pub fn seal(&self, epoch: u64, id: &SnapshotId, generation: u64) -> Result<SnapshotInfo> {
        let mut st = self.write_state()?;
        self.admit(&mut st, epoch)?;
        if let Some(s) = st.layers.iter().filter_map(|l| l.snapshot.as_ref()).find(|s| &s.id == id)
        {
            return Err(Error::SnapshotExists {
                volume: self.volume.clone(),
                snapshot: id.clone(),
                generation: s.generation,
            });
        }
        // Divergent snapshots (kept from before a resync) are out of the
        // line: the generations after the shared base continue from the
        // other site's.
        let last = st
            .layers
            .iter()
            .filter_map(|l| l.snapshot.as_ref())
            .filter(|s| !s.divergent)
            .map(|s| s.generation)
            .max();
        if let Some(last) = last.filter(|&last| generation <= last) {
            return Err(Error::StaleGeneration {
                volume: self.volume.clone(),
                snapshot: id.clone(),
                generation,
                last,
            });
        }
        let record = SnapshotRecord {
            id: id.clone(),
            generation,
            size: st.geometry.size(),
            sealed_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            acc: st.total_acc.0,
            divergent: false,
        };
        let accs: BTreeMap<u64, Accumulator> = st
            .touched
            .iter()
            .map(|c| (*c, st.chunk_acc.get(c).copied().unwrap_or_default()))
            .collect();
        let volume = self.volume.clone();
        let dir = self.dir.clone();
        let rec = record.clone();
        let accs_bytes = encode_accs(&accs);
        self.commit(&mut st, |st, tx| {
            let head_no = st.head().no;
            let mut sealed = st.record();
            sealed.layers.last_mut().expect("head").snapshot = Some(rec);
            sealed.layers.push(crate::meta::LayerRecord { no: st.next_layer, snapshot: None });
            sealed.next_layer += 1;
            tx.open_table(REPLICAS)
                .map_err(meta("sealing"))?
                .insert(volume.as_str(), &encode_record(&sealed)[..])
                .map_err(meta("sealing"))?;
            if !accs_bytes.is_empty() {
                tx.open_table(CHUNK_ACC)
                    .map_err(meta("sealing"))?
                    .insert((volume.as_str(), head_no), &accs_bytes[..])
                    .map_err(meta("sealing"))?;
            }
            Ok(())
        })
        .map_err(|e| self.fail(e))?;
        // The pointer move: the head becomes the snapshot, a new head opens.
        let head = st.head_mut();
        head.snapshot = Some(record);
        head.chunk_acc = accs;
        if let Some(f) = head.file().cloned() {
            let path = head.path().to_path_buf();
            let mut free = std::mem::take(&mut head.free);
            free.sort_unstable();
            for (start, n) in crate::replica::layer::slot_runs(&free) {
                f.punch_hole(start as u64 * BLOCK_SIZE, n as u64 * BLOCK_SIZE)
                    .map_err(|e| self.fail(self.io("freeing unused slots", &path)(e)))?;
            }
        }
        head.free.clear();
        let no = st.next_layer;
        st.layers.push(Layer::new(&dir, no, None));
        st.next_layer += 1;
        st.touched.clear();
        let sealed = &st.layers[st.layers.len() - 2];
        Ok(info(sealed).expect("just sealed"))
    }

    /// Marks snapshots divergent, durably (one commit); marking one twice
    /// is a no-op. Admitted like a write (`epoch`).
    pub fn mark_divergent(&self, epoch: u64, ids: &[SnapshotId]) -> Result<()> {
        let mut st = self.write_state()?;
        self.admit(&mut st, epoch)?;
        let mut idx = Vec::with_capacity(ids.len());
        for id in ids {
            idx.push(st.snapshot_index(&self.volume, id)?);
        }
        if idx.iter().all(|&k| st.layers[k].snapshot.as_ref().is_some_and(|s| s.divergent)) {
            return Ok(());
        }
        let volume = self.volume.clone();
        let mut record = st.record();
        for &k in &idx {
            record.layers[k].snapshot.as_mut().expect("a snapshot layer").divergent = true;
        }
        self.commit(&mut st, |_, tx| {
            tx.open_table(REPLICAS)
                .map_err(meta("marking snapshots divergent"))?
                .insert(volume.as_str(), &encode_record(&record)[..])
                .map_err(meta("marking snapshots divergent"))?;
            Ok(())
        })
        .map_err(|e| self.fail(e))?;
        for &k in &idx {
            st.layers[k].snapshot.as_mut().expect("a snapshot layer").divergent = true;
        }
        Ok(())
    }

    /// The snapshots of this replica, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let st = self.read_state()?;
        Ok(st.layers.iter().filter_map(info).collect())
    }

    /// The digest of the replica's content as of `snapshot` (or the head).
    pub fn digest(&self, snapshot: Option<&SnapshotId>) -> Result<Digest> {
        let st = self.read_state()?;
        Ok(match snapshot {
            None => st.total_acc.digest(st.geometry.size()),
            Some(id) => {
                let i = st.snapshot_index(&self.volume, id)?;
                info(&st.layers[i]).expect("sealed").digest
            }
        })
    }

    /// Accumulators of `chunks` (all held chunks when empty) as of
    /// `snapshot` (or the head), for assembling a volume digest across
    /// replicas that hold different chunks.
    pub fn chunk_digests(
        &self,
        snapshot: Option<&SnapshotId>,
        chunks: &[u64],
    ) -> Result<Vec<(u64, Accumulator)>> {
        let st = self.read_state()?;
        let wanted: Vec<u64> = if chunks.is_empty() {
            st.chunks.iter(&st.geometry).collect()
        } else {
            for &c in chunks {
                self.check_chunk_held(&st, c)?;
            }
            chunks.to_vec()
        };
        Ok(match snapshot {
            None => wanted
                .iter()
                .map(|c| (*c, st.chunk_acc.get(c).copied().unwrap_or_default()))
                .collect(),
            Some(id) => {
                let top = st.snapshot_index(&self.volume, id)?;
                wanted
                    .iter()
                    .map(|c| {
                        let acc = st.layers[..=top]
                            .iter()
                            .rev()
                            .find_map(|l| l.chunk_acc.get(c).copied())
                            .unwrap_or_default();
                        (*c, acc)
                    })
                    .collect()
            }
        })
    }

    pub(crate) fn check_chunk_held(&self, st: &State, chunk: u64) -> Result<()> {
        st.geometry
            .check_chunk(chunk)
            .map_err(|source| Error::Geometry { volume: self.volume.clone(), source })?;
        if !st.chunks.contains(chunk) {
            return Err(Error::ChunkNotHeld {
                volume: self.volume.clone(),
                chunk,
                offset: chunk * st.geometry.chunk_size(),
                held: crate::replica::describe_chunks(&st.chunks),
            });
        }
        Ok(())
    }

    /// Deletes snapshot `id`: the blocks of its layer that the next layer
    /// lacks are copied into the next layer, then one commit drops the layer;
    /// its data file is removed after the commit.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let mut st = self.write_state()?;
        let k = st.snapshot_index(&self.volume, id)?;
        // Pending writes are committed first so the fold's commit names
        // only durable head state.
        self.commit(&mut st, |_, _| Ok(())).map_err(|e| self.fail(e))?;
        self.fold(&mut st, k).map_err(|e| self.fail(e))
    }

    fn fold(&self, st: &mut State, k: usize) -> Result<()> {
        let moves: Vec<(u64, Entry)> = {
            let (lower, next) = (&st.layers[k], &st.layers[k + 1]);
            lower
                .map
                .iter()
                .filter(|(b, _)| !next.map.contains_key(b))
                .map(|(b, e)| (*b, *e))
                .collect()
        };
        // Copy the data of moved blocks into fresh slots of the next layer,
        // checking each block's CRC on the way: a corrupt block is not
        // propagated.
        let mut placed: Vec<(u64, Entry)> = Vec::with_capacity(moves.len());
        let data_moves: Vec<&(u64, Entry)> = moves.iter().filter(|(_, e)| !e.is_zero()).collect();
        if !data_moves.is_empty() {
            let src = st.layers[k].file().expect("a layer with data has a file").clone();
            let (lower_path, next_path) =
                (st.layers[k].path().to_path_buf(), st.layers[k + 1].path().to_path_buf());
            let dst = st.layers[k + 1]
                .file_for_write(self.disk.as_ref())
                .map_err(self.io("creating a layer file", &next_path))?;
            let mut buf = vec![0u8; 256 * BS];
            for batch in data_moves.chunks(256) {
                let start = st.layers[k + 1].alloc_run(batch.len() as u32);
                for (j, (b, e)) in batch.iter().enumerate() {
                    let d = &mut buf[j * BS..(j + 1) * BS];
                    src.read_at(d, e.slot as u64 * BLOCK_SIZE)
                        .map_err(self.io("reading blocks to fold", &lower_path))?;
                    self.verify(st, *b, d, e, &st.layers[k])?;
                    placed.push((*b, Entry { slot: start + j as u32, ..*e }));
                }
                dst.write_at(&buf[..batch.len() * BS], start as u64 * BLOCK_SIZE)
                    .map_err(self.io("writing folded blocks", &next_path))?;
            }
            dst.sync().map_err(self.io("syncing a layer file", &next_path))?;
        }
        if st.layers[k + 1].created {
            self.disk
                .sync_dir(&self.dir)
                .map_err(self.io("syncing the replica directory", &self.dir))?;
            st.layers[k + 1].created = false;
        }
        placed.extend(moves.iter().filter(|(_, e)| e.is_zero()).copied());
        // One commit: the next layer's records with the moved blocks, the
        // layer's records gone, the chunk accumulators moved up.
        let (lower_no, next_no) = (st.layers[k].no, st.layers[k + 1].no);
        let next_sealed = st.layers[k + 1].is_sealed();
        let mut next_accs = st.layers[k + 1].chunk_acc.clone();
        for (c, a) in &st.layers[k].chunk_acc {
            next_accs.entry(*c).or_insert(*a);
        }
        for (b, e) in &placed {
            st.layers[k + 1].map.insert(*b, *e);
        }
        let mut record = st.record();
        record.layers.remove(k);
        let tx = self.db.begin_write().map_err(meta("deleting a snapshot"))?;
        {
            let mut t = tx.open_table(BLOCKS).map_err(meta("deleting a snapshot"))?;
            let groups: BTreeSet<u64> = placed.iter().map(|(b, _)| b >> GROUP_SHIFT).collect();
            for g in groups {
                write_group(&mut t, &self.volume, &st.layers[k + 1], g)?;
            }
            let v = self.volume.as_str();
            let keys: Vec<u64> = t
                .range((v, lower_no, 0)..=(v, lower_no, u64::MAX))
                .map_err(meta("deleting a snapshot"))?
                .map(|r| r.map(|(k, _)| k.value().2))
                .collect::<Result<_, _>>()
                .map_err(meta("deleting a snapshot"))?;
            for g in keys {
                t.remove((v, lower_no, g)).map_err(meta("deleting a snapshot"))?;
            }
            let mut a = tx.open_table(CHUNK_ACC).map_err(meta("deleting a snapshot"))?;
            a.remove((v, lower_no)).map_err(meta("deleting a snapshot"))?;
            if next_sealed && !next_accs.is_empty() {
                a.insert((v, next_no), &encode_accs(&next_accs)[..])
                    .map_err(meta("deleting a snapshot"))?;
            }
            tx.open_table(REPLICAS)
                .map_err(meta("deleting a snapshot"))?
                .insert(v, &encode_record(&record)[..])
                .map_err(meta("deleting a snapshot"))?;
        }
        tx.commit().map_err(meta("deleting a snapshot"))?;
        // Memory follows the commit.
        if next_sealed {
            st.layers[k + 1].chunk_acc = next_accs;
        } else {
            let lower_chunks: Vec<u64> = st.layers[k].chunk_acc.keys().copied().collect();
            st.touched.extend(lower_chunks);
        }
        for (b, e) in &placed {
            if let Some(n) = st.merged.get_mut(b)
                && n.layer == lower_no
            {
                *n = Newest { layer: next_no, entry: *e };
            }
        }
        let removed = st.layers.remove(k);
        self.disk
            .remove_file(removed.path())
            .map_err(self.io("removing a layer file", removed.path()))?;
        Ok(())
    }
}
