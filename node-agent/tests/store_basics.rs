//! The replica store's behaviour through its public API on a simulated disk:
//! layer resolution, trim, fold, digests, reopen.

use std::{path::Path, sync::Arc};

use cairn_agent::{
    Store,
    disk::{Disk, SimDisk},
};
use cairn_api::{BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId, digest::image_digest};

const B: usize = BLOCK_SIZE as usize;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; B]
}

fn vol() -> VolumeId {
    VolumeId::new("vol-a").unwrap()
}

fn snap(s: &str) -> SnapshotId {
    SnapshotId::new(s).unwrap()
}

fn open(disk: &SimDisk) -> Store {
    Store::open(Arc::new(disk.clone()), Path::new("/data")).unwrap()
}

fn read_block(store: &Store, b: u64, s: Option<&str>) -> Vec<u8> {
    let s = s.map(snap);
    store.replica(&vol()).unwrap().read(b * BLOCK_SIZE, BLOCK_SIZE, s.as_ref()).unwrap()
}

#[test]
fn reads_resolve_to_the_newest_layer_and_snapshots_keep_their_view() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r = store
        .create_replica(&vol(), Geometry::new(1 << 20, 1 << 16).unwrap(), ChunkSet::All)
        .unwrap();
    r.write(0, 0, &[block(1), block(1)].concat()).unwrap();
    r.seal(0, &snap("s1"), 1).unwrap();
    r.write(0, BLOCK_SIZE, &block(2)).unwrap();
    r.seal(0, &snap("s2"), 2).unwrap();
    r.write(0, 0, &block(3)).unwrap();
    assert_eq!(read_block(&store, 0, None), block(3));
    assert_eq!(read_block(&store, 1, None), block(2));
    assert_eq!(read_block(&store, 0, Some("s2")), block(1));
    assert_eq!(read_block(&store, 1, Some("s1")), block(1));
    assert_eq!(read_block(&store, 5, Some("s1")), block(0));
    let snaps = r.snapshots().unwrap();
    assert_eq!(snaps.iter().map(|s| s.changed_blocks).collect::<Vec<_>>(), vec![2, 1]);
    let b1 = block(1);
    let b2 = block(2);
    assert_eq!(snaps[0].digest, image_digest(1 << 20, [(0, &b1[..]), (1, &b1[..])]));
    assert_eq!(snaps[1].digest, image_digest(1 << 20, [(0, &b1[..]), (1, &b2[..])]));
}

#[test]
fn trim_reads_zero_and_shadows_older_layers() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r =
        store.create_replica(&vol(), Geometry::new(1 << 20, 0).unwrap(), ChunkSet::All).unwrap();
    r.write(0, 0, &[block(4), block(5)].concat()).unwrap();
    r.seal(0, &snap("s1"), 1).unwrap();
    r.trim(0, 0, 2 * BLOCK_SIZE).unwrap();
    assert_eq!(read_block(&store, 0, None), block(0));
    assert_eq!(read_block(&store, 0, Some("s1")), block(4));
    assert_eq!(r.digest(None).unwrap(), image_digest(1 << 20, []));
    // Zeros written are the same as a trim.
    r.write(0, 0, &block(6)).unwrap();
    r.write(0, 0, &block(0)).unwrap();
    assert_eq!(read_block(&store, 0, None), block(0));
}

