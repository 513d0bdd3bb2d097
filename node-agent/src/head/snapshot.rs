//! Snapshots through a head: crash-consistent seal on every in-sync
//! replica, digests, revert, deletion, the resync roll-back to a common
//! base, and the snapshot streams a copy reads.
//!
//! Invariant: a snapshot holds new writes and drains those in flight, and
//! is sealed on every in-sync replica or on none.

use super::*;

impl VolumeHead {
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
}
