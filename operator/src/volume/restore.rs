//! The restore step of the Volume reconcile: a Volume with `spec.source`
//! (a snapshot of another Volume, or another Volume as it is now) is
//! filled by the agents' snapshot copy before it takes any write.
//!
//! Steps, each safe to repeat: resolve the source (its Volume, head and
//! snapshot; for a clone, take the snapshot `clone-<hash>` at the source
//! unless an earlier attempt did); register the receiving link
//! `restore-<volume id>` at the new volume's head agent (a fresh pairing
//! secret each attempt: re-registering replaces the secret and keeps what
//! the link sealed); `CopySnapshot` in full from the source's head agent
//! (returns once sealed at the receiver with the source's digest; a
//! repeat resumes from the receiver's checkpoint); drop the link there.
//! The caller then records `Restored=True` and only after that may the
//! head take its spec role, and the clone's snapshot be deleted.
//!
//! Invariants: until `Restored=True` is in the status the head is opened
//! and kept Remote (`Volume::head_role`), so only the copy writes it and
//! nothing attaches (Ready is False); `Restored=True` is written only
//! after the copy returned; the clone's snapshot is deleted only after
//! that, so every retry finds what it copies.

use cairn_api::{
    agent::v1 as pb,
    crd::{StorageCluster, Volume, VolumeRole},
};
use kube::{Api, Resource, ResourceExt};

use super::{Desired, Error};
use crate::context::{Context, head_endpoint};

/// Why a restore cannot go on yet: reported in `Restored=False` (and
/// Ready=False) with a Warning event, looked at again in 30 s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Wait {
    #[error(
        "source Volume {volume} does not exist in this namespace: create it, or delete this Volume and create it again with another source"
    )]
    SourceNotFound { volume: String },
    #[error("source Volume {volume} is not placed yet (no head): the restore starts when it is")]
    SourceNotPlaced { volume: String },
    #[error(
        "source Volume {volume} has no snapshot {snapshot}: pick one of its status.snapshots, in a new Volume (source cannot change)"
    )]
    SnapshotNotFound { volume: String, snapshot: String },
    #[error(
        "source Volume {volume} is Remote: only a Primary takes the snapshot a clone copies; restore from one of its snapshots instead (source.snapshot)"
    )]
    SourceNotPrimary { volume: String },
    #[error(
        "sizeBytes is {size}, source Volume {volume} has {source_size}: a restored or cloned volume has its source's size (create it with sizeBytes: {source_size})"
    )]
    SizeMismatch { volume: String, size: i64, source_size: i64 },
}

impl Wait {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Wait::SourceNotFound { .. } => "SourceNotFound",
            Wait::SourceNotPlaced { .. } => "SourceNotPlaced",
            Wait::SnapshotNotFound { .. } => "SnapshotNotFound",
            Wait::SourceNotPrimary { .. } => "SourceNotPrimary",
            Wait::SizeMismatch { .. } => "SizeMismatch",
        }
    }
}

/// The snapshot copied, where it was read from, and whether it was taken
/// for this clone (then it is deleted at the source once recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub endpoint: String,
    pub volume_id: String,
    pub snapshot: String,
    pub taken_for_clone: bool,
}

/// Pure: the receiving link a restore into the volume of agent id
/// `volume_id` registers at its head agent.
pub fn link_id(volume_id: &str) -> String {
    format!("restore-{volume_id}")
}

/// Pure: the snapshot a clone into `vol` copies, taken at the source:
/// `clone-` and 24 hex digits of the BLAKE3 of its uid (of
/// `<namespace>/<name>` without one), the same at every attempt, and new
/// for a Volume deleted and created again under the same name.
pub fn clone_snapshot_id(vol: &Volume) -> String {
    let key =
        vol.meta().uid.clone().unwrap_or_else(|| {
            format!("{}/{}", vol.namespace().unwrap_or_default(), vol.name_any())
        });
    let h = blake3::hash(key.as_bytes()).to_hex();
    format!("clone-{}", &h[..24])
}

/// Pure: the size the source has now (its placed size, else its spec's).
pub fn size_of(vol: &Volume) -> i64 {
    vol.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(vol.spec.size_bytes)
}

/// Fills `vol` (placed per `d`, head opened Remote) from its source.
/// `Ok(Err(wait))`: cannot go on yet, nothing written; an `Err` is an
/// agent or API failure (backs off and retries, resuming the copy).
pub async fn restore(
    vol: &Volume,
    d: &Desired,
    ctx: &Context,
) -> Result<Result<Origin, Wait>, Error> {
    let Some(source) = vol.spec.source.as_ref() else {
        unreachable!("restore is called for a Volume with spec.source")
    };
    let origin = match resolve(vol, source, ctx).await? {
        Ok(o) => o,
        Err(w) => return Ok(Err(w)),
    };
    let link = link_id(&d.open.volume_id);
    let secret: [u8; 32] = rand::random();
    let register = pb::RegisterLinkRequest {
        link_id: link.clone(),
        pairing_secret: secret.to_vec().into(),
        target_volume_id: d.open.volume_id.clone(),
    };
    ctx.agents.register_link(&d.endpoint, register).await?;
    let copy = pb::CopySnapshotRequest {
        volume_id: origin.volume_id.clone(),
        snapshot_id: origin.snapshot.clone(),
        base_snapshot_id: String::new(),
        link_id: link.clone(),
        pairing_secret: secret.to_vec().into(),
        target_endpoint: d.endpoint.clone(),
        ..Default::default()
    };
    ctx.agents.copy_snapshot(&origin.endpoint, copy).await?;
    tracing::info!(volume = %vol.name_any(), source = %source.volume_name(), snapshot = %origin.snapshot, "source snapshot copied");
    // The receiver keeps the newest snapshot a registered link sealed (the
    // base of its next copy); this link has no next copy.
    ctx.agents.unregister_link(&d.endpoint, &link, &secret).await?;
    Ok(Ok(origin))
}

