//! cairn-operator: runs the reconcilers against the Kubernetes API server
//! the usual kube client configuration finds (in a pod, its service
//! account; outside, the kubeconfig), reaching agents over gRPC.
//!
//! Built so far: the Volume, SnapshotSchedule and RemoteLink controllers.
//! The StorageCluster controller, the leader Lease, /metrics and the health
//! endpoints are not built yet (docs/design.md, "The operator").

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use cairn_api::crd::{RemoteLink, SnapshotSchedule, Volume};
use cairn_operator::{
    agent::GrpcAgents,
    remote_link, snapshot_schedule,
    volume::{self, Context},
};
use clap::Parser;
use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{Controller, events::Recorder, watcher},
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Cairn's operator.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Log format: text or json.
    #[arg(long, env = "CAIRN_LOG_FORMAT", default_value = "json", value_parser = ["text", "json"])]
    log_format: String,
    /// The operator's client certificate for agents served over https://.
    #[arg(long, env = "CAIRN_AGENT_TLS_CERT", requires_all = ["agent_tls_key", "agent_ca"])]
    agent_tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAIRN_AGENT_TLS_KEY")]
    agent_tls_key: Option<PathBuf>,
    /// The CA that signed the agents' certificates.
    #[arg(long, env = "CAIRN_AGENT_CA")]
    agent_ca: Option<PathBuf>,
}

fn tls(args: &Args) -> anyhow::Result<Option<ClientTlsConfig>> {
    let (Some(cert), Some(key), Some(ca)) =
        (&args.agent_tls_cert, &args.agent_tls_key, &args.agent_ca)
    else {
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(Some(
        ClientTlsConfig::new()
            .identity(Identity::from_pem(read(cert)?, read(key)?))
            .ca_certificate(Certificate::from_pem(read(ca)?)),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_format == "json" {
        fmt.json().init()
    } else {
        fmt.init()
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "cairn-operator starting");

    let client = Client::try_default()
        .await
        .context("no Kubernetes API server configuration (in a pod: its service account; outside: KUBECONFIG or ~/.kube/config)")?;
    let agents = Arc::new(GrpcAgents::new(tls(&args)?));
    let recorder = Recorder::new(client.clone(), "cairn-operator".into());
    let ctx = Arc::new(Context { client: client.clone(), agents, recorder });
    let volumes = Controller::new(Api::<Volume>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(volume::reconcile, volume::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!(error = %e, "volume reconcile failed");
            }
        });
    let links = Controller::new(Api::<RemoteLink>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(remote_link::reconcile, remote_link::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!(error = %e, "remote link reconcile failed");
            }
        });
    let schedules =
        Controller::new(Api::<SnapshotSchedule>::all(client), watcher::Config::default())
            .shutdown_on_signal()
            .run(snapshot_schedule::reconcile, snapshot_schedule::error_policy, ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "snapshot schedule reconcile failed");
                }
            });
    futures::join!(volumes, links, schedules);
    Ok(())
}
