//! Remote copy between two sites of real agent processes on loopback:
//! site A (two agents, a volume with two replicas) copies snapshots to site
//! B (one agent, the remote volume). A full copy, then an incremental one
//! that sends only the changed layer, each sealed at B under the same id
//! with the same digest; a sender with the wrong pairing secret refused
//! with nothing written; a copy broken by kill -9 of the receiver resumes
//! from its last checkpoint after a restart.

use std::{ffi::OsStr, time::Duration};

use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, pattern};
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const CHUNK: u64 = 64 * MIB;
const SECRET: &[u8] = b"0123456789abcdef-pairing";

fn open_request(
    volume: &str,
    agents: &[(&str, &AgentProcess)],
    replicas: u32,
    epoch: u64,
) -> pb::OpenHeadRequest {
    let agents = agents.iter().map(|(name, a)| (name.to_string(), a.endpoint()));
    let role = if volume == "dst" { pb::VolumeRole::Remote } else { pb::VolumeRole::Primary };
    pb::OpenHeadRequest {
        epoch,
        role: role as i32,
        ..cairn_e2e::open_head_request(volume, SIZE, CHUNK, replicas, agents)
    }
}

async fn write(heads: &mut HeadsClient, offset: u64, data: Vec<u8>) {
    let req = pb::HeadWriteRequest { volume_id: "src".into(), offset, data: data.into() };
    heads.head_write(req).await.unwrap();
}

async fn snapshot(heads: &mut HeadsClient, volume: &str, id: &str, generation: u64) -> Vec<u8> {
    let req =
        pb::HeadSnapshotRequest { volume_id: volume.into(), snapshot_id: id.into(), generation };
    heads.head_snapshot(req).await.unwrap().into_inner().digest.to_vec()
}

async fn digest(heads: &mut HeadsClient, volume: &str, snapshot: &str) -> Vec<u8> {
    let req = pb::HeadDigestRequest { volume_id: volume.into(), snapshot_id: snapshot.into() };
    heads.head_digest(req).await.unwrap().into_inner().digest.to_vec()
}

