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
//! Rebuild (see `docs/design.md`, "Rebuild"): an out-of-sync replica is
//! recreated empty, gets the sealed layers copied from in-sync replicas and
//! sealed under the same ids (per-chunk digests compared), then *catches
//! up*: writes reach it too while the head layer's blocks are copied, each
//! run holding its byte range exclusively, so a copy never overwrites a
//! newer write; it rejoins only when its per-chunk head digests equal the
//! sources'.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
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
    peer::{BlockStream, CopiedBlock, PeerError, PeerErrorKind, ReplicaPeer, StreamKind},
    range_lock::RangeLocks,
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

/// Where a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildPhase {
    /// Copying sealed layers, oldest first.
    Layers,
    /// Copying the head layer's blocks; new writes reach the replica too.
    Head,
    /// Comparing the per-chunk head digests with the sources'.
    Verify,
}

impl RebuildPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RebuildPhase::Layers => "layers",
            RebuildPhase::Head => "head",
            RebuildPhase::Verify => "verify",
        }
    }
}

/// How far a rebuild is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    pub phase: RebuildPhase,
    pub layers_done: u32,
    pub layers_total: u32,
    /// Bytes of block data written to the replica, all phases.
    pub bytes_done: u64,
    pub head_blocks_done: u64,
    pub head_blocks_total: u64,
    pub started: Instant,
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub agent: String,
    pub layers: u32,
    pub bytes: u64,
    pub head_blocks: u64,
    pub elapsed: Duration,
}

/// The most head-layer blocks copied under one exclusive range: writes to
/// those blocks wait for the copy.
const HEAD_COPY_BATCH: u64 = 256 << 10;
/// The largest write a layer copy sends at once.
const LAYER_COPY_RUN: u64 = 1 << 20;

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

/// Which replica a copy reads each chunk from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourcePick {
    /// The head's own replica when in sync (no hop inside the site).
    #[default]
    Primary,
    /// A replica away from the head's agent, to spare the node serving the
    /// volume.
    Replica,
    /// In sync and reachable first, then the fewest copy streams running.
    Auto,
}

/// An in-sync replica [`SourcePick::Auto`] may read a chunk from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceCandidate {
    pub agent: usize,
    /// Copy streams running from it now.
    pub streams: usize,
    /// Measured copy throughput from it (bytes/s), if any.
    pub rate: Option<f64>,
    pub cost: u32,
    /// This agent's own replica (no hop inside the site).
    pub local: bool,
}

/// [`SourcePick::Auto`]'s choice among in-sync replicas: the fewest copy
/// streams running; then the best measured throughput (within 10%, as the
/// same; one never measured counts as the best, so it gets measured); then
/// the lowest cost label; then this agent's own. `candidates` is not empty.
pub fn auto_source(candidates: &[SourceCandidate]) -> usize {
    let best = candidates.iter().filter_map(|c| c.rate).fold(0.0f64, f64::max);
    // Throughput class: 0 for the best (or unmeasured), then 1, 2, ... for
    // each further 10% below it.
    let class = |c: &SourceCandidate| match c.rate {
        Some(r) if best > 0.0 && r > 0.0 => ((best / r).ln() / 1.1f64.ln()).floor() as u64,
        Some(_) => u64::MAX,
        None => 0,
    };
    candidates
        .iter()
        .min_by_key(|c| (c.streams, class(c), c.cost, !c.local))
        .expect("in_sync is never empty")
        .agent
}

/// A running copy stream, counted until dropped.
#[derive(Debug)]
pub struct StreamCount<'a> {
    head: &'a VolumeHead,
    agent: usize,
}

