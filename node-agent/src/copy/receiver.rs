//! The receiving end of a site-to-site snapshot copy: admits a copy only
//! for a registered link whose pairing secret the sender presents, writes
//! the blocks into the target volume's open head (which fans them out to
//! the target's replicas), makes progress durable in checkpoints, and seals
//! the snapshot under the source's id only when the target's digest equals
//! the source's. The decisions are the [`Receiver`] session's; this feeds
//! it the frames and carries out the disk work. The gRPC edge is
//! `grpc::snapshot_copy`.
//!
//! Invariants: nothing is written for a sender that is refused; every
//! block's CRC32C is checked on receipt; a checkpoint names a block index
//! before which everything is flushed at the target, so a resumed copy
//! re-sends at most what came after the last checkpoint; a copy that
//! starts afresh first reverts the target's head to its newest snapshot,
//! so no block of an abandoned attempt survives into the sealed snapshot.
//!
//! Fencing: a session claims the target head's role ([`crate::role`]) at
//! its start and applies every batch, checkpoint and seal under it, so a
//! promote, demote or close of the target ends the session and no block of
//! it lands afterwards; one session per target; a stream with no frame for
//! the idle timeout ends (its checkpoint stays, so a new attempt resumes).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_api::{
    BLOCK_SIZE, Digest, IdError, SnapshotId, VolumeId, agent::v1 as pb, snapshot::SnapshotInfo,
};
use futures::{StreamExt, TryStreamExt, stream::BoxStream};

pub use crate::copy::batch::BatchError;
pub use crate::copy::session::receiver::{DEFAULT_CHECKPOINT_BYTES, DEFAULT_CHECKPOINT_EVERY};
use crate::{
    copy::session::{
        Checkpoint,
        receiver::{
            self as session, Admission, Cadence, FencedEnd, Finish, Offer, Receiver, Refusal, Start,
        },
    },
    copy::{batch::check_batch, records::LinkRecord},
    head::{HeadError, Run, VolumeHead, layer_runs},
    heads::{Heads, HeadsResult, Promoted},
    meta::{CHECKPOINTS, LINKS},
    role::{Busy, Change, CopyClaim, Fenced, Holder, Role},
    store::Store,
};

/// A stream that carries no frame (not even a ping) for this long ends.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a copy waits for another session on the same target to end
/// (one that broke may still be recording its checkpoint) before it is
/// refused.
pub const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// Runs of a batch written at once.
const APPLY_CONCURRENCY: usize = 32;

/// Why the receiving end refused or ended a copy or a link request.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("link {link:?} is not registered at this agent: register it here first (RegisterLink)")]
    UnknownLink { link: String },
    #[error("link {link}: the pairing secret does not match the one registered here")]
    Secret { link: String },
    #[error("link {link}: its record does not parse: {why}")]
    LinkRecord { link: String, why: String },
    #[error("link {link}: {source}")]
    TargetId { link: String, source: IdError },
    #[error(
        "link {link}: the head of target volume {target} is not open on this agent: open it here first (role Remote)"
    )]
    NoHead { link: String, target: VolumeId },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(
        "link {link}: target volume {target} is being written by another copy (link {other}, snapshot {snapshot}): one copy writes a target at a time; retry when it ends (a stream that stopped is ended after --copy-idle-timeout-secs)"
    )]
    Busy { link: String, target: VolumeId, other: String, snapshot: String },
    #[error(
        "link {link}: target volume {target} was {change} at this site while the copy ran: its blocks are refused from then on and nothing more of it was written; start the copy again (it is admitted only onto a Remote target)"
    )]
    Fenced { link: String, target: VolumeId, change: Change },
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("a copy carries one CopyStart, first; then batches and a CopyEnd")]
    Frames,
    /// The stream broke before `CopyEnd` (the sender died, the link was cut).
    #[error("{why}")]
    Broken { link: String, why: String },
    #[error(
        "link {link}: after the copy of {snapshot} the target's digest is {target}, the source's {source_digest}: nothing was sealed; the copy starts over at the next attempt"
    )]
    DigestMismatch { link: String, snapshot: SnapshotId, target: Digest, source_digest: Digest },
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error(transparent)]
    Store(#[from] crate::Error),
}

