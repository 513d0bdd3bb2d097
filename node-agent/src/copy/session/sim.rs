//! A copy between a [`Sender`] and a [`Receiver`] over a simulated stream
//! that delivers every message once, in order, until it is cut; the target
//! is a map of live (applied) and durable (flushed) blocks, and a source
//! replica may fail mid-chunk. Each test compares the sealed snapshot with
//! the source and counts what crossed twice.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use cairn_api::{Digest, SnapshotId, VolumeId, snapshot::SnapshotInfo};

use super::{
    Checkpoint,
    receiver::{self, Admission, Cadence, Finish, Offer, Receiver, Target},
    sender::{Block, Finished, Open, Reply, Sender},
};
use crate::peer::{CopiedBlock, StreamKind};

const BLOCKS_PER_CHUNK: u64 = 16;
const CHUNKS: u64 = 4;
const BLOCKS: u64 = BLOCKS_PER_CHUNK * CHUNKS;
const BS: u64 = 4096;
/// Blocks a source replica streams at once.
const STREAM_BATCH: usize = 3;

/// Block -> content (`None`: a zero block).
type Content = BTreeMap<u64, Option<Bytes>>;

fn digest(content: &Content) -> Digest {
    let mut h = blake3::Hasher::new();
    for (b, d) in content {
        if let Some(d) = d.as_ref().filter(|d| d.iter().any(|&x| x != 0)) {
            h.update(&b.to_le_bytes());
            h.update(d);
        }
    }
    Digest(*h.finalize().as_bytes())
}

/// The snapshot's layer (on an empty base): data, trimmed and all-zero
/// blocks spread over every chunk.
fn source() -> Content {
    (0..BLOCKS)
        .filter(|b| b % 5 != 3)
        .map(|b| {
            let d = match b % 7 {
                0 => None,
                1 => Some(Bytes::from(vec![0u8; BS as usize])),
                _ => Some(Bytes::from(vec![b as u8 + 1; BS as usize])),
            };
            (b, d)
        })
        .collect()
}

/// The receiving agent: its head (live and flushed), its snapshots and
/// its checkpoint record.
#[derive(Debug, Default)]
struct Site {
    live: Content,
    durable: Content,
    snapshots: Vec<SnapshotInfo>,
    sealed: Option<Content>,
    checkpoint: Option<Checkpoint>,
    /// How often each block was applied.
    applied: BTreeMap<u64, u32>,
    /// Drops writes of this block (a bug or a corruption at the target).
    lose: Option<u64>,
    /// Checkpoints recorded during batches.
    checkpoints: usize,
}

impl Site {
    fn flush(&mut self) {
        self.durable = self.live.clone();
    }
}

/// How an attempt ends.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done(Finished),
    Cut,
    Refused,
}

struct Run {
    src: Content,
    kind: StreamKind,
    cadence: Cadence,
    target: Site,
    /// How often each block was sent.
    sent: BTreeMap<u64, u32>,
    /// Messages (either way) of all attempts; the clock ticks 1 ms each.
    messages: usize,
    /// A source replica fails after streaming this many blocks of chunk 1.
    source_fails_after: Option<usize>,
}

fn offer(src: &Content, generation: u64) -> Offer {
    Offer {
        link: "a-b".into(),
        snapshot: SnapshotId::new("s1").unwrap(),
        generation,
        base: None,
        digest: digest(src),
        size: BLOCKS * BS,
        resync: false,
    }
}

