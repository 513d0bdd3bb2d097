//! cairn-csi: Cairn's CSI driver. One binary, two roles: `cairn-csi
//! controller` (Identity + Controller: Kubernetes `Volume` objects for
//! PVCs, heads opened on the pod's node) and `cairn-csi node` (Identity +
//! Node: the head opened by the controller exposed through the local agent's
//! FUSE frontend, attached with a loop device, formatted and mounted).
//!
//! This file holds what both roles share: the names the driver is known by,
//! the publish-context contract between controller and node, and the checks
//! every RPC makes on ids and paths (each failure an `INVALID_ARGUMENT` that
//! names the field).

pub mod agent;
pub mod capability;
pub mod controller;
pub mod identity;
pub mod node;
pub mod operation;
pub mod socket;

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
};

use base64::Engine as _;
use cairn_api::agent::v1 as pb;
use prost::Message as _;
use tonic::Status;

/// The driver's name (GetPluginInfo, the CSIDriver object, StorageClass
/// `provisioner`).
pub const DRIVER_NAME: &str = "csi.cairn.dev";
/// The driver's version: the crate's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Topology key: the StorageCluster whose agents can serve a volume. A
/// node's value is the cluster of its own agent; a volume is reachable
/// from the nodes of its cluster.
pub const TOPOLOGY_CLUSTER_KEY: &str = "topology.cairn.dev/cluster";
/// Publish-context key: the head's epoch, in decimal.
pub const PUBLISH_EPOCH_KEY: &str = "cairn.dev/epoch";
/// Publish-context key: standard base64 of the prost-encoded
/// `cairn.agent.v1.OpenHeadRequest` the controller opened the head with on
/// the node's agent (fuse=false). The node repeats it with fuse=true.
pub const PUBLISH_OPEN_HEAD_KEY: &str = "cairn.dev/open-head";

/// Why a publish context cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(
        "publish_context has no {key:?}: the volume was not published to this node by cairn-csi's controller (ControllerPublishVolume)"
    )]
    Missing { key: &'static str },
    #[error("publish_context {key:?} is not standard base64: {source}")]
    Base64 {
        key: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("publish_context {key:?} is not an encoded cairn.agent.v1.OpenHeadRequest: {source}")]
    Decode {
        key: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("publish_context {key:?} is {value:?}, not a decimal epoch")]
    Epoch { key: &'static str, value: String },
    #[error(
        "publish_context says epoch {context} but its open-head request is for epoch {request}"
    )]
    EpochMismatch { context: u64, request: u64 },
}

impl From<ContextError> for Status {
    fn from(e: ContextError) -> Self {
        match e {
            // Not published to this node (yet): the CO must call
            // ControllerPublishVolume first.
            ContextError::Missing { .. } => Status::failed_precondition(e.to_string()),
            ContextError::Base64 { .. }
            | ContextError::Decode { .. }
            | ContextError::Epoch { .. }
            | ContextError::EpochMismatch { .. } => Status::invalid_argument(e.to_string()),
        }
    }
}

/// Encodes an OpenHead request for the publish context.
pub fn encode_open_head(request: &pb::OpenHeadRequest) -> String {
    base64::engine::general_purpose::STANDARD.encode(request.encode_to_vec())
}

/// Decodes what [`encode_open_head`] made.
pub fn decode_open_head(text: &str) -> Result<pb::OpenHeadRequest, ContextError> {
    let key = PUBLISH_OPEN_HEAD_KEY;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|source| ContextError::Base64 { key, source })?;
    pb::OpenHeadRequest::decode(bytes.as_slice())
        .map_err(|source| ContextError::Decode { key, source })
}

/// The publish context ControllerPublishVolume returns for a head opened
/// with `request` on the node's agent.
pub fn publish_context(request: &pb::OpenHeadRequest) -> HashMap<String, String> {
    HashMap::from([
        (PUBLISH_EPOCH_KEY.to_string(), request.epoch.to_string()),
        (PUBLISH_OPEN_HEAD_KEY.to_string(), encode_open_head(request)),
    ])
}

/// The OpenHead request in a publish context, checked against its epoch.
pub fn open_head_from_context(
    context: &HashMap<String, String>,
) -> Result<pb::OpenHeadRequest, ContextError> {
    let get = |key| context.get(key).ok_or(ContextError::Missing { key });
    let epoch_text = get(PUBLISH_EPOCH_KEY)?;
    let epoch: u64 = epoch_text
        .parse()
        .map_err(|_| ContextError::Epoch { key: PUBLISH_EPOCH_KEY, value: epoch_text.clone() })?;
    let request = decode_open_head(get(PUBLISH_OPEN_HEAD_KEY)?)?;
    if request.epoch != epoch {
        return Err(ContextError::EpochMismatch { context: epoch, request: request.epoch });
    }
    Ok(request)
}

