//! The gRPC edge of volume heads (`cairn.agent.v1.VolumeHeads`): opens heads
//! on this agent with peers for every agent of the volume (this agent's own
//! store directly, the others over gRPC), serves their I/O, and maps head
//! errors to status codes with an exhaustive match.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use cairn_api::{
    Geometry, SnapshotId, VolumeId,
    agent::{
        REASON_METADATA, REASON_STALE_EPOCH,
        v1::{self as pb, volume_heads_server::VolumeHeads},
    },
    block::MAX_IO_BYTES,
    convert::{self, FieldError},
    placement::PlacementAgent,
};
use tonic::{Request, Response, Status};

use crate::{
    copy::{
        bandwidth::{Policy, Rate},
        links::{Links, policy_from_pb, progress_pb, report_pb, source_from_pb},
        sender::{Compress, LinkTarget},
    },
    frontend::{
        BlockVolume,
        fuse::{FuseFrontend, FuseMount},
        head_volume::{HeadVolume, SnapshotVolume},
        loop_device,
    },
    head::{HeadError, HeadSpec, VolumeHead},
    peer::{GrpcPeer, LocalPeer, ReplicaPeer},
    store::Store,
};

/// Maps a head error to a status code. Exhaustive: a new variant must
/// choose its code.
pub fn head_status(e: HeadError) -> Status {
    let msg = e.to_string();
    let fenced = matches!(e, HeadError::Fenced { .. });
    let mut status = match e {
        HeadError::Placement { .. } => Status::failed_precondition(msg),
        HeadError::Range { .. } => Status::out_of_range(msg),
        HeadError::NoReplica { .. } => Status::unavailable(msg),
        HeadError::Fenced { .. } | HeadError::Refused { .. } => Status::failed_precondition(msg),
        HeadError::Snapshot { .. } => Status::aborted(msg),
        HeadError::MissingPeer { .. } => Status::invalid_argument(msg),
        HeadError::Rebuild { .. } => Status::aborted(msg),
    };
    if fenced {
        status.metadata_mut().insert(
            REASON_METADATA,
            tonic::metadata::MetadataValue::from_static(REASON_STALE_EPOCH),
        );
    }
    status
}

fn field(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The task that rebuilds a head's out-of-sync replicas; stopped when the
/// head is closed or replaced.
#[derive(Debug)]
struct HealTask(tokio::task::AbortHandle);

impl Drop for HealTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A head open on this agent, with its FUSE mount if it has one.
#[derive(Debug)]
struct OpenHead {
    head: Arc<VolumeHead>,
    /// Role Remote: only copies write it; clients read; never attached.
    remote: Arc<std::sync::atomic::AtomicBool>,
    _heal: HealTask,
    fuse: Option<std::sync::Mutex<FuseMount>>,
    /// Snapshots exposed read-only through FUSE.
    snapshots: BTreeMap<SnapshotId, std::sync::Mutex<FuseMount>>,
}

impl OpenHead {
    fn is_remote(&self) -> bool {
        self.remote.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fuse_file(&self) -> Option<std::path::PathBuf> {
        self.fuse.as_ref().map(|m| m.lock().unwrap().file().to_path_buf())
    }

    /// Every FUSE file of this head: the head's and its snapshots'.
    fn fuse_files(&self) -> Vec<std::path::PathBuf> {
        self.fuse_file()
            .into_iter()
            .chain(self.snapshots.values().map(|m| m.lock().unwrap().file().to_path_buf()))
            .collect()
    }
}

/// Unmounts a FUSE mount off the runtime; refused while a loop device is
/// attached (the message names it).
async fn unmount(m: std::sync::Mutex<FuseMount>) -> Result<(), Status> {
    let mut m = m.into_inner().unwrap();
    tokio::task::spawn_blocking(move || m.unmount())
        .await
        .map_err(|e| Status::internal(format!("unmount task failed: {e}")))?
        .map_err(|e| Status::failed_precondition(e.to_string()))
}

/// How often a head looks for out-of-sync replicas to rebuild, by default.
pub const DEFAULT_HEAL_EVERY: Duration = Duration::from_secs(1);

/// Volume heads open on this agent.
#[derive(Debug)]
pub struct HeadService {
    store: Arc<Store>,
    agent: String,
    peer_timeout: Duration,
    /// Where FUSE mounts of heads go: `<fuse_dir>/<volume>/volume`.
    fuse_dir: Option<std::path::PathBuf>,
    /// How often a head looks for out-of-sync replicas to rebuild.
    heal_every: Duration,
    heads: Arc<tokio::sync::Mutex<BTreeMap<VolumeId, OpenHead>>>,
    /// The links this agent sends.
    links: Arc<Links>,
    /// Kept to configure `links` before the service runs.
    site_tls: Option<crate::copy::tls::SiteTls>,
    copy_cap: Option<u64>,
}

/// Finds the heads open on this agent, for services beside `VolumeHeads`
/// (a copy receiver writes into the target volume's head).
#[derive(Debug, Clone)]
pub struct HeadLookup(Arc<tokio::sync::Mutex<BTreeMap<VolumeId, OpenHead>>>);

impl HeadLookup {
    /// The open head of `volume`, and whether its role is Remote.
    pub async fn get(&self, volume: &VolumeId) -> Option<(Arc<VolumeHead>, bool)> {
        self.0.lock().await.get(volume).map(|h| (h.head.clone(), h.is_remote()))
    }

    /// Failover: makes a Remote head a Primary one. Its head is reverted to
    /// the newest complete snapshot first, so the part of a copy in progress
    /// is dropped; that snapshot is the base the volume goes on from.
    pub async fn promote(&self, volume: &VolumeId) -> Result<pb::PromoteHeadResponse, Status> {
        let heads = self.0.lock().await;
        let open = heads.get(volume).ok_or_else(|| {
            Status::not_found(format!("no head of volume {volume} is open on this agent"))
        })?;
        if !open.is_remote() {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is already a primary here"
            )));
        }
        open.head.revert().await.map_err(head_status)?;
        let base = open
            .head
            .snapshots()
            .await
            .map_err(head_status)?
            .into_iter()
            .rfind(|s| !s.divergent)
            .map(|s| s.id);
        let digest = open.head.digest(None).await.map_err(head_status)?;
        open.remote.store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!(%volume, base = ?base, "promoted: the volume is a primary here");
        Ok(pb::PromoteHeadResponse {
            base_snapshot_id: base.map(|b| b.to_string()).unwrap_or_default(),
            digest: digest.0.to_vec().into(),
        })
    }
}

