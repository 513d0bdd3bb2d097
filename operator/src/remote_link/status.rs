//! RemoteLink status, pure: the last copied snapshot, the copy in
//! progress, the lag (recovery point) and the conditions, from the
//! sender's view of the link and the source's snapshots.
//!
//! Invariant: Synced is true only when nothing runs and the newest
//! non-divergent snapshot of the source is the last one copied.

use cairn_api::{
    agent::v1 as pb,
    crd::{
        Condition, ConditionStatus, CopiedSnapshot, CopyProgress, RemoteLink, RemoteLinkStatus,
        quantity::format_rate, remote_link::condition, set_condition,
    },
};
use jiff::Timestamp;
use kube::Resource;

use crate::report::k8s_time;

/// Pure: the status `st` (as this reconcile has it so far) brought up to
/// date from the sender's view of the link and the source's snapshots (for
/// the lag: the age of the newest snapshot at the target).
pub fn status_of(
    rl: &RemoteLink,
    mut st: RemoteLinkStatus,
    link: &pb::LinkStatus,
    source_snaps: &[pb::SnapshotInfo],
    now: Timestamp,
) -> RemoteLinkStatus {
    let generation = rl.meta().generation;
    st.link_id = link.link.as_ref().map(|l| l.link_id.clone());
    let cursor = &link.last_copied_snapshot_id;
    let sealed = source_snaps.iter().find(|s| &s.snapshot_id == cursor);
    if !cursor.is_empty() {
        let created =
            sealed.map_or(now, |s| Timestamp::from_second(s.sealed_at_unix).unwrap_or(now));
        st.last_copied_snapshot = Some(CopiedSnapshot {
            id: cursor.clone(),
            generation: link.last_copied_generation as i64,
            digest: link.last_copied_digest.iter().map(|b| format!("{b:02x}")).collect(),
            created_at: k8s_time(created),
            copied_at: k8s_time(Timestamp::from_second(link.last_copied_at_unix).unwrap_or(now)),
        });
        st.lag_seconds = Some(now.duration_since(created).as_secs().max(0));
    }
    let running = link.progress.as_ref().filter(|p| !p.done && !p.snapshot_id.is_empty());
    st.copy = running.map(|p| {
        let done = p.bytes_durable.max(p.bytes_sent).min(p.bytes_total.max(p.bytes_sent));
        CopyProgress {
            snapshot: p.snapshot_id.clone(),
            bytes_done: done as i64,
            bytes_total: p.bytes_total as i64,
            percent: (done * 100).checked_div(p.bytes_total).unwrap_or(0) as i32,
            rate_bytes_per_second: p.rate_bytes_per_sec as i64,
            rate: Some(format_rate(p.rate_bytes_per_sec as i64)),
            eta_seconds: Some(p.eta_seconds as i64),
            started_at: None,
        }
    });
    st.current_limit_bytes_per_second = match link.current_rate_bytes_per_sec {
        0 => None,
        u64::MAX => None,
        n => Some(n as i64),
    };
    let newest = source_snaps.iter().rfind(|s| !s.divergent).map(|s| s.snapshot_id.as_str());
    let synced = running.is_none() && !cursor.is_empty() && newest == Some(cursor.as_str());
    let c = |t: &str, on: bool, reason: &str, m: String| {
        Condition::new(
            t,
            if on { ConditionStatus::True } else { ConditionStatus::False },
            reason,
            m,
            generation,
            k8s_time(now),
        )
    };
    set_condition(
        &mut st.conditions,
        c(
            condition::PAUSED,
            rl.spec.paused,
            if rl.spec.paused { "Paused" } else { "Running" },
            String::new(),
        ),
    );
    set_condition(
        &mut st.conditions,
        c(
            condition::SYNCING,
            running.is_some(),
            if running.is_some() { "Copying" } else { "Idle" },
            running.map(|p| format!("copying {}", p.snapshot_id)).unwrap_or_default(),
        ),
    );
    set_condition(
        &mut st.conditions,
        c(
            condition::SYNCED,
            synced,
            if synced { "UpToDate" } else { "Behind" },
            match newest {
                Some(n) if !synced => format!("the newest snapshot {n} is not at the target yet"),
                _ => String::new(),
            },
        ),
    );
    let degraded = !link.last_error.is_empty();
    set_condition(
        &mut st.conditions,
        c(
            condition::DEGRADED,
            degraded,
            if degraded { "CopyFailed" } else { "Healthy" },
            link.last_error.clone(),
        ),
    );
    st.observed_generation = generation;
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use serde_json::json;

    fn link(paused: bool) -> RemoteLink {
        let mut rl = fixtures::link("db-to-b", "db", "site-b", "db-copy");
        rl.meta_mut().generation = Some(2);
        rl.spec.bandwidth =
            Some(serde_json::from_value(json!({"defaultBytesPerSecond": 1000000})).unwrap());
        rl.spec.paused = paused;
        rl
    }

    #[test]
    fn status_reports_the_recovery_point_as_lag_and_progress_in_percent() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let snaps = vec![
            pb::SnapshotInfo {
                snapshot_id: "s1".into(),
                sealed_at_unix: now.as_second() - 900,
                ..Default::default()
            },
            pb::SnapshotInfo {
                snapshot_id: "s2".into(),
                sealed_at_unix: now.as_second() - 60,
                ..Default::default()
            },
        ];
        let ls = pb::LinkStatus {
            link: Some(pb::Link { link_id: "shop-db-to-b".into(), ..Default::default() }),
            last_copied_snapshot_id: "s1".into(),
            last_copied_generation: 1,
            last_copied_digest: vec![0xab; 32].into(),
            last_copied_at_unix: now.as_second() - 800,
            progress: Some(pb::CopyProgressResponse {
                snapshot_id: "s2".into(),
                bytes_sent: 25 << 20,
                bytes_total: 100 << 20,
                rate_bytes_per_sec: (10 << 20) as f64,
                ..Default::default()
            }),
            ..Default::default()
        };
        let st = status_of(&link(false), Default::default(), &ls, &snaps, now);
        assert_eq!(st.lag_seconds, Some(900), "the newest snapshot at the target is 15 min old");
        let copy = st.copy.unwrap();
        assert_eq!((copy.snapshot.as_str(), copy.percent), ("s2", 25));
        let get = |t: &str| st.conditions.iter().find(|c| c.type_ == t).unwrap().status;
        assert_eq!(get(condition::SYNCING), ConditionStatus::True);
        assert_eq!(get(condition::SYNCED), ConditionStatus::False);
        // Once s2 is there and nothing runs: Synced.
        let done = pb::LinkStatus { last_copied_snapshot_id: "s2".into(), progress: None, ..ls };
        let st = status_of(&link(false), Default::default(), &done, &snaps, now);
        assert_eq!(st.lag_seconds, Some(60));
        assert_eq!(
            st.conditions.iter().find(|c| c.type_ == condition::SYNCED).unwrap().status,
            ConditionStatus::True
        );
    }
}
