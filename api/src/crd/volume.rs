//! `Volume`: a replicated block device on one storage cluster, `Primary`
//! (written by pods) or `Remote` (written only by copies from another
//! site). The schema keeps the size growing, the cluster fixed and a
//! Remote volume unattachable; the status holds a compact placement (agent
//! list + layout version, never a per-chunk list) and a bounded snapshot
//! list.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use crate::{agent::v1 as pb, placement::PlacementAgent};

/// The most snapshots `status.snapshots` may list (the API server refuses
/// a longer list): retention must keep fewer.
pub const MAX_STATUS_SNAPSHOTS: usize = 1024;

/// Set on a Volume while a switchover changes its role: the Volume
/// reconciler then neither promotes nor demotes it, and the CSI controller
/// does not publish it. The value names the RemoteLink and its request
/// (`<link>/<request>`).
pub const ROLE_HOLD: &str = "cairn.dev/role-hold";

/// The id a new volume gets at the agents: `<namespace>-<name>-<tag>`,
/// the tag 8 hex digits of the BLAKE3 of the object's uid, when that is a
/// valid id (a DNS label), else `v-` and 24 hex digits of the BLAKE3 of
/// `<namespace>/<name>/<uid>`. The uid makes it unique: `shop/db-main` and
/// `shop-db/main` read alike but differ in their tags, and a Volume deleted
/// and created again under its name never meets replicas of the old one
/// that an agent down at the deletion kept. Chosen once, at the first
/// placement, and kept in `status.volumeId` (`Volume::agent_volume_id`);
/// Volumes placed before the tag existed keep their recorded
/// `<namespace>-<name>`.
pub fn volume_id(namespace: &str, name: &str, uid: &str) -> String {
    let tag = blake3::hash(uid.as_bytes()).to_hex();
    let plain = format!("{namespace}-{name}-{}", &tag[..8]);
    if plain.len() <= 63 && crate::VolumeId::new(&plain).is_ok() {
        return plain;
    }
    let h = blake3::hash(format!("{namespace}/{name}/{uid}").as_bytes()).to_hex();
    format!("v-{}", &h[..24])
}

/// Condition types of a `Volume`.
pub mod condition {
    /// Placed, every chunk has an in-sync replica, and the role in the spec
    /// is the role at the head.
    pub const READY: &str = "Ready";
    /// Some replica is out of sync (the volume serves with fewer copies).
    pub const DEGRADED: &str = "Degraded";
    /// A replica is being rebuilt (see `status.replicas[].rebuild`).
    pub const REBUILDING: &str = "Rebuilding";
    /// A volume with `spec.source` holds its source's content (False while
    /// the copy has not sealed: the head stays Remote, nothing attaches).
    pub const RESTORED: &str = "Restored";
}