impl Run {
    fn new(kind: StreamKind) -> Self {
        let src: Content = match kind {
            // An image holds only the written blocks.
            StreamKind::Image => source().into_iter().filter(|(_, d)| d.is_some()).collect(),
            StreamKind::Layer => source(),
        };
        Run {
            src,
            kind,
            cadence: Cadence { bytes: 5 * BS, every: Duration::from_millis(40) },
            target: Site::default(),
            sent: BTreeMap::new(),
            messages: 0,
            source_fails_after: None,
        }
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.messages as u64)
    }

    /// Counts a message; false if the stream is cut before it.
    fn deliver(&mut self, attempt_messages: &mut usize, cut: Option<usize>) -> bool {
        if cut.is_some_and(|c| *attempt_messages >= c) {
            return false;
        }
        *attempt_messages += 1;
        self.messages += 1;
        true
    }

    /// The stream broke at the receiver: what it leaves (the receiver
    /// checkpoints what arrived unless it crashed, losing what was not
    /// flushed).
    fn break_at(&mut self, r: &mut Receiver, crash: bool) -> Outcome {
        if crash {
            self.target.live = self.target.durable.clone();
        } else if let Some(cp) = r.broken() {
            self.target.flush();
            self.target.checkpoint = Some(cp);
        }
        Outcome::Cut
    }

    /// One attempt at the copy, cut before its message `cut` (counting
    /// both ways from the `CopyStart`, which is 0).
    fn attempt(&mut self, cut: Option<usize>, crash: bool, generation: u64) -> Outcome {
        let mut n = 0;
        let offer = offer(&self.src, generation);
        let mut s = Sender::new(self.kind, BLOCKS_PER_CHUNK, CHUNKS, offer.digest);
        if !self.deliver(&mut n, cut) {
            return Outcome::Cut;
        }
        let volume = VolumeId::new("target").unwrap();
        let view = Target {
            volume: &volume,
            remote: true,
            size: BLOCKS * BS,
            snapshots: &self.target.snapshots,
        };
        let plan = match receiver::admit(&offer, view).expect("admitted") {
            Admission::AlreadyThere(d) => {
                if !self.deliver(&mut n, cut) {
                    return Outcome::Cut;
                }
                let done =
                    Reply::Done { digest: Bytes::copy_from_slice(&d.0), already_present: true };
                return match s.opened(done).expect("a done") {
                    Open::AlreadyPresent(digest) => {
                        Outcome::Done(Finished { digest, already_present: true })
                    }
                    other => panic!("{other:?}"),
                };
            }
            Admission::Copy(plan) => plan,
        };
        let start = receiver::start(&offer, &plan, self.target.checkpoint.clone());
        if let receiver::Start::Fresh(cp) = &start {
            // Revert to the newest snapshot (none here).
            self.target.live.clear();
            self.target.durable.clear();
            self.target.checkpoint = Some(cp.clone());
        }
        let mut r = Receiver::new(&offer, &start, self.cadence, self.now());
        let (from_block, bytes_done) = r.resume();
        if !self.deliver(&mut n, cut) {
            return self.break_at(&mut r, crash);
        }
        assert!(matches!(
            s.opened(Reply::Resume { from_block, bytes_done }),
            Ok(Open::Send { .. })
        ));
        for chunk in s.chunks() {
            let streamed: Vec<CopiedBlock> = self
                .src
                .range(chunk * BLOCKS_PER_CHUNK..(chunk + 1) * BLOCKS_PER_CHUNK)
                .map(|(&block, data)| CopiedBlock { block, data: data.clone() })
                .collect();
            let mut batches = Vec::new();
            match self.source_fails_after.filter(|_| chunk == 1) {
                // The chunk goes on from another replica, from its start.
                Some(k) => {
                    for part in streamed[..k].chunks(STREAM_BATCH) {
                        batches.extend(s.take(part.to_vec()));
                    }
                    for part in streamed.chunks(STREAM_BATCH) {
                        batches.extend(s.take(part.to_vec()));
                    }
                }
                None => {
                    for part in streamed.chunks(STREAM_BATCH) {
                        batches.extend(s.take(part.to_vec()));
                    }
                }
            }
            for batch in batches {
                for b in &batch {
                    *self.sent.entry(b.index).or_default() += 1;
                }
                if !self.deliver(&mut n, cut) {
                    return self.break_at(&mut r, crash);
                }
                if let Some(cp) = self.apply(&mut r, &batch) {
                    if !self.deliver(&mut n, cut) {
                        return self.break_at(&mut r, crash);
                    }
                    let reply = Reply::Checkpoint {
                        through_block: cp.through_block,
                        bytes_done: cp.bytes_done,
                    };
                    assert_eq!(s.reply(reply), Ok(None));
                }
            }
        }
        s.end();
        if !self.deliver(&mut n, cut) {
            return self.break_at(&mut r, crash);
        }
        r.end();
        self.target.flush();
        let got = digest(&self.target.live);
        match r.digest(got) {
            Finish::Seal { snapshot, generation } => {
                self.target.sealed = Some(self.target.live.clone());
                self.target.snapshots.push(SnapshotInfo {
                    id: snapshot,
                    generation,
                    digest: got,
                    size: BLOCKS * BS,
                    changed_blocks: 0,
                    sealed_at_unix: 0,
                    divergent: false,
                });
                self.target.checkpoint = None;
            }
            Finish::Refuse { .. } => {
                self.target.checkpoint = None;
                return Outcome::Refused;
            }
        }
        if !self.deliver(&mut n, cut) {
            return Outcome::Cut;
        }
        let done = Reply::Done { digest: Bytes::copy_from_slice(&got.0), already_present: false };
        Outcome::Done(s.reply(done).expect("digests equal").expect("finished"))
    }

    /// The receiver applies a batch; returns the checkpoint it answers.
    fn apply(&mut self, r: &mut Receiver, batch: &[Block]) -> Option<Checkpoint> {
        let mut next = r.next_block();
        let mut bytes = 0;
        for b in batch {
            assert!(b.index >= next, "blocks come in order, none twice in a stream");
            next = b.index + 1;
            *self.target.applied.entry(b.index).or_default() += 1;
            bytes += b.data.len() as u64;
            if self.target.lose == Some(b.index) {
                continue;
            }
            let data = (!b.data.is_empty()).then(|| b.data.clone());
            self.target.live.insert(b.index, data);
        }
        let last = batch.last()?.index;
        let cp = r.applied(last, bytes, self.now())?;
        self.target.flush();
        self.target.checkpoint = Some(cp.clone());
        self.target.checkpoints += 1;
        r.checkpointed(cp.clone(), self.now());
        Some(cp)
    }

    /// Attempts until the copy is done, the first cut before message `cut`.
    fn copy(&mut self, cut: Option<usize>, crash: bool) -> Finished {
        let mut first = Some(cut);
        for _ in 0..10 {
            match self.attempt(first.take().flatten(), crash, 1) {
                Outcome::Done(f) => return f,
                Outcome::Cut | Outcome::Refused => {}
            }
        }
        panic!("the copy did not finish");
    }

    /// The sealed content, zero blocks as absent (what a read returns).
    fn sealed(&self) -> BTreeMap<u64, Bytes> {
        let sealed = self.target.sealed.as_ref().expect("sealed");
        sealed
            .iter()
            .filter_map(|(&b, d)| d.clone().filter(|d| d.iter().any(|&x| x != 0)).map(|d| (b, d)))
            .collect()
    }
}

