//! The CSI Controller service: a `Volume` object for each CSI volume, the
//! head moved to the pod's node at publish, snapshots at the head.
//!
//! It keeps no state of its own: the `Volume` objects in `--namespace`
//! (the CSI volume_id is the object's name) are the record, written with
//! field manager `cairn-csi`; the operator does the rest (placement, the
//! head, replicas). Agents are reached only for snapshots and for the copy
//! that restores or clones into a new volume (`content_source`).
//!
//! Contract with the node service (see `crate::publish_context`):
//! ControllerPublishVolume sets `spec.attachedNode`, waits until the
//! operator has opened the head on that node's agent (fuse=false) one epoch
//! up, and returns `publish_context` of the OpenHead request the operator
//! used (`cairn_client::head::desired`).
//!
//! Invariants: every RPC is idempotent and takes the volume's slot in
//! [`Operations`] (a concurrent call on the same volume is `ABORTED`); every
//! failure is one [`Error`] variant, mapped to its CSI code in one
//! exhaustive match.

mod capacity;
pub mod content_source;
mod page;
pub mod parameters;
mod publish;
pub mod snapshot;
mod volume;

use std::{fmt, sync::Arc, time::Duration};

use cairn_api::{
    crd::{StorageCluster, Volume, find_condition, volume::condition},
    csi::v1::{self as csi, controller_server::Controller},
};
use cairn_client::{AgentApi, AgentError, GrpcAgents};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use tonic::{Code, Request, Response, Status, transport::ClientTlsConfig};

use crate::operation::Operations;
use csi::controller_service_capability::{self, rpc::Type};

/// The field manager of every write the controller makes.
pub const MANAGER: &str = "cairn-csi";
/// The label on every Volume the controller creates (what ListVolumes
/// lists).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "cairn-csi");
/// Annotations the controller keeps on its Volumes.
pub mod annotation {
    /// The CSI name, when it is not a Kubernetes name (the object is then
    /// named by its hash).
    pub const CSI_NAME: &str = "csi.cairn.dev/name";
    /// The PVC and PV the volume was provisioned for (with
    /// external-provisioner's `--extra-create-metadata`).
    pub const PVC_NAME: &str = "csi.cairn.dev/pvc-name";
    pub const PVC_NAMESPACE: &str = "csi.cairn.dev/pvc-namespace";
    pub const PV_NAME: &str = "csi.cairn.dev/pv-name";
    /// How the volume was created to be used: `mount`, `block` or both
    /// (comma-separated).
    pub const ACCESS: &str = "csi.cairn.dev/access";
    /// The filesystem of a mount volume (`ext4`, `xfs`).
    pub const FS_TYPE: &str = "csi.cairn.dev/fs-type";
    /// The snapshots taken through CSI (comma-separated agent snapshot
    /// ids): written before the snapshot is taken, removed after it is
    /// deleted, so it lists at least every CSI snapshot that exists.
    pub const SNAPSHOTS: &str = "csi.cairn.dev/snapshots";
    /// `true` when the volume was published read-only.
    pub const READONLY: &str = "csi.cairn.dev/readonly";
    /// Where a restored or cloned volume's content comes from:
    /// `snapshot:<CSI snapshot id>` or `volume:<volume>` (see
    /// `content_source::Source::annotation`).
    pub const CONTENT_SOURCE: &str = "csi.cairn.dev/content-source";
}
/// Volume context keys of CreateVolume's answer.
pub const CONTEXT_CLUSTER: &str = "cluster";
pub const CONTEXT_FS_TYPE: &str = "fsType";
/// How often a wait looks at the Volume again.
pub const POLL: Duration = Duration::from_millis(500);

/// What the controller is started with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where `Volume` objects for PVCs are created.
    pub namespace: String,
    /// How long CreateVolume waits for a new volume to be ready, and
    /// ControllerPublishVolume for the head to reach the node.
    pub ready_timeout: Duration,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no Kubernetes client configuration (in-cluster or kubeconfig): {0}; run the controller in a pod with its service account (the Helm chart does), or point KUBECONFIG at a kubeconfig"
    )]
    Kube(#[from] kube::Error),
}

