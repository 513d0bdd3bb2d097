//! Bandwidth for remote copies: a link's policy (a fixed rate, day/time
//! windows in a named time zone, or adaptive between a floor and a ceiling),
//! the token bucket that holds a copy to it, and an optional agent-wide cap
//! shared by all links. Time comes through [`Clock`] so tests can move it.
//!
//! Invariants: over any interval the bytes let through are at most
//! `rate * interval + burst` (the bucket may go into debt by one request,
//! which is then waited off); a policy change is seen by a waiting copy
//! within [`RECHECK`]; a rate of 0 pauses, it never divides by zero.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{Timestamp, civil::Time, civil::Weekday, tz::TimeZone};

/// How often a waiting copy looks at the policy again: a change reaches a
/// running copy within this.
pub const RECHECK: Duration = Duration::from_millis(250);

/// Monotonic and wall-clock time, and sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Monotonic time since an arbitrary origin.
    fn mono(&self) -> Duration;
    /// Wall-clock time, for day/time windows.
    fn wall(&self) -> Timestamp;
    /// Sleeps for `d` (of this clock's time).
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock { origin: std::time::Instant::now() }
    }
}

impl Clock for SystemClock {
    fn mono(&self) -> Duration {
        self.origin.elapsed()
    }
    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told: `sleep` advances it at once.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<(Duration, Timestamp)>,
}

impl ManualClock {
    pub fn new(wall: Timestamp) -> Self {
        ManualClock { now: Mutex::new((Duration::ZERO, wall)) }
    }

    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().unwrap();
        now.0 += d;
        now.1 += jiff::SignedDuration::try_from(d).expect("a sane duration");
    }
}

impl Clock for ManualClock {
    fn mono(&self) -> Duration {
        self.now.lock().unwrap().0
    }
    fn wall(&self) -> Timestamp {
        self.now.lock().unwrap().1
    }
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.advance(d);
        Box::pin(std::future::ready(()))
    }
}

/// A rate: bytes per second, 0 pausing; or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Unlimited,
    BytesPerSec(u64),
}

/// A window of the week in which a link runs at its own rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The days it applies on (local to the policy's time zone).
    pub days: Vec<Weekday>,
    /// Local start, inclusive.
    pub start: Time,
    /// Local end, exclusive; after `start`. `None`: until midnight.
    pub end: Option<Time>,
    pub rate: Rate,
}

/// A link's bandwidth policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    Fixed(Rate),
    /// The first window that holds at the current local time sets the rate;
    /// outside every window, `default`.
    Windows {
        zone: TimeZone,
        default: Rate,
        windows: Vec<Window>,
    },
    /// Between `floor` and `ceiling` bytes/s, steered by round-trip times
    /// (see [`Adaptive`]).
    Adaptive {
        floor: u64,
        ceiling: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("window {index}: its end {end} is not after its start {start}")]
    WindowOrder { index: usize, start: Time, end: Time },
    #[error("window {index}: it names no day of the week")]
    NoDays { index: usize },
    #[error("adaptive: the floor {floor} B/s is above the ceiling {ceiling} B/s")]
    FloorAboveCeiling { floor: u64, ceiling: u64 },
    #[error("adaptive: the ceiling must be above 0 B/s")]
    ZeroCeiling,
    #[error("time zone {name:?} is unknown: use an IANA name such as Europe/Berlin")]
    UnknownZone { name: String },
}

impl Policy {
    /// A time zone by IANA name, for [`Policy::Windows`].
    pub fn zone(name: &str) -> Result<TimeZone, PolicyError> {
        TimeZone::get(name).map_err(|_| PolicyError::UnknownZone { name: name.to_string() })
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        match self {
            Policy::Fixed(_) => Ok(()),
            Policy::Windows { windows, .. } => {
                for (index, w) in windows.iter().enumerate() {
                    if w.days.is_empty() {
                        return Err(PolicyError::NoDays { index });
                    }
                    if let Some(end) = w.end
                        && end <= w.start
                    {
                        return Err(PolicyError::WindowOrder { index, start: w.start, end });
                    }
                }
                Ok(())
            }
            Policy::Adaptive { floor, ceiling } => {
                if *ceiling == 0 {
                    return Err(PolicyError::ZeroCeiling);
                }
                if floor > ceiling {
                    return Err(PolicyError::FloorAboveCeiling {
                        floor: *floor,
                        ceiling: *ceiling,
                    });
                }
                Ok(())
            }
        }
    }

