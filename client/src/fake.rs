//! [`FakeAgents`]: in-memory agents for tests (the `fake` feature, enabled
//! only in dev-dependencies), recording every [`Call`]. Heads open with
//! every replica in sync unless told otherwise; an endpoint marked down
//! refuses as a dead agent would.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use cairn_api::agent::v1 as pb;

use crate::{AgentApi, AgentError, AgentResult};

/// A call the fake received.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    OpenHead {
        endpoint: String,
        volume: String,
        epoch: u64,
        role: pb::VolumeRole,
        agents: Vec<String>,
    },
    CloseHead {
        endpoint: String,
        volume: String,
    },
    Promote {
        endpoint: String,
        volume: String,
    },
    Demote {
        endpoint: String,
        volume: String,
        snapshot: String,
    },
    DeleteReplica {
        endpoint: String,
        volume: String,
    },
    Snapshot {
        volume: String,
        id: String,
        generation: u64,
    },
    DeleteSnapshot {
        volume: String,
        id: String,
    },
    RegisterLink {
        endpoint: String,
        link: String,
        target_volume: String,
    },
    UnregisterLink {
        endpoint: String,
        link: String,
    },
    PutLink {
        endpoint: String,
        link: pb::Link,
    },
    SyncLink {
        link: String,
        resync: bool,
    },
    Switchover {
        link: String,
        snapshot: String,
    },
    CopySnapshot {
        endpoint: String,
        volume: String,
        snapshot: String,
        base: String,
        link: String,
        target_endpoint: String,
    },
}

/// In-memory agents for tests: heads open with every replica in sync,
/// roles kept per volume; endpoints marked down refuse with Unavailable.
#[derive(Debug, Default, Clone)]
pub struct FakeAgents {
    inner: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<Call>,
    down: Vec<String>,
    roles: BTreeMap<String, pb::VolumeRole>,
    out_of_sync: BTreeMap<String, String>,
    snapshots: BTreeMap<String, Vec<pb::SnapshotInfo>>,
    /// Per volume: the link id and its cursor (last copied snapshot).
    links: BTreeMap<String, Vec<(String, String)>>,
    /// Links registered at receivers: link id -> target volume.
    receiving: BTreeMap<String, String>,
    /// Volumes whose link listing fails (the agent cannot say).
    links_fail: Vec<String>,
}

impl FakeState {
    /// An agent marked down answers as a dead one would.
    fn reachable(&self, endpoint: &str) -> AgentResult<()> {
        if self.down.iter().any(|d| d == endpoint) {
            return Err(AgentError {
                endpoint: endpoint.into(),
                code: tonic::Code::Unavailable,
                message: "tcp connect error".into(),
            });
        }
        Ok(())
    }
}

impl FakeAgents {
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The agent at `endpoint` stops answering.
    pub fn set_down(&self, endpoint: &str) {
        self.inner.lock().unwrap().down.push(endpoint.to_string());
    }

    /// Heads report agent `name`'s replica out of sync for `why`.
    pub fn set_out_of_sync(&self, name: &str, why: &str) {
        self.inner.lock().unwrap().out_of_sync.insert(name.into(), why.into());
    }

    /// A snapshot already at the volume (sealed at `unix` seconds).
    pub fn add_snapshot(&self, volume: &str, id: &str, generation: u64, unix: i64) {
        let info = pb::SnapshotInfo {
            snapshot_id: id.into(),
            generation,
            sealed_at_unix: unix,
            digest: blake3::hash(id.as_bytes()).as_bytes().to_vec().into(),
            ..Default::default()
        };
        self.inner.lock().unwrap().snapshots.entry(volume.into()).or_default().push(info);
    }

    /// The snapshot ids the volume has now, oldest first.
    pub fn snapshot_ids(&self, volume: &str) -> Vec<String> {
        let st = self.inner.lock().unwrap();
        st.snapshots.get(volume).into_iter().flatten().map(|s| s.snapshot_id.clone()).collect()
    }

    /// A link the agent sends for `volume`, having copied up to `cursor`.
    /// Makes `ListLinks` of `volume` fail (UNAVAILABLE) from now on.
    pub fn fail_links(&self, volume: &str) {
        self.inner.lock().unwrap().links_fail.push(volume.into());
    }

