//! What a CreateVolume (or GetCapacity) request asks for, checked once and
//! without I/O: the StorageClass parameters, the size from the capacity
//! range, the storage cluster from the parameters or the topology, the
//! capabilities, and the `Volume` object's name. Every refusal names the
//! field and what would be accepted.

use std::collections::{BTreeSet, HashMap};

use cairn_api::csi::v1 as csi;
use csi::volume_capability::{AccessType, access_mode::Mode};

use super::Error;
use crate::capability::{self, FsType};

/// StorageClass parameter: the `StorageCluster` to create volumes on.
pub const CLUSTER: &str = "cluster";
/// StorageClass parameter: copies of each chunk (1 to 5).
pub const REPLICAS: &str = "replicas";
/// StorageClass parameter: the filesystem (also `csi.storage.k8s.io/fstype`).
pub const FS_TYPE: &str = "fsType";
/// Parameters the Kubernetes sidecars set or reserve: accepted, and read
/// where they say something (`fstype`, the PVC's and PV's names).
pub const CSI_PREFIX: &str = "csi.storage.k8s.io/";
pub const CSI_FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// Set by external-provisioner with `--extra-create-metadata`.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";

/// The block size: volume sizes are multiples of it.
pub const BLOCK: i64 = 4096;
/// The size of a volume whose request names none: 1 GiB.
pub const DEFAULT_SIZE: i64 = 1 << 30;
/// The largest volume (the `Volume` schema's limit): 1 PiB.
pub const MAX_SIZE: i64 = 1 << 50;
/// The most replicas a volume may ask for.
pub const MAX_REPLICAS: i32 = 5;

/// The parameters of a CreateVolume or GetCapacity request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parameters {
    pub cluster: Option<String>,
    pub replicas: Option<i32>,
    pub fs_type: Option<FsType>,
    pub pvc_name: Option<String>,
    pub pvc_namespace: Option<String>,
    pub pv_name: Option<String>,
}

/// A StorageCluster name: a Kubernetes object name.
fn cluster_name(value: &str) -> Result<String, Error> {
    crate::volume_id(value).map(str::to_string).map_err(|_| Error::Invalid {
        field: "parameters.cluster",
        why: format!("{value:?} is not a StorageCluster name (a Kubernetes object name)"),
    })
}

