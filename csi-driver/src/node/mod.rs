//! The CSI Node service. Staging a volume asks the local agent to expose
//! the head the controller opened (the publish context's OpenHead request,
//! repeated with fuse=true), attaches the head's FUSE file to a loop device
//! and, for a filesystem volume, formats it if (and only if) it is empty
//! and mounts it at the staging path. Publishing bind-mounts the staging
//! mount (or, for a raw block volume, the loop device) into the pod.
//! Unstaging undoes the mount and the loop device and leaves the head open:
//! the operator owns heads.
//!
//! Every RPC is idempotent (a repeat finds the work done and succeeds) and
//! holds its volume for its duration: a concurrent call on the same volume
//! gets ABORTED (`crate::operation`).

pub mod capabilities;
mod device;
mod health;
mod mount;
mod state;

use std::{
    collections::HashMap,
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

use cairn_api::{
    agent::v1::{self as pb, volume_heads_client::VolumeHeadsClient},
    csi::v1::{self as csi, node_server::Node},
};
use tonic::{Code, Request, Response, Status, transport::Channel};

use crate::{
    capability::{self, Access},
    operation::Operations,
};
use csi::node_service_capability::{self, rpc::Type};
pub use state::{Staged, StateDir};

/// What the node service is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name (the CO's node id).
    pub node_id: String,
    /// The StorageCluster this node's agent belongs to (its topology).
    pub storage_cluster: String,
    /// The local agent's endpoint, and a channel to it.
    pub agent_endpoint: String,
    pub agent: Channel,
    /// Where node-local bookkeeping is kept.
    pub state_dir: PathBuf,
}

/// Why a node operation failed. Mapped to a status code by an exhaustive
/// match in `From<Error> for Status`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "could not run `{command}`: {source}; the node plugin needs util-linux, e2fsprogs and xfsprogs"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state record {path} is unreadable ({why}): remove it after checking the volume's mounts"
    )]
    State { path: PathBuf, why: String },
    #[error("loop device {device}: {why}")]
    Device { device: PathBuf, why: String },
    #[error(
        "volume {volume}: {device} holds {found}, not the {wanted} asked for; it is never reformatted"
    )]
    FsMismatch { volume: String, device: PathBuf, found: String, wanted: &'static str },
    #[error("volume {volume} is not staged on this node")]
    NotStaged { volume: String },
    #[error("volume {volume}: {why}")]
    Incompatible { volume: String, why: String },
    #[error("volume {volume}: {why}")]
    Precondition { volume: String, why: String },
    #[error("{path} does not exist")]
    PathNotFound { path: String },
    #[error(transparent)]
    Context(#[from] crate::ContextError),
    #[error("{call} at the local agent {endpoint}: {}", .status.message())]
    Agent { call: &'static str, endpoint: String, status: Status },
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::Spawn { .. }
            | Error::Command { .. }
            | Error::Io { .. }
            | Error::State { .. }
            | Error::Device { .. } => Status::internal(msg),
            Error::FsMismatch { .. } | Error::Precondition { .. } => {
                Status::failed_precondition(msg)
            }
            Error::NotStaged { .. } | Error::PathNotFound { .. } => Status::not_found(msg),
            Error::Incompatible { .. } => Status::already_exists(msg),
            Error::Context(e) => Status::from(e),
            // The agent's codes mean what CSI's mean (NOT_FOUND,
            // FAILED_PRECONDITION for a fenced head, UNAVAILABLE...).
            Error::Agent { status, .. } => Status::new(status.code(), msg),
        }
    }
}