impl Drop for StreamCount<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.head.copy_streams.lock().unwrap().get_mut(&self.agent) {
            *n = n.saturating_sub(1);
        }
    }
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
            async move {
                let info = peer.ensure(&volume, geometry, set).await?;
                peer.fence(&volume, epoch).await?;
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
        for c in 0..head.chunks.len() as u64 {
            head.in_sync(c)?;
        }
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
                out_of_sync: out.get(&a).cloned(),
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
            PeerErrorKind::Unavailable | PeerErrorKind::Corrupt => {
                if let std::collections::btree_map::Entry::Vacant(v) =
                    self.out_of_sync.lock().unwrap().entry(agent)
                {
                    tracing::warn!(volume = %self.spec.volume, agent = %e.agent, error = %e.message, "replica out of sync");
                    v.insert(e.to_string());
                }
                Ok(())
            }
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
        self.in_sync(chunk).map(drop)
    }

    /// A write to a catching-up replica failed: its rebuild stops.
    fn stop_catch_up(&self, agent: usize, reason: String) {
        if let Some(slot) = self.catching_up.lock().unwrap().get_mut(&agent) {
            slot.get_or_insert(reason);
        }
    }

    /// Reads `len` bytes at any offset.
    pub async fn read(&self, offset: u64, len: u64) -> HeadResult<Bytes> {
        self.read_view(None, offset, len).await
    }

    /// Reads `len` bytes at any offset of snapshot `snapshot`, from the
    /// in-sync replicas (the snapshot was sealed on all of them).
    pub async fn read_snapshot(
        &self,
        snapshot: &SnapshotId,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        self.read_view(Some(snapshot), offset, len).await
    }

    /// Reads the head (`None`) or a snapshot at any offset.
    pub async fn read_view(
        &self,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        self.check_fenced()?;
        self.check_range(offset, len)?;
        let start = offset / BS * BS;
        let stop = (offset + len).div_ceil(BS) * BS;
        let all = self.read_aligned(snapshot, start, stop - start).await?;
        Ok(all.slice((offset - start) as usize..(offset - start + len) as usize))
    }

    async fn read_aligned(
        &self,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        let pieces = self.pieces(offset, len);
        if let [(chunk, off, len)] = pieces[..] {
            return self.read_piece(snapshot, chunk, off, len).await;
        }
        let parts =
            join_all(pieces.iter().map(|&(c, o, l)| self.read_piece(snapshot, c, o, l))).await;
        let mut out = Vec::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out.into())
    }

    /// Reads one piece from the local replica if in sync, else from the
    /// in-sync replicas in turn; a replica that fails is marked out of
    /// sync and the next is tried.
    async fn read_piece(
        &self,
        snapshot: Option<&SnapshotId>,
        chunk: u64,
        offset: u64,
        len: u64,
    ) -> HeadResult<Bytes> {
        loop {
            let mut live = self.in_sync(chunk)?;
            let pick = match self.local.and_then(|l| live.iter().position(|&a| a == l)) {
                Some(i) => i,
                None => self.next_read.fetch_add(1, Ordering::Relaxed) % live.len(),
            };
            let a = live.swap_remove(pick);
            match self.peers[a].read(&self.spec.volume, snapshot, offset, len).await {
                Ok(data) => return Ok(data),
                Err(e) => self.absorb(a, e)?,
            }
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
        Ok(())
    }

    fn live_agents(&self) -> Vec<usize> {
        let out = self.out_of_sync.lock().unwrap();
        self.chunks_by_agent().into_keys().filter(|a| !out.contains_key(a)).collect()
    }

    /// Takes a crash-consistent snapshot: holds new writes, drains those in
    /// flight, seals `id` at `generation` on every in-sync replica, resumes.
    /// All or nothing: if any seal fails, the snapshot is deleted where it
    /// was sealed. Returns the volume digest as of the snapshot.
    pub async fn snapshot(&self, id: &SnapshotId, generation: u64) -> HeadResult<Digest> {
        self.check_fenced()?;
        let _no_catch_up = self.catchup_gate.write().await;
        let _hold = self.gate.write().await;
        self.flush_all().await?;
        let agents = self.live_agents();
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        let seals = agents.iter().map(|&a| self.peers[a].seal(volume, epoch, id, generation));
        let results = join_all(seals).await;
        let mut sealed = Vec::new();
        let mut failures = Vec::new();
        for (&a, res) in agents.iter().zip(results) {
            match res {
                Ok(()) => sealed.push(a),
                Err(e) => failures.push((a, e)),
            }
        }
        if failures.is_empty() {
            drop(_hold);
            return self.digest(Some(id)).await;
        }
        let undo = sealed.iter().map(|&a| self.peers[a].delete_snapshot(volume, id));
        for (&a, res) in sealed.iter().zip(join_all(undo).await) {
            if let Err(e) = res {
                tracing::error!(%volume, snapshot = %id, agent = %e.agent, error = %e.message, "could not remove a partial snapshot");
                self.absorb(a, e).ok();
            }
        }
        let text = failures.iter().map(|(_, e)| e.to_string()).collect::<Vec<_>>().join("; ");
        for (a, e) in failures {
            self.absorb(a, e)?;
        }
        Err(HeadError::Snapshot { volume: volume.clone(), snapshot: id.clone(), failures: text })
    }

    /// The volume digest (of the head or of a snapshot), assembled from the
    /// per-chunk accumulators of one in-sync replica of each chunk.
    pub async fn digest(&self, snapshot: Option<&SnapshotId>) -> HeadResult<Digest> {
        let mut ask: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for c in 0..self.chunks.len() as u64 {
            let live = self.in_sync(c)?;
            let a = self.local.filter(|l| live.contains(l)).unwrap_or(live[0]);
            ask.entry(a).or_default().push(c);
        }
        let calls = ask
            .iter()
            .map(|(&a, chunks)| self.peers[a].chunk_digests(&self.spec.volume, snapshot, chunks));
        let mut total = Accumulator::default();
        for (&a, res) in ask.keys().zip(join_all(calls).await) {
            match res {
                Ok(accs) => accs.iter().for_each(|(_, acc)| total.merge(acc)),
                Err(e) => {
                    self.absorb(a, e.clone())?;
                    return Err(HeadError::Refused { volume: self.spec.volume.clone(), source: e });
                }
            }
        }
        Ok(total.digest(self.spec.geometry.size()))
    }

    /// The volume's snapshots, oldest first (as the in-sync replicas have
    /// them).
    pub async fn snapshots(&self) -> HeadResult<Vec<SnapshotInfo>> {
        self.check_fenced()?;
        self.source_snapshots(0).await
    }

    /// Drops every write since the newest snapshot on every in-sync
    /// replica, with I/O held: the volume is as of its newest snapshot (or
    /// empty) afterwards. A replica that fails is marked out of sync (its
    /// rebuild copies the reverted state).
    pub async fn revert(&self) -> HeadResult<()> {
        self.check_fenced()?;
        let _no_catch_up = self.catchup_gate.write().await;
        let _hold = self.gate.write().await;
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        self.on_live_agents(|a| self.peers[a].revert_head(volume, epoch)).await
    }

    /// Deletes a snapshot on every in-sync replica, with I/O and rebuilds
    /// held (a rebuild copies the layers as they are). Its layer folds into
    /// the next one there.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> HeadResult<()> {
        self.check_fenced()?;
        let _no_catch_up = self.catchup_gate.write().await;
        let _hold = self.gate.write().await;
        let volume = &self.spec.volume;
        self.on_live_agents(|a| self.peers[a].delete_snapshot(volume, id)).await
    }

    /// Marks snapshots divergent on every in-sync replica (see
    /// [`VolumeHead::roll_back`]).
    pub async fn mark_divergent(&self, ids: &[SnapshotId]) -> HeadResult<()> {
        self.check_fenced()?;
        let _no_catch_up = self.catchup_gate.write().await;
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        self.on_live_agents(|a| self.peers[a].mark_divergent(volume, epoch, ids)).await
    }

    /// Makes the head's content equal to snapshot `base` (empty for `None`)
    /// again after the layers of the `divergent` snapshots on top of it: every
    /// block those layers changed is written back with its content as of
    /// `base` (trimmed where `base` has none). The divergent layers stay
    /// intact beneath the head; every block they hold is shadowed by the
    /// head from here on, so the next layer sealed is a valid layer on top of
    /// `base`. Call on a reverted head; only local reads and writes, nothing
    /// crosses sites. Returns the blocks written back.
    pub async fn roll_back(
        &self,
        base: Option<&SnapshotId>,
        divergent: &[SnapshotId],
    ) -> HeadResult<u64> {
        let mut written = 0u64;
        for chunk in 0..self.chunk_count() {
            let mut blocks = std::collections::BTreeSet::new();
            for snap in divergent {
                let (mut stream, _) = self
                    .snapshot_stream(chunk, snap, StreamKind::Layer, SourcePick::Primary)
                    .await?;
                while let Some(batch) = stream.next().await {
                    let batch = batch.map_err(|e| HeadError::Refused {
                        volume: self.spec.volume.clone(),
                        source: e,
                    })?;
                    blocks.extend(batch.iter().map(|b| b.block));
                }
            }
            written += blocks.len() as u64;
            let blocks: Vec<u64> = blocks.into_iter().collect();
            // Runs of consecutive blocks, at most 256 KiB each.
            let mut i = 0;
            while i < blocks.len() {
                let mut j = i + 1;
                while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && j - i < 64 {
                    j += 1;
                }
                let (offset, len) = (blocks[i] * BS, (j - i) as u64 * BS);
                match base {
                    None => self.trim(offset, len).await?,
                    Some(b) => {
                        let data = self.read_snapshot(b, offset, len).await?;
                        let copied: Vec<CopiedBlock> = data
                            .chunks(BS as usize)
                            .enumerate()
                            .map(|(k, d)| CopiedBlock {
                                block: blocks[i] + k as u64,
                                data: (!d.iter().all(|&x| x == 0))
                                    .then(|| data.slice(k * BS as usize..(k + 1) * BS as usize)),
                            })
                            .collect();
                        for run in layer_runs(&copied) {
                            match run {
                                Run::Data(o, d) => self.write(o, d).await?,
                                Run::Zero(o, l) => self.trim(o, l).await?,
                            }
                        }
                    }
                }
                i = j;
            }
        }
        Ok(written)
    }

    /// A stream of `snapshot`'s layer or image of `chunk`, from an in-sync
    /// replica (this agent's if possible), and the agent it comes from.
    pub async fn snapshot_stream(
        &self,
        chunk: u64,
        snapshot: &SnapshotId,
        kind: StreamKind,
        pick: SourcePick,
    ) -> HeadResult<(BlockStream, usize)> {
        self.check_fenced()?;
        loop {
            let src = self.pick_source(chunk, pick)?;
            match self.peers[src].stream(&self.spec.volume, snapshot, &[chunk], kind).await {
                Ok(s) => return Ok((s, src)),
                Err(e) => self.absorb(src, e)?,
            }
        }
    }

    /// The data and zero blocks a copy of `snapshot` (its layer or image)
    /// would send, counted on one in-sync replica per chunk.
    pub async fn count_blocks(
        &self,
        snapshot: &SnapshotId,
        kind: StreamKind,
    ) -> HeadResult<(u64, u64)> {
        let mut ask: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for c in 0..self.chunks.len() as u64 {
            ask.entry(self.source_for(c)?).or_default().push(c);
        }
        let (mut data, mut zero) = (0, 0);
        for (a, chunks) in ask {
            match self.peers[a].count_blocks(&self.spec.volume, snapshot, &chunks, kind).await {
                Ok(counts) => {
                    for (_, d, z) in counts {
                        data += d;
                        zero += z;
                    }
                }
                Err(e) => {
                    self.absorb(a, e.clone())?;
                    return Err(HeadError::Refused { volume: self.spec.volume.clone(), source: e });
                }
            }
        }
        Ok((data, zero))
    }

    /// Which in-sync replica of `chunk` a copy reads, by the link's policy.
    fn pick_source(&self, chunk: u64, pick: SourcePick) -> HeadResult<usize> {
        let live = self.in_sync(chunk)?;
        let away = live.iter().copied().find(|a| Some(*a) != self.local);
        let here = self.local.filter(|l| live.contains(l));
        Ok(match pick {
            SourcePick::Primary => here.unwrap_or(live[0]),
            SourcePick::Replica => away.unwrap_or(live[0]),
            SourcePick::Auto => {
                let busy = self.copy_streams.lock().unwrap();
                let rates = self.source_rates.lock().unwrap();
                let candidates: Vec<SourceCandidate> = live
                    .iter()
                    .map(|&a| SourceCandidate {
                        agent: a,
                        streams: busy.get(&a).copied().unwrap_or(0),
                        rate: rates.get(&a).copied(),
                        cost: self.spec.costs.get(&self.spec.agents[a].name).copied().unwrap_or(0),
                        local: Some(a) == self.local,
                    })
                    .collect();
                auto_source(&candidates)
            }
        })
    }

    /// Records a copy stream's throughput from `agent` (what
    /// [`SourcePick::Auto`] prefers after load): smoothed, 1/4 per sample.
    /// Streams under 1 MiB are too short to tell.
    pub fn record_source_rate(&self, agent: usize, bytes: u64, took: Duration) {
        if bytes < 1 << 20 || took.is_zero() {
            return;
        }
        let sample = bytes as f64 / took.as_secs_f64();
        let mut rates = self.source_rates.lock().unwrap();
        let r = rates.entry(agent).or_insert(sample);
        *r = 0.75 * *r + 0.25 * sample;
    }

    /// Counts a copy stream running from `agent` until the guard drops
    /// (what [`SourcePick::Auto`] balances on).
    pub fn copy_stream_started(&self, agent: usize) -> StreamCount<'_> {
        *self.copy_streams.lock().unwrap().entry(agent).or_default() += 1;
        StreamCount { head: self, agent }
    }

    /// A source of [`VolumeHead::snapshot_stream`] failed mid-stream: it is
    /// marked out of sync (a refusal is returned as the caller's error).
    pub fn source_failed(&self, agent: usize, e: PeerError) -> HeadResult<()> {
        self.absorb(agent, e)
    }

    pub fn geometry(&self) -> Geometry {
        self.spec.geometry
    }

    /// The number of chunks of the volume.
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Rebuilds the out-of-sync replica on `agent` from the in-sync ones
    /// while I/O goes on; on success it is in sync again. On failure it
    /// stays out of sync (with the reason) and may be rebuilt again later.
    pub async fn rebuild(&self, agent: &str) -> HeadResult<RebuildReport> {
        self.check_fenced()?;
        let volume = self.spec.volume.clone();
        let failed = |reason: String| HeadError::Rebuild {
            volume: volume.clone(),
            agent: agent.to_string(),
            reason,
        };
        let x = self
            .spec
            .agents
            .iter()
            .position(|a| a.name == agent)
            .ok_or_else(|| failed("it is not one of the volume's agents".into()))?;
        let chunks: Vec<u64> = self.chunks_by_agent().remove(&x).unwrap_or_default();
        if chunks.is_empty() {
            return Err(failed("it holds no chunk of the volume".into()));
        }
        if !self.out_of_sync.lock().unwrap().contains_key(&x) {
            return Err(failed("its replica is in sync: nothing to rebuild".into()));
        }
        {
            let mut rebuilds = self.rebuilds.lock().unwrap();
            if rebuilds.contains_key(&x) {
                return Err(failed("a rebuild of it is already running".into()));
            }
            rebuilds.insert(
                x,
                RebuildProgress {
                    phase: RebuildPhase::Layers,
                    layers_done: 0,
                    layers_total: 0,
                    bytes_done: 0,
                    head_blocks_done: 0,
                    head_blocks_total: 0,
                    started: Instant::now(),
                },
            );
        }
        tracing::info!(%volume, agent, chunks = chunks.len(), "rebuild started");
        let started = Instant::now();
        let res = self.rebuild_replica(x, &chunks).await;
        self.catching_up.lock().unwrap().remove(&x);
        let progress = self.rebuilds.lock().unwrap().remove(&x);
        let elapsed = started.elapsed();
        match res {
            Ok(()) => {
                let p = progress.expect("progress is kept while rebuilding");
                let report = RebuildReport {
                    agent: agent.to_string(),
                    layers: p.layers_done,
                    bytes: p.bytes_done,
                    head_blocks: p.head_blocks_done,
                    elapsed,
                };
                let text = format!(
                    "rebuilt in {:.1} s: {} snapshot layers, {} head blocks, {} MiB copied",
                    elapsed.as_secs_f64(),
                    report.layers,
                    report.head_blocks,
                    report.bytes >> 20
                );
                tracing::info!(%volume, agent, "{text}");
                self.last_rebuild.lock().unwrap().insert(x, text);
                Ok(report)
            }
            Err(e) => {
                let reason = match &e {
                    HeadError::Rebuild { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                tracing::info!(%volume, agent, error = %reason, "rebuild failed");
                let text = format!("failed after {:.1} s: {reason}", elapsed.as_secs_f64());
                self.last_rebuild.lock().unwrap().insert(x, text);
                if let Some(why) = self.out_of_sync.lock().unwrap().get_mut(&x) {
                    *why = format!("rebuild failed: {reason}");
                }
                Err(match e {
                    HeadError::Rebuild { .. } | HeadError::Fenced { .. } => e,
                    other => failed(other.to_string()),
                })
            }
        }
    }

    fn progress(&self, x: usize, f: impl FnOnce(&mut RebuildProgress)) {
        if let Some(p) = self.rebuilds.lock().unwrap().get_mut(&x) {
            f(p);
        }
    }

    fn rebuild_error(&self, x: usize, reason: impl Into<String>) -> HeadError {
        HeadError::Rebuild {
            volume: self.spec.volume.clone(),
            agent: self.spec.agents[x].name.clone(),
            reason: reason.into(),
        }
    }

    /// An in-sync replica of `chunk` to copy from: this agent's if in sync,
    /// else the first in-sync one.
    fn source_for(&self, chunk: u64) -> HeadResult<usize> {
        let live = self.in_sync(chunk)?;
        Ok(self.local.filter(|l| live.contains(l)).unwrap_or(live[0]))
    }

    /// The volume's snapshots as the in-sync replicas have them (a snapshot
    /// is sealed on every in-sync replica or on none), oldest first.
    async fn source_snapshots(&self, chunk: u64) -> HeadResult<Vec<SnapshotInfo>> {
        loop {
            let src = self.source_for(chunk)?;
            match self.peers[src].snapshots(&self.spec.volume).await {
                // In layer order, oldest first: with divergent snapshots
                // kept from a resync, generations are not in that order.
                Ok(snaps) => return Ok(snaps),
                Err(e) => self.absorb(src, e)?,
            }
        }
    }

    async fn rebuild_replica(&self, x: usize, chunks: &[u64]) -> HeadResult<()> {
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        let target = self.peers[x].clone();
        let on_target = |e: PeerError| match e.kind {
            PeerErrorKind::Fenced => self
                .absorb(x, e)
                .err()
                .unwrap_or_else(|| self.rebuild_error(x, "fenced by a newer head".to_string())),
            _ => self.rebuild_error(x, e.to_string()),
        };
        // 1. A fresh replica, fenced at this head's epoch.
        target.delete_replica(volume).await.map_err(on_target)?;
        let set = ChunkSet::Some(chunks.iter().copied().collect());
        target.ensure(volume, self.spec.geometry, set).await.map_err(on_target)?;
        target.fence(volume, epoch).await.map_err(on_target)?;

        // 2. Sealed layers, oldest first, until no new snapshot appeared;
        // then, with I/O held for a moment, the replica starts catching up.
        let mut copied = 0u64;
        let _catching_up = loop {
            let todo: Vec<SnapshotInfo> = self
                .source_snapshots(chunks[0])
                .await?
                .into_iter()
                .filter(|s| s.generation > copied)
                .collect();
            if todo.is_empty() {
                let catch_up = self.catchup_gate.read().await;
                let hold = self.gate.write().await;
                let newer =
                    self.source_snapshots(chunks[0]).await?.iter().any(|s| s.generation > copied);
                if newer {
                    continue;
                }
                self.catching_up.lock().unwrap().insert(x, None);
                drop(hold);
                break catch_up;
            }
            self.progress(x, |p| p.layers_total = p.layers_done + todo.len() as u32);
            for snap in todo {
                self.copy_layer(x, chunks, &snap).await?;
                copied = snap.generation;
                self.progress(x, |p| p.layers_done += 1);
            }
        };

        // 3. The head layer, while writes reach the replica too.
        self.progress(x, |p| p.phase = RebuildPhase::Head);
        for &chunk in chunks {
            self.copy_head_chunk(x, chunk).await?;
        }

        // 4. Durable, then compared with I/O held: equal per-chunk digests
        // put it back in sync.
        self.progress(x, |p| p.phase = RebuildPhase::Verify);
        target.flush(volume, epoch).await.map_err(on_target)?;
        let _hold = self.gate.write().await;
        target.flush(volume, epoch).await.map_err(on_target)?;
        self.check_catching_up(x)?;
        self.compare_digests(x, chunks, None).await?;
        self.catching_up.lock().unwrap().remove(&x);
        self.out_of_sync.lock().unwrap().remove(&x);
        Ok(())
    }

    fn check_catching_up(&self, x: usize) -> HeadResult<()> {
        match self.catching_up.lock().unwrap().get(&x) {
            Some(None) => Ok(()),
            Some(Some(reason)) => {
                Err(self
                    .rebuild_error(x, format!("a write to it failed while catching up: {reason}")))
            }
            None => Err(self.rebuild_error(x, "it stopped catching up")),
        }
    }

    /// Copies snapshot `snap`'s layer of every chunk of `x` from in-sync
    /// replicas, seals it on `x` under the same id and generation, and
    /// checks its per-chunk digests as of the snapshot against theirs.
    async fn copy_layer(&self, x: usize, chunks: &[u64], snap: &SnapshotInfo) -> HeadResult<()> {
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        for &chunk in chunks {
            loop {
                let src = self.source_for(chunk)?;
                match self.copy_layer_chunk(x, src, chunk, &snap.id).await {
                    Ok(()) => break,
                    Err(CopyError::Source(e)) => self.absorb(src, e)?,
                    Err(CopyError::Target(e)) => return Err(e),
                }
            }
        }
        self.peers[x]
            .seal(volume, epoch, &snap.id, snap.generation)
            .await
            .map_err(|e| self.rebuild_error(x, format!("sealing snapshot {}: {e}", snap.id)))?;
        if snap.divergent {
            // Before the next layer is sealed: its generation may be lower.
            self.peers[x]
                .mark_divergent(volume, epoch, std::slice::from_ref(&snap.id))
                .await
                .map_err(|e| {
                    self.rebuild_error(x, format!("marking {} divergent: {e}", snap.id))
                })?;
        }
        self.compare_digests(x, chunks, Some(&snap.id)).await
    }

    async fn copy_layer_chunk(
        &self,
        x: usize,
        src: usize,
        chunk: u64,
        snap: &SnapshotId,
    ) -> Result<(), CopyError> {
        let mut stream = self.peers[src]
            .stream(&self.spec.volume, snap, &[chunk], StreamKind::Layer)
            .await
            .map_err(CopyError::Source)?;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(CopyError::Source)?;
            let writes = layer_runs(&batch).into_iter().map(|run| self.put_run(x, run));
            for res in join_all(writes).await {
                res.map_err(CopyError::Target)?;
            }
        }
        Ok(())
    }

    /// Writes (or, for zero blocks, trims) one run of blocks on `x`.
    async fn put_run(&self, x: usize, run: Run) -> HeadResult<()> {
        let (volume, epoch) = (&self.spec.volume, self.spec.epoch);
        let peer = &self.peers[x];
        let res = match run {
            Run::Data(offset, data) => {
                let n = data.len() as u64;
                let res = peer.write(volume, epoch, offset, data).await;
                self.progress(x, |p| p.bytes_done += n);
                res
            }
            Run::Zero(offset, len) => peer.trim(volume, epoch, offset, len).await,
        };
        res.map_err(|e| self.rebuild_error(x, e.to_string()))
    }

    /// Copies the head layer's blocks of `chunk` to the catching-up `x`,
    /// in runs of at most [`HEAD_COPY_BATCH`] bytes, each read from the
    /// in-sync replicas and written to `x` holding its byte range
    /// exclusively (writes to it wait; writes elsewhere do not).
    async fn copy_head_chunk(&self, x: usize, chunk: u64) -> HeadResult<()> {
        let volume = &self.spec.volume;
        let mut start = self.spec.geometry.chunk_blocks(chunk).start;
        loop {
            let src = self.source_for(chunk)?;
            let (blocks, next) = match self.peers[src].head_blocks(volume, &[chunk], start).await {
                Ok(page) => page,
                Err(e) => {
                    self.absorb(src, e)?;
                    continue;
                }
            };
            self.progress(x, |p| p.head_blocks_total += blocks.len() as u64);
            for batch in block_batches(&blocks, HEAD_COPY_BATCH / BS) {
                self.check_catching_up(x)?;
                for (first, count) in batch {
                    let (start, end) = (first * BS, (first + count) * BS);
                    let _copying = self.ranges.exclusive(start, end).await;
                    let data = self.read_aligned(None, start, end - start).await?;
                    self.put_run(x, Run::Data(start, data)).await?;
                    self.progress(x, |p| p.head_blocks_done += count);
                }
            }
            match next {
                Some(n) => start = n,
                None => return Ok(()),
            }
        }
    }

    /// Compares `x`'s per-chunk digests (of the head, or as of a snapshot)
    /// with those of in-sync replicas.
    async fn compare_digests(
        &self,
        x: usize,
        chunks: &[u64],
        snapshot: Option<&SnapshotId>,
    ) -> HeadResult<()> {
        let volume = &self.spec.volume;
        let mine = self.peers[x]
            .chunk_digests(volume, snapshot, chunks)
            .await
            .map_err(|e| self.rebuild_error(x, format!("reading its digests: {e}")))?;
        let mut by_source: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for &c in chunks {
            by_source.entry(self.source_for(c)?).or_default().push(c);
        }
        let mut theirs = BTreeMap::new();
        for (src, cs) in by_source {
            match self.peers[src].chunk_digests(volume, snapshot, &cs).await {
                Ok(accs) => theirs.extend(accs),
                Err(e) => {
                    self.absorb(src, e.clone())?;
                    return Err(self.rebuild_error(x, format!("reading a source's digests: {e}")));
                }
            }
        }
        for (c, acc) in mine {
            if theirs.get(&c) != Some(&acc) {
                let what = snapshot.map_or("the head".to_string(), |s| format!("snapshot {s}"));
                return Err(self.rebuild_error(
                    x,
                    format!("chunk {c} of {what} differs from the in-sync replicas after the copy"),
                ));
            }
        }
        Ok(())
    }

    /// Rebuilds out-of-sync replicas as long as the head is open: every
    /// `every`, each out-of-sync agent not being rebuilt is tried, one at a
    /// time; one that fails (still down, say) waits twice as long before the
    /// next try, up to a minute.
    pub async fn heal(self: Arc<Self>, every: Duration) {
        let mut wait: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
        loop {
            tokio::time::sleep(every).await;
            if self.is_fenced() {
                return;
            }
            for agent in self.needs_rebuild() {
                if wait.get(&agent).is_some_and(|(at, _)| Instant::now() < *at) {
                    continue;
                }
                match self.rebuild(&agent).await {
                    Ok(_) => drop(wait.remove(&agent)),
                    Err(e) => {
                        let backoff = wait.get(&agent).map_or(every, |(_, d)| *d * 2);
                        let backoff = backoff.min(Duration::from_secs(60));
                        if !wait.contains_key(&agent) {
                            tracing::warn!(volume = %self.spec.volume, %agent, error = %e, "rebuild failed; retrying with backoff up to 60 s");
                        }
                        wait.insert(agent, (Instant::now() + backoff, backoff));
                    }
                }
            }
        }
    }
}