    pub fn add_link(&self, volume: &str, link: &str, cursor: &str) {
        let mut st = self.inner.lock().unwrap();
        st.links.entry(volume.into()).or_default().push((link.into(), cursor.into()));
    }

    /// Records a call that changes something, refused when the agent is down.
    fn enter(&self, endpoint: &str, call: Call) -> AgentResult<()> {
        let mut st = self.inner.lock().unwrap();
        st.calls.push(call);
        st.reachable(endpoint)
    }
}

#[tonic::async_trait]
impl AgentApi for FakeAgents {
    async fn open_head(
        &self,
        endpoint: &str,
        req: pb::OpenHeadRequest,
    ) -> AgentResult<pb::HeadStatus> {
        let role = pb::VolumeRole::try_from(req.role).unwrap_or(pb::VolumeRole::Primary);
        let agents: Vec<String> = req.agents.iter().map(|a| a.name.clone()).collect();
        self.enter(
            endpoint,
            Call::OpenHead {
                endpoint: endpoint.into(),
                volume: req.volume_id.clone(),
                epoch: req.epoch,
                role,
                agents: agents.clone(),
            },
        )?;
        let mut st = self.inner.lock().unwrap();
        // A head already open keeps its role (as an agent does).
        let role = *st.roles.entry(req.volume_id.clone()).or_insert(role);
        let replicas = agents
            .iter()
            .map(|a| {
                let why = st.out_of_sync.get(a).cloned();
                pb::ReplicaHealth {
                    agent: a.clone(),
                    chunks: 1,
                    in_sync: why.is_none(),
                    reason: why.unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(pb::HeadStatus {
            volume_id: req.volume_id,
            epoch: req.epoch,
            replicas,
            fuse_file: String::new(),
            role: role as i32,
        })
    }

    async fn close_head(&self, endpoint: &str, volume: &str) -> AgentResult<()> {
        self.enter(endpoint, Call::CloseHead { endpoint: endpoint.into(), volume: volume.into() })?;
        self.inner.lock().unwrap().roles.remove(volume);
        Ok(())
    }

    async fn promote(&self, endpoint: &str, volume: &str) -> AgentResult<pb::PromoteHeadResponse> {
        self.enter(endpoint, Call::Promote { endpoint: endpoint.into(), volume: volume.into() })?;
        self.inner.lock().unwrap().roles.insert(volume.into(), pb::VolumeRole::Primary);
        Ok(pb::PromoteHeadResponse::default())
    }

    async fn demote(
        &self,
        endpoint: &str,
        volume: &str,
        snapshot: &str,
        _generation: u64,
    ) -> AgentResult<()> {
        let call = Call::Demote {
            endpoint: endpoint.into(),
            volume: volume.into(),
            snapshot: snapshot.into(),
        };
        self.enter(endpoint, call)?;
        self.inner.lock().unwrap().roles.insert(volume.into(), pb::VolumeRole::Remote);
        Ok(())
    }

    async fn delete_replica(&self, endpoint: &str, volume: &str) -> AgentResult<()> {
        self.enter(
            endpoint,
            Call::DeleteReplica { endpoint: endpoint.into(), volume: volume.into() },
        )
    }
    async fn snapshot(
        &self,
        endpoint: &str,
        volume: &str,
        id: &str,
        generation: u64,
    ) -> AgentResult<()> {
        let call = Call::Snapshot { volume: volume.into(), id: id.into(), generation };
        self.enter(endpoint, call)?;
        let now = jiff::Timestamp::now().as_second();
        self.add_snapshot(volume, id, generation, now);
        Ok(())
    }

    async fn snapshots(&self, endpoint: &str, volume: &str) -> AgentResult<Vec<pb::SnapshotInfo>> {
        let st = self.inner.lock().unwrap();
        st.reachable(endpoint)?;
        Ok(st.snapshots.get(volume).cloned().unwrap_or_default())
    }

    async fn delete_snapshot(&self, endpoint: &str, volume: &str, id: &str) -> AgentResult<()> {
        self.enter(endpoint, Call::DeleteSnapshot { volume: volume.into(), id: id.into() })?;
        let mut st = self.inner.lock().unwrap();
        if let Some(v) = st.snapshots.get_mut(volume) {
            v.retain(|s| s.snapshot_id != id);
        }
        Ok(())
    }

    async fn links(&self, endpoint: &str, volume: &str) -> AgentResult<Vec<pb::LinkStatus>> {
        let st = self.inner.lock().unwrap();
        if st.links_fail.iter().any(|v| v == volume) {
            return Err(AgentError {
                endpoint: endpoint.into(),
                code: tonic::Code::Unavailable,
                message: "the link store could not be read".into(),
            });
        }
        let links = st.links.get(volume).cloned().unwrap_or_default();
        Ok(links
            .into_iter()
            .map(|(id, cursor)| pb::LinkStatus {
                link: Some(pb::Link {
                    link_id: id,
                    volume_id: volume.into(),
                    ..Default::default()
                }),
                last_copied_snapshot_id: cursor,
                ..Default::default()
            })
            .collect())
    }

    async fn stat(&self, endpoint: &str) -> AgentResult<(u64, u64)> {
        self.inner.lock().unwrap().reachable(endpoint)?;
        Ok((1 << 40, 1 << 30))
    }

    async fn register_link(&self, endpoint: &str, req: pb::RegisterLinkRequest) -> AgentResult<()> {
        let call = Call::RegisterLink {
            endpoint: endpoint.into(),
            link: req.link_id.clone(),
            target_volume: req.target_volume_id.clone(),
        };
        self.enter(endpoint, call)?;
        self.inner.lock().unwrap().receiving.insert(req.link_id, req.target_volume_id);
        Ok(())
    }

    async fn unregister_link(&self, endpoint: &str, link: &str, _secret: &[u8]) -> AgentResult<()> {
        self.enter(
            endpoint,
            Call::UnregisterLink { endpoint: endpoint.into(), link: link.into() },
        )?;
        self.inner.lock().unwrap().receiving.remove(link);
        Ok(())
    }

    async fn put_link(&self, endpoint: &str, link: pb::Link) -> AgentResult<pb::LinkStatus> {
        self.enter(endpoint, Call::PutLink { endpoint: endpoint.into(), link: link.clone() })?;
        let mut st = self.inner.lock().unwrap();
        let links = st.links.entry(link.volume_id.clone()).or_default();
        if !links.iter().any(|(id, _)| *id == link.link_id) {
            links.push((link.link_id.clone(), String::new()));
        }
        Ok(pb::LinkStatus { link: Some(link), ..Default::default() })
    }

    async fn sync_link(
        &self,
        endpoint: &str,
        link: &str,
        resync: bool,
    ) -> AgentResult<pb::SyncLinkResponse> {
        self.enter(endpoint, Call::SyncLink { link: link.into(), resync })?;
        Ok(pb::SyncLinkResponse::default())
    }

    /// Seals the snapshot (same id, generation, digest) at the link's
    /// target volume, as a copy would; refused as an agent would when the
    /// link is not registered or the source has no such snapshot.
    async fn copy_snapshot(&self, endpoint: &str, req: pb::CopySnapshotRequest) -> AgentResult<()> {
        let call = Call::CopySnapshot {
            endpoint: endpoint.into(),
            volume: req.volume_id.clone(),
            snapshot: req.snapshot_id.clone(),
            base: req.base_snapshot_id.clone(),
            link: req.link_id.clone(),
            target_endpoint: req.target_endpoint.clone(),
        };
        self.enter(endpoint, call)?;
        let mut st = self.inner.lock().unwrap();
        let refuse =
            |code, message: String| AgentError { endpoint: endpoint.into(), code, message };
        let Some(target) = st.receiving.get(&req.link_id).cloned() else {
            let m = format!("link {} is not registered at the receiver", req.link_id);
            return Err(refuse(tonic::Code::PermissionDenied, m));
        };
        let mut source = st.snapshots.get(&req.volume_id).into_iter().flatten();
        let Some(snap) = source.find(|s| s.snapshot_id == req.snapshot_id).cloned() else {
            let m = format!("volume {} has no snapshot {}", req.volume_id, req.snapshot_id);
            return Err(refuse(tonic::Code::NotFound, m));
        };
        let there = st.snapshots.entry(target).or_default();
        if !there.iter().any(|s| s.snapshot_id == snap.snapshot_id) {
            there.push(snap);
        }
        Ok(())
    }

    async fn switchover(
        &self,
        endpoint: &str,
        link: &str,
        snapshot: &str,
        _generation: u64,
    ) -> AgentResult<()> {
        self.enter(endpoint, Call::Switchover { link: link.into(), snapshot: snapshot.into() })
    }
}
