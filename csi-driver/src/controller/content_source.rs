//! CreateVolume from a content source: a snapshot restored into a new
//! volume, or a volume cloned. The controller checks the source exists
//! (`NOT_FOUND` otherwise, as the spec asks) and sizes the new volume as
//! its source, then creates the Volume with `spec.source`: the operator
//! fills it by the agents' snapshot copy and only then gives its head the
//! Primary role (condition `Restored`); the controller waits for that.
//!
//! Invariants: a Volume's source is fixed at creation (the schema refuses
//! a change), so a repeat CreateVolume with another source is
//! `ALREADY_EXISTS`; CreateVolume answers a restored volume only once it
//! serves as a Primary with `Restored=True`.

use cairn_api::{
    crd::{ContentSource, SnapshotRef, Volume, VolumeRef},
    csi::v1 as csi,
};
use kube::Resource;

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

    /// The source of a Volume (None: created empty): its `spec.source`;
    /// for a Volume restored by a cairn-csi before `spec.source` existed,
    /// the annotation it recorded the source in.
    pub fn of(vol: &Volume) -> Option<Source> {
        if let Some(s) = &vol.spec.source {
            return Source::from_spec(s);
        }
        let notes = vol.meta().annotations.as_ref()?;
        Source::from_annotation(notes.get(annotation::CONTENT_SOURCE)?)
    }

    /// `spec.source` of a Volume restored or cloned from this source.
    pub fn spec(&self) -> ContentSource {
        match self {
            Source::Snapshot { volume, id } => ContentSource {
                snapshot: Some(SnapshotRef { volume: volume.clone(), snapshot: id.clone() }),
                volume: None,
            },
            Source::Volume { volume } => {
                ContentSource { snapshot: None, volume: Some(VolumeRef { name: volume.clone() }) }
            }
        }
    }

    /// The source a `spec.source` names (None: it names neither).
    pub fn from_spec(s: &ContentSource) -> Option<Source> {
        match (&s.snapshot, &s.volume) {
            (Some(r), None) => {
                Some(Source::Snapshot { volume: r.volume.clone(), id: r.snapshot.clone() })
            }
            (None, Some(v)) => Some(Source::Volume { volume: v.name.clone() }),
            _ => None,
        }
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
            assert_eq!(Source::from_spec(&s.spec()).as_ref(), Some(s));
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
}
