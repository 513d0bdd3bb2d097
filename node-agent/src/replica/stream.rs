//! Block streams out of a replica: one layer's blocks (the delta of a
//! snapshot) or the merged image as of a snapshot. A stream first lists the
//! blocks with handles on their data files, then reads them in batches
//! without holding the replica's lock, checking every CRC32C.
//!
//! Invariant: what a stream yields is the content as of the listing: sealed
//! layers never rewrite a named slot, and a data file removed by a later
//! deletion stays readable through the handle.

use std::{ops::Range, sync::Arc};

use cairn_api::{BLOCK_SIZE, SnapshotId};

use crate::{
    disk::DiskFile,
    error::{Error, Result},
    replica::{Replica, State, describe_layer},
};

const BS: usize = BLOCK_SIZE as usize;

/// One block of a stream.
#[derive(Debug, Clone)]
pub struct Listed {
    pub block: u64,
    pub crc: u32,
    /// Where the data is; `None` for a zero block.
    src: Option<(Arc<dyn DiskFile>, u32)>,
    layer: Arc<str>,
}

impl Listed {
    pub fn is_zero(&self) -> bool {
        self.src.is_none()
    }
}

/// A block read for a stream: its data (empty for a zero block) has been
/// checked against its CRC32C.
#[derive(Debug, Clone)]
pub struct StreamedBlock {
    pub block: u64,
    pub crc: u32,
    pub data: Option<Vec<u8>>,
}

impl Replica {
    fn block_ranges(&self, st: &State, chunks: &[u64]) -> Result<Vec<Range<u64>>> {
        if chunks.is_empty() {
            return Ok(match &st.chunks {
                cairn_api::ChunkSet::All => std::iter::once(0..st.geometry.blocks()).collect(),
                cairn_api::ChunkSet::Some(s) => {
                    s.iter().map(|c| st.geometry.chunk_blocks(*c)).collect()
                }
            });
        }
        let mut sorted = chunks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted
            .into_iter()
            .map(|c| {
                self.check_chunk_held(st, c)?;
                Ok(st.geometry.chunk_blocks(c))
            })
            .collect()
    }

    /// The chunks a stream covers, in order: `requested` (checked to be
    /// held, duplicates dropped) or, when empty, every chunk held.
    pub fn stream_chunks(&self, requested: &[u64]) -> Result<Vec<u64>> {
        let st = self.read_state()?;
        if requested.is_empty() {
            return Ok(st.chunks.iter(&st.geometry).collect());
        }
        let mut chunks = requested.to_vec();
        chunks.sort_unstable();
        chunks.dedup();
        for &c in &chunks {
            self.check_chunk_held(&st, c)?;
        }
        Ok(chunks)
    }

    /// The blocks of snapshot `id`'s layer, zero blocks included, limited
    /// to `chunks` (every held chunk when empty), in block order.
    pub fn list_layer(&self, id: &SnapshotId, chunks: &[u64]) -> Result<Vec<Listed>> {
        let st = self.read_state()?;
        let k = st.snapshot_index(&self.volume, id)?;
        let layer = &st.layers[k];
        let name: Arc<str> = describe_layer(layer).into();
        let file = layer.file().cloned();
        let mut out = Vec::new();
        for r in self.block_ranges(&st, chunks)? {
            for (b, e) in layer.map.range(r) {
                out.push(Listed {
                    block: *b,
                    crc: e.crc,
                    src: (!e.is_zero()).then(|| (file.clone().expect("data has a file"), e.slot)),
                    layer: name.clone(),
                });
            }
        }
        Ok(out)
    }

