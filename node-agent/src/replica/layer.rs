//! One layer of a replica: the blocks it received between two snapshots, their
//! slots in the layer's data file, and (for a sealed layer) the digest
//! accumulators of the chunks that changed in it.
//!
//! Invariant: a slot named by a committed entry is never written again; new
//! data goes to a slot that no committed entry names (a fresh slot past the
//! high-water mark, or one freed by a commit that no longer names it).

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use cairn_api::{BLOCK_SIZE, digest::Accumulator};

use crate::{
    disk::{Disk, DiskFile},
    meta::{Entry, SnapshotRecord},
};

#[derive(Debug)]
pub struct Layer {
    pub no: u64,
    /// `Some` once sealed: then this layer is a snapshot.
    pub snapshot: Option<SnapshotRecord>,
    /// Block index -> where the block is, for every block of this layer.
    pub map: BTreeMap<u64, Entry>,
    /// Digest accumulators as of this snapshot of the chunks that changed in
    /// this layer (sealed layers only).
    pub chunk_acc: BTreeMap<u64, Accumulator>,
    path: PathBuf,
    file: Option<Arc<dyn DiskFile>>,
    /// Slots in use or written since the last commit: the data file's
    /// high-water mark in blocks.
    pub high_water: u32,
    /// Slots no committed entry names, ready for reuse.
    pub free: Vec<u32>,
    /// The data file was created and its directory entry is not yet durable.
    pub created: bool,
}

/// The data file of layer `no` in `dir`.
pub fn data_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}.layer"))
}

/// The layer number of a data file name, if it is one.
pub fn parse_data_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".layer")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

impl Layer {
    pub fn new(dir: &Path, no: u64, snapshot: Option<SnapshotRecord>) -> Self {
        Layer {
            no,
            snapshot,
            map: BTreeMap::new(),
            chunk_acc: BTreeMap::new(),
            path: data_path(dir, no),
            file: None,
            high_water: 0,
            free: Vec::new(),
            created: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_sealed(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Blocks of this layer that hold data (not zero blocks).
    pub fn data_blocks(&self) -> u64 {
        self.map.values().filter(|e| !e.is_zero()).count() as u64
    }

    /// The open data file, if the layer has one.
    pub fn file(&self) -> Option<&Arc<dyn DiskFile>> {
        self.file.as_ref()
    }

    /// Opens the data file of a layer loaded from disk, if it exists.
    pub fn open_file(&mut self, disk: &dyn Disk) -> io::Result<()> {
        if disk.exists(&self.path) {
            self.file = Some(disk.open(&self.path, false)?);
        }
        Ok(())
    }

    /// The data file, created on first use.
    pub fn file_for_write(&mut self, disk: &dyn Disk) -> io::Result<Arc<dyn DiskFile>> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        let f = disk.open(&self.path, true)?;
        self.created = true;
        self.file = Some(f.clone());
        Ok(f)
    }

    /// A slot no committed entry names.
    pub fn alloc(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.high_water += 1;
            self.high_water - 1
        })
    }

    /// `n` consecutive fresh slots past the high-water mark (for sequential
    /// writes, so they become one file write).
    pub fn alloc_run(&mut self, n: u32) -> u32 {
        let start = self.high_water;
        self.high_water += n;
        start
    }

    /// After loading: recomputes the high-water mark and the free slots from
    /// the entries, and returns the free slots (to punch) and the length the
    /// file should have.
    pub fn rebuild_slots(&mut self) -> (Vec<u32>, u64) {
        let mut used: Vec<u32> =
            self.map.values().filter(|e| !e.is_zero()).map(|e| e.slot).collect();
        used.sort_unstable();
        self.high_water = used.last().map_or(0, |&s| s + 1);
        let mut free = Vec::new();
        let mut next = 0u32;
        for s in used {
            free.extend(next..s);
            next = s + 1;
        }
        self.free = free.clone();
        (free, self.high_water as u64 * BLOCK_SIZE)
    }
}

/// Groups `slots` (sorted) into runs of consecutive slots: (first, count).
pub fn slot_runs(slots: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &s in slots {
        match runs.last_mut() {
            Some((start, n)) if *start + *n == s => *n += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Entry;

    #[test]
    fn data_names_round_trip() {
        let p = data_path(Path::new("/v"), 0x1f);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_data_name(name), Some(0x1f));
        assert_eq!(parse_data_name("x.layer"), None);
        assert_eq!(parse_data_name("000000000000001f.tmp"), None);
    }

    #[test]
    fn rebuild_finds_holes_and_high_water() {
        let mut l = Layer::new(Path::new("/v"), 1, None);
        for (b, slot) in [(10, 0), (11, 3), (12, 4)] {
            l.map.insert(b, Entry { slot, crc: 0, hash: Default::default() });
        }
        l.map.insert(13, Entry::zero());
        let (free, len) = l.rebuild_slots();
        assert_eq!(free, vec![1, 2]);
        assert_eq!(len, 5 * BLOCK_SIZE);
        assert_eq!(l.alloc(), 2);
        assert_eq!(l.alloc(), 1);
        assert_eq!(l.alloc(), 5);
        assert_eq!(slot_runs(&[1, 2, 3, 7, 8, 10]), vec![(1, 3), (7, 2), (10, 1)]);
    }
}
