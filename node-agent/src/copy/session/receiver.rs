//! The receiving end's decisions: whether a copy is admitted onto the
//! target (and what a resync rolls back), where it starts (a checkpoint of
//! the same snapshot, generation and base, or afresh), when progress is
//! made durable (by size or by time), what a broken stream leaves, and
//! whether the snapshot is sealed (only on equal digests).
//!
//! States: `Receiving` (batches in ascending order from [`Receiver::next_block`])
//! -> `Ending` (after `CopyEnd`, waiting for the target's digest) ->
//! `Sealed` or `Refused`; from `Receiving`, a break ends in `Broken`; from
//! `Receiving` or `Ending`, a change of the target's role (promote, demote,
//! close: `crate::role`) ends in `Fenced`.

use std::time::Duration;

use cairn_api::{Digest, SnapshotId, VolumeId, snapshot::SnapshotInfo};

use super::Checkpoint;

/// Make progress durable after this many bytes of block data...
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 8 << 20;
/// ...or after this long, whichever comes first.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// How often progress is made durable: after `bytes` of block data or
/// `every`, whichever comes first (checked as each batch is applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub bytes: u64,
    pub every: Duration,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence { bytes: DEFAULT_CHECKPOINT_BYTES, every: DEFAULT_CHECKPOINT_EVERY }
    }
}

/// What the sender offers in its `CopyStart`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub link: String,
    pub snapshot: SnapshotId,
    pub generation: u64,
    pub base: Option<SnapshotId>,
    /// The source's digest as of the snapshot.
    pub digest: Digest,
    pub size: u64,
    pub resync: bool,
}

/// The target volume as the receiver finds it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub volume: &'a VolumeId,
    /// Role Remote: only copies write it.
    pub remote: bool,
    pub size: u64,
    /// Its snapshots, oldest first (divergent ones included).
    pub snapshots: &'a [SnapshotInfo],
}

/// Why a copy is not admitted onto the target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "link {link}: target volume {target} is a primary at this site: a copy would overwrite a live volume; demote it first (DemoteHead)"
    )]
    Primary { link: String, target: VolumeId },
    #[error(
        "link {link}: the source is {source_size} bytes but target volume {target} is {target_size} bytes: grow the target first"
    )]
    Size { link: String, target: VolumeId, source_size: u64, target_size: u64 },
    #[error(
        "link {link}: target volume {target} has a different snapshot {snapshot} (generation {generation}, digest {digest}{}); delete it there first",
        if *divergent { ", divergent" } else { "" }
    )]
    Different {
        link: String,
        target: VolumeId,
        snapshot: SnapshotId,
        generation: u64,
        digest: Digest,
        divergent: bool,
    },
    #[error(
        "link {link}: this copy is the layer on top of snapshot {base}, which target volume {target} does not have (newest: {newest}): copy the snapshots before it first"
    )]
    NoBase { link: String, target: VolumeId, base: SnapshotId, newest: String },
    #[error(
        "link {link}: a full copy needs a target without snapshots, but {target} has {names}: send the layer on top of its newest instead, or resync to keep them marked divergent"
    )]
    NotEmpty { link: String, target: VolumeId, names: String },
    #[error(
        "link {link}: target volume {target} has snapshots after {base} that the source lacks ({names}): the volumes diverged (a failover?); resync (SyncLink with resync) rolls the target back to {base}, keeping them marked divergent"
    )]
    Diverged { link: String, target: VolumeId, base: SnapshotId, names: String },
}

/// An admitted offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The snapshot is there with the same generation and digest: done.
    AlreadyThere(Digest),
    Copy(Plan),
}

/// What an admitted copy does to the target before its first block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The target's snapshots of the line after the base: a resync marks
    /// them divergent (empty otherwise).
    pub after: Vec<SnapshotId>,
    /// Every divergent layer above the base (marked by this copy or an
    /// earlier attempt): a fresh start writes their blocks back to the
    /// base's content.
    pub roll_back: Vec<SnapshotId>,
}

