//! The links this agent sends: each copies one volume (its head open here)
//! to a target volume at another site, with its own bandwidth policy,
//! source selection, compression and cursor (the last snapshot the target
//! has from it). A volume may have several links (fan-out); a link's volume
//! may itself be a remote copy (cascade A -> B -> C: snapshots are forwarded
//! once they are complete here).
//!
//! Links live in the agent's redb (table `source_links`, the protobuf
//! `LinkStatus` as the value); the pairing secret is kept there in full,
//! since this end presents it (the receiver keeps only its hash).
//!
//! Invariants: at most one copy runs per link; a snapshot a link still needs
//! (its cursor, and every snapshot after it not yet copied) is not deleted
//! ([`Links::needed_by`]); a running copy's limiter takes a new policy at
//! once (it looks at it at least every 250 ms).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use cairn_api::{
    SnapshotId, VolumeId,
    agent::v1::{self as pb},
    convert,
    snapshot::SnapshotInfo,
};
use jiff::civil::{Time, Weekday};
use prost::Message;
use tonic::Status;

use crate::{
    copy::{
        bandwidth::{Clock, Limiter, Policy, Rate, SystemClock, Window},
        receiver::receiving_links,
        sender::{
            Compress, CopyError, CopyProgress, CopyReport, LinkTarget, promote_target,
            send_snapshot, target_snapshots,
        },
        session::sender::Fault,
        tls::SiteTls,
    },
    head::{SourcePick, VolumeHead},
    head_service::{HeadLookup, head_status},
    meta::SOURCE_LINKS,
    store::Store,
};

/// The refusal for a copy that failed, with the code its cause calls for.
pub fn copy_status(e: CopyError) -> Status {
    match e {
        CopyError::Head(h) => head_status(h),
        CopyError::Snapshot { .. } => Status::failed_precondition(e.to_string()),
        CopyError::Connect { .. } => Status::unavailable(e.to_string()),
        CopyError::Receiver { ref status, .. } => Status::new(status.code(), e.to_string()),
        CopyError::Session { ref fault, .. } => match fault {
            Fault::Start(_)
            | Fault::Unexpected(_)
            | Fault::DigestLength(_)
            | Fault::Malformed(_) => Status::internal(e.to_string()),
            Fault::Ended => Status::aborted(e.to_string()),
            Fault::DigestMismatch { .. } => Status::data_loss(e.to_string()),
        },
    }
}

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

/// What runs for a link now (not persisted).
#[derive(Debug, Default)]
struct Runtime {
    progress: Arc<Mutex<CopyProgress>>,
    /// The running copy's limiter, to hand it a new policy.
    limiter: Option<Arc<Limiter>>,
    /// Held while a copy or sync of the link runs.
    running: Arc<tokio::sync::Mutex<()>>,
    /// A snapshot completed while a sync ran: sync again after it.
    again: Arc<AtomicBool>,
    last_error: String,
}

/// The links this agent sends.
#[derive(Debug)]
pub struct Links {
    store: Arc<Store>,
    heads: HeadLookup,
    tls: Option<SiteTls>,
    /// The agent-wide cap every link's limiter answers to.
    cap: Option<Arc<Limiter>>,
    clock: Arc<dyn Clock>,
    runtime: Mutex<BTreeMap<String, Runtime>>,
    /// The link of each volume's most recent copy.
    last_by_volume: Mutex<BTreeMap<VolumeId, String>>,
}

fn internal(e: crate::Error) -> Status {
    crate::service::status(e)
}

impl Links {
    pub fn new(store: Arc<Store>, heads: HeadLookup) -> Self {
        Links {
            store,
            heads,
            tls: None,
            cap: None,
            clock: Arc::new(SystemClock::default()),
            runtime: Default::default(),
            last_by_volume: Default::default(),
        }
    }