    /// The written (non-zero) blocks of the image as of snapshot `id`,
    /// limited to `chunks`, in block order.
    pub fn list_image(&self, id: &SnapshotId, chunks: &[u64]) -> Result<Vec<Listed>> {
        let st = self.read_state()?;
        let k = st.snapshot_index(&self.volume, id)?;
        let mut newest: std::collections::BTreeMap<u64, (usize, crate::meta::Entry)> =
            std::collections::BTreeMap::new();
        let ranges = self.block_ranges(&st, chunks)?;
        for (li, layer) in st.layers[..=k].iter().enumerate() {
            for r in &ranges {
                for (b, e) in layer.map.range(r.clone()) {
                    newest.insert(*b, (li, *e));
                }
            }
        }
        let names: Vec<Arc<str>> =
            st.layers[..=k].iter().map(|l| describe_layer(l).into()).collect();
        Ok(newest
            .into_iter()
            .filter(|(_, (_, e))| !e.is_zero())
            .map(|(b, (li, e))| Listed {
                block: b,
                crc: e.crc,
                src: Some((st.layers[li].file().expect("data has a file").clone(), e.slot)),
                layer: names[li].clone(),
            })
            .collect())
    }

    /// The indexes of the head layer's blocks (written or trimmed since the
    /// last seal) in `chunks` (every held chunk when empty), from block
    /// `start` on, at most `limit` of them; and where the next page starts
    /// if there is more.
    pub fn list_head_blocks(
        &self,
        chunks: &[u64],
        start: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, Option<u64>)> {
        let st = self.read_state()?;
        let mut out = Vec::new();
        for r in self.block_ranges(&st, chunks)? {
            if r.end <= start {
                continue;
            }
            for b in st.head().map.range(r.start.max(start)..r.end).map(|(b, _)| *b) {
                if out.len() == limit {
                    return Ok((out, Some(b)));
                }
                out.push(b);
            }
        }
        Ok((out, None))
    }

    /// Per chunk of `chunks` (every held one when empty): how many data and
    /// zero blocks a layer (`image` false) or image stream would carry.
    pub fn count_blocks(
        &self,
        id: &SnapshotId,
        chunks: &[u64],
        image: bool,
    ) -> Result<Vec<(u64, u64, u64)>> {
        let mut out = Vec::new();
        for chunk in self.stream_chunks(chunks)? {
            let listed =
                if image { self.list_image(id, &[chunk])? } else { self.list_layer(id, &[chunk])? };
            let zero = listed.iter().filter(|l| l.is_zero()).count() as u64;
            out.push((chunk, listed.len() as u64 - zero, zero));
        }
        Ok(out)
    }

    /// Reads listed blocks, one file read per run of consecutive slots,
    /// checking each block's CRC32C.
    pub fn read_listed(&self, items: &[Listed]) -> Result<Vec<StreamedBlock>> {
        let mut out: Vec<StreamedBlock> = items
            .iter()
            .map(|l| StreamedBlock { block: l.block, crc: l.crc, data: None })
            .collect();
        let mut i = 0;
        while i < items.len() {
            let Some((file, slot)) = &items[i].src else {
                i += 1;
                continue;
            };
            let mut n = 1;
            while let Some((f2, s2)) = items.get(i + n).and_then(|l| l.src.as_ref()) {
                if !Arc::ptr_eq(f2, file) || *s2 != slot + n as u32 {
                    break;
                }
                n += 1;
            }
            let mut buf = vec![0u8; n * BS];
            file.read_at(&mut buf, *slot as u64 * BLOCK_SIZE).map_err(|source| {
                self.fail(Error::Io {
                    volume: self.volume.clone(),
                    op: "reading blocks for a stream",
                    path: format!("{}", items[i].layer).into(),
                    source,
                })
            })?;
            for (j, d) in buf.chunks_exact(BS).enumerate() {
                let l = &items[i + j];
                let actual = crc32c::crc32c(d);
                if actual != l.crc {
                    let st = self.read_state()?;
                    return Err(Error::Checksum {
                        volume: self.volume.clone(),
                        chunk: st.geometry.chunk_of(l.block),
                        offset: l.block * BLOCK_SIZE,
                        layer: l.layer.to_string(),
                        stored: l.crc,
                        actual,
                    });
                }
                out[i + j].data = Some(d.to_vec());
            }
            i += n;
        }
        Ok(out)
    }
}
