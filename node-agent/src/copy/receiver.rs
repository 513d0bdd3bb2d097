//! The receiving end of a site-to-site snapshot copy
//! (`cairn.agent.v1.SnapshotCopy`): admits a copy only for a registered
//! link whose pairing secret the sender presents, writes the blocks into the
//! target volume's open head (which fans them out to the target's
//! replicas), makes progress durable in checkpoints, and seals the snapshot
//! under the source's id only when the target's digest equals the source's.
//!
//! Invariants: nothing is written for a sender that is refused; every
//! block's CRC32C is checked on receipt; a checkpoint names a block index
//! before which everything is flushed at the target, so a resumed copy
//! re-sends at most what came after the last checkpoint; a copy that
//! starts afresh first reverts the target's head to its newest snapshot,
//! so no block of an abandoned attempt survives into the sealed snapshot.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_api::{
    BLOCK_SIZE, Digest, SnapshotId, VolumeId,
    agent::v1::{self as pb, snapshot_copy_server::SnapshotCopy},
    convert,
};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use cairn_api::snapshot::SnapshotInfo;

use crate::{
    grpc::{status::head_status, volume_heads::HeadLookup},
    head::{Run, VolumeHead, layer_runs},
    meta::{CHECKPOINTS, LINKS},
    peer::CopiedBlock,
    store::Store,
};

/// Checkpoint after this many bytes of block data by default...
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 8 << 20;
/// ...or after this long, whichever comes first.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// The shortest pairing secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

/// A link this agent receives (the value of the `links` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LinkRecord {
    /// BLAKE3 of the pairing secret, hex.
    secret_hash: String,
    pub(crate) target_volume: String,
    /// The newest snapshot sealed here by this link: the base of its next
    /// copy, kept until a newer one arrives.
    #[serde(default)]
    pub(crate) last_snapshot: Option<String>,
}

/// The links this agent receives, by id.
pub(crate) fn receiving_links(store: &Store) -> Result<Vec<(String, LinkRecord)>, crate::Error> {
    Ok(store
        .list_meta(LINKS)?
        .into_iter()
        .filter_map(|(k, v)| serde_json::from_slice(&v).ok().map(|r| (k, r)))
        .collect())
}

/// Runs of a batch written at once.
const APPLY_CONCURRENCY: usize = 32;

/// Most bytes a compressed batch may expand to (256 blocks).
const MAX_BATCH_BYTES: usize = 256 * BLOCK_SIZE as usize;

/// Where a broken copy stands (the value of the `copy_checkpoints` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    snapshot: String,
    generation: u64,
    base: String,
    /// Every block before this index is durable at the target.
    through_block: u64,
    bytes_done: u64,
}

fn secret_hash(secret: &[u8]) -> String {
    blake3::hash(secret).to_hex().to_string()
}

fn internal(e: crate::Error) -> Status {
    crate::grpc::status::store_status(e)
}

/// The receiving service of this agent.
#[derive(Debug, Clone)]
pub struct CopyService {
    store: Arc<Store>,
    heads: HeadLookup,
    checkpoint_bytes: u64,
    checkpoint_every: Duration,
    /// Told of every snapshot sealed here, to forward it (cascade).
    links: Option<Arc<crate::copy::links::Links>>,
}

impl CopyService {
    pub fn new(store: Arc<Store>, heads: HeadLookup) -> Self {
        CopyService {
            store,
            heads,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            links: None,
        }
    }

    /// Forwards snapshots sealed here over this agent's links that ask for
    /// it (a cascade A -> B -> C).
    pub fn with_forwarding(mut self, links: Arc<crate::copy::links::Links>) -> Self {
        self.links = Some(links);
        self
    }

    /// Sets how often progress is made durable (bytes, time).
    pub fn with_checkpoints(mut self, bytes: u64, every: Duration) -> Self {
        self.checkpoint_bytes = bytes.max(BLOCK_SIZE);
        self.checkpoint_every = every;
        self
    }

    pub fn into_server(self) -> pb::snapshot_copy_server::SnapshotCopyServer<Self> {
        pb::snapshot_copy_server::SnapshotCopyServer::new(self)
            .max_decoding_message_size(crate::transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::transport::MAX_MESSAGE_BYTES)
    }

