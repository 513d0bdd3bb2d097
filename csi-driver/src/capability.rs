//! Volume capabilities: what a CSI `VolumeCapability` asks for, checked
//! once into an [`Access`] that the controller and the node act on. A
//! Cairn volume is served by one head on one node, so only single-node
//! access modes are offered; filesystems are ext4 (the default) and xfs.

use cairn_api::csi::v1 as csi;
use tonic::Status;

use csi::volume_capability::{AccessType, access_mode::Mode};

/// The filesystems the node formats and mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// When a capability names none.
    pub const DEFAULT: FsType = FsType::Ext4;

    /// The name `mount`, `blkid` and `mkfs.<name>` use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// `""` is the default; anything but ext4 and xfs is refused.
    pub fn parse(name: &str) -> Result<FsType, Status> {
        match name {
            "" => Ok(Self::DEFAULT),
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(Status::invalid_argument(format!(
                "fs_type {other:?} is not supported: use ext4 (the default) or xfs"
            ))),
        }
    }
}

/// How a volume is used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Access {
    /// A filesystem, mounted with these flags.
    Mount { fs_type: FsType, flags: Vec<String> },
    /// The raw block device.
    Block,
}

/// Access modes a Cairn volume can be published with: one node at a time.
pub fn mode_supported(mode: Mode) -> bool {
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => true,
        Mode::Unknown
        | Mode::MultiNodeReaderOnly
        | Mode::MultiNodeSingleWriter
        | Mode::MultiNodeMultiWriter => false,
    }
}

/// Checks a capability: present, with an access type and a supported
/// access mode; `INVALID_ARGUMENT` naming what is wrong otherwise.
pub fn access(capability: Option<&csi::VolumeCapability>) -> Result<Access, Status> {
    let cap =
        capability.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume_capability.access_mode is required"))?;
    let mode = Mode::try_from(mode.mode).map_err(|_| {
        Status::invalid_argument(format!("access mode {} is not a CSI access mode", mode.mode))
    })?;
    if !mode_supported(mode) {
        return Err(Status::invalid_argument(format!(
            "access mode {} is not supported: a Cairn volume is attached to one node at a time (SINGLE_NODE_*)",
            mode.as_str_name()
        )));
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            if !m.volume_mount_group.is_empty() {
                return Err(Status::invalid_argument(
                    "volume_mount_group is not supported (no VOLUME_MOUNT_GROUP capability)",
                ));
            }
            Ok(Access::Mount { fs_type: FsType::parse(&m.fs_type)?, flags: m.mount_flags.clone() })
        }
        None => Err(Status::invalid_argument(
            "volume_capability has no access type: set block or mount",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(mode: Mode, access_type: Option<AccessType>) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type,
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        }))
    }

    #[test]
    fn single_node_mount_and_block_capabilities_are_accepted() {
        let a = access(Some(&cap(Mode::SingleNodeWriter, mount("")))).unwrap();
        assert_eq!(a, Access::Mount { fs_type: FsType::Ext4, flags: vec!["noatime".into()] });
        let a = access(Some(&cap(Mode::SingleNodeReaderOnly, mount("xfs")))).unwrap();
        assert!(matches!(a, Access::Mount { fs_type: FsType::Xfs, .. }));
        let block = Some(AccessType::Block(Default::default()));
        assert_eq!(access(Some(&cap(Mode::SingleNodeMultiWriter, block))).unwrap(), Access::Block);
    }

    #[test]
    fn missing_or_unsupported_capabilities_are_invalid_arguments() {
        let bad = [
            None,
            Some(cap(Mode::SingleNodeWriter, None)),
            Some(cap(Mode::MultiNodeMultiWriter, mount("ext4"))),
            Some(cap(Mode::Unknown, mount("ext4"))),
            Some(cap(Mode::SingleNodeWriter, mount("btrfs"))),
            Some(csi::VolumeCapability { access_type: mount(""), access_mode: None }),
        ];
        for c in bad {
            let e = access(c.as_ref()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{c:?}");
        }
    }
}
