//! CreateSnapshot, DeleteSnapshot and ListSnapshots: snapshots taken at the
//! volume's head (crash-consistent: the head holds new writes, drains what
//! is in flight and seals every replica at one generation), listed from the
//! head's agent.
//!
//! Ids: the agent's snapshot id is the CSI name when that is a DNS label
//! (external-snapshotter's `snapshot-<uuid>` is), else `s-` and 40 hex
//! digits of its hash; the CSI snapshot_id is `<volume>/<agent id>`.
//!
//! Invariants: a CSI snapshot is recorded in the Volume's
//! `csi.cairn.dev/snapshots` annotation before it is taken and removed
//! from it after it is deleted, so the annotation lists every CSI snapshot
//! that exists (DeleteVolume refuses while one does); a snapshot id at the
//! agent that the annotation does not list was not taken through CSI and
//! is never answered as one. Generations are the volume's newest + 1:
//! above every earlier one, and below the next scheduled snapshot's (the
//! schedules use the run's Unix second).

use std::collections::BTreeMap;

use cairn_api::{
    SnapshotId,
    agent::v1 as pb,
    crd::{StorageCluster, Volume, VolumeRole},
    csi::v1 as csi,
};
use cairn_client::{AgentError, head::head_endpoint};
use kube::{ResourceExt, api::ListParams};
use serde_json::json;

use super::{ControllerService, Error, Result, annotation, annotation_list, page, parameters};

/// The agent's snapshot id for a CSI snapshot name.
pub fn agent_snapshot_id(name: &str) -> String {
    if SnapshotId::new(name).is_ok() {
        return name.to_string();
    }
    let h = blake3::hash(name.as_bytes()).to_hex();
    format!("s-{}", &h[..40])
}

/// The CSI snapshot_id of snapshot `id` of volume `volume`.
pub fn encode(volume: &str, id: &str) -> String {
    format!("{volume}/{id}")
}

/// The volume and agent snapshot id of a CSI snapshot_id; None when it is
/// not one of ours.
pub fn decode(snapshot_id: &str) -> Option<(&str, &str)> {
    let (volume, id) = snapshot_id.split_once('/')?;
    (crate::volume_id(volume).is_ok() && SnapshotId::new(id).is_ok()).then_some((volume, id))
}

/// The CSI view of snapshot `s` of `vol`.
pub fn csi_snapshot(vol: &Volume, s: &pb::SnapshotInfo) -> csi::Snapshot {
    let size = if s.size_bytes > 0 {
        s.size_bytes as i64
    } else {
        super::volume::csi_volume(vol).capacity_bytes
    };
    csi::Snapshot {
        size_bytes: size,
        snapshot_id: encode(&vol.name_any(), &s.snapshot_id),
        source_volume_id: vol.name_any(),
        creation_time: Some(prost_types::Timestamp { seconds: s.sealed_at_unix, nanos: 0 }),
        ready_to_use: true,
    }
}

/// The annotation value for a list of ids (null: none, so the key goes).
fn annotation_value(ids: &[String]) -> serde_json::Value {
    if ids.is_empty() { serde_json::Value::Null } else { json!(ids.join(",")) }
}

impl ControllerService {
    /// The head agent's endpoint and the volume's id there (None: not
    /// placed yet).
    pub(super) async fn head(
        &self,
        vol: &Volume,
        cluster: Option<&StorageCluster>,
    ) -> Result<Option<(String, String)>> {
        let Some(head) = vol.status.as_ref().and_then(|s| s.head.as_ref()) else {
            return Ok(None);
        };
        let fetched;
        let cluster = match cluster {
            Some(c) => Some(c),
            None => {
                fetched = self.clusters().get_opt(&vol.spec.cluster).await?;
                fetched.as_ref()
            }
        };
        match head_endpoint(vol.status.as_ref(), cluster) {
            Some(at) => Ok(Some(at)),
            None => Err(Error::HeadUnknown { volume: vol.name_any(), agent: head.agent.clone() }),
        }
    }

    /// The snapshots of a volume at its head (none when not placed).
    pub(super) async fn snapshots_of(&self, vol: &Volume) -> Result<Vec<pb::SnapshotInfo>> {
        match self.head(vol, None).await? {
            Some((ep, id)) => self.agent_snapshots(&ep, &id).await,
            None => Ok(vec![]),
        }
    }

    pub(super) async fn agent_snapshots(
        &self,
        ep: &str,
        id: &str,
    ) -> Result<Vec<pb::SnapshotInfo>> {
        match self.agents.snapshots(ep, id).await {
            Ok(s) => Ok(s),
            Err(e) if e.is_not_found() => Ok(vec![]),
            Err(e) => Err(e.into()),
        }
    }