/// Parses the parameters: `cluster`, `replicas`, `fsType` (any case) and
/// the `csi.storage.k8s.io/` ones; anything else is refused, naming the
/// known ones.
pub fn parse(params: &HashMap<String, String>) -> Result<Parameters, Error> {
    let mut out = Parameters::default();
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    for key in keys {
        let value = params[key].as_str();
        match key.as_str() {
            CLUSTER => out.cluster = Some(cluster_name(value)?),
            REPLICAS => {
                let n = value.parse::<i32>().ok().filter(|n| (1..=MAX_REPLICAS).contains(n));
                out.replicas = Some(n.ok_or_else(|| Error::Invalid {
                    field: "parameters.replicas",
                    why: format!("{value:?} is not a number from 1 to {MAX_REPLICAS}"),
                })?);
            }
            k if k.eq_ignore_ascii_case(FS_TYPE) || k == CSI_FS_TYPE => {
                let fs = FsType::parse(value).map_err(|s| Error::Invalid {
                    field: "parameters.fsType",
                    why: s.message().to_string(),
                })?;
                if out.fs_type.is_some_and(|f| f != fs) {
                    return Err(Error::Invalid {
                        field: "parameters.fsType",
                        why: format!("{FS_TYPE} and {CSI_FS_TYPE} name different filesystems"),
                    });
                }
                out.fs_type = Some(fs);
            }
            PVC_NAME => out.pvc_name = Some(value.to_string()),
            PVC_NAMESPACE => out.pvc_namespace = Some(value.to_string()),
            PV_NAME => out.pv_name = Some(value.to_string()),
            k if k.starts_with(CSI_PREFIX) => {}
            other => {
                return Err(Error::Invalid {
                    field: "parameters",
                    why: format!(
                        "unknown parameter {other:?}: Cairn's StorageClass parameters are {CLUSTER}, {REPLICAS} and {FS_TYPE} (and the {CSI_PREFIX}* ones)"
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// The size of a new volume: `required_bytes` rounded up to a block, or
/// 1 GiB when none is asked (less if `limit_bytes` says so); `OUT_OF_RANGE`
/// when no multiple of 4096 fits the range or it is over 1 PiB.
pub fn size(range: Option<&csi::CapacityRange>) -> Result<i64, Error> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::Invalid {
            field: "capacity_range",
            why: format!("required_bytes {required} and limit_bytes {limit} cannot be negative"),
        });
    }
    let out_of_range = |why: String| Error::OutOfRange(format!("capacity_range: {why}"));
    if limit > 0 && required > limit {
        return Err(out_of_range(format!(
            "required_bytes {required} is above limit_bytes {limit}"
        )));
    }
    let size = if required == 0 {
        let cap = if limit > 0 { limit / BLOCK * BLOCK } else { DEFAULT_SIZE };
        DEFAULT_SIZE.min(cap)
    } else {
        (required / BLOCK + i64::from(required % BLOCK != 0)).saturating_mul(BLOCK)
    };
    if size == 0 {
        return Err(out_of_range(format!(
            "limit_bytes {limit} is below the smallest volume ({BLOCK} bytes)"
        )));
    }
    if limit > 0 && size > limit {
        return Err(out_of_range(format!(
            "required_bytes {required} rounded up to a multiple of {BLOCK} is {size}, above limit_bytes {limit}"
        )));
    }
    if size > MAX_SIZE {
        return Err(out_of_range(format!("{size} bytes is above the largest volume (1 PiB)")));
    }
    Ok(size)
}

/// Whether a volume of `size` bytes satisfies a capacity range.
pub fn size_fits(size: i64, range: Option<&csi::CapacityRange>) -> bool {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    size >= required && (limit == 0 || size <= limit)
}

/// The cluster key's value in a topology.
fn topology_cluster(t: &csi::Topology) -> Option<&str> {
    t.segments.get(crate::TOPOLOGY_CLUSTER_KEY).map(String::as_str)
}

/// The storage cluster of a new volume: the `cluster` parameter, else the
/// first preferred topology with `topology.cairn.dev/cluster`, else the
/// first requisite one.
pub fn cluster(
    params: &Parameters,
    topology: Option<&csi::TopologyRequirement>,
) -> Result<String, Error> {
    if let Some(c) = &params.cluster {
        return Ok(c.clone());
    }
    let from_topology = topology.and_then(|t| {
        t.preferred.iter().chain(&t.requisite).find_map(topology_cluster).map(str::to_string)
    });
    match from_topology {
        Some(c) => cluster_name(&c),
        None => Err(Error::Invalid {
            field: "parameters.cluster",
            why: format!(
                "no storage cluster: set the StorageClass parameter {CLUSTER}, or let the volume follow its pod with {} topology (volumeBindingMode: WaitForFirstConsumer)",
                crate::TOPOLOGY_CLUSTER_KEY
            ),
        }),
    }
}

/// Whether `cluster` is allowed by the requisite topology (no requisite
/// topology allows every cluster).
pub fn in_requisite(cluster: &str, topology: Option<&csi::TopologyRequirement>) -> bool {
    let requisite = topology.map(|t| t.requisite.as_slice()).unwrap_or_default();
    requisite.is_empty() || requisite.iter().any(|t| topology_cluster(t) == Some(cluster))
}

/// How a volume is used: as a filesystem or as a raw block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Mount,
    Block,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mount => "mount",
            Kind::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "mount" => Some(Kind::Mount),
            "block" => Some(Kind::Block),
            _ => None,
        }
    }

    pub fn of(access: &capability::Access) -> Kind {
        match access {
            capability::Access::Mount { .. } => Kind::Mount,
            capability::Access::Block => Kind::Block,
        }
    }
}

/// What the capabilities of a CreateVolume request ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub kinds: BTreeSet<Kind>,
    /// The filesystem of the mount capabilities (none for block only).
    pub fs_type: Option<FsType>,
}

/// The access modes a new volume can be created with: written from one
/// node at a time.
const CREATE_MODES: &str =
    "SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER or SINGLE_NODE_MULTI_WRITER";

