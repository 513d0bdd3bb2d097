//! The volume head over several in-process agents (each its own store on a
//! simulated disk, reached through `LocalPeer`, some behind a switch that
//! makes them fail): striping, N-way writes, reads, failure handling,
//! all-or-nothing snapshots, placement-independent digests, fencing and
//! rebuilding a replica while writes go on.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use cairn_agent::{
    Store,
    disk::{CrashMode, SimDisk},
    head::{HeadError, HeadSpec, VolumeHead},
    peer::{BlockStream, LocalPeer, PeerError, PeerErrorKind, PeerResult, ReplicaPeer, StreamKind},
};
use cairn_api::{
    Accumulator, BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId,
    digest::image_digest,
    placement::PlacementAgent,
    snapshot::{ReplicaInfo, SnapshotInfo},
};

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 1 << 20;

/// A peer that can be switched to fail every call (an agent gone away),
/// or to fail only seals.
#[derive(Debug)]
struct Switch {
    inner: LocalPeer,
    down: AtomicBool,
    seal_fails: AtomicBool,
    /// While set, the next seal waits for `seal_go` after telling
    /// `seal_held` (a rebuild held in its layer phase).
    hold_seal: AtomicBool,
    seal_held: tokio::sync::Notify,
    seal_go: tokio::sync::Notify,
}

impl Switch {
    fn check(&self) -> PeerResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PeerError {
                agent: self.inner.agent().to_string(),
                kind: PeerErrorKind::Unavailable,
                message: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ReplicaPeer for Switch {
    fn agent(&self) -> &str {
        self.inner.agent()
    }
    async fn ensure(&self, v: &VolumeId, g: Geometry, c: ChunkSet) -> PeerResult<ReplicaInfo> {
        self.check()?;
        self.inner.ensure(v, g, c).await
    }
    async fn delete_replica(&self, v: &VolumeId) -> PeerResult<()> {
        self.check()?;
        self.inner.delete_replica(v).await
    }
    async fn revert_head(&self, v: &VolumeId, e: u64) -> PeerResult<()> {
        self.check()?;
        self.inner.revert_head(v, e).await
    }
    async fn snapshots(&self, v: &VolumeId) -> PeerResult<Vec<SnapshotInfo>> {
        self.check()?;
        self.inner.snapshots(v).await
    }
    async fn stream(
        &self,
        v: &VolumeId,
        s: &SnapshotId,
        c: &[u64],
        k: StreamKind,
    ) -> PeerResult<BlockStream> {
        self.check()?;
        self.inner.stream(v, s, c, k).await
    }
    async fn count_blocks(
        &self,
        v: &VolumeId,
        s: &SnapshotId,
        c: &[u64],
        k: StreamKind,
    ) -> PeerResult<Vec<(u64, u64, u64)>> {
        self.check()?;
        self.inner.count_blocks(v, s, c, k).await
    }
    async fn head_blocks(
        &self,
        v: &VolumeId,
        c: &[u64],
        start: u64,
    ) -> PeerResult<(Vec<u64>, Option<u64>)> {
        self.check()?;
        self.inner.head_blocks(v, c, start).await
    }
    async fn fence(&self, v: &VolumeId, e: u64, head: &str) -> PeerResult<u64> {
        self.check()?;
        self.inner.fence(v, e, head).await
    }
    async fn set_in_sync(
        &self,
        v: &VolumeId,
        e: u64,
        head: &str,
        seq: u64,
        members: &std::collections::BTreeSet<String>,
    ) -> PeerResult<()> {
        self.check()?;
        self.inner.set_in_sync(v, e, head, seq, members).await
    }
    async fn write(&self, v: &VolumeId, e: u64, o: u64, d: Bytes) -> PeerResult<()> {
        self.check()?;
        self.inner.write(v, e, o, d).await
    }
    async fn read(
        &self,
        v: &VolumeId,
        s: Option<&SnapshotId>,
        o: u64,
        l: u64,
    ) -> PeerResult<Bytes> {
        self.check()?;
        self.inner.read(v, s, o, l).await
    }
    async fn trim(&self, v: &VolumeId, e: u64, o: u64, l: u64) -> PeerResult<()> {
        self.check()?;
        self.inner.trim(v, e, o, l).await
    }
    async fn flush(&self, v: &VolumeId, e: u64) -> PeerResult<()> {
        self.check()?;
        self.inner.flush(v, e).await
    }
    async fn seal(&self, v: &VolumeId, e: u64, id: &SnapshotId, g: u64) -> PeerResult<()> {
        self.check()?;
        if self.seal_fails.load(Ordering::SeqCst) {
            return Err(PeerError {
                agent: self.inner.agent().to_string(),
                kind: PeerErrorKind::Unavailable,
                message: "disk full".into(),
            });
        }
        if self.hold_seal.swap(false, Ordering::SeqCst) {
            self.seal_held.notify_one();
            self.seal_go.notified().await;
        }
        self.inner.seal(v, e, id, g).await
    }
    async fn delete_snapshot(&self, v: &VolumeId, id: &SnapshotId) -> PeerResult<()> {
        self.check()?;
        self.inner.delete_snapshot(v, id).await
    }
    async fn mark_divergent(&self, v: &VolumeId, epoch: u64, ids: &[SnapshotId]) -> PeerResult<()> {
        self.check()?;
        self.inner.mark_divergent(v, epoch, ids).await
    }
    async fn chunk_digests(
        &self,
        v: &VolumeId,
        s: Option<&SnapshotId>,
        c: &[u64],
    ) -> PeerResult<Vec<(u64, Accumulator)>> {
        self.check()?;
        self.inner.chunk_digests(v, s, c).await
    }
}

struct Cluster {
    disks: Vec<SimDisk>,
    stores: Vec<Arc<Store>>,
    switches: Vec<Arc<Switch>>,
}

fn cluster(n: usize) -> Cluster {
    let disks: Vec<SimDisk> = (0..n).map(|_| SimDisk::new()).collect();
    let stores: Vec<Arc<Store>> = disks
        .iter()
        .map(|d| Arc::new(Store::open(Arc::new(d.clone()), Path::new("/agent")).unwrap()))
        .collect();
    let switches = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Arc::new(Switch {
                inner: LocalPeer::new(format!("agent-{i}"), s.clone()),
                down: AtomicBool::new(false),
                seal_fails: AtomicBool::new(false),
                hold_seal: AtomicBool::new(false),
                seal_held: tokio::sync::Notify::new(),
                seal_go: tokio::sync::Notify::new(),
            })
        })
        .collect();
    Cluster { disks, stores, switches }
}

