//! The metadata store: redb tables and their encodings. It owns the durable
//! truth of which blocks each layer holds; a block data slot is live only if
//! a committed record here names it (see docs/design.md, "Write order").
//!
//! Tables:
//! - `replicas`: volume id -> JSON [`ReplicaRecord`] (geometry, chunks held,
//!   layers with their snapshot records);
//! - `blocks`: (volume, layer, group) -> packed [`Entry`]s of the up to
//!   [`GROUP_BLOCKS`] blocks of that group present in the layer;
//! - `chunk_acc`: (volume, layer) -> packed per-chunk digest accumulators of a
//!   sealed layer, for the chunks that changed in it.

use std::collections::BTreeMap;

use cairn_api::{
    ChunkSet, Geometry, SnapshotId,
    digest::{Accumulator, BlockHash},
    snapshot::InSyncRecord,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub const REPLICAS: TableDefinition<&str, &[u8]> = TableDefinition::new("replicas");
pub const BLOCKS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("blocks");
pub const CHUNK_ACC: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chunk_acc");
/// Remote copy: links this agent receives and copy checkpoints, by link id
/// (JSON values; see `copy::state`).
pub const LINKS: TableDefinition<&str, &[u8]> = TableDefinition::new("links");
pub const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("copy_checkpoints");
/// Links this agent sends (source side), with their cursors.
pub const SOURCE_LINKS: TableDefinition<&str, &[u8]> = TableDefinition::new("source_links");

/// Blocks per `blocks` record: 64 blocks (256 KiB) share one record, so a
/// sequential write updates one record per 256 KiB.
pub const GROUP_SHIFT: u32 = 6;
pub const GROUP_BLOCKS: u64 = 1 << GROUP_SHIFT;

/// The slot value that marks a zero block: trimmed or written with zeros.
/// It shadows the same block in older layers and has no data.
pub const ZERO_SLOT: u32 = u32::MAX;

/// Where one block of one layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Slot in the layer's data file (byte offset slot * 4096), or
    /// [`ZERO_SLOT`].
    pub slot: u32,
    pub crc: u32,
    /// Digest contribution of the block (zero for a zero block).
    pub hash: BlockHash,
}

impl Entry {
    pub fn zero() -> Self {
        Entry { slot: ZERO_SLOT, crc: zero_block_crc(), hash: BlockHash::default() }
    }

    pub fn is_zero(&self) -> bool {
        self.slot == ZERO_SLOT
    }
}

/// CRC32C of one all-zero block.
pub fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; cairn_api::BLOCK_SIZE as usize]))
}

/// The durable description of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub geometry: Geometry,
    pub chunks: ChunkSet,
    /// Sealed layers oldest first, then the head (always last, never sealed).
    pub layers: Vec<LayerRecord>,
    /// The number the next layer will get; layer numbers only grow.
    pub next_layer: u64,
    /// The highest volume-head epoch this replica has admitted; requests
    /// with a lower one are refused (fencing).
    #[serde(default)]
    pub epoch: u64,
    /// The head that fenced at `epoch` (its agent's name; empty: none
    /// recorded): another head at the same epoch is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub epoch_head: String,
    /// The in-sync set a head last recorded here (see docs/design.md,
    /// "Durable replica state"). Absent in records written before it
    /// existed: such a replica's state is unknown (see the migration rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<InSyncRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub no: u64,
    pub snapshot: Option<SnapshotRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub generation: u64,
    pub size: u64,
    pub sealed_at_unix: i64,
    /// The accumulator of every chunk the replica holds, as of the snapshot.
    pub acc: [u64; 4],
    /// Marked by a resync that rolled the volume back past it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub divergent: bool,
}

pub fn encode_record(r: &ReplicaRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("replica records always serialize")
}

pub fn decode_record(bytes: &[u8]) -> Result<ReplicaRecord, serde_json::Error> {
    serde_json::from_slice(bytes)
}

const DATA: u8 = 1;
const ZERO: u8 = 0;
const DATA_LEN: usize = 2 + 4 + 4 + 32;

