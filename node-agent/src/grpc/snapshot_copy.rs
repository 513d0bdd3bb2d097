//! The `cairn.agent.v1.SnapshotCopy` edge: parses each request, calls the
//! receiving end (`copy::receiver::CopyService`) and maps its errors to
//! gRPC codes; every variant names its code (no catch-all).

use std::pin::Pin;

use bytes::Bytes;
use cairn_api::{
    Digest,
    agent::v1::{self as pb, snapshot_copy_server::SnapshotCopy},
    convert,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    copy::{
        receiver::{BatchError, Begun, CopyService, ReceiveError},
        records::MIN_SECRET_BYTES,
        session::receiver::{Offer, Refusal},
    },
    grpc::{
        convert::promoted_pb,
        status::{head_status, heads_status},
    },
};

impl CopyService {
    pub fn into_server(self) -> pb::snapshot_copy_server::SnapshotCopyServer<Self> {
        pb::snapshot_copy_server::SnapshotCopyServer::new(self)
            .max_decoding_message_size(crate::transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::transport::MAX_MESSAGE_BYTES)
    }
}

/// The gRPC status of a receiving-end error; the message is the error's.
pub fn status(e: ReceiveError) -> Status {
    let msg = e.to_string();
    match e {
        ReceiveError::UnknownLink { .. } => Status::permission_denied(msg),
        ReceiveError::Secret { .. } => Status::unauthenticated(msg),
        ReceiveError::LinkRecord { .. } | ReceiveError::TargetId { .. } => Status::data_loss(msg),
        ReceiveError::NoHead { .. } => Status::failed_precondition(msg),
        ReceiveError::Refused(r) => match r {
            Refusal::Different { .. } => Status::already_exists(msg),
            Refusal::Primary { .. }
            | Refusal::Size { .. }
            | Refusal::NoBase { .. }
            | Refusal::NotEmpty { .. }
            | Refusal::Diverged { .. } => Status::failed_precondition(msg),
        },
        ReceiveError::Busy { .. } => Status::aborted(msg),
        ReceiveError::Fenced { .. } => Status::failed_precondition(msg),
        ReceiveError::Batch(b) => match b {
            BatchError::TooMany { .. }
            | BatchError::Order { .. }
            | BatchError::DataInCompressed { .. }
            | BatchError::Length { .. } => Status::invalid_argument(msg),
            BatchError::Decompress { .. }
            | BatchError::Decompressed { .. }
            | BatchError::Crc { .. } => Status::data_loss(msg),
        },
        ReceiveError::Frames => Status::invalid_argument(msg),
        ReceiveError::Broken { .. } => Status::aborted(msg),
        ReceiveError::DigestMismatch { .. } => Status::data_loss(msg),
        ReceiveError::Head(h) => head_status(h),
        ReceiveError::Store(e) => crate::grpc::status::store_status(e),
    }
}

/// The offer of a `CopyStart`.
fn offer(start: pb::CopyStart) -> Result<Offer, Status> {
    let invalid = |e: convert::FieldError| Status::invalid_argument(e.to_string());
    let snapshot = convert::snapshot_id("snapshot_id", &start.snapshot_id).map_err(invalid)?;
    let base = convert::optional_snapshot_id("base_snapshot_id", &start.base_snapshot_id)
        .map_err(invalid)?;
    let digest = Digest::try_from(&start.digest[..])
        .map_err(|len| Status::invalid_argument(format!("digest has {len} bytes, expected 32")))?;
    Ok(Offer {
        link: start.link_id,
        snapshot,
        generation: start.generation,
        base,
        digest,
        size: start.size_bytes,
        resync: start.resync,
    })
}

fn reply(r: pb::copy_reply::Reply) -> pb::CopyReply {
    pb::CopyReply { reply: Some(r) }
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
        self.register(&r.link_id, &r.pairing_secret, &target).map_err(status)?;
        Ok(Response::new(pb::RegisterLinkResponse {}))
    }

    async fn unregister_link(
        &self,
        req: Request<pb::UnregisterLinkRequest>,
    ) -> Result<Response<pb::UnregisterLinkResponse>, Status> {
        let r = req.into_inner();
        self.unregister(&r.link_id, &r.pairing_secret).map_err(status)?;
        Ok(Response::new(pb::UnregisterLinkResponse {}))
    }

    type CopyStream = Pin<Box<dyn Stream<Item = Result<pb::CopyReply, Status>> + Send>>;

    async fn copy(
        &self,
        req: Request<Streaming<pb::CopyFrame>>,
    ) -> Result<Response<Self::CopyStream>, Status> {
        let mut inbound = req.into_inner();
        let start = match inbound.message().await? {
            Some(pb::CopyFrame { frame: Some(pb::copy_frame::Frame::Start(s)) }) => s,
            _ => return Err(Status::invalid_argument("a copy opens with a CopyStart frame")),
        };
        // The sender is admitted before anything else is looked at.
        let link = self.admit(&start.link_id, &start.pairing_secret).map_err(status)?;
        let offer = offer(start)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        match self.begin(link, offer).await.map_err(status)? {
            Begun::AlreadyThere(d) => {
                let msg = pb::copy_reply::Reply::Done(pb::CopyDone {
                    digest: Bytes::copy_from_slice(&d.0),
                    already_present: true,
                });
                let _ = tx.send(Ok(reply(msg))).await;
            }
            Begun::Session(session) => {
                let (from_block, bytes_done) = session.resume();
                let msg = pb::copy_reply::Reply::Resume(pb::CopyResume { from_block, bytes_done });
                let _ = tx.send(Ok(reply(msg))).await;
                let link = session.link().to_string();
                let frames = inbound
                    .map(move |f| {
                        f.map_err(|s| ReceiveError::Broken {
                            link: link.clone(),
                            why: s.message().to_string(),
                        })
                    })
                    .boxed();
                let out = tx.clone();
                tokio::spawn(session.run(frames, out));
            }
        }
        drop(tx);
        let replies = ReceiverStream::new(rx).map(|r| r.map_err(status));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn link_snapshots(
        &self,
        req: Request<pb::LinkSnapshotsRequest>,
    ) -> Result<Response<pb::LinkSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let link = self.admit(&r.link_id, &r.pairing_secret).map_err(status)?;
        let snapshots = self.link_snapshots(&r.link_id, &link).await.map_err(status)?;
        let snapshots = snapshots
            .into_iter()
            .map(|(s, digest)| pb::LinkSnapshot {
                snapshot_id: s.id.to_string(),
                generation: s.generation,
                digest: Bytes::copy_from_slice(&digest.0),
                divergent: s.divergent,
            })
            .collect();
        Ok(Response::new(pb::LinkSnapshotsResponse { snapshots }))
    }

    async fn promote_target(
        &self,
        req: Request<pb::PromoteTargetRequest>,
    ) -> Result<Response<pb::PromoteHeadResponse>, Status> {
        let r = req.into_inner();
        let link = self.admit(&r.link_id, &r.pairing_secret).map_err(status)?;
        let target = convert::volume_id("target_volume", &link.target_volume)
            .map_err(|e| Status::data_loss(format!("link {}: {e}", r.link_id)))?;
        crate::copy::receiver::promote(self.heads(), &target)
            .await
            .map(|p| Response::new(promoted_pb(p)))
            .map_err(heads_status)
    }
}
