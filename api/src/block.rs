//! Block geometry: the 4 KiB block, chunks, and validated block ranges. A
//! `BlockRange` exists only if it is aligned, non-empty, inside the volume and
//! within the I/O limit, so storage code never re-checks offsets.

use serde::{Deserialize, Serialize};

/// The unit of change tracking, checksums and copying.
pub const BLOCK_SIZE: u64 = 4096;
/// The striping unit used when a volume does not name one.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// The largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// The largest volume accepted (1 PiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;
/// The most bytes one read, write or trim request may carry.
pub const MAX_IO_BYTES: u64 = 4 << 20;
/// The most bytes one trim may cover (trims carry no data).
pub const MAX_TRIM_BYTES: u64 = MAX_VOLUME_SIZE;

/// Why a volume geometry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("volume size {size} bytes is not a positive multiple of {BLOCK_SIZE} (the block size)")]
    BadSize { size: u64 },
    #[error("volume size {size} bytes is over the limit of {MAX_VOLUME_SIZE} bytes (1 PiB)")]
    TooLarge { size: u64 },
    #[error(
        "chunk size {chunk} bytes must be a power of two between {BLOCK_SIZE} and {MAX_CHUNK_SIZE} bytes"
    )]
    BadChunkSize { chunk: u64 },
    #[error("chunk {chunk} is past the last chunk ({last}) of a {size}-byte volume")]
    ChunkPastEnd { chunk: u64, last: u64, size: u64 },
    #[error("a volume can only grow: new size {new} bytes is below the current {current} bytes")]
    Shrink { current: u64, new: u64 },
}

/// Why a byte range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error(
        "offset {offset} and length {len} must be multiples of {BLOCK_SIZE} bytes (whole blocks)"
    )]
    Unaligned { offset: u64, len: u64 },
    #[error("length is zero: give at least one block ({BLOCK_SIZE} bytes)")]
    Empty,
    #[error("range [{offset}, {offset}+{len}) ends past the end of the {size}-byte volume")]
    PastEnd { offset: u64, len: u64, size: u64 },
    #[error("length {len} bytes is over the limit of {max} bytes per request: split it")]
    TooLong { len: u64, max: u64 },
}

/// A volume's size and chunk size, both validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    size: u64,
    chunk_size: u64,
}

impl Geometry {
    /// `chunk_size` 0 means [`DEFAULT_CHUNK_SIZE`].
    pub fn new(size: u64, chunk_size: u64) -> Result<Self, GeometryError> {
        let chunk_size = if chunk_size == 0 { DEFAULT_CHUNK_SIZE } else { chunk_size };
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(GeometryError::BadSize { size });
        }
        if size > MAX_VOLUME_SIZE {
            return Err(GeometryError::TooLarge { size });
        }
        if !chunk_size.is_power_of_two() || !(BLOCK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(GeometryError::BadChunkSize { chunk: chunk_size });
        }
        Ok(Self { size, chunk_size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of blocks in the volume.
    pub fn blocks(&self) -> u64 {
        self.size / BLOCK_SIZE
    }

    pub fn blocks_per_chunk(&self) -> u64 {
        self.chunk_size / BLOCK_SIZE
    }

    /// Number of chunks (the last may be partial).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The chunk that holds block `block`.
    pub fn chunk_of(&self, block: u64) -> u64 {
        block / self.blocks_per_chunk()
    }

    /// The blocks of chunk `chunk`, clipped to the volume.
    pub fn chunk_blocks(&self, chunk: u64) -> std::ops::Range<u64> {
        let start = chunk * self.blocks_per_chunk();
        start.min(self.blocks())..(start + self.blocks_per_chunk()).min(self.blocks())
    }

    /// Checks that `chunk` exists in this volume.
    pub fn check_chunk(&self, chunk: u64) -> Result<(), GeometryError> {
        if chunk >= self.chunks() {
            return Err(GeometryError::ChunkPastEnd {
                chunk,
                last: self.chunks() - 1,
                size: self.size,
            });
        }
        Ok(())
    }

    /// The same volume grown to `new_size` bytes.
    pub fn grown(&self, new_size: u64) -> Result<Self, GeometryError> {
        if new_size < self.size {
            return Err(GeometryError::Shrink { current: self.size, new: new_size });
        }
        Self::new(new_size, self.chunk_size)
    }

    /// Validates a byte range for a request carrying at most `max` bytes.
    pub fn range(&self, offset: u64, len: u64, max: u64) -> Result<BlockRange, RangeError> {
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(RangeError::Unaligned { offset, len });
        }
        if len == 0 {
            return Err(RangeError::Empty);
        }
        if len > max {
            return Err(RangeError::TooLong { len, max });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(RangeError::PastEnd { offset, len, size: self.size });
        }
        Ok(BlockRange { start: offset / BLOCK_SIZE, count: len / BLOCK_SIZE })
    }
}

/// A non-empty run of whole blocks inside a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    start: u64,
    count: u64,
}