/// Packs the entries of one group: `(block offset in group, entry)` pairs.
pub fn encode_group<'a>(entries: impl Iterator<Item = (u64, &'a Entry)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (off, e) in entries {
        debug_assert!(off < GROUP_BLOCKS);
        if e.is_zero() {
            out.extend_from_slice(&[off as u8, ZERO]);
        } else {
            out.extend_from_slice(&[off as u8, DATA]);
            out.extend_from_slice(&e.slot.to_le_bytes());
            out.extend_from_slice(&e.crc.to_le_bytes());
            out.extend_from_slice(&e.hash.0);
        }
    }
    out
}

/// Unpacks a group record; `None` when it is malformed.
pub fn decode_group(bytes: &[u8]) -> Option<Vec<(u64, Entry)>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match rest {
            [off, ZERO, tail @ ..] if (*off as u64) < GROUP_BLOCKS => {
                out.push((*off as u64, Entry::zero()));
                rest = tail;
            }
            [off, DATA, ..] if (*off as u64) < GROUP_BLOCKS && rest.len() >= DATA_LEN => {
                let slot = u32::from_le_bytes(rest[2..6].try_into().ok()?);
                let crc = u32::from_le_bytes(rest[6..10].try_into().ok()?);
                let hash = BlockHash(rest[10..42].try_into().ok()?);
                out.push((*off as u64, Entry { slot, crc, hash }));
                rest = &rest[DATA_LEN..];
            }
            _ => return None,
        }
    }
    Some(out)
}

pub fn encode_accs(accs: &BTreeMap<u64, Accumulator>) -> Vec<u8> {
    let mut out = Vec::with_capacity(accs.len() * 40);
    for (chunk, acc) in accs {
        out.extend_from_slice(&chunk.to_le_bytes());
        out.extend_from_slice(&acc.to_bytes());
    }
    out
}

pub fn decode_accs(bytes: &[u8]) -> Option<BTreeMap<u64, Accumulator>> {
    if !bytes.len().is_multiple_of(40) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(40)
            .map(|c| {
                let chunk = u64::from_le_bytes(c[..8].try_into().unwrap());
                (chunk, Accumulator::from_bytes(c[8..].try_into().unwrap()))
            })
            .collect(),
    )
}

/// A replica record as read: the volume name and the record, or why it does
/// not parse.
pub type LoadedRecord = (String, Result<ReplicaRecord, serde_json::Error>);

/// Reads every replica record.
pub fn load_records(db: &redb::Database) -> Result<Vec<LoadedRecord>, redb::Error> {
    let tx = db.begin_read()?;
    let table = match tx.open_table(REPLICAS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push((k.value().to_owned(), decode_record(v.value())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_records_round_trip() {
        let d = Entry { slot: 7, crc: 0xdead_beef, hash: BlockHash([3; 32]) };
        let entries = [(0, d), (5, Entry::zero()), (63, d)];
        let bytes = encode_group(entries.iter().map(|(o, e)| (*o, e)));
        assert_eq!(decode_group(&bytes).unwrap(), entries.to_vec());
        assert!(decode_group(&bytes[..bytes.len() - 1]).is_none());
        assert!(decode_group(&[64, ZERO]).is_none());
    }

    #[test]
    fn a_record_from_before_the_in_sync_state_reads_as_unknown() {
        let mut r = ReplicaRecord {
            geometry: Geometry::new(8 << 20, 1 << 20).unwrap(),
            chunks: ChunkSet::All,
            layers: vec![LayerRecord { no: 1, snapshot: None }],
            next_layer: 2,
            epoch: 3,
            epoch_head: String::new(),
            in_sync: None,
        };
        let mut old: serde_json::Value = serde_json::from_slice(&encode_record(&r)).unwrap();
        old.as_object_mut().unwrap().retain(|k, _| k != "in_sync" && k != "epoch_head");
        let back = decode_record(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(back, r, "no in-sync record, no head at the epoch");
        r.epoch_head = "a1".into();
        r.in_sync = Some(InSyncRecord {
            epoch: 3,
            seq: 2,
            members: ["a1".to_string()].into_iter().collect(),
        });
        assert_eq!(decode_record(&encode_record(&r)).unwrap(), r);
    }

    #[test]
    fn accumulators_round_trip() {
        let accs: BTreeMap<u64, Accumulator> =
            [(1, Accumulator([1, 2, 3, 4])), (9, Accumulator([5, 6, 7, u64::MAX]))].into();
        assert_eq!(decode_accs(&encode_accs(&accs)).unwrap(), accs);
        assert!(decode_accs(&[0; 39]).is_none());
    }
}