/// Checks the capabilities of a CreateVolume request: at least one; each
/// mount (ext4, xfs or the default) or block with a single-node writer
/// mode; the mount ones agree on the filesystem, and with the `fsType`
/// parameter when both say one.
pub fn requested(
    caps: &[csi::VolumeCapability],
    fs_param: Option<FsType>,
) -> Result<Requested, Error> {
    if caps.is_empty() {
        return Err(Error::Missing("volume_capabilities"));
    }
    let mut kinds = BTreeSet::new();
    let mut fs_named: Option<FsType> = None;
    for cap in caps {
        let access = capability::access(Some(cap)).map_err(|s| Error::Invalid {
            field: "volume_capabilities",
            why: format!("{}; a new volume is created for {CREATE_MODES}", s.message()),
        })?;
        let mode = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
        if Mode::try_from(mode) == Ok(Mode::SingleNodeReaderOnly) {
            return Err(Error::Invalid {
                field: "volume_capabilities",
                why: format!(
                    "access mode SINGLE_NODE_READER_ONLY cannot create a volume (a new volume is empty): use {CREATE_MODES}"
                ),
            });
        }
        if let Some(AccessType::Mount(m)) = &cap.access_type
            && !m.fs_type.is_empty()
        {
            let fs = FsType::parse(&m.fs_type).map_err(|s| Error::Invalid {
                field: "volume_capabilities",
                why: s.message().to_string(),
            })?;
            if fs_named.is_some_and(|f| f != fs) {
                return Err(Error::Invalid {
                    field: "volume_capabilities",
                    why: "the mount capabilities name different filesystems".into(),
                });
            }
            fs_named = Some(fs);
        }
        kinds.insert(Kind::of(&access));
    }
    if let (Some(a), Some(b)) = (fs_named, fs_param)
        && a != b
    {
        return Err(Error::Invalid {
            field: "parameters.fsType",
            why: format!(
                "the parameter says {} but the mount capability says {}",
                b.as_str(),
                a.as_str()
            ),
        });
    }
    let fs_type =
        kinds.contains(&Kind::Mount).then(|| fs_named.or(fs_param).unwrap_or(FsType::DEFAULT));
    Ok(Requested { kinds, fs_type })
}

/// The longest name a `Volume` object gets from a CSI name as it is.
const MAX_PLAIN_NAME: usize = crate::MAX_VOLUME_ID_LEN;