impl HeadService {
    /// `agent` is this agent's name: the agent of that name in an
    /// OpenHead request is reached through `store` directly.
    /// `fuse_dir` is where heads opened with fuse=true are mounted.
    pub fn new(
        store: Arc<Store>,
        agent: impl Into<String>,
        peer_timeout: Duration,
        fuse_dir: Option<std::path::PathBuf>,
    ) -> Self {
        let heads: Arc<tokio::sync::Mutex<BTreeMap<VolumeId, OpenHead>>> = Default::default();
        let links = Arc::new(Links::new(store.clone(), HeadLookup(heads.clone())));
        HeadService {
            store,
            agent: agent.into(),
            peer_timeout,
            fuse_dir,
            heal_every: DEFAULT_HEAL_EVERY,
            heads,
            links,
            site_tls: None,
            copy_cap: None,
        }
    }

    /// Rebuilds the links with the current settings (before the service
    /// runs: nothing else holds them yet).
    fn configure_links(mut self) -> Self {
        let links = Links::new(self.store.clone(), self.lookup())
            .with_site_tls(self.site_tls.clone())
            .with_cap(self.copy_cap);
        self.links = Arc::new(links);
        self
    }

    /// Sets the mutual-TLS material copies to other sites use.
    pub fn with_site_tls(mut self, tls: Option<crate::copy::tls::SiteTls>) -> Self {
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
        self.heal_every = every;
        self
    }

    /// A handle that finds this service's open heads.
    pub fn lookup(&self) -> HeadLookup {
        HeadLookup(self.heads.clone())
    }

    pub fn into_server(self) -> pb::volume_heads_server::VolumeHeadsServer<Self> {
        pb::volume_heads_server::VolumeHeadsServer::new(self)
            .max_decoding_message_size(crate::service::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::service::MAX_MESSAGE_BYTES)
    }

    /// The refusal for a volume with no head open here.
    fn not_open(&self, volume: &VolumeId) -> Status {
        Status::not_found(format!(
            "no head of volume {volume} is open on agent {}: open it first (OpenHead)",
            self.agent
        ))
    }