    /// The rate a fixed or windowed policy sets at `wall`; `None` for an
    /// adaptive one (its controller decides).
    pub fn scheduled(&self, wall: Timestamp) -> Option<Rate> {
        match self {
            Policy::Fixed(r) => Some(*r),
            Policy::Windows { zone, default, windows } => {
                let local = wall.to_zoned_datetime(zone.clone());
                let (day, time) = (local.weekday(), local.time());
                let hit = windows.iter().find(|w| {
                    w.days.contains(&day) && w.start <= time && w.end.is_none_or(|e| time < e)
                });
                Some(hit.map_or(*default, |w| w.rate))
            }
            Policy::Adaptive { .. } => None,
        }
    }
}

/// The adaptive controller: additive increase, multiplicative decrease on
/// round-trip time. The baseline is the lowest RTT seen in the last two
/// 10 s periods (so it follows a path that changed); when the smoothed RTT
/// rises above 1.5x the baseline plus 5 ms (a queue is building; the 5 ms
/// keep a LAN's jitter and one batch's serialisation from counting), the rate
/// is cut to 0.7x, at most once per smoothed RTT; otherwise it rises by 5%
/// of the ceiling per second. It stays within [floor, ceiling].
#[derive(Debug, Clone)]
pub struct Adaptive {
    floor: f64,
    ceiling: f64,
    rate: f64,
    srtt: Option<Duration>,
    /// Lowest RTT of the current and the previous period.
    base: [Option<Duration>; 2],
    period_start: Duration,
    last_update: Option<Duration>,
    last_cut: Option<Duration>,
}

const BASE_PERIOD: Duration = Duration::from_secs(10);

impl Adaptive {
    /// Starts at the ceiling's half (or the floor, if higher).
    pub fn new(floor: u64, ceiling: u64) -> Self {
        let (floor, ceiling) = (floor as f64, ceiling as f64);
        Adaptive {
            floor,
            ceiling,
            rate: (ceiling / 2.0).max(floor),
            srtt: None,
            base: [None, None],
            period_start: Duration::ZERO,
            last_update: None,
            last_cut: None,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    fn baseline(&self) -> Option<Duration> {
        self.base.iter().flatten().min().copied()
    }

    /// Takes an RTT sample taken at `now`.
    pub fn on_rtt(&mut self, sample: Duration, now: Duration) {
        if now >= self.period_start + BASE_PERIOD {
            self.base = [None, self.base[0]];
            self.period_start = now;
        }
        self.base[0] = Some(self.base[0].map_or(sample, |b| b.min(sample)));
        let srtt = match self.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        };
        self.srtt = Some(srtt);
        let base = self.baseline().expect("a sample was just taken");
        let since = self.last_update.map_or(Duration::ZERO, |t| now.saturating_sub(t));
        self.last_update = Some(now);
        let congested = srtt.as_secs_f64() > base.as_secs_f64() * 1.5 + 0.005;
        if congested {
            if self.last_cut.is_none_or(|t| now.saturating_sub(t) >= srtt) {
                self.rate *= 0.7;
                self.last_cut = Some(now);
            }
        } else {
            self.rate += self.ceiling * 0.05 * since.as_secs_f64();
        }
        self.rate = self.rate.clamp(self.floor, self.ceiling);
    }
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may go now; negative: debt to wait off.
    tokens: f64,
    last: Duration,
}

/// Holds a copy to its link's policy and, when given one, to an agent-wide
/// cap shared by all links.
#[derive(Debug)]
pub struct Limiter {
    clock: Arc<dyn Clock>,
    policy: Mutex<Policy>,
    adaptive: Mutex<Option<Adaptive>>,
    bucket: Mutex<Bucket>,
    /// Most bytes that may go at once after an idle spell, in seconds of
    /// the rate (at least [`MIN_BURST`] bytes).
    burst_secs: f64,
    parent: Option<Arc<Limiter>>,
}

/// The least burst, so that one batch can always go.
pub const MIN_BURST: f64 = 256.0 * 1024.0;

impl Limiter {
    pub fn new(
        clock: Arc<dyn Clock>,
        policy: Policy,
        parent: Option<Arc<Limiter>>,
    ) -> Result<Self, PolicyError> {
        policy.validate()?;
        let adaptive = match &policy {
            Policy::Adaptive { floor, ceiling } => Some(Adaptive::new(*floor, *ceiling)),
            _ => None,
        };
        let last = clock.mono();
        Ok(Limiter {
            clock,
            policy: Mutex::new(policy),
            adaptive: Mutex::new(adaptive),
            bucket: Mutex::new(Bucket { tokens: 0.0, last }),
            burst_secs: 0.1,
            parent,
        })
    }

    /// Replaces the policy; a copy waiting in [`Limiter::acquire`] sees it
    /// within [`RECHECK`].
    pub fn set_policy(&self, policy: Policy) -> Result<(), PolicyError> {
        policy.validate()?;
        let mut adaptive = self.adaptive.lock().unwrap();
        *adaptive = match (&policy, adaptive.take()) {
            (Policy::Adaptive { floor, ceiling }, Some(mut a)) => {
                a.floor = *floor as f64;
                a.ceiling = *ceiling as f64;
                a.rate = a.rate.clamp(a.floor, a.ceiling);
                Some(a)
            }
            (Policy::Adaptive { floor, ceiling }, None) => Some(Adaptive::new(*floor, *ceiling)),
            _ => None,
        };
        *self.policy.lock().unwrap() = policy;
        Ok(())
    }

