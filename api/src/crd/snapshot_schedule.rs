//! `SnapshotSchedule`: when to snapshot the volumes a label selector picks,
//! whether to copy each snapshot over the volumes' links, and how many to
//! keep at the primary and at the remote. The schema makes every retention
//! keep at least one snapshot.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Condition types of a `SnapshotSchedule`.
pub mod condition {
    /// The schedule and time zone parse, and the last run snapshotted every
    /// selected volume.
    pub const READY: &str = "Ready";
}

/// A snapshot schedule for the volumes in this namespace that
/// `volumeSelector` picks.
// clippy takes the printer columns' repeated `type_ = ...` for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "SnapshotSchedule",
    namespaced,
    status = "SnapshotScheduleStatus",
    derive = "PartialEq",
    shortname = "snapsched",
    category = "cairn",
    doc = "A Cairn snapshot schedule: when to snapshot volumes, whether to copy them, how many to keep.",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRun"),
    printcolumn(name = "Next Run", type_ = "string", json_path = ".status.nextRun"),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotScheduleSpec {
    /// The volumes (in this namespace) to snapshot.
    pub volume_selector: LabelSelector,
    /// When, as a cron expression of five fields: minute, hour, day of
    /// month, month, day of week (e.g. `*/15 * * * *`).
    #[schemars(
        length(max = 128),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self.matches('^ *[^ ]+( +[^ ]+){4} *$')",
                "message": "schedule must be a cron expression of five fields (minute hour day-of-month month day-of-week), e.g. \"*/15 * * * *\""
            }
        ])
    )]
    pub schedule: String,
    /// The IANA time zone the schedule is in, e.g. `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$")
    )]
    pub time_zone: String,
    /// How many of this schedule's snapshots to keep.
    pub retention: Retention,
    /// Copy each snapshot over every `RemoteLink` of its volume as soon as
    /// it is taken.
    #[serde(default = "default_copy")]
    pub copy: bool,
    /// Take no snapshots while set (retention still prunes).
    #[serde(default)]
    pub suspend: bool,
}

fn default_time_zone() -> String {
    "UTC".into()
}

fn default_copy() -> bool {
    true
}

/// Retention at the primary and at the remote. A snapshot a link still
/// needs (not yet copied, or the base of its next copy) is kept whatever
/// the retention says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// At the source volume.
    pub primary: RetentionRule,
    /// At the volumes the links copy to. Unset: as at the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RetentionRule>,
}

/// Which snapshots to keep: the newest `count`, and those younger than
/// `maxAge`; with both, a snapshot is kept while either keeps it. At least
/// one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.count) || has(self.maxAge)",
        "message": "retention must keep something: set count (the newest snapshots to keep, at least 1), maxAge (e.g. 7d), or both"
    }
]))]
pub struct RetentionRule {
    /// Keep the newest `count` snapshots (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        range(max = 512),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self >= 1",
                "message": "count must be at least 1: a schedule always keeps its newest snapshot"
            }
        ])
    )]
    pub count: Option<i32>,
    /// Keep snapshots younger than this: a number and a unit, `m`
    /// (minutes), `h`, `d` or `w` (e.g. `36h`, `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), regex(pattern = r"^[1-9][0-9]{0,5}[mhdw]$"))]
    pub max_age: Option<String>,
}

/// What a schedule did last and will do next.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotScheduleStatus {
    /// When the last run took its snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// When the next run is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// Runs that were due but not taken (the operator was down or a volume
    /// could not be snapshotted), since the schedule was created.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub missed_runs: i32,
    /// The id of the last snapshot taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<String>,
    /// Volumes the selector picks now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<i32>,
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