/// Decides whether `offer` may be copied onto `target`.
pub fn admit(offer: &Offer, target: Target<'_>) -> Result<Admission, Refusal> {
    let (link, volume) = (&offer.link, target.volume);
    if !target.remote {
        return Err(Refusal::Primary { link: link.clone(), target: volume.clone() });
    }
    if target.size != offer.size {
        return Err(Refusal::Size {
            link: link.clone(),
            target: volume.clone(),
            source_size: offer.size,
            target_size: target.size,
        });
    }
    let snaps = target.snapshots;
    if let Some(s) = snaps.iter().find(|s| s.id == offer.snapshot) {
        if s.generation != offer.generation || s.digest != offer.digest || s.divergent {
            return Err(Refusal::Different {
                link: link.clone(),
                target: volume.clone(),
                snapshot: offer.snapshot.clone(),
                generation: s.generation,
                digest: s.digest,
                divergent: s.divergent,
            });
        }
        return Ok(Admission::AlreadyThere(s.digest));
    }
    // The volume's line of snapshots: divergent ones are out of it.
    let line: Vec<&SnapshotInfo> = snaps.iter().filter(|s| !s.divergent).collect();
    let base_at = match &offer.base {
        None => None,
        Some(b) => Some(line.iter().position(|s| &s.id == b).ok_or_else(|| Refusal::NoBase {
            link: link.clone(),
            target: volume.clone(),
            base: b.clone(),
            newest: line.last().map_or("none".to_string(), |n| n.id.to_string()),
        })?),
    };
    // Snapshots of the target after the base: the volumes diverged.
    let after: Vec<SnapshotId> =
        line[base_at.map_or(0, |p| p + 1)..].iter().map(|s| s.id.clone()).collect();
    if !after.is_empty() && !offer.resync {
        let names = after.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
        return Err(match &offer.base {
            None => Refusal::NotEmpty { link: link.clone(), target: volume.clone(), names },
            Some(b) => Refusal::Diverged {
                link: link.clone(),
                target: volume.clone(),
                base: b.clone(),
                names,
            },
        });
    }
    let first = base_at
        .map_or(0, |p| snaps.iter().position(|s| s.id == line[p].id).expect("in the list") + 1);
    let roll_back = snaps[first..]
        .iter()
        .filter(|s| s.divergent || after.contains(&s.id))
        .map(|s| s.id.clone())
        .collect();
    Ok(Admission::Copy(Plan { after, roll_back }))
}

/// Where an admitted copy starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// At the checkpoint of an earlier attempt at the same copy.
    Resume(Checkpoint),
    /// From block 0: revert the target's head to its newest snapshot (no
    /// block of an abandoned attempt may stay), mark [`Plan::after`]
    /// divergent, write back [`Plan::roll_back`] and flush, then record
    /// this checkpoint before answering.
    Fresh(Checkpoint),
}

impl Start {
    pub fn checkpoint(&self) -> &Checkpoint {
        match self {
            Start::Resume(c) | Start::Fresh(c) => c,
        }
    }
}

/// Decides where a copy starts: a stored checkpoint counts only for the
/// same snapshot, generation and base, and never for a resync that still
/// has snapshots to mark divergent (that must start afresh).
pub fn start(offer: &Offer, plan: &Plan, stored: Option<Checkpoint>) -> Start {
    let want = Checkpoint {
        snapshot: offer.snapshot.to_string(),
        generation: offer.generation,
        base: offer.base.as_ref().map(|b| b.to_string()).unwrap_or_default(),
        through_block: 0,
        bytes_done: 0,
    };
    match stored {
        Some(c)
            if c.snapshot == want.snapshot
                && c.generation == want.generation
                && c.base == want.base
                && plan.after.is_empty() =>
        {
            Start::Resume(c)
        }
        _ => Start::Fresh(want),
    }
}

/// Where a receiving session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Receiving,
    /// `CopyEnd` arrived: flush and compute the target's digest.
    Ending,
    Sealed,
    /// The digests differed: nothing sealed, the checkpoint cleared.
    Refused,
    /// The stream broke before `CopyEnd`.
    Broken,
    /// The target's role changed while the session ran.
    Fenced,
}

/// What a fenced session leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedEnd {
    /// The change kept the target's head (a close or reopen): the recorded
    /// checkpoint stays valid, and a new attempt resumes there.
    KeepCheckpoint,
    /// The change reverted the target's head to its newest snapshot (a
    /// promote): what the checkpoint names is gone, so it goes too.
    ClearCheckpoint,
}

/// What to do with the target's digest after `CopyEnd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Seal the snapshot under the source's id and generation, clear the
    /// checkpoint, record it as the link's newest, answer `CopyDone`.
    Seal { snapshot: SnapshotId, generation: u64 },
    /// Seal nothing, clear the checkpoint (the next attempt starts over)
    /// and end with `DATA_LOSS`.
    Refuse { snapshot: SnapshotId, target: Digest, source: Digest },
}

