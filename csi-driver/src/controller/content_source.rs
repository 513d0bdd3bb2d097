//! CreateVolume from a content source: a snapshot restored into a new
//! volume, or a volume cloned. Both are the agents' snapshot copy: the new
//! Volume is created `Remote` (only copies write it), a receiving link is
//! registered at its head agent, the source's head agent copies the
//! snapshot in full (`CopySnapshot`, sealed at the receiver with the same
//! digest), and `spec.role: Primary` makes the operator promote it (the
//! head reverted to the copied snapshot). A clone copies a snapshot taken
//! for it (`clone-<hash>`), deleted at the source afterwards.
//!
//! Invariants: the new Volume records its source in
//! `csi.cairn.dev/content-source` from its first write, so a repeat
//! CreateVolume resumes (still Remote: the copy goes on from the
//! receiver's checkpoint) or answers (Primary) that volume, and a repeat
//! with another source is `ALREADY_EXISTS`; a volume is never promoted
//! before its copy returned (sealed with the source's digest).

use cairn_api::{
    agent::v1 as pb,
    crd::{Volume, VolumeRole},
    csi::v1 as csi,
};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{ControllerService, Error, Result, annotation, snapshot};
use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Snapshot `id` (the agent's id) of Volume `volume`.
    Snapshot { volume: String, id: String },
    /// Volume `volume`, as of a snapshot taken for the clone.
    Volume { volume: String },
}

impl Source {
    /// The source of a request. A snapshot id that is not one of ours
    /// names no snapshot: `NOT_FOUND`, as the spec asks.
    pub fn parse(s: &csi::VolumeContentSource) -> Result<Source> {
        match &s.r#type {
            Some(Type::Snapshot(SnapshotSource { snapshot_id })) => {
                match snapshot::decode(snapshot_id) {
                    Some((volume, id)) => {
                        Ok(Source::Snapshot { volume: volume.into(), id: id.into() })
                    }
                    None => Err(Error::SnapshotNotFound { snapshot: snapshot_id.clone() }),
                }
            }
            Some(Type::Volume(VolumeSource { volume_id })) => {
                if volume_id.is_empty() {
                    return Err(Error::Missing("volume_content_source.volume.volume_id"));
                }
                Ok(Source::Volume { volume: volume_id.clone() })
            }
            None => Err(Error::Missing("volume_content_source.type")),
        }
    }

    /// The source Volume's name.
    pub fn volume(&self) -> &str {
        match self {
            Source::Snapshot { volume, .. } | Source::Volume { volume } => volume,
        }
    }

    /// The value of the `csi.cairn.dev/content-source` annotation.
    pub fn annotation(&self) -> String {
        match self {
            Source::Snapshot { volume, id } => format!("snapshot:{}", snapshot::encode(volume, id)),
            Source::Volume { volume } => format!("volume:{volume}"),
        }
    }

    /// The source recorded in an annotation value.
    pub fn from_annotation(value: &str) -> Option<Source> {
        match value.split_once(':')? {
            ("snapshot", id) => {
                let (volume, id) = snapshot::decode(id)?;
                Some(Source::Snapshot { volume: volume.into(), id: id.into() })
            }
            ("volume", volume) if crate::volume_id(volume).is_ok() => {
                Some(Source::Volume { volume: volume.into() })
            }
            _ => None,
        }
    }

    /// The source recorded on a Volume (None: created empty).
    pub fn of(vol: &Volume) -> Option<Source> {
        let notes = vol.meta().annotations.as_ref()?;
        Source::from_annotation(notes.get(annotation::CONTENT_SOURCE)?)
    }

    /// The CSI view (what CreateVolume answers as content_source).
    pub fn csi(&self) -> csi::VolumeContentSource {
        let r#type = match self {
            Source::Snapshot { volume, id } => {
                Type::Snapshot(SnapshotSource { snapshot_id: snapshot::encode(volume, id) })
            }
            Source::Volume { volume } => Type::Volume(VolumeSource { volume_id: volume.clone() }),
        };
        csi::VolumeContentSource { r#type: Some(r#type) }
    }
}

/// The snapshot a clone into Volume `name` copies, taken at the source:
/// `clone-` and 24 hex digits of the name's BLAKE3 (the same at every
/// attempt, so a repeat finds it).
pub fn clone_snapshot_id(name: &str) -> String {
    let h = blake3::hash(name.as_bytes()).to_hex();
    format!("clone-{}", &h[..24])
}

/// The id of the link a restore into Volume `name` registers at the new
/// volume's head agent.
pub fn link_id(name: &str) -> String {
    format!("csi-restore-{name}")
}