type Result<T, E = ReceiveError> = std::result::Result<T, E>;

fn secret_hash(secret: &[u8]) -> String {
    blake3::hash(secret).to_hex().to_string()
}

/// The receiving service of this agent.
#[derive(Debug, Clone)]
pub struct CopyService {
    store: Arc<Store>,
    heads: Heads,
    cadence: Cadence,
    /// A stream with no frame for this long ends.
    idle: Duration,
    /// Told of every snapshot sealed here, to forward it (cascade).
    links: Option<Arc<crate::copy::links::Links>>,
}

impl CopyService {
    pub fn new(store: Arc<Store>, heads: Heads) -> Self {
        CopyService {
            store,
            heads,
            cadence: Cadence::default(),
            idle: DEFAULT_IDLE_TIMEOUT,
            links: None,
        }
    }

    /// Sets how long a stream may carry no frame before its session ends.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Forwards snapshots sealed here over this agent's links that ask for
    /// it (a cascade A -> B -> C).
    pub fn with_forwarding(mut self, links: Arc<crate::copy::links::Links>) -> Self {
        self.links = Some(links);
        self
    }

    /// Sets how often progress is made durable (bytes, time).
    pub fn with_checkpoints(mut self, bytes: u64, every: Duration) -> Self {
        self.cadence = Cadence { bytes: bytes.max(BLOCK_SIZE), every };
        self
    }

    /// The heads open on this agent.
    pub(crate) fn heads(&self) -> &Heads {
        &self.heads
    }

    pub(crate) fn link(&self, id: &str) -> Result<Option<LinkRecord>> {
        let raw = self.store.get_meta(LINKS, id)?;
        raw.map(|r| {
            serde_json::from_slice(&r)
                .map_err(|e| ReceiveError::LinkRecord { link: id.to_string(), why: e.to_string() })
        })
        .transpose()
    }

