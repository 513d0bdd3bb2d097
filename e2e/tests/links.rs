//! Links between sites of real agent processes on loopback: fan-out
//! (A -> B and A -> C), cascade (A -> B -> C, forwarded as snapshots
//! complete), failover to B with writes there and failback to A sending only
//! the delta (A rolled back to the shared snapshot, its own later snapshots
//! kept marked divergent), a planned switchover that loses nothing, a
//! snapshot a link still needs refused for deletion, policies that reach a
//! running copy (a fixed rate changed live, a window boundary, adaptive
//! backing off behind a delaying proxy), zstd batches, and a copy broken by
//! kill -9 of the sender or a cut link resuming at the receiver's checkpoint.

use std::{
    ffi::OsStr,
    time::{Duration, Instant},
};

use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, pattern, proxy::DelayProxy};
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 128 * MIB;
const CHUNK: u64 = 32 * MIB;
const SECRET: &[u8] = b"0123456789abcdef-links-secret";

/// One site: its agents and the volume's head on the first of them.
struct Site {
    agents: Vec<AgentProcess>,
    heads: HeadsClient,
    volume: String,
    _dirs: Vec<tempfile::TempDir>,
}

impl Site {
    /// `n` agents, a volume with `replicas` replicas, its head on the first.
    async fn start(
        name: &str,
        n: usize,
        replicas: u32,
        role: pb::VolumeRole,
        args: &[&str],
    ) -> Site {
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let agents: Vec<AgentProcess> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                AgentProcess::start_args(d.path(), &format!("{name}{}", i + 1), &args).unwrap()
            })
            .collect();
        let volume = format!("vol-{name}");
        let mut heads = agents[0].heads().await.unwrap();
        heads.open_head(open_request(&volume, &agents, name, replicas, 1, role)).await.unwrap();
        Site { agents, heads, volume, _dirs: dirs }
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) {
        let req =
            pb::HeadWriteRequest { volume_id: self.volume.clone(), offset, data: data.into() };
        self.heads.head_write(req).await.unwrap();
    }

    async fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let req = pb::HeadReadRequest { volume_id: self.volume.clone(), offset, length: len };
        self.heads.head_read(req).await.unwrap().into_inner().data.to_vec()
    }

    async fn snapshot(&mut self, id: &str, generation: u64) -> Vec<u8> {
        let req = pb::HeadSnapshotRequest {
            volume_id: self.volume.clone(),
            snapshot_id: id.into(),
            generation,
        };
        self.heads.head_snapshot(req).await.unwrap().into_inner().digest.to_vec()
    }

    async fn digest(&mut self, snapshot: &str) -> Vec<u8> {
        let req =
            pb::HeadDigestRequest { volume_id: self.volume.clone(), snapshot_id: snapshot.into() };
        self.heads.head_digest(req).await.unwrap().into_inner().digest.to_vec()
    }

    /// The snapshots of the head agent's replica: (id, divergent).
    async fn snapshots(&self) -> Vec<(String, bool)> {
        let mut c = self.agents[0].client().await.unwrap();
        let req = pb::ListSnapshotsRequest { volume_id: self.volume.clone() };
        let list = c.list_snapshots(req).await.unwrap().into_inner().snapshots;
        list.into_iter().map(|s| (s.snapshot_id, s.divergent)).collect()
    }

    /// Registers link `id` here, writing this site's volume.
    async fn receive(&self, id: &str) {
        let mut c = cairn_e2e::copy_client(&self.agents[0]).await.unwrap();
        let req = pb::RegisterLinkRequest {
            link_id: id.into(),
            pairing_secret: SECRET.to_vec().into(),
            target_volume_id: self.volume.clone(),
        };
        c.register_link(req).await.unwrap();
    }

    /// Creates or changes link `id` from this site's volume to `endpoint`.
    async fn put_link(&mut self, id: &str, endpoint: String, change: impl FnOnce(&mut pb::Link)) {
        let mut link = pb::Link {
            link_id: id.into(),
            volume_id: self.volume.clone(),
            target_endpoint: endpoint,
            pairing_secret: SECRET.to_vec().into(),
            ..Default::default()
        };
        change(&mut link);
        self.heads.put_link(link).await.unwrap();
    }

    async fn sync(
        &mut self,
        id: &str,
        resync: bool,
    ) -> Result<pb::SyncLinkResponse, tonic::Status> {
        let req = pb::SyncLinkRequest { link_id: id.into(), resync };
        self.heads.sync_link(req).await.map(|r| r.into_inner())
    }

    async fn link(&mut self, id: &str) -> pb::LinkStatus {
        let list = self.heads.list_links(pb::ListLinksRequest::default()).await.unwrap();
        let found = list.into_inner().links.into_iter();
        found.into_iter().find(|l| l.link.as_ref().is_some_and(|l| l.link_id == id)).unwrap()
    }
}