    /// The head of a volume clients may write: refused for a Remote one.
    async fn writable_head(&self, volume_id: &str) -> Result<Arc<VolumeHead>, Status> {
        let volume = convert::volume_id("volume_id", volume_id).map_err(field)?;
        let heads = self.heads.lock().await;
        let open = heads.get(&volume).ok_or_else(|| self.not_open(&volume))?;
        if open.is_remote() {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is a remote copy (role Remote): only copies from its primary write it; promote it (PromoteHead) to write"
            )));
        }
        Ok(open.head.clone())
    }

    async fn head(&self, volume_id: &str) -> Result<Arc<VolumeHead>, Status> {
        let volume = convert::volume_id("volume_id", volume_id).map_err(field)?;
        self.heads
            .lock()
            .await
            .get(&volume)
            .map(|h| h.head.clone())
            .ok_or_else(|| self.not_open(&volume))
    }
}

fn status_of(open: &OpenHead) -> pb::HeadStatus {
    let (head, fuse_file) = (&open.head, open.fuse_file());
    let role = if open.is_remote() { pb::VolumeRole::Remote } else { pb::VolumeRole::Primary };
    pb::HeadStatus {
        role: role as i32,
        fuse_file: fuse_file.map(|f| f.display().to_string()).unwrap_or_default(),
        volume_id: head.volume().to_string(),
        epoch: head.epoch(),
        replicas: head
            .health()
            .into_iter()
            .map(|h| pb::ReplicaHealth {
                agent: h.agent,
                chunks: h.chunks,
                in_sync: h.out_of_sync.is_none(),
                reason: h.out_of_sync.unwrap_or_default(),
                rebuild: h.rebuild.map(|p| pb::RebuildProgress {
                    phase: p.phase.as_str().to_string(),
                    layers_done: p.layers_done,
                    layers_total: p.layers_total,
                    bytes_done: p.bytes_done,
                    head_blocks_done: p.head_blocks_done,
                    head_blocks_total: p.head_blocks_total,
                    elapsed_ms: p.started.elapsed().as_millis() as u64,
                }),
                last_rebuild: h.last_rebuild.unwrap_or_default(),
            })
            .collect(),
    }
}

impl HeadService {
    /// Exposes `volume` as `<fuse_dir>/<name>/volume`.
    async fn mount(&self, name: String, volume: Arc<dyn BlockVolume>) -> Result<FuseMount, Status> {
        let Some(dir) = &self.fuse_dir else {
            return Err(Status::failed_precondition(format!(
                "agent {} has no --fuse-dir: start it with one to expose heads through FUSE",
                self.agent
            )));
        };
        let mountpoint = dir.join(name);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&mountpoint)
                .map_err(|e| Status::internal(format!("creating {}: {e}", mountpoint.display())))?;
            FuseFrontend::mount(volume, &mountpoint, "volume")
                .map_err(|e| Status::failed_precondition(e.to_string()))
        })
        .await
        .map_err(|e| Status::internal(format!("mount task failed: {e}")))?
    }

    /// Refuses while a loop device over the head's FUSE file is attached,
    /// and says where its filesystem is mounted.
    fn check_detached(&self, volume: &VolumeId, open: &OpenHead) -> Result<(), Status> {
        for file in open.fuse_files() {
            check_file_detached(volume, &file)?;
        }
        Ok(())
    }
}