/// Runs a command; its exit code and trimmed stdout when the code is 0 or
/// one of `ok_codes`, else an error with its stderr.
async fn run_status(
    program: &str,
    args: &[&OsStr],
    ok_codes: &[i32],
) -> Result<(i32, String), Error> {
    let command = cairn_host::command::line(program, args);
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| Error::Spawn { command: command.clone(), source })?;
    let code = out.status.code().unwrap_or(-1);
    if !out.status.success() && !ok_codes.contains(&code) {
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok((code, String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

/// Runs a command that must succeed; its trimmed stdout.
async fn run(program: &str, args: &[&OsStr]) -> Result<String, Error> {
    run_status(program, args, &[]).await.map(|(_, out)| out)
}

/// How long an agent call may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The Node service.
#[derive(Debug)]
pub struct NodeService {
    config: NodeConfig,
    state: StateDir,
    operations: Operations,
}

impl NodeService {
    pub fn new(config: NodeConfig) -> Self {
        let state = StateDir::new(&config.state_dir);
        NodeService { config, state, operations: Operations::default() }
    }

    pub fn into_server(self) -> csi::node_server::NodeServer<Self> {
        csi::node_server::NodeServer::new(self)
    }

    fn heads(&self) -> VolumeHeadsClient<Channel> {
        VolumeHeadsClient::new(self.config.agent.clone())
    }

    fn agent_error(&self, call: &'static str) -> impl FnOnce(Status) -> Error + use<'_> {
        move |status| Error::Agent { call, endpoint: self.config.agent_endpoint.clone(), status }
    }

    /// Opens (or finds open) the head with FUSE on the local agent; its file.
    async fn expose(&self, volume: &str, open: &pb::OpenHeadRequest) -> Result<PathBuf, Error> {
        let request = pb::OpenHeadRequest { fuse: true, ..open.clone() };
        let mut req = Request::new(request);
        req.set_timeout(AGENT_TIMEOUT);
        let status =
            self.heads().open_head(req).await.map_err(self.agent_error("OpenHead"))?.into_inner();
        if status.fuse_file.is_empty() {
            return Err(Error::Precondition {
                volume: volume.into(),
                why: format!(
                    "the agent at {} opened head {} without a FUSE file: start it with --fuse-dir",
                    self.config.agent_endpoint, open.volume_id
                ),
            });
        }
        Ok(PathBuf::from(status.fuse_file))
    }

    async fn stage(&self, r: &csi::NodeStageVolumeRequest, access: Access) -> Result<(), Error> {
        let volume = r.volume_id.as_str();
        let staging = Path::new(&r.staging_target_path);
        let open = crate::open_head_from_context(&r.publish_context)?;
        // A record of a stage that did not finish (refused fs type, crash)
        // fixes nothing: this request replaces it.
        if let Some(old) = self.state.load(volume)?.filter(|o| self.staged_fully(o)) {
            if old.staging_target_path != staging {
                return Err(Error::Incompatible {
                    volume: volume.into(),
                    why: format!("already staged at {}", old.staging_target_path.display()),
                });
            }
            if old.access != access {
                return Err(Error::Incompatible {
                    volume: volume.into(),
                    why: format!("already staged as {:?}, asked for {access:?}", old.access),
                });
            }
        }
        let fuse_file = self.expose(volume, &open).await?;
        let record = Staged {
            volume_id: volume.into(),
            staging_target_path: staging.to_path_buf(),
            access: access.clone(),
            fuse_file: fuse_file.clone(),
            open_head: crate::encode_open_head(&open),
        };
        // Recorded before the device exists, so an unstage after a crash
        // here finds what to undo.
        self.state.save(&record)?;
        let device = device::attach(&fuse_file).await?;
        std::fs::create_dir_all(staging).map_err(|source| Error::Io {
            what: "creating",
            path: staging.into(),
            source,
        })?;
        let Access::Mount { fs_type, flags } = access else {
            // A raw block volume: the device is the staged state; the
            // staging directory stays empty.
            return Ok(());
        };
        if let Some(m) = mount::mounted_at(staging) {
            if Some(&m.device) == mount::device_number(&device).as_ref() {
                return Ok(());
            }
            return Err(Error::Incompatible {
                volume: volume.into(),
                why: format!(
                    "something else ({}) is mounted at the staging path {}",
                    m.source.display(),
                    staging.display()
                ),
            });
        }
        match mount::probe(&device).await? {
            None => {
                tracing::info!(volume, device = %device.display(), fs = fs_type.as_str(), "formatting the empty volume");
                mount::mkfs(fs_type, &device).await?;
            }
            Some(found) if found == fs_type.as_str() => {}
            Some(found) => {
                return Err(Error::FsMismatch {
                    volume: volume.into(),
                    device,
                    found,
                    wanted: fs_type.as_str(),
                });
            }
        }
        mount::mount(&device, staging, Some(fs_type.as_str()), &flags).await?;
        tracing::info!(volume, device = %device.display(), staging = %staging.display(), "staged");
        Ok(())
    }

    async fn unstage(&self, volume: &str, staging: &Path) -> Result<(), Error> {
        let Some(record) = self.state.load(volume)? else {
            mount::umount(staging).await?;
            return Ok(());
        };
        if record.staging_target_path != staging {
            return Err(Error::Incompatible {
                volume: volume.into(),
                why: format!(
                    "it is staged at {}, not at {}",
                    record.staging_target_path.display(),
                    staging.display()
                ),
            });
        }
        // Still in a pod: the device bound (raw block) or its filesystem
        // mounted anywhere but the staging path (bind mounts of it).
        let mounts = mount::mounts();
        let mut busy = Vec::new();
        for d in device::backed_by(&record.fuse_file) {
            let number = mount::device_number(&d);
            busy.extend(mount::node_binds(&d));
            busy.extend(
                mounts
                    .iter()
                    .filter(|m| Some(&m.device) == number.as_ref() && m.mountpoint != staging)
                    .map(|m| m.mountpoint.clone()),
            );
        }
        if !busy.is_empty() {
            let at: Vec<String> = busy.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::Precondition {
                volume: volume.into(),
                why: format!("still published at {}: unpublish it first", at.join(", ")),
            });
        }
        mount::umount(staging).await?;
        device::detach(&record.fuse_file).await?;
        self.state.remove(volume)?;
        tracing::info!(volume, staging = %staging.display(), "unstaged");
        Ok(())
    }

    async fn publish(
        &self,
        r: &csi::NodePublishVolumeRequest,
        access: Access,
    ) -> Result<(), Error> {
        let volume = r.volume_id.as_str();
        let (staging, target) = (Path::new(&r.staging_target_path), Path::new(&r.target_path));
        let record = self.staged(volume)?;
        if record.staging_target_path != staging {
            return Err(Error::Precondition {
                volume: volume.into(),
                why: format!(
                    "it is staged at {}, not at {}",
                    record.staging_target_path.display(),
                    staging.display()
                ),
            });
        }
        if std::mem::discriminant(&record.access) != std::mem::discriminant(&access) {
            return Err(Error::Precondition {
                volume: volume.into(),
                why: format!("it is staged as {:?}, asked to publish as {access:?}", record.access),
            });
        }
        let source = match &record.access {
            Access::Mount { .. } => {
                if mount::mounted_at(staging).is_none() {
                    return Err(Error::Precondition {
                        volume: volume.into(),
                        why: format!(
                            "nothing is mounted at its staging path {}: stage it again",
                            staging.display()
                        ),
                    });
                }
                staging.to_path_buf()
            }
            Access::Block if r.readonly => device::attach_read_only(&record.fuse_file).await?,
            Access::Block => self.device_of(&record)?,
        };
        if let Some(m) = mount::mounted_at(target) {
            if m.read_only() != r.readonly {
                return Err(Error::Incompatible {
                    volume: volume.into(),
                    why: format!(
                        "already published at {} {}",
                        target.display(),
                        if m.read_only() { "read-only" } else { "read-write" }
                    ),
                });
            }
            return Ok(());
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        match &record.access {
            Access::Mount { .. } => {
                std::fs::create_dir_all(target).map_err(io("creating", target))?
            }
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
                }
                if !target.exists() {
                    std::fs::File::create(target).map_err(io("creating", target))?;
                }
            }
        }
        mount::bind(&source, target, r.readonly).await?;
        tracing::info!(volume, target = %target.display(), readonly = r.readonly, "published");
        Ok(())
    }

    async fn unpublish(&self, volume: &str, target: &Path) -> Result<(), Error> {
        let bound = mount::mounted_at(target).and_then(|m| mount::bound_device(&m));
        mount::umount(target).await?;
        let removed = match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|source| Error::Io { what: "removing", path: target.into(), source })?;
        // A read-only device made for this publish goes with its last one.
        if let (Some(device), Some(record)) = (bound, self.state.load(volume)?)
            && device::read_only(&device)
            && mount::node_binds(&device).is_empty()
        {
            device::detach_one(&device, &record.fuse_file).await?;
        }
        tracing::info!(volume, target = %target.display(), "unpublished");
        Ok(())
    }

    /// Whether a record's stage finished: its filesystem mounted at the
    /// staging path, or for raw block its device attached.
    fn staged_fully(&self, record: &Staged) -> bool {
        let device = self.device_of(record).ok();
        match &record.access {
            Access::Block => device.is_some(),
            Access::Mount { .. } => device.is_some_and(|d| {
                mount::mounted_at(&record.staging_target_path)
                    .is_some_and(|m| Some(m.device) == mount::device_number(&d))
            }),
        }
    }

    /// The record of a volume staged here; NOT_FOUND otherwise.
    fn staged(&self, volume: &str) -> Result<Staged, Error> {
        self.state.load(volume)?.ok_or_else(|| Error::NotStaged { volume: volume.into() })
    }

    /// The (writable) loop device of a staged volume.
    fn device_of(&self, record: &Staged) -> Result<PathBuf, Error> {
        let devices = device::backed_by(&record.fuse_file);
        devices.into_iter().find(|d| !device::read_only(d)).ok_or_else(|| Error::Precondition {
            volume: record.volume_id.clone(),
            why: format!("no loop device serves {}: stage it again", record.fuse_file.display()),
        })
    }

    /// The head's condition as the local agent reports it.
    async fn condition(&self, record: &Staged) -> csi::VolumeCondition {
        let open = match crate::decode_open_head(&record.open_head) {
            Ok(o) => o,
            Err(e) => return abnormal(format!("the staged record's head request: {e}")),
        };
        let mut req = Request::new(pb::HeadStatusRequest { volume_id: open.volume_id.clone() });
        req.set_timeout(Duration::from_secs(10));
        match self.heads().get_head_status(req).await {
            Ok(s) => health::condition(&open, &s.into_inner()),
            Err(s) if s.code() == Code::NotFound => abnormal(format!(
                "the head is not open on the local agent {}",
                self.config.agent_endpoint
            )),
            Err(s) => abnormal(format!(
                "the local agent {} does not answer: {}",
                self.config.agent_endpoint,
                s.message()
            )),
        }
    }

    async fn stats(
        &self,
        volume: &str,
        path: &str,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Error> {
        let record = self.staged(volume)?;
        let p = Path::new(path);
        let not_found = || Error::PathNotFound { path: path.into() };
        if !p.is_absolute() {
            return Err(not_found());
        }
        std::fs::metadata(p).map_err(|_| not_found())?;
        let usage = match &record.access {
            Access::Block => {
                let size = device::size(&self.device_of(&record)?).unwrap_or(0) as i64;
                vec![usage(csi::volume_usage::Unit::Bytes, 0, size, 0)]
            }
            Access::Mount { .. } => {
                let st = mount::statvfs(p).map_err(|source| Error::Io {
                    what: "statvfs",
                    path: p.into(),
                    source,
                })?;
                let frsize = st.f_frsize as i64;
                let (total, free, avail) = (
                    st.f_blocks as i64 * frsize,
                    st.f_bfree as i64 * frsize,
                    st.f_bavail as i64 * frsize,
                );
                vec![
                    usage(csi::volume_usage::Unit::Bytes, avail, total, total - free),
                    usage(
                        csi::volume_usage::Unit::Inodes,
                        st.f_favail as i64,
                        st.f_files as i64,
                        st.f_files as i64 - st.f_ffree as i64,
                    ),
                ]
            }
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(self.condition(&record).await),
        })
    }

    async fn expand(&self, volume: &str, path: &str, required: i64) -> Result<i64, Error> {
        let record = self.staged(volume)?;
        let p = Path::new(path);
        if !p.is_absolute() || !p.exists() {
            return Err(Error::PathNotFound { path: path.into() });
        }
        let device = self.device_of(&record)?;
        device::refresh(&device).await?;
        let size = device::size(&device).unwrap_or(0);
        if required > 0 && size < required as u64 {
            return Err(Error::Precondition {
                volume: volume.into(),
                why: format!(
                    "the volume's head serves {size} bytes, less than the {required} asked for: grow the volume first (ControllerExpandVolume)"
                ),
            });
        }
        if let Access::Mount { fs_type, .. } = &record.access {
            mount::grow(*fs_type, &device, &record.staging_target_path).await?;
        }
        tracing::info!(volume, size, "expanded");
        Ok(size as i64)
    }
}

fn abnormal(message: String) -> csi::VolumeCondition {
    csi::VolumeCondition { abnormal: true, message }
}

fn usage(unit: csi::volume_usage::Unit, available: i64, total: i64, used: i64) -> csi::VolumeUsage {
    csi::VolumeUsage { available, total, used, unit: unit as i32 }
}

fn rpc(t: Type) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc {
            r#type: t as i32,
        })),
    }
}