#[test]
fn deleting_a_snapshot_folds_into_the_next_and_keeps_every_view() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r =
        store.create_replica(&vol(), Geometry::new(1 << 20, 0).unwrap(), ChunkSet::All).unwrap();
    r.write(0, 0, &[block(1), block(1), block(1)].concat()).unwrap();
    r.seal(0, &snap("s1"), 1).unwrap();
    r.write(0, 0, &block(2)).unwrap();
    r.trim(0, 2 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
    r.seal(0, &snap("s2"), 2).unwrap();
    r.write(0, BLOCK_SIZE, &block(3)).unwrap();
    let before: Vec<Vec<u8>> = (0..3).map(|b| read_block(&store, b, Some("s2"))).collect();
    let digest_before = r.digest(Some(&snap("s2"))).unwrap();
    r.delete_snapshot(&snap("s1")).unwrap();
    let after: Vec<Vec<u8>> = (0..3).map(|b| read_block(&store, b, Some("s2"))).collect();
    assert_eq!(before, after);
    assert_eq!(r.digest(Some(&snap("s2"))).unwrap(), digest_before);
    assert_eq!(r.snapshots().unwrap().len(), 1);
    // s2's layer now holds the delta from nothing: all three blocks.
    assert_eq!(r.snapshots().unwrap()[0].changed_blocks, 3);
    // Deleting the newest folds into the head.
    r.delete_snapshot(&snap("s2")).unwrap();
    assert_eq!(read_block(&store, 0, None), block(2));
    assert_eq!(read_block(&store, 1, None), block(3));
    assert_eq!(read_block(&store, 2, None), block(0));
    drop(store);
    let store = open(&disk);
    assert_eq!(read_block(&store, 0, None), block(2));
    assert_eq!(read_block(&store, 1, None), block(3));
    // Sealing after the fold records the chunks the folded layer changed.
    let r = store.replica(&vol()).unwrap();
    let s3 = r.seal(0, &snap("s3"), 3).unwrap();
    let (b2, b3) = (block(2), block(3));
    assert_eq!(s3.digest, image_digest(1 << 20, [(0, &b2[..]), (1, &b3[..])]));
    let accs = r.chunk_digests(Some(&snap("s3")), &[]).unwrap();
    let mut sum = cairn_api::Accumulator::default();
    accs.iter().for_each(|(_, a)| sum.merge(a));
    assert_eq!(sum.digest(1 << 20), s3.digest);
}

#[test]
fn flushed_state_survives_reopen_and_unflushed_does_not() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r =
        store.create_replica(&vol(), Geometry::new(1 << 20, 0).unwrap(), ChunkSet::All).unwrap();
    r.write(0, 0, &block(1)).unwrap();
    r.flush(0).unwrap();
    r.write(0, 0, &block(2)).unwrap();
    r.write(0, BLOCK_SIZE, &block(2)).unwrap();
    drop((r, store));
    let crashed = disk.crash_image(cairn_agent::disk::CrashMode::DropUnsynced);
    let store = open(&crashed);
    assert_eq!(read_block(&store, 0, None), block(1));
    assert_eq!(read_block(&store, 1, None), block(0));
    let files = crashed.files();
    assert!(files.iter().any(|p| p.ends_with("meta.redb")), "{files:?}");
    assert!(crashed.exists(Path::new("/data/volumes/vol-a")));
}

#[test]
fn a_flipped_byte_is_a_checksum_error_naming_the_block_never_data() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r = store
        .create_replica(&vol(), Geometry::new(1 << 20, 1 << 16).unwrap(), ChunkSet::All)
        .unwrap();
    // Blocks 0..20 land in slots 0..20 of the head layer's file.
    let data: Vec<u8> = (0..20u8).flat_map(|i| block(i + 1)).collect();
    r.write(0, 0, &data).unwrap();
    r.seal(0, &snap("s1"), 1).unwrap();
    let layer =
        disk.files().into_iter().find(|p| p.extension().is_some_and(|e| e == "layer")).unwrap();
    disk.corrupt(&layer, 17 * BLOCK_SIZE + 100).unwrap();
    let err = r.read(16 * BLOCK_SIZE, 2 * BLOCK_SIZE, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, cairn_agent::Error::Checksum { .. }), "{msg}");
    assert!(msg.contains("volume vol-a"), "{msg}");
    assert!(msg.contains("chunk 1,"), "{msg}");
    assert!(msg.contains(&format!("byte offset {}", 17 * BLOCK_SIZE)), "{msg}");
    // Other blocks still read, from the head and from the snapshot.
    assert_eq!(read_block(&store, 16, None), block(17));
    assert_eq!(read_block(&store, 18, Some("s1")), block(19));
    // A stream of the snapshot stops at the bad block rather than send it.
    let listed = r.list_image(&snap("s1"), &[]).unwrap();
    assert!(matches!(r.read_listed(&listed), Err(cairn_agent::Error::Checksum { .. })));
    // Folding the snapshot into the head does not launder the bad block.
    assert!(matches!(r.delete_snapshot(&snap("s1")), Err(cairn_agent::Error::Checksum { .. })));
    assert_eq!(r.snapshots().unwrap().len(), 1, "a failed delete leaves the snapshot whole");
}

