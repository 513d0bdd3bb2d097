//! The volume head: the one place where an attached volume's I/O is served.
//! It cuts byte-addressed I/O at chunk boundaries, writes each piece to every
//! in-sync replica of its chunk in parallel and acknowledges when all of them
//! have it; reads come from the local replica when there is one, else from
//! the in-sync replicas in turn.
//!
//! Invariants: a replica that fails a write, a flush or a read (or does not
//! answer) is marked out of sync and gets no more I/O from this head until
//! it is rebuilt; an acknowledged write is on every replica still in sync; a
//! refusal for a stale epoch fences this head for good; a snapshot holds new
//! writes, drains those in flight, and is sealed on every in-sync replica or
//! on none (it is deleted where it was sealed if any seal fails).
//!
//! This module keeps the fan-out; [`read`] the reads, [`in_sync`] the
//! durable in-sync set, [`snapshot`] the snapshots through a head,
//! [`rebuild`] the rebuild of out-of-sync replicas, [`source`] the choice of
//! a copy's source replica, [`range_lock`] the byte-range locks.
//!
//! Rebuild (see `docs/design.md`, "Rebuild"): an out-of-sync replica is
//! recreated empty, gets the sealed layers copied from in-sync replicas and
//! sealed under the same ids (per-chunk digests compared), then *catches
//! up*: writes reach it too while the head layer's blocks are copied, each
//! run holding its byte range exclusively, so a copy never overwrites a
//! newer write; it rejoins only when its per-chunk head digests equal the
//! sources'.

mod in_sync;
pub mod range_lock;
mod read;
mod rebuild;
mod snapshot;
mod source;

pub use rebuild::{RebuildPhase, RebuildProgress, RebuildReport};
pub(crate) use rebuild::{Run, layer_runs};
pub use source::{SourceCandidate, SourcePick, StreamCount, auto_source};

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_api::{
    Accumulator, BLOCK_SIZE, ChunkSet, Digest, Geometry, SnapshotId, VolumeId,
    block::MAX_IO_BYTES,
    placement::{PlacementAgent, PlacementError, place},
    snapshot::{ReplicaInfo, SnapshotInfo},
};
use futures::{StreamExt, future::join_all};

use crate::{
    head::range_lock::RangeLocks,
    peer::{BlockStream, CopiedBlock, PeerError, PeerErrorKind, ReplicaPeer, StreamKind},
};

/// The most bytes one head read or write may carry.
pub const MAX_HEAD_IO: u64 = 16 << 20;

/// What a head is opened for.
#[derive(Debug, Clone)]
pub struct HeadSpec {
    pub volume: VolumeId,
    pub geometry: Geometry,
    pub replicas: usize,
    pub layout_version: u64,
    /// The storage cluster's agents, in any order (placement uses names).
    pub agents: Vec<PlacementAgent>,
    /// Grows with every new head of this volume; replicas refuse lower ones.
    pub epoch: u64,
    /// Agents whose replicas are known to have missed writes: they start
    /// out of sync and are rebuilt before they serve.
    pub stale: Vec<String>,
    /// Cost labels of agents for copies reading from them (absent: 0).
    pub costs: BTreeMap<String, u32>,
    /// Open even when replicas that may hold acknowledged writes do not
    /// answer (their writes are lost); refused otherwise.
    pub accept_data_loss: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("volume {volume}: cannot place {replicas} replicas: {source}")]
    Placement {
        volume: VolumeId,
        replicas: usize,
        #[source]
        source: PlacementError,
    },
    #[error(
        "volume {volume}: range [{offset}, {offset}+{len}) is outside the {size}-byte volume or over the {MAX_HEAD_IO}-byte request limit"
    )]
    Range { volume: VolumeId, offset: u64, len: u64, size: u64 },
    #[error(
        "volume {volume}: chunk {chunk} has no in-sync replica left (agents tried: {tried}); the data of this chunk is unavailable until one of those agents is back and rebuilt"
    )]
    NoReplica { volume: VolumeId, chunk: u64, tried: String },
    #[error(
        "volume {volume}: this head (epoch {epoch}) is fenced: {detail}; a newer head serves the volume, so this one serves no more I/O"
    )]
    Fenced { volume: VolumeId, epoch: u64, detail: String },
    #[error("volume {volume}: {source}")]
    Refused {
        volume: VolumeId,
        #[source]
        source: PeerError,
    },
    #[error(
        "volume {volume}: snapshot {snapshot} failed ({failures}); it was removed where it had been sealed, so no partial snapshot exists"
    )]
    Snapshot { volume: VolumeId, snapshot: SnapshotId, failures: String },
    #[error("volume {volume}: no peer given for agent {agent}")]
    MissingPeer { volume: VolumeId, agent: String },
    #[error("volume {volume}: rebuild of the replica on agent {agent} failed: {reason}")]
    Rebuild { volume: VolumeId, agent: String, reason: String },
    #[error(
        "volume {volume}: cannot prove that the replicas that answer hold every acknowledged write: agents {missing} are in the in-sync set {record} and do not answer; wait for them to return and open again, or open with accept_data_loss to serve what the others hold (writes only those agents have are lost)"
    )]
    Unproven { volume: VolumeId, missing: String, record: String },
    #[error(
        "volume {volume}: no in-sync replica holds an intact copy: {detail}; the rest of the volume reads as usual, and the damaged copy is kept as it is until a good copy repairs it or an administrator acts"
    )]
    DataLoss { volume: VolumeId, detail: String },
}

