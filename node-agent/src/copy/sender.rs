//! The sending end of a site-to-site snapshot copy: runs on the agent with
//! the source volume's head, reads each chunk of the snapshot from an
//! in-sync replica, and streams the blocks to the receiving agent of the
//! target site under the link's bandwidth limiter, resuming where the
//! receiver's last checkpoint says.
//!
//! What is sent: a full copy sends the image as of the snapshot (written
//! blocks only: zero blocks are not sent); an incremental copy sends the
//! snapshot's layer on top of the snapshot before it, trimmed blocks as
//! zero blocks without data. Blocks go in ascending index order, in batches
//! of up to [`BATCH_BLOCKS`], pipelined (a bounded queue and HTTP/2 flow
//! control are the window; no round trip per batch). A source replica that
//! fails mid-chunk is marked out of sync and the chunk goes on from another
//! replica after the last block sent.
//!
//! All-zero data blocks go as zero blocks (no data). Batches may be
//! compressed with zstd ([`Compress`]). A ping every [`PING_EVERY`] goes
//! through the same queue; the receiver's pong gives the round-trip time
//! (queues included) that steers an adaptive bandwidth policy.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_api::{
    Digest, SnapshotId,
    agent::v1::{self as pb, snapshot_copy_client::SnapshotCopyClient},
};
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use tonic::transport::Channel;

pub use crate::copy::session::sender::BATCH_BLOCKS;
use crate::{
    copy::{
        bandwidth::{Limiter, Rate},
        session::sender::{self as session, Block, Fault, Open, Reply, Sender, Unsendable},
    },
    head::{HeadError, SourcePick, VolumeHead},
    peer::StreamKind,
};

/// Batches queued ahead of the network (HTTP/2 windows hold more).
const QUEUE: usize = 4;
/// How often a ping is sent during a copy.
pub const PING_EVERY: Duration = Duration::from_millis(100);
/// [`Compress::Auto`] compresses when the link is held below this rate
/// (bytes/s): zstd at level 1 compresses about 350-500 MB/s per core here,
/// so on a faster link it would be the bottleneck (docs/design.md).
pub const AUTO_ZSTD_BELOW: u64 = 100 << 20;
/// A batch is sent compressed only if that saves at least 1/8 of it.
const ZSTD_MIN_SAVING: usize = 8;
/// After this many batches in a row that did not compress, compression is
/// not tried for [`ZSTD_BACKOFF`] batches.
const ZSTD_GIVE_UP: u32 = 8;
const ZSTD_BACKOFF: u32 = 64;

/// Whether batches are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compress {
    /// zstd when the link's rate is below [`AUTO_ZSTD_BELOW`].
    #[default]
    Auto,
    Off,
    Zstd,
}

impl Compress {
    pub fn from_pb(v: i32) -> Result<Self, String> {
        match pb::Compression::try_from(v) {
            Ok(pb::Compression::Default) => Ok(Compress::Auto),
            Ok(pb::Compression::None) => Ok(Compress::Off),
            Ok(pb::Compression::Zstd) => Ok(Compress::Zstd),
            Err(_) => Err(format!("compression {v} is not DEFAULT (0), NONE (1) or ZSTD (2)")),
        }
    }

    pub fn to_pb(self) -> pb::Compression {
        match self {
            Compress::Auto => pb::Compression::Default,
            Compress::Off => pb::Compression::None,
            Compress::Zstd => pb::Compression::Zstd,
        }
    }

    /// Whether to compress under a limiter holding the link to `rate`.
    fn wanted(self, rate: Rate) -> bool {
        match self {
            Compress::Off => false,
            Compress::Zstd => true,
            Compress::Auto => matches!(rate, Rate::BytesPerSec(r) if r < AUTO_ZSTD_BELOW),
        }
    }
}

/// Where a link's copies go.
#[derive(Debug, Clone)]
pub struct LinkTarget {
    /// The receiving agent, `http://host:port`.
    pub endpoint: String,
    pub link_id: String,
    pub secret: Bytes,
    /// This agent's mutual-TLS material, for `https://` endpoints.
    pub tls: Option<crate::copy::tls::SiteTls>,
    /// Which replica each chunk is read from.
    pub source: SourcePick,
    pub compress: Compress,
}

