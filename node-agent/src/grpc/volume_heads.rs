//! The gRPC edge of volume heads (`cairn.agent.v1.VolumeHeads`): each RPC
//! parses its request, calls the heads open on this agent ([`Heads`]) or
//! the links it sends ([`Links`]), and maps the answer.
//!
//! Invariant: no decision is taken here beyond parsing; every refusal is a
//! domain error mapped by `grpc::status`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use cairn_api::{
    agent::v1::{self as pb, volume_heads_server::VolumeHeads},
    block::MAX_IO_BYTES,
    convert,
};
use tonic::{Request, Response, Status};

use super::{
    convert::{head_status_pb, open_request, promoted_pb},
    status::{field, head_status, heads_status, link_status},
};
use crate::{
    copy::{
        bandwidth::{Policy, Rate},
        convert::{policy_from_pb, progress_pb, report_pb, source_from_pb},
        links::Links,
        sender::{Compress, LinkTarget},
        tls::SiteTls,
    },
    head::VolumeHead,
    heads::Heads,
    store::Store,
    transport::MAX_MESSAGE_BYTES,
};

pub use crate::heads::DEFAULT_HEAL_EVERY;

/// The `VolumeHeads` service of this agent.
#[derive(Debug)]
pub struct VolumeHeadsService {
    heads: Heads,
    /// The links this agent sends.
    links: Arc<Links>,
    /// Kept to configure `links` before the service runs.
    site_tls: Option<SiteTls>,
    copy_cap: Option<u64>,
}

impl VolumeHeadsService {
    /// `agent` is this agent's name: the agent of that name in an
    /// OpenHead request is reached through `store` directly.
    /// `fuse_dir` is where heads opened with fuse=true are mounted.
    pub fn new(
        store: Arc<Store>,
        agent: impl Into<String>,
        peer_timeout: Duration,
        fuse_dir: Option<PathBuf>,
    ) -> Self {
        let heads = Heads::new(store.clone(), agent, peer_timeout, fuse_dir);
        let links = Arc::new(Links::new(store, heads.clone()));
        VolumeHeadsService { heads, links, site_tls: None, copy_cap: None }
    }

    /// Rebuilds the links with the current settings (before the service
    /// runs: nothing else holds them yet).
    fn configure_links(mut self) -> Self {
        let links = Links::new(self.heads.store().clone(), self.heads.clone())
            .with_site_tls(self.site_tls.clone())
            .with_cap(self.copy_cap);
        self.links = Arc::new(links);
        self
    }

    /// Sets the mutual-TLS material copies to other sites use.
    pub fn with_site_tls(mut self, tls: Option<SiteTls>) -> Self {
        self.site_tls = tls;
        self.configure_links()
    }

    /// Caps all copies from this agent together at `rate` bytes/s.
    pub fn with_copy_cap(mut self, rate: Option<u64>) -> Self {
        self.copy_cap = rate;
        self.configure_links()
    }

    /// The links this agent sends (the copy receiver forwards through them).
    pub fn links(&self) -> Arc<Links> {
        self.links.clone()
    }

    /// Sets how often heads look for out-of-sync replicas to rebuild.
    pub fn with_heal_every(mut self, every: Duration) -> Self {
        self.heads = self.heads.with_heal_every(every);
        self
    }

    /// A handle that finds this service's open heads.
    pub fn heads(&self) -> Heads {
        self.heads.clone()
    }

