//! [`LocalPeer`]: this agent's own store as a peer of a head, called on the
//! blocking pool or right on a frontend worker thread.
//!
//! Invariant: a store error keeps its kind ([`local_error`]): a stale epoch
//! is always [`PeerErrorKind::Fenced`].

use std::{
    cell::Cell,
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use cairn_api::{
    Accumulator, ChunkSet, Geometry, SnapshotId, VolumeId,
    snapshot::{ReplicaInfo, SnapshotInfo},
};
use futures::StreamExt;

use super::*;
use crate::{error::Error, store::Store};

fn local_error(agent: &str, e: Error) -> PeerError {
    let kind = match &e {
        Error::StaleEpoch { .. } | Error::EpochTaken { .. } => PeerErrorKind::Fenced,
        Error::Checksum { .. } | Error::Corrupt { .. } => PeerErrorKind::Corrupt,
        Error::Io { .. }
        | Error::StoreIo { .. }
        | Error::Meta { .. }
        | Error::NotServing { .. }
        | Error::Incarnation { .. } => PeerErrorKind::Unavailable,
        Error::ReplicaNotFound { .. }
        | Error::ReplicaExists { .. }
        | Error::SnapshotNotFound { .. }
        | Error::SnapshotExists { .. }
        | Error::StaleGeneration { .. }
        | Error::Range { .. }
        | Error::Geometry { .. }
        | Error::ChunkNotHeld { .. }
        | Error::StaleInSync { .. } => PeerErrorKind::Refused,
    };
    PeerError { agent: agent.to_string(), kind, message: e.to_string() }
}

thread_local! {
    /// Set while a frontend worker blocks on a head's future (see
    /// [`on_frontend_thread`]).
    static FRONTEND_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (which blocks on the runtime, e.g. `Handle::block_on` of a head
/// I/O) with this thread marked as a frontend worker: the [`LocalPeer`]
/// calls of the futures it polls run here, on this thread, instead of being
/// handed to the blocking pool and back. That saves two thread switches per
/// local replica call (a 4 KiB write through FUSE took six). Only for
/// threads outside the runtime, which may block as long as they like.
pub fn on_frontend_thread<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FRONTEND_THREAD.set(self.0);
        }
    }
    let _reset = Reset(FRONTEND_THREAD.replace(true));
    f()
}

/// This agent's own store.
#[derive(Debug, Clone)]
pub struct LocalPeer {
    name: String,
    store: Arc<Store>,
    /// The replica incarnation the last `ensure` returned (0: none yet),
    /// checked on every write, read, trim, flush and in-sync record: a peer
    /// serves one head, so one volume.
    incarnation: Arc<AtomicU64>,
}

impl LocalPeer {
    pub fn new(name: impl Into<String>, store: Arc<Store>) -> Self {
        LocalPeer { name: name.into(), store, incarnation: Default::default() }
    }

    /// The replica of `volume`, refused if it is not the incarnation this
    /// peer wrote to.
    fn checked(
        store: &Store,
        volume: &VolumeId,
        expected: u64,
    ) -> Result<Arc<crate::Replica>, Error> {
        let r = store.replica(volume)?;
        r.check_incarnation(expected)?;
        Ok(r)
    }

    fn expected(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    ) -> PeerResult<T> {
        let res = if FRONTEND_THREAD.get() {
            // Let the other calls of a fan-out (a write to another agent)
            // be sent first, so they run while this one blocks the thread.
            tokio::task::yield_now().await;
            Ok(f(&self.store))
        } else {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || f(&store)).await
        };
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(local_error(&self.name, e)),
            Err(e) => Err(PeerError {
                agent: self.name.clone(),
                kind: PeerErrorKind::Unavailable,
                message: format!("store task failed: {e}"),
            }),
        }
    }
}

#[tonic::async_trait]
impl ReplicaPeer for LocalPeer {
    fn agent(&self) -> &str {
        &self.name
    }

    async fn ensure(
        &self,
        volume: &VolumeId,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> PeerResult<ReplicaInfo> {
        let v = volume.clone();
        let info =
            self.run(move |s| s.create_replica(&v, geometry, chunks).map(|r| r.info())).await?;
        self.incarnation.store(info.incarnation, Ordering::SeqCst);
        Ok(info)
    }

    async fn revert_head(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| s.revert_head(&v, epoch).map(drop)).await
    }

