//! The sending end's decisions: which snapshot layer or image a copy
//! sends, where it starts (the receiver's `CopyResume`), which blocks of
//! what a source replica streams go next (at most once each, ascending,
//! zero blocks as the kind calls for, in batches of [`BATCH_BLOCKS`]), what
//! the receiver's replies mean, and whether the copy ended well (the
//! sealed digest equals the source's).
//!
//! States: `Opening` (waiting for the answer to `CopyStart`) -> `Sending`
//! -> `Ending` (after `CopyEnd`, waiting for `CopyDone`) -> `Done`.

use std::ops::Range;

use bytes::Bytes;
use cairn_api::{Digest, SnapshotId, snapshot::SnapshotInfo};

use crate::peer::{CopiedBlock, StreamKind};

/// Blocks per batch sent (1 MiB of data at most).
pub const BATCH_BLOCKS: usize = 256;

/// A block as it goes on the wire: `data` empty for a zero block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub index: u64,
    pub crc32c: u32,
    pub data: Bytes,
}

/// A reply of the receiver, parsed (pongs are the limiter's, not here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Resume {
        from_block: u64,
        bytes_done: u64,
    },
    Checkpoint {
        through_block: u64,
        bytes_done: u64,
    },
    /// The digest as sent (checked here), and whether it was there before.
    Done {
        digest: Bytes,
        already_present: bool,
    },
    /// Anything else, described.
    Other(String),
    /// The reply stream ended.
    Ended,
}

/// The receiver broke the protocol or the copy did not end well.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("the receiver answered the start with {0}")]
    Start(String),
    #[error("unexpected reply during the copy: {0}")]
    Unexpected(String),
    #[error("the receiver ended without CopyDone")]
    Ended,
    #[error("the receiver's digest has {0} bytes")]
    DigestLength(usize),
    /// An answer that does not parse, described.
    #[error("{0}")]
    Malformed(String),
    #[error("the receiver sealed digest {got}, the source's is {want}")]
    DigestMismatch { got: Digest, want: Digest },
}

/// Why the snapshot asked for cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsendable {
    #[error("no such snapshot at the source")]
    NoSnapshot,
    #[error(
        "an incremental copy sends the layer on top of the snapshot right before it ({prev}), not on top of {base}"
    )]
    NotTheLayerBelow { prev: String, base: SnapshotId },
}

/// The snapshot to send among the source's `snapshots` (oldest first), if
/// `base` is `None` or the snapshot right before it in the volume's line
/// (divergent snapshots are out of the line, except the one sent).
pub fn offered<'a>(
    snapshots: &'a [SnapshotInfo],
    snapshot: &SnapshotId,
    base: Option<&SnapshotId>,
) -> Result<&'a SnapshotInfo, Unsendable> {
    let line: Vec<&SnapshotInfo> =
        snapshots.iter().filter(|s| !s.divergent || &s.id == snapshot).collect();
    let pos = line.iter().position(|s| &s.id == snapshot).ok_or(Unsendable::NoSnapshot)?;
    match (base, pos.checked_sub(1).map(|p| &line[p].id)) {
        (None, _) => {}
        (Some(b), Some(prev)) if b == prev => {}
        (Some(b), prev) => {
            return Err(Unsendable::NotTheLayerBelow {
                prev: prev.map_or("none".to_string(), |p| p.to_string()),
                base: b.clone(),
            });
        }
    }
    Ok(line[pos])
}

/// How the answer to `CopyStart` goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// Send from `from_block`; `bytes_done` are durable there already.
    Send { from_block: u64, bytes_done: u64 },
    /// The target has the snapshot already.
    AlreadyPresent(Digest),
}

/// How a copy ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub digest: Digest,
    pub already_present: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Opening,
    Sending,
    Ending,
    Done,
}

/// The sending session of one copy.
#[derive(Debug, Clone)]
pub struct Sender {
    kind: StreamKind,
    blocks_per_chunk: u64,
    chunk_count: u64,
    /// The source's digest as of the snapshot.
    digest: Digest,
    phase: Phase,
    /// Where this attempt started, and what was durable then.
    from_block: u64,
    bytes_before: u64,
    /// Every block before it is sent (or was durable before this attempt).
    next_block: u64,
    /// Block data bytes durable at the target, as its checkpoints say.
    bytes_durable: u64,
    bytes_sent: u64,
    blocks_sent: u64,
}