/// A Cairn volume: a block device of `sizeBytes` on a storage cluster,
/// striped in chunks with `replicas` copies each.
// clippy takes the printer columns' repeated `type_ = ...` for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    derive = "PartialEq",
    shortname = "cvol",
    category = "cairn",
    doc = "A Cairn volume: a replicated block device on a storage cluster, Primary or Remote.",
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(
        name = "Size",
        type_ = "string",
        json_path = ".status.size",
        description = "The size the volume has now (it grows to spec.sizeBytes)"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Head",
        type_ = "string",
        json_path = ".status.head.node",
        description = "The node serving the volume's I/O"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.role != 'Remote' || !has(self.attachable) || !self.attachable",
        "message": "a Remote volume is never attachable: remove attachable (or set it to false), or promote the volume first with role: Primary"
    },
    {
        "rule": "!has(self.attachedNode) || (self.role == 'Primary' && (!has(self.attachable) || self.attachable))",
        "message": "attachedNode is set only on an attachable Primary volume: unpublish it (remove attachedNode) before demoting it or setting attachable: false"
    },
    {
        "rule": "has(self.source) == has(oldSelf.source)",
        "message": "source is set only when a volume is created: to restore or clone into an existing volume, create a new Volume with the source and delete this one"
    }
]))]
pub struct VolumeSpec {
    /// The `StorageCluster` the volume lives on. Fixed at creation.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self == oldSelf",
                "message": "cluster cannot change: a volume stays on its storage cluster; copy it to another one with a RemoteLink"
            }
        ])
    )]
    pub cluster: String,
    /// Size in bytes: a multiple of 4096, at most 1 PiB. It can grow, never
    /// shrink.
    #[schemars(
        range(min = 4096, max = 1125899906842624_i64),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self % 4096 == 0",
                "message": "sizeBytes must be a multiple of 4096 (the block size), e.g. 10737418240 for 10 GiB"
            },
            {
                "rule": "self >= oldSelf",
                "message": "sizeBytes can only grow: to get a smaller volume, create a new one and copy the data"
            }
        ])
    )]
    pub size_bytes: i64,
    /// Copies of each chunk, on distinct agents (1 to 5). Unset: the
    /// cluster's `defaults.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: Option<i32>,
    /// `Primary` (pods write it; its snapshots are copied) or `Remote` (a
    /// copy target: only copies write it). Set `Primary` on a Remote volume
    /// to fail over to it; `Remote` on a Primary demotes it.
    #[serde(default)]
    pub role: VolumeRole,
    /// Whether pods may attach the volume. Unset: a Primary volume is, a
    /// Remote one is not (and cannot be made so). `false` on a Primary
    /// keeps pods off it, e.g. before a switchover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachable: Option<bool>,
    /// The node whose pods use the volume, set by the CSI driver at
    /// ControllerPublishVolume (unset at unpublish): the head moves to the
    /// agent on that node, with a higher epoch, so the node it leaves can no
    /// longer write. Unset: the operator places the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub attached_node: Option<String>,
    /// What the volume starts with: a snapshot of another volume (a
    /// restore) or another volume as it is now (a clone). The operator
    /// copies it in full before the volume takes any write (condition
    /// `Restored`); unset: the volume starts empty. Fixed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The field's rules replace the type's, so both are here.
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "has(self.snapshot) != has(self.volume)",
            "message": "source names exactly one of snapshot (a restore) or volume (a clone)"
        },
        {
            "rule": "self == oldSelf",
            "message": "source cannot change: a volume is restored once, when it is created; create another Volume for another source"
        }
    ]))]
    pub source: Option<ContentSource>,
}

/// Where a new volume's content comes from: exactly one of `snapshot` and
/// `volume` (the rule is on `VolumeSpec::source`), in the volume's
/// namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentSource {
    /// Restore: the snapshot `snapshot` of Volume `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRef>,
    /// Clone: Volume `name` as it is when the copy starts (the operator
    /// takes a snapshot of it for the copy and deletes it afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeRef>,
}

/// A snapshot of a Volume in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRef {
    /// The Volume the snapshot is of.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub volume: String,
    /// The snapshot's id (as `status.snapshots[].id` lists it).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub snapshot: String,
}

/// A Volume in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
}

impl ContentSource {
    /// The source Volume's name.
    pub fn volume_name(&self) -> &str {
        match (&self.snapshot, &self.volume) {
            (Some(s), _) => &s.volume,
            (None, Some(v)) => &v.name,
            (None, None) => "",
        }
    }
}

impl VolumeSpec {
    /// Whether the volume may be attached now, by its spec.
    pub fn is_attachable(&self) -> bool {
        self.role == VolumeRole::Primary && self.attachable.unwrap_or(true)
    }
}

impl Volume {
    /// Whether the volume still waits for its `spec.source` to be copied
    /// in: it has a source and no `Restored=True` condition. Until then
    /// its head is opened Remote (only the restore's copy writes it).
    pub fn restoring(&self) -> bool {
        self.spec.source.is_some()
            && !self.status.as_ref().is_some_and(|st| {
                st.conditions.iter().any(|c| {
                    c.type_ == condition::RESTORED && c.status == super::ConditionStatus::True
                })
            })
    }

    /// The volume's id at the agents: the one recorded in status, else
    /// the one [`volume_id`] gives it now.
    pub fn agent_volume_id(&self) -> String {
        if let Some(id) = self.status.as_ref().and_then(|s| s.volume_id.clone()) {
            return id;
        }
        let meta = &self.metadata;
        let (ns, name) = (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref());
        volume_id(ns, name.unwrap_or(""), meta.uid.as_deref().unwrap_or(""))
    }

    /// The role the head is opened with and kept at: `Remote` while
    /// restoring, else `spec.role`.
    pub fn head_role(&self) -> VolumeRole {
        if self.restoring() { VolumeRole::Remote } else { self.spec.role }
    }
}

/// A volume's role.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumeRole {
    /// Pods read and write it; it is copied to remote volumes.
    #[default]
    Primary,
    /// A copy of a primary at another site: only copies write it; never
    /// attached.
    Remote,
}