/// The receiving session of one copy.
#[derive(Debug, Clone)]
pub struct Receiver {
    snapshot: SnapshotId,
    digest: Digest,
    cadence: Cadence,
    /// As recorded (durable at the target).
    durable: Checkpoint,
    /// Every block before it is applied (not yet necessarily durable).
    next_block: u64,
    bytes: u64,
    /// Block data applied since the last checkpoint, and when that was.
    since_bytes: u64,
    since: Duration,
    phase: Phase,
}

impl Receiver {
    /// A session starting at `start`'s checkpoint at time `now`.
    pub fn new(offer: &Offer, start: &Start, cadence: Cadence, now: Duration) -> Self {
        let durable = start.checkpoint().clone();
        Receiver {
            snapshot: offer.snapshot.clone(),
            digest: offer.digest,
            cadence,
            next_block: durable.through_block,
            bytes: durable.bytes_done,
            durable,
            since_bytes: 0,
            since: now,
            phase: Phase::Receiving,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The `CopyResume` answer: (from_block, bytes_done).
    pub fn resume(&self) -> (u64, u64) {
        (self.durable.through_block, self.durable.bytes_done)
    }

    /// The first block the next batch may carry (blocks come in ascending
    /// order; one before it is out of order).
    pub fn next_block(&self) -> u64 {
        self.next_block
    }

    /// The checkpoint as recorded.
    pub fn durable(&self) -> &Checkpoint {
        &self.durable
    }

    /// A batch ending at block `last` with `bytes` of block data was
    /// applied at time `now`. Returns the checkpoint to make durable now
    /// (flush the target, record it, answer `CopyCheckpoint`, then call
    /// [`Receiver::checkpointed`]), if the cadence calls for one.
    pub fn applied(&mut self, last: u64, bytes: u64, now: Duration) -> Option<Checkpoint> {
        debug_assert_eq!(self.phase, Phase::Receiving);
        debug_assert!(last >= self.next_block, "checked against next_block");
        self.next_block = last + 1;
        self.bytes += bytes;
        self.since_bytes += bytes;
        let due = self.since_bytes >= self.cadence.bytes
            || now.saturating_sub(self.since) >= self.cadence.every;
        due.then(|| self.pending())
    }

    /// The checkpoint `cp` is durable (flushed and recorded) at `now`.
    pub fn checkpointed(&mut self, cp: Checkpoint, now: Duration) {
        self.since_bytes = self.bytes - cp.bytes_done;
        self.durable = cp;
        self.since = now;
    }

    /// The stream broke (the sender died, the link was cut) before
    /// `CopyEnd`. Returns the checkpoint to make durable, so that a resume
    /// re-sends only what never arrived: what did arrive, if anything did
    /// since the last checkpoint.
    pub fn broken(&mut self) -> Option<Checkpoint> {
        self.phase = Phase::Broken;
        (self.next_block > self.durable.through_block).then(|| self.pending())
    }

    /// The target's role changed (`reverted`: and its head went back to
    /// the newest snapshot). Unlike a break, nothing applied since the last
    /// checkpoint is recorded: no write of any kind follows a role change.
    pub fn fenced(&mut self, reverted: bool) -> FencedEnd {
        self.phase = Phase::Fenced;
        match reverted {
            true => FencedEnd::ClearCheckpoint,
            false => FencedEnd::KeepCheckpoint,
        }
    }

    /// `CopyEnd` arrived: flush the target and compute its digest, then
    /// call [`Receiver::digest`].
    pub fn end(&mut self) {
        debug_assert_eq!(self.phase, Phase::Receiving);
        self.phase = Phase::Ending;
    }

    /// The target's digest after the end: seal only when it equals the
    /// source's.
    pub fn digest(&mut self, target: Digest) -> Finish {
        debug_assert_eq!(self.phase, Phase::Ending);
        if target == self.digest {
            self.phase = Phase::Sealed;
            Finish::Seal { snapshot: self.snapshot.clone(), generation: self.durable.generation }
        } else {
            self.phase = Phase::Refused;
            Finish::Refuse { snapshot: self.snapshot.clone(), target, source: self.digest }
        }
    }

    fn pending(&self) -> Checkpoint {
        Checkpoint {
            through_block: self.next_block,
            bytes_done: self.bytes,
            ..self.durable.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn id(s: &str) -> SnapshotId {
        SnapshotId::new(s).unwrap()
    }

    fn offer(snapshot: &str, generation: u64, base: Option<&str>) -> Offer {
        Offer {
            link: "a-b".into(),
            snapshot: id(snapshot),
            generation,
            base: base.map(id),
            digest: Digest([7; 32]),
            size: 64 * MIB,
            resync: false,
        }
    }

    fn info(s: &str, generation: u64, divergent: bool) -> SnapshotInfo {
        SnapshotInfo {
            id: id(s),
            generation,
            digest: Digest([generation as u8; 32]),
            size: 64 * MIB,
            changed_blocks: 0,
            sealed_at_unix: 0,
            divergent,
        }
    }

    fn target<'a>(volume: &'a VolumeId, snapshots: &'a [SnapshotInfo]) -> Target<'a> {
        Target { volume, remote: true, size: 64 * MIB, snapshots }
    }

    fn checkpoint(snapshot: &str, generation: u64, base: &str, through: u64) -> Checkpoint {
        Checkpoint {
            snapshot: snapshot.into(),
            generation,
            base: base.into(),
            through_block: through,
            bytes_done: through * 4096,
        }
    }

    #[test]
    fn a_checkpoint_of_the_same_snapshot_generation_and_base_is_resumed() {
        let o = offer("s2", 2, Some("s1"));
        let stored = checkpoint("s2", 2, "s1", 300);
        assert_eq!(start(&o, &Plan::default(), Some(stored.clone())), Start::Resume(stored));
    }

    #[test]
    fn a_stale_checkpoint_from_another_snapshot_generation_or_base_is_refused() {
        let o = offer("s2", 2, Some("s1"));
        let fresh = Start::Fresh(checkpoint("s2", 2, "s1", 0));
        for stale in [
            checkpoint("s3", 2, "s1", 300),
            checkpoint("s2", 1, "s1", 300),
            checkpoint("s2", 3, "s1", 300),
            checkpoint("s2", 2, "", 300),
            checkpoint("s2", 2, "s0", 300),
        ] {
            assert_eq!(start(&o, &Plan::default(), Some(stale.clone())), fresh, "{stale:?}");
        }
        assert_eq!(start(&o, &Plan::default(), None), fresh);
    }

    #[test]
    fn a_resync_with_snapshots_still_to_mark_divergent_starts_afresh() {
        let o = Offer { resync: true, ..offer("s3", 3, Some("s1")) };
        let plan = Plan { after: vec![id("s2")], roll_back: vec![id("s2")] };
        let stored = checkpoint("s3", 3, "s1", 300);
        assert_eq!(start(&o, &plan, Some(stored)), Start::Fresh(checkpoint("s3", 3, "s1", 0)));
    }

    #[test]
    fn admission_refuses_a_primary_a_size_a_different_snapshot_a_missing_base_and_divergence() {
        let v = VolumeId::new("vol").unwrap();
        let snaps = [info("s1", 1, false), info("s2", 2, false)];
        let t = target(&v, &snaps);
        let primary = Target { remote: false, ..t };
        assert!(matches!(
            admit(&offer("s3", 3, Some("s2")), primary),
            Err(Refusal::Primary { .. })
        ));
        let small = Target { size: MIB, ..t };
        assert!(matches!(admit(&offer("s3", 3, Some("s2")), small), Err(Refusal::Size { .. })));
        let e = admit(&offer("s2", 2, Some("s1")), t).unwrap_err();
        assert!(matches!(e, Refusal::Different { .. }), "{e}");
        let e = admit(&offer("s4", 4, Some("s3")), t).unwrap_err();
        assert!(e.to_string().contains("(newest: s2)"), "{e}");
        let e = admit(&offer("s3", 3, None), t).unwrap_err();
        assert!(e.to_string().contains("a full copy needs a target without snapshots"), "{e}");
        let e = admit(&offer("s3", 3, Some("s1")), t).unwrap_err();
        assert!(e.to_string().contains("diverged"), "{e}");
        assert_eq!(admit(&offer("s3", 3, Some("s2")), t), Ok(Admission::Copy(Plan::default())));
    }

    #[test]
    fn the_same_snapshot_already_there_is_done_at_once() {
        let v = VolumeId::new("vol").unwrap();
        let snaps = [info("s1", 1, false)];
        let o = Offer { digest: Digest([1; 32]), ..offer("s1", 1, None) };
        assert_eq!(admit(&o, target(&v, &snaps)), Ok(Admission::AlreadyThere(Digest([1; 32]))));
    }

    #[test]
    fn a_resync_marks_the_line_after_the_base_and_rolls_back_every_divergent_layer() {
        let v = VolumeId::new("vol").unwrap();
        let snaps = [info("s1", 1, false), info("x1", 2, true), info("s2", 2, false)];
        let o = Offer { resync: true, ..offer("s3", 3, Some("s1")) };
        let plan = Plan { after: vec![id("s2")], roll_back: vec![id("x1"), id("s2")] };
        assert_eq!(admit(&o, target(&v, &snaps)), Ok(Admission::Copy(plan)));
    }

    fn session(cadence: Cadence) -> Receiver {
        let o = offer("s1", 1, None);
        let s = start(&o, &Plan::default(), None);
        Receiver::new(&o, &s, cadence, Duration::ZERO)
    }

    #[test]
    fn checkpoints_come_after_the_configured_bytes() {
        let mut r = session(Cadence { bytes: 8 * MIB, every: Duration::from_secs(3600) });
        let batch = MIB; // 256 blocks
        let mut at = Vec::new();
        for i in 0..20u64 {
            if let Some(cp) = r.applied(i * 256 + 255, batch, Duration::from_millis(i)) {
                at.push(cp.through_block);
                r.checkpointed(cp, Duration::from_millis(i));
            }
        }
        assert_eq!(at, [8 * 256, 16 * 256]);
        assert_eq!(r.durable().bytes_done, 16 * MIB);
    }

    #[test]
    fn checkpoints_come_after_the_configured_time_on_a_slow_copy() {
        let mut r = session(Cadence { bytes: 8 * MIB, every: Duration::from_secs(5) });
        let mut at = Vec::new();
        // One block a second.
        for i in 0..12u64 {
            let now = Duration::from_secs(i + 1);
            if let Some(cp) = r.applied(i, 4096, now) {
                at.push((now.as_secs(), cp.through_block));
                r.checkpointed(cp, now);
            }
        }
        assert_eq!(at, [(5, 5), (10, 10)]);
    }

    #[test]
    fn a_checkpoint_not_yet_durable_does_not_count() {
        let mut r = session(Cadence { bytes: 4096, every: Duration::from_secs(5) });
        let cp = r.applied(9, 4096, Duration::ZERO).expect("due");
        assert_eq!(cp.through_block, 10);
        assert_eq!(r.resume(), (0, 0), "not recorded yet");
        assert_eq!(r.broken(), Some(cp), "the break records it");
    }

    #[test]
    fn a_break_leaves_what_arrived_and_nothing_when_nothing_did() {
        let cadence = Cadence { bytes: 8 * MIB, every: Duration::from_secs(5) };
        let mut r = session(cadence);
        assert_eq!(r.broken(), None);
        let mut r = session(cadence);
        assert_eq!(r.applied(41, 4096, Duration::ZERO), None);
        let cp = r.broken().expect("what arrived is checkpointed");
        assert_eq!((cp.through_block, cp.bytes_done), (42, 4096));
        assert_eq!(r.phase(), Phase::Broken);
    }

    #[test]
    fn a_fenced_session_records_nothing_more_and_drops_its_checkpoint_only_after_a_revert() {
        let cadence = Cadence { bytes: 8 * MIB, every: Duration::from_secs(5) };
        let mut r = session(cadence);
        assert_eq!(r.applied(41, 4096, Duration::ZERO), None);
        // A promote reverted the target: its checkpoint names blocks that
        // are gone.
        assert_eq!(r.fenced(true), FencedEnd::ClearCheckpoint);
        assert_eq!(r.phase(), Phase::Fenced);
        assert_eq!(r.resume(), (0, 0), "what arrived after the last checkpoint is not recorded");
        // A head closed or reopened keeps what was flushed: resume there.
        let mut r = session(Cadence { bytes: 4096, every: Duration::from_secs(5) });
        let cp = r.applied(9, 4096, Duration::ZERO).expect("due");
        r.checkpointed(cp, Duration::ZERO);
        assert_eq!(r.applied(20, 4096, Duration::ZERO).map(|c| c.through_block), Some(21));
        assert_eq!(r.fenced(false), FencedEnd::KeepCheckpoint);
        assert_eq!(r.resume(), (10, 4096), "the recorded checkpoint, not the pending one");
    }

    #[test]
    fn a_digest_mismatch_is_never_sealed() {
        let mut r = session(Cadence::default());
        r.end();
        let finish = r.digest(Digest([8; 32]));
        assert_eq!(
            finish,
            Finish::Refuse { snapshot: id("s1"), target: Digest([8; 32]), source: Digest([7; 32]) }
        );
        assert_eq!(r.phase(), Phase::Refused);
        let mut r = session(Cadence::default());
        r.end();
        assert_eq!(r.digest(Digest([7; 32])), Finish::Seal { snapshot: id("s1"), generation: 1 });
    }
}