    fn link(&self, id: &str) -> Result<Option<LinkRecord>, Status> {
        let raw = self.store.get_meta(LINKS, id).map_err(internal)?;
        raw.map(|r| {
            serde_json::from_slice(&r).map_err(|e| {
                Status::data_loss(format!("link {id}: its record does not parse: {e}"))
            })
        })
        .transpose()
    }

    fn checkpoint(&self, link: &str) -> Result<Option<Checkpoint>, Status> {
        let raw = self.store.get_meta(CHECKPOINTS, link).map_err(internal)?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    fn save_checkpoint(&self, link: &str, c: Option<&Checkpoint>) -> Result<(), Status> {
        let bytes = c.map(|c| serde_json::to_vec(c).expect("a checkpoint serializes"));
        self.store.put_meta(CHECKPOINTS, link, bytes.as_deref()).map_err(internal)
    }

    /// The link, if registered here and `secret` is its pairing secret.
    fn admit(&self, link_id: &str, secret: &[u8]) -> Result<LinkRecord, Status> {
        let link = self.link(link_id)?.ok_or_else(|| {
            Status::permission_denied(format!(
                "link {link_id:?} is not registered at this agent: register it here first (RegisterLink)"
            ))
        })?;
        if secret_hash(secret) != link.secret_hash {
            return Err(Status::unauthenticated(format!(
                "link {link_id}: the pairing secret does not match the one registered here"
            )));
        }
        Ok(link)
    }

    /// The open head of a link's target volume, and whether it is Remote.
    async fn target_head(
        &self,
        link_id: &str,
        link: &LinkRecord,
    ) -> Result<(VolumeId, Arc<VolumeHead>, bool), Status> {
        let target = VolumeId::new(&link.target_volume)
            .map_err(|e| Status::data_loss(format!("link {link_id}: {e}")))?;
        let (head, remote) = self.heads.get(&target).await.ok_or_else(|| {
            Status::failed_precondition(format!(
                "link {link_id}: the head of target volume {target} is not open on this agent: open it here first (role Remote)"
            ))
        })?;
        Ok((target, head, remote))
    }

    /// Checks the start of a copy and decides where it begins. Returns the
    /// session, or the reply that ends it at once (already there).
    async fn begin(&self, start: pb::CopyStart) -> Result<Begun, Status> {
        let link = self.admit(&start.link_id, &start.pairing_secret)?;
        let snapshot = convert::snapshot_id("snapshot_id", &start.snapshot_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let base = convert::optional_snapshot_id("base_snapshot_id", &start.base_snapshot_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let digest = Digest::try_from(&start.digest[..]).map_err(|len| {
            Status::invalid_argument(format!("digest has {len} bytes, expected 32"))
        })?;
        let (target, head, remote) = self.target_head(&start.link_id, &link).await?;
        if !remote {
            return Err(Status::failed_precondition(format!(
                "link {}: target volume {target} is a primary at this site: a copy would overwrite a live volume; demote it first (DemoteHead)",
                start.link_id
            )));
        }
        if head.size() != start.size_bytes {
            return Err(Status::failed_precondition(format!(
                "link {}: the source is {} bytes but target volume {target} is {} bytes: grow the target first",
                start.link_id,
                start.size_bytes,
                head.size()
            )));
        }
        let snaps = head.snapshots().await.map_err(head_status)?;
        if let Some(s) = snaps.iter().find(|s| s.id == snapshot) {
            if s.generation != start.generation || s.digest != digest || s.divergent {
                return Err(Status::already_exists(format!(
                    "link {}: target volume {target} has a different snapshot {snapshot} (generation {}, digest {}{}); delete it there first",
                    start.link_id,
                    s.generation,
                    s.digest,
                    if s.divergent { ", divergent" } else { "" }
                )));
            }
            return Ok(Begun::AlreadyThere(s.digest));
        }
        // The volume's line of snapshots: divergent ones are out of it.
        let line: Vec<&SnapshotInfo> = snaps.iter().filter(|s| !s.divergent).collect();
        let base_at = match &base {
            None => None,
            Some(b) => Some(line.iter().position(|s| &s.id == b).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "link {}: this copy is the layer on top of snapshot {b}, which target volume {target} does not have (newest: {}): copy the snapshots before it first",
                    start.link_id,
                    line.last().map_or("none".to_string(), |n| n.id.to_string())
                ))
            })?),
        };
        // Snapshots of the target after the base: the volumes diverged.
        let after: Vec<SnapshotId> =
            line[base_at.map_or(0, |p| p + 1)..].iter().map(|s| s.id.clone()).collect();
        if !after.is_empty() && !start.resync {
            let names = after.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
            return Err(Status::failed_precondition(match &base {
                None => format!(
                    "link {}: a full copy needs a target without snapshots, but {target} has {names}: send the layer on top of its newest instead, or resync to keep them marked divergent",
                    start.link_id
                ),
                Some(b) => format!(
                    "link {}: target volume {target} has snapshots after {b} that the source lacks ({names}): the volumes diverged (a failover?); resync (SyncLink with resync) rolls the target back to {b}, keeping them marked divergent",
                    start.link_id
                ),
            }));
        }
        let want = Checkpoint {
            snapshot: snapshot.to_string(),
            generation: start.generation,
            base: base.as_ref().map(|b| b.to_string()).unwrap_or_default(),
            through_block: 0,
            bytes_done: 0,
        };
        let resume = match self.checkpoint(&start.link_id)? {
            Some(c)
                if c.snapshot == want.snapshot
                    && c.generation == want.generation
                    && c.base == want.base
                    && after.is_empty() =>
            {
                c
            }
            _ => {
                // A fresh start: no block of an abandoned attempt may stay.
                head.revert().await.map_err(head_status)?;
                if !after.is_empty() {
                    head.mark_divergent(&after).await.map_err(head_status)?;
                    tracing::warn!(link = %start.link_id, %target, divergent = ?after, "resync: snapshots marked divergent");
                }
                // Every divergent layer above the base (marked now or by an
                // earlier attempt) is written back to the base's content.
                let first = base_at.map_or(0, |p| {
                    snaps.iter().position(|s| s.id == line[p].id).expect("in the list") + 1
                });
                let divergent: Vec<SnapshotId> = snaps[first..]
                    .iter()
                    .filter(|s| s.divergent || after.contains(&s.id))
                    .map(|s| s.id.clone())
                    .collect();
                if !divergent.is_empty() {
                    let n = head.roll_back(base.as_ref(), &divergent).await.map_err(head_status)?;
                    head.flush().await.map_err(head_status)?;
                    tracing::warn!(link = %start.link_id, %target, base = ?base, blocks = n, "resync: rolled back to the shared snapshot");
                }
                self.save_checkpoint(&start.link_id, Some(&want))?;
                want
            }
        };
        tracing::info!(link = %start.link_id, %target, %snapshot, from_block = resume.through_block, "copy admitted");
        Ok(Begun::Session(Session {
            service: self.clone(),
            link: start.link_id,
            head,
            snapshot,
            digest,
            checkpoint: resume,
        }))
    }
}