impl From<VolumeRole> for pb::VolumeRole {
    fn from(role: VolumeRole) -> Self {
        match role {
            VolumeRole::Primary => pb::VolumeRole::Primary,
            VolumeRole::Remote => pb::VolumeRole::Remote,
        }
    }
}

/// Where a volume is and how it is doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// `Pending` (not placed yet), `Ready`, `Degraded` (serving with a
    /// replica out of sync) or `Failed` (a chunk has no in-sync replica).
    #[serde(default)]
    pub phase: VolumePhase,
    /// The volume's id at the agents, chosen by the operator when it first
    /// places the volume (names are per namespace, ids per cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// The size the volume has now, in bytes (below `spec.sizeBytes` while
    /// it grows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// `sizeBytes` for people, e.g. `10Gi` (the Size column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// The role the head has now (differs from `spec.role` during a
    /// promotion or demotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<VolumeRole>,
    /// The layout every party computes chunk -> agents from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Where the volume's I/O is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadLocation>,
    /// The volume's snapshots, oldest first (divergent ones included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub snapshots: Vec<VolumeSnapshot>,
    /// Replica health, one entry per agent holding chunks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1024),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["agent"])
    )]
    pub replicas: Vec<ReplicaStatus>,
    /// `Ready`, `Degraded`, `Rebuilding`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A volume's phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    #[default]
    Pending,
    Ready,
    Degraded,
    Failed,
}

/// The compact layout of a volume: `cairn_api::placement::place(agents,
/// replicas, chunks, layoutVersion)` gives every chunk's replicas. Changed
/// only by the operator, with a new layout version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The agents the chunks are placed over (order does not matter).
    #[schemars(length(max = 1024))]
    pub agents: Vec<PlacedAgent>,
    /// Replicas of each chunk.
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// The chunk size the volume was created with.
    pub chunk_size_bytes: i64,
    /// Bumped whenever the agent list changes.
    #[schemars(range(min = 0))]
    pub layout_version: i64,
}

/// An agent of a placement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacedAgent {
    pub name: String,
    /// Its failure domain when placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

impl From<&PlacedAgent> for PlacementAgent {
    fn from(a: &PlacedAgent) -> Self {
        PlacementAgent::new(a.name.clone(), a.domain.as_deref())
    }
}

/// Where a volume's head runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeadLocation {
    /// The agent serving the head.
    pub agent: String,
    /// Its node (the Head column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The head's epoch: replicas refuse writes of any lower one.
    #[schemars(range(min = 0))]
    pub epoch: i64,
}

/// One snapshot of a volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshot {
    /// The snapshot id (a DNS label), the same at every site.
    #[schemars(length(min = 1, max = 63))]
    pub id: String,
    /// Its generation: higher than every earlier snapshot's.
    #[schemars(range(min = 0))]
    pub generation: i64,
    /// The volume digest as of the snapshot: 64 lowercase hex digits.
    #[schemars(length(min = 64, max = 64), regex(pattern = r"^[0-9a-f]{64}$"))]
    pub digest: String,
    /// When it was sealed.
    pub created_at: Time,
    /// A resync rolled the volume back past it: kept, out of the volume's
    /// line of snapshots, until someone deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub divergent: bool,
    /// The `SnapshotSchedule` that took it (unset: taken on request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

/// How one agent's replica of a volume is doing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub agent: String,
    /// `InSync`, `OutOfSync` (missed writes; rebuilt later) or `Rebuilding`.
    pub health: ReplicaHealth,
    /// Chunks of the volume this agent holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<i64>,
    /// Why it is out of sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set while the replica is rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildProgress>,
    /// How the last rebuild ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<String>,
}

/// A replica's health.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReplicaHealth {
    InSync,
    OutOfSync,
    Rebuilding,
}

/// A rebuild under way (the agent's `RebuildProgress`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildProgress {
    /// `Layers` (copying snapshots), `Head` (copying the head while writes
    /// reach the replica too) or `Verify` (comparing digests).
    pub phase: RebuildPhase,
    pub layers_done: i64,
    pub layers_total: i64,
    /// Bytes of block data copied so far.
    pub bytes_done: i64,
    pub head_blocks_done: i64,
    pub head_blocks_total: i64,
    /// When the rebuild started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
}

/// The phase of a rebuild.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RebuildPhase {
    Layers,
    Head,
    Verify,
}