/// Messages of an uncut copy.
fn uncut(kind: StreamKind) -> (Run, usize) {
    let mut run = Run::new(kind);
    let f = run.copy(None, false);
    assert!(!f.already_present);
    let n = run.messages;
    (run, n)
}

#[test]
fn the_simulated_copy_is_exact_and_checkpoints_along_the_way() {
    for kind in [StreamKind::Layer, StreamKind::Image] {
        let (run, n) = uncut(kind);
        assert!(n > 20, "{n} messages");
        assert_eq!(run.target.checkpoint, None, "cleared by the seal");
        assert!(run.target.checkpoints >= 4, "{} checkpoints", run.target.checkpoints);
        assert!(run.sent.values().all(|&c| c == 1));
        // An image sends no zero block, nor an all-zero one.
        let written = |d: &Option<Bytes>| d.as_ref().is_some_and(|d| d.iter().any(|&x| x != 0));
        let want: Vec<u64> = run
            .src
            .iter()
            .filter(|(_, d)| kind == StreamKind::Layer || written(d))
            .map(|(&b, _)| b)
            .collect();
        assert!(run.sent.keys().eq(want.iter()), "{kind:?}");
    }
}

#[test]
fn a_copy_cut_at_every_message_resumes_to_the_same_snapshot_sending_nothing_twice() {
    for kind in [StreamKind::Layer, StreamKind::Image] {
        let (reference, n) = uncut(kind);
        for cut in 0..=n {
            let mut run = Run::new(kind);
            let f = run.copy(Some(cut), false);
            assert_eq!(f.digest, digest(&run.src), "cut at {cut}");
            assert_eq!(run.sealed(), reference.sealed(), "cut at {cut}");
            assert_eq!(run.target.checkpoint, None);
            // The receiver checkpoints what arrived when the stream
            // breaks: every block is applied once; only the batch lost in
            // the cut is sent again.
            assert!(run.target.applied.values().all(|&c| c == 1), "cut at {cut}");
            let twice: Vec<u64> =
                run.sent.iter().filter(|&(_, &c)| c > 1).map(|(&b, _)| b).collect();
            assert!(twice.len() <= STREAM_BATCH, "cut at {cut}: sent twice {twice:?}");
            assert!(run.sent.values().all(|&c| c <= 2));
            // A cut after the seal ends in "already present".
            if cut == n - 1 {
                assert!(f.already_present, "cut before the CopyDone");
            }
        }
    }
}

