//! Copy source selection: which in-sync replica a copy reads each chunk
//! from ([`SourcePick`]), the copy streams running per source and their
//! measured throughput.
//!
//! Invariant: a copy reads only from an in-sync replica; a source that
//! fails mid-stream is marked out of sync like any failed replica.

use super::*;

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

impl VolumeHead {
    /// Which in-sync replica of `chunk` a copy reads, by the link's policy.
    pub(super) fn pick_source(&self, chunk: u64, pick: SourcePick) -> HeadResult<usize> {
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

    /// An in-sync replica of `chunk` to copy from: this agent's if in sync,
    /// else the first in-sync one.
    pub(super) fn source_for(&self, chunk: u64) -> HeadResult<usize> {
        let live = self.in_sync(chunk)?;
        Ok(self.local.filter(|l| live.contains(l)).unwrap_or(live[0]))
    }

    /// The volume's snapshots as the in-sync replicas have them (a snapshot
    /// is sealed on every in-sync replica or on none), oldest first.
    pub(super) async fn source_snapshots(&self, chunk: u64) -> HeadResult<Vec<SnapshotInfo>> {
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

    /// A source of [`VolumeHead::snapshot_stream`] failed mid-stream: it is
    /// marked out of sync (a refusal is returned as the caller's error).
    pub fn source_failed(&self, agent: usize, e: PeerError) -> HeadResult<()> {
        self.absorb(agent, e)
    }
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
}
