//! cairn-client: the seam to the agents that the operator and the CSI
//! controller both stand on. [`AgentApi`] is the calls they make; the gRPC
//! client ([`GrpcAgents`], mutual TLS for `https://` endpoints) is the real
//! implementation and, with the `fake` feature (tests only), an in-memory
//! fake ([`FakeAgents`]) records calls. [`head`] is the pure plan of where a
//! Volume's head runs and what it is asked. Callers reach agents only
//! through the trait.

pub mod grpc;
pub mod head;

#[cfg(feature = "fake")]
pub mod fake;

use std::time::Duration;

use cairn_api::agent::v1 as pb;

#[cfg(feature = "fake")]
pub use fake::{Call, FakeAgents};
pub use grpc::GrpcAgents;

/// An agent call that failed: which agent, the gRPC code, what it said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent at {endpoint}: {code:?}: {message}")]
pub struct AgentError {
    pub endpoint: String,
    pub code: tonic::Code,
    pub message: String,
}

impl AgentError {
    pub(crate) fn from_status(endpoint: &str, s: tonic::Status) -> Self {
        AgentError { endpoint: endpoint.to_string(), code: s.code(), message: s.message().into() }
    }

    pub fn is_not_found(&self) -> bool {
        self.code == tonic::Code::NotFound
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

/// What the operator asks of agents.
#[tonic::async_trait]
pub trait AgentApi: Send + Sync + std::fmt::Debug + 'static {
    /// Opens (or re-confirms, same epoch) a volume's head on the agent.
    async fn open_head(
        &self,
        endpoint: &str,
        req: pb::OpenHeadRequest,
    ) -> AgentResult<pb::HeadStatus>;
    async fn close_head(&self, endpoint: &str, volume: &str) -> AgentResult<()>;
    async fn promote(&self, endpoint: &str, volume: &str) -> AgentResult<pb::PromoteHeadResponse>;
    async fn demote(
        &self,
        endpoint: &str,
        volume: &str,
        snapshot: &str,
        generation: u64,
    ) -> AgentResult<()>;
    /// Deletes the agent's replica of a volume (a missing one is fine).
    async fn delete_replica(&self, endpoint: &str, volume: &str) -> AgentResult<()>;
    /// Takes a crash-consistent snapshot at the volume's head.
    async fn snapshot(
        &self,
        endpoint: &str,
        volume: &str,
        id: &str,
        generation: u64,
    ) -> AgentResult<()>;
    /// The snapshots of the agent's replica of the volume, oldest first.
    async fn snapshots(&self, endpoint: &str, volume: &str) -> AgentResult<Vec<pb::SnapshotInfo>>;
    /// Deletes a snapshot at the head (refused while a link needs it).
    async fn delete_snapshot(&self, endpoint: &str, volume: &str, id: &str) -> AgentResult<()>;
    /// The links the agent sends for the volume, with their cursors.
    async fn links(&self, endpoint: &str, volume: &str) -> AgentResult<Vec<pb::LinkStatus>>;
    /// Capacity and use of the agent's data dir: (capacity, used) bytes.
    async fn stat(&self, endpoint: &str) -> AgentResult<(u64, u64)>;
    /// Registers a link at the receiving agent (idempotent).
    async fn register_link(&self, endpoint: &str, req: pb::RegisterLinkRequest) -> AgentResult<()>;
    /// Drops a link registered at the receiving agent (an unknown one is
    /// dropped already): the newest snapshot it sealed there is no longer
    /// kept from deletion.
    async fn unregister_link(&self, endpoint: &str, link: &str, secret: &[u8]) -> AgentResult<()>;
    /// Creates or changes a link at the sending agent.
    async fn put_link(&self, endpoint: &str, link: pb::Link) -> AgentResult<pb::LinkStatus>;
    /// Copies every snapshot the link's target lacks (long: run it apart).
    async fn sync_link(
        &self,
        endpoint: &str,
        link: &str,
        resync: bool,
    ) -> AgentResult<pb::SyncLinkResponse>;
    /// Copies one snapshot of a volume at this (source head) agent to a
    /// link registered at the receiver: a full copy when
    /// `base_snapshot_id` is empty. Returns once the snapshot is sealed at
    /// the receiver with the same digest; a call cut short resumes from the
    /// receiver's checkpoint at the next one (long: up to [`COPY_TIMEOUT`]).
    async fn copy_snapshot(&self, endpoint: &str, req: pb::CopySnapshotRequest) -> AgentResult<()>;
    /// Planned switchover over a link (long: run it apart).
    async fn switchover(
        &self,
        endpoint: &str,
        link: &str,
        snapshot: &str,
        generation: u64,
    ) -> AgentResult<()>;
}

/// How long one call may take, except copies.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `copy_snapshot` call may take. A longer copy is cut and
/// resumes from the receiver's checkpoint at the next call.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