/// Observe (reads only, except a clone's snapshot, taken once): the source
/// Volume, its head agent, and the snapshot to copy.
async fn resolve(
    vol: &Volume,
    source: &cairn_api::crd::ContentSource,
    ctx: &Context,
) -> Result<Result<Origin, Wait>, Error> {
    let ns = vol.namespace().unwrap_or_default();
    let name = source.volume_name().to_string();
    let volumes: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(from) = volumes.get_opt(&name).await? else {
        return Ok(Err(Wait::SourceNotFound { volume: name }));
    };
    let source_size = size_of(&from);
    if source_size != vol.spec.size_bytes {
        let size = vol.spec.size_bytes;
        return Ok(Err(Wait::SizeMismatch { volume: name, size, source_size }));
    }
    let clusters: Api<StorageCluster> = Api::all(ctx.client.clone());
    let cluster = clusters.get_opt(&from.spec.cluster).await?;
    let Some((endpoint, volume_id)) = head_endpoint(from.status.as_ref(), cluster.as_ref()) else {
        return Ok(Err(Wait::SourceNotPlaced { volume: name }));
    };
    let there = ctx.agents.snapshots(&endpoint, &volume_id).await?;
    let has = |id: &str| there.iter().any(|s| s.snapshot_id == id);
    let (snapshot, taken_for_clone) = match &source.snapshot {
        Some(s) if has(&s.snapshot) => (s.snapshot.clone(), false),
        Some(s) => {
            return Ok(Err(Wait::SnapshotNotFound { volume: name, snapshot: s.snapshot.clone() }));
        }
        None => {
            let id = clone_snapshot_id(vol);
            if !has(&id) {
                let role = from.status.as_ref().and_then(|s| s.role).unwrap_or(from.spec.role);
                if role != VolumeRole::Primary {
                    return Ok(Err(Wait::SourceNotPrimary { volume: name }));
                }
                let generation = there.iter().map(|s| s.generation).max().unwrap_or(0) + 1;
                match ctx.agents.snapshot(&endpoint, &volume_id, &id, generation).await {
                    Ok(()) => {}
                    Err(e) if e.code == tonic::Code::AlreadyExists => {}
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(volume = %vol.name_any(), source = %name, snapshot = %id, generation, "snapshot taken for a clone");
            }
            (id, true)
        }
    };
    Ok(Ok(Origin { endpoint, volume_id, snapshot, taken_for_clone }))
}

/// Deletes the snapshot taken for a clone at its source, once the clone
/// recorded `Restored=True` (one already gone is fine; a refusal is
/// logged: the clone is done anyway, the snapshot stays at the source).
pub async fn drop_clone_snapshot(ctx: &Context, origin: &Origin) {
    let (ep, id, snap) = (&origin.endpoint, &origin.volume_id, &origin.snapshot);
    match ctx.agents.delete_snapshot(ep, id, snap).await {
        Ok(()) => {
            tracing::info!(volume = %id, snapshot = %snap, "snapshot taken for a clone deleted")
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => {
            tracing::warn!(volume = %id, snapshot = %snap, error = %e, "snapshot taken for a clone could not be deleted at its source; delete it by hand")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn a_clones_snapshot_is_named_after_the_new_volumes_uid_and_its_link_after_its_id() {
        let mut v = fixtures::restored("db-copy", "db", None);
        let by_name = clone_snapshot_id(&v);
        v.meta_mut().uid = Some("0000-1111".into());
        let id = clone_snapshot_id(&v);
        assert_ne!(id, by_name, "a re-created Volume gets a new snapshot");
        assert_eq!(id, clone_snapshot_id(&v.clone()));
        assert!(cairn_api::SnapshotId::new(&id).is_ok(), "{id}");
        assert!(id.starts_with("clone-") && id.len() == 30, "{id}");
        assert_eq!(link_id("shop-db-copy"), "restore-shop-db-copy");
    }

    #[test]
    fn every_wait_names_the_source_and_says_what_to_do() {
        let v = "db".to_string();
        let waits = [
            Wait::SourceNotFound { volume: v.clone() },
            Wait::SourceNotPlaced { volume: v.clone() },
            Wait::SnapshotNotFound { volume: v.clone(), snapshot: "nightly".into() },
            Wait::SourceNotPrimary { volume: v.clone() },
            Wait::SizeMismatch { volume: v.clone(), size: 4096, source_size: 8192 },
        ];
        for w in waits {
            assert!(w.to_string().contains("source Volume db"), "{w}");
            assert!(!w.reason().is_empty());
        }
    }
}
