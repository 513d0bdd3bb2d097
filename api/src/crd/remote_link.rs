//! `RemoteLink`: copies a volume's snapshots to a volume on another
//! storage cluster, under a bandwidth policy. One-off actions (copy now,
//! planned switchover, resync after failback) are request tokens in the
//! spec: the operator acts when a token differs from the one it last
//! handled (in the status), so each request runs once and is seen to be
//! done.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{bandwidth::BandwidthPolicy, condition::Condition};
use crate::agent::v1 as pb;

/// Condition types of a `RemoteLink`.
pub mod condition {
    /// A copy is running.
    pub const SYNCING: &str = "Syncing";
    /// The target has the source's newest snapshot.
    pub const SYNCED: &str = "Synced";
    /// Copies fail (the message says why); they are retried.
    pub const DEGRADED: &str = "Degraded";
    /// `spec.paused` is set, or the bandwidth policy holds the rate at 0.
    pub const PAUSED: &str = "Paused";
}

/// A remote copy link: the snapshots of `sourceVolume` (in this
/// namespace) are copied, oldest first, to `targetVolume` on
/// `targetCluster`.
// clippy takes the printer columns' repeated `type_ = ...` for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "RemoteLink",
    namespaced,
    status = "RemoteLinkStatus",
    derive = "PartialEq",
    shortname = "rlink",
    category = "cairn",
    doc = "A Cairn remote link: copies a volume's snapshots to a volume on another storage cluster.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.sourceVolume"),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.targetCluster",
        description = "The storage cluster the snapshots are copied to"
    ),
    printcolumn(
        name = "Target Volume",
        type_ = "string",
        json_path = ".spec.targetVolume",
        priority = 1
    ),
    printcolumn(
        name = "Last Copied",
        type_ = "string",
        json_path = ".status.lastCopiedSnapshot.id"
    ),
    printcolumn(
        name = "Lag",
        type_ = "date",
        json_path = ".status.lastCopiedSnapshot.createdAt",
        description = "Age of the newest snapshot complete at the target: the recovery point"
    ),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.copy.percent",
        description = "Percent of the running copy done"
    ),
    printcolumn(name = "Rate", type_ = "string", json_path = ".status.copy.rate")
)]
#[serde(rename_all = "camelCase")]
pub struct RemoteLinkSpec {
    /// The `Volume` copied, in this namespace. Fixed at creation.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self == oldSelf",
                "message": "sourceVolume cannot change: create another RemoteLink for another volume"
            }
        ])
    )]
    pub source_volume: String,
    /// The `StorageCluster` copied to (usually a gateway cluster: a peer
    /// site). Fixed at creation.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self == oldSelf",
                "message": "targetCluster cannot change: create another RemoteLink for another target"
            }
        ])
    )]
    pub target_cluster: String,
    /// The volume at the target cluster that receives the copies (role
    /// `Remote`). Fixed at creation.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self == oldSelf",
                "message": "targetVolume cannot change: create another RemoteLink for another target"
            }
        ])
    )]
    pub target_volume: String,
    /// How fast copies may go. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BandwidthPolicy>,
    /// Which replica a copy reads each chunk from: `Primary` (the head's
    /// own), `Replica` (one away from the head's node, to spare it) or
    /// `Auto` (in sync and least loaded).
    #[serde(default)]
    pub source_selection: SourceSelection,
    /// `Auto` (zstd while the link is held below 100 MiB/s, only for
    /// batches it shrinks), `None` or `Zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// Stop copying (a running copy stops at its next checkpoint and
    /// resumes there when unpaused).
    #[serde(default)]
    pub paused: bool,
    /// Copy now: set to a new value (e.g. the current time) to take a
    /// snapshot of the source and copy everything the target lacks. Done
    /// when `status.lastCopyRequest` equals it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub copy_request: Option<String>,
    /// Planned switchover: demote the source (sealing a final snapshot),
    /// copy what the target lacks, promote the target, then set the two
    /// Volumes' `spec.role` to match (source `Remote`, target `Primary`).
    /// Nothing acknowledged before is lost. Both Volumes carry the
    /// annotation `cairn.dev/role-hold` while it runs (their roles are not
    /// changed by anyone else meanwhile); it is gone when done. Only for a
    /// target on a cluster of this Kubernetes cluster, and refused while the
    /// source is attached to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverRequest>,
    /// Failback: set to a new value to sync a target that diverged (it was
    /// promoted and written, then demoted): it is rolled back to the newest
    /// snapshot both sides share, its later snapshots are kept marked
    /// divergent, and only the source's later snapshots are copied. Done
    /// when `status.lastResyncRequest` equals it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub resync_request: Option<String>,
}

/// A request for a planned switchover.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverRequest {
    /// Any new value starts a switchover (e.g. the current time).
    #[schemars(length(min = 1, max = 63))]
    pub request: String,
    /// The id of the final snapshot sealed at the source (a DNS label).
    /// Unset: the operator names it after the link and the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub final_snapshot: Option<String>,
}

/// Which replica a copy reads each chunk from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SourceSelection {
    Primary,
    Replica,
    #[default]
    Auto,
}

impl From<SourceSelection> for pb::SourceSelection {
    fn from(s: SourceSelection) -> Self {
        match s {
            SourceSelection::Primary => pb::SourceSelection::Primary,
            SourceSelection::Replica => pb::SourceSelection::Replica,
            SourceSelection::Auto => pb::SourceSelection::Auto,
        }
    }
}

/// Compression of copy batches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Compression {
    #[default]
    Auto,
    None,
    Zstd,
}

impl From<Compression> for pb::Compression {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Auto => pb::Compression::Default,
            Compression::None => pb::Compression::None,
            Compression::Zstd => pb::Compression::Zstd,
        }
    }
}

/// How a link is doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteLinkStatus {
    /// The link's id at the agents, chosen by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<String>,
    /// The newest snapshot complete at the target (its digest verified
    /// equal to the source's): the recovery point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_copied_snapshot: Option<CopiedSnapshot>,
    /// The copy running now (unset when none runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyProgress>,
    /// Seconds between the creation of `lastCopiedSnapshot` and the last
    /// status update: how much would be lost if the source site were lost
    /// now (the Lag column shows the same, kept current by kubectl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub lag_seconds: Option<i64>,
    /// The rate the link is held to now, bytes per second (unset: no
    /// limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_limit_bytes_per_second: Option<i64>,
    /// The last `spec.copyRequest` acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_copy_request: Option<String>,
    /// The last `spec.switchover.request` acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switchover_request: Option<String>,
    /// The last `spec.resyncRequest` acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync_request: Option<String>,
    /// `Syncing`, `Synced`, `Degraded`, `Paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A snapshot complete at the target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopiedSnapshot {
    pub id: String,
    pub generation: i64,
    /// The digest both sites agree on: 64 lowercase hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub digest: String,
    /// When the snapshot was taken at the source.
    pub created_at: Time,
    /// When its copy completed.
    pub copied_at: Time,
}

/// A copy in progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopyProgress {
    /// The snapshot being copied.
    pub snapshot: String,
    /// Block data bytes durable at the target.
    pub bytes_done: i64,
    /// Block data bytes of the whole copy.
    pub bytes_total: i64,
    /// Percent done (0 to 100; the Progress column).
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
    /// Bytes per second over this attempt.
    pub rate_bytes_per_second: i64,
    /// `rateBytesPerSecond` for people, e.g. `12.5Mi/s` (the Rate column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Seconds left at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// When this copy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
}