/// How a copy is going; readable at any time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyProgress {
    pub link: String,
    pub snapshot: String,
    /// Bytes of block data on the wire in this attempt (after compression).
    pub wire_bytes: u64,
    /// Block data bytes durable at the target (as of its last checkpoint)
    /// and sent so far in this attempt.
    pub bytes_durable: u64,
    pub bytes_sent: u64,
    /// Where this attempt started (0, or a checkpoint of a broken one).
    pub resumed_from_block: u64,
    /// Block data bytes of the whole copy, and those durable at the target
    /// before this attempt.
    pub bytes_total: u64,
    pub bytes_before: u64,
    /// Bytes per second over this attempt.
    pub rate: f64,
    pub done: bool,
}

impl CopyProgress {
    /// Seconds left at the current rate (`None` before any rate is known).
    pub fn eta_seconds(&self) -> Option<f64> {
        let left = self.bytes_total.saturating_sub(self.bytes_before + self.bytes_sent);
        (self.rate > 0.0).then(|| left as f64 / self.rate)
    }
}

/// What a finished copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub digest: Digest,
    pub already_present: bool,
    pub resumed_from_block: u64,
    /// Block data bytes sent in this attempt, and what they took on the
    /// wire (after compression).
    pub bytes_sent: u64,
    pub wire_bytes: u64,
    pub blocks_sent: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Head(#[from] HeadError),
    #[error("snapshot {snapshot} of volume {volume}: {why}")]
    Snapshot { volume: String, snapshot: SnapshotId, why: Unsendable },
    #[error("link {link}: cannot reach the receiver at {endpoint}: {why}")]
    Connect { link: String, endpoint: String, why: String },
    /// What the receiver answered with a gRPC status (a refusal, or the
    /// transport's error).
    #[error("link {link}: the receiver refused or ended the copy: {status}")]
    Receiver { link: String, status: tonic::Status },
    #[error("link {link}: {fault}")]
    Session { link: String, fault: Fault },
}

/// Connects to the link's receiving agent (mutual TLS for `https://`).
pub async fn connect(target: &LinkTarget) -> Result<SnapshotCopyClient<Channel>, CopyError> {
    let connect = |why: String| CopyError::Connect {
        link: target.link_id.clone(),
        endpoint: target.endpoint.clone(),
        why,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(target.endpoint.clone())
        .map_err(|e| connect(e.to_string()))?;
    if target.endpoint.starts_with("https://") {
        let tls = target.tls.as_ref().ok_or_else(|| {
            connect(
                "an https:// endpoint needs mutual TLS, but this agent has no --tls-cert, --tls-key and --peer-ca"
                    .into(),
            )
        })?;
        endpoint = endpoint.tls_config(tls.client()).map_err(|e| connect(e.to_string()))?;
    }
    let channel = endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .initial_connection_window_size(crate::transport::H2_CONNECTION_WINDOW)
        .initial_stream_window_size(crate::transport::H2_STREAM_WINDOW)
        .connect()
        .await
        .map_err(|e| connect(format!("{e}: {}", source_chain(&e))))?;
    Ok(SnapshotCopyClient::new(channel)
        .max_decoding_message_size(crate::transport::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::transport::MAX_MESSAGE_BYTES))
}

/// A snapshot of the link's target volume, as its receiver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSnapshot {
    pub id: SnapshotId,
    pub generation: u64,
    pub digest: Digest,
    pub divergent: bool,
}

/// The snapshots of the link's target volume, oldest first.
pub async fn target_snapshots(target: &LinkTarget) -> Result<Vec<TargetSnapshot>, CopyError> {
    let mut client = connect(target).await?;
    let req = pb::LinkSnapshotsRequest {
        link_id: target.link_id.clone(),
        pairing_secret: target.secret.clone(),
    };
    let receiver = |status| CopyError::Receiver { link: target.link_id.clone(), status };
    let fault = |why: String| CopyError::Session {
        link: target.link_id.clone(),
        fault: Fault::Malformed(why),
    };
    let list = client.link_snapshots(req).await.map_err(receiver)?.into_inner();
    list.snapshots
        .into_iter()
        .map(|s| {
            Ok(TargetSnapshot {
                id: SnapshotId::new(&s.snapshot_id)
                    .map_err(|e| fault(format!("the receiver listed {e}")))?,
                generation: s.generation,
                digest: Digest::try_from(&s.digest[..])
                    .map_err(|len| fault(format!("a digest of {len} bytes")))?,
                divergent: s.divergent,
            })
        })
        .collect()
}

