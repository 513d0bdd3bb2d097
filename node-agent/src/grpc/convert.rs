//! Protobuf <-> domain conversion of this agent's gRPC edges (ids, ranges
//! and geometry convert in `cairn_api::convert`).
//!
//! Invariant: a request is refused here, before any domain call, when a
//! field does not parse; the messages name the field and the volume.

use cairn_api::{
    Geometry,
    agent::v1::{self as pb},
    convert,
};
use tonic::Status;

use super::status::field;
use crate::{
    heads::{AgentAddr, HeadView, OpenRequest, Promoted},
    replica::stream::StreamedBlock,
};

pub fn to_batch(blocks: Vec<StreamedBlock>) -> pb::BlockBatch {
    pb::BlockBatch {
        blocks: blocks
            .into_iter()
            .map(|b| pb::Block {
                index: b.block,
                crc32c: b.crc,
                data: b.data.map(Into::into).unwrap_or_default(),
                zero: false,
            })
            .collect(),
    }
}

/// An OpenHead request, checked: geometry, replicas, role, epoch.
pub fn open_request(r: pb::OpenHeadRequest) -> Result<OpenRequest, Status> {
    let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
    let geometry = Geometry::new(r.size_bytes, r.chunk_size_bytes)
        .map_err(|e| Status::invalid_argument(format!("volume {volume}: {e}")))?;
    if r.replicas == 0 {
        return Err(Status::invalid_argument(format!(
            "volume {volume}: replicas must be at least 1"
        )));
    }
    let remote = match pb::VolumeRole::try_from(r.role) {
        Ok(pb::VolumeRole::Primary) => false,
        Ok(pb::VolumeRole::Remote) => true,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "volume {volume}: role {} is not Primary (0) or Remote (1)",
                r.role
            )));
        }
    };
    if remote && r.fuse {
        return Err(Status::invalid_argument(format!(
            "volume {volume} is a remote copy (role Remote) and is never attached: open it with fuse=false, or promote it first"
        )));
    }
    if r.epoch == 0 {
        return Err(Status::invalid_argument(format!(
            "volume {volume}: a head needs an epoch of at least 1 (0 means no head)"
        )));
    }
    let agents = r
        .agents
        .into_iter()
        .map(|a| AgentAddr { name: a.name, endpoint: a.endpoint, domain: a.domain, cost: a.cost })
        .collect();
    Ok(OpenRequest {
        volume,
        geometry,
        replicas: r.replicas as usize,
        layout_version: r.layout_version,
        agents,
        epoch: r.epoch,
        stale: r.stale_agents,
        accept_data_loss: r.accept_data_loss,
        remote,
        fuse: r.fuse,
    })
}

pub fn head_status_pb(v: HeadView) -> pb::HeadStatus {
    let role = if v.remote { pb::VolumeRole::Remote } else { pb::VolumeRole::Primary };
    pb::HeadStatus {
        role: role as i32,
        fuse_file: v.fuse_file.map(|f| f.display().to_string()).unwrap_or_default(),
        volume_id: v.volume.to_string(),
        epoch: v.epoch,
        replicas: v
            .health
            .into_iter()
            .map(|h| pb::ReplicaHealth {
                agent: h.agent,
                chunks: h.chunks,
                in_sync: h.out_of_sync.is_none(),
                reason: h.out_of_sync.unwrap_or_default(),
                rebuild: h.rebuild.map(|p| pb::RebuildProgress {
                    phase: p.phase.as_str().to_string(),
                    layers_done: p.layers_done,
                    layers_total: p.layers_total,
                    bytes_done: p.bytes_done,
                    head_blocks_done: p.head_blocks_done,
                    head_blocks_total: p.head_blocks_total,
                    elapsed_ms: p.started.elapsed().as_millis() as u64,
                }),
                last_rebuild: h.last_rebuild.unwrap_or_default(),
            })
            .collect(),
    }
}

pub fn promoted_pb(p: Promoted) -> pb::PromoteHeadResponse {
    pb::PromoteHeadResponse {
        base_snapshot_id: p.base.map(|b| b.to_string()).unwrap_or_default(),
        digest: p.digest.0.to_vec().into(),
    }
}