/// Refuses while a loop device is attached to `file`, saying where its
/// filesystem is mounted.
/// Waits (up to 3 s) while the loop devices over `files` are all on their
/// way out: `losetup -d` returns before the kernel lets go of a device
/// something still holds for a moment.
async fn settle_detaching(files: Vec<std::path::PathBuf>) {
    for _ in 0..30 {
        let going: Vec<_> = files.iter().flat_map(|f| loop_device::devices_backed_by(f)).collect();
        if going.is_empty() || !going.iter().all(|d| loop_device::detaching(d)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_file_detached(volume: &VolumeId, file: &std::path::Path) -> Result<(), Status> {
    let Some(device) = loop_device::devices_backed_by(file).into_iter().next() else {
        return Ok(());
    };
    let msg = match loop_device::mounted_at(&device) {
        Some(at) => format!(
            "volume {volume} is mounted at {} (loop device {}): unmount it and detach the loop device first",
            at.display(),
            device.display()
        ),
        None => format!(
            "volume {volume} is attached to loop device {}: detach it first (losetup -d {})",
            device.display(),
            device.display()
        ),
    };
    Err(Status::failed_precondition(msg))
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
impl VolumeHeads for HeadService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn open_head(
        &self,
        req: Request<pb::OpenHeadRequest>,
    ) -> Result<Response<pb::HeadStatus>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let geometry = Geometry::new(r.size_bytes, r.chunk_size_bytes)
            .map_err(|e| Status::invalid_argument(format!("volume {volume}: {e}")))?;
        if r.replicas == 0 {
            return Err(Status::invalid_argument(format!(
                "volume {volume}: replicas must be at least 1"
            )));
        }
        let remote = match pb::VolumeRole::try_from(r.role) {
            Ok(pb::VolumeRole::Primary) => false,
            Ok(pb::VolumeRole::Remote) => true,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "volume {volume}: role {} is not Primary (0) or Remote (1)",
                    r.role
                )));
            }
        };
        if remote && r.fuse {
            return Err(Status::invalid_argument(format!(
                "volume {volume} is a remote copy (role Remote) and is never attached: open it with fuse=false, or promote it first"
            )));
        }
        if r.epoch == 0 {
            return Err(Status::invalid_argument(format!(
                "volume {volume}: a head needs an epoch of at least 1 (0 means no head)"
            )));
        }
        let mut heads = self.heads.lock().await;
        if let Some(h) = heads.get_mut(&volume)
            && h.head.epoch() == r.epoch
            && !h.head.is_fenced()
        {
            // A repeat at the same epoch keeps the open head. With fuse=true
            // it also exposes the head through FUSE if it is not yet (the
            // operator opens heads without FUSE, the CSI node asks for the
            // mount); with fuse=false an existing mount stays.
            if r.fuse && h.fuse.is_none() {
                if h.is_remote() {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume} is a remote copy (role Remote) here and is never attached: promote it first"
                    )));
                }
                let file: Arc<dyn BlockVolume> =
                    Arc::new(HeadVolume::new(h.head.clone(), tokio::runtime::Handle::current()));
                let mount = self.mount(h.head.volume().to_string(), file).await?;
                h.fuse = Some(std::sync::Mutex::new(mount));
            }
            return Ok(Response::new(status_of(h)));
        }
        if let Some(old) = heads.get(&volume) {
            // A newer epoch replaces this agent's older head, but not under
            // a mounted filesystem.
            self.check_detached(&volume, old)?;
        }
        if let Some(mut old) = heads.remove(&volume)
            && let Some(m) = old.fuse.take()
        {
            m.into_inner()
                .unwrap()
                .unmount()
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        let mut agents = Vec::with_capacity(r.agents.len());
        let mut costs = BTreeMap::new();
        let mut peers: BTreeMap<String, Arc<dyn ReplicaPeer>> = BTreeMap::new();
        for a in &r.agents {
            if a.name.is_empty() {
                return Err(Status::invalid_argument("an agent has an empty name"));
            }
            let peer: Arc<dyn ReplicaPeer> = if a.name == self.agent {
                Arc::new(LocalPeer::new(&a.name, self.store.clone()))
            } else {
                Arc::new(
                    GrpcPeer::new(&a.name, &a.endpoint, self.peer_timeout)
                        .map_err(|e| Status::invalid_argument(format!("agent {}: {e}", a.name)))?,
                )
            };
            peers.insert(a.name.clone(), peer);
            let domain = (!a.domain.is_empty()).then_some(a.domain.as_str());
            agents.push(PlacementAgent::new(&a.name, domain));
            if a.cost > 0 {
                costs.insert(a.name.clone(), a.cost);
            }
        }
        let spec = HeadSpec {
            volume: volume.clone(),
            geometry,
            replicas: r.replicas as usize,
            layout_version: r.layout_version,
            agents,
            epoch: r.epoch,
            stale: r.stale_agents.clone(),
            costs,
        };
        let head =
            Arc::new(VolumeHead::open(spec, peers, Some(&self.agent)).await.map_err(head_status)?);
        let fuse = if r.fuse {
            let volume: Arc<dyn BlockVolume> =
                Arc::new(HeadVolume::new(head.clone(), tokio::runtime::Handle::current()));
            Some(self.mount(head.volume().to_string(), volume).await?)
        } else {
            None
        };
        let heal = HealTask(tokio::spawn(head.clone().heal(self.heal_every)).abort_handle());
        let open = OpenHead {
            head,
            remote: Arc::new(std::sync::atomic::AtomicBool::new(remote)),
            _heal: heal,
            fuse: fuse.map(std::sync::Mutex::new),
            snapshots: BTreeMap::new(),
        };
        let status = status_of(&open);
        heads.insert(volume, open);
        Ok(Response::new(status))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn close_head(
        &self,
        req: Request<pb::CloseHeadRequest>,
    ) -> Result<Response<pb::CloseHeadResponse>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        let files = self.heads.lock().await.get(&volume).map(|o| o.fuse_files());
        settle_detaching(files.unwrap_or_default()).await;
        let mut heads = self.heads.lock().await;
        let Some(open) = heads.get(&volume) else {
            return Err(self.not_open(&volume));
        };
        self.check_detached(&volume, open)?;
        let open = heads.remove(&volume).expect("just found");
        for m in open.fuse.into_iter().chain(open.snapshots.into_values()) {
            unmount(m).await?;
        }
        if let Err(e) = open.head.flush().await {
            tracing::warn!(%volume, error = %e, "flush at close failed");
        }
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
        let heads = self.heads.lock().await;
        let open = heads.get(&volume).ok_or_else(|| self.not_open(&volume))?;
        Ok(Response::new(status_of(open)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn expose_snapshot(
        &self,
        req: Request<pb::ExposeSnapshotRequest>,
    ) -> Result<Response<pb::ExposeSnapshotResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let mut heads = self.heads.lock().await;
        let open = heads.get_mut(&volume).ok_or_else(|| self.not_open(&volume))?;
        if let Some(m) = open.snapshots.get(&snap) {
            let fuse_file = m.lock().unwrap().file().display().to_string();
            return Ok(Response::new(pb::ExposeSnapshotResponse { fuse_file }));
        }
        // The snapshot must exist: read its first block before mounting.
        open.head.read_snapshot(&snap, 0, 4096).await.map_err(head_status)?;
        let view: Arc<dyn BlockVolume> = Arc::new(SnapshotVolume::new(
            open.head.clone(),
            snap.clone(),
            tokio::runtime::Handle::current(),
        ));
        let m = self.mount(format!("{volume}@{snap}"), view).await?;
        let fuse_file = m.file().display().to_string();
        open.snapshots.insert(snap, std::sync::Mutex::new(m));
        Ok(Response::new(pb::ExposeSnapshotResponse { fuse_file }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn hide_snapshot(
        &self,
        req: Request<pb::HideSnapshotRequest>,
    ) -> Result<Response<pb::HideSnapshotResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let file =
            self.heads.lock().await.get(&volume).and_then(|o| {
                o.snapshots.get(&snap).map(|m| m.lock().unwrap().file().to_path_buf())
            });
        settle_detaching(file.into_iter().collect()).await;
        let mut heads = self.heads.lock().await;
        let Some(open) = heads.get_mut(&volume) else {
            return Err(self.not_open(&volume));
        };
        let Some(m) = open.snapshots.get(&snap) else {
            return Err(Status::not_found(format!(
                "snapshot {snap} of volume {volume} is not exposed"
            )));
        };
        let file = m.lock().unwrap().file().to_path_buf();
        check_file_detached(&volume, &file)?;
        unmount(open.snapshots.remove(&snap).expect("just found")).await?;
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
            link_id: r.link_id.clone(),
            secret: r.pairing_secret,
            tls: self.links.site_tls(),
            source: source_from_pb(r.source).map_err(Status::invalid_argument)?,
            compress: Compress::from_pb(r.compression).map_err(Status::invalid_argument)?,
        };
        let running = self.links.running(&r.link_id);
        let _one = running.try_lock().map_err(|_| {
            Status::failed_precondition(format!(
                "a copy of link {} is already running: wait for it (GetCopyProgress)",
                r.link_id
            ))
        })?;
        let report =
            self.links.copy_one(&head, &target, policy, &snapshot, base.as_ref(), false).await?;
        Ok(Response::new(report_pb(&snapshot, &report)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn get_copy_progress(
        &self,
        req: Request<pb::CopyProgressRequest>,
    ) -> Result<Response<pb::CopyProgressResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        if !self.heads.lock().await.contains_key(&volume) {
            return Err(self.not_open(&volume));
        }
        let p = self.links.progress(&volume, &r.link_id).unwrap_or_default();
        Ok(Response::new(progress_pb(&p)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn promote_head(
        &self,
        req: Request<pb::PromoteHeadRequest>,
    ) -> Result<Response<pb::PromoteHeadResponse>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        if !self.heads.lock().await.contains_key(&volume) {
            return Err(self.not_open(&volume));
        }
        self.lookup().promote(&volume).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn demote_head(
        &self,
        req: Request<pb::DemoteHeadRequest>,
    ) -> Result<Response<pb::DemoteHeadResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let digest = self.demote(&volume, &snap, r.generation).await?;
        Ok(Response::new(pb::DemoteHeadResponse { digest: digest.0.to_vec().into() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn delete_head_snapshot(
        &self,
        req: Request<pb::DeleteHeadSnapshotRequest>,
    ) -> Result<Response<pb::DeleteHeadSnapshotResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let head = self.head(&r.volume_id).await?;
        let all = head.snapshots().await.map_err(head_status)?;
        let Some(info) = all.iter().find(|s| s.id == snap) else {
            return Err(Status::not_found(format!("volume {volume} has no snapshot {snap}")));
        };
        if !info.divergent {
            let line: Vec<_> = all.iter().filter(|s| !s.divergent).cloned().collect();
            if let Some(why) = self.links.needed_by(&volume, &snap, &line)? {
                return Err(Status::failed_precondition(why));
            }
        }
        head.delete_snapshot(&snap).await.map_err(head_status)?;
        tracing::info!(%volume, snapshot = %snap, "snapshot deleted");
        Ok(Response::new(pb::DeleteHeadSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn put_link(&self, req: Request<pb::Link>) -> Result<Response<pb::LinkStatus>, Status> {
        self.links.put(req.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn delete_link(
        &self,
        req: Request<pb::DeleteLinkRequest>,
    ) -> Result<Response<pb::DeleteLinkResponse>, Status> {
        self.links.delete(&req.get_ref().link_id)?;
        Ok(Response::new(pb::DeleteLinkResponse {}))
    }

    async fn list_links(
        &self,
        req: Request<pb::ListLinksRequest>,
    ) -> Result<Response<pb::ListLinksResponse>, Status> {
        let links = self.links.list(&req.get_ref().volume_id)?;
        Ok(Response::new(pb::ListLinksResponse { links }))
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn sync_link(
        &self,
        req: Request<pb::SyncLinkRequest>,
    ) -> Result<Response<pb::SyncLinkResponse>, Status> {
        let r = req.into_inner();
        self.links.sync(&r.link_id, r.resync).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(link = %req.get_ref().link_id))]
    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverResponse>, Status> {
        let r = req.into_inner();
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let volume = self.links.volume_of(&r.link_id)?;
        // 1. Demote, sealing the final snapshot (a retry after a failed copy
        //    finds it demoted with the snapshot there and goes on).
        let (head, remote) =
            self.lookup().get(&volume).await.ok_or_else(|| self.not_open(&volume))?;
        let have = head.snapshots().await.map_err(head_status)?.iter().any(|s| s.id == snap);
        if !(remote && have) {
            self.demote(&volume, &snap, r.generation).await?;
        }
        // 2. The final copy: everything the target lacks.
        let sync = self.links.sync(&r.link_id, false).await.map_err(|e| {
            Status::new(
                e.code(),
                format!(
                    "switchover of link {}: volume {volume} is demoted here (snapshot {snap} sealed) but the final copy failed: {}; call Switchover again to resume it, or PromoteHead here to go back",
                    r.link_id,
                    e.message()
                ),
            )
        })?;
        // 3. Promote the target.
        let digest = self.links.promote_target(&r.link_id).await?;
        let want = head.digest(Some(&snap)).await.map_err(head_status)?;
        if digest != want {
            return Err(Status::data_loss(format!(
                "switchover of link {}: the promoted target's digest {digest} differs from snapshot {snap}'s {want}",
                r.link_id
            )));
        }
        tracing::warn!(link = %r.link_id, %volume, snapshot = %snap, "switchover done: the target is the primary now");
        Ok(Response::new(pb::SwitchoverResponse {
            sync: Some(sync),
            digest: digest.0.to_vec().into(),
        }))
    }
}

impl HeadService {
    /// Primary -> Remote: refused under an attached loop device; the FUSE
    /// mount is removed; a last snapshot is sealed, then client writes are
    /// refused.
    async fn demote(
        &self,
        volume: &VolumeId,
        snap: &SnapshotId,
        generation: u64,
    ) -> Result<cairn_api::Digest, Status> {
        let mut heads = self.heads.lock().await;
        let open = heads.get_mut(volume).ok_or_else(|| self.not_open(volume))?;
        if open.is_remote() {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is already a remote copy here"
            )));
        }
        // Not under a mounted filesystem: it would keep writing.
        self.check_detached(volume, open)?;
        if let Some(m) = open.fuse.take() {
            unmount(m).await?;
        }
        let digest = open.head.snapshot(snap, generation).await.map_err(head_status)?;
        open.remote.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!(%volume, snapshot = %snap, "demoted: the volume is a remote copy here");
        Ok(digest)
    }
}