/// Pure: the size of a volume restored from a source of `source` bytes:
/// the source's. Growth is not supported, so a larger `required_bytes` is
/// `OUT_OF_RANGE`, and so is a `limit_bytes` below the source's size.
pub fn restored_size(source: i64, range: Option<&csi::CapacityRange>) -> Result<i64> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::Invalid {
            field: "capacity_range",
            why: format!("required_bytes {required} and limit_bytes {limit} cannot be negative"),
        });
    }
    if required > source {
        return Err(Error::OutOfRange(format!(
            "capacity_range: required_bytes {required} is above the source's {source} bytes: a restored or cloned volume has its source's size (volume growth is not supported yet)"
        )));
    }
    if limit > 0 && limit < source {
        return Err(Error::OutOfRange(format!(
            "capacity_range: limit_bytes {limit} is below the source's {source} bytes: a restored or cloned volume has its source's size"
        )));
    }
    Ok(source)
}

/// The size of a Volume as its agents have it.
pub fn size_of(vol: &Volume) -> i64 {
    vol.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(vol.spec.size_bytes)
}

/// The source volume's head, its id there, and the snapshot to copy.
struct Origin {
    endpoint: String,
    volume_id: String,
    snapshot: String,
}

impl ControllerService {
    /// The source Volume of `source` (`NOT_FOUND` when missing; a
    /// snapshot source's snapshot must exist at its head too).
    pub(super) async fn source_volume(&self, source: &Source) -> Result<Volume> {
        let vol = self.volume(source.volume()).await?;
        if let Source::Snapshot { id, .. } = source
            && !self.snapshots_of(&vol).await?.iter().any(|s| s.snapshot_id == *id)
        {
            return Err(Error::SnapshotNotFound {
                snapshot: snapshot::encode(source.volume(), id),
            });
        }
        Ok(vol)
    }

    /// Where the copy of `source` into Volume `name` reads from; for a
    /// clone, the snapshot taken for it (taken now unless an earlier
    /// attempt did, under the source volume's slot).
    async fn origin(&self, name: &str, source: &Source) -> Result<Origin> {
        let vol = self.volume(source.volume()).await?;
        let src = vol.name_any();
        let (endpoint, volume_id) =
            self.head(&vol, None).await?.ok_or_else(|| Error::NotPlaced { volume: src.clone() })?;
        let snapshot = match source {
            Source::Snapshot { id, .. } => {
                if !self
                    .agent_snapshots(&endpoint, &volume_id)
                    .await?
                    .iter()
                    .any(|s| s.snapshot_id == *id)
                {
                    return Err(Error::SnapshotNotFound { snapshot: snapshot::encode(&src, id) });
                }
                id.clone()
            }
            Source::Volume { .. } => {
                let id = clone_snapshot_id(name);
                let _op = self
                    .ops
                    .begin(&src, "CreateVolume (clone)")
                    .map_err(|s| Error::Busy(s.message().to_string()))?;
                let there = self.agent_snapshots(&endpoint, &volume_id).await?;
                if !there.iter().any(|s| s.snapshot_id == id) {
                    if vol.spec.role != VolumeRole::Primary {
                        return Err(Error::RemoteSnapshot { volume: src });
                    }
                    let generation = there.iter().map(|s| s.generation).max().unwrap_or(0) + 1;
                    match self.agents.snapshot(&endpoint, &volume_id, &id, generation).await {
                        Ok(()) => {}
                        Err(e) if e.code == tonic::Code::AlreadyExists => {}
                        Err(e) => return Err(e.into()),
                    }
                    tracing::info!(volume = %src, snapshot = %id, generation, "snapshot taken for a clone");
                }
                id
            }
        };
        Ok(Origin { endpoint, volume_id, snapshot })
    }

