//! Recovery: loading a replica from its record, block records and data
//! files when the store opens (or a replica is reopened), checking that they
//! agree, and tidying what a crash can leave behind: data past the last
//! committed slot, unnamed slots, orphan layer files.
//!
//! Invariant: after a load the in-memory state is exactly the last committed
//! state; anything a commit did not name is freed, never served.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc};

use cairn_api::{BLOCK_SIZE, VolumeId, digest::BlockHash};
use redb::ReadableDatabase;

use crate::{
    disk::Disk,
    error::{Error, Result, meta},
    meta::{BLOCKS, CHUNK_ACC, Entry, GROUP_SHIFT, ReplicaRecord, decode_accs, decode_group},
    replica::layer::{Layer, data_path, parse_data_name, slot_runs},
    replica::{Newest, Replica, State},
};

impl Replica {
    /// Loads a replica from its record, its block records and its data
    /// files, checking that they agree, and tidies what a crash left behind:
    /// data past the last committed slot, unnamed slots, orphan layer files.
    pub(crate) fn load(
        volume: VolumeId,
        dir: PathBuf,
        disk: Arc<dyn Disk>,
        db: Arc<redb::Database>,
        record: ReplicaRecord,
    ) -> Result<Self> {
        let corrupt = |detail: String| Error::Corrupt { volume: volume.to_string(), detail };
        let io = |op, path: &std::path::Path, e| Error::Io {
            volume: volume.clone(),
            op,
            path: path.to_path_buf(),
            source: e,
        };
        if record.layers.last().is_none_or(|l| l.snapshot.is_some()) {
            return Err(corrupt("the newest layer is not an open head".into()));
        }
        let tx = db.begin_read().map_err(meta("loading a replica"))?;
        let blocks = tx.open_table(BLOCKS).ok();
        let accs = tx.open_table(CHUNK_ACC).ok();
        let mut layers = Vec::with_capacity(record.layers.len());
        for lr in &record.layers {
            let mut layer = Layer::new(&dir, lr.no, lr.snapshot.clone());
            if let Some(t) = &blocks {
                let range = (volume.as_str(), lr.no, 0)..=(volume.as_str(), lr.no, u64::MAX);
                for row in t.range(range).map_err(meta("loading block records"))? {
                    let (k, v) = row.map_err(meta("loading block records"))?;
                    let group = k.value().2;
                    let entries = decode_group(v.value()).ok_or_else(|| {
                        corrupt(format!(
                            "block record of layer {} group {group} is malformed",
                            lr.no
                        ))
                    })?;
                    for (off, e) in entries {
                        layer.map.insert((group << GROUP_SHIFT) + off, e);
                    }
                }
            }
            if let (Some(t), true) = (&accs, lr.snapshot.is_some())
                && let Some(v) =
                    t.get((volume.as_str(), lr.no)).map_err(meta("loading digest records"))?
            {
                layer.chunk_acc = decode_accs(v.value()).ok_or_else(|| {
                    corrupt(format!("digest record of layer {} is malformed", lr.no))
                })?;
            }
            layer
                .open_file(disk.as_ref())
                .map_err(|e| io("opening a layer file", layer.path(), e))?;
            let (free, want_len) = layer.rebuild_slots();
            match layer.file().cloned() {
                None if want_len > 0 => {
                    return Err(corrupt(format!(
                        "layer {} names {} data blocks but its file {} is missing",
                        lr.no,
                        layer.data_blocks(),
                        layer.path().display()
                    )));
                }
                None => {}
                Some(f) => {
                    let len = f
                        .len()
                        .map_err(|e| io("reading a layer file's length", layer.path(), e))?;
                    if len < want_len {
                        return Err(corrupt(format!(
                            "layer file {} is {len} bytes but its blocks need {want_len}",
                            layer.path().display()
                        )));
                    }
                    if len > want_len {
                        f.set_len(want_len)
                            .map_err(|e| io("trimming a layer file", layer.path(), e))?;
                    }
                    for (start, n) in slot_runs(&free) {
                        f.punch_hole(start as u64 * BLOCK_SIZE, n as u64 * BLOCK_SIZE)
                            .map_err(|e| io("freeing unused slots", layer.path(), e))?;
                    }
                }
            }
            if layer.is_sealed() {
                layer.free.clear();
            }
            layers.push(layer);
        }
        drop((blocks, accs, tx));
        // Files no record names: a layer deleted or never committed.
        let known: BTreeSet<u64> = layers.iter().map(|l| l.no).collect();
        let names =
            disk.list_dir(&dir).map_err(|e| io("listing the replica directory", &dir, e))?;
        let mut removed = false;
        for name in names {
            if let Some(no) = parse_data_name(&name).filter(|no| !known.contains(no)) {
                let path = data_path(&dir, no);
                disk.remove_file(&path)
                    .map_err(|e| io("removing an orphan layer file", &path, e))?;
                removed = true;
            }
        }
        if removed {
            disk.sync_dir(&dir).map_err(|e| io("syncing the replica directory", &dir, e))?;
        }
        let mut state =
            State::new(record.geometry, record.chunks, layers, record.next_layer, record.epoch);
        state.epoch_head = record.epoch_head;
        state.in_sync = record.in_sync;
        for li in 0..state.layers.len() {
            let no = state.layers[li].no;
            let entries: Vec<(u64, Entry)> =
                state.layers[li].map.iter().map(|(b, e)| (*b, *e)).collect();
            for (b, e) in entries {
                if e.is_zero() {
                    state.merged.remove(&b);
                } else {
                    state.merged.insert(b, Newest { layer: no, entry: e });
                }
            }
        }
        let hashes: Vec<(u64, BlockHash)> =
            state.merged.iter().map(|(b, n)| (*b, n.entry.hash)).collect();
        for (b, h) in hashes {
            state.add(b, &h);
        }
        let geometry = state.geometry;
        state.touched = state.head().map.keys().map(|&b| geometry.chunk_of(b)).collect();
        Ok(Self::from_state(volume, dir, disk, db, state))
    }
}
