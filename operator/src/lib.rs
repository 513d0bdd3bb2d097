//! cairn-operator: the reconcilers of Cairn's custom resources. Pure
//! planning steps (what to keep, when to run, where to place) live apart
//! from the code that talks to the API server and the agents, and are
//! unit-tested alone; the reconcilers are tested against kube's mocked API
//! server with a fake of the agents.

pub mod agent;
pub mod leader;
pub mod metrics;
pub mod remote_link;
pub mod retention;
pub mod schedule;
pub mod snapshot_schedule;
pub mod storage_cluster;
pub mod volume;