    fn checkpoint(&self, link: &str) -> Result<Option<Checkpoint>> {
        let raw = self.store.get_meta(CHECKPOINTS, link)?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    fn save_checkpoint(&self, link: &str, c: Option<&Checkpoint>) -> Result<()> {
        let bytes = c.map(|c| serde_json::to_vec(c).expect("a checkpoint serializes"));
        Ok(self.store.put_meta(CHECKPOINTS, link, bytes.as_deref())?)
    }

    /// The link, if registered here and `secret` is its pairing secret.
    pub(crate) fn admit(&self, link_id: &str, secret: &[u8]) -> Result<LinkRecord> {
        let link = self
            .link(link_id)?
            .ok_or_else(|| ReceiveError::UnknownLink { link: link_id.to_string() })?;
        if secret_hash(secret) != link.secret_hash {
            return Err(ReceiveError::Secret { link: link_id.to_string() });
        }
        Ok(link)
    }

    /// Registers (or re-registers) a link this agent receives; keeps what
    /// it sealed here when the target stays the same.
    pub(crate) fn register(&self, link_id: &str, secret: &[u8], target: &VolumeId) -> Result<()> {
        let last_snapshot = self
            .link(link_id)?
            .filter(|l| l.target_volume == target.as_str())
            .and_then(|l| l.last_snapshot);
        let rec = LinkRecord {
            secret_hash: secret_hash(secret),
            target_volume: target.to_string(),
            last_snapshot,
        };
        let bytes = serde_json::to_vec(&rec).expect("a link record serializes");
        Ok(self.store.put_meta(LINKS, link_id, Some(&bytes))?)
    }

    /// Drops a receiving link and its checkpoint (an unknown link is
    /// dropped already).
    pub(crate) fn unregister(&self, link_id: &str, secret: &[u8]) -> Result<()> {
        if self.link(link_id)?.is_none() {
            return Ok(());
        }
        self.admit(link_id, secret)?;
        self.save_checkpoint(link_id, None)?;
        self.store.put_meta(LINKS, link_id, None)?;
        tracing::info!(link = %link_id, "receiving link dropped");
        Ok(())
    }

    /// The id of a link's target volume.
    pub(crate) fn target_volume(&self, link_id: &str, link: &LinkRecord) -> Result<VolumeId> {
        VolumeId::new(&link.target_volume)
            .map_err(|source| ReceiveError::TargetId { link: link_id.to_string(), source })
    }

    /// The open head of a link's target volume, and its role.
    async fn target_head(
        &self,
        link_id: &str,
        link: &LinkRecord,
    ) -> Result<(VolumeId, Arc<VolumeHead>, Role)> {
        let target = self.target_volume(link_id, link)?;
        let (head, role) = self.heads.copy_target(&target).await.ok_or_else(|| {
            ReceiveError::NoHead { link: link_id.to_string(), target: target.clone() }
        })?;
        Ok((target, head, role))
    }

    /// The snapshots of an admitted link's target volume with their
    /// volume digests, oldest first.
    pub(crate) async fn link_snapshots(
        &self,
        link_id: &str,
        link: &LinkRecord,
    ) -> Result<Vec<(SnapshotInfo, Digest)>> {
        let (_, head, _) = self.target_head(link_id, link).await?;
        let mut out = Vec::new();
        for s in head.snapshots().await? {
            let digest = head.digest(Some(&s.id)).await?;
            out.push((s, digest));
        }
        Ok(out)
    }

    /// Checks the start of a copy (of an admitted `link`) and decides
    /// where it begins: the session, or the answer that ends it at once
    /// (already there). A fresh start reverts the target's head, marks and
    /// rolls back what a resync calls for, and records its checkpoint
    /// before the session answers.
    pub(crate) async fn begin(&self, link: LinkRecord, offer: Offer) -> Result<Begun> {
        let (target, head, role) = self.target_head(&offer.link, &link).await?;
        // One session per target; the claim binds it to the role (and the
        // head instance) it is admitted under.
        let holder = Holder { link: offer.link.clone(), snapshot: offer.snapshot.to_string() };
        let claim =
            role.claim(holder, CLAIM_WAIT).await.map_err(|Busy(other)| ReceiveError::Busy {
                link: offer.link.clone(),
                target: target.clone(),
                other: other.link,
                snapshot: other.snapshot,
            })?;
        let fenced = |Fenced(change)| ReceiveError::Fenced {
            link: offer.link.clone(),
            target: target.clone(),
            change,
        };
        // Admission and a fresh start's revert, marks and roll-back happen
        // under the role: a promote waits for them or comes first.
        let applying = claim.apply().await.map_err(fenced)?;
        let remote = claim.remote();
        let snaps = head.snapshots().await?;
        let view =
            session::Target { volume: &target, remote, size: head.size(), snapshots: &snaps };
        let plan = match session::admit(&offer, view)? {
            Admission::AlreadyThere(digest) => return Ok(Begun::AlreadyThere(digest)),
            Admission::Copy(plan) => plan,
        };
        let start = session::start(&offer, &plan, self.checkpoint(&offer.link)?);
        if let Start::Fresh(checkpoint) = &start {
            // A fresh start: no block of an abandoned attempt may stay.
            head.revert().await?;
            if !plan.after.is_empty() {
                head.mark_divergent(&plan.after).await?;
                tracing::warn!(link = %offer.link, %target, divergent = ?plan.after, "resync: snapshots marked divergent");
            }
            // Every divergent layer above the base (marked now or by an
            // earlier attempt) is written back to the base's content.
            if !plan.roll_back.is_empty() {
                let n = head.roll_back(offer.base.as_ref(), &plan.roll_back).await?;
                head.flush().await?;
                tracing::warn!(link = %offer.link, %target, base = ?offer.base, blocks = n, "resync: rolled back to the shared snapshot");
            }
            self.save_checkpoint(&offer.link, Some(checkpoint))?;
        }
        drop(applying);
        // The session's clock counts from `epoch`.
        let epoch = Instant::now();
        let session = Receiver::new(&offer, &start, self.cadence, Duration::ZERO);
        tracing::info!(link = %offer.link, %target, snapshot = %offer.snapshot, from_block = session.resume().0, "copy admitted");
        Ok(Begun::Session(Box::new(Session {
            service: self.clone(),
            link: offer.link,
            target,
            head,
            claim,
            session,
            epoch,
        })))
    }

    /// Records the snapshot a link sealed here, and forwards it over this
    /// agent's links that ask for it.
    fn sealed(&self, link_id: &str, snapshot: &SnapshotId, volume: &VolumeId) -> Result<()> {
        if let Some(mut rec) = self.link(link_id)? {
            rec.last_snapshot = Some(snapshot.to_string());
            let bytes = serde_json::to_vec(&rec).expect("a link record serializes");
            self.store.put_meta(LINKS, link_id, Some(&bytes))?;
        }
        if let Some(links) = &self.links {
            links.snapshot_complete(volume);
        }
        Ok(())
    }
}

/// Failover of a copy target (`PromoteHead`, `PromoteTarget`): promotes
/// its head, which ends every copy into it first (`Heads::promote`), then
/// drops the checkpoints of every link that writes the volume here: the
/// promote reverted the head to its newest snapshot, so the blocks they
/// name are gone and a later copy must start afresh, not resume. (A
/// primary admits no copy, so none can record one in between.)
pub async fn promote(heads: &Heads, volume: &VolumeId) -> HeadsResult<Promoted> {
    let promoted = heads.promote(volume).await?;
    if let Err(e) = forget_checkpoints(heads.store(), volume) {
        // The digest check still refuses a seal after a stale resume.
        tracing::warn!(%volume, error = %e, "checkpoints of copies into a promoted volume stay");
    }
    Ok(promoted)
}

fn forget_checkpoints(store: &Store, volume: &VolumeId) -> Result<()> {
    for (link, raw) in store.list_meta(LINKS)? {
        let writes_it = serde_json::from_slice::<LinkRecord>(&raw)
            .is_ok_and(|r| r.target_volume == volume.as_str());
        if writes_it && store.get_meta(CHECKPOINTS, &link)?.is_some() {
            store.put_meta(CHECKPOINTS, &link, None)?;
            tracing::info!(%link, %volume, "checkpoint dropped: the promote reverted the target");
        }
    }
    Ok(())
}

/// How an admitted copy goes on.
pub(crate) enum Begun {
    /// The snapshot is there with the same generation and digest.
    AlreadyThere(Digest),
    Session(Box<Session>),
}

/// The frames of a copy after its `CopyStart`.
pub(crate) type Frames = BoxStream<'static, Result<pb::CopyFrame>>;
/// Where the replies of a copy go; an error ends it.
pub(crate) type Replies = tokio::sync::mpsc::Sender<Result<pb::CopyReply>>;

fn reply(r: pb::copy_reply::Reply) -> pb::CopyReply {
    pb::CopyReply { reply: Some(r) }
}

/// A receiving copy: the [`Receiver`] session and the target it writes.
pub(crate) struct Session {
    service: CopyService,
    link: String,
    target: VolumeId,
    head: Arc<VolumeHead>,
    /// Every write, checkpoint and seal is applied under it.
    claim: CopyClaim,
    session: Receiver,
    /// The session's clock starts here.
    epoch: Instant,
}

impl Session {
    /// The `CopyResume` answer: (from_block, bytes_done).
    pub(crate) fn resume(&self) -> (u64, u64) {
        self.session.resume()
    }

