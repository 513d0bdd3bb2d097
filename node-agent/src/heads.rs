//! The volume heads open on this agent: opening one with a peer for every
//! agent of the volume (this agent's own store directly, the others over
//! gRPC), its role (Primary or Remote), promote and demote, its rebuild
//! task, and its FUSE mounts (the head's file and exposed snapshots).
//!
//! Invariants: at most one head per volume is open here, and a newer epoch
//! replaces an older one; a Remote head takes writes only from copies, and
//! a promote, demote, close or replacement ends those copies first (no
//! copy byte lands after it: `role`); a head or snapshot is never
//! unmounted, replaced or demoted under an attached loop device (the
//! refusal says where it is mounted). No tonic here: the gRPC edge is
//! `grpc::volume_heads`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use cairn_api::{Digest, Geometry, SnapshotId, VolumeId, placement::PlacementAgent};

use crate::{
    frontend::{
        BlockVolume, FrontendError,
        fuse::{FuseFrontend, FuseMount},
        head_volume::{HeadVolume, SnapshotVolume},
        loop_device,
    },
    head::{AgentHealth, HeadError, HeadSpec, VolumeHead},
    peer::{GrpcPeer, LocalPeer, ReplicaPeer},
    role::{Change, Role},
    store::Store,
};

/// How often a head looks for out-of-sync replicas to rebuild, by default.
pub const DEFAULT_HEAL_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("no head of volume {volume} is open on agent {agent}: open it first (OpenHead)")]
    NotOpen { volume: VolumeId, agent: String },
    #[error("no head of volume {volume} is open on this agent")]
    NotOpenHere { volume: VolumeId },
    #[error("volume {volume} is already a primary here")]
    AlreadyPrimary { volume: VolumeId },
    #[error("volume {volume} is already a remote copy here")]
    AlreadyRemote { volume: VolumeId },
    #[error(
        "volume {volume} is a remote copy (role Remote): only copies from its primary write it; promote it (PromoteHead) to write"
    )]
    RemoteNotWritable { volume: VolumeId },
    #[error(
        "volume {volume} is a remote copy (role Remote) here and is never attached: promote it first"
    )]
    RemoteNotAttached { volume: VolumeId },
    #[error("agent {agent} has no --fuse-dir: start it with one to expose heads through FUSE")]
    NoFuseDir { agent: String },
    #[error("creating {}: {source}", path.display())]
    MountDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Fuse(#[source] FrontendError),
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(
        "volume {volume} is mounted at {} (loop device {}): unmount it and detach the loop device first",
        at.display(),
        device.display()
    )]
    Mounted { volume: VolumeId, at: PathBuf, device: PathBuf },
    #[error(
        "volume {volume} is attached to loop device {}: detach it first (losetup -d {})",
        device.display(),
        device.display()
    )]
    Attached { volume: VolumeId, device: PathBuf },
    #[error("snapshot {snapshot} of volume {volume} is not exposed")]
    NotExposed { volume: VolumeId, snapshot: SnapshotId },
    #[error("an agent has an empty name")]
    EmptyAgentName,
    #[error("agent {agent}: {why}")]
    Peer { agent: String, why: String },
    #[error(
        "volume {volume}: a head at epoch {open} is open on this agent, so an open at epoch {request} is refused (the open head keeps serving); open with a higher epoch to replace it"
    )]
    StaleOpen { volume: VolumeId, open: u64, request: u64 },
    #[error("{0}")]
    Head(#[from] HeadError),
}

pub type HeadsResult<T> = Result<T, HeadsError>;

/// One agent of a volume as an OpenHead request names it.
#[derive(Debug, Clone)]
pub struct AgentAddr {
    pub name: String,
    pub endpoint: String,
    /// Failure domain (empty: none).
    pub domain: String,
    /// Cost label for copies reading from it.
    pub cost: u32,
}

/// What a head is opened with.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub volume: VolumeId,
    pub geometry: Geometry,
    pub replicas: usize,
    pub layout_version: u64,
    pub agents: Vec<AgentAddr>,
    pub epoch: u64,
    pub stale: Vec<String>,
    /// Open even if replicas that may hold acknowledged writes are missing.
    pub accept_data_loss: bool,
    /// Role Remote: only copies write it; never attached.
    pub remote: bool,
    /// Expose the head through FUSE.
    pub fuse: bool,
}