/// Why a Controller RPC failed. Each variant has one CSI code (see the
/// `From<Error> for Status` match).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(
        "storage cluster {cluster} does not exist: fix the StorageClass parameter cluster (kubectl get storageclusters)"
    )]
    ClusterNotFound { cluster: String },
    #[error(
        "storage cluster {cluster} is not in the requisite topology: the pod's node cannot reach it (the StorageClass names another cluster than the node's topology.cairn.dev/cluster)"
    )]
    NotInTopology { cluster: String },
    #[error("{0}")]
    OutOfRange(String),
    #[error("volume {volume} does not exist in namespace {namespace}")]
    VolumeNotFound { volume: String, namespace: String },
    #[error("snapshot {snapshot} does not exist")]
    SnapshotNotFound { snapshot: String },
    #[error(
        "node {node} has no agent of storage cluster {cluster} that answers: run the pod on a node of the cluster (the StorageClass topology does this), or bring that node's agent back"
    )]
    NodeNotFound { node: String, cluster: String },
    #[error("volume {volume} exists and does not match the request: {why}")]
    Incompatible { volume: String, why: String },
    #[error("snapshot name {name:?} is taken by snapshot {id} of volume {volume}")]
    SnapshotNameTaken { name: String, id: String, volume: String },
    #[error("volume {volume} cannot be attached: {why}")]
    NotAttachable { volume: String, why: String },
    #[error(
        "volume {volume} is published to node {node}: a Cairn volume is attached to one node at a time; unpublish it there first"
    )]
    PublishedElsewhere { volume: String, node: String },
    #[error(
        "volume {volume} is a Remote volume (a copy target): its snapshots come from its primary over a RemoteLink; snapshot the primary"
    )]
    RemoteSnapshot { volume: String },
    #[error(
        "volume {volume} is published to node {node}: it can be deleted once it is unpublished"
    )]
    Attached { volume: String, node: String },
    #[error(
        "volume {volume} has snapshots taken through CSI ({}), which live inside the volume and would go with it: delete those VolumeSnapshots first",
        ids.join(", ")
    )]
    HasSnapshots { volume: String, ids: Vec<String> },
    #[error(
        "volume {volume} is in a switchover ({hold}, RemoteLink/request): its role changes; retry when it is done"
    )]
    RoleHeld { volume: String, hold: String },
    /// Another operation holds a volume this one needs (a clone's source).
    #[error("{0}")]
    Busy(String),
    #[error("volume {volume} is being deleted: retry when it is gone")]
    Deleting { volume: String },
    #[error("volume {volume} is not placed yet (no head): retry when it is Ready")]
    NotPlaced { volume: String },
    #[error(
        "volume {volume}: its head is on agent {agent}, which its storage cluster does not list: retry when the operator has moved the head"
    )]
    HeadUnknown { volume: String, agent: String },
    #[error("volume {volume}: its head is still moving to node {node}: retry")]
    HeadMoving { volume: String, node: String },
    #[error("volume {volume}: {what} not done after {waited:?}: {why}")]
    Timeout { volume: String, what: &'static str, waited: Duration, why: String },
    #[error(
        "starting_token {0:?} is not a token of this listing (or the listing shrank): start again without one"
    )]
    BadToken(String),
    #[error(
        "volume growth is not supported by Cairn yet (a volume's chunk placement depends on its chunk count): create a larger volume and copy the data"
    )]
    GrowthNotSupported,
    #[error("the Kubernetes API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Missing(_) | Error::Invalid { .. } | Error::ClusterNotFound { .. } => {
                Code::InvalidArgument
            }
            Error::NotInTopology { .. } => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::VolumeNotFound { .. }
            | Error::SnapshotNotFound { .. }
            | Error::NodeNotFound { .. } => Code::NotFound,
            Error::Incompatible { .. } | Error::SnapshotNameTaken { .. } => Code::AlreadyExists,
            Error::NotAttachable { .. }
            | Error::PublishedElsewhere { .. }
            | Error::Attached { .. }
            | Error::RemoteSnapshot { .. }
            | Error::HasSnapshots { .. } => Code::FailedPrecondition,
            Error::RoleHeld { .. }
            | Error::NotPlaced { .. }
            | Error::HeadUnknown { .. }
            | Error::HeadMoving { .. } => Code::Unavailable,
            Error::Deleting { .. } | Error::Busy(_) | Error::BadToken(_) => Code::Aborted,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::GrowthNotSupported => Code::Unimplemented,
            // A write raced another (409): the CO retries. The schema or a
            // CEL rule refused it (422): the message says why. Anything
            // else: the API server could not be reached or answered badly.
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => Code::Aborted,
            Error::Kube(kube::Error::Api(s)) if s.code == 422 => Code::FailedPrecondition,
            Error::Kube(_) => Code::Unavailable,
            // Agents' codes already mean what CSI means.
            Error::Agent(a) => a.code,
        };
        Status::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The Controller service.