pub type HeadResult<T> = Result<T, HeadError>;

/// One agent as the head sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHealth {
    pub agent: String,
    /// Chunks of the volume this agent holds a replica of.
    pub chunks: u64,
    /// `None` while in sync; why it is out of sync otherwise.
    pub out_of_sync: Option<String>,
    /// Set while the replica is being rebuilt.
    pub rebuild: Option<RebuildProgress>,
    /// How the last rebuild of this replica ended.
    pub last_rebuild: Option<String>,
}

#[derive(Debug)]
pub struct VolumeHead {
    spec: HeadSpec,
    /// `peers[i]` reaches `spec.agents[i]`.
    peers: Vec<Arc<dyn ReplicaPeer>>,
    /// `chunks[c]` lists the agents (indexes) holding chunk `c`.
    chunks: Vec<Vec<usize>>,
    local: Option<usize>,
    /// Shared by I/O, exclusive for a snapshot (hold and drain).
    gate: tokio::sync::RwLock<()>,
    /// Shared by aligned writes, exclusive for read-modify-write.
    rmw: tokio::sync::RwLock<()>,
    /// Byte ranges being written (shared) or copied by a rebuild
    /// (exclusive): a write waits only for a copy of the blocks it touches.
    ranges: RangeLocks,
    out_of_sync: Mutex<BTreeMap<usize, String>>,
    /// Grows, under the `out_of_sync` lock, whenever the in-sync set
    /// changes; `durable` says which value is recorded on the replicas.
    membership: AtomicU64,
    /// The in-sync set as recorded on the replicas (see `in_sync`).
    durable: tokio::sync::Mutex<in_sync::Durable>,
    /// The `membership` value last recorded (read without the lock).
    recorded: AtomicU64,
    /// This head's identity at the replicas (its agent's name).
    head_id: String,
    fenced: Mutex<Option<String>>,
    next_read: AtomicUsize,
    /// Agents catching up: writes and trims reach them too, reads and
    /// flushes do not. `Some(reason)` once one of those failed there: the
    /// rebuild then stops.
    catching_up: Mutex<BTreeMap<usize, Option<String>>>,
    /// Shared by a catch-up, exclusive for a snapshot, which waits until
    /// catch-ups end (a catching-up replica cannot seal a snapshot yet).
    /// Taken before `gate`.
    catchup_gate: tokio::sync::RwLock<()>,
    rebuilds: Mutex<BTreeMap<usize, RebuildProgress>>,
    last_rebuild: Mutex<BTreeMap<usize, String>>,
    /// Copy streams running per source agent.
    copy_streams: Mutex<BTreeMap<usize, usize>>,
    /// Measured copy throughput per source agent (bytes/s, smoothed).
    source_rates: Mutex<BTreeMap<usize, f64>>,
}

const BS: u64 = BLOCK_SIZE;