    async fn delete_replica(&self, volume: &VolumeId) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| match s.delete_replica(&v) {
            Err(Error::ReplicaNotFound { .. }) => Ok(()),
            other => other,
        })
        .await
    }

    async fn fence(&self, volume: &VolumeId, epoch: u64, head: &str) -> PeerResult<u64> {
        let (v, head) = (volume.clone(), head.to_string());
        self.run(move |s| s.replica(&v)?.fence_as(epoch, &head)).await
    }

    async fn set_in_sync(
        &self,
        volume: &VolumeId,
        epoch: u64,
        head: &str,
        seq: u64,
        members: &BTreeSet<String>,
    ) -> PeerResult<()> {
        let (v, head, members, inc) =
            (volume.clone(), head.to_string(), members.clone(), self.expected());
        self.run(move |s| Self::checked(s, &v, inc)?.set_in_sync(epoch, &head, seq, members)).await
    }

    async fn write(
        &self,
        volume: &VolumeId,
        epoch: u64,
        offset: u64,
        data: Bytes,
    ) -> PeerResult<()> {
        let (v, inc) = (volume.clone(), self.expected());
        self.run(move |s| Self::checked(s, &v, inc)?.write(epoch, offset, &data)).await
    }

    async fn read(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> PeerResult<Bytes> {
        let (v, snap, inc) = (volume.clone(), snapshot.cloned(), self.expected());
        self.run(move |s| {
            Self::checked(s, &v, inc)?.read(offset, len, snap.as_ref()).map(Bytes::from)
        })
        .await
    }

    async fn trim(&self, volume: &VolumeId, epoch: u64, offset: u64, len: u64) -> PeerResult<()> {
        let (v, inc) = (volume.clone(), self.expected());
        self.run(move |s| Self::checked(s, &v, inc)?.trim(epoch, offset, len)).await
    }

    async fn flush(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let (v, inc) = (volume.clone(), self.expected());
        self.run(move |s| Self::checked(s, &v, inc)?.flush(epoch)).await
    }

    async fn seal(
        &self,
        volume: &VolumeId,
        epoch: u64,
        id: &SnapshotId,
        generation: u64,
    ) -> PeerResult<()> {
        let (v, id) = (volume.clone(), id.clone());
        self.run(move |s| s.replica(&v)?.seal(epoch, &id, generation).map(drop)).await
    }

    async fn mark_divergent(
        &self,
        volume: &VolumeId,
        epoch: u64,
        ids: &[SnapshotId],
    ) -> PeerResult<()> {
        let (v, ids) = (volume.clone(), ids.to_vec());
        self.run(move |s| s.replica(&v)?.mark_divergent(epoch, &ids)).await
    }

    async fn delete_snapshot(&self, volume: &VolumeId, id: &SnapshotId) -> PeerResult<()> {
        let (v, id) = (volume.clone(), id.clone());
        self.run(move |s| s.replica(&v)?.delete_snapshot(&id)).await
    }

    async fn chunk_digests(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        chunks: &[u64],
    ) -> PeerResult<Vec<(u64, Accumulator)>> {
        let (v, snap, chunks) = (volume.clone(), snapshot.cloned(), chunks.to_vec());
        self.run(move |s| s.replica(&v)?.chunk_digests(snap.as_ref(), &chunks)).await
    }

    async fn snapshots(&self, volume: &VolumeId) -> PeerResult<Vec<SnapshotInfo>> {
        let v = volume.clone();
        self.run(move |s| s.replica(&v)?.snapshots()).await
    }

    async fn stream(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<BlockStream> {
        let snap = snapshot.clone();
        let rx = crate::store::spawn_stream(
            self.store.clone(),
            volume.clone(),
            chunks.to_vec(),
            LOCAL_STREAM_BATCH,
            move |r, c| match kind {
                StreamKind::Layer => r.list_layer(&snap, c),
                StreamKind::Image => r.list_image(&snap, c),
            },
        );
        let name = self.name.clone();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |batch| {
            let blocks = batch.map_err(|e| local_error(&name, e))?;
            Ok(blocks
                .into_iter()
                .map(|b| CopiedBlock { block: b.block, data: b.data.map(Bytes::from) })
                .collect())
        });
        Ok(Box::pin(stream))
    }

    async fn count_blocks(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<Vec<(u64, u64, u64)>> {
        let (v, snap, chunks) = (volume.clone(), snapshot.clone(), chunks.to_vec());
        let image = kind == StreamKind::Image;
        self.run(move |s| s.replica(&v)?.count_blocks(&snap, &chunks, image)).await
    }

    async fn head_blocks(
        &self,
        volume: &VolumeId,
        chunks: &[u64],
        start: u64,
    ) -> PeerResult<(Vec<u64>, Option<u64>)> {
        let (v, chunks) = (volume.clone(), chunks.to_vec());
        self.run(move |s| {
            s.replica(&v)?.list_head_blocks(&chunks, start, crate::transport::HEAD_BLOCKS_PAGE)
        })
        .await
    }
}

/// Blocks per batch of a local stream (1 MiB of data).
const LOCAL_STREAM_BATCH: usize = 256;