#[derive(Clone)]
pub struct ControllerService {
    config: ControllerConfig,
    client: Client,
    agents: Arc<dyn AgentApi>,
    ops: Operations,
}

impl fmt::Debug for ControllerService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerService")
            .field("config", &self.config)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl ControllerService {
    /// The service over a Kubernetes client and the agents (tests give
    /// kube's mocked API server and `FakeAgents`).
    pub fn new(config: ControllerConfig, client: Client, agents: Arc<dyn AgentApi>) -> Self {
        ControllerService { config, client, agents, ops: Operations::default() }
    }

    /// The service over the usual Kubernetes configuration (in-cluster or
    /// kubeconfig) and the agents over gRPC (`tls` for https:// agents).
    pub async fn connect(
        config: ControllerConfig,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, StartError> {
        let client = Client::try_default().await?;
        Ok(Self::new(config, client, Arc::new(GrpcAgents::new(tls))))
    }

    pub fn into_server(self) -> csi::controller_server::ControllerServer<Self> {
        csi::controller_server::ControllerServer::new(self)
    }

    fn volumes(&self) -> Api<Volume> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn clusters(&self) -> Api<StorageCluster> {
        Api::all(self.client.clone())
    }

    fn not_found(&self, volume: &str) -> Error {
        Error::VolumeNotFound { volume: volume.into(), namespace: self.config.namespace.clone() }
    }

    /// The Volume named `name`; `NOT_FOUND` when there is none.
    async fn volume(&self, name: &str) -> Result<Volume> {
        self.volumes().get_opt(name).await?.ok_or_else(|| self.not_found(name))
    }

    /// A merge patch of Volume `name` under the controller's field manager.
    async fn merge(&self, name: &str, patch: serde_json::Value) -> Result<Volume> {
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        Ok(self.volumes().patch(name, &params, &Patch::Merge(&patch)).await?)
    }

    /// Looks at Volume `name` every [`POLL`] until `done` holds, up to the
    /// ready timeout; then `DEADLINE_EXCEEDED` with what its Ready
    /// condition says (the CO retries the call, which waits again).
    async fn wait(
        &self,
        name: &str,
        what: &'static str,
        done: impl Fn(&Volume) -> bool,
    ) -> Result<Volume> {
        let deadline = tokio::time::Instant::now() + self.config.ready_timeout;
        loop {
            let vol = self.volume(name).await?;
            if done(&vol) {
                return Ok(vol);
            }
            if tokio::time::Instant::now() + POLL > deadline {
                return Err(Error::Timeout {
                    volume: name.into(),
                    what,
                    waited: self.config.ready_timeout,
                    why: not_ready_because(&vol),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Whether the operator has seen the Volume's latest spec.
pub fn observed(vol: &Volume) -> bool {
    let seen = vol.status.as_ref().and_then(|s| s.observed_generation);
    match (seen, vol.meta().generation) {
        (Some(seen), Some(generation)) => seen >= generation,
        (_, None) => vol.status.is_some(),
        (None, Some(_)) => false,
    }
}

/// What a Volume's status says about why it is not there yet.
pub fn not_ready_because(vol: &Volume) -> String {
    let Some(st) = vol.status.as_ref() else {
        return "the operator has not reported on it yet (is cairn-operator running?)".into();
    };
    let phase = format!("phase {:?}", st.phase);
    match find_condition(&st.conditions, condition::READY) {
        Some(c) if !c.message.is_empty() => format!("{phase}, {}: {}", c.reason, c.message),
        Some(c) => format!("{phase}, {}", c.reason),
        None => phase,
    }
}

/// The comma-separated list in annotation `key`.
pub fn annotation_list(vol: &Volume, key: &str) -> Vec<String> {
    let value = vol.meta().annotations.as_ref().and_then(|a| a.get(key));
    value.map_or_else(Vec::new, |v| {
        v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
    })
}

fn rpc(t: Type) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// What the controller offers. Not EXPAND_VOLUME (growth is not built).
pub const CAPABILITIES: [Type; 11] = [
    Type::CreateDeleteVolume,
    Type::CloneVolume,
    Type::PublishUnpublishVolume,
    Type::CreateDeleteSnapshot,
    Type::ListSnapshots,
    Type::ListVolumes,
    Type::ListVolumesPublishedNodes,
    Type::GetCapacity,
    Type::SingleNodeMultiWriter,
    Type::PublishReadonly,
    Type::GetVolume,
];

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Error::Missing("name").into());
        }
        let _op = self.ops.begin(&parameters::object_name(&req.name), "CreateVolume")?;
        let volume = self.create(req).await?;
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(volume) }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let name = crate::volume_id(&req.get_ref().volume_id)?;
        let _op = self.ops.begin(name, "DeleteVolume")?;
        self.delete(name).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, node = %req.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let name = crate::volume_id(&req.volume_id)?.to_string();
        let _op = self.ops.begin(&name, "ControllerPublishVolume")?;
        let publish_context = self.publish(&name, req).await?;
        Ok(Response::new(csi::ControllerPublishVolumeResponse { publish_context }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, node = %req.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let name = crate::volume_id(&req.volume_id)?;
        let _op = self.ops.begin(name, "ControllerUnpublishVolume")?;
        self.unpublish(name, &req.node_id).await?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(req.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Ok(Response::new(self.list(req.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        Ok(Response::new(self.capacity(req.into_inner()).await?))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES.into_iter().map(rpc).collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().source_volume_id, name = %req.get_ref().name))]
    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Error::Missing("name").into());
        }
        if req.source_volume_id.is_empty() {
            return Err(Error::Missing("source_volume_id").into());
        }
        let source = req.source_volume_id.clone();
        if crate::volume_id(&source).is_err() {
            return Err(self.not_found(&source).into());
        }
        let _op = self.ops.begin(&source, "CreateSnapshot")?;
        let snapshot = self.snapshot(&source, req).await?;
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(snapshot) }))
    }

    #[tracing::instrument(skip_all, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let id = &req.get_ref().snapshot_id;
        if id.is_empty() {
            return Err(Error::Missing("snapshot_id").into());
        }
        // An id that is not one of ours names no snapshot: deleted already.
        if let Some((volume, snapshot)) = snapshot::decode(id) {
            let _op = self.ops.begin(volume, "DeleteSnapshot")?;
            self.delete_snapshot_of(volume, snapshot).await?;
        }
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Ok(Response::new(self.list_snapshot_entries(req.into_inner()).await?))
    }

    async fn controller_expand_volume(
        &self,
        _req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Err(Error::GrowthNotSupported.into())
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let name = crate::volume_id(&req.get_ref().volume_id)?;
        let vol = self.volume(name).await?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(volume::csi_volume(&vol)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: vol.spec.attached_node.iter().cloned().collect(),
                volume_condition: Some(volume::condition_of(&vol)),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_csi_code() {
        let cases: Vec<(Error, Code)> = vec![
            (Error::Missing("name"), Code::InvalidArgument),
            (Error::SnapshotNotFound { snapshot: "pvc-0/s".into() }, Code::NotFound),
            (Error::ClusterNotFound { cluster: "x".into() }, Code::InvalidArgument),
            (Error::NotInTopology { cluster: "x".into() }, Code::ResourceExhausted),
            (Error::OutOfRange("x".into()), Code::OutOfRange),
            (Error::NodeNotFound { node: "n".into(), cluster: "c".into() }, Code::NotFound),
            (Error::Incompatible { volume: "v".into(), why: "w".into() }, Code::AlreadyExists),
            (
                Error::PublishedElsewhere { volume: "v".into(), node: "n".into() },
                Code::FailedPrecondition,
            ),
            (Error::RoleHeld { volume: "v".into(), hold: "l/r".into() }, Code::Unavailable),
            (Error::BadToken("x".into()), Code::Aborted),
            (Error::Busy("x".into()), Code::Aborted),
            (Error::GrowthNotSupported, Code::Unimplemented),
            (
                Error::Agent(AgentError {
                    endpoint: "http://a".into(),
                    code: Code::FailedPrecondition,
                    message: "link l needs it".into(),
                }),
                Code::FailedPrecondition,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{text}");
            assert_eq!(s.message(), text);
        }
        let conflict = kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict").with_code(409).boxed(),
        );
        assert_eq!(Status::from(Error::Kube(conflict)).code(), Code::Aborted);
    }
}
