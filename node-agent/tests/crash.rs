//! Crash consistency: a scenario of writes, flushes, seals and snapshot
//! deletions runs on a disk that loses power at sync number n, for every n
//! the scenario reaches, with unsynced writes dropped, kept, or kept at
//! random. After power returns the store must open and be exactly as of the
//! last operation that returned, or of the one under way (see
//! docs/design.md, "Write order"), compared with a reference model; then it
//! must go on working.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use cairn_agent::{
    Store,
    disk::{CrashMode, SimDisk},
};
use cairn_api::{BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId, digest::image_digest};

const B: usize = BLOCK_SIZE as usize;
const SIZE: u64 = 2 << 20;
const CHUNK: u64 = 64 << 10;

type Image = BTreeMap<u64, Vec<u8>>;

/// What a reader sees: the head and each snapshot (id, image).
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    head: Image,
    snaps: Vec<(String, Image)>,
}

fn block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..B)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8 | 1
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u64>),
    Trim(u64, u64),
    Flush,
    Seal(&'static str, u64),
    Delete(&'static str),
    Revert,
}

fn scenario() -> Vec<Op> {
    use Op::*;
    vec![
        Write(0, (1..=8).collect()),
        Write(20, vec![9]),
        Flush,
        Write(3, vec![10, 11]),
        Trim(20, 1),
        Write(30, vec![12]),
        Flush,
        Seal("s1", 1),
        Write(0, vec![13]),
        Write(5, vec![14, 15, 16]),
        Trim(1, 1),
        Seal("s2", 2),
        Write(6, vec![17]),
        Flush,
        Delete("s1"),
        Write(7, vec![18]),
        Delete("s2"),
        Seal("s3", 3),
        Write(2, vec![19]),
        Flush,
        Write(9, vec![20]),
        Revert,
        Write(4, vec![21]),
        Flush,
    ]
}

fn vol() -> VolumeId {
    VolumeId::new("crash-vol").unwrap()
}

fn apply_model(m: &mut Model, op: &Op) {
    match op {
        Op::Write(b, seeds) => {
            for (i, s) in seeds.iter().enumerate() {
                m.head.insert(b + i as u64, block(*s));
            }
        }
        Op::Trim(b, n) => {
            for i in 0..*n {
                m.head.remove(&(b + i));
            }
        }
        Op::Flush => {}
        Op::Seal(id, _) => m.snaps.push((id.to_string(), m.head.clone())),
        Op::Delete(id) => m.snaps.retain(|(s, _)| s != id),
        Op::Revert => m.head = m.snaps.last().map(|(_, img)| img.clone()).unwrap_or_default(),
    }
}

fn run_op(store: &Store, op: &Op) -> cairn_agent::Result<()> {
    let r = store.replica(&vol())?;
    match op {
        Op::Write(b, seeds) => {
            let data: Vec<u8> = seeds.iter().flat_map(|s| block(*s)).collect();
            r.write(0, b * BLOCK_SIZE, &data)
        }
        Op::Trim(b, n) => r.trim(0, b * BLOCK_SIZE, n * BLOCK_SIZE),
        Op::Flush => r.flush(0),
        Op::Seal(id, g) => r.seal(0, &SnapshotId::new(*id).unwrap(), *g).map(|_| ()),
        Op::Delete(id) => r.delete_snapshot(&SnapshotId::new(*id).unwrap()),
        Op::Revert => store.revert_head(&vol(), 0).map(drop),
    }
}

fn observed(store: &Store, blocks: &[u64]) -> Model {
    let r = store.replica(&vol()).unwrap();
    let read = |snap: Option<&SnapshotId>| -> Image {
        blocks
            .iter()
            .filter_map(|&b| {
                let d = r.read(b * BLOCK_SIZE, BLOCK_SIZE, snap).unwrap();
                d.iter().any(|&x| x != 0).then_some((b, d))
            })
            .collect()
    };
    let snaps = r.snapshots().unwrap();
    let mut m = Model { head: read(None), snaps: vec![] };
    for s in &snaps {
        let img = read(Some(&s.id));
        assert_eq!(
            s.digest,
            image_digest(SIZE, img.iter().map(|(b, d)| (*b, &d[..]))),
            "snapshot {} digest does not match its content",
            s.id
        );
        m.snaps.push((s.id.to_string(), img));
    }
    assert_eq!(
        r.digest(None).unwrap(),
        image_digest(SIZE, m.head.iter().map(|(b, d)| (*b, &d[..]))),
        "head digest does not match its content"
    );
    m
}

fn open(disk: &SimDisk) -> Store {
    Store::open(Arc::new(disk.clone()), Path::new("/agent")).expect("store opens after a crash")
}

/// Runs the scenario, crashing at sync `crash_at` (relative to the syncs
/// made before the scenario), and returns the acceptable states and the
/// disk.
fn run(crash_at: Option<u64>) -> (SimDisk, Vec<Model>, bool) {
    let disk = SimDisk::new();
    let store = open(&disk);
    store.create_replica(&vol(), Geometry::new(SIZE, CHUNK).unwrap(), ChunkSet::All).unwrap();
    let base = disk.syncs();
    if let Some(n) = crash_at {
        disk.fail_at_sync(base + n);
    }
    let mut model = Model::default();
    let mut durable = Model::default();
    for op in scenario() {
        let before = model.clone();
        apply_model(&mut model, &op);
        match run_op(&store, &op) {
            Ok(()) => {
                if !matches!(op, Op::Write(..) | Op::Trim(..)) {
                    durable = model.clone();
                }
            }
            Err(_) => {
                assert!(disk.has_crashed(), "{op:?} failed without a crash");
                // Acceptable: the last durable state, the acknowledged
                // writes made durable (the flush inside a seal or a delete),
                // or the operation complete.
                let mut flushed = before.clone();
                flushed.snaps = durable.snaps.clone();
                return (disk, vec![durable, flushed, model], true);
            }
        }
    }
    (disk, vec![durable], false)
}

#[test]
fn every_sync_point_of_write_flush_seal_and_fold_recovers_a_committed_state() {
    let (dry, _, _) = run(None);
    let total = dry.syncs();
    assert!(total > 20, "the scenario should reach many sync points, got {total}");
    let blocks: Vec<u64> = (0..40).collect();
    let modes = [
        CrashMode::DropUnsynced,
        CrashMode::KeepUnsynced,
        CrashMode::Random(1),
        CrashMode::Random(7),
        CrashMode::Random(99),
    ];
    let mut crashes = 0;
    for n in 1..=total {
        for mode in modes {
            let (disk, acceptable, crashed) = run(Some(n));
            if !crashed {
                continue;
            }
            crashes += 1;
            let after = disk.crash_image(mode);
            let store = open(&after);
            let seen = observed(&store, &blocks);
            assert!(
                acceptable.contains(&seen),
                "crash at sync {n} ({mode:?}): recovered state matches no committed state\nseen: {:?}\nacceptable: {:?}",
                summarize(&seen),
                acceptable.iter().map(summarize).collect::<Vec<_>>()
            );
            // The recovered store keeps working: new writes do not clobber
            // committed blocks, and survive a reopen.
            let r = store.replica(&vol()).unwrap();
            r.write(0, 35 * BLOCK_SIZE, &block(100)).unwrap();
            r.write(0, 10 * BLOCK_SIZE, &[block(101), block(102)].concat()).unwrap();
            r.seal(0, &SnapshotId::new("after").unwrap(), 1000).unwrap();
            let mut expect = seen.clone();
            expect.head.insert(35, block(100));
            expect.head.insert(10, block(101));
            expect.head.insert(11, block(102));
            expect.snaps.push(("after".into(), expect.head.clone()));
            drop((r, store));
            let again = open(&after.crash_image(CrashMode::DropUnsynced));
            assert_eq!(
                observed(&again, &blocks),
                expect,
                "crash at sync {n} ({mode:?}), then reuse"
            );
        }
    }
    assert!(crashes >= total as usize, "every sync point was crashed at ({crashes} runs)");
}

fn summarize(m: &Model) -> String {
    let img = |i: &Image| i.keys().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
    format!(
        "head[{}] {}",
        img(&m.head),
        m.snaps.iter().map(|(s, i)| format!("{s}[{}]", img(i))).collect::<Vec<_>>().join(" ")
    )
}