enum Begun {
    AlreadyThere(Digest),
    Session(Session),
}

struct Session {
    service: CopyService,
    link: String,
    head: Arc<VolumeHead>,
    snapshot: SnapshotId,
    digest: Digest,
    checkpoint: Checkpoint,
}

type Replies = tokio::sync::mpsc::Sender<Result<pb::CopyReply, Status>>;

fn reply(r: pb::copy_reply::Reply) -> pb::CopyReply {
    pb::CopyReply { reply: Some(r) }
}

impl Session {
    /// Applies batches until the end, checkpointing; seals on a matching
    /// digest. A broken stream leaves the last checkpoint for a resume.
    async fn run(
        mut self,
        mut inbound: Streaming<pb::CopyFrame>,
        out: &Replies,
    ) -> Result<(), Status> {
        let mut cursor = self.checkpoint.through_block;
        let mut bytes = self.checkpoint.bytes_done;
        let (mut since_bytes, mut since) = (0u64, Instant::now());
        let blocks = self.head.size() / BLOCK_SIZE;
        // Frames are read beside the applying, so a ping is answered at
        // once: its round trip measures the network and the queues in
        // front of this reader, not the time writes take here (when the
        // writes are the bottleneck, the small queue fills and the reader
        // stops, which the round trip then shows).
        let (frames_tx, mut frames) =
            tokio::sync::mpsc::channel::<Result<pb::CopyFrame, Status>>(2);
        let pongs = out.clone();
        let reader = tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(pb::CopyFrame { frame: Some(pb::copy_frame::Frame::Ping(p)) })) => {
                        let _ = pongs.send(Ok(reply(pb::copy_reply::Reply::Pong(p)))).await;
                        continue;
                    }
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => Err(Status::aborted("the sender closed the stream before CopyEnd")),
                    Err(s) => Err(s),
                };
                let end = next.is_err();
                if frames_tx.send(next).await.is_err() || end {
                    break;
                }
            }
        });
        let _stop_reader = crate::copy::sender::AbortOnDrop(reader.abort_handle());
        loop {
            let broken = match frames.recv().await {
                Some(Ok(f)) => Ok(f),
                Some(Err(s)) => Err(s),
                None => Err(Status::aborted("the copy stream ended")),
            };
            let frame = match broken {
                Ok(f) => f,
                Err(s) => {
                    // The sender died or the link broke: what arrived is
                    // made durable, so a resume re-sends only what never
                    // arrived.
                    if cursor > self.checkpoint.through_block {
                        let quiet: Replies = tokio::sync::mpsc::channel(1).0;
                        match self.durable(cursor, bytes, &quiet).await {
                            Ok(()) => {
                                tracing::info!(link = %self.link, through_block = cursor, "checkpoint at the break")
                            }
                            Err(e) => {
                                tracing::warn!(link = %self.link, error = %e.message(), "no checkpoint at the break")
                            }
                        }
                    }
                    return Err(s);
                }
            };
            match frame.frame {
                Some(pb::copy_frame::Frame::Ping(_)) => {}
                Some(pb::copy_frame::Frame::Batch(batch)) => {
                    let copied = check_batch(&batch, cursor, blocks)?;
                    let Some(last) = copied.last().map(|b| b.block) else { continue };
                    let n: u64 =
                        copied.iter().filter_map(|b| b.data.as_ref()).map(|d| d.len() as u64).sum();
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
                        .await
                        .map_err(head_status)?;
                    cursor = last + 1;
                    bytes += n;
                    since_bytes += n;
                    if since_bytes >= self.service.checkpoint_bytes
                        || since.elapsed() >= self.service.checkpoint_every
                    {
                        self.durable(cursor, bytes, out).await?;
                        (since_bytes, since) = (0, Instant::now());
                    }
                }
                Some(pb::copy_frame::Frame::End(_)) => return self.finish(out).await,
                Some(pb::copy_frame::Frame::Start(_)) | None => {
                    return Err(Status::invalid_argument(
                        "a copy carries one CopyStart, first; then batches and a CopyEnd",
                    ));
                }
            }
        }
    }

    /// Flushes the target and records the checkpoint.
    async fn durable(&mut self, through: u64, bytes: u64, out: &Replies) -> Result<(), Status> {
        self.head.flush().await.map_err(head_status)?;
        self.checkpoint.through_block = through;
        self.checkpoint.bytes_done = bytes;
        self.service.save_checkpoint(&self.link, Some(&self.checkpoint))?;
        let msg = pb::copy_reply::Reply::Checkpoint(pb::CopyCheckpoint {
            through_block: through,
            bytes_done: bytes,
        });
        let _ = out.send(Ok(reply(msg))).await;
        Ok(())
    }

    async fn finish(self, out: &Replies) -> Result<(), Status> {
        self.head.flush().await.map_err(head_status)?;
        let got = self.head.digest(None).await.map_err(head_status)?;
        if got != self.digest {
            // Nothing sealed; the next attempt starts afresh.
            self.service.save_checkpoint(&self.link, None)?;
            return Err(Status::data_loss(format!(
                "link {}: after the copy of {} the target's digest is {got}, the source's {}: nothing was sealed; the copy starts over at the next attempt",
                self.link, self.snapshot, self.digest
            )));
        }
        let sealed = self
            .head
            .snapshot(&self.snapshot, self.checkpoint.generation)
            .await
            .map_err(head_status)?;
        self.service.save_checkpoint(&self.link, None)?;
        self.service.sealed(&self.link, &self.snapshot, self.head.volume())?;
        tracing::info!(link = %self.link, snapshot = %self.snapshot, digest = %sealed, "copy sealed");
        let msg = pb::copy_reply::Reply::Done(pb::CopyDone {
            digest: Bytes::copy_from_slice(&sealed.0),
            already_present: false,
        });
        let _ = out.send(Ok(reply(msg))).await;
        Ok(())
    }
}