/// What the node plugins offer. EXPAND_VOLUME is not among them: volumes
/// cannot grow yet (see docs/design.md), so the CO never has a larger
/// volume to grow the filesystem to. NodeExpandVolume itself works (it
/// grows the filesystem to the device) for when growth lands.
pub const CAPABILITIES: [Type; 3] =
    [Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeCondition];

/// [`CAPABILITIES`] as NodeGetCapabilities answers them: the node plugins
/// and the controller (for csi-resizer, which asks the controller's
/// socket) answer the same.
pub fn capabilities() -> csi::NodeGetCapabilitiesResponse {
    csi::NodeGetCapabilitiesResponse { capabilities: CAPABILITIES.into_iter().map(rpc).collect() }
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume = crate::volume_id(&r.volume_id)?;
        crate::path("staging_target_path", &r.staging_target_path)?;
        let access = capability::access(r.volume_capability.as_ref())?;
        let _running = self.operations.begin(volume, "NodeStageVolume")?;
        self.stage(&r, access).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume = crate::volume_id(&r.volume_id)?;
        let staging = crate::path("staging_target_path", &r.staging_target_path)?;
        let _running = self.operations.begin(volume, "NodeUnstageVolume")?;
        self.unstage(volume, &staging).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume = crate::volume_id(&r.volume_id)?;
        crate::path("target_path", &r.target_path)?;
        let access = capability::access(r.volume_capability.as_ref())?;
        crate::path("staging_target_path", &r.staging_target_path)?;
        let _running = self.operations.begin(volume, "NodePublishVolume")?;
        self.publish(&r, access).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume = crate::volume_id(&r.volume_id)?;
        let target = crate::path("target_path", &r.target_path)?;
        let _running = self.operations.begin(volume, "NodeUnpublishVolume")?;
        self.unpublish(volume, &target).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let volume = crate::volume_id(&r.volume_id)?;
        if r.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_path is required"));
        }
        Ok(Response::new(self.stats(volume, &r.volume_path).await?))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume = crate::volume_id(&r.volume_id)?;
        if r.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_path is required"));
        }
        if r.volume_capability.is_some() {
            capability::access(r.volume_capability.as_ref())?;
        }
        let required = r.capacity_range.map(|c| c.required_bytes).unwrap_or(0);
        if required < 0 {
            return Err(Status::invalid_argument("capacity_range.required_bytes is negative"));
        }
        let _running = self.operations.begin(volume, "NodeExpandVolume")?;
        let capacity_bytes = self.expand(volume, &r.volume_path, required).await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse { capacity_bytes }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(
                    crate::TOPOLOGY_CLUSTER_KEY.to_string(),
                    self.config.storage_cluster.clone(),
                )]),
            }),
        }))
    }
}