impl BlockRange {
    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn end(&self) -> u64 {
        self.start + self.count
    }

    pub fn blocks(&self) -> std::ops::Range<u64> {
        self.start..self.end()
    }

    pub fn byte_len(&self) -> u64 {
        self.count * BLOCK_SIZE
    }
}

/// Which chunks of a volume one replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkSet {
    /// Every chunk, including those added when the volume grows.
    All,
    /// These chunks only (sorted, no duplicates).
    Some(std::collections::BTreeSet<u64>),
}

impl ChunkSet {
    pub fn contains(&self, chunk: u64) -> bool {
        match self {
            ChunkSet::All => true,
            ChunkSet::Some(set) => set.contains(&chunk),
        }
    }

    /// Checks every named chunk exists in `geometry`.
    pub fn check(&self, geometry: &Geometry) -> Result<(), GeometryError> {
        match self {
            ChunkSet::All => Ok(()),
            ChunkSet::Some(set) => set.iter().try_for_each(|&c| geometry.check_chunk(c)),
        }
    }

    /// The chunks held, in order, for a volume of `geometry`.
    pub fn iter(&self, geometry: &Geometry) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            ChunkSet::All => Box::new(0..geometry.chunks()),
            ChunkSet::Some(set) => Box::new(set.iter().copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_refuses_bad_sizes() {
        assert!(matches!(Geometry::new(0, 0), Err(GeometryError::BadSize { .. })));
        assert!(matches!(Geometry::new(4097, 0), Err(GeometryError::BadSize { .. })));
        assert!(matches!(Geometry::new(1 << 51, 0), Err(GeometryError::TooLarge { .. })));
        assert!(matches!(Geometry::new(4096, 3 << 20), Err(GeometryError::BadChunkSize { .. })));
        assert!(matches!(Geometry::new(4096, 2048), Err(GeometryError::BadChunkSize { .. })));
        let g = Geometry::new(1 << 30, 0).unwrap();
        assert_eq!(g.chunk_size(), DEFAULT_CHUNK_SIZE);
        assert_eq!(g.chunks(), 16);
    }

    #[test]
    fn partial_last_chunk() {
        let g = Geometry::new(10 * BLOCK_SIZE, 4 * BLOCK_SIZE).unwrap();
        assert_eq!(g.chunks(), 3);
        assert_eq!(g.chunk_blocks(2), 8..10);
        assert_eq!(g.chunk_of(9), 2);
        assert!(g.check_chunk(3).is_err());
    }

    #[test]
    fn ranges_are_checked() {
        let g = Geometry::new(1 << 20, 0).unwrap();
        assert_eq!(g.range(4096, 8192, MAX_IO_BYTES).unwrap().blocks(), 1..3);
        assert!(matches!(g.range(1, 4096, MAX_IO_BYTES), Err(RangeError::Unaligned { .. })));
        assert!(matches!(g.range(0, 100, MAX_IO_BYTES), Err(RangeError::Unaligned { .. })));
        assert!(matches!(g.range(0, 0, MAX_IO_BYTES), Err(RangeError::Empty)));
        assert!(matches!(g.range(1 << 20, 4096, MAX_IO_BYTES), Err(RangeError::PastEnd { .. })));
        assert!(matches!(
            g.range(u64::MAX - 4095, 4096, MAX_IO_BYTES),
            Err(RangeError::Unaligned { .. }) | Err(RangeError::PastEnd { .. })
        ));
        assert!(matches!(g.range(0, 8192, 4096), Err(RangeError::TooLong { .. })));
    }

    #[test]
    fn growth_only() {
        let g = Geometry::new(1 << 20, 1 << 16).unwrap();
        assert!(matches!(g.grown(4096), Err(GeometryError::Shrink { .. })));
        assert_eq!(g.grown(2 << 20).unwrap().chunks(), 32);
    }
}