/// An open head as a client sees it.
#[derive(Debug, Clone)]
pub struct HeadView {
    pub volume: VolumeId,
    pub epoch: u64,
    pub remote: bool,
    pub fuse_file: Option<PathBuf>,
    pub health: Vec<AgentHealth>,
}

/// What a promotion leaves: the snapshot the volume goes on from, and the
/// head's digest.
#[derive(Debug, Clone)]
pub struct Promoted {
    pub base: Option<SnapshotId>,
    pub digest: Digest,
}

/// The task that rebuilds a head's out-of-sync replicas; stopped when the
/// head is closed or replaced.
#[derive(Debug)]
struct HealTask(tokio::task::AbortHandle);

impl Drop for HealTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A head open on this agent, with its FUSE mount if it has one.
#[derive(Debug)]
struct OpenHead {
    head: Arc<VolumeHead>,
    /// Role Remote: only copies write it; clients read; never attached.
    /// Its changes fence the copy sessions writing the head.
    role: Role,
    _heal: HealTask,
    fuse: Option<std::sync::Mutex<FuseMount>>,
    /// Snapshots exposed read-only through FUSE.
    snapshots: BTreeMap<SnapshotId, std::sync::Mutex<FuseMount>>,
}

impl OpenHead {
    fn is_remote(&self) -> bool {
        self.role.is_remote()
    }

    fn fuse_file(&self) -> Option<PathBuf> {
        self.fuse.as_ref().map(|m| m.lock().unwrap().file().to_path_buf())
    }

    /// Every FUSE file of this head: the head's and its snapshots'.
    fn fuse_files(&self) -> Vec<PathBuf> {
        self.fuse_file()
            .into_iter()
            .chain(self.snapshots.values().map(|m| m.lock().unwrap().file().to_path_buf()))
            .collect()
    }

    fn view(&self) -> HeadView {
        HeadView {
            volume: self.head.volume().clone(),
            epoch: self.head.epoch(),
            remote: self.is_remote(),
            fuse_file: self.fuse_file(),
            health: self.head.health(),
        }
    }

    /// Refuses while a loop device over one of the head's FUSE files is
    /// attached, and says where its filesystem is mounted.
    fn check_detached(&self, volume: &VolumeId) -> HeadsResult<()> {
        for file in self.fuse_files() {
            check_file_detached(volume, &file)?;
        }
        Ok(())
    }
}

/// Unmounts a FUSE mount off the runtime; refused while a loop device is
/// attached (the message names it).
async fn unmount(m: std::sync::Mutex<FuseMount>) -> HeadsResult<()> {
    let mut m = m.into_inner().unwrap();
    tokio::task::spawn_blocking(move || m.unmount())
        .await
        .map_err(|source| HeadsError::Task { what: "unmount", source })?
        .map_err(HeadsError::Fuse)
}

