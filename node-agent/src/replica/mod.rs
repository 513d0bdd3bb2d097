//! A replica: the chunks of one volume that this agent holds, as a stack of
//! layers (sealed snapshots, then the open head), with an index from each
//! block to its newest version so reads do not slow down as snapshots pile
//! up.
//!
//! Invariant: the durable state (redb + synced data files) changes only at a
//! commit (flush, seal, snapshot deletion, growth); after a crash the replica
//! is exactly as of the last commit that returned, or of the one under way.
//! Writes put data into slots no commit names; `commit` makes them durable
//! and `recovery` loads what the last commit left.

pub mod commit;
pub mod extent;
pub mod in_sync;
pub mod layer;
pub mod recovery;
pub mod snapshot;
pub mod stream;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError},
};

use cairn_api::{
    BLOCK_SIZE, BlockRange, ChunkSet, Geometry, SnapshotId, VolumeId,
    block::{MAX_IO_BYTES, MAX_TRIM_BYTES},
    digest::{Accumulator, BlockHash, is_zero},
    snapshot::{InSyncRecord, ReplicaInfo},
};

use crate::{
    disk::Disk,
    error::{Error, Result, meta},
    meta::{
        Entry, GROUP_BLOCKS, GROUP_SHIFT, LayerRecord, REPLICAS, ReplicaRecord, encode_group,
        encode_record,
    },
    replica::layer::Layer,
};

const BS: usize = BLOCK_SIZE as usize;
/// Requests at least this large hash and check blocks on every core.
pub(crate) const PARALLEL_BYTES: usize = 128 << 10;

/// The newest version of a block, as the head sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Newest {
    pub layer: u64,
    pub entry: Entry,
}

#[derive(Debug)]
pub(crate) struct State {
    pub geometry: Geometry,
    pub chunks: ChunkSet,
    /// Sealed layers oldest first, then the head (always last).
    pub layers: Vec<Layer>,
    pub next_layer: u64,
    /// Block -> newest data version (zero blocks are absent).
    pub merged: BTreeMap<u64, Newest>,
    /// Chunk -> accumulator of the head's content.
    pub chunk_acc: BTreeMap<u64, Accumulator>,
    pub total_acc: Accumulator,
    /// Blocks changed in the head since the last commit -> the head entry
    /// the last commit named (whose slot is freed once the next commit
    /// lands).
    pub pending: BTreeMap<u64, Option<Entry>>,
    /// Chunks changed in the head layer since the last seal.
    pub touched: BTreeSet<u64>,
    /// The highest head epoch admitted (durable in the record).
    pub epoch: u64,
    /// The head that fenced at `epoch` (durable; empty: none recorded).
    pub epoch_head: String,
    /// The in-sync set last recorded by a head (durable; `None`: a record
    /// from before it existed).
    pub in_sync: Option<InSyncRecord>,
}

/// One replica on this agent.
#[derive(Debug)]
pub struct Replica {
    pub(crate) volume: VolumeId,
    pub(crate) dir: PathBuf,
    pub(crate) disk: Arc<dyn Disk>,
    pub(crate) db: Arc<redb::Database>,
    pub(crate) state: RwLock<State>,
    /// Changes on every load and create (see `in_sync`): a head that wrote
    /// to one incarnation never takes another for it.
    pub(crate) incarnation: u64,
    /// Why the replica stopped serving, after an I/O error.
    failed: Mutex<Option<String>>,
}

/// Per-block facts computed before taking the lock.
struct Incoming {
    crc: u32,
    hash: BlockHash,
    zero: bool,
}

impl State {
    /// A state with `layers` and nothing indexed yet.
    pub fn new(
        geometry: Geometry,
        chunks: ChunkSet,
        layers: Vec<Layer>,
        next_layer: u64,
        epoch: u64,
    ) -> Self {
        State {
            geometry,
            chunks,
            layers,
            next_layer,
            merged: BTreeMap::new(),
            chunk_acc: BTreeMap::new(),
            total_acc: Accumulator::default(),
            pending: BTreeMap::new(),
            touched: BTreeSet::new(),
            epoch,
            epoch_head: String::new(),
            in_sync: None,
        }
    }