fn vol() -> VolumeId {
    VolumeId::new("striped").unwrap()
}

impl Cluster {
    fn spec(&self, replicas: usize, epoch: u64) -> HeadSpec {
        HeadSpec {
            volume: vol(),
            geometry: Geometry::new(SIZE, CHUNK).unwrap(),
            replicas,
            layout_version: 1,
            agents: (0..self.stores.len())
                .map(|i| PlacementAgent::new(format!("agent-{i}"), None))
                .collect(),
            epoch,
            stale: vec![],
            costs: Default::default(),
            accept_data_loss: false,
        }
    }

    async fn open(&self, replicas: usize, epoch: u64) -> Result<VolumeHead, HeadError> {
        let peers: BTreeMap<String, Arc<dyn ReplicaPeer>> = self
            .switches
            .iter()
            .map(|s| (s.agent().to_string(), s.clone() as Arc<dyn ReplicaPeer>))
            .collect();
        VolumeHead::open(self.spec(replicas, epoch), peers, Some("agent-0")).await
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8 | 1
        })
        .collect()
}

/// Writes through the head and into a byte-for-byte model.
async fn put(head: &VolumeHead, model: &mut [u8], offset: u64, data: Vec<u8>) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    head.write(offset, Bytes::from(data)).await.unwrap();
}

fn model_digest(model: &[u8]) -> cairn_api::Digest {
    image_digest(SIZE, model.chunks(BLOCK_SIZE as usize).enumerate().map(|(i, d)| (i as u64, d)))
}