#[test]
fn after_a_receiver_crash_at_every_message_at_most_a_checkpoint_interval_is_sent_again() {
    let (reference, n) = uncut(StreamKind::Layer);
    for cut in 0..=n {
        let mut run = Run::new(StreamKind::Layer);
        run.copy(Some(cut), true);
        assert_eq!(run.sealed(), reference.sealed(), "cut at {cut}");
        // What is re-applied came after the last checkpoint: at most the
        // cadence's bytes and the batch that crossed it.
        let again: u64 = run.target.applied.values().map(|&c| u64::from(c - 1)).sum();
        let interval = run.cadence.bytes / BS + STREAM_BATCH as u64;
        assert!(again <= interval, "cut at {cut}: {again} blocks applied again");
    }
}

#[test]
fn a_copy_cut_again_and_again_still_gets_through() {
    let (reference, _) = uncut(StreamKind::Layer);
    let mut run = Run::new(StreamKind::Layer);
    let mut attempts = 0;
    // Each attempt is cut after its start, the resume and one batch.
    while !matches!(run.attempt(Some(3), false, 1), Outcome::Done(_)) {
        attempts += 1;
        assert!(attempts < 100);
    }
    assert!(attempts > 10, "{attempts}");
    assert_eq!(run.sealed(), reference.sealed());
    assert!(run.target.applied.values().all(|&c| c == 1));
}

#[test]
fn a_source_failing_mid_chunk_sends_nothing_twice() {
    let (reference, _) = uncut(StreamKind::Layer);
    let mut run = Run::new(StreamKind::Layer);
    run.source_fails_after = Some(5);
    run.copy(None, false);
    assert_eq!(run.sealed(), reference.sealed());
    assert!(run.sent.values().all(|&c| c == 1));
}

#[test]
fn a_digest_mismatch_seals_nothing_and_the_next_attempt_starts_over() {
    let mut run = Run::new(StreamKind::Layer);
    run.target.lose = Some(10);
    assert_eq!(run.attempt(None, false, 1), Outcome::Refused);
    assert_eq!(run.target.sealed, None);
    assert!(run.target.snapshots.is_empty());
    assert_eq!(run.target.checkpoint, None, "cleared: the next attempt starts over");
    run.target.lose = None;
    let before = run.target.applied.clone();
    assert!(matches!(run.attempt(None, false, 1), Outcome::Done(_)));
    assert!(run.target.applied.iter().all(|(b, &c)| c == before[b] + 1), "all sent again");
    assert_eq!(run.sealed(), uncut(StreamKind::Layer).0.sealed());
}

#[test]
fn a_stale_checkpoint_of_another_generation_starts_the_copy_over() {
    let (reference, n) = uncut(StreamKind::Layer);
    let mut run = Run::new(StreamKind::Layer);
    // An attempt at generation 1 is cut halfway, leaving its checkpoint...
    assert_eq!(run.attempt(Some(n / 2), false, 1), Outcome::Cut);
    let stale = run.target.checkpoint.clone().expect("a checkpoint");
    assert!(stale.through_block > 0);
    // ...and the snapshot is taken again at the source (generation 2):
    // the next copy starts at block 0, from a reverted head.
    run.src.insert(BLOCKS - 1, Some(Bytes::from(vec![9u8; BS as usize])));
    run.target.applied.clear();
    assert!(matches!(run.attempt(None, false, 2), Outcome::Done(_)));
    assert_eq!(run.target.snapshots[0].generation, 2);
    assert_eq!(run.target.applied.keys().next(), Some(&0));
    assert_eq!(run.target.applied.len(), run.src.len(), "every block sent");
    assert!(reference.target.applied.len() < run.src.len());
    assert_eq!(run.sealed().get(&(BLOCKS - 1)).map(|d| d[0]), Some(9));
}
