//! Status conditions in the Kubernetes style, shared by every Cairn
//! resource, and the one way to change them: `set_condition`, which keeps a
//! condition's `lastTransitionTime` while its status stays the same, so the
//! time says when the status last changed, not when a reconcile last ran.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The status of a condition: `True`, `False` or `Unknown`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// One aspect of an object's current state, as in
/// `metav1.Condition`: a type, its status, a machine-readable reason and a
/// message for people.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The aspect this condition describes, in CamelCase (e.g. `Ready`,
    /// `Synced`). At most one condition of each type.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Why the condition has this status: a CamelCase word (e.g.
    /// `CopyInProgress`).
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// What people should know, including what to do if something is wrong.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed (not when the condition was last
    /// written).
    pub last_transition_time: Time,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition observed at `now` for the object's `generation`.
    pub fn new(
        type_: impl Into<String>,
        status: impl Into<ConditionStatus>,
        reason: impl Into<String>,
        message: impl Into<String>,
        generation: Option<i64>,
        now: Time,
    ) -> Self {
        Self {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: generation,
        }
    }

    /// Whether the condition's status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Sets `new` in `conditions`, replacing the condition of the same type or
/// appending it. When the status of that type does not change, the old
/// `lastTransitionTime` is kept (reason, message and generation are still
/// updated). Returns whether anything changed, so a caller can skip a
/// status write that would change nothing.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if *old == new {
                return false;
            }
            *old = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of a type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Removes the condition of a type; returns whether one was there.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn ready(status: bool, reason: &str, generation: i64, now: i64) -> Condition {
        Condition::new(
            "Ready",
            status,
            reason,
            format!("{reason} at {now}"),
            Some(generation),
            at(now),
        )
    }

    #[test]
    fn a_new_type_is_appended_with_the_time_given() {
        let mut conditions = vec![];
        assert!(set_condition(&mut conditions, ready(true, "Placed", 1, 100)));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(100));
    }

    #[test]
    fn same_status_keeps_the_transition_time_but_takes_reason_message_and_generation() {
        let mut conditions = vec![ready(true, "Placed", 1, 100)];
        assert!(set_condition(&mut conditions, ready(true, "Grown", 2, 200)));
        let c = &conditions[0];
        assert_eq!(c.last_transition_time, at(100));
        assert_eq!(c.reason, "Grown");
        assert_eq!(c.message, "Grown at 200");
        assert_eq!(c.observed_generation, Some(2));
    }

    #[test]
    fn a_status_change_takes_the_new_transition_time() {
        let mut conditions = vec![ready(true, "Placed", 1, 100)];
        assert!(set_condition(&mut conditions, ready(false, "AgentsDown", 1, 300)));
        assert_eq!(conditions[0].last_transition_time, at(300));
        assert_eq!(conditions[0].status, ConditionStatus::False);
    }

    #[test]
    fn setting_the_same_condition_again_reports_no_change() {
        let mut conditions = vec![ready(true, "Placed", 1, 100)];
        let mut again = ready(true, "Placed", 1, 100);
        again.last_transition_time = at(500);
        again.message = "Placed at 100".into();
        assert!(!set_condition(&mut conditions, again));
        assert_eq!(conditions[0].last_transition_time, at(100));
    }

    #[test]
    fn other_types_are_left_alone() {
        let synced = Condition::new("Synced", true, "UpToDate", "", Some(1), at(50));
        let mut conditions = vec![synced.clone(), ready(true, "Placed", 1, 100)];
        set_condition(&mut conditions, ready(false, "AgentsDown", 1, 300));
        assert_eq!(conditions[0], synced);
        assert_eq!(find_condition(&conditions, "Ready").map(Condition::is_true), Some(false));
        assert!(remove_condition(&mut conditions, "Synced"));
        assert!(!remove_condition(&mut conditions, "Synced"));
        assert_eq!(conditions.len(), 1);
    }
}
