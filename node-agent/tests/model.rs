//! Model-based property test: random sequences of write / trim / flush /
//! seal / delete-snapshot / read / reopen / crash against a reference model
//! (a map of block -> bytes for the head and for each snapshot). After every
//! sequence the head, every snapshot, every digest and the per-chunk digests
//! agree with the model.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use cairn_agent::{
    Store,
    disk::{CrashMode, SimDisk},
};
use cairn_api::{
    Accumulator, BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId, digest::image_digest,
};
use proptest::prelude::*;

const B: usize = BLOCK_SIZE as usize;
const BLOCKS: u64 = 48;
const SIZE: u64 = 64 * BLOCK_SIZE;
const CHUNK: u64 = 16 * BLOCK_SIZE;

type Image = BTreeMap<u64, Vec<u8>>;

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, seeds: Vec<u8> },
    Zero { block: u64 },
    Trim { block: u64, count: u64 },
    Flush,
    Seal,
    Delete { pick: usize },
    Read { block: u64 },
    Reopen,
    Crash { seed: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, prop::collection::vec(1u8..=255, 1..5))
            .prop_map(|(block, seeds)| Op::Write { block, seeds }),
        1 => (0..BLOCKS).prop_map(|block| Op::Zero { block }),
        1 => (0..BLOCKS, 1..6u64).prop_map(|(block, count)| Op::Trim { block, count }),
        2 => Just(Op::Flush),
        2 => Just(Op::Seal),
        2 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        2 => (0..BLOCKS).prop_map(|block| Op::Read { block }),
        1 => Just(Op::Reopen),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

fn block(seed: u8, index: u64) -> Vec<u8> {
    let mut d = vec![seed; B];
    d[..8].copy_from_slice(&index.to_le_bytes());
    d
}

fn vol() -> VolumeId {
    VolumeId::new("model").unwrap()
}

fn open(disk: &SimDisk) -> Store {
    Store::open(Arc::new(disk.clone()), Path::new("/agent")).unwrap()
}

#[derive(Debug, Clone, Default)]
struct Model {
    head: Image,
    snaps: Vec<(SnapshotId, Image)>,
}

fn check_all(store: &Store, m: &Model) -> Result<(), TestCaseError> {
    let r = store.replica(&vol()).unwrap();
    let all = r.read(0, SIZE, None).unwrap();
    for b in 0..SIZE / BLOCK_SIZE {
        let got = &all[b as usize * B..(b as usize + 1) * B];
        let want = m.head.get(&b).cloned().unwrap_or_else(|| vec![0; B]);
        prop_assert_eq!(got, &want[..], "head block {}", b);
    }
    let snaps = r.snapshots().unwrap();
    prop_assert_eq!(
        snaps.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        m.snaps.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>()
    );
    for (info, (id, img)) in snaps.iter().zip(&m.snaps) {
        let data = r.read(0, SIZE, Some(id)).unwrap();
        for b in 0..SIZE / BLOCK_SIZE {
            let got = &data[b as usize * B..(b as usize + 1) * B];
            let want = img.get(&b).cloned().unwrap_or_else(|| vec![0; B]);
            prop_assert_eq!(got, &want[..], "snapshot {} block {}", id, b);
        }
        let digest = image_digest(SIZE, img.iter().map(|(b, d)| (*b, &d[..])));
        prop_assert_eq!(info.digest, digest, "snapshot {} digest", id);
        let mut sum = Accumulator::default();
        r.chunk_digests(Some(id), &[]).unwrap().iter().for_each(|(_, a)| sum.merge(a));
        prop_assert_eq!(sum.digest(SIZE), digest, "snapshot {} chunk digests", id);
        // The image stream yields exactly the non-zero blocks.
        let listed = r.list_image(id, &[]).unwrap();
        let streamed: Image = r
            .read_listed(&listed)
            .unwrap()
            .into_iter()
            .map(|b| (b.block, b.data.unwrap()))
            .collect();
        prop_assert_eq!(&streamed, img, "snapshot {} image stream", id);
    }
    let head_digest = image_digest(SIZE, m.head.iter().map(|(b, d)| (*b, &d[..])));
    prop_assert_eq!(r.digest(None).unwrap(), head_digest);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut disk = SimDisk::new();
        let mut store = open(&disk);
        store.create_replica(&vol(), Geometry::new(SIZE, CHUNK).unwrap(), ChunkSet::All).unwrap();
        let mut m = Model::default();
        let mut durable = Model::default();
        let mut generation = 0;
        for op in ops {
            let r = store.replica(&vol()).unwrap();
            match op {
                Op::Write { block: b, seeds } => {
                    let n = (seeds.len() as u64).min(BLOCKS - b);
                    let data: Vec<u8> =
                        (0..n).flat_map(|i| block(seeds[i as usize], b + i)).collect();
                    r.write(0, b * BLOCK_SIZE, &data).unwrap();
                    for i in 0..n {
                        m.head.insert(b + i, block(seeds[i as usize], b + i));
                    }
                }
                Op::Zero { block: b } => {
                    r.write(0, b * BLOCK_SIZE, &vec![0; B]).unwrap();
                    m.head.remove(&b);
                }
                Op::Trim { block: b, count } => {
                    let n = count.min(BLOCKS - b);
                    r.trim(0, b * BLOCK_SIZE, n * BLOCK_SIZE).unwrap();
                    for i in 0..n {
                        m.head.remove(&(b + i));
                    }
                }
                Op::Flush => {
                    r.flush(0).unwrap();
                    durable = m.clone();
                }
                Op::Seal => {
                    generation += 1;
                    let id = SnapshotId::new(format!("s{generation}")).unwrap();
                    r.seal(0, &id, generation).unwrap();
                    m.snaps.push((id, m.head.clone()));
                    durable = m.clone();
                }
                Op::Delete { pick } => {
                    if !m.snaps.is_empty() {
                        let (id, _) = m.snaps.remove(pick % m.snaps.len());
                        r.delete_snapshot(&id).unwrap();
                        durable = m.clone();
                    }
                }
                Op::Read { block: b } => {
                    let got = r.read(b * BLOCK_SIZE, BLOCK_SIZE, None).unwrap();
                    let want = m.head.get(&b).cloned().unwrap_or_else(|| vec![0; B]);
                    prop_assert_eq!(got, want, "read of block {}", b);
                }
                Op::Reopen => {
                    store.flush_all().unwrap();
                    drop(r);
                    drop(store);
                    store = open(&disk);
                    durable = m.clone();
                }
                Op::Crash { seed } => {
                    drop(r);
                    drop(store);
                    disk = disk.crash_image(CrashMode::Random(seed));
                    store = open(&disk);
                    m = durable.clone();
                }
            }
        }
        check_all(&store, &m)?;
        // And once more after a clean reopen.
        store.flush_all().unwrap();
        drop(store);
        check_all(&open(&disk), &m)?;
    }
}
