//! The volume head over several in-process agents (each its own store on a
//! simulated disk, reached through `LocalPeer`, some behind a switch that
//! makes them fail): striping, N-way writes, reads, failure handling,
//! all-or-nothing snapshots, placement-independent digests and fencing.

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
    disk::SimDisk,
    head::{HeadError, HeadSpec, VolumeHead},
    peer::{LocalPeer, PeerError, PeerErrorKind, PeerResult, ReplicaPeer},
};
use cairn_api::{
    Accumulator, BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId, digest::image_digest,
    placement::PlacementAgent,
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
    async fn ensure(&self, v: &VolumeId, g: Geometry, c: ChunkSet) -> PeerResult<()> {
        self.check()?;
        self.inner.ensure(v, g, c).await
    }
    async fn fence(&self, v: &VolumeId, e: u64) -> PeerResult<u64> {
        self.check()?;
        self.inner.fence(v, e).await
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
        self.inner.seal(v, e, id, g).await
    }
    async fn delete_snapshot(&self, v: &VolumeId, id: &SnapshotId) -> PeerResult<()> {
        self.check()?;
        self.inner.delete_snapshot(v, id).await
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
    stores: Vec<Arc<Store>>,
    switches: Vec<Arc<Switch>>,
}

fn cluster(n: usize) -> Cluster {
    let stores: Vec<Arc<Store>> = (0..n)
        .map(|_| Arc::new(Store::open(Arc::new(SimDisk::new()), Path::new("/agent")).unwrap()))
        .collect();
    let switches = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Arc::new(Switch {
                inner: LocalPeer::new(format!("agent-{i}"), s.clone()),
                down: AtomicBool::new(false),
                seal_fails: AtomicBool::new(false),
            })
        })
        .collect();
    Cluster { stores, switches }
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