impl VolumeHead {
    /// Opens a head: places the chunks, makes sure every replica exists,
    /// and fences every replica at `spec.epoch` (so an older head can no
    /// longer write). Agents that do not answer start out of sync; every
    /// chunk must keep at least one in-sync replica.
    pub async fn open(
        spec: HeadSpec,
        mut peers_by_name: BTreeMap<String, Arc<dyn ReplicaPeer>>,
        local: Option<&str>,
    ) -> HeadResult<Self> {
        let volume = spec.volume.clone();
        let placement =
            place(&spec.agents, spec.replicas, spec.geometry.chunks(), spec.layout_version)
                .map_err(|source| HeadError::Placement {
                    volume: volume.clone(),
                    replicas: spec.replicas,
                    source,
                })?;
        let mut peers = Vec::with_capacity(spec.agents.len());
        for a in &spec.agents {
            let p = peers_by_name.remove(&a.name).ok_or_else(|| HeadError::MissingPeer {
                volume: volume.clone(),
                agent: a.name.clone(),
            })?;
            peers.push(p);
        }
        let head_id = local.unwrap_or_default().to_string();
        let local = local.and_then(|l| spec.agents.iter().position(|a| a.name == l));
        let head = VolumeHead {
            chunks: placement.chunks,
            spec,
            peers,
            local,
            gate: Default::default(),
            rmw: Default::default(),
            ranges: Default::default(),
            out_of_sync: Default::default(),
            // Ahead of `durable` (0): the open records its in-sync set.
            membership: AtomicU64::new(1),
            durable: Default::default(),
            recorded: AtomicU64::new(0),
            head_id,
            fenced: Default::default(),
            next_read: AtomicUsize::new(0),
            catching_up: Default::default(),
            catchup_gate: Default::default(),
            rebuilds: Default::default(),
            last_rebuild: Default::default(),
            copy_streams: Default::default(),
            source_rates: Default::default(),
        };
        let held = head.chunks_by_agent();
        let opens = held.iter().map(|(&a, chunks)| {
            let peer = head.peers[a].clone();
            let (volume, geometry, epoch) = (volume.clone(), head.spec.geometry, head.spec.epoch);
            let set = ChunkSet::Some(chunks.iter().copied().collect());
            let id = head.head_id.clone();
            async move {
                let info = peer.ensure(&volume, geometry, set).await?;
                peer.fence(&volume, epoch, &id).await?;
                Ok::<_, PeerError>(info)
            }
        });
        let results = join_all(opens).await;
        let mut infos = BTreeMap::new();
        for (&a, res) in held.keys().zip(results) {
            match res {
                Ok(info) => drop(infos.insert(a, info)),
                Err(e) => head.absorb(a, e)?,
            }
        }
        head.mark_stale_at_open(&infos);
        head.check_current_at_open(&infos)?;
        head.converge_at_open().await?;
        for c in 0..head.chunks.len() as u64 {
            head.in_sync(c)?;
        }
        head.make_durable().await?;
        Ok(head)
    }

    /// Marks out of sync, before any I/O, the replicas that cannot be
    /// current: those the caller named stale, and per chunk those with
    /// fewer snapshots than another replica of the chunk or empty while
    /// another holds data (new, or wiped by an unfinished rebuild).
    fn mark_stale_at_open(&self, infos: &BTreeMap<usize, ReplicaInfo>) {
        let mut out = self.out_of_sync.lock().unwrap();
        for name in &self.spec.stale {
            if let Some(a) = self.spec.agents.iter().position(|x| &x.name == name) {
                out.entry(a).or_insert_with(|| "named stale when the head was opened".into());
            }
        }
        let has_data = |i: &ReplicaInfo| i.sealed_layers > 0 || i.head_blocks > 0;
        for holders in &self.chunks {
            let known: Vec<(usize, &ReplicaInfo)> =
                holders.iter().filter_map(|a| infos.get(a).map(|i| (*a, i))).collect();
            let most = known.iter().map(|(_, i)| i.sealed_layers).max().unwrap_or(0);
            let any_data = known.iter().any(|(_, i)| has_data(i));
            for (a, info) in known {
                let why = if info.sealed_layers < most {
                    format!(
                        "has {} snapshots where another replica of its chunks has {most}",
                        info.sealed_layers
                    )
                } else if any_data && !has_data(info) {
                    "empty while another replica of its chunks holds data".to_string()
                } else {
                    continue;
                };
                out.entry(a).or_insert(why);
            }
        }
    }

