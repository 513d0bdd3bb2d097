//! cairn-operator: the reconcilers of Cairn's custom resources. Pure
//! planning steps (what to keep, when to run, where to place) live apart
//! from the code that talks to the API server and the agents, and are
//! unit-tested alone; the reconcilers are tested against kube's mocked API
//! server with a fake of the agents.

pub mod context;
pub mod cron;
pub mod leader;
pub mod metrics;
pub mod remote_link;
pub mod report;
pub mod retention;
pub mod snapshot_schedule;
pub mod storage_cluster;
pub mod volume;

// The agent seam (AgentApi, GrpcAgents, AgentError, the fake) is cairn-client,
// shared with the CSI controller; the alias keeps `crate::agent::…` paths.
pub use cairn_client as agent;

#[cfg(test)]
#[path = "../tests/fixtures/mod.rs"]
mod fixtures;

use std::sync::Arc;

use cairn_api::crd::{RemoteLink, SnapshotSchedule, StorageCluster, Volume};
use context::Context;
use futures::StreamExt;
use kube::{
    Api,
    runtime::{Controller, watcher},
};

/// A controller's reconcile, counted and timed in the metrics.
macro_rules! counted {
    ($module:ident, $name:expr) => {
        |obj, ctx: Arc<Context>| async move {
            let started = std::time::Instant::now();
            let result = $module::reconcile(obj, ctx.clone()).await;
            let reason = result.as_ref().err().map(crate::metrics::reason);
            ctx.metrics.observe($name, started, reason.as_deref());
            result
        }
    };
}

/// Runs the four controllers until the process is asked to stop.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let clusters =
        Controller::new(Api::<StorageCluster>::all(client.clone()), watcher::Config::default())
            .shutdown_on_signal()
            .run(
                counted!(storage_cluster, "storage_cluster"),
                storage_cluster::error_policy,
                ctx.clone(),
            )
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "storage cluster reconcile failed");
                }
            });
    let volumes = Controller::new(Api::<Volume>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(counted!(volume, "volume"), volume::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!(error = %e, "volume reconcile failed");
            }
        });
    let links = Controller::new(Api::<RemoteLink>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(counted!(remote_link, "remote_link"), remote_link::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!(error = %e, "remote link reconcile failed");
            }
        });
    let schedules =
        Controller::new(Api::<SnapshotSchedule>::all(client), watcher::Config::default())
            .shutdown_on_signal()
            .run(
                counted!(snapshot_schedule, "snapshot_schedule"),
                snapshot_schedule::error_policy,
                ctx,
            )
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "snapshot schedule reconcile failed");
                }
            });
    futures::join!(clusters, volumes, links, schedules);
}