    pub(crate) fn link(&self) -> &str {
        &self.link
    }

    /// Applies batches until the end, checkpointing; seals on a matching
    /// digest. A broken stream leaves a checkpoint of what arrived. An
    /// error ends the replies.
    pub(crate) async fn run(self, inbound: Frames, out: Replies) {
        let link = self.link.clone();
        if let Err(e) = self.receive(inbound, &out).await {
            tracing::warn!(%link, error = %e, "copy ended without a seal");
            let _ = out.send(Err(e)).await;
        }
    }

    async fn receive(mut self, mut inbound: Frames, out: &Replies) -> Result<()> {
        let blocks = self.head.size() / BLOCK_SIZE;
        // Frames are read beside the applying, so a ping is answered at
        // once: its round trip measures the network and the queues in
        // front of this reader, not the time writes take here (when the
        // writes are the bottleneck, the small queue fills and the reader
        // stops, which the round trip then shows). The reader also times
        // the stream out: no frame (pings included) for `idle` is a break.
        let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<Result<pb::CopyFrame>>(2);
        let pongs = out.clone();
        let link = self.link.clone();
        let idle = self.service.idle;
        let reader = tokio::spawn(async move {
            loop {
                let next = match tokio::time::timeout(idle, inbound.next()).await {
                    Ok(Some(Ok(pb::CopyFrame { frame: Some(pb::copy_frame::Frame::Ping(p)) }))) => {
                        let _ = pongs.send(Ok(reply(pb::copy_reply::Reply::Pong(p)))).await;
                        continue;
                    }
                    Ok(Some(Ok(f))) => Ok(f),
                    Ok(None) => Err(ReceiveError::Broken {
                        link: link.clone(),
                        why: "the sender closed the stream before CopyEnd".into(),
                    }),
                    Ok(Some(Err(e))) => Err(e),
                    Err(_) => Err(ReceiveError::Broken {
                        link: link.clone(),
                        why: format!(
                            "no frame from the sender for {} s (--copy-idle-timeout-secs): the session ended; a new attempt resumes at its checkpoint",
                            idle.as_secs_f64()
                        ),
                    }),
                };
                let end = next.is_err();
                if frames_tx.send(next).await.is_err() || end {
                    break;
                }
            }
        });
        let _stop_reader = crate::copy::sender::AbortOnDrop(reader.abort_handle());
        loop {
            // A role change of the target ends the session at once, even
            // while it waits for frames.
            let next = tokio::select! {
                f = self.claim.fenced() => Err(f),
                next = frames.recv() => Ok(next),
            };
            let frame = match next {
                Err(Fenced(change)) => return Err(self.fenced(change).await),
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(e))) => return Err(self.broken(e).await),
                Ok(None) => {
                    let why = "the copy stream ended".to_string();
                    return Err(self
                        .broken(ReceiveError::Broken { link: self.link.clone(), why })
                        .await);
                }
            };
            match frame.frame {
                Some(pb::copy_frame::Frame::Ping(_)) => {}
                Some(pb::copy_frame::Frame::Batch(batch)) => {
                    let copied = check_batch(&batch, self.session.next_block(), blocks)?;
                    let Some(last) = copied.last().map(|b| b.block) else { continue };
                    let n: u64 =
                        copied.iter().filter_map(|b| b.data.as_ref()).map(|d| d.len() as u64).sum();
                    // Under the role: refused once the target's role changed.
                    let applying = match self.claim.apply().await {
                        Ok(a) => a,
                        Err(Fenced(change)) => return Err(self.fenced(change).await),
                    };
                    // The runs of a batch cover distinct blocks: they are
                    // written concurrently (scattered blocks of a layer are
                    // many small writes, each a round trip to the replicas).
                    let head = &self.head;
                    futures::stream::iter(layer_runs(&copied))
                        .map(|run| async move {
                            match run {
                                Run::Data(offset, data) => head.write(offset, data).await,
                                Run::Zero(offset, len) => head.trim(offset, len).await,
                            }
                        })
                        .buffer_unordered(APPLY_CONCURRENCY)
                        .try_collect::<()>()
                        .await?;
                    let due = self.session.applied(last, n, self.now());
                    drop(applying);
                    if let Some(cp) = due {
                        self.durable(cp, Some(out)).await?;
                    }
                }
                Some(pb::copy_frame::Frame::End(_)) => return self.finish(out).await,
                Some(pb::copy_frame::Frame::Start(_)) | None => return Err(ReceiveError::Frames),
            }
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The target's role changed: the session ends without writing
    /// anything more; its checkpoint goes when the change reverted the
    /// target (a promote), and stays for a resume otherwise.
    async fn fenced(&mut self, change: Change) -> ReceiveError {
        let end = self.session.fenced(change == Change::Promoted);
        tracing::warn!(link = %self.link, target = %self.target, %change, ?end, "copy fenced: the target's role changed");
        if end == FencedEnd::ClearCheckpoint
            && let Err(e) = self.service.save_checkpoint(&self.link, None)
        {
            tracing::warn!(link = %self.link, error = %e, "the checkpoint of a fenced copy stays");
        }
        ReceiveError::Fenced { link: self.link.clone(), target: self.target.clone(), change }
    }