/// Waits (up to 3 s) while the loop devices over `files` are all on their
/// way out: `losetup -d` returns before the kernel lets go of a device
/// something still holds for a moment.
async fn settle_detaching(files: Vec<PathBuf>) {
    for _ in 0..30 {
        let going: Vec<_> = files.iter().flat_map(|f| loop_device::devices_backed_by(f)).collect();
        if going.is_empty() || !going.iter().all(|d| loop_device::detaching(d)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Refuses while a loop device is attached to `file`, saying where its
/// filesystem is mounted.
fn check_file_detached(volume: &VolumeId, file: &Path) -> HeadsResult<()> {
    let Some(device) = loop_device::devices_backed_by(file).into_iter().next() else {
        return Ok(());
    };
    Err(match loop_device::mounted_at(&device) {
        Some(at) => HeadsError::Mounted { volume: volume.clone(), at, device },
        None => HeadsError::Attached { volume: volume.clone(), device },
    })
}

type HeadMap = Arc<tokio::sync::Mutex<BTreeMap<VolumeId, OpenHead>>>;

/// The volume heads open on this agent. Clones share the same heads.
#[derive(Debug, Clone)]
pub struct Heads {
    store: Arc<Store>,
    agent: String,
    peer_timeout: Duration,
    /// Where FUSE mounts of heads go: `<fuse_dir>/<volume>/volume`.
    fuse_dir: Option<PathBuf>,
    /// How often a head looks for out-of-sync replicas to rebuild.
    heal_every: Duration,
    open: HeadMap,
}

impl Heads {
    /// `agent` is this agent's name: the agent of that name in an open
    /// request is reached through `store` directly. `fuse_dir` is where
    /// heads opened with fuse=true are mounted.
    pub fn new(
        store: Arc<Store>,
        agent: impl Into<String>,
        peer_timeout: Duration,
        fuse_dir: Option<PathBuf>,
    ) -> Self {
        Heads {
            store,
            agent: agent.into(),
            peer_timeout,
            fuse_dir,
            heal_every: DEFAULT_HEAL_EVERY,
            open: Default::default(),
        }
    }

    /// Sets how often heads look for out-of-sync replicas to rebuild.
    pub fn with_heal_every(mut self, every: Duration) -> Self {
        self.heal_every = every;
        self
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn not_open(&self, volume: &VolumeId) -> HeadsError {
        HeadsError::NotOpen { volume: volume.clone(), agent: self.agent.clone() }
    }

    /// The open head of `volume`, and whether its role is Remote.
    pub async fn get(&self, volume: &VolumeId) -> Option<(Arc<VolumeHead>, bool)> {
        self.open.lock().await.get(volume).map(|h| (h.head.clone(), h.is_remote()))
    }

    /// The open head of `volume` with its role, for a copy into it (the
    /// copy claims the role and applies its batches under it).
    pub async fn copy_target(&self, volume: &VolumeId) -> Option<(Arc<VolumeHead>, Role)> {
        self.open.lock().await.get(volume).map(|h| (h.head.clone(), h.role.clone()))
    }

    /// The open head of `volume` (refused when there is none).
    pub async fn head(&self, volume: &VolumeId) -> HeadsResult<Arc<VolumeHead>> {
        self.open
            .lock()
            .await
            .get(volume)
            .map(|h| h.head.clone())
            .ok_or_else(|| self.not_open(volume))
    }

    /// The open head of `volume` and whether its role is Remote (refused
    /// when there is none).
    pub async fn with_role(&self, volume: &VolumeId) -> HeadsResult<(Arc<VolumeHead>, bool)> {
        self.get(volume).await.ok_or_else(|| self.not_open(volume))
    }

    /// The head of a volume clients may write: refused for a Remote one.
    pub async fn writable(&self, volume: &VolumeId) -> HeadsResult<Arc<VolumeHead>> {
        let heads = self.open.lock().await;
        let open = heads.get(volume).ok_or_else(|| self.not_open(volume))?;
        if open.is_remote() {
            return Err(HeadsError::RemoteNotWritable { volume: volume.clone() });
        }
        Ok(open.head.clone())
    }

    /// Refused when no head of `volume` is open here.
    pub async fn check_open(&self, volume: &VolumeId) -> HeadsResult<()> {
        match self.open.lock().await.contains_key(volume) {
            true => Ok(()),
            false => Err(self.not_open(volume)),
        }
    }

    pub async fn view(&self, volume: &VolumeId) -> HeadsResult<HeadView> {
        let heads = self.open.lock().await;
        heads.get(volume).map(OpenHead::view).ok_or_else(|| self.not_open(volume))
    }

    /// Exposes `volume` as `<fuse_dir>/<name>/volume`.
    async fn mount(&self, name: String, volume: Arc<dyn BlockVolume>) -> HeadsResult<FuseMount> {
        let Some(dir) = &self.fuse_dir else {
            return Err(HeadsError::NoFuseDir { agent: self.agent.clone() });
        };
        let mountpoint = dir.join(name);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&mountpoint)
                .map_err(|source| HeadsError::MountDir { path: mountpoint.clone(), source })?;
            FuseFrontend::mount(volume, &mountpoint, "volume").map_err(HeadsError::Fuse)
        })
        .await
        .map_err(|source| HeadsError::Task { what: "mount", source })?
    }

    fn peer(&self, a: &AgentAddr) -> HeadsResult<Arc<dyn ReplicaPeer>> {
        if a.name.is_empty() {
            return Err(HeadsError::EmptyAgentName);
        }
        Ok(if a.name == self.agent {
            Arc::new(LocalPeer::new(&a.name, self.store.clone()))
        } else {
            Arc::new(
                GrpcPeer::new(&a.name, &a.endpoint, self.peer_timeout)
                    .map_err(|why| HeadsError::Peer { agent: a.name.clone(), why })?,
            )
        })
    }

    /// Opens the head of a volume. A repeat at the same epoch keeps the
    /// open head (and mounts it if asked and not yet); a newer epoch
    /// replaces this agent's older head, but not under a mounted filesystem.
    pub async fn open(&self, r: OpenRequest) -> HeadsResult<HeadView> {
        let volume = r.volume.clone();
        let mut heads = self.open.lock().await;
        if let Some(h) = heads.get_mut(&volume)
            && h.head.epoch() == r.epoch
            && !h.head.is_fenced()
        {
            // With fuse=true a repeat also exposes the head through FUSE if
            // it is not yet (the operator opens heads without FUSE, the CSI
            // node asks for the mount); with fuse=false an existing mount
            // stays.
            if r.fuse && h.fuse.is_none() {
                if h.is_remote() {
                    return Err(HeadsError::RemoteNotAttached { volume });
                }
                let file: Arc<dyn BlockVolume> =
                    Arc::new(HeadVolume::new(h.head.clone(), tokio::runtime::Handle::current()));
                let mount = self.mount(h.head.volume().to_string(), file).await?;
                h.fuse = Some(std::sync::Mutex::new(mount));
            }
            return Ok(h.view());
        }
        if let Some(old) = heads.get(&volume) {
            // A stale open never tears down a live head: it fails here, or
            // at the replicas (which admitted a newer epoch), and the open
            // head goes on serving.
            if r.epoch < old.head.epoch() && !old.head.is_fenced() {
                return Err(HeadsError::StaleOpen {
                    volume,
                    open: old.head.epoch(),
                    request: r.epoch,
                });
            }
            old.check_detached(&volume)?;
            // No copy writes a replaced head.
            drop(old.role.change(Change::Closed).await);
        }
        let mut agents = Vec::with_capacity(r.agents.len());
        let mut costs = BTreeMap::new();
        let mut peers: BTreeMap<String, Arc<dyn ReplicaPeer>> = BTreeMap::new();
        for a in &r.agents {
            peers.insert(a.name.clone(), self.peer(a)?);
            let domain = (!a.domain.is_empty()).then_some(a.domain.as_str());
            agents.push(PlacementAgent::new(&a.name, domain));
            if a.cost > 0 {
                costs.insert(a.name.clone(), a.cost);
            }
        }
        let spec = HeadSpec {
            volume: volume.clone(),
            geometry: r.geometry,
            replicas: r.replicas,
            layout_version: r.layout_version,
            agents,
            epoch: r.epoch,
            stale: r.stale,
            costs,
            accept_data_loss: r.accept_data_loss,
        };
        // The new head is opened (and has fenced the replicas) before the
        // old one is taken down: if the open fails, the old head stays.
        let head = Arc::new(VolumeHead::open(spec, peers, Some(&self.agent)).await?);
        if let Some(mut old) = heads.remove(&volume)
            && let Some(m) = old.fuse.take()
        {
            m.into_inner().unwrap().unmount().map_err(HeadsError::Fuse)?;
        }
        let fuse = if r.fuse {
            let file: Arc<dyn BlockVolume> =
                Arc::new(HeadVolume::new(head.clone(), tokio::runtime::Handle::current()));
            Some(self.mount(head.volume().to_string(), file).await?)
        } else {
            None
        };
        let heal = HealTask(tokio::spawn(head.clone().heal(self.heal_every)).abort_handle());
        let open = OpenHead {
            head,
            role: Role::new(r.remote),
            _heal: heal,
            fuse: fuse.map(std::sync::Mutex::new),
            snapshots: BTreeMap::new(),
        };
        let view = open.view();
        heads.insert(volume, open);
        Ok(view)
    }

    /// Closes a head: refused under an attached loop device; unmounts its
    /// FUSE files and flushes it.
    pub async fn close(&self, volume: &VolumeId) -> HeadsResult<()> {
        let files = self.open.lock().await.get(volume).map(|o| o.fuse_files());
        settle_detaching(files.unwrap_or_default()).await;
        let mut heads = self.open.lock().await;
        let Some(open) = heads.get(volume) else {
            return Err(self.not_open(volume));
        };
        open.check_detached(volume)?;
        // No copy writes a closed head.
        drop(open.role.change(Change::Closed).await);
        let open = heads.remove(volume).expect("just found");
        for m in open.fuse.into_iter().chain(open.snapshots.into_values()) {
            unmount(m).await?;
        }
        if let Err(e) = open.head.flush().await {
            tracing::warn!(%volume, error = %e, "flush at close failed");
        }
        Ok(())
    }

    /// Exposes snapshot `snap` read-only through FUSE; returns its file.
    pub async fn expose_snapshot(
        &self,
        volume: &VolumeId,
        snap: &SnapshotId,
    ) -> HeadsResult<PathBuf> {
        let mut heads = self.open.lock().await;
        let open = heads.get_mut(volume).ok_or_else(|| self.not_open(volume))?;
        if let Some(m) = open.snapshots.get(snap) {
            return Ok(m.lock().unwrap().file().to_path_buf());
        }
        // The snapshot must exist: read its first block before mounting.
        open.head.read_snapshot(snap, 0, 4096).await?;
        let view: Arc<dyn BlockVolume> = Arc::new(SnapshotVolume::new(
            open.head.clone(),
            snap.clone(),
            tokio::runtime::Handle::current(),
        ));
        let m = self.mount(format!("{volume}@{snap}"), view).await?;
        let file = m.file().to_path_buf();
        open.snapshots.insert(snap.clone(), std::sync::Mutex::new(m));
        Ok(file)
    }

    /// Unmounts an exposed snapshot: refused under an attached loop device.
    pub async fn hide_snapshot(&self, volume: &VolumeId, snap: &SnapshotId) -> HeadsResult<()> {
        let file =
            self.open.lock().await.get(volume).and_then(|o| {
                o.snapshots.get(snap).map(|m| m.lock().unwrap().file().to_path_buf())
            });
        settle_detaching(file.into_iter().collect()).await;
        let mut heads = self.open.lock().await;
        let Some(open) = heads.get_mut(volume) else {
            return Err(self.not_open(volume));
        };
        let Some(m) = open.snapshots.get(snap) else {
            return Err(HeadsError::NotExposed { volume: volume.clone(), snapshot: snap.clone() });
        };
        let file = m.lock().unwrap().file().to_path_buf();
        check_file_detached(volume, &file)?;
        unmount(open.snapshots.remove(snap).expect("just found")).await
    }

    /// Failover: makes a Remote head a Primary one. Its head is reverted to
    /// the newest complete snapshot first, so the part of a copy in progress
    /// is dropped; that snapshot is the base the volume goes on from.
    pub async fn promote(&self, volume: &VolumeId) -> HeadsResult<Promoted> {
        let heads = self.open.lock().await;
        let open =
            heads.get(volume).ok_or_else(|| HeadsError::NotOpenHere { volume: volume.clone() })?;
        if !open.is_remote() {
            return Err(HeadsError::AlreadyPrimary { volume: volume.clone() });
        }
        // Every copy session into the volume ends first: no batch of one
        // is applied after this (the in-flight ones are waited for).
        let change = open.role.change(Change::Promoted).await;
        open.head.revert().await?;
        let base = open.head.snapshots().await?.into_iter().rfind(|s| !s.divergent).map(|s| s.id);
        let digest = open.head.digest(None).await?;
        change.set_remote(false);
        tracing::warn!(%volume, base = ?base, "promoted: the volume is a primary here");
        Ok(Promoted { base, digest })
    }

    /// Primary -> Remote: refused under an attached loop device; the FUSE
    /// mount is removed; a last snapshot is sealed, then client writes are
    /// refused.
    pub async fn demote(
        &self,
        volume: &VolumeId,
        snap: &SnapshotId,
        generation: u64,
    ) -> HeadsResult<Digest> {
        let mut heads = self.open.lock().await;
        let open = heads.get_mut(volume).ok_or_else(|| self.not_open(volume))?;
        if open.is_remote() {
            return Err(HeadsError::AlreadyRemote { volume: volume.clone() });
        }
        // Not under a mounted filesystem: it would keep writing.
        open.check_detached(volume)?;
        if let Some(m) = open.fuse.take() {
            unmount(m).await?;
        }
        let change = open.role.change(Change::Demoted).await;
        let digest = open.head.snapshot(snap, generation).await?;
        change.set_remote(true);
        tracing::warn!(%volume, snapshot = %snap, "demoted: the volume is a remote copy here");
        Ok(digest)
    }
}