/// Checks a batch: ascending, at or after `cursor`, inside the volume,
/// each block 4096 bytes (or empty for zero) matching its CRC32C.
fn check_batch(
    batch: &pb::CopyBatch,
    cursor: u64,
    blocks: u64,
) -> Result<Vec<CopiedBlock>, Status> {
    let mut out = Vec::with_capacity(batch.blocks.len());
    let mut next = cursor;
    let unpacked = if batch.zstd_data.is_empty() {
        None
    } else {
        let n = batch.blocks.iter().filter(|b| !b.zero).count();
        if n * BLOCK_SIZE as usize > MAX_BATCH_BYTES {
            return Err(Status::invalid_argument(format!(
                "a compressed batch carries {n} data blocks; at most {} per batch",
                MAX_BATCH_BYTES / BLOCK_SIZE as usize
            )));
        }
        let raw =
            zstd::bulk::decompress(&batch.zstd_data, n * BLOCK_SIZE as usize).map_err(|e| {
                Status::data_loss(format!("a compressed batch does not decompress: {e}"))
            })?;
        if raw.len() != n * BLOCK_SIZE as usize {
            return Err(Status::data_loss(format!(
                "a compressed batch decompressed to {} bytes, its {n} data blocks need {}",
                raw.len(),
                n * BLOCK_SIZE as usize
            )));
        }
        Some(Bytes::from(raw))
    };
    let mut at = 0usize;
    for b in &batch.blocks {
        if b.index < next || b.index >= blocks {
            return Err(Status::invalid_argument(format!(
                "block {} is out of order or outside the volume (next expected at or after {next}, volume has {blocks} blocks)",
                b.index
            )));
        }
        next = b.index + 1;
        let data = match &unpacked {
            Some(_) if b.zero => Bytes::new(),
            Some(raw) => {
                if !b.data.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "block {} carries data in a compressed batch",
                        b.index
                    )));
                }
                at += BLOCK_SIZE as usize;
                raw.slice(at - BLOCK_SIZE as usize..at)
            }
            None => b.data.clone(),
        };
        if data.is_empty() {
            out.push(CopiedBlock { block: b.index, data: None });
            continue;
        }
        if data.len() as u64 != BLOCK_SIZE {
            return Err(Status::invalid_argument(format!(
                "block {} has {} bytes, not {BLOCK_SIZE}",
                b.index,
                data.len()
            )));
        }
        let actual = crc32c::crc32c(&data);
        if actual != b.crc32c {
            return Err(Status::data_loss(format!(
                "block {} arrived with CRC32C {actual:#010x} but was sent as {:#010x}: corrupted in transit",
                b.index, b.crc32c
            )));
        }
        out.push(CopiedBlock { block: b.index, data: Some(data) });
    }
    Ok(out)
}