    /// The sender died or the link broke: what arrived is made durable,
    /// so a resume re-sends only what never arrived.
    async fn broken(&mut self, e: ReceiveError) -> ReceiveError {
        if let Some(cp) = self.session.broken() {
            let through = cp.through_block;
            match self.durable(cp, None).await {
                Ok(()) => {
                    tracing::info!(link = %self.link, through_block = through, "checkpoint at the break")
                }
                Err(e) => {
                    tracing::warn!(link = %self.link, error = %e, "no checkpoint at the break")
                }
            }
        }
        e
    }

    /// Flushes the target, records the checkpoint and answers it (unless
    /// the stream is broken); under the role, so never after a change.
    async fn durable(&mut self, cp: Checkpoint, out: Option<&Replies>) -> Result<()> {
        let applying = match self.claim.apply().await {
            Ok(a) => a,
            Err(Fenced(change)) => return Err(self.fenced(change).await),
        };
        self.head.flush().await?;
        self.service.save_checkpoint(&self.link, Some(&cp))?;
        drop(applying);
        let msg = pb::copy_reply::Reply::Checkpoint(pb::CopyCheckpoint {
            through_block: cp.through_block,
            bytes_done: cp.bytes_done,
        });
        self.session.checkpointed(cp, self.now());
        if let Some(out) = out {
            let _ = out.send(Ok(reply(msg))).await;
        }
        Ok(())
    }

