//! Protobuf <-> domain conversion of the copy settings and reports a
//! link keeps in protobuf form: bandwidth policy, source selection,
//! progress and copy reports.
//!
//! Invariant: a setting that does not convert is refused with a message
//! naming what is wrong (the day, the time, the zone), never defaulted.

use cairn_api::{
    SnapshotId,
    agent::v1::{self as pb},
};
use jiff::civil::{Time, Weekday};

use crate::{
    copy::{
        bandwidth::{Policy, Rate, Window},
        sender::{CopyProgress, CopyReport},
    },
    head::SourcePick,
};

/// A link's bandwidth policy from its protobuf form (unset: no limit).
pub fn policy_from_pb(p: Option<&pb::BandwidthPolicy>) -> Result<Policy, String> {
    let rate = |r: Option<&pb::Rate>| match r {
        None => Rate::Unlimited,
        Some(r) if r.unlimited => Rate::Unlimited,
        Some(r) => Rate::BytesPerSec(r.bytes_per_sec),
    };
    let policy = match p.and_then(|p| p.policy.as_ref()) {
        None => Policy::Fixed(Rate::Unlimited),
        Some(pb::bandwidth_policy::Policy::Fixed(r)) => Policy::Fixed(rate(Some(r))),
        Some(pb::bandwidth_policy::Policy::Adaptive(a)) => {
            Policy::Adaptive { floor: a.floor_bytes_per_sec, ceiling: a.ceiling_bytes_per_sec }
        }
        Some(pb::bandwidth_policy::Policy::Windows(w)) => {
            let zone = Policy::zone(&w.time_zone).map_err(|e| e.to_string())?;
            let mut windows = Vec::with_capacity(w.windows.len());
            for (i, win) in w.windows.iter().enumerate() {
                let days = win
                    .days
                    .iter()
                    .map(|d| weekday(d).ok_or_else(|| format!("window {i}: day {d:?} is not one of mon, tue, wed, thu, fri, sat, sun")))
                    .collect::<Result<Vec<_>, _>>()?;
                let time = |field: &str, v: &str| {
                    v.parse::<Time>().map_err(|_| {
                        format!("window {i}: {field} {v:?} is not a local time such as 08:00")
                    })
                };
                let end = match win.end.as_str() {
                    "" | "24:00" => None,
                    e => Some(time("end", e)?),
                };
                windows.push(Window {
                    days,
                    start: time("start", &win.start)?,
                    end,
                    rate: rate(win.rate.as_ref()),
                });
            }
            Policy::Windows { zone, default: rate(w.default_rate.as_ref()), windows }
        }
    };
    policy.validate().map_err(|e| e.to_string())?;
    Ok(policy)
}

fn weekday(d: &str) -> Option<Weekday> {
    Some(match d.to_ascii_lowercase().get(..3)? {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return None,
    })
}

pub fn source_from_pb(v: i32) -> Result<SourcePick, String> {
    match pb::SourceSelection::try_from(v) {
        Ok(pb::SourceSelection::Primary) => Ok(SourcePick::Primary),
        Ok(pb::SourceSelection::Replica) => Ok(SourcePick::Replica),
        Ok(pb::SourceSelection::Auto) => Ok(SourcePick::Auto),
        Err(_) => Err(format!("source {v} is not Primary (0), Replica (1) or Auto (2)")),
    }
}

pub fn progress_pb(p: &CopyProgress) -> pb::CopyProgressResponse {
    pb::CopyProgressResponse {
        snapshot_id: p.snapshot.clone(),
        bytes_durable: p.bytes_durable,
        bytes_sent: p.bytes_sent,
        resumed_from_block: p.resumed_from_block,
        rate_bytes_per_sec: p.rate,
        done: p.done,
        bytes_total: p.bytes_total,
        eta_seconds: p.eta_seconds().unwrap_or(0.0),
        link_id: p.link.clone(),
        wire_bytes: p.wire_bytes,
    }
}

pub fn report_pb(snapshot: &SnapshotId, r: &CopyReport) -> pb::CopySnapshotResponse {
    pb::CopySnapshotResponse {
        snapshot_id: snapshot.to_string(),
        digest: r.digest.0.to_vec().into(),
        already_present: r.already_present,
        resumed_from_block: r.resumed_from_block,
        bytes_sent: r.bytes_sent,
        wire_bytes: r.wire_bytes,
        blocks_sent: r.blocks_sent,
        elapsed_ms: r.elapsed.as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(n: u64) -> Option<pb::Rate> {
        Some(pb::Rate { unlimited: false, bytes_per_sec: n })
    }

    fn windows(days: &[&str], start: &str, end: &str, zone: &str) -> pb::BandwidthPolicy {
        pb::BandwidthPolicy {
            policy: Some(pb::bandwidth_policy::Policy::Windows(pb::BandwidthWindows {
                time_zone: zone.into(),
                default_rate: None,
                windows: vec![pb::BandwidthWindow {
                    days: days.iter().map(|d| d.to_string()).collect(),
                    start: start.into(),
                    end: end.into(),
                    rate: rate(5),
                }],
            })),
        }
    }

    #[test]
    fn policies_convert_and_bad_ones_say_what_is_wrong() {
        assert_eq!(policy_from_pb(None).unwrap(), Policy::Fixed(Rate::Unlimited));
        let fixed = pb::BandwidthPolicy {
            policy: Some(pb::bandwidth_policy::Policy::Fixed(rate(0).unwrap())),
        };
        assert_eq!(policy_from_pb(Some(&fixed)).unwrap(), Policy::Fixed(Rate::BytesPerSec(0)));
        let Policy::Windows { windows: w, default, .. } =
            policy_from_pb(Some(&windows(&["Mon", "fri"], "08:00", "18:30", "Europe/Berlin")))
                .unwrap()
        else {
            panic!("a windows policy")
        };
        assert_eq!(default, Rate::Unlimited);
        assert_eq!(w[0].days, [Weekday::Monday, Weekday::Friday]);
        assert_eq!(w[0].end, Some(Time::constant(18, 30, 0, 0)));
        let until_midnight = policy_from_pb(Some(&windows(&["sun"], "22:00", "", "UTC"))).unwrap();
        assert!(
            matches!(until_midnight, Policy::Windows { ref windows, .. } if windows[0].end.is_none())
        );

        let err = |p: pb::BandwidthPolicy| policy_from_pb(Some(&p)).unwrap_err();
        assert!(err(windows(&["mon"], "18:00", "08:00", "UTC")).contains("not after its start"));
        assert!(err(windows(&["someday"], "08:00", "", "UTC")).contains("someday"));
        assert!(err(windows(&["mon"], "8 am", "", "UTC")).contains("start \"8 am\""));
        assert!(err(windows(&["mon"], "08:00", "", "Mars/Olympus")).contains("unknown"));
        let adaptive = pb::BandwidthPolicy {
            policy: Some(pb::bandwidth_policy::Policy::Adaptive(pb::AdaptiveBandwidth {
                floor_bytes_per_sec: 10,
                ceiling_bytes_per_sec: 5,
            })),
        };
        assert!(err(adaptive).contains("floor"));
    }
}
