//! The `StorageCluster` reconciler and the agents' announcement.
//!
//! Agents announce themselves to the Kubernetes API, whether they run in
//! pods or as plain processes on hosts: `cairn-operator announce` (a
//! sidecar or a host service beside each agent) keeps a
//! `coordination.k8s.io` Lease `cairn-agent-<name>` renewed, labelled with
//! the storage cluster's name and annotated with the agent's address, node
//! and failure domain. The reconciler lists those Leases, asks each agent
//! for its capacity (`Stat`), and writes `status.agents` and the conditions
//! Ready / Degraded: observe (Leases, Stat) -> desired (pure: health from
//! the Lease's age and the answer) -> status.
//!
//! Invariant: an agent whose Lease has expired is Unreachable whatever it
//! last said; one renewed but not answering is Degraded; volumes place only
//! on Healthy and Degraded ones.

use std::{sync::Arc, time::Duration};

use cairn_api::crd::{
    AgentHealth, AgentStatus, Condition, ConditionStatus, StorageCluster, StorageClusterStatus,
    quantity::format_bytes, set_condition, storage_cluster::condition,
};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::controller::Action,
};
use serde_json::json;

use crate::{
    context::{Context, endpoint},
    report::{MANAGER, apply_status, k8s_time},
};

/// The label naming an announced agent's storage cluster.
pub const CLUSTER_LABEL: &str = "cairn.dev/storage-cluster";
pub const ADDRESS: &str = "cairn.dev/address";
pub const NODE: &str = "cairn.dev/node";
pub const DOMAIN: &str = "cairn.dev/domain";
/// An announcement's Lease lasts this long; it is renewed every third of it.
pub const LEASE_SECONDS: i32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
}

/// What an agent announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub cluster: String,
    pub agent: String,
    pub address: String,
    pub node: Option<String>,
    pub domain: Option<String>,
}

/// Renews (or creates) the agent's Lease once, by server-side apply.
pub async fn announce_once(
    client: &Client,
    namespace: &str,
    a: &Announcement,
) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = format!("cairn-agent-{}", a.agent);
    let mut annotations = serde_json::Map::new();
    annotations.insert(ADDRESS.into(), json!(a.address));
    if let Some(n) = &a.node {
        annotations.insert(NODE.into(), json!(n));
    }
    if let Some(d) = &a.domain {
        annotations.insert(DOMAIN.into(), json!(d));
    }
    let now = k8s_openapi::jiff::Timestamp::from_second(Timestamp::now().as_second()).expect("now");
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": name, "labels": { CLUSTER_LABEL: a.cluster }, "annotations": annotations },
        "spec": {
            "holderIdentity": a.agent,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
        }
    });
    leases.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Keeps announcing until the process ends.
pub async fn announce(client: Client, namespace: String, a: Announcement) -> ! {
    loop {
        match announce_once(&client, &namespace, &a).await {
            Ok(()) => tracing::debug!(agent = %a.agent, "announced"),
            Err(e) => {
                tracing::warn!(agent = %a.agent, error = %e, "could not renew the announcement")
            }
        }
        tokio::time::sleep(Duration::from_secs(LEASE_SECONDS as u64 / 3)).await;
    }
}

/// Pure: an announced agent's health from its Lease and whether it
/// answered `Stat`.
pub fn health(
    renewed: Option<Timestamp>,
    duration_s: i32,
    answered: bool,
    now: Timestamp,
) -> AgentHealth {
    let fresh = renewed.is_some_and(|r| now.duration_since(r).as_secs() <= duration_s as i64);
    match (fresh, answered) {
        (false, _) => AgentHealth::Unreachable,
        (true, true) => AgentHealth::Healthy,
        (true, false) => AgentHealth::Degraded,
    }
}