    pub fn into_server(self) -> pb::volume_heads_server::VolumeHeadsServer<Self> {
        pb::volume_heads_server::VolumeHeadsServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn head(&self, volume_id: &str) -> Result<Arc<VolumeHead>, Status> {
        let volume = convert::volume_id("volume_id", volume_id).map_err(field)?;
        self.heads.head(&volume).await.map_err(heads_status)
    }

    /// The head of a volume clients may write: refused for a Remote one.
    async fn writable_head(&self, volume_id: &str) -> Result<Arc<VolumeHead>, Status> {
        let volume = convert::volume_id("volume_id", volume_id).map_err(field)?;
        self.heads.writable(&volume).await.map_err(heads_status)
    }
}

fn check_len(len: u64) -> Result<(), Status> {
    if len > MAX_IO_BYTES {
        return Err(Status::invalid_argument(format!(
            "length {len} bytes is over the limit of {MAX_IO_BYTES} bytes per request: split it"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl VolumeHeads for VolumeHeadsService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn open_head(
        &self,
        req: Request<pb::OpenHeadRequest>,
    ) -> Result<Response<pb::HeadStatus>, Status> {
        let r = open_request(req.into_inner())?;
        let view = self.heads.open(r).await.map_err(heads_status)?;
        Ok(Response::new(head_status_pb(view)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn close_head(
        &self,
        req: Request<pb::CloseHeadRequest>,
    ) -> Result<Response<pb::CloseHeadResponse>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        self.heads.close(&volume).await.map_err(heads_status)?;
        Ok(Response::new(pb::CloseHeadResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, offset = req.get_ref().offset))]
    async fn head_write(
        &self,
        req: Request<pb::HeadWriteRequest>,
    ) -> Result<Response<pb::HeadWriteResponse>, Status> {
        let r = req.into_inner();
        check_len(r.data.len() as u64)?;
        let head = self.writable_head(&r.volume_id).await?;
        head.write(r.offset, r.data).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadWriteResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, offset = req.get_ref().offset))]
    async fn head_read(
        &self,
        req: Request<pb::HeadReadRequest>,
    ) -> Result<Response<pb::HeadReadResponse>, Status> {
        let r = req.into_inner();
        check_len(r.length)?;
        let head = self.head(&r.volume_id).await?;
        let data = head.read(r.offset, r.length).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadReadResponse { data }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn head_trim(
        &self,
        req: Request<pb::HeadTrimRequest>,
    ) -> Result<Response<pb::HeadTrimResponse>, Status> {
        let r = req.into_inner();
        let head = self.writable_head(&r.volume_id).await?;
        head.trim(r.offset, r.length).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadTrimResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn head_flush(
        &self,
        req: Request<pb::HeadFlushRequest>,
    ) -> Result<Response<pb::HeadFlushResponse>, Status> {
        let head = self.head(&req.get_ref().volume_id).await?;
        head.flush().await.map_err(head_status)?;
        Ok(Response::new(pb::HeadFlushResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn head_snapshot(
        &self,
        req: Request<pb::HeadSnapshotRequest>,
    ) -> Result<Response<pb::HeadSnapshotResponse>, Status> {
        let r = req.into_inner();
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let head = self.writable_head(&r.volume_id).await?;
        let digest = head.snapshot(&snap, r.generation).await.map_err(head_status)?;
        self.links.snapshot_complete(head.volume());
        Ok(Response::new(pb::HeadSnapshotResponse { digest: digest.0.to_vec().into() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn get_head_status(
        &self,
        req: Request<pb::HeadStatusRequest>,
    ) -> Result<Response<pb::HeadStatus>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        let view = self.heads.view(&volume).await.map_err(heads_status)?;
        Ok(Response::new(head_status_pb(view)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn expose_snapshot(
        &self,
        req: Request<pb::ExposeSnapshotRequest>,
    ) -> Result<Response<pb::ExposeSnapshotResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let file = self.heads.expose_snapshot(&volume, &snap).await.map_err(heads_status)?;
        Ok(Response::new(pb::ExposeSnapshotResponse { fuse_file: file.display().to_string() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn hide_snapshot(
        &self,
        req: Request<pb::HideSnapshotRequest>,
    ) -> Result<Response<pb::HideSnapshotResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        self.heads.hide_snapshot(&volume, &snap).await.map_err(heads_status)?;
        Ok(Response::new(pb::HideSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn head_digest(
        &self,
        req: Request<pb::HeadDigestRequest>,
    ) -> Result<Response<pb::HeadDigestResponse>, Status> {
        let r = req.into_inner();
        let snap = convert::optional_snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let head = self.head(&r.volume_id).await?;
        let digest = head.digest(snap.as_ref()).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadDigestResponse { digest: digest.0.to_vec().into() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn copy_snapshot(
        &self,
        req: Request<pb::CopySnapshotRequest>,
    ) -> Result<Response<pb::CopySnapshotResponse>, Status> {
        let r = req.into_inner();
        convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snapshot = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let base = convert::optional_snapshot_id("base_snapshot_id", &r.base_snapshot_id)
            .map_err(field)?;
        if r.link_id.is_empty() || r.target_endpoint.is_empty() {
            return Err(Status::invalid_argument("link_id and target_endpoint are required"));
        }
        let head = self.head(&r.volume_id).await?;
        let policy = match r.policy.as_ref() {
            Some(p) => policy_from_pb(Some(p)).map_err(Status::invalid_argument)?,
            None => Policy::Fixed(match r.rate_bytes_per_sec {
                0 => Rate::Unlimited,
                n => Rate::BytesPerSec(n),
            }),
        };
        let target = LinkTarget {
            endpoint: r.target_endpoint,
            link_id: r.link_id,
            secret: r.pairing_secret,
            tls: self.links.site_tls(),
            source: source_from_pb(r.source).map_err(Status::invalid_argument)?,
            compress: Compress::from_pb(r.compression).map_err(Status::invalid_argument)?,
        };
        let report = self
            .links
            .copy_snapshot(&head, &target, policy, &snapshot, base.as_ref())
            .await
            .map_err(link_status)?;
        Ok(Response::new(report_pb(&snapshot, &report)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn get_copy_progress(
        &self,
        req: Request<pb::CopyProgressRequest>,
    ) -> Result<Response<pb::CopyProgressResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        self.heads.check_open(&volume).await.map_err(heads_status)?;
        let p = self.links.progress(&volume, &r.link_id).unwrap_or_default();
        Ok(Response::new(progress_pb(&p)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn promote_head(
        &self,
        req: Request<pb::PromoteHeadRequest>,
    ) -> Result<Response<pb::PromoteHeadResponse>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        self.heads.check_open(&volume).await.map_err(heads_status)?;
        let promoted =
            crate::copy::receiver::promote(&self.heads, &volume).await.map_err(heads_status)?;
        Ok(Response::new(promoted_pb(promoted)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn demote_head(
        &self,
        req: Request<pb::DemoteHeadRequest>,
    ) -> Result<Response<pb::DemoteHeadResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let digest = self.heads.demote(&volume, &snap, r.generation).await.map_err(heads_status)?;
        Ok(Response::new(pb::DemoteHeadResponse { digest: digest.0.to_vec().into() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn delete_head_snapshot(
        &self,
        req: Request<pb::DeleteHeadSnapshotRequest>,
    ) -> Result<Response<pb::DeleteHeadSnapshotResponse>, Status> {
        let r = req.into_inner();
        convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let head = self.head(&r.volume_id).await?;
        self.links.delete_snapshot(&head, &snap).await.map_err(link_status)?;
        Ok(Response::new(pb::DeleteHeadSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn put_link(&self, req: Request<pb::Link>) -> Result<Response<pb::LinkStatus>, Status> {
        self.links.put(req.into_inner()).map(Response::new).map_err(link_status)
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn delete_link(
        &self,
        req: Request<pb::DeleteLinkRequest>,
    ) -> Result<Response<pb::DeleteLinkResponse>, Status> {
        self.links.delete(&req.get_ref().link_id).map_err(link_status)?;
        Ok(Response::new(pb::DeleteLinkResponse {}))
    }

    async fn list_links(
        &self,
        req: Request<pb::ListLinksRequest>,
    ) -> Result<Response<pb::ListLinksResponse>, Status> {
        let links = self.links.list(&req.get_ref().volume_id).map_err(link_status)?;
        Ok(Response::new(pb::ListLinksResponse { links }))
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn sync_link(
        &self,
        req: Request<pb::SyncLinkRequest>,
    ) -> Result<Response<pb::SyncLinkResponse>, Status> {
        let r = req.into_inner();
        self.links.sync(&r.link_id, r.resync).await.map(Response::new).map_err(link_status)
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverResponse>, Status> {
        let r = req.into_inner();
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let (sync, digest) =
            self.links.switchover(&r.link_id, &snap, r.generation).await.map_err(link_status)?;
        Ok(Response::new(pb::SwitchoverResponse {
            sync: Some(sync),
            digest: digest.0.to_vec().into(),
        }))
    }
}
