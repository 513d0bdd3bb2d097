//! The links this agent sends: each copies one volume (its head open here)
//! to a target volume at another site, with its own bandwidth policy,
//! source selection, compression and cursor (the last snapshot the target
//! has from it). A volume may have several links (fan-out); a link's volume
//! may itself be a remote copy (cascade A -> B -> C: snapshots are forwarded
//! once they are complete here).
//!
//! Links live in the agent's redb (table `source_links`, a serde record:
//! [`records`](crate::copy::records)); the pairing secret is kept there in
//! full, since this end presents it (the receiver keeps only its hash).
//! In memory a link is its protobuf `LinkStatus`, the form the API shows.
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

use crate::{
    copy::{
        bandwidth::{Clock, Limiter, Policy, Rate, SystemClock},
        convert::{policy_from_pb, progress_pb, report_pb, source_from_pb},
        records::{MIN_SECRET_BYTES, receiving_links},
        records::{decode_source_link, encode_source_link},
        sender::{
            Compress, CopyError, CopyProgress, CopyReport, LinkTarget, promote_target,
            send_snapshot, target_snapshots,
        },
        tls::SiteTls,
    },
    head::{HeadError, VolumeHead},
    heads::{Heads, HeadsError},
    meta::SOURCE_LINKS,
    store::Store,
};

