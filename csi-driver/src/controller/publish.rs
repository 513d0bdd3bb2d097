//! ControllerPublishVolume and ControllerUnpublishVolume: the volume's
//! `spec.attachedNode`. The operator moves the head to that node's agent
//! one epoch up (the fence: the node it leaves can no longer write); the
//! controller waits for that, then hands the node the OpenHead request the
//! operator used, computed by the same pure `desired`.
//!
//! Invariants: a volume is published to one node at a time; publish
//! answers only once `status.head` is on the node for the current spec, so
//! the epoch in the publish context is the one the replicas admit.

use std::collections::HashMap;

use cairn_api::{
    crd::{AgentHealth, StorageCluster, Volume, volume::ROLE_HOLD},
    csi::v1 as csi,
};
use cairn_client::head::{Invalid, desired};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{ControllerService, Error, Result, annotation, observed, volume::misfit};
use crate::capability;

/// Whether `node` runs an agent of `cluster` that the operator would put a
/// head on (the test `desired` makes: any but Unreachable).
pub fn node_has_agent(cluster: &StorageCluster, node: &str) -> bool {
    let agents = cluster.status.as_ref().map(|s| s.agents.as_slice()).unwrap_or_default();
    agents.iter().any(|a| a.node.as_deref() == Some(node) && a.health != AgentHealth::Unreachable)
}

/// Whether the operator has moved the head to `node` for the latest spec.
pub fn head_on(vol: &Volume, node: &str) -> bool {
    let head = vol.status.as_ref().and_then(|s| s.head.as_ref());
    observed(vol) && head.is_some_and(|h| h.node.as_deref() == Some(node))
}

fn published_readonly(vol: &Volume) -> bool {
    vol.annotations().get(annotation::READONLY).is_some_and(|v| v == "true")
}

impl ControllerService {
    /// ControllerPublishVolume (the caller holds the volume's slot).
    pub(super) async fn publish(
        &self,
        name: &str,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>> {
        let node = req.node_id.as_str();
        if node.is_empty() {
            return Err(Error::Missing("node_id"));
        }
        let access = capability::access(req.volume_capability.as_ref()).map_err(|s| {
            Error::Invalid { field: "volume_capability", why: s.message().to_string() }
        })?;
        let vol = self.volume(name).await?;
        if vol.meta().deletion_timestamp.is_some() {
            return Err(self.not_found(name));
        }
        if !vol.spec.is_attachable() {
            let why = if vol.spec.attachable == Some(false) {
                "spec.attachable is false".to_string()
            } else {
                format!("it is a {:?} volume (a copy target): promote it first", vol.spec.role)
            };
            return Err(Error::NotAttachable { volume: name.into(), why });
        }
        if let Some(hold) = vol.annotations().get(ROLE_HOLD) {
            return Err(Error::RoleHeld { volume: name.into(), hold: hold.clone() });
        }
        let here = vol.spec.attached_node.as_deref() == Some(node);
        if let Some(other) = vol.spec.attached_node.as_deref().filter(|n| *n != node) {
            return Err(Error::PublishedElsewhere { volume: name.into(), node: other.into() });
        }
        if let Some(why) = misfit(&vol, &access) {
            return Err(Error::Incompatible { volume: name.into(), why });
        }
        if here && published_readonly(&vol) != req.readonly {
            let why = format!(
                "it is published to {node} with readonly={}, not {}",
                published_readonly(&vol),
                req.readonly
            );
            return Err(Error::Incompatible { volume: name.into(), why });
        }
        let cluster = &vol.spec.cluster;
        let missing_node = || Error::NodeNotFound { node: node.into(), cluster: cluster.clone() };
        let sc = self.clusters().get_opt(cluster).await?.ok_or_else(missing_node)?;
        if !node_has_agent(&sc, node) {
            return Err(missing_node());
        }
        if !here {
            let readonly = req.readonly.then_some("true");
            let patch = json!({
                "metadata": { "annotations": { annotation::READONLY: readonly } },
                "spec": { "attachedNode": node },
            });
            self.merge(name, patch).await?;
            tracing::info!(volume = %name, node, "attachedNode set");
        }
        let vol = self.wait(name, "moving its head to the node", |v| head_on(v, node)).await?;
        // The OpenHead request the operator opened the head with, from the
        // cluster as it is now (the agents' addresses).
        let sc = self.clusters().get_opt(cluster).await?.ok_or_else(missing_node)?;
        let d = desired(&vol, &sc).map_err(|e| match e {
            Invalid::NoAgentOnNode { .. } => missing_node(),
            other => Error::NotAttachable { volume: name.into(), why: other.to_string() },
        })?;
        if vol.status.as_ref().and_then(|s| s.head.as_ref()) != Some(&d.head) {
            return Err(Error::HeadMoving { volume: name.into(), node: node.into() });
        }
        Ok(crate::publish_context(&d.open))
    }

    /// ControllerUnpublishVolume (the caller holds the volume's slot): a
    /// missing volume, or one published elsewhere, is unpublished here.
    pub(super) async fn unpublish(&self, name: &str, node: &str) -> Result<()> {
        let Some(vol) = self.volumes().get_opt(name).await? else { return Ok(()) };
        match vol.spec.attached_node.as_deref() {
            None => return Ok(()),
            Some(at) if !node.is_empty() && at != node => return Ok(()),
            Some(_) => {}
        }
        let patch = json!({
            "metadata": { "annotations": { annotation::READONLY: null } },
            "spec": { "attachedNode": null },
        });
        self.merge(name, patch).await?;
        tracing::info!(volume = %name, node, "attachedNode removed");
        Ok(())
    }
}
