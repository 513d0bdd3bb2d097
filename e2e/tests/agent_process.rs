//! Process-level tests: real `cairn-agent` processes on loopback, driven over
//! gRPC the way a user would drive them. Each test keeps a reference model of
//! what the volume must hold (`cairn_e2e::Reference`) and checks the agent
//! against it: after restarts, after SIGKILL, after bad requests, after a
//! byte of a data file rots, and after a snapshot is deleted.

use std::{
    collections::BTreeMap,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cairn_api::{Accumulator, BLOCK_SIZE, Digest, agent::v1 as pb};
use cairn_e2e::{AgentClient, AgentProcess, Reference, disk_usage, pattern};
use tonic::{Code, Status};

const BS: u64 = BLOCK_SIZE;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The most bytes one read or write may carry.
const MAX_IO: u64 = 4 * MIB;

// ---------------------------------------------------------------------------
// gRPC helpers: one call each, returning the status so tests can check it.

async fn create(
    c: &mut AgentClient,
    vol: &str,
    size: u64,
    chunk: u64,
) -> Result<pb::ReplicaInfo, Status> {
    let req = pb::CreateReplicaRequest {
        volume_id: vol.into(),
        size_bytes: size,
        chunk_size_bytes: chunk,
        chunks: Some(pb::ChunkSet { all: true, chunks: vec![] }),
    };
    Ok(c.create_replica(req).await?.into_inner())
}

async fn write(c: &mut AgentClient, vol: &str, offset: u64, data: Vec<u8>) -> Result<(), Status> {
    let req = pb::WriteBlocksRequest { epoch: 0, volume_id: vol.into(), offset, data: data.into() };
    c.write_blocks(req).await.map(drop)
}

/// Writes to the agent and records the write in `model`.
async fn write_both(
    c: &mut AgentClient,
    vol: &str,
    model: &mut Reference,
    offset: u64,
    data: Vec<u8>,
) {
    model.write(offset, &data);
    let len = data.len();
    write(c, vol, offset, data)
        .await
        .unwrap_or_else(|e| panic!("WriteBlocks {vol} at {offset} (+{len}): {e}"));
}

/// Trims on the agent and in `model`.
async fn trim_both(c: &mut AgentClient, vol: &str, model: &mut Reference, offset: u64, len: u64) {
    model.trim(offset, len);
    trim(c, vol, offset, len).await.unwrap_or_else(|e| panic!("Trim {vol} at {offset}: {e}"));
}

async fn trim(c: &mut AgentClient, vol: &str, offset: u64, length: u64) -> Result<(), Status> {
    c.trim(pb::TrimRequest { epoch: 0, volume_id: vol.into(), offset, length }).await.map(drop)
}

/// Reads the head (`snap` empty) or a snapshot.
async fn read(
    c: &mut AgentClient,
    vol: &str,
    offset: u64,
    length: u64,
    snap: &str,
) -> Result<Vec<u8>, Status> {
    let req =
        pb::ReadBlocksRequest { volume_id: vol.into(), offset, length, snapshot_id: snap.into() };
    Ok(c.read_blocks(req).await?.into_inner().data.to_vec())
}

async fn flush(c: &mut AgentClient, vol: &str) -> Result<(), Status> {
    c.flush(pb::FlushRequest { epoch: 0, volume_id: vol.into() }).await.map(drop)
}

async fn seal(
    c: &mut AgentClient,
    vol: &str,
    id: &str,
    generation: u64,
) -> Result<pb::SnapshotInfo, Status> {
    let req = pb::SealSnapshotRequest {
        epoch: 0,
        volume_id: vol.into(),
        snapshot_id: id.into(),
        generation,
    };
    Ok(c.seal_snapshot(req).await?.into_inner())
}

async fn snapshots(c: &mut AgentClient, vol: &str) -> Result<Vec<pb::SnapshotInfo>, Status> {
    let req = pb::ListSnapshotsRequest { volume_id: vol.into() };
    Ok(c.list_snapshots(req).await?.into_inner().snapshots)
}

async fn delete_snapshot(c: &mut AgentClient, vol: &str, id: &str) -> Result<(), Status> {
    let req = pb::DeleteSnapshotRequest { volume_id: vol.into(), snapshot_id: id.into() };
    c.delete_snapshot(req).await.map(drop)
}

async fn replicas(c: &mut AgentClient) -> Vec<pb::ReplicaInfo> {
    c.list_replicas(pb::ListReplicasRequest {}).await.expect("ListReplicas").into_inner().replicas
}

/// The head's digest, assembled from the per-chunk accumulators the agent
/// reports (as the control plane does across replicas).
async fn head_digest(c: &mut AgentClient, vol: &str, size: u64) -> Digest {
    let req = pb::ChunkDigestsRequest {
        volume_id: vol.into(),
        snapshot_id: String::new(),
        chunks: vec![],
    };
    let chunks = c.chunk_digests(req).await.expect("ChunkDigests").into_inner().chunks;
    let mut acc = Accumulator::default();
    for ch in chunks {
        let bytes: [u8; 32] = ch.accumulator[..].try_into().expect("32-byte accumulator");
        acc.merge(&Accumulator::from_bytes(&bytes));
    }
    acc.digest(size)
}

/// Collects a block stream and checks what every block stream promises:
/// ascending indexes, data of exactly one block or empty (zero block), and
/// a CRC32C that matches the data. Returns index -> data (empty = zeros).
async fn collect(
    mut stream: tonic::Streaming<pb::BlockBatch>,
) -> Result<BTreeMap<u64, Vec<u8>>, Status> {
    let zero_crc = crc32c::crc32c(&[0u8; BS as usize]);
    let mut out = BTreeMap::new();
    let mut last: Option<u64> = None;
    while let Some(batch) = stream.message().await? {
        for b in batch.blocks {
            assert!(last.is_none_or(|l| b.index > l), "block {} after {last:?}", b.index);
            last = Some(b.index);
            if b.data.is_empty() {
                assert_eq!(b.crc32c, zero_crc, "zero block {}: crc32c of 4096 zeros", b.index);
            } else {
                assert_eq!(b.data.len() as u64, BS, "block {}: data length", b.index);
                assert_eq!(b.crc32c, crc32c::crc32c(&b.data), "block {}: crc32c field", b.index);
            }
            out.insert(b.index, b.data.to_vec());
        }
    }
    Ok(out)
}

async fn stream_layer(
    c: &mut AgentClient,
    vol: &str,
    snap: &str,
) -> Result<BTreeMap<u64, Vec<u8>>, Status> {
    let req =
        pb::StreamLayerRequest { volume_id: vol.into(), snapshot_id: snap.into(), chunks: vec![] };
    collect(c.stream_layer(req).await?.into_inner()).await
}

async fn stream_image(
    c: &mut AgentClient,
    vol: &str,
    snap: &str,
) -> Result<BTreeMap<u64, Vec<u8>>, Status> {
    let req =
        pb::StreamImageRequest { volume_id: vol.into(), snapshot_id: snap.into(), chunks: vec![] };
    collect(c.stream_image(req).await?.into_inner()).await
}

/// `base` with a streamed layer applied on top (empty data = zeros).
fn apply(base: &Reference, layer: &BTreeMap<u64, Vec<u8>>) -> Reference {
    let mut out = base.clone();
    for (b, d) in layer {
        if d.is_empty() {
            out.trim(b * BS, BS);
        } else {
            out.write(b * BS, d);
        }
    }
    out
}

fn view(snap: &str) -> String {
    if snap.is_empty() { "the head".into() } else { format!("snapshot {snap}") }
}

/// Reads a whole view (the head when `snap` is empty) in 4 MiB reads and
/// checks every block against `want`.
async fn check_view(c: &mut AgentClient, vol: &str, snap: &str, want: &Reference) {
    let mut offset = 0;
    while offset < want.size {
        let len = MAX_IO.min(want.size - offset);
        let got = read(c, vol, offset, len, snap)
            .await
            .unwrap_or_else(|e| panic!("ReadBlocks {vol}, {} at {offset}: {e}", view(snap)));
        assert_eq!(got.len() as u64, len, "ReadBlocks {vol}, {} at {offset}: length", view(snap));
        if let Some(m) = want.mismatch(offset, &got) {
            panic!("volume {vol}, {}: {m}", view(snap));
        }
        offset += len;
    }
}

/// Checks the head and every snapshot (oldest first) block by block, the
/// snapshot list (ids, generations, sizes, digests) and the head's digest.
async fn check_all(
    c: &mut AgentClient,
    vol: &str,
    head: &Reference,
    snaps: &[(&str, u64, &Reference)],
) {
    check_view(c, vol, "", head).await;
    for (id, _, model) in snaps {
        check_view(c, vol, id, model).await;
    }
    let listed = snapshots(c, vol).await.expect("ListSnapshots");
    let got: Vec<(&str, u64, u64)> =
        listed.iter().map(|s| (s.snapshot_id.as_str(), s.generation, s.size_bytes)).collect();
    let want: Vec<(&str, u64, u64)> =
        snaps.iter().map(|(id, generation, m)| (*id, *generation, m.size)).collect();
    assert_eq!(got, want, "ListSnapshots of {vol}: (id, generation, size), oldest first");
    for (s, (id, _, model)) in listed.iter().zip(snaps) {
        assert_eq!(
            Digest::try_from(&s.digest[..]).expect("32-byte digest"),
            model.digest(),
            "digest of snapshot {id} of {vol}"
        );
    }
    assert_eq!(head_digest(c, vol, head.size).await, head.digest(), "digest of the head of {vol}");
}

/// The `*.layer` data files of a volume on an agent's data dir.
fn layer_files(data_dir: &Path, vol: &str) -> Vec<PathBuf> {
    let dir = data_dir.join("volumes").join(vol);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "layer"))
        .collect();
    files.sort();
    files
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Status>,
    code: Code,
    phrase: &str,
) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?} ({phrase:?}), got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: code (message: {})", s.message());
            assert!(
                s.message().contains(phrase),
                "{what}: the message should say {phrase:?}; it says {:?}",
                s.message()
            );
        }
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn data_and_snapshots_survive_a_restart() {
    const VOL: &str = "survivor";
    const SIZE: u64 = 64 * MIB;
    const CHUNK: u64 = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    let info = create(&mut c, VOL, SIZE, CHUNK).await.expect("CreateReplica");
    assert_eq!((info.size_bytes, info.chunk_size_bytes), (SIZE, CHUNK));
    let mut head = Reference::new(SIZE);

    // Snapshot s1: a 1 MiB run at the start, a run across the boundary
    // between chunks 0 and 1, and the last block of the volume.
    write_both(&mut c, VOL, &mut head, 0, pattern(1, MIB as usize)).await;
    write_both(&mut c, VOL, &mut head, CHUNK - 64 * KIB, pattern(2, 128 * KIB as usize)).await;
    write_both(&mut c, VOL, &mut head, SIZE - BS, pattern(3, BS as usize)).await;
    flush(&mut c, VOL).await.expect("Flush");
    let s1_info = seal(&mut c, VOL, "s1", 1).await.expect("SealSnapshot s1");
    let s1 = head.clone();
    assert_eq!(s1_info.generation, 1);
    assert_eq!(Digest::try_from(&s1_info.digest[..]).unwrap(), s1.digest(), "s1 digest");
    assert_eq!(s1_info.changed_blocks, s1.blocks.len() as u64, "s1 changed blocks");

    // Snapshot s2: overwrite part of the first run, trim its start and one
    // block each side of the chunk boundary, write zeros over a written
    // block, and write somewhere new.
    write_both(&mut c, VOL, &mut head, 512 * KIB, pattern(4, 256 * KIB as usize)).await;
    trim_both(&mut c, VOL, &mut head, 0, 64 * KIB).await;
    trim_both(&mut c, VOL, &mut head, CHUNK - BS, 2 * BS).await;
    write_both(&mut c, VOL, &mut head, 200 * BS, vec![0; BS as usize]).await;
    write_both(&mut c, VOL, &mut head, 40 * MIB, pattern(5, 8 * BS as usize)).await;
    let s2_info = seal(&mut c, VOL, "s2", 2).await.expect("SealSnapshot s2");
    let s2 = head.clone();
    let s2_delta = s2.changed_since(&s1);
    assert_eq!(s2_info.generation, 2);
    assert_eq!(Digest::try_from(&s2_info.digest[..]).unwrap(), s2.digest(), "s2 digest");
    assert_eq!(s2_info.changed_blocks, s2_delta.len() as u64, "s2 changed blocks");

    // The head moves on: overwrite the end of the first run and beyond.
    write_both(&mut c, VOL, &mut head, MIB - 2 * BS, pattern(6, 4 * BS as usize)).await;
    flush(&mut c, VOL).await.expect("Flush");

    check_all(&mut c, VOL, &head, &[("s1", 1, &s1), ("s2", 2, &s2)]).await;

    // s2's layer is exactly its delta from s1 (trimmed blocks as zero
    // blocks); its image is every non-zero block of s2.
    let layer = stream_layer(&mut c, VOL, "s2").await.expect("StreamLayer s2");
    assert_eq!(layer, s2_delta, "StreamLayer s2: the blocks that changed since s1");
    assert_eq!(apply(&s1, &layer), s2, "s1 plus s2's layer is s2");
    let image = stream_image(&mut c, VOL, "s2").await.expect("StreamImage s2");
    assert_eq!(image, s2.blocks, "StreamImage s2: every non-zero block of s2");

    // Deleting s1 changes neither s2 nor the head.
    delete_snapshot(&mut c, VOL, "s1").await.expect("DeleteSnapshot s1");
    assert_refused(
        "ReadBlocks of deleted s1",
        read(&mut c, VOL, 0, BS, "s1").await,
        Code::NotFound,
        "does not exist",
    );
    check_all(&mut c, VOL, &head, &[("s2", 2, &s2)]).await;
    let listed_before = snapshots(&mut c, VOL).await.unwrap();

    // A clean stop and a new agent on the same data dir: all of it is back.
    let first_pid = agent.pid();
    agent.terminate().expect("SIGTERM: the agent exits 0");
    let agent = AgentProcess::start(dir.path()).unwrap();
    assert_ne!(agent.pid(), first_pid);
    let mut c = agent.client().await.unwrap();
    let reps = replicas(&mut c).await;
    assert_eq!(reps.len(), 1, "one replica after restart: {reps:?}");
    assert_eq!((reps[0].volume_id.as_str(), reps[0].size_bytes), (VOL, SIZE));
    assert!(reps[0].serving, "the replica serves after restart");
    check_all(&mut c, VOL, &head, &[("s2", 2, &s2)]).await;
    assert_eq!(snapshots(&mut c, VOL).await.unwrap(), listed_before, "snapshot list after restart");

    // s1 was folded into s2: s2's layer now rebuilds s2 from nothing.
    let layer = stream_layer(&mut c, VOL, "s2").await.expect("StreamLayer s2");
    assert_eq!(apply(&Reference::new(SIZE), &layer), s2, "s2's layer after deleting s1");
    let image = stream_image(&mut c, VOL, "s2").await.expect("StreamImage s2");
    assert_eq!(image, s2.blocks, "StreamImage s2 after restart");

    // And the agent keeps working.
    write_both(&mut c, VOL, &mut head, 50 * MIB, pattern(7, MIB as usize)).await;
    flush(&mut c, VOL).await.expect("Flush");
    check_view(&mut c, VOL, "", &head).await;
    agent.terminate().expect("SIGTERM: the agent exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn unflushed_writes_may_vanish_but_flushed_ones_survive_kill_9() {
    const VOL: &str = "crashy";
    const SIZE: u64 = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    create(&mut c, VOL, SIZE, 0).await.expect("CreateReplica");

    // A: blocks 0..256, flushed. B: blocks 128..384, acknowledged but not
    // flushed; half over A, half over nothing.
    let a = pattern(10, MIB as usize);
    write(&mut c, VOL, 0, a.clone()).await.expect("write A");
    flush(&mut c, VOL).await.expect("flush A");
    let b = pattern(11, MIB as usize);
    for (i, part) in b.chunks(256 * KIB as usize).enumerate() {
        write(&mut c, VOL, 512 * KIB + i as u64 * 256 * KIB, part.to_vec()).await.expect("write B");
    }
    agent.kill9().unwrap();

    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    let got = read(&mut c, VOL, 0, 2 * MIB, "").await.expect("ReadBlocks after kill -9");
    let bs = BS as usize;
    let (mut b_blocks, mut seen) = (0, Reference::new(SIZE));
    for (i, block) in got.chunks(bs).enumerate() {
        let a_block = a.get(i * bs..(i + 1) * bs);
        let b_block = i.checked_sub(128).and_then(|j| b.get(j * bs..(j + 1) * bs));
        let zeros = [0u8; BS as usize];
        let old: &[u8] = if i < 256 { a_block.unwrap() } else { &zeros };
        if Some(block) == b_block && (128..384).contains(&i) {
            b_blocks += 1;
        } else {
            assert_eq!(
                block, old,
                "block {i}: neither the flushed (or never-written) content nor B's: torn or lost"
            );
        }
        seen.write(i as u64 * BS, block);
    }
    eprintln!("after kill -9: {b_blocks} of 256 unflushed blocks survived");
    // The agent's index agrees with the data it serves.
    assert_eq!(head_digest(&mut c, VOL, SIZE).await, seen.digest(), "head digest after kill -9");

    // It keeps working, and a clean restart keeps what we saw.
    let mut model = seen;
    write_both(&mut c, VOL, &mut model, 4 * MIB, pattern(12, MIB as usize)).await;
    flush(&mut c, VOL).await.expect("Flush");
    agent.terminate().expect("SIGTERM: the agent exits 0");
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    check_view(&mut c, VOL, "", &model).await;
    assert_eq!(head_digest(&mut c, VOL, SIZE).await, model.digest());
}

#[tokio::test(flavor = "multi_thread")]
async fn second_agent_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = AgentProcess::start(dir.path()).unwrap();
    let mut c = first.client().await.unwrap();
    create(&mut c, "held", 4 * MIB, 0).await.expect("CreateReplica");

    let started = Instant::now();
    let mut second = Command::new(cairn_e2e::agent_binary().unwrap())
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while second.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            second.kill().unwrap();
            panic!("a second agent on a held data dir still runs after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent must fail; it exited with {}", out.status);
    assert!(stderr.contains("in use"), "stderr should say the dir is in use: {stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "stderr should name the holder (pid {}): {stderr}",
        first.pid()
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "the second agent must not serve"
    );

    // The first agent is untouched.
    let reps = replicas(&mut c).await;
    assert_eq!(reps.len(), 1);
    assert!(reps[0].serving);
    first.terminate().expect("SIGTERM: the agent exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_leave_the_replica_intact() {
    const VOL: &str = "strict";
    const SIZE: u64 = 16 * MIB;
    const CHUNK: u64 = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    create(&mut c, VOL, SIZE, CHUNK).await.expect("CreateReplica");
    let mut head = Reference::new(SIZE);
    write_both(&mut c, VOL, &mut head, 0, pattern(20, 2 * MIB as usize)).await;
    write_both(&mut c, VOL, &mut head, SIZE - MIB, pattern(21, MIB as usize)).await;
    seal(&mut c, VOL, "s1", 5).await.expect("SealSnapshot s1");
    let s1 = head.clone();
    write_both(&mut c, VOL, &mut head, 6 * MIB, pattern(22, MIB as usize)).await;
    flush(&mut c, VOL).await.expect("Flush");
    let snaps_before = snapshots(&mut c, VOL).await.unwrap();
    let replicas_before = replicas(&mut c).await;

    // Volume ids that are not lowercase DNS labels, on every kind of call.
    for (bad, says) in [
        ("../etc", "has '.' at position 0"),
        ("Bad_Name", "has 'B' at position 0"),
        ("", "volume id is empty"),
    ] {
        let what = |rpc: &str| format!("{rpc} with volume id {bad:?}");
        assert_refused(
            &what("CreateReplica"),
            create(&mut c, bad, SIZE, 0).await,
            Code::InvalidArgument,
            says,
        );
        assert_refused(
            &what("WriteBlocks"),
            write(&mut c, bad, 0, vec![1; BS as usize]).await,
            Code::InvalidArgument,
            says,
        );
        assert_refused(
            &what("ReadBlocks"),
            read(&mut c, bad, 0, BS, "").await,
            Code::InvalidArgument,
            says,
        );
        assert_refused(
            &what("SealSnapshot"),
            seal(&mut c, bad, "s9", 9).await,
            Code::InvalidArgument,
            says,
        );
        assert_refused(&what("Flush"), flush(&mut c, bad).await, Code::InvalidArgument, says);
    }
    assert_refused(
        "SealSnapshot with snapshot id \"S2\"",
        seal(&mut c, VOL, "S2", 9).await,
        Code::InvalidArgument,
        "snapshot id \"S2\" has 'S'",
    );

    // Ranges.
    assert_refused(
        "WriteBlocks at the end of the volume",
        write(&mut c, VOL, SIZE, vec![1; BS as usize]).await,
        Code::OutOfRange,
        "past the end of the 16777216-byte volume",
    );
    assert_refused(
        "WriteBlocks across the end of the volume",
        write(&mut c, VOL, SIZE - BS, vec![1; 2 * BS as usize]).await,
        Code::OutOfRange,
        "past the end",
    );
    assert_refused(
        "ReadBlocks past the end",
        read(&mut c, VOL, SIZE, BS, "").await,
        Code::OutOfRange,
        "past the end",
    );
    assert_refused(
        "WriteBlocks at offset 100",
        write(&mut c, VOL, 100, vec![1; BS as usize]).await,
        Code::InvalidArgument,
        "must be multiples of 4096",
    );
    assert_refused(
        "WriteBlocks of 100 bytes",
        write(&mut c, VOL, 0, vec![1; 100]).await,
        Code::InvalidArgument,
        "must be multiples of 4096",
    );
    assert_refused(
        "ReadBlocks at offset 100",
        read(&mut c, VOL, 100, BS, "").await,
        Code::InvalidArgument,
        "must be multiples of 4096",
    );
    assert_refused(
        "Trim of 100 bytes",
        trim(&mut c, VOL, 0, 100).await,
        Code::InvalidArgument,
        "must be multiples of 4096",
    );
    assert_refused(
        "WriteBlocks of 0 bytes",
        write(&mut c, VOL, 0, vec![]).await,
        Code::InvalidArgument,
        "length is zero",
    );
    // 5 MiB fits the 8 MiB gRPC message limit: the store's own 4 MiB limit
    // must refuse it.
    assert_refused(
        "WriteBlocks of 5 MiB",
        write(&mut c, VOL, 0, vec![7; 5 * MIB as usize]).await,
        Code::InvalidArgument,
        "over the limit of 4194304 bytes",
    );
    assert_refused(
        "ReadBlocks of 5 MiB",
        read(&mut c, VOL, 0, 5 * MIB, "").await,
        Code::InvalidArgument,
        "over the limit of 4194304 bytes",
    );

    // Snapshots.
    assert_refused(
        "ReadBlocks of unknown snapshot",
        read(&mut c, VOL, 0, BS, "nope").await,
        Code::NotFound,
        "snapshot nope of volume strict does not exist",
    );
    assert_refused(
        "DeleteSnapshot of unknown snapshot",
        delete_snapshot(&mut c, VOL, "nope").await,
        Code::NotFound,
        "snapshot nope of volume strict does not exist",
    );
    assert_refused(
        "StreamImage of unknown snapshot",
        stream_image(&mut c, VOL, "nope").await,
        Code::NotFound,
        "does not exist",
    );
    assert_refused(
        "SealSnapshot reusing id s1",
        seal(&mut c, VOL, "s1", 9).await,
        Code::AlreadyExists,
        "snapshot s1 of volume strict already exists",
    );
    assert_refused(
        "SealSnapshot with the last generation",
        seal(&mut c, VOL, "s2", 5).await,
        Code::FailedPrecondition,
        "generation 5 is not above 5",
    );
    assert_refused(
        "SealSnapshot with an older generation",
        seal(&mut c, VOL, "s2", 2).await,
        Code::FailedPrecondition,
        "generation 2 is not above 5",
    );

    // Unknown volume.
    let unknown = "no-such-volume has no replica on this agent";
    assert_refused(
        "ReadBlocks of unknown volume",
        read(&mut c, "no-such-volume", 0, BS, "").await,
        Code::NotFound,
        unknown,
    );
    assert_refused(
        "WriteBlocks to unknown volume",
        write(&mut c, "no-such-volume", 0, vec![1; BS as usize]).await,
        Code::NotFound,
        unknown,
    );
    assert_refused(
        "SealSnapshot of unknown volume",
        seal(&mut c, "no-such-volume", "s9", 9).await,
        Code::NotFound,
        unknown,
    );
    assert_refused(
        "ListSnapshots of unknown volume",
        snapshots(&mut c, "no-such-volume").await,
        Code::NotFound,
        unknown,
    );

    // Geometry.
    assert_refused(
        "CreateReplica of size 0",
        create(&mut c, "empty", 0, 0).await,
        Code::InvalidArgument,
        "volume size 0 bytes is not a positive multiple of 4096",
    );
    assert_refused(
        "CreateReplica with 3 MiB chunks",
        create(&mut c, "odd-chunks", SIZE, 3 * MIB).await,
        Code::InvalidArgument,
        "chunk size 3145728 bytes must be a power of two",
    );
    assert_refused(
        "CreateReplica again with another size",
        create(&mut c, VOL, 2 * SIZE, CHUNK).await,
        Code::AlreadyExists,
        "volume strict already has a replica here",
    );
    let again = create(&mut c, VOL, SIZE, CHUNK).await.expect("CreateReplica again, same geometry");
    assert_eq!((again.size_bytes, again.chunk_size_bytes), (SIZE, CHUNK));
    assert_eq!(again.sealed_layers, 1, "the repeat returns the existing replica");

    // Nothing changed: same replicas, same snapshots, same data, and no
    // directory outside the data dir's volumes.
    assert_eq!(replicas(&mut c).await, replicas_before, "ListReplicas after the bad requests");
    assert_eq!(snapshots(&mut c, VOL).await.unwrap(), snaps_before, "ListSnapshots");
    check_all(&mut c, VOL, &head, &[("s1", 5, &s1)]).await;
    assert!(!dir.path().join("etc").exists(), "\"../etc\" must not create a directory");
    let dirs: Vec<String> = std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs, [VOL], "volume directories");
    agent.terminate().expect("SIGTERM: the agent exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_block_is_detected_never_returned() {
    const VOL: &str = "rotten";
    const SIZE: u64 = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    create(&mut c, VOL, SIZE, 0).await.expect("CreateReplica");
    let mut head = Reference::new(SIZE);
    write_both(&mut c, VOL, &mut head, 0, pattern(30, MIB as usize)).await;
    flush(&mut c, VOL).await.expect("Flush");
    agent.terminate().expect("SIGTERM: the agent exits 0");

    // A fresh replica written once from offset 0: slot i holds block i.
    let files = layer_files(dir.path(), VOL);
    assert_eq!(files.len(), 1, "one layer file: {files:?}");
    let at = 5 * BS + 17;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&files[0]).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    assert_eq!(byte[0], head.read(5 * BS, BS)[17], "slot 5 holds block 5");
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    for (what, offset, len) in
        [("ReadBlocks of block 5", 5 * BS, BS), ("ReadBlocks of the first MiB", 0, MIB)]
    {
        let got = read(&mut c, VOL, offset, len, "").await.map(|d| d.len());
        let msg = got.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert_refused(what, got, Code::DataLoss, "volume rotten");
        assert!(msg.contains("chunk 0"), "{what}: the message should name the chunk: {msg}");
        assert!(
            msg.contains("byte offset 20480"),
            "{what}: the message should name the offset: {msg}"
        );
    }
    // The blocks around it are fine.
    for offset in [4 * BS, 6 * BS, 0] {
        let got = read(&mut c, VOL, offset, BS, "").await.expect("ReadBlocks of a healthy block");
        assert_eq!(head.mismatch(offset, &got), None);
    }
    // A stream of a snapshot holding the bad block fails too: it never
    // yields the block.
    seal(&mut c, VOL, "s1", 1).await.expect("SealSnapshot");
    assert_refused(
        "StreamImage of a snapshot with a corrupt block",
        stream_image(&mut c, VOL, "s1").await,
        Code::DataLoss,
        "byte offset 20480",
    );
    // The agent still serves the volume.
    write_both(&mut c, VOL, &mut head, 2 * MIB, pattern(31, MIB as usize)).await;
    let got = read(&mut c, VOL, 2 * MIB, MIB, "").await.expect("ReadBlocks of new data");
    assert_eq!(head.mismatch(2 * MIB, &got), None);
    agent.terminate().expect("SIGTERM: the agent exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn sealing_is_cheap_and_space_comes_back_after_deleting_a_snapshot() {
    const VOL: &str = "roomy";
    const SIZE: u64 = 64 * MIB;
    const DATA: u64 = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let vol_dir = dir.path().join("volumes").join(VOL);
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    create(&mut c, VOL, SIZE, 0).await.expect("CreateReplica");
    let mut head = Reference::new(SIZE);

    for i in 0..DATA / MAX_IO {
        write_both(&mut c, VOL, &mut head, i * MAX_IO, pattern(40 + i, MAX_IO as usize)).await;
    }
    flush(&mut c, VOL).await.expect("Flush");
    let before_seal = disk_usage(&vol_dir).unwrap();
    assert!(before_seal >= DATA, "16 MiB written take {before_seal} bytes");
    seal(&mut c, VOL, "s1", 1).await.expect("SealSnapshot s1");
    let after_seal = disk_usage(&vol_dir).unwrap();
    assert!(
        after_seal < before_seal + MIB,
        "sealing copies no data: {before_seal} bytes before, {after_seal} after"
    );

    for i in 0..DATA / MAX_IO {
        write_both(&mut c, VOL, &mut head, i * MAX_IO, pattern(50 + i, MAX_IO as usize)).await;
    }
    seal(&mut c, VOL, "s2", 2).await.expect("SealSnapshot s2");
    let s2 = head.clone();
    flush(&mut c, VOL).await.expect("Flush");
    let before = disk_usage(&vol_dir).unwrap();
    assert!(before >= 2 * DATA, "two versions of 16 MiB take {before} bytes");

    delete_snapshot(&mut c, VOL, "s1").await.expect("DeleteSnapshot s1");
    let after = disk_usage(&vol_dir).unwrap();
    assert!(
        after + 12 * MIB <= before,
        "deleting s1 (16 MiB, all overwritten in s2) frees at least 12 MiB: {before} bytes before, {after} after"
    );
    let reps = replicas(&mut c).await;
    assert_eq!(reps[0].used_bytes, DATA, "ReplicaInfo.used_bytes after deleting s1");
    check_all(&mut c, VOL, &head, &[("s2", 2, &s2)]).await;
    agent.terminate().expect("SIGTERM: the agent exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_head_epoch_is_refused_over_grpc_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    let vol = "fenced";
    create(&mut c, vol, 16 * MIB, 0).await.unwrap();
    let put = |epoch: u64, fill: u8| pb::WriteBlocksRequest {
        volume_id: vol.into(),
        offset: 0,
        data: vec![fill; BS as usize].into(),
        epoch,
    };
    c.write_blocks(put(3, 1)).await.unwrap();
    c.flush(pb::FlushRequest { volume_id: vol.into(), epoch: 3 }).await.unwrap();
    // A new head at epoch 4 fences the old one before writing.
    let fenced = c
        .fence(pb::FenceRequest { volume_id: vol.into(), epoch: 4, head: String::new() })
        .await
        .unwrap();
    assert_eq!(fenced.into_inner().epoch, 4);
    let err = c.write_blocks(put(3, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("epoch 3") && err.message().contains("epoch 4"), "{err:?}");
    agent.terminate().unwrap();

    let agent = AgentProcess::start(dir.path()).unwrap();
    let mut c = agent.client().await.unwrap();
    let err = c.write_blocks(put(3, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "still fenced after a restart: {err:?}");
    let seal = pb::SealSnapshotRequest {
        volume_id: vol.into(),
        snapshot_id: "s1".into(),
        generation: 1,
        epoch: 2,
    };
    assert_eq!(c.seal_snapshot(seal).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(read(&mut c, vol, 0, BS, "").await.unwrap(), vec![1u8; BS as usize]);
    c.write_blocks(put(4, 5)).await.unwrap();
    assert_eq!(read(&mut c, vol, 0, BS, "").await.unwrap(), vec![5u8; BS as usize]);
    let info = replicas(&mut c).await.into_iter().find(|r| r.volume_id == vol).unwrap();
    assert_eq!(info.epoch, 4);
}