    pub fn with_site_tls(mut self, tls: Option<SiteTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Caps all links of this agent together at `rate` bytes/s.
    pub fn with_cap(mut self, rate: Option<u64>) -> Self {
        self.cap = rate.map(|r| {
            Arc::new(
                Limiter::new(self.clock.clone(), Policy::Fixed(Rate::BytesPerSec(r)), None)
                    .expect("a fixed policy is valid"),
            )
        });
        self
    }

    /// This agent's mutual-TLS material for copies.
    pub fn site_tls(&self) -> Option<SiteTls> {
        self.tls.clone()
    }

    fn record(&self, id: &str) -> Result<Option<pb::LinkStatus>, Status> {
        let raw = self.store.get_meta(SOURCE_LINKS, id).map_err(internal)?;
        raw.map(|r| {
            pb::LinkStatus::decode(&r[..]).map_err(|e| {
                Status::data_loss(format!("link {id}: its record does not decode: {e}"))
            })
        })
        .transpose()
    }

    fn save(&self, rec: &pb::LinkStatus) -> Result<(), Status> {
        let mut stored = rec.clone();
        (stored.progress, stored.last_error, stored.current_rate_bytes_per_sec) =
            (None, String::new(), 0);
        let id = &rec.link.as_ref().expect("a record has its link").link_id;
        self.store.put_meta(SOURCE_LINKS, id, Some(&stored.encode_to_vec())).map_err(internal)
    }

    fn records(&self) -> Result<Vec<pb::LinkStatus>, Status> {
        let rows = self.store.list_meta(SOURCE_LINKS).map_err(internal)?;
        Ok(rows.into_iter().filter_map(|(_, v)| pb::LinkStatus::decode(&v[..]).ok()).collect())
    }

    /// A link's record with what runs now (progress, last error, rate).
    fn status(&self, mut rec: pb::LinkStatus) -> pb::LinkStatus {
        let id = rec.link.as_ref().map(|l| l.link_id.clone()).unwrap_or_default();
        let rt = self.runtime.lock().unwrap();
        if let Some(r) = rt.get(&id) {
            let p = r.progress.lock().unwrap().clone();
            if !p.snapshot.is_empty() {
                rec.progress = Some(progress_pb(&p));
            }
            rec.last_error = r.last_error.clone();
            rec.current_rate_bytes_per_sec = match r.limiter.as_ref().map(|l| l.rate()) {
                Some(Rate::Unlimited) => u64::MAX,
                Some(Rate::BytesPerSec(n)) => n,
                None => 0,
            };
        }
        rec
    }

    fn with_runtime<T>(&self, id: &str, f: impl FnOnce(&mut Runtime) -> T) -> T {
        f(self.runtime.lock().unwrap().entry(id.to_string()).or_default())
    }

    /// Creates or replaces a link; a running copy of it takes the new policy.
    pub fn put(&self, link: pb::Link) -> Result<pb::LinkStatus, Status> {
        let bad = |m: String| Status::invalid_argument(format!("link {:?}: {m}", link.link_id));
        if link.link_id.is_empty() || link.link_id.len() > 253 {
            return Err(Status::invalid_argument("link_id must be 1 to 253 characters"));
        }
        let volume =
            convert::volume_id("volume_id", &link.volume_id).map_err(|e| bad(e.to_string()))?;
        if !(link.target_endpoint.starts_with("http://")
            || link.target_endpoint.starts_with("https://"))
        {
            return Err(bad(format!(
                "target_endpoint {:?} is not an http:// or https:// address of the receiving agent",
                link.target_endpoint
            )));
        }
        if link.pairing_secret.len() < crate::copy::receiver::MIN_SECRET_BYTES {
            return Err(bad(format!(
                "the pairing secret has {} bytes; use at least {} random bytes (the same as registered at the receiver)",
                link.pairing_secret.len(),
                crate::copy::receiver::MIN_SECRET_BYTES
            )));
        }
        let policy = policy_from_pb(link.policy.as_ref()).map_err(&bad)?;
        source_from_pb(link.source).map_err(&bad)?;
        Compress::from_pb(link.compression).map_err(&bad)?;
        let mut rec = self.record(&link.link_id)?.unwrap_or_default();
        if rec.link.as_ref().is_some_and(|l| l.volume_id != volume.as_str()) {
            // Another volume: what the old one copied says nothing here.
            rec = pb::LinkStatus::default();
        }
        rec.link = Some(link.clone());
        self.save(&rec)?;
        let limiter = self.with_runtime(&link.link_id, |r| r.limiter.clone());
        if let Some(l) = limiter {
            l.set_policy(policy).map_err(|e| bad(e.to_string()))?;
            tracing::info!(link = %link.link_id, "the running copy takes the new policy");
        }
        Ok(self.status(rec))
    }

    pub fn delete(&self, id: &str) -> Result<(), Status> {
        let running = self.with_runtime(id, |r| r.running.clone());
        let _idle = running.try_lock().map_err(|_| {
            Status::failed_precondition(format!(
                "a copy of link {id} is running: wait for it to end, then delete the link"
            ))
        })?;
        if self.record(id)?.is_none() {
            return Err(Status::not_found(format!("no link {id} is sent from this agent")));
        }
        self.store.put_meta(SOURCE_LINKS, id, None).map_err(internal)?;
        self.runtime.lock().unwrap().remove(id);
        Ok(())
    }

    pub fn list(&self, volume: &str) -> Result<Vec<pb::LinkStatus>, Status> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|r| volume.is_empty() || r.link.as_ref().is_some_and(|l| l.volume_id == volume))
            .map(|r| self.status(r))
            .collect())
    }

    /// The running or last copy of a link, or of a volume's latest link.
    pub fn progress(&self, volume: &VolumeId, link: &str) -> Option<CopyProgress> {
        let link = match link {
            "" => self.last_by_volume.lock().unwrap().get(volume)?.clone(),
            l => l.to_string(),
        };
        let rt = self.runtime.lock().unwrap();
        rt.get(&link).map(|r| r.progress.lock().unwrap().clone())
    }

    /// Why `snapshot` of `volume` may not be deleted now: a link sending
    /// the volume still needs it (it is the link's last copied snapshot, or
    /// after it and not copied yet), or a link received it here last (the
    /// base of that link's next copy).
    pub fn needed_by(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        line: &[SnapshotInfo],
    ) -> Result<Option<String>, Status> {
        let pos = |id: &str| line.iter().position(|s| s.id.as_str() == id);
        let Some(at) = pos(snapshot.as_str()) else { return Ok(None) };
        let mut why = Vec::new();
        for rec in self.records()? {
            let Some(link) = rec.link.as_ref().filter(|l| l.volume_id == volume.as_str()) else {
                continue;
            };
            let Some(cursor) = pos(&rec.last_copied_snapshot_id) else { continue };
            if at == cursor {
                why.push(format!(
                    "snapshot {snapshot} is the last one link {} copied to its target: its next copy sends the layer on top of it",
                    link.link_id
                ));
            } else if at > cursor {
                why.push(format!(
                    "link {} has not copied snapshot {snapshot} yet (it has up to {}): sync the link first (SyncLink)",
                    link.link_id, rec.last_copied_snapshot_id
                ));
            }
        }
        for (id, rec) in receiving_links(&self.store).map_err(internal)? {
            if rec.target_volume == volume.as_str()
                && rec.last_snapshot.as_deref() == Some(snapshot.as_str())
            {
                why.push(format!(
                    "snapshot {snapshot} is the newest one link {id} copied here: the link's next copy is the layer on top of it; keep it until a newer one arrives, or drop the link here (UnregisterLink)"
                ));
            }
        }
        Ok((!why.is_empty())
            .then(|| format!("{}; or delete the link (DeleteLink) to let it go", why.join("; "))))
    }

    fn target(&self, link: &pb::Link) -> Result<LinkTarget, Status> {
        Ok(LinkTarget {
            endpoint: link.target_endpoint.clone(),
            link_id: link.link_id.clone(),
            secret: link.pairing_secret.clone(),
            tls: self.tls.clone(),
            source: source_from_pb(link.source).map_err(Status::invalid_argument)?,
            compress: Compress::from_pb(link.compression).map_err(Status::invalid_argument)?,
        })
    }

    /// Copies one snapshot over a link (registered or not: `CopySnapshot`
    /// names its target in the request), under the link's limiter; records
    /// the cursor of a registered link on success. The caller holds the
    /// link's running lock.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_one(
        &self,
        head: &VolumeHead,
        target: &LinkTarget,
        policy: Policy,
        snapshot: &SnapshotId,
        base: Option<&SnapshotId>,
        resync: bool,
    ) -> Result<CopyReport, Status> {
        let limiter = Arc::new(
            Limiter::new(self.clock.clone(), policy, self.cap.clone())
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        );
        let id = target.link_id.clone();
        let progress = self.with_runtime(&id, |r| {
            r.limiter = Some(limiter.clone());
            r.progress.clone()
        });
        self.last_by_volume.lock().unwrap().insert(head.volume().clone(), id.clone());
        let result = send_snapshot(head, target, snapshot, base, resync, &limiter, &progress).await;
        self.with_runtime(&id, |r| {
            r.limiter = None;
            r.last_error = match &result {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            };
        });
        let report = result.map_err(copy_status)?;
        if let Some(mut rec) = self.record(&id)?
            && rec.link.as_ref().is_some_and(|l| l.volume_id == head.volume().as_str())
        {
            let info = head.snapshots().await.map_err(head_status)?;
            let generation = info.iter().find(|s| &s.id == snapshot).map_or(0, |s| s.generation);
            rec.last_copied_snapshot_id = snapshot.to_string();
            rec.last_copied_generation = generation;
            rec.last_copied_digest = Bytes::copy_from_slice(&report.digest.0);
            rec.last_copied_at_unix = jiff::Timestamp::now().as_second();
            self.save(&rec)?;
        }
        Ok(report)
    }

    /// The lock that admits one copy of a link at a time.
    pub fn running(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.with_runtime(id, |r| r.running.clone())
    }

    /// Copies every snapshot the link's target lacks (see `SyncLink`).
    pub async fn sync(
        self: &Arc<Self>,
        id: &str,
        resync: bool,
    ) -> Result<pb::SyncLinkResponse, Status> {
        let running = self.running(id);
        let guard = running.try_lock().map_err(|_| {
            Status::failed_precondition(format!(
                "a copy of link {id} is already running: wait for it (ListLinks shows its progress)"
            ))
        })?;
        let result = self.sync_locked(id, resync).await;
        if let Err(e) = &result {
            self.with_runtime(id, |r| r.last_error = e.message().to_string());
        }
        drop(guard);
        if self.with_runtime(id, |r| r.again.load(Ordering::SeqCst)) {
            self.clone().forward(id.to_string());
        }
        result
    }

    async fn sync_locked(&self, id: &str, resync: bool) -> Result<pb::SyncLinkResponse, Status> {
        let rec = self
            .record(id)?
            .ok_or_else(|| Status::not_found(format!("no link {id} is sent from this agent")))?;
        let link = rec.link.clone().expect("a record has its link");
        let volume = convert::volume_id("volume_id", &link.volume_id)
            .map_err(|e| Status::data_loss(format!("link {id}: {e}")))?;
        let (head, _) = self.heads.get(&volume).await.ok_or_else(|| {
            Status::failed_precondition(format!(
                "link {id}: the head of volume {volume} is not open on this agent: open it here first (OpenHead)"
            ))
        })?;
        let policy = policy_from_pb(link.policy.as_ref()).map_err(Status::invalid_argument)?;
        let target = self.target(&link)?;
        let theirs: Vec<_> = target_snapshots(&target)
            .await
            .map_err(copy_status)?
            .into_iter()
            .filter(|t| !t.divergent)
            .collect();
        let ours: Vec<SnapshotInfo> = head
            .snapshots()
            .await
            .map_err(head_status)?
            .into_iter()
            .filter(|s| !s.divergent)
            .collect();
        // The newest snapshot both have: same id, generation and digest.
        let mut common = None;
        for (i, s) in ours.iter().enumerate().rev() {
            if let Some(t) = theirs.iter().find(|t| t.id == s.id && t.generation == s.generation)
                && head.digest(Some(&s.id)).await.map_err(head_status)? == t.digest
            {
                common = Some(i);
                break;
            }
        }
        let later: Vec<SnapshotId> = match common {
            None => theirs.iter().map(|t| t.id.clone()).collect(),
            Some(i) => {
                let at = theirs.iter().position(|t| t.id == ours[i].id).expect("found above");
                theirs[at + 1..].iter().map(|t| t.id.clone()).collect()
            }
        };
        let names =
            |v: &[SnapshotId]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
        if !later.is_empty() && !resync {
            return Err(Status::failed_precondition(match common {
                None => format!(
                    "link {id}: the target has snapshots ({}) but shares none with volume {volume}: a full copy needs an empty target; resync rolls it back to empty, keeping them marked divergent",
                    names(&later)
                ),
                Some(i) => format!(
                    "link {id}: the target has snapshots after {} that volume {volume} lacks ({}): the volumes diverged (a failover?); resync rolls the target back to {}, keeping them marked divergent",
                    ours[i].id,
                    names(&later),
                    ours[i].id
                ),
            }));
        }
        let plan: Vec<(SnapshotId, Option<SnapshotId>)> = match common {
            None => ours.last().map(|s| (s.id.clone(), None)).into_iter().collect(),
            Some(i) => ours[i + 1..]
                .iter()
                .enumerate()
                .map(|(k, s)| (s.id.clone(), Some(ours[i + k].id.clone())))
                .collect(),
        };
        if plan.is_empty() && !later.is_empty() {
            return Err(Status::failed_precondition(format!(
                "link {id}: nothing of volume {volume} is newer than the shared snapshot, so the target cannot be resynchronised yet: take a snapshot of {volume} first"
            )));
        }
        let mut copies = Vec::with_capacity(plan.len());
        for (k, (snap, base)) in plan.iter().enumerate() {
            let report = self
                .copy_one(&head, &target, policy.clone(), snap, base.as_ref(), resync && k == 0)
                .await?;
            copies.push(report_pb(snap, &report));
        }
        tracing::info!(link = %id, %volume, copied = copies.len(), "link in sync");
        let status = self.status(self.record(id)?.expect("still there"));
        Ok(pb::SyncLinkResponse {
            copies,
            common_snapshot_id: common.map(|i| ours[i].id.to_string()).unwrap_or_default(),
            divergent_snapshot_ids: later.iter().map(|s| s.to_string()).collect(),
            status: Some(status),
        })
    }

    /// A snapshot of `volume` is complete here (sealed by its head, or
    /// received): the links of the volume that forward are synced.
    pub fn snapshot_complete(self: &Arc<Self>, volume: &VolumeId) {
        let Ok(records) = self.records() else { return };
        for rec in records {
            if let Some(l) = rec.link.filter(|l| l.forward && l.volume_id == volume.as_str()) {
                self.with_runtime(&l.link_id, |r| r.again.store(true, Ordering::SeqCst));
                self.clone().forward(l.link_id);
            }
        }
    }

    /// Syncs a forwarding link in the background unless a sync of it runs
    /// (that one syncs again when it ends).
    fn forward(self: Arc<Self>, id: String) {
        tokio::spawn(async move {
            let running = self.running(&id);
            let Ok(guard) = running.try_lock_owned() else { return };
            while self.with_runtime(&id, |r| r.again.swap(false, Ordering::SeqCst)) {
                match self.sync_locked(&id, false).await {
                    Ok(r) => tracing::info!(link = %id, copies = r.copies.len(), "forwarded"),
                    Err(e) => {
                        tracing::warn!(link = %id, error = %e.message(), "forwarding failed; the next snapshot or SyncLink retries");
                        self.with_runtime(&id, |r| r.last_error = e.message().to_string());
                    }
                }
            }
            drop(guard);
        });
    }

    /// Promotes the link's target volume at its site.
    pub async fn promote_target(&self, id: &str) -> Result<cairn_api::Digest, Status> {
        let rec = self
            .record(id)?
            .ok_or_else(|| Status::not_found(format!("no link {id} is sent from this agent")))?;
        let target = self.target(rec.link.as_ref().expect("a record has its link"))?;
        promote_target(&target).await.map_err(copy_status)
    }

    /// The volume a registered link sends.
    pub fn volume_of(&self, id: &str) -> Result<VolumeId, Status> {
        let rec = self
            .record(id)?
            .ok_or_else(|| Status::not_found(format!("no link {id} is sent from this agent")))?;
        let link = rec.link.expect("a record has its link");
        convert::volume_id("volume_id", &link.volume_id)
            .map_err(|e| Status::data_loss(format!("link {id}: {e}")))
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