/// A copy step failed on the source (try another replica) or on the
/// replica being rebuilt (the rebuild fails).
enum CopyError {
    Source(PeerError),
    Target(HeadError),
}

/// A run of consecutive blocks to put on a replica being rebuilt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Run {
    /// Data at a byte offset.
    Data(u64, Bytes),
    /// Zero (trimmed) blocks: byte offset, length.
    Zero(u64, u64),
}

/// Cuts a batch of copied blocks (ascending) into runs of consecutive
/// data blocks (at most [`LAYER_COPY_RUN`] bytes) and of zero blocks.
pub(crate) fn layer_runs(blocks: &[CopiedBlock]) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let first = blocks[i].block;
        let zero = blocks[i].data.is_none();
        let mut n = 1;
        while let Some(b) = blocks.get(i + n) {
            if b.block != first + n as u64
                || b.data.is_none() != zero
                || (!zero && (n as u64 + 1) * BS > LAYER_COPY_RUN)
            {
                break;
            }
            n += 1;
        }
        let part = &blocks[i..i + n];
        runs.push(if zero {
            Run::Zero(first * BS, n as u64 * BS)
        } else if n == 1 {
            Run::Data(first * BS, part[0].data.clone().expect("data block"))
        } else {
            let mut buf = Vec::with_capacity(n * BS as usize);
            for b in part {
                buf.extend_from_slice(b.data.as_ref().expect("data block"));
            }
            Run::Data(first * BS, buf.into())
        });
        i += n;
    }
    runs
}

