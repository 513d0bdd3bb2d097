//! cairn-operator: runs the reconcilers against the Kubernetes API server
//! the usual kube client configuration finds (in a pod, its service
//! account; outside, the kubeconfig), reaching agents over gRPC.
//!
//! `cairn-operator` (or `cairn-operator run`) runs the StorageCluster,
//! Volume, RemoteLink and SnapshotSchedule controllers;
//! `cairn-operator announce` runs beside an agent and keeps its
//! announcement (a Lease) renewed. Several replicas may run: only the
//! holder of the leader Lease reconciles. `/metrics`, `/healthz` and
//! `/readyz` are served on `--metrics-listen`.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use cairn_operator::{
    agent::GrpcAgents,
    context::Context,
    storage_cluster::{self, Announcement},
};
use clap::{Parser, Subcommand};
use kube::{Client, runtime::events::Recorder};
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
    /// This replica's name in the leader Lease (in a pod: its name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader Lease (in a pod: its namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cairn-system")]
    lease_namespace: String,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "CAIRN_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: std::net::SocketAddr,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the controllers (the default).
    Run,
    /// Announce an agent to the Kubernetes API: keeps a Lease
    /// `cairn-agent-<name>` renewed with its storage cluster, address, node
    /// and failure domain, so the operator finds it (in a pod or on a host).
    Announce {
        /// The StorageCluster the agent belongs to.
        #[arg(long, env = "CAIRN_CLUSTER")]
        cluster: String,
        /// The agent's name (its --name).
        #[arg(long, env = "CAIRN_AGENT_NAME")]
        name: String,
        /// The agent's gRPC address as the operator reaches it, e.g. 10.0.0.5:7070.
        #[arg(long, env = "CAIRN_AGENT_ADDRESS")]
        address: String,
        #[arg(long, env = "CAIRN_NODE_NAME")]
        node: Option<String>,
        /// Failure domain (zone, rack).
        #[arg(long, env = "CAIRN_AGENT_DOMAIN")]
        domain: Option<String>,
        /// Namespace of the Lease.
        #[arg(long, env = "CAIRN_NAMESPACE", default_value = "cairn-system")]
        namespace: String,
    },
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
    if let Some(Cmd::Announce { cluster, name, address, node, domain, namespace }) = args.command {
        let a = Announcement { cluster, agent: name, address, node, domain };
        tracing::info!(agent = %a.agent, cluster = %a.cluster, "announcing");
        storage_cluster::announce(client, namespace, a).await;
    }
    let metrics = Arc::new(cairn_operator::metrics::Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    tokio::spawn(cairn_operator::metrics::serve(listener, metrics.clone()));
    client.apiserver_version().await.context("reaching the Kubernetes API server")?;
    metrics.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    // Only the holder of the leader Lease reconciles.
    let me = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    tracing::info!(identity = %me, namespace = %args.lease_namespace, "waiting for the lead");
    let lost = cairn_operator::leader::lead(client.clone(), args.lease_namespace.clone(), me).await;
    let agents = Arc::new(GrpcAgents::new(tls(&args)?));
    let recorder = Recorder::new(client.clone(), "cairn-operator".into());
    let ctx = Arc::new(Context { client: client.clone(), agents, recorder, metrics });
    tokio::select! {
        () = cairn_operator::run(ctx) => {}
        () = lost => anyhow::bail!("lost the leader lease: exiting so that one leader acts at a time"),
    }
    Ok(())
}