#[tonic::async_trait]
impl SnapshotCopy for CopyService {
    async fn register_link(
        &self,
        req: Request<pb::RegisterLinkRequest>,
    ) -> Result<Response<pb::RegisterLinkResponse>, Status> {
        let r = req.into_inner();
        if r.link_id.is_empty() || r.link_id.len() > 253 {
            return Err(Status::invalid_argument("link_id must be 1 to 253 characters"));
        }
        if r.pairing_secret.len() < MIN_SECRET_BYTES {
            return Err(Status::invalid_argument(format!(
                "the pairing secret has {} bytes; use at least {MIN_SECRET_BYTES} random bytes",
                r.pairing_secret.len()
            )));
        }
        let target = convert::volume_id("target_volume_id", &r.target_volume_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Re-registering keeps what the link has sealed here.
        let last_snapshot = self
            .link(&r.link_id)?
            .filter(|l| l.target_volume == target.as_str())
            .and_then(|l| l.last_snapshot);
        let rec = LinkRecord {
            secret_hash: secret_hash(&r.pairing_secret),
            target_volume: target.to_string(),
            last_snapshot,
        };
        let bytes = serde_json::to_vec(&rec).expect("a link record serializes");
        self.store.put_meta(LINKS, &r.link_id, Some(&bytes)).map_err(internal)?;
        Ok(Response::new(pb::RegisterLinkResponse {}))
    }

    async fn unregister_link(
        &self,
        req: Request<pb::UnregisterLinkRequest>,
    ) -> Result<Response<pb::UnregisterLinkResponse>, Status> {
        let r = req.into_inner();
        if self.link(&r.link_id)?.is_none() {
            return Ok(Response::new(pb::UnregisterLinkResponse {}));
        }
        self.admit(&r.link_id, &r.pairing_secret)?;
        self.save_checkpoint(&r.link_id, None)?;
        self.store.put_meta(LINKS, &r.link_id, None).map_err(internal)?;
        tracing::info!(link = %r.link_id, "receiving link dropped");
        Ok(Response::new(pb::UnregisterLinkResponse {}))
    }

    type CopyStream = ReceiverStream<Result<pb::CopyReply, Status>>;

    async fn copy(
        &self,
        req: Request<Streaming<pb::CopyFrame>>,
    ) -> Result<Response<Self::CopyStream>, Status> {
        let mut inbound = req.into_inner();
        let start = match inbound.message().await? {
            Some(pb::CopyFrame { frame: Some(pb::copy_frame::Frame::Start(s)) }) => s,
            _ => return Err(Status::invalid_argument("a copy opens with a CopyStart frame")),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        match self.begin(start).await? {
            Begun::AlreadyThere(d) => {
                let msg = pb::copy_reply::Reply::Done(pb::CopyDone {
                    digest: Bytes::copy_from_slice(&d.0),
                    already_present: true,
                });
                let _ = tx.send(Ok(reply(msg))).await;
            }
            Begun::Session(session) => {
                let msg = pb::copy_reply::Reply::Resume(pb::CopyResume {
                    from_block: session.checkpoint.through_block,
                    bytes_done: session.checkpoint.bytes_done,
                });
                let _ = tx.send(Ok(reply(msg))).await;
                tokio::spawn(async move {
                    let link = session.link.clone();
                    if let Err(s) = session.run(inbound, &tx).await {
                        tracing::warn!(%link, error = %s.message(), "copy ended without a seal");
                        let _ = tx.send(Err(s)).await;
                    }
                });
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn link_snapshots(
        &self,
        req: Request<pb::LinkSnapshotsRequest>,
    ) -> Result<Response<pb::LinkSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let link = self.admit(&r.link_id, &r.pairing_secret)?;
        let (_, head, _) = self.target_head(&r.link_id, &link).await?;
        let mut out = Vec::new();
        for s in head.snapshots().await.map_err(head_status)? {
            let digest = head.digest(Some(&s.id)).await.map_err(head_status)?;
            out.push(pb::LinkSnapshot {
                snapshot_id: s.id.to_string(),
                generation: s.generation,
                digest: Bytes::copy_from_slice(&digest.0),
                divergent: s.divergent,
            });
        }
        Ok(Response::new(pb::LinkSnapshotsResponse { snapshots: out }))
    }

    async fn promote_target(
        &self,
        req: Request<pb::PromoteTargetRequest>,
    ) -> Result<Response<pb::PromoteHeadResponse>, Status> {
        let r = req.into_inner();
        let link = self.admit(&r.link_id, &r.pairing_secret)?;
        let target = convert::volume_id("target_volume", &link.target_volume)
            .map_err(|e| Status::data_loss(format!("link {}: {e}", r.link_id)))?;
        self.heads.promote(&target).await.map(Response::new)
    }
}

impl CopyService {
    /// Records the snapshot a link sealed here, and forwards it over this
    /// agent's links that ask for it.
    fn sealed(
        &self,
        link_id: &str,
        snapshot: &SnapshotId,
        volume: &VolumeId,
    ) -> Result<(), Status> {
        if let Some(mut rec) = self.link(link_id)? {
            rec.last_snapshot = Some(snapshot.to_string());
            let bytes = serde_json::to_vec(&rec).expect("a link record serializes");
            self.store.put_meta(LINKS, link_id, Some(&bytes)).map_err(internal)?;
        }
        if let Some(links) = &self.links {
            links.snapshot_complete(volume);
        }
        Ok(())
    }
}