    /// CreateSnapshot (the caller holds the source volume's slot).
    pub(super) async fn snapshot(
        &self,
        source: &str,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot> {
        if let Some(k) = req.parameters.keys().find(|k| !k.starts_with(parameters::CSI_PREFIX)) {
            return Err(Error::Invalid {
                field: "parameters",
                why: format!(
                    "unknown parameter {k:?}: Cairn's VolumeSnapshotClass takes none (only the {}* ones are accepted)",
                    parameters::CSI_PREFIX
                ),
            });
        }
        let id = agent_snapshot_id(&req.name);
        let vol = self.volume(source).await?;
        if vol.spec.role != VolumeRole::Primary {
            return Err(Error::RemoteSnapshot { volume: source.into() });
        }
        let taken = |volume: String| Error::SnapshotNameTaken {
            name: req.name.clone(),
            id: id.clone(),
            volume,
        };
        for other in self.volumes().list(&ListParams::default()).await?.items {
            if other.name_any() != source
                && annotation_list(&other, annotation::SNAPSHOTS).contains(&id)
            {
                return Err(taken(other.name_any()));
            }
        }
        let (ep, vid) = self
            .head(&vol, None)
            .await?
            .ok_or_else(|| Error::NotPlaced { volume: source.into() })?;
        let before = self.agent_snapshots(&ep, &vid).await?;
        let mut ours = annotation_list(&vol, annotation::SNAPSHOTS);
        if let Some(s) = before.iter().find(|s| s.snapshot_id == id) {
            // A repeat; or a snapshot CSI did not take (a schedule's).
            return if ours.contains(&id) {
                Ok(csi_snapshot(&vol, s))
            } else {
                Err(taken(source.into()))
            };
        }
        if !ours.contains(&id) {
            ours.push(id.clone());
            let patch = json!({"metadata": {"annotations": {annotation::SNAPSHOTS: annotation_value(&ours)}}});
            self.merge(source, patch).await?;
        }
        let generation = before.iter().map(|s| s.generation).max().unwrap_or(0) + 1;
        match self.agents.snapshot(&ep, &vid, &id, generation).await {
            Ok(()) => {}
            Err(e) if e.code == tonic::Code::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(volume = %source, snapshot = %id, generation, "snapshot taken");
        let after = self.agent_snapshots(&ep, &vid).await?;
        match after.iter().find(|s| s.snapshot_id == id) {
            Some(s) => Ok(csi_snapshot(&vol, s)),
            None => Err(Error::Agent(AgentError {
                endpoint: ep,
                code: tonic::Code::Unavailable,
                message: format!("snapshot {id} of {vid} was taken but is not listed: retry"),
            })),
        }
    }

    /// DeleteSnapshot (the caller holds the volume's slot): a missing
    /// volume or snapshot is deleted already.
    pub(super) async fn delete_snapshot_of(&self, volume: &str, id: &str) -> Result<()> {
        let Some(vol) = self.volumes().get_opt(volume).await? else { return Ok(()) };
        if let Some((ep, vid)) = self.head(&vol, None).await? {
            match self.agents.delete_snapshot(&ep, &vid, id).await {
                Ok(()) => tracing::info!(volume, snapshot = id, "snapshot deleted"),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut ours = annotation_list(&vol, annotation::SNAPSHOTS);
        if ours.iter().any(|s| s == id) {
            ours.retain(|s| s != id);
            let patch = json!({"metadata": {"annotations": {annotation::SNAPSHOTS: annotation_value(&ours)}}});
            self.merge(volume, patch).await?;
        }
        Ok(())
    }

    /// ListSnapshots: every snapshot in the volumes' line (divergent ones
    /// are left out), by volume name and then oldest first, read from each
    /// volume's head agent.
    pub(super) async fn list_snapshot_entries(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let empty = || csi::ListSnapshotsResponse { entries: vec![], next_token: String::new() };
        if req.max_entries < 0 {
            return Err(Error::Invalid {
                field: "max_entries",
                why: format!("{} is negative", req.max_entries),
            });
        }
        let mut only_id = None;
        let vols: Vec<Volume> = if !req.snapshot_id.is_empty() {
            let Some((volume, id)) = decode(&req.snapshot_id) else { return Ok(empty()) };
            if !req.source_volume_id.is_empty() && req.source_volume_id != volume {
                return Ok(empty());
            }
            only_id = Some(id.to_string());
            self.volumes().get_opt(volume).await?.into_iter().collect()
        } else if !req.source_volume_id.is_empty() {
            if crate::volume_id(&req.source_volume_id).is_err() {
                return Ok(empty());
            }
            self.volumes().get_opt(&req.source_volume_id).await?.into_iter().collect()
        } else {
            let mut all = self.volumes().list(&ListParams::default()).await?.items;
            all.sort_by_key(|v| v.name_any());
            all
        };
        let placed: Vec<&Volume> =
            vols.iter().filter(|v| v.status.as_ref().is_some_and(|s| s.head.is_some())).collect();
        let mut clusters = BTreeMap::new();
        if !placed.is_empty() {
            for c in self.clusters().list(&ListParams::default()).await?.items {
                clusters.insert(c.name_any(), c);
            }
        }
        let mut entries = Vec::new();
        for vol in placed {
            let cluster = clusters.get(&vol.spec.cluster);
            let Some((ep, vid)) = self.head(vol, cluster).await? else { continue };
            for s in self.agent_snapshots(&ep, &vid).await? {
                if s.divergent || only_id.as_ref().is_some_and(|id| *id != s.snapshot_id) {
                    continue;
                }
                entries.push(csi::list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(vol, &s)),
                });
            }
        }
        let (entries, next_token) = page::page(entries, req.max_entries, &req.starting_token)?;
        Ok(csi::ListSnapshotsResponse { entries, next_token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_become_agent_ids_and_csi_ids_round_trip() {
        let uuid_name = "snapshot-5f2a61c4-1111-4a8e-9c1d-0123456789ab";
        assert_eq!(agent_snapshot_id(uuid_name), uuid_name);
        let odd = agent_snapshot_id("My Snapshot!");
        assert!(odd.starts_with("s-") && odd.len() == 42, "{odd}");
        assert_eq!(odd, agent_snapshot_id("My Snapshot!"));
        assert!(SnapshotId::new(agent_snapshot_id(&"x".repeat(64))).is_ok());
        let id = encode("pvc-1", uuid_name);
        assert_eq!(decode(&id), Some(("pvc-1", uuid_name)));
        for bad in ["", "pvc-1", "pvc-1/", "/s", "PVC/s", "pvc-1/S", "pvc-1/a/b"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
