//! Copies fenced by the target's role, with real agent processes on
//! loopback (issue 14, scenario 3): a copy running into site B when B is
//! promoted ends at the promote, with a clear error at the sender, and the
//! writes made at B afterwards are never overwritten; after B is demoted, a
//! resync brings B to the source's snapshot with its digest, keeping B's
//! writes in its divergent snapshot. A stream that stalls is ended after
//! the receiver's idle timeout, keeping its checkpoint; while it lives, a
//! second copy into the same target is refused; afterwards the copy resumes
//! at the checkpoint and seals with the source's digest. A copy after a
//! promote starts afresh: the promote dropped what its checkpoint names.

use std::{ffi::OsStr, time::Duration};

use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, pattern, proxy::DelayProxy};
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 128 * MIB;
const CHUNK: u64 = 32 * MIB;
const SECRET: &[u8] = b"0123456789abcdef-fenced-copy";

fn open_request(volume: &str, name: &str, agent: &AgentProcess, epoch: u64) -> pb::OpenHeadRequest {
    let role = if volume == "dst" { pb::VolumeRole::Remote } else { pb::VolumeRole::Primary };
    let agents = [(name.to_string(), agent.endpoint())];
    pb::OpenHeadRequest {
        epoch,
        role: role as i32,
        ..cairn_e2e::open_head_request(volume, SIZE, CHUNK, 1, agents)
    }
}

async fn write(heads: &mut HeadsClient, volume: &str, offset: u64, data: Vec<u8>) {
    let req = pb::HeadWriteRequest { volume_id: volume.into(), offset, data: data.into() };
    heads.head_write(req).await.unwrap();
}

async fn read(heads: &mut HeadsClient, volume: &str, offset: u64, length: u64) -> Vec<u8> {
    let req = pb::HeadReadRequest { volume_id: volume.into(), offset, length };
    heads.head_read(req).await.unwrap().into_inner().data.to_vec()
}

async fn snapshot(heads: &mut HeadsClient, id: &str, generation: u64) -> Vec<u8> {
    let req =
        pb::HeadSnapshotRequest { volume_id: "src".into(), snapshot_id: id.into(), generation };
    heads.head_snapshot(req).await.unwrap().into_inner().digest.to_vec()
}

async fn digest(heads: &mut HeadsClient, volume: &str, snapshot: &str) -> Vec<u8> {
    let req = pb::HeadDigestRequest { volume_id: volume.into(), snapshot_id: snapshot.into() };
    heads.head_digest(req).await.unwrap().into_inner().digest.to_vec()
}

async fn register(b: &AgentProcess, link: &str) {
    let req = pb::RegisterLinkRequest {
        link_id: link.into(),
        pairing_secret: SECRET.to_vec().into(),
        target_volume_id: "dst".into(),
    };
    cairn_e2e::copy_client(b).await.unwrap().register_link(req).await.unwrap();
}

fn copy_request(
    link: &str,
    snapshot: &str,
    base: &str,
    to: String,
    rate: u64,
) -> pb::CopySnapshotRequest {
    pb::CopySnapshotRequest {
        volume_id: "src".into(),
        snapshot_id: snapshot.into(),
        base_snapshot_id: base.into(),
        link_id: link.into(),
        pairing_secret: SECRET.to_vec().into(),
        target_endpoint: to,
        rate_bytes_per_sec: rate,
        source: pb::SourceSelection::Primary as i32,
        ..Default::default()
    }
}