    /// The rate in force now.
    pub fn rate(&self) -> Rate {
        let scheduled = self.policy.lock().unwrap().scheduled(self.clock.wall());
        match scheduled {
            Some(r) => r,
            None => {
                Rate::BytesPerSec(self.adaptive.lock().unwrap().as_ref().map_or(0, Adaptive::rate))
            }
        }
    }

    /// Feeds an RTT sample to an adaptive policy (ignored otherwise).
    pub fn on_rtt(&self, sample: Duration) {
        let now = self.clock.mono();
        if let Some(a) = self.adaptive.lock().unwrap().as_mut() {
            a.on_rtt(sample, now);
        }
    }

    /// Waits until `bytes` may be sent under this limiter and its parent.
    pub async fn acquire(&self, bytes: u64) {
        loop {
            match self.try_take(bytes) {
                Ok(()) => break,
                Err(wait) => self.clock.sleep(wait.min(RECHECK)).await,
            }
        }
        if let Some(p) = &self.parent {
            Box::pin(p.acquire(bytes)).await;
        }
    }

    /// Takes `bytes` if the bucket is not in debt; else how long until it
    /// is not (a paused link: [`RECHECK`]).
    fn try_take(&self, bytes: u64) -> Result<(), Duration> {
        let rate = self.rate();
        let now = self.clock.mono();
        let mut b = self.bucket.lock().unwrap();
        let elapsed = now.saturating_sub(b.last).as_secs_f64();
        b.last = now;
        let per_sec = match rate {
            Rate::Unlimited => {
                b.tokens = 0.0;
                return Ok(());
            }
            Rate::BytesPerSec(0) => return Err(RECHECK),
            Rate::BytesPerSec(r) => r as f64,
        };
        let burst = (per_sec * self.burst_secs).max(MIN_BURST);
        b.tokens = (b.tokens + per_sec * elapsed).min(burst);
        if b.tokens < 0.0 {
            return Err(Duration::from_secs_f64(-b.tokens / per_sec));
        }
        b.tokens -= bytes as f64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Monday 2026-11-23 08:00 in Berlin (07:00 UTC).
    fn monday_8am_berlin() -> Timestamp {
        "2026-11-23T07:00:00Z".parse().unwrap()
    }

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(monday_8am_berlin()))
    }

    /// Sends `batch`-byte batches for `secs` of clock time; the rate achieved.
    async fn achieved(l: &Limiter, clock: &ManualClock, batch: u64, secs: u64) -> f64 {
        let start = clock.mono();
        let mut sent = 0u64;
        while clock.mono() < start + Duration::from_secs(secs) {
            l.acquire(batch).await;
            sent += batch;
        }
        sent as f64 / (clock.mono() - start).as_secs_f64()
    }

    #[tokio::test]
    async fn a_fixed_rate_holds_within_one_percent_over_20_s() {
        let c = clock();
        let l = Limiter::new(c.clone(), Policy::Fixed(Rate::BytesPerSec(10 * MIB)), None).unwrap();
        let got = achieved(&l, &c, MIB, 20).await;
        let err = (got - (10 * MIB) as f64).abs() / (10 * MIB) as f64;
        assert!(err < 0.01, "achieved {got:.0} B/s, error {:.3}", err * 100.0);
    }

    #[tokio::test]
    async fn an_agent_cap_holds_two_links_together() {
        let c = clock();
        let cap = Arc::new(
            Limiter::new(c.clone(), Policy::Fixed(Rate::BytesPerSec(4 * MIB)), None).unwrap(),
        );
        let a = Limiter::new(c.clone(), Policy::Fixed(Rate::Unlimited), Some(cap.clone())).unwrap();
        let b = Limiter::new(c.clone(), Policy::Fixed(Rate::BytesPerSec(100 * MIB)), Some(cap))
            .unwrap();
        let start = c.mono();
        let mut sent = 0u64;
        for _ in 0..40 {
            a.acquire(MIB).await;
            b.acquire(MIB).await;
            sent += 2 * MIB;
        }
        let rate = sent as f64 / (c.mono() - start).as_secs_f64();
        assert!(rate <= 4.0 * MIB as f64 * 1.02, "{rate}");
    }