fn open_request(
    volume: &str,
    agents: &[AgentProcess],
    prefix: &str,
    replicas: u32,
    epoch: u64,
    role: pb::VolumeRole,
) -> pb::OpenHeadRequest {
    let list = agents.iter().enumerate().map(|(i, a)| (format!("{prefix}{}", i + 1), a.endpoint()));
    pb::OpenHeadRequest {
        epoch,
        role: role as i32,
        ..cairn_e2e::open_head_request(volume, SIZE, CHUNK, replicas, list)
    }
}

fn fixed(rate: u64) -> Option<pb::BandwidthPolicy> {
    Some(pb::BandwidthPolicy {
        policy: Some(pb::bandwidth_policy::Policy::Fixed(pb::Rate {
            unlimited: false,
            bytes_per_sec: rate,
        })),
    })
}

const PRIMARY: pb::VolumeRole = pb::VolumeRole::Primary;
const REMOTE: pb::VolumeRole = pb::VolumeRole::Remote;

#[tokio::test(flavor = "multi_thread")]
async fn fan_out_to_two_sites_keeps_each_links_snapshots_until_it_has_them() {
    let mut a = Site::start("a", 2, 2, PRIMARY, &[]).await;
    let b = Site::start("b", 1, 1, REMOTE, &[]).await;
    let c = Site::start("c", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    c.receive("a-c").await;
    a.put_link("a-b", b.agents[0].endpoint(), |_| {}).await;
    a.put_link("a-c", c.agents[0].endpoint(), |_| {}).await;

    for i in 0..8u64 {
        a.write(i * 4 * MIB, pattern(i, MIB as usize)).await;
    }
    a.snapshot("s1", 1).await;
    a.write(3 * MIB, pattern(100, 64 * 1024)).await;
    let s2 = a.snapshot("s2", 2).await;

    // Only A -> B runs: C has nothing yet, and keeps A from deleting.
    let r = a.sync("a-b", false).await.unwrap();
    assert_eq!(r.copies.len(), 1, "a first sync sends the image of the newest snapshot");
    assert_eq!(r.copies[0].snapshot_id, "s2");
    let mut b = b;
    assert_eq!(b.digest("s2").await, s2);
    a.snapshot("s3", 3).await;
    a.write(5 * MIB, pattern(101, 4096)).await;
    let s4 = a.snapshot("s4", 4).await;
    let r = a.sync("a-b", false).await.unwrap();
    let copied: Vec<&str> = r.copies.iter().map(|c| c.snapshot_id.as_str()).collect();
    assert_eq!(copied, ["s3", "s4"], "each newer layer in order");
    assert_eq!(b.digest("s4").await, s4);
    assert_eq!(a.link("a-b").await.last_copied_snapshot_id, "s4");

    // A -> B has s4: deleting it is refused (the base of its next copy).
    let vol = a.volume.clone();
    let del =
        |s: &str| pb::DeleteHeadSnapshotRequest { volume_id: vol.clone(), snapshot_id: s.into() };
    let err = a.heads.clone().delete_head_snapshot(del("s4")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("link a-b"), "{}", err.message());

    // C syncs now: image of s4 at once.
    let r = a.sync("a-c", false).await.unwrap();
    assert_eq!(r.copies.len(), 1);
    let mut c = c;
    assert_eq!(c.digest("s4").await, s4);
    // s1..s3 are older than every link's cursor: deletable.
    a.heads.clone().delete_head_snapshot(del("s1")).await.unwrap();
    assert_eq!(a.digest("s2").await, s2, "the next layer keeps s2's content after s1 folds");

    // A new snapshot is needed by both links until each has it.
    a.write(0, pattern(102, 8192)).await;
    let s5 = a.snapshot("s5", 5).await;
    a.sync("a-b", false).await.unwrap();
    let err = a.heads.clone().delete_head_snapshot(del("s5")).await.unwrap_err();
    assert!(err.message().contains("link a-c has not copied snapshot s5"), "{}", err.message());
    a.sync("a-c", false).await.unwrap();
    assert_eq!(b.digest("s5").await, s5);
    assert_eq!(c.digest("s5").await, s5);
    // The receivers refuse deleting the newest snapshot their link sealed.
    let err = b
        .heads
        .clone()
        .delete_head_snapshot(pb::DeleteHeadSnapshotRequest {
            volume_id: b.volume.clone(),
            snapshot_id: "s5".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("link a-b"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_receiving_link_no_longer_keeps_the_snapshot_it_sealed() {
    let mut a = Site::start("a", 1, 1, PRIMARY, &[]).await;
    let mut b = Site::start("b", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    a.put_link("a-b", b.agents[0].endpoint(), |_| {}).await;
    a.write(0, pattern(1, MIB as usize)).await;
    a.snapshot("s1", 1).await;
    a.sync("a-b", false).await.unwrap();
    let del =
        pb::DeleteHeadSnapshotRequest { volume_id: b.volume.clone(), snapshot_id: "s1".into() };
    let err = b.heads.delete_head_snapshot(del.clone()).await.unwrap_err();
    assert!(err.message().contains("UnregisterLink"), "{}", err.message());

    let mut copy = cairn_e2e::copy_client(&b.agents[0]).await.unwrap();
    let drop = |secret: &[u8]| pb::UnregisterLinkRequest {
        link_id: "a-b".into(),
        pairing_secret: secret.to_vec().into(),
    };
    let err = copy.unregister_link(drop(b"not-the-pairing-secret")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    copy.unregister_link(drop(SECRET)).await.unwrap();
    copy.unregister_link(drop(SECRET)).await.expect("dropped already: done");
    b.heads.delete_head_snapshot(del).await.expect("no registered link keeps s1 now");
    assert!(b.snapshots().await.is_empty());
    let err = a.sync("a-b", false).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "the link is not registered there: {err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cascade_forwards_each_snapshot_once_it_is_complete() {
    let mut a = Site::start("a", 1, 1, PRIMARY, &[]).await;
    let mut b = Site::start("b", 1, 1, REMOTE, &[]).await;
    let mut c = Site::start("c", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    c.receive("b-c").await;
    a.put_link("a-b", b.agents[0].endpoint(), |l| l.forward = true).await;
    let c_endpoint = c.agents[0].endpoint();
    b.put_link("b-c", c_endpoint, |l| l.forward = true).await;

    a.write(0, pattern(1, 2 * MIB as usize)).await;
    let s1 = a.snapshot("s1", 1).await;
    a.write(40 * MIB, pattern(2, MIB as usize)).await;
    let s2 = a.snapshot("s2", 2).await;

    // No call at B: A forwards to B, B forwards to C.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let at_c: Vec<String> = c.snapshots().await.into_iter().map(|s| s.0).collect();
        if at_c == ["s1", "s2"] || at_c == ["s2"] {
            break;
        }
        assert!(Instant::now() < deadline, "C has {at_c:?}; B's link: {:?}", b.link("b-c").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.digest("s2").await, s2);
    assert_eq!(b.digest("s2").await, s2);
    if c.snapshots().await.len() == 2 {
        assert_eq!(c.digest("s1").await, s1);
    }
    assert_eq!(c.read(40 * MIB, MIB).await, pattern(2, MIB as usize));
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_then_failback_sends_only_the_delta_and_a_switchover_loses_nothing() {
    let mut a = Site::start("a", 2, 2, PRIMARY, &[]).await;
    let mut b = Site::start("b", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    a.put_link("a-b", b.agents[0].endpoint(), |_| {}).await;
    for i in 0..16u64 {
        a.write(i * 2 * MIB, pattern(i, MIB as usize)).await;
    }
    a.snapshot("s1", 1).await;
    a.write(MIB, pattern(50, MIB as usize)).await;
    let s2 = a.snapshot("s2", 2).await;
    a.sync("a-b", false).await.unwrap();
    // A goes on alone: s3 never reaches B, and writes after it.
    a.write(10 * MIB, pattern(60, 3 * MIB as usize)).await;
    a.snapshot("s3", 3).await;
    a.write(90 * MIB, pattern(61, MIB as usize)).await;

    // Site A is lost: B is promoted from s2 and written.
    let p = b
        .heads
        .promote_head(pb::PromoteHeadRequest { volume_id: b.volume.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.base_snapshot_id, "s2");
    assert_eq!(p.digest.to_vec(), s2);
    let delta = [(20 * MIB, 70u64, 512 * 1024usize), (100 * MIB, 71, 256 * 1024)];
    for (off, seed, len) in delta {
        b.write(off, pattern(seed, len)).await;
    }
    let t3 = b.snapshot("t3", 3).await;

    // A comes back: demoted (its head sealed as a-final), then resynced
    // from B over a reverse link.
    a.heads
        .demote_head(pb::DemoteHeadRequest {
            volume_id: a.volume.clone(),
            snapshot_id: "a-final".into(),
            generation: 4,
        })
        .await
        .unwrap();
    a.receive("b-a").await;
    b.put_link("b-a", a.agents[0].endpoint(), |_| {}).await;
    let err = b.sync("b-a", false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("diverged"), "{}", err.message());
    let r = b.sync("b-a", true).await.unwrap();
    assert_eq!(r.common_snapshot_id, "s2");
    assert_eq!(r.divergent_snapshot_ids, ["s3", "a-final"]);
    assert_eq!(r.copies.len(), 1);
    let sent = r.copies[0].bytes_sent;
    let changed: u64 = delta.iter().map(|d| d.2 as u64).sum();
    assert_eq!(sent, changed, "only the delta written at B crosses the sites");
    assert_eq!(a.digest("t3").await, t3);
    assert_eq!(a.digest("").await, t3, "A's head is B's t3 now");
    assert_eq!(a.read(20 * MIB, 512 * 1024).await, pattern(70, 512 * 1024));
    assert_eq!(a.read(10 * MIB, MIB).await, b.read(10 * MIB, MIB).await, "s3's writes rolled back");
    let snaps = a.snapshots().await;
    let divergent: Vec<&str> =
        snaps.iter().filter(|s| s.1).map(|s| s.0.as_str()).collect::<Vec<_>>();
    assert_eq!(divergent, ["s3", "a-final"], "kept, marked: {snaps:?}");

    // Planned switchover back to A: writes at B up to the call are at A.
    b.write(64 * MIB, pattern(80, MIB as usize)).await;
    let sw = b
        .heads
        .switchover(pb::SwitchoverRequest {
            link_id: "b-a".into(),
            snapshot_id: "t4".into(),
            generation: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sw.digest.to_vec(), b.digest("t4").await);
    assert_eq!(a.read(64 * MIB, MIB).await, pattern(80, MIB as usize));
    a.write(0, pattern(90, 4096)).await; // A is the primary again
    let err = b
        .heads
        .head_write(pb::HeadWriteRequest {
            volume_id: b.volume.clone(),
            offset: 0,
            data: vec![1; 4096].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "B is a remote copy now");
    // A divergent snapshot may be deleted; the line is intact after.
    a.heads
        .delete_head_snapshot(pb::DeleteHeadSnapshotRequest {
            volume_id: a.volume.clone(),
            snapshot_id: "s3".into(),
        })
        .await
        .unwrap();
    assert_eq!(a.digest("t3").await, t3);

    // A replica of A rebuilt from scratch copies the layers in their order,
    // divergent ones marked: a2's replica equals a1's in every view.
    let dir = a._dirs[1].path().to_path_buf();
    let addr = a.agents[1].addr();
    a.agents.remove(1).kill9().unwrap();
    // A new, empty disk.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    a.write(4 * MIB, pattern(91, MIB as usize)).await; // a2 misses it
    let a2 = AgentProcess::start_on(&dir, "a2", addr, &[]).unwrap();
    a.agents.insert(1, a2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = pb::HeadStatusRequest { volume_id: a.volume.clone() };
        let st = a.heads.get_head_status(req).await.unwrap().into_inner();
        let r = st.replicas.iter().find(|r| r.agent == "a2").unwrap();
        if r.in_sync && r.last_rebuild.starts_with("rebuilt") {
            break;
        }
        assert!(Instant::now() < deadline, "a2 not rebuilt: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let views = ["", "s2", "t3", "t4", "a-final"];
    for view in views {
        let mut accs = Vec::new();
        for agent in &a.agents[..2] {
            let req = pb::ChunkDigestsRequest {
                volume_id: a.volume.clone(),
                snapshot_id: view.into(),
                chunks: vec![],
            };
            let mut c = agent.client().await.unwrap();
            accs.push(c.chunk_digests(req).await.unwrap().into_inner().chunks);
        }
        assert_eq!(accs[0], accs[1], "view {view:?} differs between a1 and the rebuilt a2");
    }
    let mut c = a.agents[1].client().await.unwrap();
    let req = pb::ListSnapshotsRequest { volume_id: a.volume.clone() };
    let at_a2: Vec<(String, bool)> = c
        .list_snapshots(req)
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .map(|s| (s.snapshot_id, s.divergent))
        .collect();
    assert_eq!(at_a2, a.snapshots().await, "same layers, same marks, same order");
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_reach_a_running_copy_and_adaptive_backs_off_behind_a_delay() {
    let mut a = Site::start("a", 1, 1, PRIMARY, &[]).await;
    let b = Site::start("b", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    for i in 0..24u64 {
        a.write(i * 4 * MIB, pattern(i, MIB as usize)).await;
    }
    a.snapshot("s1", 1).await;

    // 1. A fixed 2 MiB/s, lifted while the copy runs.
    a.put_link("a-b", b.agents[0].endpoint(), |l| l.policy = fixed(2 * MIB)).await;
    let mut heads = a.heads.clone();
    let sync = tokio::spawn(async move {
        heads.sync_link(pb::SyncLinkRequest { link_id: "a-b".into(), resync: false }).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let slow = a.link("a-b").await;
    let p = slow.progress.clone().unwrap();
    assert_eq!(slow.current_rate_bytes_per_sec, 2 * MIB);
    assert!(p.bytes_sent <= 4 * MIB, "at 2 MiB/s for 1.5 s: {p:?}");
    let changed = Instant::now();
    a.put_link("a-b", b.agents[0].endpoint(), |l| l.policy = fixed(1 << 40)).await;
    let r = sync.await.unwrap().unwrap().into_inner();
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "the lifted limit reached the copy: 20 MiB left took {:?}",
        changed.elapsed()
    );
    assert_eq!(r.copies[0].bytes_sent, 24 * MIB);

    // 2. Adaptive between 256 KiB/s and 16 MiB/s, through a delaying proxy
    //    whose delay rises mid-copy: the rate is cut.
    for i in 0..24u64 {
        a.write(i * 4 * MIB + MIB, pattern(200 + i, MIB as usize)).await;
    }
    a.snapshot("s2", 2).await;
    let proxy = DelayProxy::start(b.agents[0].addr(), Duration::ZERO).await.unwrap();
    a.put_link("a-b", format!("http://{}", proxy.addr()), |l| {
        l.policy = Some(pb::BandwidthPolicy {
            policy: Some(pb::bandwidth_policy::Policy::Adaptive(pb::AdaptiveBandwidth {
                floor_bytes_per_sec: 256 * 1024,
                ceiling_bytes_per_sec: 16 * MIB,
            })),
        })
    })
    .await;
    let mut heads = a.heads.clone();
    let sync = tokio::spawn(async move {
        heads.sync_link(pb::SyncLinkRequest { link_id: "a-b".into(), resync: false }).await
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = a.link("a-b").await.current_rate_bytes_per_sec;
    assert!(before >= 8 * MIB, "adaptive starts at half the ceiling and rises: {before}");
    proxy.set_delay(Duration::from_millis(60));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = a.link("a-b").await.current_rate_bytes_per_sec;
    assert!(after < before / 2, "the RTT rose from ~0 to 120 ms: {before} -> {after} B/s");
    proxy.set_delay(Duration::ZERO);
    let r = sync.await.unwrap().unwrap().into_inner();
    assert_eq!(r.copies[0].snapshot_id, "s2");
    let mut b = b;
    assert_eq!(b.digest("s2").await, a.digest("s2").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_boundary_crossed_during_a_copy_starts_it() {
    let mut a = Site::start("a", 1, 1, PRIMARY, &[]).await;
    let mut b = Site::start("b", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    a.write(0, pattern(7, 4 * MIB as usize)).await;
    let s1 = a.snapshot("s1", 1).await;
    // Paused outside a window that opens 3 s from now (UTC).
    let now = jiff::Timestamp::now().to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let open = (now.clone() + jiff::SignedDuration::from_secs(3)).time();
    if open < now.time() {
        return; // midnight is in the way; nothing to show in this run
    }
    let day = format!("{:?}", now.weekday()).to_lowercase()[..3].to_string();
    a.put_link("a-b", b.agents[0].endpoint(), |l| {
        l.policy = Some(pb::BandwidthPolicy {
            policy: Some(pb::bandwidth_policy::Policy::Windows(pb::BandwidthWindows {
                time_zone: "UTC".into(),
                default_rate: Some(pb::Rate { unlimited: false, bytes_per_sec: 0 }),
                windows: vec![pb::BandwidthWindow {
                    days: vec![day],
                    start: open.strftime("%H:%M:%S").to_string(),
                    end: String::new(),
                    rate: Some(pb::Rate { unlimited: true, bytes_per_sec: 0 }),
                }],
            })),
        })
    })
    .await;
    let started = Instant::now();
    let mut heads = a.heads.clone();
    let sync = tokio::spawn(async move {
        heads.sync_link(pb::SyncLinkRequest { link_id: "a-b".into(), resync: false }).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused = a.link("a-b").await;
    assert_eq!(paused.current_rate_bytes_per_sec, 0, "paused before the window");
    assert_eq!(paused.progress.map_or(0, |p| p.bytes_sent), 0);
    let r = sync.await.unwrap().unwrap().into_inner();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2000), "it waited for the window: {took:?}");
    assert!(took < Duration::from_secs(10), "and ran once it opened: {took:?}");
    assert_eq!(r.copies[0].bytes_sent, 4 * MIB);
    assert_eq!(b.digest("s1").await, s1);
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_batches_shrink_compressible_data_and_fall_back_on_random_data() {
    let mut a = Site::start("a", 1, 1, PRIMARY, &[]).await;
    let mut b = Site::start("b", 1, 1, REMOTE, &[]).await;
    b.receive("a-b").await;
    a.put_link("a-b", b.agents[0].endpoint(), |l| l.compression = pb::Compression::Zstd as i32)
        .await;
    let text: Vec<u8> =
        (0..8 * MIB).map(|i| b"cairn log line 0123456789\n"[(i % 26) as usize]).collect();
    for i in 0..8u64 {
        let part = text[(i * MIB) as usize..((i + 1) * MIB) as usize].to_vec();
        a.write(i * MIB, part).await;
        a.write(16 * MIB + i * MIB, pattern(3 + i, MIB as usize)).await;
    }
    a.snapshot("s1", 1).await;
    let r = a.sync("a-b", false).await.unwrap();
    let c = &r.copies[0];
    assert_eq!(c.bytes_sent, 16 * MIB);
    assert!(
        c.wire_bytes < 8 * MIB + MIB,
        "the text compresses, the random half goes raw: {} bytes on the wire",
        c.wire_bytes
    );
    assert!(c.wire_bytes >= 8 * MIB, "random data does not shrink: {}", c.wire_bytes);
    assert_eq!(b.read(0, 4 * MIB).await, text[..4 * MIB as usize]);
    assert_eq!(b.digest("s1").await, a.digest("s1").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_resumes_at_the_checkpoint_after_the_sender_is_killed_and_after_a_cut_link() {
    let mut a = Site::start("a", 1, 1, PRIMARY, &[]).await;
    let b = Site::start("b", 1, 1, REMOTE, &["--copy-checkpoint-mib", "2"]).await;
    b.receive("a-b").await;
    for i in 0..24u64 {
        a.write(i * 4 * MIB, pattern(300 + i, MIB as usize)).await;
    }
    let s1 = a.snapshot("s1", 1).await;
    a.put_link("a-b", b.agents[0].endpoint(), |l| l.policy = fixed(4 * MIB)).await;

    // 1. kill -9 of the sender mid-copy.
    let mut heads = a.heads.clone();
    let sync = tokio::spawn(async move {
        heads.sync_link(pb::SyncLinkRequest { link_id: "a-b".into(), resync: false }).await
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = a.link("a-b").await.progress.unwrap();
    let dir = a._dirs[0].path().to_path_buf();
    a.agents.remove(0).kill9().unwrap();
    assert!(sync.await.unwrap().is_err());
    let agent = AgentProcess::start_named(&dir, "a1").unwrap();
    a.heads = agent.heads().await.unwrap();
    let reopen = open_request(&a.volume, std::slice::from_ref(&agent), "a", 1, 2, PRIMARY);
    a.heads.open_head(reopen).await.unwrap();
    a.agents.insert(0, agent);
    a.put_link("a-b", b.agents[0].endpoint(), |l| l.policy = fixed(u64::MAX)).await;
    let r = a.sync("a-b", false).await.unwrap();
    let c = &r.copies[0];
    assert!(c.resumed_from_block > 0, "resumed at a checkpoint: {c:?}");
    let resent = (before.bytes_durable + c.bytes_sent).saturating_sub(24 * MIB);
    assert!(
        c.bytes_sent < 24 * MIB && before.bytes_sent + c.bytes_sent - 24 * MIB <= 2 * MIB + MIB,
        "re-sent at most one checkpoint interval (2 MiB) plus a batch: sent {} before the kill, {} after; resent {resent}",
        before.bytes_sent,
        c.bytes_sent
    );
    let mut b = b;
    assert_eq!(b.digest("s1").await, s1);

    // 2. A link cut mid-copy (a proxy that drops its connections).
    for i in 0..24u64 {
        a.write(i * 4 * MIB + 2 * MIB, pattern(400 + i, MIB as usize)).await;
    }
    let s2 = a.snapshot("s2", 2).await;
    let proxy = DelayProxy::start(b.agents[0].addr(), Duration::ZERO).await.unwrap();
    a.put_link("a-b", format!("http://{}", proxy.addr()), |l| l.policy = fixed(4 * MIB)).await;
    let mut heads = a.heads.clone();
    let sync = tokio::spawn(async move {
        heads.sync_link(pb::SyncLinkRequest { link_id: "a-b".into(), resync: false }).await
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.cut();
    let err = sync.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal
        ),
        "{err:?}"
    );
    let broke = a.link("a-b").await.progress.unwrap();
    proxy.restore();
    a.put_link("a-b", format!("http://{}", proxy.addr()), |l| l.policy = fixed(u64::MAX)).await;
    let r = a.sync("a-b", false).await.unwrap();
    let c = &r.copies[0];
    assert!(c.resumed_from_block > 0, "{c:?}");
    assert!(
        broke.bytes_sent + c.bytes_sent <= 24 * MIB + 3 * MIB,
        "re-sent at most a checkpoint interval: {} before the cut, {} after",
        broke.bytes_sent,
        c.bytes_sent
    );
    assert_eq!(b.digest("s2").await, s2);
}
