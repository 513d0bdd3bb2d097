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
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    head::{Run, VolumeHead, layer_runs},
    head_service::{HeadLookup, head_status},
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
struct LinkRecord {
    /// BLAKE3 of the pairing secret, hex.
    secret_hash: String,
    target_volume: String,
}

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
    crate::service::status(e)
}

/// The receiving service of this agent.
#[derive(Debug, Clone)]
pub struct CopyService {
    store: Arc<Store>,
    heads: HeadLookup,
    checkpoint_bytes: u64,
    checkpoint_every: Duration,
}

impl CopyService {
    pub fn new(store: Arc<Store>, heads: HeadLookup) -> Self {
        CopyService {
            store,
            heads,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        }
    }

    /// Sets how often progress is made durable (bytes, time).
    pub fn with_checkpoints(mut self, bytes: u64, every: Duration) -> Self {
        self.checkpoint_bytes = bytes.max(BLOCK_SIZE);
        self.checkpoint_every = every;
        self
    }

    pub fn into_server(self) -> pb::snapshot_copy_server::SnapshotCopyServer<Self> {
        pb::snapshot_copy_server::SnapshotCopyServer::new(self)
            .max_decoding_message_size(crate::service::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::service::MAX_MESSAGE_BYTES)
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

    /// Checks the start of a copy and decides where it begins. Returns the
    /// session, or the reply that ends it at once (already there).
    async fn begin(&self, start: pb::CopyStart) -> Result<Begun, Status> {
        let link = self.link(&start.link_id)?.ok_or_else(|| {
            Status::permission_denied(format!(
                "link {:?} is not registered at this agent: register it here first (RegisterLink)",
                start.link_id
            ))
        })?;
        if secret_hash(&start.pairing_secret) != link.secret_hash {
            return Err(Status::unauthenticated(format!(
                "link {}: the pairing secret does not match the one registered here",
                start.link_id
            )));
        }
        let snapshot = convert::snapshot_id("snapshot_id", &start.snapshot_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let base = convert::optional_snapshot_id("base_snapshot_id", &start.base_snapshot_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let digest = Digest::try_from(&start.digest[..]).map_err(|len| {
            Status::invalid_argument(format!("digest has {len} bytes, expected 32"))
        })?;
        let target = VolumeId::new(&link.target_volume)
            .map_err(|e| Status::data_loss(format!("link {}: {e}", start.link_id)))?;
        let (head, remote) = self.heads.get(&target).await.ok_or_else(|| {
            Status::failed_precondition(format!(
                "link {}: the head of target volume {target} is not open on this agent: open it here first (role Remote)",
                start.link_id
            ))
        })?;
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
            if s.generation != start.generation || s.digest != digest {
                return Err(Status::already_exists(format!(
                    "link {}: target volume {target} has a different snapshot {snapshot} (generation {}, digest {}); delete it there first",
                    start.link_id, s.generation, s.digest
                )));
            }
            return Ok(Begun::AlreadyThere(s.digest));
        }
        let newest = snaps.last();
        match (&base, newest) {
            (None, None) => {}
            (Some(b), Some(n)) if &n.id == b => {}
            (None, Some(n)) => {
                return Err(Status::failed_precondition(format!(
                    "link {}: a full copy needs a target without snapshots, but {target} has {} (newest {}): send the layer on top of it instead",
                    start.link_id,
                    snaps.len(),
                    n.id
                )));
            }
            (Some(b), n) => {
                return Err(Status::failed_precondition(format!(
                    "link {}: this copy is the layer on top of snapshot {b}, but the newest snapshot of {target} is {}: copy the snapshots in between first",
                    start.link_id,
                    n.map_or("none".to_string(), |n| n.id.to_string())
                )));
            }
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
                    && c.base == want.base =>
            {
                c
            }
            _ => {
                // A fresh start: no block of an abandoned attempt may stay.
                head.revert().await.map_err(head_status)?;
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
        loop {
            let frame = match inbound.message().await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(Status::aborted("the sender closed the stream before CopyEnd"));
                }
                Err(s) => return Err(s),
            };
            match frame.frame {
                Some(pb::copy_frame::Frame::Batch(batch)) => {
                    let copied = check_batch(&batch, cursor, blocks)?;
                    let Some(last) = copied.last().map(|b| b.block) else { continue };
                    let n: u64 =
                        copied.iter().filter_map(|b| b.data.as_ref()).map(|d| d.len() as u64).sum();
                    for run in layer_runs(&copied) {
                        match run {
                            Run::Data(offset, data) => self.head.write(offset, data).await,
                            Run::Zero(offset, len) => self.head.trim(offset, len).await,
                        }
                        .map_err(head_status)?;
                    }
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
    for b in &batch.blocks {
        if b.index < next || b.index >= blocks {
            return Err(Status::invalid_argument(format!(
                "block {} is out of order or outside the volume (next expected at or after {next}, volume has {blocks} blocks)",
                b.index
            )));
        }
        next = b.index + 1;
        if b.data.is_empty() {
            out.push(CopiedBlock { block: b.index, data: None });
            continue;
        }
        if b.data.len() as u64 != BLOCK_SIZE {
            return Err(Status::invalid_argument(format!(
                "block {} has {} bytes, not {BLOCK_SIZE}",
                b.index,
                b.data.len()
            )));
        }
        let actual = crc32c::crc32c(&b.data);
        if actual != b.crc32c {
            return Err(Status::data_loss(format!(
                "block {} arrived with CRC32C {actual:#010x} but was sent as {:#010x}: corrupted in transit",
                b.index, b.crc32c
            )));
        }
        out.push(CopiedBlock { block: b.index, data: Some(b.data.clone()) });
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
        let rec = LinkRecord {
            secret_hash: secret_hash(&r.pairing_secret),
            target_volume: target.to_string(),
        };
        let bytes = serde_json::to_vec(&rec).expect("a link record serializes");
        self.store.put_meta(LINKS, &r.link_id, Some(&bytes)).map_err(internal)?;
        Ok(Response::new(pb::RegisterLinkResponse {}))
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
}