    fn business_hours() -> Policy {
        let weekdays = vec![
            Weekday::Monday,
            Weekday::Tuesday,
            Weekday::Wednesday,
            Weekday::Thursday,
            Weekday::Friday,
        ];
        Policy::Windows {
            zone: Policy::zone("Europe/Berlin").unwrap(),
            default: Rate::Unlimited,
            windows: vec![
                Window {
                    days: weekdays,
                    start: "09:00".parse().unwrap(),
                    end: Some("18:00".parse().unwrap()),
                    rate: Rate::BytesPerSec(MIB),
                },
                Window {
                    days: vec![Weekday::Sunday],
                    start: "00:00".parse().unwrap(),
                    end: None,
                    rate: Rate::BytesPerSec(0),
                },
            ],
        }
    }

    #[test]
    fn windows_follow_the_local_day_and_time() {
        let p = business_hours();
        let at = |s: &str| p.scheduled(s.parse().unwrap()).unwrap();
        // 08:00 Berlin on Monday: before the window.
        assert_eq!(at("2026-11-23T07:00:00Z"), Rate::Unlimited);
        // 09:00 Berlin (08:00 UTC in winter): inside.
        assert_eq!(at("2026-11-23T08:00:00Z"), Rate::BytesPerSec(MIB));
        // 18:00 Berlin: the end is exclusive.
        assert_eq!(at("2026-11-23T17:00:00Z"), Rate::Unlimited);
        // Summer time: 09:00 Berlin is 07:00 UTC.
        assert_eq!(at("2026-07-06T07:00:00Z"), Rate::BytesPerSec(MIB));
        // Sunday, all day: paused.
        assert_eq!(at("2026-11-29T12:00:00Z"), Rate::BytesPerSec(0));
        // Saturday: the default.
        assert_eq!(at("2026-11-28T12:00:00Z"), Rate::Unlimited);
    }

    #[tokio::test]
    async fn a_copy_crossing_a_window_boundary_changes_rate() {
        let c = clock(); // 08:00 Berlin, Monday
        let l = Limiter::new(c.clone(), business_hours(), None).unwrap();
        assert_eq!(l.rate(), Rate::Unlimited);
        c.advance(Duration::from_secs(3600) - Duration::from_secs(5));
        assert_eq!(l.rate(), Rate::Unlimited);
        c.advance(Duration::from_secs(5));
        let got = achieved(&l, &c, 64 << 10, 10).await;
        assert!((got / MIB as f64 - 1.0).abs() < 0.05, "{got}");
    }

    #[test]
    fn bad_policies_are_refused_with_what_is_wrong() {
        let mut p = business_hours();
        if let Policy::Windows { windows, .. } = &mut p {
            windows[0].end = Some("08:00".parse().unwrap());
        }
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("window 0") && e.contains("not after its start"), "{e}");
        let e = Policy::Adaptive { floor: 10, ceiling: 5 }.validate().unwrap_err().to_string();
        assert!(e.contains("floor"), "{e}");
        let e = Policy::zone("Mars/Olympus").unwrap_err().to_string();
        assert!(e.contains("Mars/Olympus") && e.contains("IANA"), "{e}");
    }

    #[tokio::test]
    async fn a_paused_link_waits_and_a_policy_change_reaches_it() {
        let c = clock();
        let l =
            Arc::new(Limiter::new(c.clone(), Policy::Fixed(Rate::BytesPerSec(0)), None).unwrap());
        // A real clock would let the waiter spin; here sleeps advance time,
        // so the change is made from "another task" after some waits.
        let start = c.mono();
        let mut polls = 0;
        while l.try_take(MIB).is_err() {
            polls += 1;
            c.sleep(RECHECK).await;
            if polls == 8 {
                l.set_policy(Policy::Fixed(Rate::Unlimited)).unwrap();
            }
        }
        assert_eq!(polls, 8);
        assert!(c.mono() - start <= RECHECK * 8, "seen within one recheck of the change");
    }

    #[test]
    fn adaptive_backs_off_when_rtt_rises_and_recovers_slowly() {
        let mut a = Adaptive::new(MIB, 100 * MIB);
        let ms = Duration::from_millis;
        let mut now = Duration::ZERO;
        for _ in 0..120 {
            now += ms(100);
            a.on_rtt(ms(10), now);
        }
        assert_eq!(a.rate(), 100 * MIB, "no queue: up to the ceiling");
        for _ in 0..30 {
            now += ms(100);
            a.on_rtt(ms(60), now);
        }
        let low = a.rate();
        assert!(low < 10 * MIB, "a queue: backed off to {low}");
        assert!(low >= MIB, "never below the floor");
        // The smoothed RTT takes ~15 samples to fall back under the
        // threshold; then +5% of the ceiling per second.
        for _ in 0..20 {
            now += ms(100);
            a.on_rtt(ms(10), now);
        }
        let recovered = a.rate();
        assert!(recovered > low && recovered < low + 6 * MIB, "slowly back up: {recovered}");
    }
}
