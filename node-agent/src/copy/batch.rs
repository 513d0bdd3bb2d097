//! A copy batch as the receiver checks it before anything is written:
//! blocks in ascending order, at or after the next expected one, inside the
//! volume, 4096 bytes (or none for a zero block) matching their CRC32C, a
//! compressed batch decompressing to exactly its data blocks.
//!
//! Invariant: a batch that fails any check writes nothing.

use bytes::Bytes;
use cairn_api::{BLOCK_SIZE, agent::v1 as pb};

use crate::peer::CopiedBlock;

/// Most bytes a compressed batch may expand to (256 blocks).
const MAX_BATCH_BYTES: usize = 256 * BLOCK_SIZE as usize;

/// A batch that is not what the protocol allows, or arrived damaged.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a compressed batch carries {n} data blocks; at most {max} per batch")]
    TooMany { n: usize, max: usize },
    #[error("a compressed batch does not decompress: {why}")]
    Decompress { why: String },
    #[error("a compressed batch decompressed to {got} bytes, its {n} data blocks need {want}")]
    Decompressed { got: usize, n: usize, want: usize },
    #[error(
        "block {block} is out of order or outside the volume (next expected at or after {next}, volume has {blocks} blocks)"
    )]
    Order { block: u64, next: u64, blocks: u64 },
    #[error("block {block} carries data in a compressed batch")]
    DataInCompressed { block: u64 },
    #[error("block {block} has {len} bytes, not {BLOCK_SIZE}")]
    Length { block: u64, len: usize },
    #[error(
        "block {block} arrived with CRC32C {actual:#010x} but was sent as {sent:#010x}: corrupted in transit"
    )]
    Crc { block: u64, actual: u32, sent: u32 },
}

/// Checks a batch: ascending, at or after `cursor`, inside the volume,
/// each block 4096 bytes (or empty for zero) matching its CRC32C.
pub(crate) fn check_batch(
    batch: &pb::CopyBatch,
    cursor: u64,
    blocks: u64,
) -> Result<Vec<CopiedBlock>, BatchError> {
    const BS: usize = BLOCK_SIZE as usize;
    let mut out = Vec::with_capacity(batch.blocks.len());
    let mut next = cursor;
    let unpacked = if batch.zstd_data.is_empty() {
        None
    } else {
        let n = batch.blocks.iter().filter(|b| !b.zero).count();
        if n * BS > MAX_BATCH_BYTES {
            return Err(BatchError::TooMany { n, max: MAX_BATCH_BYTES / BS });
        }
        let raw = zstd::bulk::decompress(&batch.zstd_data, n * BS)
            .map_err(|e| BatchError::Decompress { why: e.to_string() })?;
        if raw.len() != n * BS {
            return Err(BatchError::Decompressed { got: raw.len(), n, want: n * BS });
        }
        Some(Bytes::from(raw))
    };
    let mut at = 0usize;
    for b in &batch.blocks {
        if b.index < next || b.index >= blocks {
            return Err(BatchError::Order { block: b.index, next, blocks });
        }
        next = b.index + 1;
        let data = match &unpacked {
            Some(_) if b.zero => Bytes::new(),
            Some(raw) => {
                if !b.data.is_empty() {
                    return Err(BatchError::DataInCompressed { block: b.index });
                }
                at += BS;
                raw.slice(at - BS..at)
            }
            None => b.data.clone(),
        };
        if data.is_empty() {
            out.push(CopiedBlock { block: b.index, data: None });
            continue;
        }
        if data.len() != BS {
            return Err(BatchError::Length { block: b.index, len: data.len() });
        }
        let actual = crc32c::crc32c(&data);
        if actual != b.crc32c {
            return Err(BatchError::Crc { block: b.index, actual, sent: b.crc32c });
        }
        out.push(CopiedBlock { block: b.index, data: Some(data) });
    }
    Ok(out)
}
