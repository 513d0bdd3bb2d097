//! The head's part of the durable replica state (see `docs/design.md`,
//! "Durable replica state"): which replicas may serve when a head opens,
//! and recording the in-sync set on the replicas before an acknowledgement
//! depends on it.
//!
//! Invariants: no write, trim, flush or snapshot is acknowledged while the
//! in-sync set held in memory differs from the one recorded (durably) on
//! every member of it; a head opens only if every member of the newest
//! in-sync record it can find answers, or the caller accepts data loss; and
//! the in-sync replicas of a chunk have equal content before the head
//! serves it.

use std::collections::BTreeSet;

use super::*;

/// The in-sync set as recorded on the replicas by this head.
#[derive(Debug, Default)]
pub(super) struct Durable {
    /// The sequence number of the last record written (under this epoch).
    seq: u64,
    /// The `membership` value that record describes.
    version: u64,
}

impl VolumeHead {
    /// Decides, at open, which answering replicas may serve: the members of
    /// the newest in-sync record among them, provided every member of it
    /// answers (else `Unproven`, unless `accept_data_loss`). A replica with
    /// no record (written before records existed) or a new one (no member
    /// recorded yet) counts as the record (0, 0) naming every holder, so
    /// every holder must answer. Answering non-members, and new replicas
    /// where a newer record exists, start out of sync.
    pub(super) fn check_current_at_open(
        &self,
        infos: &BTreeMap<usize, ReplicaInfo>,
    ) -> HeadResult<()> {
        let holders: BTreeSet<usize> = self.chunks_by_agent().into_keys().collect();
        let name = |a: usize| self.spec.agents[a].name.clone();
        let newest = infos
            .iter()
            .filter_map(|(&a, i)| i.in_sync.as_ref().map(|r| (a, r)))
            .filter(|(_, r)| r.version() > (0, 0))
            .max_by_key(|(_, r)| r.version());
        let (members, record): (BTreeSet<usize>, String) = match newest {
            Some((a, r)) => (
                holders.iter().copied().filter(|&h| r.members.contains(&name(h))).collect(),
                format!("(epoch {}, seq {}) recorded on agent {}", r.epoch, r.seq, name(a)),
            ),
            None => (holders.clone(), "of a volume none of whose replicas answering has a record yet (every replica may hold acknowledged writes)".into()),
        };
        let missing: Vec<String> =
            members.iter().filter(|a| !infos.contains_key(a)).map(|&a| name(a)).collect();
        if !missing.is_empty() {
            if !self.spec.accept_data_loss {
                return Err(HeadError::Unproven {
                    volume: self.spec.volume.clone(),
                    missing: missing.join(", "),
                    record,
                });
            }
            tracing::warn!(volume = %self.spec.volume, missing = %missing.join(", "), "opening with accept_data_loss: writes only those agents hold are lost");
        }
        let mut out = self.out_of_sync.lock().unwrap();
        for (&a, info) in infos {
            let why = if !members.contains(&a) {
                format!("missed acknowledged writes: not in the in-sync set {record}")
            } else if newest.is_some()
                && info.in_sync.as_ref().is_some_and(|r| r.version() == (0, 0))
            {
                "a new replica (no in-sync record yet) where other replicas hold data".into()
            } else {
                continue;
            };
            out.entry(a).or_insert(why);
        }
        drop(out);
        // Records of this epoch (a head reopened at the same epoch) stay
        // ordered: this head's first record comes after them.
        let seq = infos
            .values()
            .filter_map(|i| i.in_sync.as_ref())
            .filter(|r| r.epoch == self.spec.epoch)
            .map(|r| r.seq)
            .max()
            .unwrap_or(0);
        self.durable.try_lock().expect("nothing else holds it while opening").seq = seq;
        Ok(())
    }

