//! A remote link's bandwidth policy as written in a `RemoteLink`: a default
//! rate with time-of-day / day-of-week windows, or an adaptive range. The
//! schema keeps the two kinds apart and every window inside one day; the
//! conversion to the agent's `BandwidthPolicy` is here so the operator never
//! builds protobuf by hand.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::v1 as pb;

/// How fast a link may copy. Either a fixed rate with optional windows
/// (`defaultBytesPerSecond`, `windows`, `timeZone`) or `adaptive`, never
/// both. Rates are bytes per second: unset means no limit, 0 pauses the
/// link.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.adaptive) || (!has(self.windows) && !has(self.defaultBytesPerSecond))",
        "message": "adaptive cannot be combined with windows or defaultBytesPerSecond: remove adaptive for a fixed or windowed rate, or remove windows and defaultBytesPerSecond for an adaptive one"
    },
    {
        "rule": "!has(self.windows) || has(self.timeZone)",
        "message": "windows need a timeZone: set an IANA time zone name such as Europe/Berlin or UTC"
    }
]))]
pub struct BandwidthPolicy {
    /// Bytes per second outside every window (always, without windows).
    /// Unset: no limit. 0 pauses the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub default_bytes_per_second: Option<i64>,
    /// The IANA time zone the windows' times are in, e.g. `Europe/Berlin`;
    /// daylight-saving changes are followed. Required with `windows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$")
    )]
    pub time_zone: Option<String>,
    /// Times of the week with their own rate; the first window that holds
    /// sets the rate, `defaultBytesPerSecond` applies outside all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub windows: Option<Vec<BandwidthWindow>>,
    /// Adapt the rate to the round-trip time between the sites: back off
    /// when it grows (a queue is building), probe up when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveBandwidth>,
}

/// A day of the week.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// The agent's name for the day (`mon` .. `sun`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mon => "mon",
            Self::Tue => "tue",
            Self::Wed => "wed",
            Self::Thu => "thu",
            Self::Fri => "fri",
            Self::Sat => "sat",
            Self::Sun => "sun",
        }
    }
}

/// A time window on some days of the week, in the policy's time zone,
/// inside one day: from `start` (inclusive) to `end` (exclusive).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.end > self.start",
        "message": "end must be after start: a window cannot cross midnight, so split 22:00-06:00 into 22:00-24:00 and 00:00-06:00"
    }
]))]
pub struct BandwidthWindow {
    /// The days the window holds on: `mon`, `tue`, `wed`, `thu`, `fri`,
    /// `sat`, `sun`.
    #[schemars(length(min = 1, max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub days: Vec<Weekday>,
    /// Local start time, `HH:MM` (24-hour clock), inclusive.
    #[schemars(length(max = 5), regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// Local end time, `HH:MM`, exclusive, after `start`; `24:00` is the
    /// end of the day.
    #[schemars(length(max = 5), regex(pattern = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"))]
    pub end: String,
    /// Bytes per second inside the window. Unset: no limit. 0 pauses the
    /// link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bytes_per_second: Option<i64>,
}

/// An adaptive rate: additive increase, multiplicative decrease on the
/// round-trip time, kept within `[floor, ceiling]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.floorBytesPerSecond <= self.ceilingBytesPerSecond",
        "message": "floorBytesPerSecond must not exceed ceilingBytesPerSecond: lower the floor or raise the ceiling"
    }
]))]
pub struct AdaptiveBandwidth {
    /// The rate never goes below this (bytes per second).
    #[schemars(range(min = 0))]
    pub floor_bytes_per_second: i64,
    /// The rate never goes above this (bytes per second).
    #[schemars(range(min = 1))]
    pub ceiling_bytes_per_second: i64,
}

/// The agent's rate: `None` is no limit.
fn rate(bytes_per_second: Option<i64>) -> pb::Rate {
    match bytes_per_second {
        None => pb::Rate { unlimited: true, bytes_per_sec: 0 },
        Some(r) => pb::Rate { unlimited: false, bytes_per_sec: r.max(0) as u64 },
    }
}

impl From<&BandwidthPolicy> for pb::BandwidthPolicy {
    fn from(p: &BandwidthPolicy) -> Self {
        use pb::bandwidth_policy::Policy;
        let policy = if let Some(a) = &p.adaptive {
            Policy::Adaptive(pb::AdaptiveBandwidth {
                floor_bytes_per_sec: a.floor_bytes_per_second.max(0) as u64,
                ceiling_bytes_per_sec: a.ceiling_bytes_per_second.max(0) as u64,
            })
        } else if let Some(windows) = &p.windows {
            Policy::Windows(pb::BandwidthWindows {
                time_zone: p.time_zone.clone().unwrap_or_default(),
                default_rate: Some(rate(p.default_bytes_per_second)),
                windows: windows
                    .iter()
                    .map(|w| pb::BandwidthWindow {
                        days: w.days.iter().map(|d| d.as_str().to_owned()).collect(),
                        start: w.start.clone(),
                        end: w.end.clone(),
                        rate: Some(rate(w.bytes_per_second)),
                    })
                    .collect(),
            })
        } else {
            Policy::Fixed(rate(p.default_bytes_per_second))
        };
        pb::BandwidthPolicy { policy: Some(policy) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::bandwidth_policy::Policy;

    #[test]
    fn no_policy_fields_is_an_unlimited_fixed_rate() {
        let pb = pb::BandwidthPolicy::from(&BandwidthPolicy::default());
        assert_eq!(pb.policy, Some(Policy::Fixed(pb::Rate { unlimited: true, bytes_per_sec: 0 })));
    }

    #[test]
    fn windows_keep_their_zone_days_times_and_rates() {
        let policy = BandwidthPolicy {
            default_bytes_per_second: None,
            time_zone: Some("Europe/Berlin".into()),
            windows: Some(vec![BandwidthWindow {
                days: vec![Weekday::Mon, Weekday::Fri],
                start: "08:00".into(),
                end: "24:00".into(),
                bytes_per_second: Some(0),
            }]),
            adaptive: None,
        };
        let Some(Policy::Windows(w)) = pb::BandwidthPolicy::from(&policy).policy else {
            panic!("not a window policy");
        };
        assert_eq!(w.time_zone, "Europe/Berlin");
        assert_eq!(w.default_rate, Some(pb::Rate { unlimited: true, bytes_per_sec: 0 }));
        assert_eq!(w.windows[0].days, ["mon", "fri"]);
        assert_eq!((w.windows[0].start.as_str(), w.windows[0].end.as_str()), ("08:00", "24:00"));
        assert_eq!(w.windows[0].rate, Some(pb::Rate { unlimited: false, bytes_per_sec: 0 }));
    }

    #[test]
    fn adaptive_keeps_floor_and_ceiling() {
        let policy = BandwidthPolicy {
            adaptive: Some(AdaptiveBandwidth {
                floor_bytes_per_second: 1 << 20,
                ceiling_bytes_per_second: 100 << 20,
            }),
            ..Default::default()
        };
        assert_eq!(
            pb::BandwidthPolicy::from(&policy).policy,
            Some(Policy::Adaptive(pb::AdaptiveBandwidth {
                floor_bytes_per_sec: 1 << 20,
                ceiling_bytes_per_sec: 100 << 20
            }))
        );
    }
}