#[test]
fn replicas_refuse_blocks_of_chunks_they_do_not_hold() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let held = ChunkSet::Some([1, 3].into());
    let r = store.create_replica(&vol(), Geometry::new(1 << 20, 1 << 16).unwrap(), held).unwrap();
    r.write(0, 1 << 16, &block(1)).unwrap();
    let err = r.write(0, 0, &block(1)).unwrap_err().to_string();
    assert!(err.contains("chunk 0") && err.contains("not held"), "{err}");
    let err = r.read(2 << 16, BLOCK_SIZE, None).unwrap_err().to_string();
    assert!(err.contains("chunk 2"), "{err}");
    // Growth adds chunks.
    r.grow(2 << 20, &[20]).unwrap();
    r.write(0, 20 << 16, &block(2)).unwrap();
    assert_eq!(read_block(&store, (20 << 16) / BLOCK_SIZE, None), block(2));
    assert!(r.grow(1 << 20, &[]).is_err(), "a replica never shrinks");
}

/// Bytes the files under `dir` occupy on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() { disk_usage(&e.path()) } else { m.blocks() * 512 };
    }
    total
}

#[test]
fn a_1_tib_volume_with_10_mib_written_uses_about_10_mib_of_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Arc::new(cairn_agent::disk::FileDisk), dir.path()).unwrap();
    let r =
        store.create_replica(&vol(), Geometry::new(1 << 40, 0).unwrap(), ChunkSet::All).unwrap();
    // 10 MiB as 1 MiB writes spread over the whole terabyte.
    for i in 0..10u64 {
        let data: Vec<u8> = (0..256u64).flat_map(|b| block((i * 7 + b) as u8 | 1)).collect();
        r.write(0, i * (100 << 30), &data).unwrap();
    }
    r.flush(0).unwrap();
    r.seal(0, &snap("s1"), 1).unwrap();
    let used = disk_usage(dir.path());
    assert!(used >= 10 << 20, "the data is on disk: {used}");
    assert!(used < 14 << 20, "1 TiB provisioned, 10 MiB written, {used} bytes used");
    assert_eq!(r.info().used_bytes, 10 << 20);
}

#[test]
fn a_lower_epoch_is_refused_for_good_even_after_a_crash() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r =
        store.create_replica(&vol(), Geometry::new(1 << 20, 0).unwrap(), ChunkSet::All).unwrap();
    r.write(2, 0, &block(1)).unwrap();
    let err = r.write(1, 0, &block(9)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, cairn_agent::Error::StaleEpoch { request: 1, current: 2, .. }), "{msg}");
    assert!(msg.contains("epoch 1") && msg.contains("epoch 2") && msg.contains("fenced"), "{msg}");
    // A new head fences before its first write; the old one can do nothing.
    assert_eq!(r.fence(5).unwrap(), 5);
    assert!(r.write(2, 0, &block(9)).is_err());
    assert!(r.trim(2, 0, BLOCK_SIZE).is_err());
    assert!(r.flush(2).is_err());
    assert!(r.seal(2, &snap("s1"), 1).is_err());
    assert!(r.fence(4).is_err(), "an epoch never goes down");
    assert_eq!(read_block(&store, 0, None), block(1), "refused writes change nothing");
    // The fence is durable: after power loss the old head is still out.
    let after = disk.crash_image(cairn_agent::disk::CrashMode::DropUnsynced);
    drop((r, store));
    let store = open(&after);
    let r = store.replica(&vol()).unwrap();
    assert_eq!(r.info().epoch, 5);
    assert!(matches!(r.write(4, 0, &block(9)), Err(cairn_agent::Error::StaleEpoch { .. })));
    r.write(5, 0, &block(3)).unwrap();
    r.seal(6, &snap("s1"), 1).unwrap();
    assert_eq!(read_block(&store, 0, Some("s1")), block(3));
}