#[tokio::test(flavor = "multi_thread")]
async fn striped_writes_reach_every_replica_and_read_back_at_any_offset() {
    let c = cluster(3);
    let head = c.open(2, 1).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    // Aligned, unaligned, chunk-crossing and tiny writes.
    put(&head, &mut model, 0, pattern(1, 3 << 20)).await;
    put(&head, &mut model, (1 << 20) - 100, pattern(2, 300)).await;
    put(&head, &mut model, 5 * 4096 + 7, pattern(3, 1)).await;
    put(&head, &mut model, (4 << 20) + 4000, pattern(4, 2 << 20)).await;
    head.trim(6 << 20, (1 << 20) + 123).await.unwrap();
    model[6 << 20..(7 << 20) + 123].fill(0);
    head.flush().await.unwrap();
    for (off, len) in [(0u64, 8u64 << 20), (1, 4095), ((1 << 20) - 300, 1000), (SIZE - 10, 10)] {
        let got = head.read(off, len.min(16 << 20)).await.unwrap();
        assert_eq!(&got[..], &model[off as usize..(off + len) as usize], "read at {off}+{len}");
    }
    assert_eq!(head.digest(None).await.unwrap(), model_digest(&model));
    // Every chunk is on two distinct agents and their copies agree.
    let mut holders: BTreeMap<u64, Vec<Accumulator>> = BTreeMap::new();
    for s in &c.stores {
        let r = s.replica(&vol()).unwrap();
        for (chunk, acc) in r.chunk_digests(None, &[]).unwrap() {
            holders.entry(chunk).or_default().push(acc);
        }
    }
    assert_eq!(holders.len(), 8);
    for (chunk, accs) in holders {
        assert_eq!(accs.len(), 2, "chunk {chunk} has two replicas");
        assert_eq!(accs[0], accs[1], "chunk {chunk}'s replicas agree");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_replica_goes_out_of_sync_and_io_carries_on() {
    let c = cluster(3);
    let head = c.open(2, 1).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    put(&head, &mut model, 0, pattern(5, 2 << 20)).await;
    c.switches[1].down.store(true, Ordering::SeqCst);
    put(&head, &mut model, 1 << 20, pattern(6, 4 << 20)).await;
    head.flush().await.unwrap();
    let health = head.health();
    let down = health.iter().find(|h| h.agent == "agent-1").unwrap();
    assert!(down.out_of_sync.as_deref().unwrap().contains("connection refused"), "{health:?}");
    assert!(health.iter().filter(|h| h.agent != "agent-1").all(|h| h.out_of_sync.is_none()));
    let got = head.read(0, SIZE).await.unwrap();
    assert!(got[..] == model[..], "reads come from the replicas still in sync");
    // With a second agent gone, the chunks they shared have no replica.
    c.switches[2].down.store(true, Ordering::SeqCst);
    let mut failed = None;
    for chunk in 0..8u64 {
        if let Err(e) = head.write(chunk * CHUNK, Bytes::from(vec![1u8; 4096])).await {
            failed = Some(e.to_string());
        }
    }
    let msg = failed.expect("some chunk lived only on agents 1 and 2");
    assert!(
        msg.contains("no in-sync replica") && msg.contains("agent-1") && msg.contains("agent-2"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_is_on_every_replica_or_on_none() {
    let c = cluster(3);
    let head = c.open(2, 1).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    put(&head, &mut model, 12345, pattern(7, 5 << 20)).await;
    let s1 = SnapshotId::new("s1").unwrap();
    let digest = head.snapshot(&s1, 1).await.unwrap();
    assert_eq!(digest, model_digest(&model));
    for s in &c.stores {
        let snaps = s.replica(&vol()).unwrap().snapshots().unwrap();
        assert_eq!(snaps.len(), 1, "every replica sealed s1");
    }
    // The same content on one agent with one replica has the same digest.
    let single = cluster(1);
    let one = single.open(1, 1).await.unwrap();
    one.write(12345, Bytes::from(pattern(7, 5 << 20))).await.unwrap();
    assert_eq!(one.snapshot(&s1, 1).await.unwrap(), digest, "digest independent of placement");
    // A seal that fails on one agent removes the snapshot everywhere.
    put(&head, &mut model, 0, pattern(8, 4096)).await;
    c.switches[2].seal_fails.store(true, Ordering::SeqCst);
    let s2 = SnapshotId::new("s2").unwrap();
    let err = head.snapshot(&s2, 2).await.unwrap_err().to_string();
    assert!(err.contains("disk full") && err.contains("removed"), "{err}");
    for s in &c.stores {
        let snaps = s.replica(&vol()).unwrap().snapshots().unwrap();
        assert!(snaps.iter().all(|x| x.id != s2), "no partial snapshot s2");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_head_fences_the_old_one_for_good() {
    let c = cluster(3);
    let old = c.open(2, 1).await.unwrap();
    old.write(0, Bytes::from(vec![1u8; 8192])).await.unwrap();
    let new = c.open(2, 2).await.unwrap();
    let err = old.write(0, Bytes::from(vec![2u8; 8192])).await.unwrap_err();
    assert!(matches!(err, HeadError::Fenced { epoch: 1, .. }), "{err}");
    assert!(err.to_string().contains("epoch 1") && err.to_string().contains("epoch 2"), "{err}");
    assert!(old.read(0, 10).await.is_err(), "a fenced head serves nothing");
    assert_eq!(&new.read(0, 8192).await.unwrap()[..], &[1u8; 8192][..]);
    // An older epoch cannot even open.
    assert!(matches!(c.open(2, 1).await, Err(HeadError::Fenced { .. })));
}

/// Every chunk's replicas hold the same content: per-chunk digests of the
/// head and of every snapshot are equal on all agents holding the chunk.
fn assert_replicas_agree(c: &Cluster, snapshots: &[&SnapshotId]) {
    let views: Vec<Option<&SnapshotId>> =
        std::iter::once(None).chain(snapshots.iter().map(|s| Some(*s))).collect();
    for view in views {
        let mut by_chunk: BTreeMap<u64, Vec<(usize, Accumulator)>> = BTreeMap::new();
        for (i, s) in c.stores.iter().enumerate() {
            let r = s.replica(&vol()).unwrap();
            for (chunk, acc) in r.chunk_digests(view, &[]).unwrap() {
                by_chunk.entry(chunk).or_default().push((i, acc));
            }
        }
        assert_eq!(by_chunk.len() as u64, SIZE / CHUNK, "every chunk is held");
        for (chunk, accs) in by_chunk {
            assert_eq!(accs.len(), 2, "chunk {chunk} has 2 replicas");
            assert_eq!(accs[0].1, accs[1].1, "chunk {chunk} ({view:?}): agents {accs:?} differ");
        }
    }
}

/// Writes random-sized pieces at random offsets through `head` until
/// `stop`, keeping `model` in step; returns how many writes it made.
async fn keep_writing(
    head: Arc<VolumeHead>,
    model: Arc<std::sync::Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> u64 {
    let mut x = seed | 1;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x % 20_000) as usize;
        let offset = (x >> 20) % (SIZE - len as u64);
        let data = pattern(x, len);
        model.lock().unwrap()[offset as usize..offset as usize + len].copy_from_slice(&data);
        head.write(offset, Bytes::from(data)).await.unwrap();
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_comes_back_is_rebuilt_while_writes_go_on() {
    let c = cluster(3);
    let head = Arc::new(c.open(2, 1).await.unwrap());
    let mut m = vec![0u8; SIZE as usize];
    put(&head, &mut m, 0, pattern(11, 6 << 20)).await;
    let s1 = SnapshotId::new("s1").unwrap();
    head.snapshot(&s1, 1).await.unwrap();
    head.trim(1 << 20, 1 << 20).await.unwrap();
    m[1 << 20..2 << 20].fill(0);
    put(&head, &mut m, 3 << 20, pattern(12, 1 << 20)).await;
    // Agent 1 goes away; writes, a trim and a snapshot happen without it.
    c.switches[1].down.store(true, Ordering::SeqCst);
    put(&head, &mut m, 5 << 20, pattern(13, 3 << 20)).await;
    let s2 = SnapshotId::new("s2").unwrap();
    head.snapshot(&s2, 2).await.unwrap();
    head.trim(0, 300 << 10).await.unwrap();
    m[..300 << 10].fill(0);
    put(&head, &mut m, 7, pattern(14, 100_000)).await;
    assert_eq!(head.needs_rebuild(), vec!["agent-1".to_string()]);
    let err = head.rebuild("agent-1").await.unwrap_err().to_string();
    assert!(err.contains("agent-1") && err.contains("connection refused"), "{err}");
    let health = head.health();
    let h1 = health.iter().find(|h| h.agent == "agent-1").unwrap();
    assert!(h1.last_rebuild.as_deref().unwrap().starts_with("failed"), "{h1:?}");
    assert!(h1.out_of_sync.is_some(), "a failed rebuild leaves it out of sync");

    // It comes back and is rebuilt while a writer keeps going.
    c.switches[1].down.store(false, Ordering::SeqCst);
    let model = Arc::new(std::sync::Mutex::new(m));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(keep_writing(head.clone(), model.clone(), stop.clone(), 99));
    let report = head.rebuild("agent-1").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(writes > 0, "writes went on during the rebuild");
    assert_eq!(report.layers, 2, "{report:?}");
    assert!(report.bytes > 0 && report.head_blocks > 0, "{report:?}");
    assert!(head.health().iter().all(|h| h.out_of_sync.is_none() && h.rebuild.is_none()));
    assert!(head.needs_rebuild().is_empty());
    head.flush().await.unwrap();
    assert_replicas_agree(&c, &[&s1, &s2]);
    let model = model.lock().unwrap().clone();
    assert!(head.read(0, SIZE).await.unwrap()[..] == model[..], "no acknowledged write lost");
    assert_eq!(head.digest(None).await.unwrap(), model_digest(&model));
    // The rebuilt replica serves: with the other two down in turn, every
    // chunk agent 1 holds reads back as written.
    for other in [0usize, 2] {
        let head = c.open(2, 3 + other as u64).await.unwrap();
        c.switches[other].down.store(true, Ordering::SeqCst);
        for chunk in 0..SIZE / CHUNK {
            if let Ok(got) = head.read(chunk * CHUNK, CHUNK).await {
                let at = (chunk * CHUNK) as usize;
                assert!(got[..] == model[at..at + CHUNK as usize], "chunk {chunk}");
            }
        }
        c.switches[other].down.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_taken_during_a_rebuild_reaches_the_rebuilt_replica() {
    let c = cluster(3);
    let head = Arc::new(c.open(2, 1).await.unwrap());
    let mut m = vec![0u8; SIZE as usize];
    put(&head, &mut m, 0, pattern(21, SIZE as usize)).await;
    c.switches[2].down.store(true, Ordering::SeqCst);
    put(&head, &mut m, 4096, pattern(22, 2 << 20)).await;
    c.switches[2].down.store(false, Ordering::SeqCst);
    let snaps: Vec<SnapshotId> =
        (1..=4).map(|i| SnapshotId::new(format!("during-{i}")).unwrap()).collect();
    let rebuild = tokio::spawn({
        let head = head.clone();
        async move { head.rebuild("agent-2").await }
    });
    for (i, s) in snaps.iter().enumerate() {
        head.write(i as u64 * 8192, Bytes::from(pattern(30 + i as u64, 8192))).await.unwrap();
        head.snapshot(s, 10 + i as u64).await.unwrap();
    }
    rebuild.await.unwrap().unwrap();
    let refs: Vec<&SnapshotId> = snaps.iter().collect();
    assert_replicas_agree(&c, &refs);
    for s in &c.stores {
        let have = s.replica(&vol()).unwrap().snapshots().unwrap();
        assert_eq!(have.len(), snaps.len(), "every replica has every snapshot");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reopened_head_rebuilds_an_empty_replica_by_itself() {
    let c = cluster(3);
    let mut m = vec![0u8; SIZE as usize];
    {
        let head = c.open(2, 1).await.unwrap();
        put(&head, &mut m, 100, pattern(41, 5 << 20)).await;
        head.snapshot(&SnapshotId::new("before").unwrap(), 1).await.unwrap();
        put(&head, &mut m, 6 << 20, pattern(42, 1 << 20)).await;
        head.flush().await.unwrap();
    }
    // Agent 0's disk is replaced: its replica is gone.
    c.stores[0].delete_replica(&vol()).unwrap();
    let head = Arc::new(c.open(2, 2).await.unwrap());
    let h0 = head.health().into_iter().find(|h| h.agent == "agent-0").unwrap();
    assert!(h0.out_of_sync.as_deref().unwrap().contains("has 0 snapshots"), "{h0:?}");
    assert!(head.read(0, SIZE).await.unwrap()[..] == m[..], "reads avoid the empty replica");
    let heal = tokio::spawn(head.clone().heal(std::time::Duration::from_millis(20)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while head.health().iter().any(|h| h.out_of_sync.is_some()) {
        assert!(std::time::Instant::now() < deadline, "not healed: {:?}", head.health());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    heal.abort();
    let h0 = head.health().into_iter().find(|h| h.agent == "agent-0").unwrap();
    assert!(h0.last_rebuild.as_deref().unwrap().starts_with("rebuilt"), "{h0:?}");
    assert_replicas_agree(&c, &[&SnapshotId::new("before").unwrap()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_replica_is_dropped_durably_on_the_survivors_before_the_ack() {
    let c = cluster(2);
    let head = c.open(2, 1).await.unwrap();
    head.write(0, Bytes::from(pattern(51, 8192))).await.unwrap();
    c.switches[1].down.store(true, Ordering::SeqCst);
    head.write(0, Bytes::from(pattern(52, 8192))).await.expect("acknowledged without agent-1");
    // Power is lost right after the acknowledgement: agent 0's disk as it
    // was durably already says agent 1 is out.
    let image = c.disks[0].crash_image(CrashMode::DropUnsynced);
    let store = Store::open(Arc::new(image), Path::new("/agent")).unwrap();
    let on_0 = store.replica(&vol()).unwrap().info().in_sync.expect("an in-sync record");
    assert_eq!(on_0.members.iter().collect::<Vec<_>>(), ["agent-0"], "{on_0:?}");
    let on_1 = c.stores[1].replica(&vol()).unwrap().info().in_sync.unwrap();
    assert!(on_1.members.contains("agent-1") && on_1.version() < on_0.version(), "{on_1:?}");
    drop(head);
    // Only agent 1 answers: it cannot prove it is current, so no head opens.
    c.switches[0].down.store(true, Ordering::SeqCst);
    c.switches[1].down.store(false, Ordering::SeqCst);
    let err = c.open(2, 2).await.unwrap_err().to_string();
    assert!(err.contains("agents agent-0 ") && err.contains("accept_data_loss"), "{err}");
    // With agent 0 back, agent 1 starts out of sync and agent 0 serves.
    c.switches[0].down.store(false, Ordering::SeqCst);
    let head = c.open(2, 3).await.unwrap();
    let h1 = head.health().into_iter().find(|h| h.agent == "agent-1").unwrap();
    assert!(h1.out_of_sync.as_deref().unwrap().contains("not in the in-sync set"), "{h1:?}");
    assert!(head.read(0, 8192).await.unwrap()[..] == pattern(52, 8192)[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_deleted_during_a_rebuild_stays_deleted_on_the_rebuilt_replica() {
    let c = cluster(3);
    let head = Arc::new(c.open(2, 1).await.unwrap());
    let snaps: Vec<SnapshotId> =
        (1..=6).map(|i| SnapshotId::new(format!("s{i}")).unwrap()).collect();
    for (i, s) in snaps.iter().enumerate() {
        head.write(i as u64 * (1 << 20), Bytes::from(pattern(60 + i as u64, 1 << 20)))
            .await
            .unwrap();
        head.snapshot(s, i as u64 + 1).await.unwrap();
    }
    c.switches[2].down.store(true, Ordering::SeqCst);
    head.write(4096, Bytes::from(pattern(70, 4096))).await.unwrap();
    c.switches[2].down.store(false, Ordering::SeqCst);
    // The rebuild is held as it seals s1 on agent 2; s1 is deleted then.
    c.switches[2].hold_seal.store(true, Ordering::SeqCst);
    let rebuild = tokio::spawn({
        let head = head.clone();
        async move { head.rebuild("agent-2").await }
    });
    c.switches[2].seal_held.notified().await;
    head.delete_snapshot(&snaps[0]).await.unwrap();
    c.switches[2].seal_go.notify_one();
    rebuild.await.unwrap().unwrap();
    for (i, s) in c.stores.iter().enumerate() {
        let have: Vec<String> = s
            .replica(&vol())
            .unwrap()
            .snapshots()
            .unwrap()
            .iter()
            .map(|s| s.id.to_string())
            .collect();
        assert_eq!(have, ["s2", "s3", "s4", "s5", "s6"], "agent-{i}");
    }
    let refs: Vec<&SnapshotId> = snaps[1..].iter().collect();
    assert_replicas_agree(&c, &refs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_copies_snapshots_by_layer_order_not_by_generation() {
    let c = cluster(3);
    let head = Arc::new(c.open(2, 1).await.unwrap());
    let mut m = vec![0u8; SIZE as usize];
    let ids: Vec<SnapshotId> =
        ["base", "diverged", "after"].iter().map(|s| SnapshotId::new(*s).unwrap()).collect();
    // As a failback leaves it: a divergent snapshot with a higher
    // generation than the one sealed after it.
    put(&head, &mut m, 0, pattern(81, 1 << 20)).await;
    head.snapshot(&ids[0], 1).await.unwrap();
    put(&head, &mut m, 2 << 20, pattern(82, 1 << 20)).await;
    head.snapshot(&ids[1], 7).await.unwrap();
    head.mark_divergent(&ids[1..2]).await.unwrap();
    put(&head, &mut m, 4 << 20, pattern(83, 1 << 20)).await;
    head.snapshot(&ids[2], 2).await.unwrap();
    c.switches[1].down.store(true, Ordering::SeqCst);
    put(&head, &mut m, 6 << 20, pattern(84, 1 << 20)).await;
    c.switches[1].down.store(false, Ordering::SeqCst);
    let report = head.rebuild("agent-1").await.unwrap();
    assert_eq!(report.layers, 3, "{report:?}");
    let refs: Vec<&SnapshotId> = ids.iter().collect();
    assert_replicas_agree(&c, &refs);
    for (i, s) in c.stores.iter().enumerate() {
        let have: Vec<(String, bool)> = s
            .replica(&vol())
            .unwrap()
            .snapshots()
            .unwrap()
            .iter()
            .map(|s| (s.id.to_string(), s.divergent))
            .collect();
        let want = [("base", false), ("diverged", true), ("after", false)];
        assert_eq!(have, want.map(|(s, d)| (s.to_string(), d)), "agent-{i}");
    }
    assert!(head.read(0, SIZE).await.unwrap()[..] == m[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_left_different_by_a_dead_head_agree_again_before_serving() {
    let c = cluster(2);
    let x = pattern(91, 8192);
    {
        let head = c.open(2, 1).await.unwrap();
        head.write(0, Bytes::from(x.clone())).await.unwrap();
        head.flush().await.unwrap();
        // The head dies in the middle of a fan-out: a write reached agent 1
        // and was never acknowledged.
        c.stores[1].replica(&vol()).unwrap().write(1, 0, &pattern(92, 8192)).unwrap();
    }
    let head = Arc::new(c.open(2, 2).await.unwrap());
    let h1 = head.health().into_iter().find(|h| h.agent == "agent-1").unwrap();
    assert!(h1.out_of_sync.as_deref().unwrap().contains("differs from agent agent-0"), "{h1:?}");
    assert!(head.read(0, 8192).await.unwrap()[..] == x[..]);
    head.rebuild("agent-1").await.unwrap();
    let on_1 = c.stores[1].replica(&vol()).unwrap().read(0, 8192, None).unwrap();
    assert!(on_1[..] == x[..], "agent 1 holds what agent 0 does");
    assert_replicas_agree(&c, &[]);
}
