//! Rebuild of an out-of-sync replica while I/O goes on (see `docs/design.md`,
//! "Rebuild"): recreate it empty, copy and seal the sealed layers from
//! in-sync replicas, then catch up on the head layer.
//!
//! Invariant: a copy never overwrites a newer write (each head-layer run
//! holds its byte range exclusively), and the replica rejoins only when its
//! per-chunk head digests equal the sources'.

use std::collections::BTreeSet;

use super::*;

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

impl VolumeHead {
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
        // The progress entry goes only once the outcome is written, so a
        // reader never sees the rebuild gone and its outcome not yet there.
        let progress = self.rebuilds.lock().unwrap().get(&x).cloned();
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
                self.rebuilds.lock().unwrap().remove(&x);
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
                self.rebuilds.lock().unwrap().remove(&x);
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
        // 0. Never delete the last copy: every chunk of X must have another
        // in-sync replica to be rebuilt from.
        for &c in chunks {
            self.in_sync(c).map_err(|e| {
                self.rebuild_error(
                    x,
                    format!("there is no in-sync replica to copy from, so the replica is kept as it is ({e})"),
                )
            })?;
        }
        // 1. A fresh replica, fenced at this head's epoch.
        target.delete_replica(volume).await.map_err(on_target)?;
        let set = ChunkSet::Some(chunks.iter().copied().collect());
        target.ensure(volume, self.spec.geometry, set).await.map_err(on_target)?;
        target.fence(volume, epoch, &self.head_id).await.map_err(on_target)?;

        // 2. Sealed layers in layer order, by id, until no new snapshot
        // appeared; then, with I/O held for a moment (and snapshot deletion
        // held off by the catch-up gate), snapshots deleted at the sources
        // meanwhile are deleted on X too, and X starts catching up.
        let mut copied: Vec<SnapshotId> = Vec::new();
        let _catching_up = loop {
            let todo = self.layers_to_copy(x, chunks[0], &copied).await?;
            if todo.is_empty() {
                let catch_up = self.catchup_gate.read().await;
                let hold = self.gate.write().await;
                if !self.layers_to_copy(x, chunks[0], &copied).await?.is_empty() {
                    continue;
                }
                let kept: BTreeSet<SnapshotId> =
                    self.source_snapshots(chunks[0]).await?.into_iter().map(|s| s.id).collect();
                for id in copied.iter().filter(|id| !kept.contains(id)) {
                    target.delete_snapshot(volume, id).await.map_err(on_target)?;
                }
                self.catching_up.lock().unwrap().insert(x, None);
                drop(hold);
                break catch_up;
            }
            self.progress(x, |p| p.layers_total = p.layers_done + todo.len() as u32);
            for snap in todo {
                self.copy_layer(x, chunks, &snap).await?;
                copied.push(snap.id);
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
        {
            let mut out = self.out_of_sync.lock().unwrap();
            out.remove(&x);
            self.membership.fetch_add(1, Ordering::SeqCst);
        }
        // Recorded on every member, X included, before I/O goes on.
        self.make_durable().await?;
        match self.out_of_sync.lock().unwrap().get(&x) {
            None => Ok(()),
            Some(why) => Err(self.rebuild_error(x, format!("recording it in sync failed: {why}"))),
        }
    }

    /// The snapshots of the sources still to copy to `x`, in layer order:
    /// those after the ones `copied` (which must be, in order, what the
    /// sources hold up to there, less any deleted meanwhile). Identity and
    /// order decide, never generation numbers (divergent snapshots kept
    /// from a resync break generation order).
    async fn layers_to_copy(
        &self,
        x: usize,
        chunk: u64,
        copied: &[SnapshotId],
    ) -> HeadResult<Vec<SnapshotInfo>> {
        let sources = self.source_snapshots(chunk).await?;
        let done: BTreeSet<&SnapshotId> = copied.iter().collect();
        let present: Vec<&SnapshotId> =
            sources.iter().map(|s| &s.id).filter(|id| done.contains(id)).collect();
        let expected: Vec<&SnapshotId> =
            copied.iter().filter(|id| sources.iter().any(|s| &s.id == *id)).collect();
        let prefix = sources.iter().take_while(|s| done.contains(&s.id)).count();
        if present != expected || prefix != present.len() {
            return Err(self.rebuild_error(
                x,
                "the sources' snapshots changed order during the copy; the rebuild starts again",
            ));
        }
        Ok(sources.into_iter().skip(prefix).collect())
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
        match self.compare_digests(x, chunks, Some(&snap.id)).await {
            // Deleted at the sources since it was copied: there is nothing
            // to compare with, and it is deleted on X before X catches up
            // (the next snapshot's digests cover the blocks it folds into).
            Err(HeadError::Refused { .. })
                if !self.source_snapshots(chunks[0]).await?.iter().any(|s| s.id == snap.id) =>
            {
                Ok(())
            }
            other => other,
        }
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
    use crate::peer::CopiedBlock;

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
