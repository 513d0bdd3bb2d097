//! The content digest of a volume, defined so that the same content gives the
//! same digest on any agent and under any chunk placement (see
//! docs/design.md, "Digest"):
//!
//! - each non-zero block `b` with bytes `D` has the block hash
//!   `h(b, D) = BLAKE3-keyed(K, le64(b) || BLAKE3(D))` with the key
//!   `K = BLAKE3-derive-key("cairn block digest v1", "")`; hashing the 4 KiB
//!   block alone lets BLAKE3 work on its four 1 KiB chunks in parallel (SIMD),
//!   and the keyed outer hash binds the position; an all-zero block (never
//!   written, trimmed or written with zeros) has none;
//! - an accumulator is the lane-wise sum modulo 2^64 of the four
//!   little-endian 64-bit lanes of the block hashes of a set of blocks, so it
//!   can be updated per write (subtract the old hash, add the new) and
//!   summed over chunks held by different replicas;
//! - the digest of a volume of `size` bytes is
//!   `BLAKE3-derive-key("cairn volume digest v1", le64(size) || lanes)`.

use std::fmt;

use crate::BLOCK_SIZE;

const BLOCK_CONTEXT: &str = "cairn block digest v1";
const VOLUME_CONTEXT: &str = "cairn volume digest v1";

/// A 32-byte BLAKE3 digest, shown in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl TryFrom<&[u8]> for Digest {
    type Error = usize;
    /// Fails with the given length when it is not 32 bytes.
    fn try_from(bytes: &[u8]) -> Result<Self, usize> {
        bytes.try_into().map(Digest).map_err(|_| bytes.len())
    }
}

/// The hash of one non-zero block (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Hashes block `index` holding `data` (exactly one block).
    pub fn of(index: u64, data: &[u8]) -> Self {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        debug_assert_eq!(data.len() as u64, BLOCK_SIZE);
        let key = KEY.get_or_init(|| blake3::derive_key(BLOCK_CONTEXT, &[]));
        let mut outer = [0u8; 40];
        outer[..8].copy_from_slice(&index.to_le_bytes());
        outer[8..].copy_from_slice(blake3::hash(data).as_bytes());
        BlockHash(*blake3::keyed_hash(key, &outer).as_bytes())
    }

    fn lanes(&self) -> [u64; 4] {
        std::array::from_fn(|i| u64::from_le_bytes(self.0[i * 8..i * 8 + 8].try_into().unwrap()))
    }
}

/// The sum of the block hashes of a set of blocks (see the module
/// documentation). The empty set (all zeros) is the default.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Accumulator(pub [u64; 4]);

impl Accumulator {
    pub fn add(&mut self, h: &BlockHash) {
        for (a, l) in self.0.iter_mut().zip(h.lanes()) {
            *a = a.wrapping_add(l);
        }
    }

    pub fn sub(&mut self, h: &BlockHash) {
        for (a, l) in self.0.iter_mut().zip(h.lanes()) {
            *a = a.wrapping_sub(l);
        }
    }

    pub fn merge(&mut self, other: &Accumulator) {
        for (a, l) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_add(l);
        }
    }

    pub fn unmerge(&mut self, other: &Accumulator) {
        for (a, l) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_sub(l);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Accumulator(std::array::from_fn(|i| {
            u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap())
        }))
    }

    /// The digest of a volume of `size` bytes whose blocks sum to `self`.
    pub fn digest(&self, size: u64) -> Digest {
        let mut h = blake3::Hasher::new_derive_key(VOLUME_CONTEXT);
        h.update(&size.to_le_bytes());
        h.update(&self.to_bytes());
        Digest(*h.finalize().as_bytes())
    }
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding 64-byte groups lets the compiler vectorize the scan.
    let mut groups = data.chunks_exact(64);
    groups.by_ref().all(|g| g.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && groups.remainder().iter().all(|&b| b == 0)
}

/// Digest of a whole image given as `(index, data)` pairs of its non-zero
/// blocks: the reference the tests and the demo compare against.
pub fn image_digest<'a>(size: u64, blocks: impl IntoIterator<Item = (u64, &'a [u8])>) -> Digest {
    let mut acc = Accumulator::default();
    for (i, d) in blocks {
        if !is_zero(d) {
            acc.add(&BlockHash::of(i, d));
        }
    }
    acc.digest(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK_SIZE as usize]
    }

    #[test]
    fn order_and_grouping_do_not_matter() {
        let (a, b, c) = (block(1), block(2), block(3));
        let one = image_digest(1 << 20, [(0, &a[..]), (5, &b[..]), (9, &c[..])]);
        let mut left = Accumulator::default();
        left.add(&BlockHash::of(9, &c));
        let mut right = Accumulator::default();
        right.add(&BlockHash::of(5, &b));
        right.add(&BlockHash::of(0, &a));
        left.merge(&right);
        assert_eq!(left.digest(1 << 20), one);
    }

    #[test]
    fn zero_blocks_do_not_count_and_position_does() {
        let (a, z) = (block(7), block(0));
        let base = image_digest(1 << 20, [(3, &a[..])]);
        assert_eq!(image_digest(1 << 20, [(3, &a[..]), (4, &z[..])]), base);
        assert_ne!(image_digest(1 << 20, [(4, &a[..])]), base);
        assert_ne!(image_digest(2 << 20, [(3, &a[..])]), base, "size is part of the digest");
    }

    #[test]
    fn overwrite_is_sub_then_add() {
        let (a, b) = (block(1), block(2));
        let mut acc = Accumulator::default();
        acc.add(&BlockHash::of(1, &a));
        acc.sub(&BlockHash::of(1, &a));
        acc.add(&BlockHash::of(1, &b));
        assert_eq!(acc.digest(4096 * 4), image_digest(4096 * 4, [(1, &b[..])]));
    }

    #[test]
    fn is_zero_finds_any_byte() {
        let mut d = block(0);
        assert!(is_zero(&d));
        for pos in [0, 7, 8, 63, 64, 4000, 4095] {
            d[pos] = 1;
            assert!(!is_zero(&d), "{pos}");
            d[pos] = 0;
        }
    }
}