/// Polls the source's copy progress until `done` holds (30 s at most).
async fn progress_until(
    heads: &HeadsClient,
    done: impl Fn(&pb::CopyProgressResponse) -> bool,
) -> pb::CopyProgressResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = heads
            .clone()
            .get_copy_progress(pb::CopyProgressRequest {
                volume_id: "src".into(),
                link_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if done(&p) {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "copy progress not reached in time: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn copy_request(
    snapshot: &str,
    base: &str,
    to: &AgentProcess,
    secret: &[u8],
    rate: u64,
) -> pb::CopySnapshotRequest {
    pb::CopySnapshotRequest {
        volume_id: "src".into(),
        snapshot_id: snapshot.into(),
        base_snapshot_id: base.into(),
        link_id: "a-to-b".into(),
        pairing_secret: secret.to_vec().into(),
        target_endpoint: to.endpoint(),
        rate_bytes_per_sec: rate,
        source: pb::SourceSelection::Primary as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_copy_full_then_incremental_and_resume_after_the_receiver_is_killed() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let a2 = AgentProcess::start_named(dirs[1].path(), "a2").unwrap();
    let b_args = [OsStr::new("--copy-checkpoint-mib"), OsStr::new("2")];
    let mut b1 = AgentProcess::start_args(dirs[2].path(), "b1", &b_args).unwrap();

    let mut site_a = a1.heads().await.unwrap();
    site_a.open_head(open_request("src", &[("a1", &a1), ("a2", &a2)], 2, 1)).await.unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", &[("b1", &b1)], 1, 1)).await.unwrap();
    let mut copy_b = cairn_e2e::copy_client(&b1).await.unwrap();
    let register = pb::RegisterLinkRequest {
        link_id: "a-to-b".into(),
        pairing_secret: SECRET.to_vec().into(),
        target_volume_id: "dst".into(),
    };
    copy_b.register_link(register).await.unwrap();

    // A full copy: 24 MiB of data in three chunks.
    for i in 0..24u64 {
        write(&mut site_a, (i % 3) * CHUNK + i * MIB, pattern(i, MIB as usize)).await;
    }
    let s1 = snapshot(&mut site_a, "src", "s1", 1).await;
    let full =
        site_a.copy_snapshot(copy_request("s1", "", &b1, SECRET, 0)).await.unwrap().into_inner();
    assert_eq!(full.digest.to_vec(), s1, "the copy reports the source's digest");
    assert_eq!(digest(&mut site_b, "dst", "s1").await, s1, "s1 at B has A's digest");
    assert_eq!(full.bytes_sent, 24 * MIB, "a full copy sends the written blocks only");

    // An incremental copy sends the layer of s2 only: 3 blocks and a trim.
    write(&mut site_a, 5 * MIB, pattern(100, 3 * 4096)).await;
    let trim = pb::HeadTrimRequest { volume_id: "src".into(), offset: CHUNK + MIB, length: MIB };
    site_a.head_trim(trim).await.unwrap();
    let s2 = snapshot(&mut site_a, "src", "s2", 2).await;
    let incr =
        site_a.copy_snapshot(copy_request("s2", "s1", &b1, SECRET, 0)).await.unwrap().into_inner();
    assert_eq!(digest(&mut site_b, "dst", "s2").await, s2, "s2 at B has A's digest");
    assert_eq!(incr.bytes_sent, 3 * 4096, "only the changed blocks' data is sent");
    assert_eq!(incr.blocks_sent, 3 + 256, "3 written blocks and 256 trimmed ones");
    let again =
        site_a.copy_snapshot(copy_request("s2", "s1", &b1, SECRET, 0)).await.unwrap().into_inner();
    assert!(again.already_present && again.bytes_sent == 0, "{again:?}");

    // The wrong pairing secret: refused, and nothing written at B.
    for i in 0..4u64 {
        write(&mut site_a, i * MIB, pattern(200 + i, MIB as usize)).await;
    }
    let s3 = snapshot(&mut site_a, "src", "s3", 3).await;
    let bad = site_a
        .copy_snapshot(copy_request("s3", "s2", &b1, b"not-the-secret-at-all", 0))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated, "{bad:?}");
    assert!(bad.message().contains("pairing secret"), "{bad:?}");
    assert_eq!(digest(&mut site_b, "dst", "").await, s2, "B's head is untouched: still s2");

    // A bigger change, copied at 8 MiB/s; the receiver is killed after a
    // checkpoint and restarted; the copy resumes from the checkpoint.
    for i in 0..48u64 {
        write(
            &mut site_a,
            (i % 4) * CHUNK + (i / 4) * MIB + 8 * MIB,
            pattern(300 + i, MIB as usize),
        )
        .await;
    }
    let s4 = snapshot(&mut site_a, "src", "s4", 4).await;
    let slow = {
        let mut a = site_a.clone();
        let req = copy_request("s3", "s2", &b1, SECRET, 0);
        a.copy_snapshot(req).await.unwrap();
        let req = copy_request("s4", "s3", &b1, SECRET, 8 * MIB);
        tokio::spawn(async move { a.copy_snapshot(req).await })
    };
    let p = progress_until(&site_a, |p| p.snapshot_id == "s4" && p.bytes_durable >= 6 * MIB).await;
    assert_eq!(p.bytes_total, 48 * MIB, "the total is known from the start: {p:?}");
    assert!(p.eta_seconds > 0.0, "{p:?}");
    let addr = b1.addr();
    b1.kill9().unwrap();
    let broken = slow.await.unwrap();
    assert!(broken.is_err(), "the copy breaks with its receiver: {broken:?}");
    b1 = AgentProcess::start_on(dirs[2].path(), "b1", addr, &b_args).unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", &[("b1", &b1)], 1, 2)).await.unwrap();
    let resumed =
        site_a.copy_snapshot(copy_request("s4", "s3", &b1, SECRET, 0)).await.unwrap().into_inner();
    assert!(resumed.resumed_from_block > 0, "resumed at a checkpoint: {resumed:?}");
    assert!(resumed.bytes_sent < 48 * MIB - 4 * MIB, "{resumed:?}");
    assert_eq!(digest(&mut site_b, "dst", "s4").await, s4, "s4 at B has A's digest");
    assert_eq!(digest(&mut site_b, "dst", "s3").await, s3);
    eprintln!(
        "resume: from block {}, {} MiB sent again of 48",
        resumed.resumed_from_block,
        resumed.bytes_sent as f64 / MIB as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_promotes_the_remote_from_its_newest_complete_snapshot() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let b_args = [OsStr::new("--copy-checkpoint-mib"), OsStr::new("1")];
    let b1 = AgentProcess::start_args(dirs[1].path(), "b1", &b_args).unwrap();
    let mut site_a = a1.heads().await.unwrap();
    site_a.open_head(open_request("src", &[("a1", &a1)], 1, 1)).await.unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", &[("b1", &b1)], 1, 1)).await.unwrap();
    let register = pb::RegisterLinkRequest {
        link_id: "a-to-b".into(),
        pairing_secret: SECRET.to_vec().into(),
        target_volume_id: "dst".into(),
    };
    cairn_e2e::copy_client(&b1).await.unwrap().register_link(register).await.unwrap();

    for i in 0..8u64 {
        write(&mut site_a, i * MIB, pattern(i, MIB as usize)).await;
    }
    let s1 = snapshot(&mut site_a, "src", "s1", 1).await;
    site_a.copy_snapshot(copy_request("s1", "", &b1, SECRET, 0)).await.unwrap();

    // A remote volume: clients cannot write it.
    let w =
        pb::HeadWriteRequest { volume_id: "dst".into(), offset: 0, data: vec![1u8; 4096].into() };
    let refused = site_b.head_write(w.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("promote"), "{refused:?}");

    // s2 is being copied slowly when site A is lost.
    for i in 0..16u64 {
        write(&mut site_a, 10 * MIB + i * MIB, pattern(50 + i, MIB as usize)).await;
    }
    snapshot(&mut site_a, "src", "s2", 2).await;
    let copy = {
        let mut a = site_a.clone();
        let req = copy_request("s2", "s1", &b1, SECRET, 2 * MIB);
        tokio::spawn(async move { a.copy_snapshot(req).await })
    };
    progress_until(&site_a, |p| p.snapshot_id == "s2" && p.bytes_durable >= 2 * MIB).await;
    a1.kill9().unwrap();
    assert!(copy.await.unwrap().is_err(), "the copy dies with site A");
    assert_ne!(digest(&mut site_b, "dst", "").await, s1, "B's head holds part of s2");

    // Failover: B goes on from s1, the newest complete snapshot.
    let promoted = site_b
        .promote_head(pb::PromoteHeadRequest { volume_id: "dst".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promoted.base_snapshot_id, "s1");
    assert_eq!(promoted.digest.to_vec(), s1, "the partial s2 is gone");
    site_b.head_write(w).await.unwrap();
    let read = pb::HeadReadRequest { volume_id: "dst".into(), offset: 0, length: 8192 };
    let got = site_b.head_read(read).await.unwrap().into_inner().data;
    assert_eq!(&got[..4096], &[1u8; 4096][..], "written at B after the failover");
    assert_eq!(&got[4096..], &pattern(0, MIB as usize)[4096..8192], "s1's data under it");

    // A primary is never overwritten by a copy; demoted, it takes copies
    // again and refuses clients.
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let mut site_a = a1.heads().await.unwrap();
    site_a.open_head(open_request("src", &[("a1", &a1)], 1, 2)).await.unwrap();
    let err = site_a.copy_snapshot(copy_request("s2", "s1", &b1, SECRET, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("primary at this site"), "{err:?}");
    let demote = pb::DemoteHeadRequest {
        volume_id: "dst".into(),
        snapshot_id: "b-final".into(),
        generation: 3,
    };
    site_b.demote_head(demote).await.unwrap();
    let w =
        pb::HeadWriteRequest { volume_id: "dst".into(), offset: 0, data: vec![2u8; 4096].into() };
    assert_eq!(site_b.head_write(w).await.unwrap_err().code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_goes_on_from_another_replica_when_its_source_is_killed() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a: Vec<AgentProcess> = (0..3)
        .map(|i| AgentProcess::start_named(dirs[i].path(), &format!("a{}", i + 1)).unwrap())
        .collect();
    let b1 = AgentProcess::start_named(dirs[3].path(), "b1").unwrap();
    let mut site_a = a[0].heads().await.unwrap();
    let agents = [("a1", &a[0]), ("a2", &a[1]), ("a3", &a[2])];
    site_a.open_head(open_request("src", &agents, 2, 1)).await.unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", &[("b1", &b1)], 1, 1)).await.unwrap();
    let register = pb::RegisterLinkRequest {
        link_id: "a-to-b".into(),
        pairing_secret: SECRET.to_vec().into(),
        target_volume_id: "dst".into(),
    };
    cairn_e2e::copy_client(&b1).await.unwrap().register_link(register).await.unwrap();
    for i in 0..32u64 {
        write(&mut site_a, (i % 4) * CHUNK + (i / 4) * MIB, pattern(700 + i, MIB as usize)).await;
    }
    let s1 = snapshot(&mut site_a, "src", "s1", 1).await;

    // Read from replicas away from the head (a2, a3), slowly; a2 is killed.
    let copy = {
        let mut h = site_a.clone();
        let mut req = copy_request("s1", "", &b1, SECRET, 8 * MIB);
        req.source = pb::SourceSelection::Replica as i32;
        tokio::spawn(async move { h.copy_snapshot(req).await })
    };
    progress_until(&site_a, |p| p.bytes_sent >= 4 * MIB).await;
    let mut a = a;
    a.remove(1).kill9().unwrap();
    let done = copy.await.unwrap().expect("the copy goes on from other replicas").into_inner();
    assert_eq!(done.digest.to_vec(), s1);
    assert_eq!(digest(&mut site_b, "dst", "s1").await, s1, "s1 at B has A's digest");
    let status = site_a
        .get_head_status(pb::HeadStatusRequest { volume_id: "src".into() })
        .await
        .unwrap()
        .into_inner();
    let a2 = status.replicas.iter().find(|r| r.agent == "a2").unwrap();
    assert!(!a2.in_sync, "the killed source is out of sync: {a2:?}");
}