/// Promotes the link's target volume at its site.
pub async fn promote_target(target: &LinkTarget) -> Result<Digest, CopyError> {
    let mut client = connect(target).await?;
    let req = pb::PromoteTargetRequest {
        link_id: target.link_id.clone(),
        pairing_secret: target.secret.clone(),
    };
    let receiver = |status| CopyError::Receiver { link: target.link_id.clone(), status };
    let r = client.promote_target(req).await.map_err(receiver)?.into_inner();
    Digest::try_from(&r.digest[..]).map_err(|len| CopyError::Session {
        link: target.link_id.clone(),
        fault: Fault::DigestLength(len),
    })
}

/// Copies `snapshot` of `head`'s volume to the link's target: its image if
/// `base` is `None`, else its layer on top of `base`, which must be the
/// snapshot right before it in the volume's line (divergent snapshots are
/// out of the line). With `resync`, the target may hold snapshots after
/// `base`: they are marked divergent there and its content is rolled back
/// to `base` before the layer is applied.
///
/// The protocol's decisions are the [`Sender`] session's; this feeds it
/// what the source replicas stream and what the receiver answers, and
/// carries the batches it answers to the wire.
pub async fn send_snapshot(
    head: &VolumeHead,
    target: &LinkTarget,
    snapshot: &SnapshotId,
    base: Option<&SnapshotId>,
    resync: bool,
    limiter: &Arc<Limiter>,
    progress: &Mutex<CopyProgress>,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let volume = head.volume().to_string();
    let link = target.link_id.clone();
    let snaps = head.snapshots().await?;
    let info = session::offered(&snaps, snapshot, base).map_err(|why| CopyError::Snapshot {
        volume: volume.clone(),
        snapshot: snapshot.clone(),
        why,
    })?;
    let digest = head.digest(Some(snapshot)).await?;
    let kind = if base.is_some() { StreamKind::Layer } else { StreamKind::Image };
    let (data_blocks, _) = head.count_blocks(snapshot, kind).await?;
    let total = data_blocks * cairn_api::BLOCK_SIZE;
    let blocks_per_chunk = head.geometry().blocks_per_chunk();
    let mut session = Sender::new(kind, blocks_per_chunk, head.chunk_count(), digest);
    let fault = |fault| CopyError::Session { link: link.clone(), fault };

    let mut client = connect(target).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::CopyFrame>(QUEUE);
    let start = pb::CopyStart {
        link_id: target.link_id.clone(),
        pairing_secret: target.secret.clone(),
        snapshot_id: snapshot.to_string(),
        generation: info.generation,
        base_snapshot_id: base.map(|b| b.to_string()).unwrap_or_default(),
        size_bytes: head.size(),
        digest: Bytes::copy_from_slice(&digest.0),
        total_bytes: total,
        resync,
    };
    tx.send(frame(pb::copy_frame::Frame::Start(start))).await.expect("the queue is open");
    let closed = |status| closed_early(target, status);
    let mut replies = client.copy(ReceiverStream::new(rx)).await.map_err(closed)?.into_inner();
    let first = replies.message().await.map_err(closed)?;
    let (from_block, bytes_done) = match session.opened(parse_reply(first)).map_err(fault)? {
        Open::Send { from_block, bytes_done } => (from_block, bytes_done),
        Open::AlreadyPresent(digest) => {
            *progress.lock().unwrap() = CopyProgress {
                link: link.clone(),
                snapshot: snapshot.to_string(),
                done: true,
                ..Default::default()
            };
            return Ok(CopyReport {
                digest,
                already_present: true,
                resumed_from_block: 0,
                bytes_sent: 0,
                wire_bytes: 0,
                blocks_sent: 0,
                elapsed: started.elapsed(),
            });
        }
    };
    *progress.lock().unwrap() = CopyProgress {
        link: link.clone(),
        snapshot: snapshot.to_string(),
        bytes_durable: bytes_done,
        resumed_from_block: from_block,
        bytes_total: total,
        bytes_before: bytes_done,
        ..Default::default()
    };

    // Pings go every PING_EVERY through the same queue as the batches;
    // pongs are timed as they arrive, beside the sending; every other reply
    // goes to the session.
    let epoch = Instant::now();
    let _stop_pinger = ping(tx.clone(), epoch);
    let (mut events, _stop_reader) = read_replies(replies, limiter.clone(), link.clone(), epoch);

    let mut wire_bytes = 0u64;
    let mut packer = Packer::new(target.compress.wanted(limiter.rate()));
    let sent_at = Instant::now();
    'chunks: for chunk in session.chunks() {
        loop {
            let (mut stream, src) =
                head.snapshot_stream(chunk, snapshot, kind, target.source).await?;
            let _counted = head.copy_stream_started(src);
            let (stream_started, stream_bytes) = (Instant::now(), session.sent().0);
            let mut failed = None;
            while let Some(batch) = stream.next().await {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        failed = Some((src, e));
                        break;
                    }
                };
                for blocks in session.take(batch) {
                    let batch = packer.pack(blocks.into_iter().map(to_pb).collect()).await;
                    let bytes = batch_wire_bytes(&batch);
                    wire_bytes += bytes;
                    limiter.acquire(bytes.max(1)).await;
                    if tx.send(frame(pb::copy_frame::Frame::Batch(batch))).await.is_err() {
                        break 'chunks;
                    }
                }
                // A refusal ends the copy now; a checkpoint moves progress.
                while let Ok(reply) = events.try_recv() {
                    session.reply(reply?).map_err(fault)?;
                }
                let mut p = progress.lock().unwrap();
                p.bytes_sent = session.sent().0;
                p.wire_bytes = wire_bytes;
                p.bytes_durable = session.bytes_durable();
                p.rate = p.bytes_sent as f64 / sent_at.elapsed().as_secs_f64().max(1e-3);
            }
            match failed {
                None => {
                    let bytes = session.sent().0 - stream_bytes;
                    head.record_source_rate(src, bytes, stream_started.elapsed());
                    break;
                }
                Some((src, e)) => {
                    tracing::warn!(volume = %volume, chunk, agent = %e.agent, error = %e.message, "copy source failed; going on from another replica");
                    head.source_failed(src, e)?;
                }
            }
        }
    }
    drop(_stop_pinger);
    session.end();
    let _ = tx.send(frame(pb::copy_frame::Frame::End(pb::CopyEnd {}))).await;
    drop(tx);
    let done = loop {
        let reply = events.recv().await.unwrap_or(Ok(Reply::Ended))?;
        if let Some(done) = session.reply(reply).map_err(fault)? {
            break done;
        }
    };
    let (bytes_sent, blocks_sent) = session.sent();
    {
        let mut p = progress.lock().unwrap();
        p.done = true;
        p.bytes_durable = session.bytes_durable();
    }
    Ok(CopyReport {
        digest: done.digest,
        already_present: done.already_present,
        resumed_from_block: from_block,
        bytes_sent,
        wire_bytes,
        blocks_sent,
        elapsed: started.elapsed(),
    })
}

