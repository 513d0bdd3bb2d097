//! CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ListVolumes and
//! what a `Volume` object says in CSI's terms.
//!
//! Invariants: a CSI name maps to one object name (`parameters::
//! object_name`), so a repeated CreateVolume finds the volume it created
//! and answers the same, or `ALREADY_EXISTS` when the request no longer
//! matches it; a volume is deleted only when it is not published and has
//! no snapshot taken through CSI (they live inside it).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cairn_api::{
    crd::{Volume, VolumePhase, VolumeRole, find_condition, volume::condition},
    csi::v1 as csi,
};
use kube::{
    Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::{
    CONTEXT_CLUSTER, CONTEXT_FS_TYPE, ControllerService, Error, MANAGED_BY, MANAGER, Result,
    annotation, annotation_list,
    content_source::{self, Source},
    observed, page,
    parameters::{self, Kind, Requested},
};
use crate::capability;

/// Whether a Volume serves: Ready or Degraded, for its latest spec.
pub fn serving(vol: &Volume) -> bool {
    let phase = vol.status.as_ref().map(|s| s.phase);
    observed(vol) && matches!(phase, Some(VolumePhase::Ready | VolumePhase::Degraded))
}

/// The kinds of use a Volume was created for (empty: not recorded, e.g. a
/// Volume made by hand).
pub fn recorded_kinds(vol: &Volume) -> BTreeSet<Kind> {
    annotation_list(vol, annotation::ACCESS).iter().filter_map(|k| Kind::parse(k)).collect()
}

/// The filesystem a Volume was created with, if recorded.
pub fn recorded_fs(vol: &Volume) -> Option<capability::FsType> {
    let a = vol.meta().annotations.as_ref()?.get(annotation::FS_TYPE)?;
    capability::FsType::parse(a).ok()
}

/// Why an access does not fit what the Volume was created for (None: it
/// fits, or nothing was recorded).
pub fn misfit(vol: &Volume, access: &capability::Access) -> Option<String> {
    let kinds = recorded_kinds(vol);
    let kind = Kind::of(access);
    if !kinds.is_empty() && !kinds.contains(&kind) {
        let made: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        return Some(format!(
            "it was created for {} access, not {}",
            made.join(" and "),
            kind.as_str()
        ));
    }
    if let (capability::Access::Mount { fs_type, .. }, Some(made)) = (access, recorded_fs(vol))
        && *fs_type != made
    {
        return Some(format!("it was formatted {}, not {}", made.as_str(), fs_type.as_str()));
    }
    None
}

/// Pure: why an existing Volume does not match a CreateVolume request
/// (None: it matches).
pub fn mismatch(
    vol: &Volume,
    cluster: &str,
    range: Option<&csi::CapacityRange>,
    replicas: Option<i32>,
    wanted: &Requested,
) -> Option<String> {
    let spec = &vol.spec;
    if spec.cluster != cluster {
        return Some(format!(
            "it is on storage cluster {}, the request asks for {cluster}",
            spec.cluster
        ));
    }
    if !parameters::size_fits(spec.size_bytes, range) {
        let (r, l) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
        return Some(format!(
            "it has {} bytes, the request asks for required_bytes {r} and limit_bytes {l}",
            spec.size_bytes
        ));
    }
    if let Some(n) = replicas
        && spec.replicas != Some(n)
    {
        return Some(format!("it has replicas {:?}, the request asks for {n}", spec.replicas));
    }
    if spec.role != VolumeRole::Primary && Source::of(vol).is_none() {
        return Some("it is a Remote volume (a copy target)".into());
    }
    let kinds = recorded_kinds(vol);
    if !kinds.is_empty() && !wanted.kinds.is_subset(&kinds) {
        let made: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        return Some(format!("it was created for {} access", made.join(" and ")));
    }
    if let (Some(made), Some(asked)) = (recorded_fs(vol), wanted.fs_type)
        && made != asked
    {
        return Some(format!(
            "it was created for {}, the request asks {}",
            made.as_str(),
            asked.as_str()
        ));
    }
    None
}

/// Pure: why an existing Volume's content source differs from the
/// request's (None: the same, or neither has one).
pub fn source_mismatch(vol: &Volume, asked: Option<&Source>) -> Option<String> {
    let made = Source::of(vol);
    let say = |s: Option<&Source>| s.map_or_else(|| "none".to_string(), Source::annotation);
    (made.as_ref() != asked).then(|| {
        format!(
            "it was created with content source {}, the request asks for {}",
            say(made.as_ref()),
            say(asked)
        )
    })
}

/// The CSI view of a Volume.
pub fn csi_volume(vol: &Volume) -> csi::Volume {
    let size = vol.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(vol.spec.size_bytes);
    let cluster = vol.spec.cluster.clone();
    let mut volume_context = HashMap::from([(CONTEXT_CLUSTER.to_string(), cluster.clone())]);
    if let Some(fs) = recorded_fs(vol) {
        volume_context.insert(CONTEXT_FS_TYPE.to_string(), fs.as_str().to_string());
    }
    csi::Volume {
        capacity_bytes: size,
        volume_id: vol.name_any(),
        volume_context,
        content_source: Source::of(vol).map(|s| s.csi()),
        accessible_topology: vec![csi::Topology {
            segments: HashMap::from([(crate::TOPOLOGY_CLUSTER_KEY.to_string(), cluster)]),
        }],
    }
}

/// The condition ListVolumes and ControllerGetVolume report: abnormal when
/// Degraded or Failed, with what the status says.
pub fn condition_of(vol: &Volume) -> csi::VolumeCondition {
    let Some(st) = vol.status.as_ref() else {
        return csi::VolumeCondition {
            abnormal: false,
            message: "not reported on by the operator yet".into(),
        };
    };
    let abnormal = matches!(st.phase, VolumePhase::Degraded | VolumePhase::Failed);
    let which =
        if st.phase == VolumePhase::Degraded { condition::DEGRADED } else { condition::READY };
    let said = find_condition(&st.conditions, which)
        .map(|c| format!(": {}", c.message))
        .filter(|m| m.len() > 2)
        .unwrap_or_default();
    csi::VolumeCondition { abnormal, message: format!("{:?}{said}", st.phase) }
}

impl ControllerService {
    /// CreateVolume (the caller holds the volume's slot): the Volume by
    /// server-side apply, or the matching one already there, once it
    /// serves. With a content source, the Volume has `spec.source` and
    /// serves once the operator restored it (`content_source`).
    pub(super) async fn create(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
        let params = parameters::parse(&req.parameters)?;
        let wanted = parameters::requested(&req.volume_capabilities, params.fs_type)?;
        let source = req.volume_content_source.as_ref().map(Source::parse).transpose()?;
        let range = req.capacity_range.as_ref();
        if source.is_none() {
            parameters::size(range)?;
        }
        let topology = req.accessibility_requirements.as_ref();
        let cluster = parameters::cluster(&params, topology)?;
        if self.clusters().get_opt(&cluster).await?.is_none() {
            return Err(Error::ClusterNotFound { cluster });
        }
        if !parameters::in_requisite(&cluster, topology) {
            return Err(Error::NotInTopology { cluster });
        }
        let name = parameters::object_name(&req.name);
        match self.volumes().get_opt(&name).await? {
            Some(v) if v.meta().deletion_timestamp.is_some() => {
                return Err(Error::Deleting { volume: name });
            }
            Some(v) => {
                let why = mismatch(&v, &cluster, range, params.replicas, &wanted)
                    .or_else(|| source_mismatch(&v, source.as_ref()));
                if let Some(why) = why {
                    return Err(Error::Incompatible { volume: name, why });
                }
            }
            None => {
                let size = match &source {
                    None => parameters::size(range)?,
                    Some(s) => {
                        let from = self.source_volume(s).await?;
                        content_source::restored_size(content_source::size_of(&from), range)?
                    }
                };
                let body =
                    self.new_volume(&req.name, &cluster, size, &params, &wanted, source.as_ref());
                let pp = PatchParams::apply(MANAGER);
                self.volumes().patch(&name, &pp, &Patch::Apply(&body)).await?;
                tracing::info!(volume = %name, %cluster, size, source = ?source, "volume created");
            }
        }
        // A restore or clone serves once the operator copied its source in
        // and promoted its head.
        let vol = self
            .wait(&name, "becoming Ready", |v| {
                serving(v)
                    && (source.is_none()
                        || (!v.restoring()
                            && v.status.as_ref().and_then(|s| s.role) == Some(VolumeRole::Primary)))
            })
            .await?;
        Ok(csi_volume(&vol))
    }

    /// The apply body of a new Volume.
    fn new_volume(
        &self,
        csi_name: &str,
        cluster: &str,
        size: i64,
        params: &parameters::Parameters,
        wanted: &Requested,
        source: Option<&Source>,
    ) -> serde_json::Value {
        let name = parameters::object_name(csi_name);
        let mut notes = BTreeMap::new();
        if csi_name != name {
            notes.insert(annotation::CSI_NAME, csi_name.to_string());
        }
        let from_params = [
            (annotation::PVC_NAME, &params.pvc_name),
            (annotation::PVC_NAMESPACE, &params.pvc_namespace),
            (annotation::PV_NAME, &params.pv_name),
        ];
        for (key, value) in from_params {
            if let Some(v) = value {
                notes.insert(key, v.clone());
            }
        }
        let kinds: Vec<&str> = wanted.kinds.iter().map(|k| k.as_str()).collect();
        notes.insert(annotation::ACCESS, kinds.join(","));
        if let Some(fs) = wanted.fs_type {
            notes.insert(annotation::FS_TYPE, fs.as_str().to_string());
        }
        let mut spec = json!({ "cluster": cluster, "sizeBytes": size, "role": "Primary" });
        if let Some(n) = params.replicas {
            spec["replicas"] = json!(n);
        }
        // The operator fills it before its head takes writes.
        if let Some(s) = source {
            spec["source"] = json!(s.spec());
        }
        json!({
            "apiVersion": Volume::api_version(&()),
            "kind": Volume::kind(&()),
            "metadata": {
                "name": name,
                "namespace": self.config.namespace,
                "labels": { MANAGED_BY.0: MANAGED_BY.1 },
                "annotations": notes,
            },
            "spec": spec,
        })
    }

    /// DeleteVolume (the caller holds the volume's slot): a missing volume
    /// is deleted already; the operator's finalizer removes the replicas.
    pub(super) async fn delete(&self, name: &str) -> Result<()> {
        let Some(vol) = self.volumes().get_opt(name).await? else { return Ok(()) };
        if vol.meta().deletion_timestamp.is_some() {
            return Ok(());
        }
        if let Some(node) = &vol.spec.attached_node {
            return Err(Error::Attached { volume: name.into(), node: node.clone() });
        }
        let ours = annotation_list(&vol, annotation::SNAPSHOTS);
        if !ours.is_empty() {
            let there = self.snapshots_of(&vol).await?;
            let ids: Vec<String> =
                ours.into_iter().filter(|id| there.iter().any(|s| s.snapshot_id == *id)).collect();
            if !ids.is_empty() {
                return Err(Error::HasSnapshots { volume: name.into(), ids });
            }
        }
        match self.volumes().delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// ValidateVolumeCapabilities: confirmed when every capability asked
    /// for is one Cairn serves and fits what the volume was created for.
    pub(super) async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let name = crate::volume_id(&req.volume_id)
            .map_err(|s| Error::Invalid { field: "volume_id", why: s.message().to_string() })?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::Missing("volume_capabilities"));
        }
        for cap in &req.volume_capabilities {
            if cap.access_mode.is_none() {
                return Err(Error::Missing("volume_capabilities[].access_mode"));
            }
            if cap.access_type.is_none() {
                return Err(Error::Missing("volume_capabilities[].access_type"));
            }
        }
        let vol = self.volume(name).await?;
        for cap in &req.volume_capabilities {
            let why = match capability::access(Some(cap)) {
                Err(s) => Some(s.message().to_string()),
                Ok(access) => misfit(&vol, &access),
            };
            if let Some(why) = why {
                return Ok(csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: format!("volume {name}: {why}"),
                });
            }
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
            }),
            message: String::new(),
        })
    }

    /// ListVolumes: the Volumes the controller created, by name.
    pub(super) async fn list(
        &self,
        req: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse> {
        let lp = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let mut vols = self.volumes().list(&lp).await?.items;
        vols.sort_by_key(|v| v.name_any());
        let (vols, next_token) = page::page(vols, req.max_entries, &req.starting_token)?;
        let entries = vols
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(csi_volume(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: v.spec.attached_node.iter().cloned().collect(),
                    volume_condition: Some(condition_of(v)),
                }),
            })
            .collect();
        Ok(csi::ListVolumesResponse { entries, next_token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::crd::{VolumeSpec, VolumeStatus};

    fn vol(kinds: &str, fs: Option<&str>) -> Volume {
        let mut v = Volume::new(
            "pvc-1",
            VolumeSpec {
                cluster: "site-a".into(),
                size_bytes: 1 << 30,
                replicas: None,
                role: VolumeRole::Primary,
                attachable: None,
                attached_node: None,
                source: None,
            },
        );
        let notes = v.annotations_mut();
        notes.insert(annotation::ACCESS.into(), kinds.into());
        if let Some(fs) = fs {
            notes.insert(annotation::FS_TYPE.into(), fs.into());
        }
        v
    }

    fn mount() -> Requested {
        Requested { kinds: [Kind::Mount].into(), fs_type: Some(capability::FsType::Ext4) }
    }

    #[test]
    fn a_repeat_matches_the_same_cluster_size_replicas_and_access() {
        let v = vol("mount", Some("ext4"));
        let range = csi::CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 };
        assert_eq!(mismatch(&v, "site-a", Some(&range), None, &mount()), None);
        assert_eq!(mismatch(&v, "site-a", None, None, &mount()), None);
        let cases = [
            mismatch(&v, "site-b", Some(&range), None, &mount()),
            mismatch(
                &v,
                "site-a",
                Some(&csi::CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 }),
                None,
                &mount(),
            ),
            mismatch(&v, "site-a", None, Some(3), &mount()),
            mismatch(
                &v,
                "site-a",
                None,
                None,
                &Requested { kinds: [Kind::Block].into(), fs_type: None },
            ),
            mismatch(
                &v,
                "site-a",
                None,
                None,
                &Requested { kinds: [Kind::Mount].into(), fs_type: Some(capability::FsType::Xfs) },
            ),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(c.is_some(), "case {i}");
        }
    }

    #[test]
    fn a_repeat_of_a_restore_matches_only_its_source_and_may_find_it_still_remote() {
        let source = Source::Snapshot { volume: "pvc-0".into(), id: "snap-1".into() };
        let mut v = vol("mount", Some("ext4"));
        v.spec.role = VolumeRole::Remote;
        assert!(mismatch(&v, "site-a", None, None, &mount()).is_some(), "Remote, made by hand");
        v.annotations_mut().insert(annotation::CONTENT_SOURCE.into(), source.annotation());
        assert_eq!(mismatch(&v, "site-a", None, None, &mount()), None, "a restore under way");
        assert_eq!(source_mismatch(&v, Some(&source)), None);
        let other = Source::Volume { volume: "pvc-0".into() };
        let why = source_mismatch(&v, Some(&other)).unwrap();
        assert!(why.contains("snapshot:pvc-0/snap-1") && why.contains("volume:pvc-0"), "{why}");
        assert!(source_mismatch(&v, None).is_some());
        assert!(source_mismatch(&vol("mount", None), Some(&source)).is_some());
        assert_eq!(source_mismatch(&vol("mount", None), None), None);
        assert_eq!(csi_volume(&v).content_source, Some(source.csi()));
    }

    #[test]
    fn the_csi_view_has_the_cluster_topology_and_filesystem() {
        let mut v = vol("mount", Some("xfs"));
        v.status = Some(VolumeStatus { size_bytes: Some(4096), ..Default::default() });
        let c = csi_volume(&v);
        assert_eq!(c.volume_id, "pvc-1");
        assert_eq!(c.capacity_bytes, 4096, "the size at the agents");
        assert_eq!(c.volume_context[CONTEXT_CLUSTER], "site-a");
        assert_eq!(c.volume_context[CONTEXT_FS_TYPE], "xfs");
        assert_eq!(c.accessible_topology[0].segments[crate::TOPOLOGY_CLUSTER_KEY], "site-a");
        let block = csi_volume(&vol("block", None));
        assert!(!block.volume_context.contains_key(CONTEXT_FS_TYPE));
    }

    #[test]
    fn degraded_and_failed_volumes_are_abnormal() {
        let mut v = vol("mount", None);
        assert!(!condition_of(&v).abnormal);
        for (phase, abnormal) in [
            (VolumePhase::Ready, false),
            (VolumePhase::Pending, false),
            (VolumePhase::Degraded, true),
            (VolumePhase::Failed, true),
        ] {
            v.status = Some(VolumeStatus { phase, ..Default::default() });
            assert_eq!(condition_of(&v).abnormal, abnormal, "{phase:?}");
        }
    }

    #[test]
    fn a_block_volume_does_not_fit_a_mount() {
        let v = vol("block", None);
        assert!(misfit(&v, &capability::Access::Block).is_none());
        let m = capability::Access::Mount { fs_type: capability::FsType::Ext4, flags: vec![] };
        assert!(misfit(&v, &m).unwrap().contains("block"));
        let x = vol("mount", Some("xfs"));
        assert!(misfit(&x, &m).unwrap().contains("xfs"));
    }
}
