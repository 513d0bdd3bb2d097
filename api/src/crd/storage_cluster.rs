//! `StorageCluster`: a site, the set of agents that form one failure
//! domain. Its agents are either the nodes of this Kubernetes cluster that
//! a node selector picks, or a peer site reached through its replication
//! gateway; the schema admits exactly one of the two.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Replicas of a volume's chunks when a volume does not say.
pub const DEFAULT_REPLICAS: i32 = 2;
/// The chunk size of new volumes when the cluster does not say (64 MiB).
pub const DEFAULT_CHUNK_SIZE_BYTES: i64 = 64 << 20;

/// Keys of the Secret a `gateway` names.
pub mod gateway_secret {
    /// This site's certificate for the peer site (PEM), signed by a CA the
    /// peer trusts.
    pub const TLS_CERT: &str = "tls.crt";
    /// Its private key (PEM).
    pub const TLS_KEY: &str = "tls.key";
    /// The peer site's CA (PEM): the only issuer trusted for the peer's
    /// agents.
    pub const PEER_CA: &str = "ca.crt";
    /// The pairing secret both sites share (at least 16 bytes).
    pub const PAIRING_SECRET: &str = "pairing-secret";
}

/// Condition types of a `StorageCluster`.
pub mod condition {
    /// Enough agents are healthy to place volumes with the default
    /// replicas.
    pub const READY: &str = "Ready";
    /// A gateway cluster: the peer site answers and accepts the pairing
    /// secret.
    pub const PAIRED: &str = "Paired";
}

/// A storage cluster (site): which agents belong to it and the defaults of
/// its volumes. Set exactly one of `nodeSelector` (agents in this
/// Kubernetes cluster) and `gateway` (a peer site).
// clippy takes the printer columns' repeated `type_ = ...` for duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "StorageCluster",
    status = "StorageClusterStatus",
    derive = "PartialEq",
    shortname = "scluster",
    category = "cairn",
    doc = "A Cairn storage cluster (a site): its agents and the defaults of its volumes.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.agentsReady",
        description = "Healthy agents / agents"
    ),
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.used"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.nodeSelector) != has(self.gateway)",
        "message": "set exactly one of nodeSelector (agents on this Kubernetes cluster's nodes) and gateway (a peer site's endpoint and Secret)"
    }
]))]
pub struct StorageClusterSpec {
    /// Agents in this Kubernetes cluster: the agent on each node with all
    /// these labels joins this storage cluster, under the cluster's name.
    /// `{}` selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// The node label whose value is an agent's failure domain (e.g.
    /// `topology.kubernetes.io/zone`): the replicas of a chunk go to
    /// distinct domains when there are enough. Unset: every agent is a
    /// domain of its own. Used with `nodeSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub failure_domain_label: Option<String>,
    /// A peer site: its replication gateway and the Secret that lets this
    /// site talk to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Gateway>,
    /// Defaults of the volumes created on this cluster.
    #[serde(default)]
    pub defaults: ClusterDefaults,
}

/// A peer site's replication gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    /// The gateway's address, `https://host:port` (sites talk mutual TLS).
    #[schemars(
        length(max = 2048),
        regex(pattern = r"^https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?$")
    )]
    pub endpoint: String,
    /// The Secret holding this site's certificate and key for the peer
    /// (`tls.crt`, `tls.key`), the peer site's CA (`ca.crt`) and the
    /// pairing secret (`pairing-secret`).
    pub secret_ref: SecretRef,
}

/// A Secret by name and namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
}

/// Defaults of the volumes of a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterDefaults {
    /// Copies of each chunk, on distinct agents, for volumes that do not
    /// say (1 to 5).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// The striping unit of new volumes, in bytes: a power of two from
    /// 1 MiB (1048576) to 1 GiB (1073741824). Existing volumes keep the
    /// chunk size they were created with.
    #[serde(default = "default_chunk_size_bytes")]
    #[schemars(
        range(min = 1048576, max = 1073741824),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self in [1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824]",
                "message": "chunkSizeBytes must be a power of two from 1 MiB (1048576) to 1 GiB (1073741824), e.g. 67108864 for 64 MiB"
            }
        ])
    )]
    pub chunk_size_bytes: i64,
}

impl Default for ClusterDefaults {
    fn default() -> Self {
        Self { replicas: DEFAULT_REPLICAS, chunk_size_bytes: DEFAULT_CHUNK_SIZE_BYTES }
    }
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}

fn default_chunk_size_bytes() -> i64 {
    DEFAULT_CHUNK_SIZE_BYTES
}

/// What the operator sees of a storage cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageClusterStatus {
    /// Every agent of the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1024),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub agents: Vec<AgentStatus>,
    /// Healthy agents / agents, e.g. `3/4` (the Ready column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_ready: Option<String>,
    /// Bytes of the file systems holding the agents' data, summed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
    /// Bytes of block data the agents hold, summed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<i64>,
    /// `capacityBytes` for people, e.g. `1.5Ti` (see `quantity::format_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// `usedBytes` for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
    /// `Ready`, and `Paired` for a gateway cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One agent of a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The agent's name (its `--name`): what placements list.
    pub name: String,
    /// The Kubernetes node it runs on (unset at a gateway site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its gRPC endpoint, e.g. `https://10.0.0.5:7070`.
    pub address: String,
    /// Its failure domain (the value of `failureDomainLabel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Bytes of the file system that holds its data dir.
    pub capacity_bytes: i64,
    /// Bytes of block data of all its replicas.
    pub used_bytes: i64,
    /// `Healthy`, `Degraded` or `Unreachable`.
    pub health: AgentHealth,
    /// Copy streams and rebuilds running on the agent (what `Auto`
    /// source selection avoids).
    #[serde(default)]
    pub load: i32,
    /// When the agent last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Why the agent is not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How an agent is doing: `Healthy` (answers, every replica serving),
/// `Degraded` (answers, but some replica is not serving or the disk is
/// nearly full), `Unreachable` (does not answer).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AgentHealth {
    Healthy,
    Degraded,
    Unreachable,
}