/// Sends a ping every [`PING_EVERY`] through the queue of the batches
/// (its nonce: microseconds since `epoch`), until dropped.
fn ping(tx: tokio::sync::mpsc::Sender<pb::CopyFrame>, epoch: Instant) -> AbortOnDrop {
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(PING_EVERY).await;
            let nonce = epoch.elapsed().as_micros() as u64;
            let ping = frame(pb::copy_frame::Frame::Ping(pb::CopyPing { nonce }));
            if tx.send(ping).await.is_err() {
                break;
            }
        }
    });
    AbortOnDrop(pinger.abort_handle())
}

/// Reads the receiver's replies beside the sending, until dropped: a pong
/// is timed at once (the round trip steers the limiter); every other reply
/// goes to the session, up to the last (anything but a checkpoint).
fn read_replies(
    mut replies: tonic::Streaming<pb::CopyReply>,
    limiter: Arc<Limiter>,
    link: String,
    epoch: Instant,
) -> (tokio::sync::mpsc::UnboundedReceiver<Result<Reply, CopyError>>, AbortOnDrop) {
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let reply = match replies.message().await {
                Ok(Some(pb::CopyReply { reply: Some(pb::copy_reply::Reply::Pong(p)) })) => {
                    let now = epoch.elapsed().as_micros() as u64;
                    limiter.on_rtt(Duration::from_micros(now.saturating_sub(p.nonce)));
                    continue;
                }
                Ok(reply) => Ok(parse_reply(reply)),
                Err(status) => Err(CopyError::Receiver { link: link.clone(), status }),
            };
            let last = !matches!(reply, Ok(Reply::Checkpoint { .. }));
            if events_tx.send(reply).is_err() || last {
                break;
            }
        }
    });
    (events, AbortOnDrop(reader.abort_handle()))
}