/// Polls the source's copy progress until `done` holds (30 s at most).
async fn progress_until(
    heads: &HeadsClient,
    done: impl Fn(&pb::CopyProgressResponse) -> bool,
) -> pb::CopyProgressResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let req = pb::CopyProgressRequest { volume_id: "src".into(), link_id: String::new() };
        let p = heads.clone().get_copy_progress(req).await.unwrap().into_inner();
        if done(&p) {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "copy progress not reached in time: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promote_during_a_copy_ends_it_and_writes_made_after_it_are_never_overwritten() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let b_args = [OsStr::new("--copy-checkpoint-mib"), OsStr::new("1")];
    let b1 = AgentProcess::start_args(dirs[1].path(), "b1", &b_args).unwrap();
    let mut site_a = a1.heads().await.unwrap();
    site_a.open_head(open_request("src", "a1", &a1, 1)).await.unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", "b1", &b1, 1)).await.unwrap();
    register(&b1, "a-to-b").await;

    for i in 0..4u64 {
        write(&mut site_a, "src", i * MIB, pattern(i, MIB as usize)).await;
    }
    let s1 = snapshot(&mut site_a, "s1", 1).await;
    site_a.copy_snapshot(copy_request("a-to-b", "s1", "", b1.endpoint(), 0)).await.unwrap();

    // s2 changes 16 MiB from 8 MiB on; it is copied at 2 MiB/s.
    for i in 0..16u64 {
        write(&mut site_a, "src", 8 * MIB + i * MIB, pattern(100 + i, MIB as usize)).await;
    }
    let s2 = snapshot(&mut site_a, "s2", 2).await;
    let copy = {
        let mut a = site_a.clone();
        let req = copy_request("a-to-b", "s2", "s1", b1.endpoint(), 2 * MIB);
        tokio::spawn(async move { a.copy_snapshot(req).await })
    };
    progress_until(&site_a, |p| p.snapshot_id == "s2" && p.bytes_durable >= 2 * MIB).await;

    // Failover while the copy runs: B goes on from s1 and is written, at
    // blocks the copy has already written and at blocks it has not reached.
    let promoted = site_b
        .promote_head(pb::PromoteHeadRequest { volume_id: "dst".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promoted.base_snapshot_id, "s1");
    assert_eq!(promoted.digest.to_vec(), s1, "the part of s2 that arrived is dropped");
    let ours = |i: u64| pattern(900 + i, MIB as usize);
    for i in [0u64, 8, 9, 20, 22, 23] {
        write(&mut site_b, "dst", i * MIB, ours(i)).await;
    }

    let err = copy.await.unwrap().expect_err("the copy ends at the promote");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("was promoted") && err.message().contains("start the copy again"),
        "the sender is told why: {err:?}"
    );
    // Anything the stream still carried would have landed by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in [0u64, 8, 9, 20, 22, 23] {
        let got = read(&mut site_b, "dst", i * MIB, MIB).await;
        assert!(got == ours(i), "B's write at {i} MiB after the promote was overwritten");
    }
    let got = read(&mut site_b, "dst", 15 * MIB, MIB).await;
    assert!(got == vec![0; MIB as usize], "s1's content (zeros) where B did not write");

    // Failback: B demoted (its writes sealed as b-final), then a resync
    // from A rolls B back to s1 and copies s2: B ends with A's digest, and
    // b-final keeps B's writes, marked divergent.
    let demote = pb::DemoteHeadRequest {
        volume_id: "dst".into(),
        snapshot_id: "b-final".into(),
        generation: 3,
    };
    site_b.demote_head(demote).await.unwrap();
    let link = pb::Link {
        link_id: "a-to-b".into(),
        volume_id: "src".into(),
        target_endpoint: b1.endpoint(),
        pairing_secret: SECRET.to_vec().into(),
        ..Default::default()
    };
    site_a.put_link(link).await.unwrap();
    let refused = site_a
        .sync_link(pb::SyncLinkRequest { link_id: "a-to-b".into(), resync: false })
        .await
        .unwrap_err();
    assert!(refused.message().contains("diverged"), "{refused:?}");
    let synced = site_a
        .sync_link(pb::SyncLinkRequest { link_id: "a-to-b".into(), resync: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(synced.copies.len(), 1, "{synced:?}");
    assert_eq!(synced.copies[0].resumed_from_block, 0, "the promote dropped the partial s2");
    assert_eq!(digest(&mut site_b, "dst", "s2").await, s2, "s2 at B has A's digest");
    assert_eq!(digest(&mut site_b, "dst", "").await, s2);
    let mut replica = b1.client().await.unwrap();
    let list = replica
        .list_snapshots(pb::ListSnapshotsRequest { volume_id: "dst".into() })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let kept = list.iter().find(|s| s.snapshot_id == "b-final").expect("b-final is kept");
    assert!(kept.divergent, "{kept:?}");
    for i in [0u64, 20] {
        let req = pb::ReadBlocksRequest {
            volume_id: "dst".into(),
            offset: i * MIB,
            length: MIB,
            snapshot_id: "b-final".into(),
        };
        let got = replica.read_blocks(req).await.unwrap().into_inner().data;
        assert!(got.to_vec() == ours(i), "b-final holds B's write at {i} MiB");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_copy_holds_its_target_until_the_idle_timeout_then_the_copy_resumes() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let b_args: Vec<&OsStr> = ["--copy-checkpoint-mib", "1", "--copy-idle-timeout-secs", "8"]
        .into_iter()
        .map(OsStr::new)
        .collect();
    let b1 = AgentProcess::start_args(dirs[1].path(), "b1", &b_args).unwrap();
    let mut site_a = a1.heads().await.unwrap();
    site_a.open_head(open_request("src", "a1", &a1, 1)).await.unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", "b1", &b1, 1)).await.unwrap();
    register(&b1, "a-to-b").await;
    register(&b1, "c-to-b").await;
    for i in 0..16u64 {
        write(&mut site_a, "src", i * 2 * MIB, pattern(300 + i, MIB as usize)).await;
    }
    let s1 = snapshot(&mut site_a, "s1", 1).await;

    // The copy goes through a proxy that then holds every byte: the
    // stream stalls with no frame reaching B, not even a ping.
    let proxy = DelayProxy::start(b1.addr(), Duration::ZERO).await.unwrap();
    let stalled = {
        let mut a = site_a.clone();
        let req = copy_request("a-to-b", "s1", "", format!("http://{}", proxy.addr()), 2 * MIB);
        tokio::spawn(async move { a.copy_snapshot(req).await })
    };
    progress_until(&site_a, |p| p.bytes_durable >= 2 * MIB).await;
    proxy.set_delay(Duration::from_secs(3600));
    let stalled_at = std::time::Instant::now();

    // Another copy into the same target, while the stalled session lives:
    // refused, naming the copy that holds the target.
    let other =
        site_a.copy_snapshot(copy_request("c-to-b", "s1", "", b1.endpoint(), 0)).await.unwrap_err();
    assert!(stalled_at.elapsed() < Duration::from_secs(8), "refused before the idle timeout");
    assert_eq!(other.code(), Code::Aborted, "{other:?}");
    assert!(other.message().contains("being written by another copy (link a-to-b"), "{other:?}");

    // After the idle timeout the stalled session is gone (the stalled
    // sender is let go), and the copy resumes at its checkpoint.
    let wait = Duration::from_secs(9).saturating_sub(stalled_at.elapsed());
    tokio::time::sleep(wait).await;
    drop(proxy);
    assert!(stalled.await.unwrap().is_err(), "the stalled attempt did not finish");
    let resumed = site_a
        .copy_snapshot(copy_request("a-to-b", "s1", "", b1.endpoint(), 0))
        .await
        .unwrap()
        .into_inner();
    assert!(
        resumed.resumed_from_block > 0,
        "resumed at the stalled session's checkpoint: {resumed:?}"
    );
    assert!(resumed.bytes_sent < 16 * MIB, "{resumed:?}");
    assert_eq!(resumed.digest.to_vec(), s1);
    assert_eq!(digest(&mut site_b, "dst", "s1").await, s1, "s1 at B has A's digest");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_after_a_promote_starts_afresh_instead_of_resuming_what_the_promote_dropped() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let b_args = [OsStr::new("--copy-checkpoint-mib"), OsStr::new("1")];
    let b1 = AgentProcess::start_args(dirs[1].path(), "b1", &b_args).unwrap();
    let mut site_a = a1.heads().await.unwrap();
    site_a.open_head(open_request("src", "a1", &a1, 1)).await.unwrap();
    let mut site_b = b1.heads().await.unwrap();
    site_b.open_head(open_request("dst", "b1", &b1, 1)).await.unwrap();
    register(&b1, "a-to-b").await;
    write(&mut site_a, "src", 0, pattern(1, MIB as usize)).await;
    snapshot(&mut site_a, "s1", 1).await;
    site_a.copy_snapshot(copy_request("a-to-b", "s1", "", b1.endpoint(), 0)).await.unwrap();
    for i in 0..16u64 {
        write(&mut site_a, "src", 8 * MIB + i * MIB, pattern(500 + i, MIB as usize)).await;
    }
    let s2 = snapshot(&mut site_a, "s2", 2).await;

    // The copy of s2 breaks (a cut link) after checkpoints at B.
    let proxy = DelayProxy::start(b1.addr(), Duration::ZERO).await.unwrap();
    let copy = {
        let mut a = site_a.clone();
        let req = copy_request("a-to-b", "s2", "s1", format!("http://{}", proxy.addr()), 2 * MIB);
        tokio::spawn(async move { a.copy_snapshot(req).await })
    };
    progress_until(&site_a, |p| p.snapshot_id == "s2" && p.bytes_durable >= 2 * MIB).await;
    proxy.cut();
    assert!(copy.await.unwrap().is_err(), "the copy breaks with the link");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // B is promoted (reverted to s1: the part of s2 is gone) and written,
    // then opened again as a remote copy at a newer epoch.
    site_b.promote_head(pb::PromoteHeadRequest { volume_id: "dst".into() }).await.unwrap();
    write(&mut site_b, "dst", 8 * MIB, pattern(999, MIB as usize)).await;
    site_b.open_head(open_request("dst", "b1", &b1, 2)).await.unwrap();

    // The next copy of s2 must not resume where the broken one stood.
    let done = site_a
        .copy_snapshot(copy_request("a-to-b", "s2", "s1", b1.endpoint(), 0))
        .await
        .expect("the copy starts afresh and seals")
        .into_inner();
    assert_eq!(done.resumed_from_block, 0, "{done:?}");
    assert_eq!(done.digest.to_vec(), s2);
    assert_eq!(digest(&mut site_b, "dst", "s2").await, s2, "s2 at B has A's digest");
}