/// The `Volume` object's name for a CSI volume name: the name itself when
/// it is a Kubernetes object name (external-provisioner's `pvc-<uuid>`
/// is), else `csi-` and 40 hex digits of its BLAKE3 hash (the name is then
/// kept in an annotation). The same CSI name always gives the same object.
pub fn object_name(csi_name: &str) -> String {
    if csi_name.len() <= MAX_PLAIN_NAME && crate::volume_id(csi_name).is_ok() {
        return csi_name.to_string();
    }
    let h = blake3::hash(csi_name.as_bytes()).to_hex();
    format!("csi-{}", &h[..40])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn range(required: i64, limit: i64) -> csi::CapacityRange {
        csi::CapacityRange { required_bytes: required, limit_bytes: limit }
    }

    #[test]
    fn sizes_round_up_to_a_block_and_default_to_one_gib() {
        assert_eq!(size(None).unwrap(), 1 << 30);
        assert_eq!(size(Some(&range(0, 0))).unwrap(), 1 << 30);
        assert_eq!(size(Some(&range(1, 0))).unwrap(), 4096);
        assert_eq!(size(Some(&range(4096, 0))).unwrap(), 4096);
        assert_eq!(size(Some(&range(10_000_000, 0))).unwrap(), 10_002_432);
        // No required size, a limit under 1 GiB: the largest block multiple.
        assert_eq!(size(Some(&range(0, 10_000))).unwrap(), 8192);
        assert_eq!(size(Some(&range(5000, 8192))).unwrap(), 8192);
    }

    #[test]
    fn impossible_sizes_are_out_of_range() {
        for (r, l) in [(5000, 6000), (10, 1), (0, 100), (MAX_SIZE + 1, 0)] {
            let e = size(Some(&range(r, l))).unwrap_err();
            assert!(matches!(e, Error::OutOfRange(_)), "{r} {l}: {e}");
        }
        assert!(matches!(size(Some(&range(-1, 0))).unwrap_err(), Error::Invalid { .. }));
        assert!(size_fits(8192, Some(&range(5000, 8192))));
        assert!(!size_fits(4096, Some(&range(5000, 0))));
        assert!(!size_fits(16384, Some(&range(0, 8192))));
    }

    #[test]
    fn parameters_are_parsed_and_unknown_ones_refused_naming_the_known_ones() {
        let p = parse(&params(&[
            ("cluster", "site-a"),
            ("replicas", "3"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "shop"),
            ("csi.storage.k8s.io/pv/name", "pvc-1"),
            ("csi.storage.k8s.io/provisioner-secret-name", "ignored"),
        ]))
        .unwrap();
        assert_eq!(p.cluster.as_deref(), Some("site-a"));
        assert_eq!(p.replicas, Some(3));
        assert_eq!(p.fs_type, Some(FsType::Xfs));
        assert_eq!(
            (p.pvc_name.as_deref(), p.pvc_namespace.as_deref(), p.pv_name.as_deref()),
            (Some("data"), Some("shop"), Some("pvc-1"))
        );
        assert_eq!(parse(&params(&[("fstype", "ext4")])).unwrap().fs_type, Some(FsType::Ext4));
        let e = parse(&params(&[("pool", "fast")])).unwrap_err();
        assert!(e.to_string().contains("\"pool\"") && e.to_string().contains("replicas"), "{e}");
        for bad in [
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "two"),
            ("cluster", "Site_A"),
            ("fsType", "btrfs"),
        ] {
            assert!(matches!(parse(&params(&[bad])), Err(Error::Invalid { .. })), "{bad:?}");
        }
        let clash = params(&[("fsType", "ext4"), ("csi.storage.k8s.io/fstype", "xfs")]);
        assert!(parse(&clash).is_err());
    }

    fn topo(cluster: &str) -> csi::Topology {
        csi::Topology {
            segments: HashMap::from([(crate::TOPOLOGY_CLUSTER_KEY.into(), cluster.into())]),
        }
    }

    #[test]
    fn the_cluster_comes_from_the_parameter_else_the_topology() {
        let req = csi::TopologyRequirement {
            requisite: vec![topo("site-b"), topo("site-c")],
            preferred: vec![topo("site-c")],
        };
        let named = Parameters { cluster: Some("site-a".into()), ..Default::default() };
        assert_eq!(cluster(&named, Some(&req)).unwrap(), "site-a");
        assert_eq!(cluster(&Parameters::default(), Some(&req)).unwrap(), "site-c");
        let only_requisite =
            csi::TopologyRequirement { requisite: vec![topo("site-b")], preferred: vec![] };
        assert_eq!(cluster(&Parameters::default(), Some(&only_requisite)).unwrap(), "site-b");
        let e = cluster(&Parameters::default(), None).unwrap_err();
        assert!(e.to_string().contains("StorageClass parameter cluster"), "{e}");
        assert!(in_requisite("site-b", Some(&req)));
        assert!(!in_requisite("site-a", Some(&req)));
        assert!(in_requisite("site-a", None));
    }

    fn cap(mode: Mode, access_type: AccessType) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })
    }

    #[test]
    fn capabilities_of_a_new_volume_are_single_node_writers() {
        let r = requested(&[cap(Mode::SingleNodeWriter, mount(""))], None).unwrap();
        assert_eq!(r, Requested { kinds: [Kind::Mount].into(), fs_type: Some(FsType::Ext4) });
        let r = requested(&[cap(Mode::SingleNodeSingleWriter, mount(""))], Some(FsType::Xfs));
        assert_eq!(r.unwrap().fs_type, Some(FsType::Xfs));
        let block = AccessType::Block(Default::default());
        let r = requested(&[cap(Mode::SingleNodeMultiWriter, block)], None).unwrap();
        assert_eq!(r, Requested { kinds: [Kind::Block].into(), fs_type: None });

        assert!(matches!(requested(&[], None), Err(Error::Missing("volume_capabilities"))));
        for bad in [
            cap(Mode::MultiNodeMultiWriter, mount("")),
            cap(Mode::SingleNodeReaderOnly, mount("")),
            cap(Mode::SingleNodeWriter, mount("btrfs")),
        ] {
            let e = requested(std::slice::from_ref(&bad), None).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{bad:?}");
            assert!(
                e.to_string().contains("SINGLE_NODE") || e.to_string().contains("btrfs"),
                "{e}"
            );
        }
        let e = requested(&[cap(Mode::SingleNodeWriter, mount("ext4"))], Some(FsType::Xfs));
        assert!(e.is_err());
    }

    #[test]
    fn object_names_are_the_csi_name_or_a_stable_hash() {
        assert_eq!(object_name("pvc-0b1c2d"), "pvc-0b1c2d");
        let odd = object_name("Sanity Volume/1");
        assert!(odd.starts_with("csi-") && odd.len() == 44, "{odd}");
        assert_eq!(odd, object_name("Sanity Volume/1"));
        assert_ne!(odd, object_name("Sanity Volume/2"));
        assert!(crate::volume_id(&odd).is_ok());
        assert!(object_name(&"a".repeat(300)).starts_with("csi-"));
    }
}
