//! Retention: which snapshots of a volume a schedule prunes. Pure: the
//! caller observes the snapshots and what links need, this module decides.
//!
//! Invariants: the newest snapshot of the volume's line is never pruned (a
//! volume always keeps a recovery point); a snapshot a link still needs
//! (its last copied one, the base of its next copy, and every one it has
//! not copied yet) or the last one both ends of a link share is never
//! pruned, whatever the limits say; divergent snapshots (kept from before a
//! resync) are not the schedule's to prune.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

/// How many snapshots to keep and for how long. At least one is set (the
/// schema refuses an empty retention); `count` is at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Keep at most this many of the newest.
    pub count: Option<u32>,
    /// Keep none older than this.
    pub max_age: Option<SignedDuration>,
}

/// A snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub id: String,
    pub sealed_at: Timestamp,
    pub divergent: bool,
}

/// Why a snapshot past the limits is kept anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// The newest of the volume: the recovery point.
    Newest,
    /// A link still needs it (the text says which and why).
    Needed(String),
}

/// The plan for one volume: what to delete, oldest first, and what the
/// limits would have pruned but is kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub prune: Vec<String>,
    pub kept: BTreeMap<String, Kept>,
}

/// Decides what to prune among `snaps` (oldest first, in the volume's layer
/// order) at `now`. `needed` maps a snapshot id to why a link needs it.
pub fn plan(
    snaps: &[Snap],
    retention: Retention,
    now: Timestamp,
    needed: &BTreeMap<String, String>,
) -> Plan {
    let line: Vec<&Snap> = snaps.iter().filter(|s| !s.divergent).collect();
    let mut out = Plan::default();
    let n = line.len();
    for (i, s) in line.iter().enumerate() {
        let from_newest = n - 1 - i; // 0 for the newest
        let over_count = retention.count.is_some_and(|c| from_newest >= c as usize);
        let too_old = retention.max_age.is_some_and(|age| now.duration_since(s.sealed_at) > age);
        if !(over_count || too_old) {
            continue;
        }
        if from_newest == 0 {
            out.kept.insert(s.id.clone(), Kept::Newest);
        } else if let Some(why) = needed.get(&s.id) {
            out.kept.insert(s.id.clone(), Kept::Needed(why.clone()));
        } else {
            out.prune.push(s.id.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(min: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + min * 60).unwrap()
    }

    /// Snapshots every 15 minutes, the last at minute 15 * (n - 1).
    fn every_15(n: i64) -> Vec<Snap> {
        (0..n)
            .map(|i| Snap { id: format!("s{i}"), sealed_at: at(i * 15), divergent: false })
            .collect()
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_count_keeps_the_newest_n() {
        let p = plan(
            &every_15(5),
            Retention { count: Some(3), max_age: None },
            at(60),
            &BTreeMap::new(),
        );
        assert_eq!(p.prune, ids(&["s0", "s1"]));
        assert!(p.kept.is_empty());
    }

    #[test]
    fn an_age_prunes_what_is_older_and_both_limits_apply_together() {
        let age = Retention { count: None, max_age: Some(SignedDuration::from_mins(30)) };
        // At minute 60: s0 (60 min old) and s1 (45) are older than 30 min.
        assert_eq!(plan(&every_15(5), age, at(60), &BTreeMap::new()).prune, ids(&["s0", "s1"]));
        let both = Retention { count: Some(4), ..age };
        assert_eq!(plan(&every_15(5), both, at(60), &BTreeMap::new()).prune, ids(&["s0", "s1"]));
        let both = Retention { count: Some(1), ..age };
        assert_eq!(
            plan(&every_15(5), both, at(60), &BTreeMap::new()).prune,
            ids(&["s0", "s1", "s2", "s3"])
        );
    }

    #[test]
    fn the_newest_and_what_a_link_needs_are_kept_and_say_why() {
        let age = Retention { count: None, max_age: Some(SignedDuration::from_mins(1)) };
        let needed =
            BTreeMap::from([("s2".to_string(), "link a-b has not copied it yet".to_string())]);
        let p = plan(&every_15(4), age, at(600), &needed);
        assert_eq!(p.prune, ids(&["s0", "s1"]));
        assert_eq!(p.kept.get("s2"), Some(&Kept::Needed("link a-b has not copied it yet".into())));
        assert_eq!(p.kept.get("s3"), Some(&Kept::Newest));
    }

    #[test]
    fn divergent_snapshots_are_not_the_schedules_to_prune() {
        let mut snaps = every_15(4);
        snaps[1].divergent = true;
        let p = plan(&snaps, Retention { count: Some(1), max_age: None }, at(60), &BTreeMap::new());
        assert_eq!(p.prune, ids(&["s0", "s2"]));
    }
}