impl Sender {
    /// A copy of a snapshot's layer (`StreamKind::Layer`) or image whose
    /// digest is `digest`, over `chunk_count` chunks.
    pub fn new(kind: StreamKind, blocks_per_chunk: u64, chunk_count: u64, digest: Digest) -> Self {
        Sender {
            kind,
            blocks_per_chunk,
            chunk_count,
            digest,
            phase: Phase::Opening,
            from_block: 0,
            bytes_before: 0,
            next_block: 0,
            bytes_durable: 0,
            bytes_sent: 0,
            blocks_sent: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The receiver's first reply.
    pub fn opened(&mut self, reply: Reply) -> Result<Open, Fault> {
        debug_assert_eq!(self.phase, Phase::Opening);
        match reply {
            Reply::Resume { from_block, bytes_done } => {
                self.phase = Phase::Sending;
                (self.from_block, self.next_block) = (from_block, from_block);
                (self.bytes_before, self.bytes_durable) = (bytes_done, bytes_done);
                Ok(Open::Send { from_block, bytes_done })
            }
            Reply::Done { digest, .. } => {
                self.phase = Phase::Done;
                Ok(Open::AlreadyPresent(Digest::try_from(&digest[..]).unwrap_or(self.digest)))
            }
            other => Err(Fault::Start(describe(&other))),
        }
    }

    /// The chunks still to stream, in order: from the one holding the
    /// resume point.
    pub fn chunks(&self) -> Range<u64> {
        (self.from_block / self.blocks_per_chunk).min(self.chunk_count)..self.chunk_count
    }

    /// Takes what a source replica streamed (ascending blocks of one
    /// chunk; after a source failed, again from the chunk's start): the
    /// blocks not sent yet, in batches to send in order. An all-zero data
    /// block goes as a zero block; a zero block of an image (which starts
    /// from nothing) is not sent.
    pub fn take(&mut self, streamed: Vec<CopiedBlock>) -> Vec<Vec<Block>> {
        debug_assert_eq!(self.phase, Phase::Sending);
        let next = self.next_block;
        let Some(last) = streamed.iter().map(|b| b.block).filter(|&b| b >= next).max() else {
            return Vec::new();
        };
        let mut blocks = Vec::with_capacity(streamed.len());
        for b in streamed.into_iter().filter(|b| b.block >= next) {
            // An all-zero block reads the same as a zero block.
            let data = b.data.filter(|d| d.iter().any(|&x| x != 0));
            let (crc32c, data) = match data {
                Some(d) => (crc32c::crc32c(&d), d),
                None if self.kind == StreamKind::Image => continue,
                None => (crate::meta::zero_block_crc(), Bytes::new()),
            };
            self.bytes_sent += data.len() as u64;
            blocks.push(Block { index: b.block, crc32c, data });
        }
        self.next_block = last + 1;
        self.blocks_sent += blocks.len() as u64;
        let mut batches = Vec::with_capacity(blocks.len().div_ceil(BATCH_BLOCKS));
        let mut rest = blocks.into_iter().peekable();
        while rest.peek().is_some() {
            batches.push(rest.by_ref().take(BATCH_BLOCKS).collect());
        }
        batches
    }

    /// Every chunk is streamed: send `CopyEnd`.
    pub fn end(&mut self) {
        debug_assert_eq!(self.phase, Phase::Sending);
        self.phase = Phase::Ending;
    }

    /// A reply while sending or ending. Returns how the copy ended, once
    /// it did.
    pub fn reply(&mut self, reply: Reply) -> Result<Option<Finished>, Fault> {
        match (self.phase, reply) {
            (Phase::Sending | Phase::Ending, Reply::Checkpoint { bytes_done, .. }) => {
                self.bytes_durable = bytes_done;
                Ok(None)
            }
            (Phase::Ending, Reply::Done { digest, already_present }) => {
                let got = Digest::try_from(&digest[..]).map_err(Fault::DigestLength)?;
                if got != self.digest {
                    return Err(Fault::DigestMismatch { got, want: self.digest });
                }
                self.phase = Phase::Done;
                self.bytes_durable = self.bytes_before + self.bytes_sent;
                Ok(Some(Finished { digest: got, already_present }))
            }
            (_, Reply::Ended) => Err(Fault::Ended),
            (_, other) => Err(Fault::Unexpected(describe(&other))),
        }
    }

    /// Where this attempt started, and the bytes durable then.
    pub fn resumed(&self) -> (u64, u64) {
        (self.from_block, self.bytes_before)
    }

    /// Block data bytes durable at the target as last heard.
    pub fn bytes_durable(&self) -> u64 {
        self.bytes_durable
    }

    /// Block data bytes and blocks sent in this attempt.
    pub fn sent(&self) -> (u64, u64) {
        (self.bytes_sent, self.blocks_sent)
    }
}

fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Other(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(block: u64, byte: u8) -> CopiedBlock {
        CopiedBlock { block, data: Some(Bytes::from(vec![byte; 4096])) }
    }

    fn zero(block: u64) -> CopiedBlock {
        CopiedBlock { block, data: None }
    }

    fn indexes(batches: &[Vec<Block>]) -> Vec<u64> {
        batches.iter().flatten().map(|b| b.index).collect()
    }

    fn sending(kind: StreamKind, from_block: u64) -> Sender {
        let mut s = Sender::new(kind, 16, 4, Digest([1; 32]));
        let open = s.opened(Reply::Resume { from_block, bytes_done: from_block * 4096 });
        assert_eq!(open, Ok(Open::Send { from_block, bytes_done: from_block * 4096 }));
        s
    }

    #[test]
    fn a_resume_starts_in_the_chunk_of_the_checkpoint_and_skips_what_is_durable() {
        let mut s = sending(StreamKind::Layer, 20);
        assert_eq!(s.chunks(), 1..4);
        let batches = s.take(vec![data(16, 1), zero(19), data(20, 2), zero(21), data(30, 3)]);
        assert_eq!(indexes(&batches), [20, 21, 30]);
        assert_eq!(batches[0][1].data, Bytes::new(), "a layer's zero block goes without data");
    }

    #[test]
    fn an_image_sends_no_zero_blocks_and_all_zero_data_goes_as_zero() {
        let mut image = sending(StreamKind::Image, 0);
        let streamed = vec![data(0, 1), zero(1), data(2, 0)];
        assert_eq!(indexes(&image.take(streamed.clone())), [0]);
        let mut layer = sending(StreamKind::Layer, 0);
        let batches = layer.take(streamed);
        assert_eq!(indexes(&batches), [0, 1, 2]);
        assert!(batches[0][2].data.is_empty());
        assert_eq!(batches[0][2].crc32c, crate::meta::zero_block_crc());
        assert_eq!(layer.sent(), (4096, 3));
    }

    #[test]
    fn a_source_that_starts_the_chunk_again_sends_nothing_twice() {
        let mut s = sending(StreamKind::Layer, 0);
        assert_eq!(indexes(&s.take(vec![data(0, 1), data(1, 1)])), [0, 1]);
        // Another replica streams the chunk from its start.
        assert_eq!(indexes(&s.take(vec![data(0, 1), data(1, 1), data(2, 1)])), [2]);
        assert_eq!(s.sent().1, 3);
    }

    #[test]
    fn batches_hold_at_most_batch_blocks() {
        let mut s = Sender::new(StreamKind::Layer, 1024, 1, Digest([1; 32]));
        s.opened(Reply::Resume { from_block: 0, bytes_done: 0 }).unwrap();
        let batches = s.take((0..600).map(|b| data(b, 1)).collect());
        let lens: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(lens, [256, 256, 88]);
    }

    #[test]
    fn a_sealed_digest_that_differs_from_the_source_fails_the_copy() {
        let mut s = sending(StreamKind::Layer, 0);
        s.end();
        let got = Bytes::from(vec![2; 32]);
        let e = s.reply(Reply::Done { digest: got, already_present: false }).unwrap_err();
        assert_eq!(e, Fault::DigestMismatch { got: Digest([2; 32]), want: Digest([1; 32]) });
        let mut s = sending(StreamKind::Layer, 0);
        s.end();
        let e = s.reply(Reply::Done { digest: Bytes::from(vec![1; 3]), already_present: false });
        assert_eq!(e, Err(Fault::DigestLength(3)));
    }

    #[test]
    fn a_done_before_the_end_or_a_resume_during_the_copy_is_a_fault() {
        let mut s = sending(StreamKind::Layer, 0);
        let done = Reply::Done { digest: Bytes::from(vec![1; 32]), already_present: false };
        assert!(matches!(s.reply(done), Err(Fault::Unexpected(_))));
        let resume = Reply::Resume { from_block: 0, bytes_done: 0 };
        assert!(matches!(s.reply(resume), Err(Fault::Unexpected(_))));
        assert_eq!(s.reply(Reply::Ended), Err(Fault::Ended));
        let mut s = Sender::new(StreamKind::Layer, 16, 4, Digest([1; 32]));
        assert!(matches!(s.opened(Reply::Ended), Err(Fault::Start(_))));
    }

    fn info(s: &str, divergent: bool) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId::new(s).unwrap(),
            generation: 1,
            digest: Digest([0; 32]),
            size: 0,
            changed_blocks: 0,
            sealed_at_unix: 0,
            divergent,
        }
    }

    #[test]
    fn an_incremental_copy_is_the_layer_on_the_snapshot_right_before_it() {
        let snaps = [info("s1", false), info("x", true), info("s2", false)];
        let id = |s: &str| SnapshotId::new(s).unwrap();
        assert_eq!(offered(&snaps, &id("s2"), Some(&id("s1"))).map(|s| &s.id), Ok(&id("s2")));
        assert!(offered(&snaps, &id("s2"), None).is_ok());
        assert_eq!(offered(&snaps, &id("s9"), None), Err(Unsendable::NoSnapshot));
        let e = offered(&snaps, &id("s1"), Some(&id("s2"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "an incremental copy sends the layer on top of the snapshot right before it (none), not on top of s2"
        );
    }
}