/// Why a link operation was refused or failed; the gRPC edge maps each to
/// a status code (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link_id must be 1 to 253 characters")]
    BadId,
    #[error("link {link:?}: {why}")]
    Invalid { link: String, why: String },
    /// A setting (policy, source, compression) that does not parse.
    #[error("{0}")]
    Setting(String),
    #[error("no link {link} is sent from this agent")]
    NotFound { link: String },
    #[error("link {link}: {why}")]
    Damaged { link: String, why: String },
    #[error("a copy of link {link} is running: wait for it to end, then delete the link")]
    Busy { link: String },
    #[error("a copy of link {link} is already running: wait for it ({watch})")]
    Running { link: String, watch: &'static str },
    #[error(
        "link {link}: the head of volume {volume} is not open on this agent: open it here first (OpenHead)"
    )]
    HeadNotOpen { link: String, volume: VolumeId },
    #[error(
        "link {link}: the target has snapshots ({theirs}) but shares none with volume {volume}: a full copy needs an empty target; resync rolls it back to empty, keeping them marked divergent"
    )]
    NoCommonBase { link: String, volume: VolumeId, theirs: String },
    #[error(
        "link {link}: the target has snapshots after {common} that volume {volume} lacks ({theirs}): the volumes diverged (a failover?); resync rolls the target back to {common}, keeping them marked divergent"
    )]
    Diverged { link: String, volume: VolumeId, common: SnapshotId, theirs: String },
    #[error(
        "link {link}: nothing of volume {volume} is newer than the shared snapshot, so the target cannot be resynchronised yet: take a snapshot of {volume} first"
    )]
    NothingNewer { link: String, volume: VolumeId },
    #[error("volume {volume} has no snapshot {snapshot}")]
    NoSnapshot { volume: VolumeId, snapshot: SnapshotId },
    /// A snapshot a link still needs (the message says which and why).
    #[error("{0}")]
    Needed(String),
    #[error(
        "switchover of link {link}: volume {volume} is demoted here (snapshot {snapshot} sealed) but the final copy failed: {source}; call Switchover again to resume it, or PromoteHead here to go back"
    )]
    FinalCopy {
        link: String,
        volume: VolumeId,
        snapshot: SnapshotId,
        #[source]
        source: Box<LinkError>,
    },
    #[error(
        "switchover of link {link}: the promoted target's digest {got} differs from snapshot {snapshot}'s {want}"
    )]
    TargetDigest {
        link: String,
        snapshot: SnapshotId,
        got: cairn_api::Digest,
        want: cairn_api::Digest,
    },
    #[error("{0}")]
    Copy(#[from] CopyError),
    #[error("{0}")]
    Head(#[from] HeadError),
    #[error("{0}")]
    Heads(#[from] HeadsError),
    #[error("{0}")]
    Store(#[from] crate::Error),
}

pub type LinkResult<T> = Result<T, LinkError>;

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
    heads: Heads,
    tls: Option<SiteTls>,
    /// The agent-wide cap every link's limiter answers to.
    cap: Option<Arc<Limiter>>,
    clock: Arc<dyn Clock>,
    runtime: Mutex<BTreeMap<String, Runtime>>,
    /// The link of each volume's most recent copy.
    last_by_volume: Mutex<BTreeMap<VolumeId, String>>,
}

impl Links {
    pub fn new(store: Arc<Store>, heads: Heads) -> Self {
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

    fn record(&self, id: &str) -> LinkResult<Option<pb::LinkStatus>> {
        let raw = self.store.get_meta(SOURCE_LINKS, id)?;
        raw.map(|r| {
            decode_source_link(&r).map_err(|e| LinkError::Damaged {
                link: id.to_string(),
                why: format!("its record does not decode: {e}"),
            })
        })
        .transpose()
    }

    /// The record of a link sent from here (refused when there is none).
    fn existing(&self, id: &str) -> LinkResult<pb::LinkStatus> {
        self.record(id)?.ok_or_else(|| LinkError::NotFound { link: id.to_string() })
    }

    fn save(&self, rec: &pb::LinkStatus) -> LinkResult<()> {
        let id = &rec.link.as_ref().expect("a record has its link").link_id;
        Ok(self.store.put_meta(SOURCE_LINKS, id, Some(&encode_source_link(rec)))?)
    }

    fn records(&self) -> LinkResult<Vec<pb::LinkStatus>> {
        let rows = self.store.list_meta(SOURCE_LINKS)?;
        Ok(rows.into_iter().filter_map(|(_, v)| decode_source_link(&v).ok()).collect())
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
    pub fn put(&self, link: pb::Link) -> LinkResult<pb::LinkStatus> {
        let bad = |why: String| LinkError::Invalid { link: link.link_id.clone(), why };
        if link.link_id.is_empty() || link.link_id.len() > 253 {
            return Err(LinkError::BadId);
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
        if link.pairing_secret.len() < MIN_SECRET_BYTES {
            return Err(bad(format!(
                "the pairing secret has {} bytes; use at least {} random bytes (the same as registered at the receiver)",
                link.pairing_secret.len(),
                MIN_SECRET_BYTES
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

    pub fn delete(&self, id: &str) -> LinkResult<()> {
        let running = self.with_runtime(id, |r| r.running.clone());
        let _idle = running.try_lock().map_err(|_| LinkError::Busy { link: id.to_string() })?;
        self.existing(id)?;
        self.store.put_meta(SOURCE_LINKS, id, None)?;
        self.runtime.lock().unwrap().remove(id);
        Ok(())
    }

    pub fn list(&self, volume: &str) -> LinkResult<Vec<pb::LinkStatus>> {
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
    ) -> LinkResult<Option<String>> {
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
        for (id, rec) in receiving_links(&self.store)? {
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

    fn target(&self, link: &pb::Link) -> LinkResult<LinkTarget> {
        Ok(LinkTarget {
            endpoint: link.target_endpoint.clone(),
            link_id: link.link_id.clone(),
            secret: link.pairing_secret.clone(),
            tls: self.tls.clone(),
            source: source_from_pb(link.source).map_err(LinkError::Setting)?,
            compress: Compress::from_pb(link.compression).map_err(LinkError::Setting)?,
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
    ) -> LinkResult<CopyReport> {
        let limiter = Arc::new(
            Limiter::new(self.clock.clone(), policy, self.cap.clone())
                .map_err(|e| LinkError::Setting(e.to_string()))?,
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
        let report = result?;
        if let Some(mut rec) = self.record(&id)?
            && rec.link.as_ref().is_some_and(|l| l.volume_id == head.volume().as_str())
        {
            let info = head.snapshots().await?;
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
    ) -> LinkResult<pb::SyncLinkResponse> {
        let running = self.running(id);
        let guard = running.try_lock().map_err(|_| LinkError::Running {
            link: id.to_string(),
            watch: "ListLinks shows its progress",
        })?;
        let result = self.sync_locked(id, resync).await;
        if let Err(e) = &result {
            self.with_runtime(id, |r| r.last_error = e.to_string());
        }
        drop(guard);
        if self.with_runtime(id, |r| r.again.load(Ordering::SeqCst)) {
            self.clone().forward(id.to_string());
        }
        result
    }

    async fn sync_locked(&self, id: &str, resync: bool) -> LinkResult<pb::SyncLinkResponse> {
        let rec = self.existing(id)?;
        let link = rec.link.clone().expect("a record has its link");
        let volume = convert::volume_id("volume_id", &link.volume_id)
            .map_err(|e| LinkError::Damaged { link: id.to_string(), why: e.to_string() })?;
        let (head, _) = self.heads.get(&volume).await.ok_or_else(|| LinkError::HeadNotOpen {
            link: id.to_string(),
            volume: volume.clone(),
        })?;
        let policy = policy_from_pb(link.policy.as_ref()).map_err(LinkError::Setting)?;
        let target = self.target(&link)?;
        let theirs: Vec<_> =
            target_snapshots(&target).await?.into_iter().filter(|t| !t.divergent).collect();
        let ours: Vec<SnapshotInfo> =
            head.snapshots().await?.into_iter().filter(|s| !s.divergent).collect();
        // The newest snapshot both have: same id, generation and digest.
        let mut common = None;
        for (i, s) in ours.iter().enumerate().rev() {
            if let Some(t) = theirs.iter().find(|t| t.id == s.id && t.generation == s.generation)
                && head.digest(Some(&s.id)).await? == t.digest
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
            let (link, theirs) = (id.to_string(), names(&later));
            return Err(match common {
                None => LinkError::NoCommonBase { link, volume, theirs },
                Some(i) => LinkError::Diverged { link, volume, common: ours[i].id.clone(), theirs },
            });
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
            return Err(LinkError::NothingNewer { link: id.to_string(), volume });
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
                        tracing::warn!(link = %id, error = %e, "forwarding failed; the next snapshot or SyncLink retries");
                        self.with_runtime(&id, |r| r.last_error = e.to_string());
                    }
                }
            }
            drop(guard);
        });
    }

    /// Promotes the link's target volume at its site.
    pub async fn promote_target(&self, id: &str) -> LinkResult<cairn_api::Digest> {
        let rec = self.existing(id)?;
        let target = self.target(rec.link.as_ref().expect("a record has its link"))?;
        Ok(promote_target(&target).await?)
    }

    /// The volume a registered link sends.
    pub fn volume_of(&self, id: &str) -> LinkResult<VolumeId> {
        let link = self.existing(id)?.link.expect("a record has its link");
        convert::volume_id("volume_id", &link.volume_id)
            .map_err(|e| LinkError::Damaged { link: id.to_string(), why: e.to_string() })
    }

    /// Copies one snapshot to a target a request names (`CopySnapshot`),
    /// one copy of the link at a time.
    pub async fn copy_snapshot(
        &self,
        head: &VolumeHead,
        target: &LinkTarget,
        policy: Policy,
        snapshot: &SnapshotId,
        base: Option<&SnapshotId>,
    ) -> LinkResult<CopyReport> {
        let running = self.running(&target.link_id);
        let _one = running.try_lock().map_err(|_| LinkError::Running {
            link: target.link_id.clone(),
            watch: "GetCopyProgress",
        })?;
        self.copy_one(head, target, policy, snapshot, base, false).await
    }

    /// Deletes a snapshot through its head, refused while a link still
    /// needs it ([`Links::needed_by`]); divergent ones always go.
    pub async fn delete_snapshot(&self, head: &VolumeHead, snap: &SnapshotId) -> LinkResult<()> {
        let volume = head.volume();
        let all = head.snapshots().await?;
        let Some(info) = all.iter().find(|s| &s.id == snap) else {
            return Err(LinkError::NoSnapshot { volume: volume.clone(), snapshot: snap.clone() });
        };
        if !info.divergent {
            let line: Vec<_> = all.iter().filter(|s| !s.divergent).cloned().collect();
            if let Some(why) = self.needed_by(volume, snap, &line)? {
                return Err(LinkError::Needed(why));
            }
        }
        head.delete_snapshot(snap).await?;
        tracing::info!(%volume, snapshot = %snap, "snapshot deleted");
        Ok(())
    }

    /// Planned switchover of a link: demote the volume here (sealing
    /// `snap`), copy everything the target lacks, promote the target, and
    /// check its digest. A retry after a failed copy finds the volume
    /// demoted with the snapshot there and goes on.
    pub async fn switchover(
        self: &Arc<Self>,
        id: &str,
        snap: &SnapshotId,
        generation: u64,
    ) -> LinkResult<(pb::SyncLinkResponse, cairn_api::Digest)> {
        let volume = self.volume_of(id)?;
        // 1. Demote, sealing the final snapshot.
        let (head, remote) = self.heads.with_role(&volume).await?;
        let have = head.snapshots().await?.iter().any(|s| &s.id == snap);
        if !(remote && have) {
            self.heads.demote(&volume, snap, generation).await?;
        }
        // 2. The final copy: everything the target lacks.
        let sync = self.sync(id, false).await.map_err(|e| LinkError::FinalCopy {
            link: id.to_string(),
            volume: volume.clone(),
            snapshot: snap.clone(),
            source: Box::new(e),
        })?;
        // 3. Promote the target.
        let got = self.promote_target(id).await?;
        let want = head.digest(Some(snap)).await?;
        if got != want {
            return Err(LinkError::TargetDigest {
                link: id.to_string(),
                snapshot: snap.clone(),
                got,
                want,
            });
        }
        tracing::warn!(link = %id, %volume, snapshot = %snap, "switchover done: the target is the primary now");
        Ok((sync, got))
    }
}