    /// Makes the in-sync replicas of each chunk agree at open: replicas that
    /// stayed in the set can still differ in writes the last head sent to
    /// some of them and never acknowledged (it died mid fan-out). Per chunk,
    /// the head content digests are compared with one replica's (this
    /// agent's when it holds the chunk, else the first in sync); one that
    /// differs starts out of sync and is rebuilt from it, unless that would
    /// leave a chunk with no in-sync replica.
    pub(super) async fn converge_at_open(&self) -> HeadResult<()> {
        let volume = &self.spec.volume;
        let live: Vec<(usize, Vec<u64>)> = {
            let out = self.out_of_sync.lock().unwrap();
            self.chunks_by_agent().into_iter().filter(|(a, _)| !out.contains_key(a)).collect()
        };
        let results =
            join_all(live.iter().map(|(a, cs)| self.peers[*a].chunk_digests(volume, None, cs)))
                .await;
        let mut accs: BTreeMap<(usize, u64), Accumulator> = BTreeMap::new();
        for ((a, _), res) in live.iter().zip(results) {
            match res {
                Ok(list) => accs.extend(list.into_iter().map(|(c, acc)| ((*a, c), acc))),
                Err(e) => self.absorb(*a, e)?,
            }
        }
        for (c, holders) in self.chunks.iter().enumerate() {
            let c = c as u64;
            let answered: Vec<usize> = {
                let out = self.out_of_sync.lock().unwrap();
                holders
                    .iter()
                    .copied()
                    .filter(|a| !out.contains_key(a) && accs.contains_key(&(*a, c)))
                    .collect()
            };
            let Some(&keep) =
                answered.iter().find(|&&a| Some(a) == self.local).or(answered.first())
            else {
                continue;
            };
            for &other in answered.iter().filter(|&&a| a != keep) {
                if accs[&(other, c)] == accs[&(keep, c)] {
                    continue;
                }
                let why = format!(
                    "its head differs from agent {}'s in chunk {c} (writes the last head never acknowledged); rebuilt from the agents in sync",
                    self.spec.agents[keep].name
                );
                if self.is_last_copy(other) {
                    tracing::warn!(volume = %volume, agent = %self.spec.agents[other].name, "{why}; kept in sync: it holds the only in-sync replica of another chunk");
                    continue;
                }
                self.mark_out_of_sync(other, why);
            }
        }
        Ok(())
    }

    /// Records the in-sync set on every in-sync replica if it changed since
    /// the last record, before the caller acknowledges anything: a replica
    /// dropped from the set is dropped durably first. A replica that fails
    /// to record it is marked out of sync and the set recorded again.
    pub(super) async fn make_durable(&self) -> HeadResult<()> {
        if self.durable_is_current() {
            return Ok(());
        }
        let mut durable = self.durable.lock().await;
        loop {
            let (version, live) = {
                let out = self.out_of_sync.lock().unwrap();
                let live: Vec<usize> =
                    self.chunks_by_agent().into_keys().filter(|a| !out.contains_key(a)).collect();
                (self.membership.load(Ordering::SeqCst), live)
            };
            if durable.version >= version {
                return Ok(());
            }
            let members: BTreeSet<String> =
                live.iter().map(|&a| self.spec.agents[a].name.clone()).collect();
            let seq = durable.seq + 1;
            let (volume, epoch, id) = (&self.spec.volume, self.spec.epoch, &self.head_id);
            let results = join_all(
                live.iter().map(|&a| self.peers[a].set_in_sync(volume, epoch, id, seq, &members)),
            )
            .await;
            durable.seq = seq;
            for (&a, res) in live.iter().zip(results) {
                if let Err(e) = res {
                    self.absorb(a, e)?;
                }
            }
            durable.version = version;
            self.recorded.store(version, Ordering::SeqCst);
            self.check_fenced()?;
            for c in 0..self.chunks.len() as u64 {
                self.in_sync(c)?;
            }
        }
    }

    /// Lock-free: true when the recorded set is the one in memory.
    fn durable_is_current(&self) -> bool {
        self.recorded.load(Ordering::SeqCst) >= self.membership.load(Ordering::SeqCst)
    }
}