    /// Fills Remote Volume `name` from `source` and promotes it: waits
    /// until it is placed, registers the receiving link at its head agent
    /// (a fresh pairing secret each attempt: re-registering replaces the
    /// secret and keeps what the link sealed), copies the snapshot in full
    /// from the source's head agent (returns once sealed there; resumes
    /// from the receiver's checkpoint), drops the link there (so the
    /// copied snapshot can be deleted like any other), then sets
    /// `spec.role: Primary`.
    pub(super) async fn fill(&self, name: &str, source: &Source) -> Result<()> {
        let origin = self.origin(name, source).await?;
        let vol =
            self.wait(name, "becoming Ready (as a copy target)", super::volume::serving).await?;
        let (target_ep, target_id) =
            self.head(&vol, None).await?.ok_or_else(|| Error::NotPlaced { volume: name.into() })?;
        let link = link_id(name);
        let secret: [u8; 32] = rand::random();
        let register = pb::RegisterLinkRequest {
            link_id: link.clone(),
            pairing_secret: secret.to_vec().into(),
            target_volume_id: target_id,
        };
        self.agents.register_link(&target_ep, register).await?;
        let copy = pb::CopySnapshotRequest {
            volume_id: origin.volume_id.clone(),
            snapshot_id: origin.snapshot.clone(),
            base_snapshot_id: String::new(),
            link_id: link.clone(),
            pairing_secret: secret.to_vec().into(),
            target_endpoint: target_ep.clone(),
            ..Default::default()
        };
        self.agents.copy_snapshot(&origin.endpoint, copy).await?;
        tracing::info!(volume = %name, source = %source.annotation(), snapshot = %origin.snapshot, "snapshot copied");
        // The receiver keeps the newest snapshot a registered link sealed
        // (the base of its next copy); this link has no next copy.
        self.agents.unregister_link(&target_ep, &link, &secret).await?;
        self.merge(name, json!({"spec": {"role": "Primary"}})).await?;
        if let Source::Volume { volume } = source {
            self.drop_clone_snapshot(volume, &origin).await;
        }
        Ok(())
    }

    /// Deletes the snapshot taken for a clone at the source (one already
    /// gone is fine; a refusal is logged, the clone is done anyway).
    async fn drop_clone_snapshot(&self, volume: &str, origin: &Origin) {
        let Ok(_op) = self.ops.begin(volume, "CreateVolume (clone)") else {
            tracing::warn!(%volume, snapshot = %origin.snapshot, "snapshot taken for a clone left at the source: the volume is busy");
            return;
        };
        match self
            .agents
            .delete_snapshot(&origin.endpoint, &origin.volume_id, &origin.snapshot)
            .await
        {
            Ok(()) => {
                tracing::info!(%volume, snapshot = %origin.snapshot, "snapshot taken for a clone deleted")
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(%volume, snapshot = %origin.snapshot, error = %e, "snapshot taken for a clone could not be deleted at the source")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> csi::CapacityRange {
        csi::CapacityRange { required_bytes: required, limit_bytes: limit }
    }

    #[test]
    fn a_restored_volume_has_its_sources_size_and_never_grows() {
        let gib = 1 << 30;
        assert_eq!(restored_size(gib, None).unwrap(), gib);
        assert_eq!(restored_size(gib, Some(&range(gib, 0))).unwrap(), gib);
        assert_eq!(restored_size(gib, Some(&range(4096, 2 * gib))).unwrap(), gib);
        let e = restored_size(gib, Some(&range(2 * gib, 0))).unwrap_err();
        assert!(matches!(e, Error::OutOfRange(_)) && e.to_string().contains("growth"), "{e}");
        let e = restored_size(gib, Some(&range(0, gib / 2))).unwrap_err();
        assert!(matches!(e, Error::OutOfRange(_)) && e.to_string().contains("below"), "{e}");
        assert!(matches!(restored_size(gib, Some(&range(-1, 0))), Err(Error::Invalid { .. })));
    }

    #[test]
    fn sources_round_trip_through_the_annotation_and_csi() {
        let snap = Source::Snapshot { volume: "pvc-0".into(), id: "snapshot-1".into() };
        let vol = Source::Volume { volume: "pvc-0".into() };
        for s in [&snap, &vol] {
            assert_eq!(Source::from_annotation(&s.annotation()).as_ref(), Some(s));
            assert_eq!(Source::parse(&s.csi()).unwrap(), *s);
            assert_eq!(s.volume(), "pvc-0");
        }
        assert_eq!(snap.annotation(), "snapshot:pvc-0/snapshot-1");
        assert_eq!(vol.annotation(), "volume:pvc-0");
        for bad in ["", "snapshot:pvc-0", "volume:", "volume:A B", "disk:pvc-0"] {
            assert_eq!(Source::from_annotation(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_snapshot_id_that_is_not_ours_is_not_found_and_an_empty_source_invalid() {
        let s = |id: &str| csi::VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: id.into() })),
        };
        assert!(matches!(Source::parse(&s("nonsense")), Err(Error::SnapshotNotFound { .. })));
        let none = csi::VolumeContentSource { r#type: None };
        assert!(matches!(Source::parse(&none), Err(Error::Missing(_))));
    }

    #[test]
    fn a_clones_snapshot_and_link_are_named_after_the_new_volume() {
        let id = clone_snapshot_id("pvc-2");
        assert_eq!(id, clone_snapshot_id("pvc-2"));
        assert_ne!(id, clone_snapshot_id("pvc-3"));
        assert!(cairn_api::SnapshotId::new(&id).is_ok(), "{id}");
        assert_eq!(link_id("pvc-2"), "csi-restore-pvc-2");
    }
}