    async fn finish(mut self, out: &Replies) -> Result<()> {
        self.session.end();
        let applying = match self.claim.apply().await {
            Ok(a) => a,
            Err(Fenced(change)) => return Err(self.fenced(change).await),
        };
        self.head.flush().await?;
        let got = self.head.digest(None).await?;
        let (snapshot, generation) = match self.session.digest(got) {
            Finish::Seal { snapshot, generation } => (snapshot, generation),
            Finish::Refuse { snapshot, target, source } => {
                // Nothing sealed; the next attempt starts afresh.
                self.service.save_checkpoint(&self.link, None)?;
                return Err(ReceiveError::DigestMismatch {
                    link: self.link.clone(),
                    snapshot,
                    target,
                    source_digest: source,
                });
            }
        };
        let sealed = self.head.snapshot(&snapshot, generation).await?;
        self.service.save_checkpoint(&self.link, None)?;
        drop(applying);
        self.service.sealed(&self.link, &snapshot, self.head.volume())?;
        tracing::info!(link = %self.link, %snapshot, digest = %sealed, "copy sealed");
        let msg = pb::copy_reply::Reply::Done(pb::CopyDone {
            digest: Bytes::copy_from_slice(&sealed.0),
            already_present: false,
        });
        let _ = out.send(Ok(reply(msg))).await;
        Ok(())
    }
}
