//! Cron: standard five-field cron expressions (minute, hour, day of
//! month, month, day of week) evaluated in an IANA time zone. Pure: the
//! reconciler asks when the next run is and how many were missed.
//!
//! Semantics are cron's: `*`, lists `a,b`, ranges `a-b`, steps `*/n` and
//! `a-b/n`, month and day names (`jan`, `mon`), day of week 0-7 (0 and 7
//! are Sunday), and `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
//! When both day of month and day of week are restricted, a day matching
//! either runs (as in cron). Local times that do not exist (a daylight-
//! saving gap) run at the first instant after the gap; a local time that
//! happens twice runs once, at the first.
//!
//! Invariant: missed runs are counted, never replayed: the next run is
//! always the first one after now.

use jiff::{
    Timestamp, ToSpan, ZonedDateTime,
    civil::{Date, DateTime, Weekday},
    tz::TimeZone,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "{expr:?} has {n} fields; a schedule has 5: minute hour day-of-month month day-of-week, e.g. \"*/15 * * * *\""
    )]
    Fields { expr: String, n: usize },
    #[error("{field} {value:?} is not valid: {why}")]
    Field { field: &'static str, value: String, why: String },
    #[error("time zone {0:?} is unknown: use an IANA name such as Europe/Berlin")]
    Zone(String),
}

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_any: bool,
    weekdays_any: bool,
    zone: TimeZone,
}

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Spec = Spec { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: Spec = Spec { name: "hour", min: 0, max: 23, names: &[] };
const DAY: Spec = Spec { name: "day of month", min: 1, max: 31, names: &[] };
const MONTH: Spec = Spec {
    name: "month",
    min: 1,
    max: 12,
    names: &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
};
const WEEKDAY: Spec = Spec {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

/// The bit set of values a field allows, and whether it was `*`.
fn field(spec: &Spec, text: &str) -> Result<(u64, bool), CronError> {
    let bad = |why: String| CronError::Field { field: spec.name, value: text.to_string(), why };
    let value = |v: &str| -> Result<u32, CronError> {
        let lower = v.to_ascii_lowercase();
        if let Some(i) = spec.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + spec.min);
        }
        let n: u32 = v.parse().map_err(|_| bad(format!("{v:?} is not a number")))?;
        if n < spec.min || n > spec.max {
            return Err(bad(format!("{n} is outside {}-{}", spec.min, spec.max)));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s.parse().map_err(|_| bad(format!("step {s:?} is not a number")))?;
                if s == 0 {
                    return Err(bad("a step of 0".into()));
                }
                (r, s)
            }
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" => (spec.min, spec.max),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if step > 1 => (value(r)?, spec.max),
                None => (value(r)?, value(r)?),
            },
        };
        if lo > hi {
            return Err(bad(format!("the range {lo}-{hi} runs backwards")));
        }
        for v in (lo..=hi).step_by(step as usize) {
            bits |= 1 << v;
        }
    }
    Ok((bits, text == "*"))
}