    pub fn head(&self) -> &Layer {
        self.layers.last().expect("a replica always has a head layer")
    }

    pub fn head_mut(&mut self) -> &mut Layer {
        self.layers.last_mut().expect("a replica always has a head layer")
    }

    pub fn layer_index(&self, no: u64) -> usize {
        self.layers.binary_search_by_key(&no, |l| l.no).expect("merged index names a live layer")
    }

    pub fn snapshot_index(&self, volume: &VolumeId, id: &SnapshotId) -> Result<usize> {
        self.layers
            .iter()
            .position(|l| l.snapshot.as_ref().is_some_and(|s| &s.id == id))
            .ok_or_else(|| Error::SnapshotNotFound { volume: volume.clone(), snapshot: id.clone() })
    }

    pub fn record(&self) -> ReplicaRecord {
        ReplicaRecord {
            geometry: self.geometry,
            chunks: self.chunks.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| LayerRecord { no: l.no, snapshot: l.snapshot.clone() })
                .collect(),
            next_layer: self.next_layer,
            epoch: self.epoch,
            epoch_head: self.epoch_head.clone(),
            in_sync: self.in_sync.clone(),
        }
    }

    /// Adds `add` and removes `sub` from chunk `chunk`'s accumulator (a
    /// chunk of `u64::MAX` is "none yet").
    fn apply_delta(&mut self, chunk: u64, add: &Accumulator, sub: &Accumulator) {
        if chunk == u64::MAX || (add.is_empty() && sub.is_empty()) {
            return;
        }
        let acc = self.chunk_acc.entry(chunk).or_default();
        acc.merge(add);
        acc.unmerge(sub);
        self.total_acc.merge(add);
        self.total_acc.unmerge(sub);
        self.touched.insert(chunk);
    }

    pub(crate) fn add(&mut self, block: u64, hash: &BlockHash) {
        let chunk = self.geometry.chunk_of(block);
        self.chunk_acc.entry(chunk).or_default().add(hash);
        self.total_acc.add(hash);
    }
}