/// Groups ascending block indexes into batches of runs `(first, count)`,
/// each batch covering at most `max_blocks` blocks.
fn block_batches(blocks: &[u64], max_blocks: u64) -> Vec<Vec<(u64, u64)>> {
    let mut batches: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut in_batch = max_blocks;
    for &b in blocks {
        if in_batch == max_blocks {
            batches.push(Vec::new());
            in_batch = 0;
        }
        let batch = batches.last_mut().expect("a batch is open");
        match batch.last_mut() {
            Some((first, count)) if *first + *count == b => *count += 1,
            _ => batch.push((b, 1)),
        }
        in_batch += 1;
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(
        agent: usize,
        streams: usize,
        rate: Option<f64>,
        cost: u32,
        local: bool,
    ) -> SourceCandidate {
        SourceCandidate { agent, streams, rate, cost, local }
    }

    #[test]
    fn auto_source_orders_by_load_then_throughput_then_cost_then_locality() {
        // Load first: the idle replica, however slow.
        let c = [cand(0, 1, Some(500e6), 0, true), cand(1, 0, Some(10e6), 9, false)];
        assert_eq!(auto_source(&c), 1);
        // Equal load: the faster one (beyond 10%).
        let c = [cand(0, 0, Some(50e6), 0, true), cand(1, 0, Some(100e6), 5, false)];
        assert_eq!(auto_source(&c), 1);
        // Within 10%: the same class, so the cost label decides.
        let c = [cand(0, 0, Some(95e6), 3, true), cand(1, 0, Some(100e6), 5, false)];
        assert_eq!(auto_source(&c), 0);
        // Never measured counts as the best, so it gets measured.
        let c = [cand(0, 0, Some(100e6), 0, true), cand(1, 0, None, 0, false)];
        assert_eq!(auto_source(&c), 0, "a tie on class and cost: the local one");
        let c = [
            cand(0, 0, Some(10e6), 0, true),
            cand(1, 0, None, 0, false),
            cand(2, 0, Some(100e6), 0, false),
        ];
        assert_eq!(auto_source(&c), 1);
        // All equal: this agent's own replica.
        let c = [cand(3, 0, None, 0, false), cand(4, 0, None, 0, true)];
        assert_eq!(auto_source(&c), 4);
    }

    fn data(block: u64, byte: u8) -> CopiedBlock {
        CopiedBlock { block, data: Some(Bytes::from(vec![byte; BS as usize])) }
    }

    #[test]
    fn layer_runs_join_consecutive_blocks_of_one_kind() {
        let zero = |block| CopiedBlock { block, data: None };
        let runs = layer_runs(&[data(1, 1), data(2, 2), zero(3), zero(4), data(7, 7)]);
        assert_eq!(runs.len(), 3);
        match &runs[0] {
            Run::Data(off, d) => {
                assert_eq!(*off, BS);
                assert_eq!(d.len() as u64, 2 * BS);
                assert_eq!((d[0], d[BS as usize]), (1, 2));
            }
            other => panic!("expected data, got {other:?}"),
        }
        assert_eq!(runs[1], Run::Zero(3 * BS, 2 * BS));
        assert!(matches!(&runs[2], Run::Data(off, d) if *off == 7 * BS && d.len() as u64 == BS));
    }

    #[test]
    fn layer_runs_stop_at_the_run_limit() {
        let n = LAYER_COPY_RUN / BS + 3;
        let blocks: Vec<CopiedBlock> = (0..n).map(|b| data(b, b as u8)).collect();
        let runs = layer_runs(&blocks);
        let lens: Vec<u64> = runs
            .iter()
            .map(|r| match r {
                Run::Data(_, d) => d.len() as u64,
                Run::Zero(..) => panic!("no zero blocks here"),
            })
            .collect();
        assert_eq!(lens, vec![LAYER_COPY_RUN, 3 * BS]);
    }

    #[test]
    fn block_batches_bound_blocks_and_join_runs() {
        let batches = block_batches(&[0, 1, 2, 5, 6, 9], 4);
        assert_eq!(batches, vec![vec![(0, 3), (5, 1)], vec![(6, 1), (9, 1)]]);
        assert!(block_batches(&[], 4).is_empty());
    }
}