impl Cron {
    pub fn parse(expr: &str, zone: &str) -> Result<Cron, CronError> {
        let zone = TimeZone::get(zone).map_err(|_| CronError::Zone(zone.to_string()))?;
        let expanded = match expr.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        let f: Vec<&str> = expanded.split_whitespace().collect();
        if f.len() != 5 {
            return Err(CronError::Fields { expr: expr.to_string(), n: f.len() });
        }
        let (minutes, _) = field(&MINUTE, f[0])?;
        let (hours, _) = field(&HOUR, f[1])?;
        let (days, days_any) = field(&DAY, f[2])?;
        let (months, _) = field(&MONTH, f[3])?;
        let (mut weekdays, weekdays_any) = field(&WEEKDAY, f[4])?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(Cron {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: (weekdays & 0x7f) as u8,
            days_any,
            weekdays_any,
            zone,
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << weekday_number(d.weekday())) != 0;
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    /// The first run strictly after `t` (within 5 years; `None` for a
    /// schedule that never runs, such as February 30th).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let local = t.to_zoned_datetime(self.zone.clone());
        let mut date = local.date();
        for _ in 0..(366 * 5) {
            if self.day_matches(date) {
                for h in (0..24).filter(|h| self.hours & (1 << h) != 0) {
                    for m in (0..60).filter(|m| self.minutes & (1u64 << m) != 0) {
                        let dt = DateTime::from_parts(date, jiff::civil::time(h, m, 0, 0));
                        let Ok(z) = dt.to_zoned_datetime(self.zone.clone()) else { continue };
                        if z.timestamp() > t {
                            return Some(z.timestamp());
                        }
                    }
                }
            }
            date = date.checked_add(1.day()).ok()?;
        }
        None
    }

    /// Runs due in `(last, now]`, and the latest of them: the reconciler
    /// takes that one and reports the others as missed.
    pub fn due(&self, last: Timestamp, now: Timestamp) -> (u32, Option<Timestamp>) {
        let (mut n, mut latest, mut t) = (0u32, None, last);
        while let Some(next) = self.next_after(t).filter(|&x| x <= now) {
            n += 1;
            latest = Some(next);
            t = next;
            if n == 10_000 {
                break;
            }
        }
        (n, latest)
    }

    /// The zone's local time of `t`, for status and messages.
    pub fn local(&self, t: Timestamp) -> ZonedDateTime {
        t.to_zoned_datetime(self.zone.clone())
    }
}

fn weekday_number(w: Weekday) -> u32 {
    w.to_sunday_zero_offset() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(expr: &str, zone: &str, after: &str) -> String {
        Cron::parse(expr, zone).unwrap().next_after(ts(after)).unwrap().to_string()
    }

    #[test]
    fn every_15_minutes() {
        assert_eq!(next("*/15 * * * *", "UTC", "2026-11-24T10:07:00Z"), "2026-11-24T10:15:00Z");
        assert_eq!(next("*/15 * * * *", "UTC", "2026-11-24T10:15:00Z"), "2026-11-24T10:30:00Z");
        assert_eq!(next("*/15 * * * *", "UTC", "2026-11-24T23:59:00Z"), "2026-11-25T00:00:00Z");
    }

    #[test]
    fn business_days_in_a_time_zone_across_daylight_saving() {
        // 08:30 Berlin on weekdays: 07:30 UTC in winter, 06:30 in summer.
        let e = "30 8 * * mon-fri";
        assert_eq!(next(e, "Europe/Berlin", "2026-11-27T08:00:00Z"), "2026-11-30T07:30:00Z");
        assert_eq!(next(e, "Europe/Berlin", "2026-07-01T07:00:00Z"), "2026-07-02T06:30:00Z");
        // 02:30 does not exist in Berlin on 2026-03-29: runs after the gap.
        assert_eq!(
            next("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z"),
            "2026-03-29T01:30:00Z"
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_and_sunday_as_0_or_7() {
        // The 1st or any Monday (cron's OR when both are restricted).
        assert_eq!(next("0 0 1 * mon", "UTC", "2026-11-24T12:00:00Z"), "2026-11-30T00:00:00Z");
        assert_eq!(next("0 0 * * 7", "UTC", "2026-11-24T12:00:00Z"), "2026-11-29T00:00:00Z");
        assert_eq!(next("0 0 * * 0", "UTC", "2026-11-24T12:00:00Z"), "2026-11-29T00:00:00Z");
        assert_eq!(next("@monthly", "UTC", "2026-11-24T12:00:00Z"), "2026-12-01T00:00:00Z");
        assert!(
            Cron::parse("0 0 30 feb *", "UTC")
                .unwrap()
                .next_after(ts("2026-01-01T00:00:00Z"))
                .is_none()
        );
    }

    #[test]
    fn missed_runs_are_counted_and_only_the_latest_is_due() {
        let c = Cron::parse("*/15 * * * *", "UTC").unwrap();
        let (n, latest) = c.due(ts("2026-11-24T10:00:00Z"), ts("2026-11-24T11:05:00Z"));
        assert_eq!(n, 4, "10:15, 10:30, 10:45, 11:00");
        assert_eq!(latest, Some(ts("2026-11-24T11:00:00Z")));
        assert_eq!(c.due(ts("2026-11-24T11:00:00Z"), ts("2026-11-24T11:05:00Z")), (0, None));
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let err = |e: &str| Cron::parse(e, "UTC").unwrap_err().to_string();
        assert!(err("* * * *").contains("has 4 fields"));
        assert!(err("61 * * * *").contains("minute \"61\""));
        assert!(err("* * * * funday").contains("\"funday\" is not a number"));
        assert!(err("*/0 * * * *").contains("a step of 0"));
        assert!(err("5-1 * * * *").contains("runs backwards"));
        assert!(Cron::parse("* * * * *", "Mars/Olympus").unwrap_err().to_string().contains("IANA"));
    }
}