    pub fn volume(&self) -> &VolumeId {
        &self.spec.volume
    }

    pub fn epoch(&self) -> u64 {
        self.spec.epoch
    }

    pub fn size(&self) -> u64 {
        self.spec.geometry.size()
    }

    fn chunks_by_agent(&self) -> BTreeMap<usize, Vec<u64>> {
        let mut by: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for (c, agents) in self.chunks.iter().enumerate() {
            for &a in agents {
                by.entry(a).or_default().push(c as u64);
            }
        }
        by
    }

    /// Health of every agent holding a replica of the volume.
    pub fn health(&self) -> Vec<AgentHealth> {
        let out = self.out_of_sync.lock().unwrap().clone();
        let rebuilds = self.rebuilds.lock().unwrap().clone();
        let last = self.last_rebuild.lock().unwrap().clone();
        self.chunks_by_agent()
            .into_iter()
            .map(|(a, chunks)| AgentHealth {
                agent: self.spec.agents[a].name.clone(),
                chunks: chunks.len() as u64,
                // Not in sync until its rebuild has ended (the set with it
                // is being recorded).
                out_of_sync: out.get(&a).cloned().or_else(|| {
                    rebuilds.contains_key(&a).then(|| "rejoining after its rebuild".into())
                }),
                rebuild: rebuilds.get(&a).cloned(),
                last_rebuild: last.get(&a).cloned(),
            })
            .collect()
    }

    /// The agents whose replicas are out of sync and not being rebuilt.
    pub fn needs_rebuild(&self) -> Vec<String> {
        let out = self.out_of_sync.lock().unwrap();
        let rebuilds = self.rebuilds.lock().unwrap();
        out.keys()
            .filter(|a| !rebuilds.contains_key(a))
            .map(|&a| self.spec.agents[a].name.clone())
            .collect()
    }

    /// True once a newer head has fenced this one.
    pub fn is_fenced(&self) -> bool {
        self.fenced.lock().unwrap().is_some()
    }

    fn check_fenced(&self) -> HeadResult<()> {
        match &*self.fenced.lock().unwrap() {
            None => Ok(()),
            Some(detail) => Err(HeadError::Fenced {
                volume: self.spec.volume.clone(),
                epoch: self.spec.epoch,
                detail: detail.clone(),
            }),
        }
    }

    /// Takes a peer's failure in: fenced stops the head, a refusal is the
    /// caller's error, anything else marks the agent out of sync.
    fn absorb(&self, agent: usize, e: PeerError) -> HeadResult<()> {
        match e.kind {
            PeerErrorKind::Fenced => {
                *self.fenced.lock().unwrap() = Some(e.to_string());
                self.check_fenced()
            }
            PeerErrorKind::Refused => {
                Err(HeadError::Refused { volume: self.spec.volume.clone(), source: e })
            }
            // The last in-sync copy of a chunk is never given up for a bad
            // block: the caller fails (DATA_LOSS) and the copy stays.
            PeerErrorKind::Corrupt if self.is_last_copy(agent) => {
                Err(HeadError::DataLoss { volume: self.spec.volume.clone(), detail: e.to_string() })
            }
            PeerErrorKind::Unavailable | PeerErrorKind::Corrupt => {
                self.mark_out_of_sync(agent, e.to_string());
                Ok(())
            }
        }
    }

    /// True when `agent` holds the only in-sync replica of one of its chunks.
    fn is_last_copy(&self, agent: usize) -> bool {
        let out = self.out_of_sync.lock().unwrap();
        !out.contains_key(&agent)
            && self.chunks.iter().any(|holders| {
                holders.contains(&agent)
                    && holders.iter().all(|h| *h == agent || out.contains_key(h))
            })
    }