/// The longest CSI volume id accepted: a Kubernetes object name (a DNS
/// subdomain).
pub const MAX_VOLUME_ID_LEN: usize = 253;

/// Checks a CSI volume id (the name of a Kubernetes `Volume` object): a
/// DNS subdomain, so it is safe as a file name and a map key. Missing is
/// `INVALID_ARGUMENT`, as is any other shape.
pub fn volume_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("volume_id is required"));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if id.len() > MAX_VOLUME_ID_LEN
        || !id.chars().all(ok_char)
        || !alnum(id.chars().next())
        || !alnum(id.chars().last())
        || id.contains("..")
    {
        return Err(Status::invalid_argument(format!(
            "volume_id {id:?} is not a Cairn volume: a Kubernetes object name (at most {MAX_VOLUME_ID_LEN} characters of [a-z0-9.-], alphanumeric at both ends)"
        )));
    }
    Ok(id)
}

/// Checks a path field of a request: required, absolute, without `..`
/// (so it cannot climb out of where the CO put it) and without NUL.
pub fn path(field: &'static str, value: &str) -> Result<PathBuf, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    let p = Path::new(value);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!("{field} {value:?} is not an absolute path")));
    }
    if value.contains('\0') || p.components().any(|c| c == Component::ParentDir) {
        return Err(Status::invalid_argument(format!(
            "{field} {value:?} contains '..' or a NUL byte"
        )));
    }
    Ok(p.to_path_buf())
}

/// A failed agent call as a CSI status: the agent's code (it already means
/// what CSI means: NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE...), and a
/// message that says which call to which agent.
pub fn agent_status(what: &str, endpoint: &str, status: Status) -> Status {
    Status::new(status.code(), format!("{what} at agent {endpoint}: {}", status.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(epoch: u64) -> pb::OpenHeadRequest {
        pb::OpenHeadRequest {
            volume_id: "pvc-1".into(),
            size_bytes: 1 << 30,
            chunk_size_bytes: 64 << 20,
            replicas: 2,
            layout_version: 3,
            epoch,
            agents: vec![pb::HeadAgent {
                name: "a1".into(),
                endpoint: "http://10.0.0.1:7070".into(),
                domain: "rack-1".into(),
                cost: 2,
            }],
            fuse: false,
            stale_agents: vec!["a2".into()],
            accept_data_loss: false,
            role: pb::VolumeRole::Primary as i32,
        }
    }

    #[test]
    fn publish_context_round_trips_the_open_head_request() {
        let r = request(7);
        let ctx = publish_context(&r);
        assert_eq!(ctx[PUBLISH_EPOCH_KEY], "7");
        assert_eq!(open_head_from_context(&ctx).unwrap(), r);
        assert_eq!(decode_open_head(&encode_open_head(&r)).unwrap(), r);
    }

    #[test]
    fn publish_context_is_refused_when_incomplete_or_inconsistent() {
        let mut ctx = publish_context(&request(7));
        ctx.insert(PUBLISH_EPOCH_KEY.into(), "8".into());
        assert!(matches!(
            open_head_from_context(&ctx),
            Err(ContextError::EpochMismatch { context: 8, request: 7 })
        ));
        ctx.insert(PUBLISH_EPOCH_KEY.into(), "x".into());
        assert!(matches!(open_head_from_context(&ctx), Err(ContextError::Epoch { .. })));
        ctx.insert(PUBLISH_EPOCH_KEY.into(), "7".into());
        ctx.insert(PUBLISH_OPEN_HEAD_KEY.into(), "not base64!".into());
        assert!(matches!(open_head_from_context(&ctx), Err(ContextError::Base64 { .. })));
        ctx.insert(PUBLISH_OPEN_HEAD_KEY.into(), "/////w==".into());
        assert!(matches!(open_head_from_context(&ctx), Err(ContextError::Decode { .. })));
        ctx.remove(PUBLISH_OPEN_HEAD_KEY);
        let e = open_head_from_context(&ctx).unwrap_err();
        assert!(matches!(e, ContextError::Missing { key: PUBLISH_OPEN_HEAD_KEY }));
        assert_eq!(Status::from(e).code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn volume_ids_are_kubernetes_names() {
        for ok in ["pvc-0b1c", "a", "vol.1", &"x".repeat(MAX_VOLUME_ID_LEN)] {
            assert!(volume_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a/b", "..", "a..b", "a b", &"x".repeat(254)] {
            let e = volume_id(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn paths_are_absolute_without_parent_components() {
        assert_eq!(path("target_path", "/var/lib/x").unwrap(), PathBuf::from("/var/lib/x"));
        for bad in ["", "relative/x", "/a/../b", "/a/..", "/a\0b"] {
            let e = path("target_path", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(e.message().contains("target_path"), "{}", e.message());
        }
    }
}