/// Pure: the status from the agents found.
pub fn status_of(
    sc: &StorageCluster,
    mut agents: Vec<AgentStatus>,
    now: Timestamp,
) -> StorageClusterStatus {
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let mut st = sc.status.clone().unwrap_or_default();
    let generation = sc.meta().generation;
    let ready = agents.iter().filter(|a| a.health == AgentHealth::Healthy).count();
    let capacity: i64 = agents
        .iter()
        .filter(|a| a.health != AgentHealth::Unreachable)
        .map(|a| a.capacity_bytes)
        .sum();
    let used: i64 =
        agents.iter().filter(|a| a.health != AgentHealth::Unreachable).map(|a| a.used_bytes).sum();
    st.agents_ready = Some(format!("{ready}/{}", agents.len()));
    st.capacity_bytes = Some(capacity);
    st.used_bytes = Some(used);
    st.capacity = Some(format_bytes(capacity));
    st.used = Some(format_bytes(used));
    let unhealthy: Vec<String> = agents
        .iter()
        .filter(|a| a.health != AgentHealth::Healthy)
        .map(|a| format!("{} ({:?})", a.name, a.health))
        .collect();
    let c = |t: &str, on: bool, r: &str, m: String| {
        Condition::new(
            t,
            if on { ConditionStatus::True } else { ConditionStatus::False },
            r,
            m,
            generation,
            k8s_time(now),
        )
    };
    let (ok, reason, msg) = if agents.is_empty() {
        (
            false,
            "NoAgents",
            format!(
                "no agent has announced itself for {}: start `cairn-operator announce --cluster {}` beside each agent",
                sc.name_any(),
                sc.name_any()
            ),
        )
    } else if unhealthy.is_empty() {
        (true, "AgentsHealthy", format!("{ready} agents healthy"))
    } else {
        (ready > 0, "SomeAgentsUnhealthy", format!("not healthy: {}", unhealthy.join(", ")))
    };
    set_condition(&mut st.conditions, c(condition::READY, ok, reason, msg.clone()));
    set_condition(&mut st.conditions, c("Degraded", !unhealthy.is_empty(), reason, msg));
    st.agents = agents;
    st.observed_generation = generation;
    st
}

/// Reconciles one StorageCluster.
#[tracing::instrument(skip_all, fields(cluster = %sc.name_any()))]
pub async fn reconcile(sc: Arc<StorageCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = sc.name_any();
    let api: Api<StorageCluster> = Api::all(ctx.client.clone());
    let now = Timestamp::now();
    let mut agents = Vec::new();
    if sc.spec.gateway.is_none() {
        let leases: Api<Lease> = Api::all(ctx.client.clone());
        let found =
            leases.list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}"))).await?;
        for l in found {
            let ann = l.annotations();
            let Some(address) = ann.get(ADDRESS).cloned() else { continue };
            let spec = l.spec.clone().unwrap_or_default();
            let agent = spec.holder_identity.clone().unwrap_or_else(|| l.name_any());
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|t| Timestamp::from_second(t.0.as_second()).unwrap_or(now));
            let stat = ctx.agents.stat(&endpoint(&address)).await;
            let answered = stat.is_ok();
            let (capacity, used) =
                stat.as_ref().map(|(c, u)| (*c as i64, *u as i64)).unwrap_or_default();
            agents.push(AgentStatus {
                name: agent,
                node: ann.get(NODE).cloned(),
                address,
                domain: ann.get(DOMAIN).cloned(),
                capacity_bytes: capacity,
                used_bytes: used,
                health: health(
                    renewed,
                    spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS),
                    answered,
                    now,
                ),
                load: 0,
                last_seen: renewed.map(k8s_time),
                message: stat.err().map(|e| e.to_string()),
            });
        }
    }
    let mut st = status_of(&sc, agents, now);
    if sc.spec.gateway.is_some() {
        // A peer site: its agents are its own operator's to report.
        st.agents_ready = None;
        let c = Condition::new(
            condition::READY,
            ConditionStatus::True,
            "PeerSite",
            "a peer site reached through its gateway",
            sc.meta().generation,
            k8s_time(now),
        );
        set_condition(&mut st.conditions, c);
        st.conditions.retain(|c| c.type_ != "Degraded");
    }
    apply_status(&api, &name, &st).await?;
    Ok(Action::requeue(Duration::from_secs(LEASE_SECONDS as u64 / 3)))
}

/// `error_policy`: back off and try again.
pub fn error_policy(_sc: Arc<StorageCluster>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_lease_and_the_answer() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let ago = |s: i64| Some(now - jiff::SignedDuration::from_secs(s));
        assert_eq!(health(ago(5), 30, true, now), AgentHealth::Healthy);
        assert_eq!(health(ago(5), 30, false, now), AgentHealth::Degraded);
        assert_eq!(
            health(ago(31), 30, true, now),
            AgentHealth::Unreachable,
            "an expired lease wins"
        );
        assert_eq!(health(None, 30, true, now), AgentHealth::Unreachable);
    }
}