/// A reply as the session reads it (pongs are timed before this).
fn parse_reply(reply: Option<pb::CopyReply>) -> Reply {
    match reply.map(|r| r.reply) {
        None => Reply::Ended,
        Some(Some(pb::copy_reply::Reply::Resume(r))) => {
            Reply::Resume { from_block: r.from_block, bytes_done: r.bytes_done }
        }
        Some(Some(pb::copy_reply::Reply::Checkpoint(c))) => {
            Reply::Checkpoint { through_block: c.through_block, bytes_done: c.bytes_done }
        }
        Some(Some(pb::copy_reply::Reply::Done(d))) => {
            Reply::Done { digest: d.digest, already_present: d.already_present }
        }
        Some(other) => Reply::Other(format!("{other:?}")),
    }
}

/// The refusal of a copy that ends before any answer. A connection closed
/// then is a transport failure: with mutual TLS, most often the receiver
/// not trusting this certificate (TLS 1.3 reports that only after the
/// handshake).
fn closed_early(target: &LinkTarget, status: tonic::Status) -> CopyError {
    match status.code() {
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable => {
            let hint = if target.endpoint.starts_with("https://") {
                " (with mutual TLS: does the receiver's --peer-ca hold the CA that signed this agent's --tls-cert, and does this agent's --peer-ca hold the receiver's?)"
            } else {
                ""
            };
            CopyError::Connect {
                link: target.link_id.clone(),
                endpoint: target.endpoint.clone(),
                why: format!("the connection closed before any answer: {}{hint}", status.message()),
            }
        }
        _ => CopyError::Receiver { link: target.link_id.clone(), status },
    }
}

fn to_pb(b: Block) -> pb::Block {
    pb::Block { index: b.index, crc32c: b.crc32c, data: b.data, zero: false }
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Packs blocks into batches, compressed when wanted and worth it.
struct Packer {
    wanted: bool,
    /// Batches in a row that did not compress enough.
    misses: u32,
    /// Batches left to send without trying.
    skip: u32,
}

impl Packer {
    fn new(wanted: bool) -> Self {
        Packer { wanted, misses: 0, skip: 0 }
    }

    async fn pack(&mut self, blocks: Vec<pb::Block>) -> pb::CopyBatch {
        let raw_len: usize = blocks.iter().map(|b| b.data.len()).sum();
        if !self.wanted || raw_len == 0 {
            return pb::CopyBatch { blocks, zstd_data: Bytes::new() };
        }
        if self.skip > 0 {
            self.skip -= 1;
            return pb::CopyBatch { blocks, zstd_data: Bytes::new() };
        }
        let (blocks, packed) = tokio::task::spawn_blocking(move || {
            let mut raw = Vec::with_capacity(raw_len);
            for b in &blocks {
                raw.extend_from_slice(&b.data);
            }
            let packed = zstd::bulk::compress(&raw, 1).ok();
            (blocks, packed)
        })
        .await
        .expect("the compression task does not panic");
        match packed.filter(|p| p.len() <= raw_len - raw_len / ZSTD_MIN_SAVING) {
            Some(p) => {
                self.misses = 0;
                let blocks = blocks
                    .into_iter()
                    .map(|b| pb::Block { zero: b.data.is_empty(), data: Bytes::new(), ..b })
                    .collect();
                pb::CopyBatch { blocks, zstd_data: p.into() }
            }
            None => {
                self.misses += 1;
                if self.misses >= ZSTD_GIVE_UP {
                    (self.misses, self.skip) = (0, ZSTD_BACKOFF);
                }
                pb::CopyBatch { blocks, zstd_data: Bytes::new() }
            }
        }
    }
}

/// Bytes of block data a batch puts on the wire.
fn batch_wire_bytes(batch: &pb::CopyBatch) -> u64 {
    if batch.zstd_data.is_empty() {
        batch.blocks.iter().map(|b| b.data.len() as u64).sum()
    } else {
        batch.zstd_data.len() as u64
    }
}

fn frame(f: pb::copy_frame::Frame) -> pb::CopyFrame {
    pb::CopyFrame { frame: Some(f) }
}

/// The causes under an error, joined (a TLS refusal is several levels down).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    out.join(": ")
}
