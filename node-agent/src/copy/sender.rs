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

use crate::{
    copy::bandwidth::Limiter,
    head::{HeadError, SourcePick, VolumeHead},
    peer::StreamKind,
};

/// Blocks per batch sent (1 MiB of data at most).
pub const BATCH_BLOCKS: usize = 256;
/// Batches queued ahead of the network.
const QUEUE: usize = 8;

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
}

/// How a copy is going; readable at any time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyProgress {
    pub snapshot: String,
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
    /// Block data bytes sent in this attempt.
    pub bytes_sent: u64,
    pub blocks_sent: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Head(#[from] HeadError),
    #[error("snapshot {snapshot} of volume {volume}: {why}")]
    Snapshot { volume: String, snapshot: SnapshotId, why: String },
    #[error("link {link}: cannot reach the receiver at {endpoint}: {why}")]
    Connect { link: String, endpoint: String, why: String },
    #[error("link {link}: the receiver refused or ended the copy: {status}")]
    Receiver { link: String, status: tonic::Status },
}

/// Copies `snapshot` of `head`'s volume to the link's target: its image if
/// `base` is `None`, else its layer on top of `base`, which must be the
/// snapshot right before it.
pub async fn send_snapshot(
    head: &VolumeHead,
    target: &LinkTarget,
    snapshot: &SnapshotId,
    base: Option<&SnapshotId>,
    limiter: &Limiter,
    progress: &Mutex<CopyProgress>,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let volume = head.volume().to_string();
    let bad = |why: String| CopyError::Snapshot {
        volume: volume.clone(),
        snapshot: snapshot.clone(),
        why,
    };
    let snaps = head.snapshots().await?;
    let pos = snaps
        .iter()
        .position(|s| &s.id == snapshot)
        .ok_or_else(|| bad("no such snapshot at the source".into()))?;
    match (base, pos.checked_sub(1).map(|p| &snaps[p].id)) {
        (None, _) => {}
        (Some(b), Some(prev)) if b == prev => {}
        (Some(b), prev) => {
            return Err(bad(format!(
                "an incremental copy sends the layer on top of the snapshot right before it ({}), not on top of {b}",
                prev.map_or("none".to_string(), |p| p.to_string())
            )));
        }
    }
    let info = &snaps[pos];
    let digest = head.digest(Some(snapshot)).await?;
    let kind = if base.is_some() { StreamKind::Layer } else { StreamKind::Image };
    let (data_blocks, _) = head.count_blocks(snapshot, kind).await?;
    let total = data_blocks * cairn_api::BLOCK_SIZE;

    let link = target.link_id.clone();
    let connect = |why: String| CopyError::Connect {
        link: link.clone(),
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
        .initial_connection_window_size(crate::service::H2_CONNECTION_WINDOW)
        .initial_stream_window_size(crate::service::H2_STREAM_WINDOW)
        .connect()
        .await
        .map_err(|e| connect(format!("{e}: {}", source_chain(&e))))?;
    let mut client = SnapshotCopyClient::new(channel)
        .max_decoding_message_size(crate::service::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::service::MAX_MESSAGE_BYTES);
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
    };
    tx.send(frame(pb::copy_frame::Frame::Start(start))).await.expect("the queue is open");
    let receiver = |status| CopyError::Receiver { link: link.clone(), status };
    // A connection closed before any answer is a transport failure: with
    // mutual TLS, most often the receiver not trusting this certificate
    // (TLS 1.3 reports that only after the handshake).
    let closed = |status: tonic::Status| match status.code() {
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable => {
            let hint = if target.endpoint.starts_with("https://") {
                " (with mutual TLS: does the receiver's --peer-ca hold the CA that signed this agent's --tls-cert, and does this agent's --peer-ca hold the receiver's?)"
            } else {
                ""
            };
            connect(format!("the connection closed before any answer: {}{hint}", status.message()))
        }
        _ => receiver(status),
    };
    let mut replies = client.copy(ReceiverStream::new(rx)).await.map_err(closed)?.into_inner();
    let from = match replies.message().await.map_err(closed)?.and_then(|r| r.reply) {
        Some(pb::copy_reply::Reply::Resume(r)) => r,
        Some(pb::copy_reply::Reply::Done(d)) => {
            *progress.lock().unwrap() =
                CopyProgress { snapshot: snapshot.to_string(), done: true, ..Default::default() };
            return Ok(CopyReport {
                digest: Digest::try_from(&d.digest[..]).unwrap_or(digest),
                already_present: true,
                resumed_from_block: 0,
                bytes_sent: 0,
                blocks_sent: 0,
                elapsed: started.elapsed(),
            });
        }
        other => {
            return Err(receiver(tonic::Status::internal(format!(
                "the receiver answered the start with {other:?}"
            ))));
        }
    };
    *progress.lock().unwrap() = CopyProgress {
        snapshot: snapshot.to_string(),
        bytes_durable: from.bytes_done,
        resumed_from_block: from.from_block,
        bytes_total: total,
        bytes_before: from.bytes_done,
        ..Default::default()
    };

    // Replies (checkpoints, the end) are read beside the sending.
    let durable = Arc::new(Mutex::new(from.bytes_done));
    let reader = tokio::spawn({
        let durable = durable.clone();
        async move {
            loop {
                match replies.message().await? {
                    Some(pb::CopyReply { reply: Some(pb::copy_reply::Reply::Checkpoint(c)) }) => {
                        *durable.lock().unwrap() = c.bytes_done;
                    }
                    Some(pb::CopyReply { reply: Some(pb::copy_reply::Reply::Done(d)) }) => {
                        return Ok(d);
                    }
                    Some(other) => {
                        return Err(tonic::Status::internal(format!(
                            "unexpected reply during the copy: {other:?}"
                        )));
                    }
                    None => {
                        return Err(tonic::Status::aborted("the receiver ended without CopyDone"));
                    }
                }
            }
        }
    });

    let blocks_per_chunk = head.geometry().blocks_per_chunk();
    let (mut bytes_sent, mut blocks_sent) = (0u64, 0u64);
    let sent_at = Instant::now();
    'chunks: for chunk in 0..head.chunk_count() {
        if (chunk + 1) * blocks_per_chunk <= from.from_block {
            continue;
        }
        // Blocks before `next` of this chunk are sent.
        let mut next = from.from_block;
        loop {
            let (mut stream, src) =
                head.snapshot_stream(chunk, snapshot, kind, target.source).await?;
            let _counted = head.copy_stream_started(src);
            let mut failed = None;
            while let Some(batch) = stream.next().await {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        failed = Some((src, e));
                        break;
                    }
                };
                let mut blocks = Vec::with_capacity(batch.len());
                let mut n = 0u64;
                for b in batch.into_iter().filter(|b| b.block >= next) {
                    let (crc32c, data) = match b.data {
                        Some(d) => (crc32c::crc32c(&d), d),
                        None => (crate::meta::zero_block_crc(), Bytes::new()),
                    };
                    n += data.len() as u64;
                    blocks.push(pb::Block { index: b.block, crc32c, data });
                }
                let Some(last) = blocks.last().map(|b| b.index) else { continue };
                for part in blocks.chunks(BATCH_BLOCKS) {
                    let bytes: u64 = part.iter().map(|b| b.data.len() as u64).sum();
                    limiter.acquire(bytes.max(1)).await;
                    let msg = frame(pb::copy_frame::Frame::Batch(pb::CopyBatch {
                        blocks: part.to_vec(),
                    }));
                    if tx.send(msg).await.is_err() {
                        break 'chunks;
                    }
                }
                next = last + 1;
                bytes_sent += n;
                blocks_sent += blocks.len() as u64;
                let mut p = progress.lock().unwrap();
                p.bytes_sent = bytes_sent;
                p.bytes_durable = *durable.lock().unwrap();
                p.rate = bytes_sent as f64 / sent_at.elapsed().as_secs_f64().max(1e-3);
            }
            match failed {
                None => break,
                Some((src, e)) => {
                    tracing::warn!(volume = %volume, chunk, agent = %e.agent, error = %e.message, "copy source failed; going on from another replica");
                    head.source_failed(src, e)?;
                }
            }
        }
    }
    let _ = tx.send(frame(pb::copy_frame::Frame::End(pb::CopyEnd {}))).await;
    drop(tx);
    let done = match reader.await {
        Ok(Ok(d)) => d,
        Ok(Err(status)) => return Err(receiver(status)),
        Err(e) => return Err(receiver(tonic::Status::internal(format!("reply reader: {e}")))),
    };
    let got = Digest::try_from(&done.digest[..]).map_err(|len| {
        receiver(tonic::Status::internal(format!("the receiver's digest has {len} bytes")))
    })?;
    if got != digest {
        return Err(receiver(tonic::Status::data_loss(format!(
            "the receiver sealed digest {got}, the source's is {digest}"
        ))));
    }
    {
        let mut p = progress.lock().unwrap();
        p.done = true;
        p.bytes_durable = from.bytes_done + bytes_sent;
    }
    Ok(CopyReport {
        digest,
        already_present: done.already_present,
        resumed_from_block: from.from_block,
        bytes_sent,
        blocks_sent,
        elapsed: started.elapsed(),
    })
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