    /// Marks `agent` out of sync (if it is not yet) with the reason `why`;
    /// the change is recorded on the replicas before the next
    /// acknowledgement ([`VolumeHead::make_durable`]).
    fn mark_out_of_sync(&self, agent: usize, why: String) {
        let mut out = self.out_of_sync.lock().unwrap();
        if let std::collections::btree_map::Entry::Vacant(v) = out.entry(agent) {
            tracing::warn!(volume = %self.spec.volume, agent = %self.spec.agents[agent].name, reason = %why, "replica out of sync");
            v.insert(why);
            self.membership.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The in-sync agents of `chunk`; an error naming the agents tried if
    /// none is left.
    fn in_sync(&self, chunk: u64) -> HeadResult<Vec<usize>> {
        let out = self.out_of_sync.lock().unwrap();
        let agents = &self.chunks[chunk as usize];
        let live: Vec<usize> = agents.iter().copied().filter(|a| !out.contains_key(a)).collect();
        if live.is_empty() {
            return Err(HeadError::NoReplica {
                volume: self.spec.volume.clone(),
                chunk,
                tried: agents
                    .iter()
                    .map(|&a| format!("{} ({})", self.spec.agents[a].name, out[&a]))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(live)
    }

    fn check_range(&self, offset: u64, len: u64) -> HeadResult<()> {
        let size = self.spec.geometry.size();
        if len == 0 || len > MAX_HEAD_IO || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(HeadError::Range { volume: self.spec.volume.clone(), offset, len, size });
        }
        Ok(())
    }

    /// `[offset, offset + len)` (block-aligned) cut at chunk boundaries and
    /// at the per-request limit: (chunk, offset, len).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let chunk_size = self.spec.geometry.chunk_size();
        let mut out = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let chunk = at / chunk_size;
            let stop = ((chunk + 1) * chunk_size).min(end).min(at + MAX_IO_BYTES);
            out.push((chunk, at, stop - at));
            at = stop;
        }
        out
    }

    /// Writes `data` at any offset; unaligned edges are read, patched and
    /// written back under an exclusive lock.
    pub async fn write(&self, offset: u64, data: Bytes) -> HeadResult<()> {
        self.check_fenced()?;
        self.check_range(offset, data.len() as u64)?;
        let _gate = self.gate.read().await;
        let end = offset + data.len() as u64;
        if offset.is_multiple_of(BS) && end.is_multiple_of(BS) {
            let _shared = self.rmw.read().await;
            return self.write_aligned(offset, data).await;
        }
        let _exclusive = self.rmw.write().await;
        let start = offset / BS * BS;
        let stop = end.div_ceil(BS) * BS;
        let mut buf = vec![0u8; (stop - start) as usize];
        if start != offset {
            let first = self.read_aligned(None, start, BS).await?;
            buf[..BS as usize].copy_from_slice(&first);
        }
        if stop != end && (stop - BS > start || start == offset) {
            let last = self.read_aligned(None, stop - BS, BS).await?;
            buf[(stop - BS - start) as usize..].copy_from_slice(&last);
        }
        buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(&data);
        self.write_aligned(start, Bytes::from(buf)).await
    }

    async fn write_aligned(&self, offset: u64, data: Bytes) -> HeadResult<()> {
        let _range = self.ranges.shared(offset, offset + data.len() as u64).await;
        let pieces = self.pieces(offset, data.len() as u64);
        let writes = pieces.iter().map(|&(chunk, off, len)| {
            let part = data.slice((off - offset) as usize..(off - offset + len) as usize);
            self.fan_out(chunk, move |peer, volume, epoch| {
                let part = part.clone();
                async move { peer.write(&volume, epoch, off, part).await }
            })
        });
        join_all(writes).await.into_iter().collect()
    }

    /// Runs `op` on every in-sync replica of `chunk` in parallel; succeeds
    /// when every replica still in sync afterwards has done it.
    async fn fan_out<F, Fut>(&self, chunk: u64, op: F) -> HeadResult<()>
    where
        F: Fn(Arc<dyn ReplicaPeer>, VolumeId, u64) -> Fut,
        Fut: Future<Output = Result<(), PeerError>>,
    {
        let targets = self.in_sync(chunk)?;
        let catching: Vec<usize> = {
            let cu = self.catching_up.lock().unwrap();
            let holders = &self.chunks[chunk as usize];
            holders.iter().copied().filter(|a| matches!(cu.get(a), Some(None))).collect()
        };
        let calls = targets
            .iter()
            .chain(&catching)
            .map(|&a| op(self.peers[a].clone(), self.spec.volume.clone(), self.spec.epoch));
        let results = join_all(calls).await;
        let (main, extra) = results.split_at(targets.len());
        for (&a, res) in targets.iter().zip(main) {
            if let Err(e) = res {
                self.absorb(a, e.clone())?;
            }
        }
        for (&a, res) in catching.iter().zip(extra) {
            match res {
                Err(e) if e.kind == PeerErrorKind::Fenced => self.absorb(a, e.clone())?,
                Err(e) => self.stop_catch_up(a, e.to_string()),
                Ok(()) => {}
            }
        }
        self.check_fenced()?;
        self.in_sync(chunk)?;
        self.make_durable().await
    }

    /// A write to a catching-up replica failed: its rebuild stops.
    fn stop_catch_up(&self, agent: usize, reason: String) {
        if let Some(slot) = self.catching_up.lock().unwrap().get_mut(&agent) {
            slot.get_or_insert(reason);
        }
    }

    /// Discards `[offset, offset + len)`: whole blocks are trimmed, partial
    /// edge blocks are zeroed.
    pub async fn trim(&self, offset: u64, len: u64) -> HeadResult<()> {
        self.check_fenced()?;
        let size = self.spec.geometry.size();
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(HeadError::Range { volume: self.spec.volume.clone(), offset, len, size });
        }
        let end = offset + len;
        let (first, last) = (offset.div_ceil(BS) * BS, end / BS * BS);
        if first >= last {
            return self.write(offset, Bytes::from(vec![0u8; len as usize])).await;
        }
        if first > offset {
            self.write(offset, Bytes::from(vec![0u8; (first - offset) as usize])).await?;
        }
        if end > last {
            self.write(last, Bytes::from(vec![0u8; (end - last) as usize])).await?;
        }
        let _gate = self.gate.read().await;
        let _shared = self.rmw.read().await;
        let chunk_size = self.spec.geometry.chunk_size();
        let mut at = first;
        let mut trims = Vec::new();
        while at < last {
            let chunk = at / chunk_size;
            let stop = ((chunk + 1) * chunk_size).min(last);
            trims.push((chunk, at, stop - at));
            at = stop;
        }
        let _range = self.ranges.shared(first, last).await;
        let ops = trims.iter().map(|&(chunk, off, n)| {
            self.fan_out(chunk, move |peer, volume, epoch| async move {
                peer.trim(&volume, epoch, off, n).await
            })
        });
        join_all(ops).await.into_iter().collect()
    }

    /// Makes every acknowledged write durable on every in-sync replica.
    pub async fn flush(&self) -> HeadResult<()> {
        self.check_fenced()?;
        let _gate = self.gate.read().await;
        self.flush_all().await
    }

    async fn flush_all(&self) -> HeadResult<()> {
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        self.on_live_agents(|a| self.peers[a].flush(volume, epoch)).await
    }

    /// Runs `op` on every in-sync agent in parallel; one that fails is
    /// marked out of sync. Fails when fenced or when a chunk is left with
    /// no in-sync replica.
    async fn on_live_agents<Fut>(&self, op: impl Fn(usize) -> Fut) -> HeadResult<()>
    where
        Fut: Future<Output = Result<(), PeerError>>,
    {
        let agents = self.live_agents();
        let results = join_all(agents.iter().map(|&a| op(a))).await;
        for (&a, res) in agents.iter().zip(results) {
            if let Err(e) = res {
                self.absorb(a, e)?;
            }
        }
        self.check_fenced()?;
        for c in 0..self.chunks.len() as u64 {
            self.in_sync(c)?;
        }
        self.make_durable().await
    }

    fn live_agents(&self) -> Vec<usize> {
        let out = self.out_of_sync.lock().unwrap();
        self.chunks_by_agent().into_keys().filter(|a| !out.contains_key(a)).collect()
    }

    pub fn geometry(&self) -> Geometry {
        self.spec.geometry
    }

    /// The number of chunks of the volume.
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }
}