#[test]
fn try_write_and_try_read_act_like_write_and_read_or_leave_the_replica_alone() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r = store
        .create_replica(&vol(), Geometry::new(1 << 20, 1 << 16).unwrap(), ChunkSet::All)
        .unwrap();
    r.fence(2).unwrap();
    // Same result as write: data, zeros, digest, flush.
    r.try_write(2, BLOCK_SIZE, &block(7)).expect("lock free, epoch admitted").unwrap();
    r.try_write(2, 2 * BLOCK_SIZE, &block(0)).expect("lock free").unwrap();
    assert_eq!(r.try_read(BLOCK_SIZE, BLOCK_SIZE, None).expect("lock free").unwrap(), block(7));
    assert_eq!(read_block(&store, 2, None), block(0));
    // Refusals are the same as write's.
    assert!(r.try_write(1, 0, &block(1)).expect("decided at once").is_err());
    assert!(r.try_write(2, 100, &block(1)).expect("decided at once").is_err());
    // A higher epoch must be committed first, a large write hashes on every
    // core, a large read too: none of them is done in place.
    assert!(r.try_write(3, 0, &block(1)).is_none());
    assert!(r.try_write(2, 0, &vec![1u8; 256 * B]).is_none());
    assert!(r.try_read(0, 256 * BLOCK_SIZE, None).is_none());
    assert_eq!(read_block(&store, 0, None), block(0));
    assert_eq!(r.info().epoch, 2);
    r.flush(2).unwrap();
    drop((r, store));
    let store = open(&disk);
    assert_eq!(read_block(&store, 1, None), block(7));
}

#[test]
fn divergent_marks_survive_a_crash_and_leave_the_generation_line_to_the_others() {
    let disk = SimDisk::new();
    let store = open(&disk);
    let r =
        store.create_replica(&vol(), Geometry::new(1 << 20, 0).unwrap(), ChunkSet::All).unwrap();
    r.write(0, 0, &block(1)).unwrap();
    r.seal(0, &snap("s2"), 2).unwrap();
    r.write(0, 0, &block(3)).unwrap();
    r.seal(0, &snap("s3"), 3).unwrap();
    // Not divergent yet: a lower generation is stale.
    let err = r.seal(0, &snap("t3"), 3).unwrap_err();
    assert!(err.to_string().contains("generation"), "{err}");
    r.mark_divergent(0, &[snap("s3")]).unwrap();
    r.mark_divergent(0, &[snap("s3")]).unwrap(); // a repeat is a no-op
    assert!(r.mark_divergent(0, &[snap("nope")]).is_err(), "an unknown snapshot is refused");
    drop((r, store));
    let crashed = disk.crash_image(cairn_agent::disk::CrashMode::DropUnsynced);
    let store = open(&crashed);
    let r = store.replica(&vol()).unwrap();
    let marks: Vec<(String, bool)> =
        r.snapshots().unwrap().into_iter().map(|s| (s.id.to_string(), s.divergent)).collect();
    assert_eq!(marks, [("s2".to_string(), false), ("s3".to_string(), true)]);
    // The line goes on from s2's generation, beside the divergent s3.
    r.write(0, 0, &block(1)).unwrap();
    r.seal(0, &snap("t3"), 3).unwrap();
    assert_eq!(read_block(&store, 0, Some("s3")), block(3), "the divergent view stays readable");
    // Deleting the divergent snapshot folds nothing the line needs.
    r.delete_snapshot(&snap("s3")).unwrap();
    assert_eq!(read_block(&store, 0, Some("t3")), block(1));
    assert_eq!(read_block(&store, 0, Some("s2")), block(1));
}