impl Replica {
    /// Creates the replica's directory and record. Write order: directory
    /// (synced), then the record; a directory without a record is removed
    /// at the next open.
    pub(crate) fn create(
        volume: VolumeId,
        dir: PathBuf,
        disk: Arc<dyn Disk>,
        db: Arc<redb::Database>,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> Result<Self> {
        let io = |op, e| Error::Io { volume: volume.clone(), op, path: dir.clone(), source: e };
        disk.create_dir_all(&dir).map_err(|e| io("creating the replica directory", e))?;
        let parent = dir.parent().expect("replica dirs live under the data dir");
        disk.sync_dir(parent).map_err(|e| io("syncing the volumes directory", e))?;
        let mut state = State::new(geometry, chunks, vec![Layer::new(&dir, 1, None)], 2, 0);
        // A new replica knows of no acknowledged write: version (0, 0), no
        // members (see docs/design.md, "Durable replica state").
        state.in_sync = Some(InSyncRecord::default());
        let tx = db.begin_write().map_err(meta("creating a replica"))?;
        {
            let mut t = tx.open_table(REPLICAS).map_err(meta("creating a replica"))?;
            t.insert(volume.as_str(), &encode_record(&state.record())[..])
                .map_err(meta("creating a replica"))?;
        }
        tx.commit().map_err(meta("creating a replica"))?;
        Ok(Self::from_state(volume, dir, disk, db, state))
    }

    pub(crate) fn from_state(
        volume: VolumeId,
        dir: PathBuf,
        disk: Arc<dyn Disk>,
        db: Arc<redb::Database>,
        state: State,
    ) -> Self {
        Replica {
            volume,
            dir,
            disk,
            db,
            state: RwLock::new(state),
            incarnation: in_sync::new_incarnation(),
            failed: Mutex::new(None),
        }
    }

    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    pub(crate) fn read_state(&self) -> Result<RwLockReadGuard<'_, State>> {
        self.check_serving()?;
        Ok(self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn write_state(&self) -> Result<RwLockWriteGuard<'_, State>> {
        self.check_serving()?;
        Ok(self.state.write().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn check_serving(&self) -> Result<()> {
        match &*self.failed.lock().unwrap() {
            None => Ok(()),
            Some(reason) => {
                Err(Error::NotServing { volume: self.volume.clone(), reason: reason.clone() })
            }
        }
    }

    /// Admits a request of head epoch `epoch`: a lower epoch than the one
    /// admitted before is refused; a higher one is made durable first, so
    /// the older head stays fenced across restarts.
    pub(crate) fn admit(&self, st: &mut State, epoch: u64) -> Result<()> {
        if epoch < st.epoch {
            return Err(Error::StaleEpoch {
                volume: self.volume.clone(),
                request: epoch,
                current: st.epoch,
            });
        }
        if epoch > st.epoch {
            let mut record = st.record();
            record.epoch = epoch;
            record.epoch_head.clear();
            self.commit_record(&record, "raising the epoch")?;
            st.epoch = epoch;
            st.epoch_head.clear();
        }
        Ok(())
    }

    /// Commits `record` (the replica record alone) in one transaction.
    pub(crate) fn commit_record(&self, record: &ReplicaRecord, op: &'static str) -> Result<()> {
        let tx = self.db.begin_write().map_err(meta(op))?;
        tx.open_table(REPLICAS)
            .map_err(meta(op))?
            .insert(self.volume.as_str(), &encode_record(record)[..])
            .map_err(meta(op))?;
        tx.commit().map_err(|e| self.fail(meta(op)(e)))
    }

    /// Stops serving for good: the store replaced this handle by a reloaded
    /// one, so nothing may be written through this one.
    pub(crate) fn retire(&self, why: &str) {
        *self.failed.lock().unwrap() = Some(why.to_string());
    }

    /// Stops serving after an I/O or metadata error: the in-memory state may
    /// no longer match the disk, so nothing more is served until reopened.
    pub(crate) fn fail(&self, e: Error) -> Error {
        if matches!(e, Error::Io { .. } | Error::Meta { .. }) {
            let mut f = self.failed.lock().unwrap();
            if f.is_none() {
                tracing::error!(volume = %self.volume, error = %e, "replica stops serving");
                *f = Some(e.to_string());
            }
        }
        e
    }

    pub(crate) fn io(
        &self,
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let volume = self.volume.clone();
        let path = path.to_path_buf();
        move |source| Error::Io { volume, op, path, source }
    }

    pub fn info(&self) -> ReplicaInfo {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        ReplicaInfo {
            volume: self.volume.clone(),
            geometry: st.geometry,
            chunks: st.chunks.clone(),
            sealed_layers: st.layers.len() as u32 - 1,
            epoch: st.epoch,
            head_blocks: st.head().map.len() as u64,
            used_bytes: st.layers.iter().map(|l| l.data_blocks()).sum::<u64>() * BLOCK_SIZE,
            serving: self.failed.lock().unwrap().is_none(),
            incarnation: self.incarnation,
            in_sync: st.in_sync.clone(),
        }
    }

    /// Each layer's snapshot id (`None` for the head) and block count,
    /// oldest first; available even when the replica is not serving.
    pub fn layer_summary(&self) -> Vec<(Option<SnapshotId>, u64)> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.layers
            .iter()
            .map(|l| (l.snapshot.as_ref().map(|s| s.id.clone()), l.map.len() as u64))
            .collect()
    }

    /// Checks a byte range against `size` and the chunks held.
    pub(crate) fn check_range(
        &self,
        st: &State,
        offset: u64,
        len: u64,
        max: u64,
        size: u64,
    ) -> Result<BlockRange> {
        let geometry = if size == st.geometry.size() {
            st.geometry
        } else {
            Geometry::new(size, st.geometry.chunk_size())
                .map_err(|source| Error::Geometry { volume: self.volume.clone(), source })?
        };
        let range = geometry
            .range(offset, len, max)
            .map_err(|source| Error::Range { volume: self.volume.clone(), source })?;
        if let ChunkSet::Some(held) = &st.chunks {
            let (first, last) =
                (geometry.chunk_of(range.start()), geometry.chunk_of(range.end() - 1));
            if let Some(c) = (first..=last).find(|c| !held.contains(c)) {
                return Err(Error::ChunkNotHeld {
                    volume: self.volume.clone(),
                    chunk: c,
                    offset: c * geometry.chunk_size(),
                    held: describe_chunks(&st.chunks),
                });
            }
        }
        Ok(range)
    }

    /// Writes whole blocks into the head layer (durable at the next flush).
    /// `epoch` is the writing head's epoch (0 outside any head).
    pub fn write(&self, epoch: u64, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) || len == 0 {
            let st = self.read_state()?;
            self.check_range(&st, offset, len, MAX_IO_BYTES, st.geometry.size())?;
        }
        // Checksums are computed before taking the lock. Block hashes of a
        // small write too; those of a large one are computed under the lock
        // while its data is written to the file (on the other cores).
        let large = data.len() >= PARALLEL_BYTES;
        let first = offset / BLOCK_SIZE;
        let check = |(i, d): (usize, &[u8])| {
            let zero = is_zero(d);
            let hash = if zero || large {
                BlockHash::default()
            } else {
                BlockHash::of(first + i as u64, d)
            };
            Incoming { crc: crc32c::crc32c(d), hash, zero }
        };
        let mut incoming: Vec<Incoming> = if large {
            use rayon::prelude::*;
            data.par_chunks_exact(BS).enumerate().map(check).collect()
        } else {
            data.chunks_exact(BS).enumerate().map(check).collect()
        };
        let mut st = self.write_state()?;
        let range = self.check_range(&st, offset, len, MAX_IO_BYTES, st.geometry.size())?;
        self.admit(&mut st, epoch)?;
        self.apply_write(&mut st, range, data, &mut incoming, large).map_err(|e| self.fail(e))
    }

    /// [`Replica::write`] of fewer than [`PARALLEL_BYTES`], if it can be done
    /// at once: the replica's lock is free and `epoch` is admitted already
    /// (raising it is a commit). `None`, with nothing done, otherwise. For
    /// async threads, which must not wait behind a commit: a small write
    /// costs a few microseconds, less than handing it to another thread.
    pub fn try_write(&self, epoch: u64, offset: u64, data: &[u8]) -> Option<Result<()>> {
        if data.len() >= PARALLEL_BYTES {
            return None;
        }
        if let Err(e) = self.check_serving() {
            return Some(Err(e));
        }
        let mut st = match self.state.try_write() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        if epoch > st.epoch {
            return None;
        }
        let mut run = || {
            let size = st.geometry.size();
            let range = self.check_range(&st, offset, data.len() as u64, MAX_IO_BYTES, size)?;
            self.admit(&mut st, epoch)?;
            let first = offset / BLOCK_SIZE;
            let mut incoming: Vec<Incoming> = data
                .chunks_exact(BS)
                .enumerate()
                .map(|(i, d)| {
                    let zero = is_zero(d);
                    let hash = if zero {
                        BlockHash::default()
                    } else {
                        BlockHash::of(first + i as u64, d)
                    };
                    Incoming { crc: crc32c::crc32c(d), hash, zero }
                })
                .collect();
            self.apply_write(&mut st, range, data, &mut incoming, false).map_err(|e| self.fail(e))
        };
        Some(run())
    }

    fn apply_write(
        &self,
        st: &mut State,
        range: BlockRange,
        data: &[u8],
        incoming: &mut [Incoming],
        hash_now: bool,
    ) -> Result<()> {
        // 1. Look each block up once: its head entry and, if it changed since
        //    the last commit, the entry that commit named. Choose a slot for
        //    each data block: its own fresh slot if it was written since the
        //    last commit, else one no commit names.
        struct Seen {
            cur: Option<Entry>,
            pending: Option<Option<Entry>>,
            slot: Option<u32>,
        }
        let mut seen: Vec<Seen> = Vec::with_capacity(incoming.len());
        let mut need_new = Vec::new();
        for (i, inc) in incoming.iter().enumerate() {
            let b = range.start() + i as u64;
            let cur = st.head().map.get(&b).copied();
            let pending = st.pending.get(&b).copied();
            let fresh = cur.filter(|e| {
                !e.is_zero() && pending.is_some_and(|prev| prev.is_none_or(|p| p.slot != e.slot))
            });
            let slot = match (inc.zero, fresh) {
                (true, _) => None,
                (false, Some(e)) => Some(e.slot),
                (false, None) => {
                    need_new.push(i);
                    None
                }
            };
            seen.push(Seen { cur, pending, slot });
        }
        if !need_new.is_empty() {
            let head = st.head_mut();
            let from_free = need_new.len().min(head.free.len());
            let run_start = head.alloc_run((need_new.len() - from_free) as u32);
            for (k, &i) in need_new.iter().enumerate() {
                seen[i].slot = Some(if k < from_free {
                    head.alloc()
                } else {
                    run_start + (k - from_free) as u32
                });
            }
        }
        // 2. Write the data, one file write per run of consecutive slots,
        //    while the other cores hash the blocks if that is still to do.
        let mut file = None;
        if seen.iter().any(|s| s.slot.is_some()) {
            let head = st.head_mut();
            let path = head.path().to_path_buf();
            let f = head
                .file_for_write(self.disk.as_ref())
                .map_err(self.io("creating a layer file", &path))?;
            file = Some((f, path));
        }
        let write_runs = || -> Result<()> {
            let Some((file, path)) = &file else { return Ok(()) };
            let mut i = 0;
            while i < seen.len() {
                let Some(first) = seen[i].slot else {
                    i += 1;
                    continue;
                };
                let mut n = 1;
                while i + n < seen.len() && seen[i + n].slot == Some(first + n as u32) {
                    n += 1;
                }
                file.write_at(&data[i * BS..(i + n) * BS], first as u64 * BLOCK_SIZE)
                    .map_err(self.io("writing blocks", path))?;
                i += n;
            }
            Ok(())
        };
        if hash_now {
            use rayon::prelude::*;
            let start = range.start();
            let (written, ()) = rayon::join(write_runs, || {
                incoming.par_iter_mut().enumerate().filter(|(_, inc)| !inc.zero).for_each(
                    |(i, inc)| {
                        inc.hash = BlockHash::of(start + i as u64, &data[i * BS..(i + 1) * BS])
                    },
                )
            });
            written?;
        } else {
            write_runs()?;
        }
        // 3. Index the new versions; sum the digest changes per chunk and
        //    apply them once per chunk.
        let head_no = st.head().no;
        let mut chunk = u64::MAX;
        let mut delta_add = Accumulator::default();
        let mut delta_sub = Accumulator::default();
        for (i, (inc, s)) in incoming.iter().zip(&seen).enumerate() {
            let b = range.start() + i as u64;
            let entry = match s.slot {
                Some(slot) => Entry { slot, crc: inc.crc, hash: inc.hash },
                None => Entry::zero(),
            };
            let prev_newest = if entry.is_zero() {
                if s.cur.is_none_or(|e| e.is_zero()) && !st.merged.contains_key(&b) {
                    continue; // already reads as zeros and nothing to shadow
                }
                st.merged.remove(&b)
            } else {
                st.merged.insert(b, Newest { layer: head_no, entry })
            };
            match s.pending {
                None => {
                    st.pending.insert(b, s.cur);
                }
                Some(committed) => {
                    // A fresh slot that no commit names is reusable at once
                    // when the block becomes zero.
                    if let (true, Some(c)) = (entry.is_zero(), s.cur.filter(|e| !e.is_zero()))
                        && committed.is_none_or(|p| p.slot != c.slot)
                    {
                        st.head_mut().free.push(c.slot);
                    }
                }
            }
            st.head_mut().map.insert(b, entry);
            let c = st.geometry.chunk_of(b);
            if c != chunk {
                st.apply_delta(chunk, &delta_add, &delta_sub);
                (chunk, delta_add, delta_sub) = (c, Accumulator::default(), Accumulator::default());
            }
            if let Some(prev) = prev_newest {
                delta_sub.add(&prev.entry.hash);
            }
            if !entry.is_zero() {
                delta_add.add(&entry.hash);
            }
        }
        st.apply_delta(chunk, &delta_add, &delta_sub);
        Ok(())
    }

    /// Trims whole blocks: they read as zeros afterwards.
    pub fn trim(&self, epoch: u64, offset: u64, len: u64) -> Result<()> {
        let mut st = self.write_state()?;
        let range = self.check_range(&st, offset, len, MAX_TRIM_BYTES, st.geometry.size())?;
        self.admit(&mut st, epoch)?;
        // Only blocks that hold data change: the rest already read as zeros.
        let written: Vec<u64> = st.merged.range(range.blocks()).map(|(b, _)| *b).collect();
        let zero = vec![0u8; BS];
        let mut inc = [Incoming {
            crc: crate::meta::zero_block_crc(),
            hash: BlockHash::default(),
            zero: true,
        }];
        for b in written {
            let one =
                st.geometry.range(b * BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE).expect("block in range");
            self.apply_write(&mut st, one, &zero, &mut inc, false).map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    pub(crate) fn verify(
        &self,
        st: &State,
        block: u64,
        data: &[u8],
        e: &Entry,
        layer: &Layer,
    ) -> Result<()> {
        let actual = crc32c::crc32c(data);
        if actual == e.crc {
            return Ok(());
        }
        Err(Error::Checksum {
            volume: self.volume.clone(),
            chunk: st.geometry.chunk_of(block),
            offset: block * BLOCK_SIZE,
            layer: describe_layer(layer),
            stored: e.crc,
            actual,
        })
    }
}

/// Rewrites the record of group `g` of `layer` from its in-memory map.
pub(crate) fn write_group(
    t: &mut redb::Table<(&str, u64, u64), &[u8]>,
    volume: &VolumeId,
    layer: &Layer,
    g: u64,
) -> Result<()> {
    let start = g << GROUP_SHIFT;
    let bytes =
        encode_group(layer.map.range(start..start + GROUP_BLOCKS).map(|(b, e)| (b - start, e)));
    let key = (volume.as_str(), layer.no, g);
    if bytes.is_empty() {
        t.remove(key).map_err(meta("writing block records"))?;
    } else {
        t.insert(key, &bytes[..]).map_err(meta("writing block records"))?;
    }
    Ok(())
}

pub(crate) fn describe_layer(layer: &Layer) -> String {
    match &layer.snapshot {
        Some(s) => format!("snapshot {}", s.id),
        None => "head layer".into(),
    }
}

pub(crate) fn describe_chunks(chunks: &ChunkSet) -> String {
    match chunks {
        ChunkSet::All => "all chunks".into(),
        ChunkSet::Some(s) if s.len() <= 8 => {
            format!("chunks {:?}", s.iter().collect::<Vec<_>>())
        }
        ChunkSet::Some(s) => format!("{} chunks", s.len()),
    }
}
