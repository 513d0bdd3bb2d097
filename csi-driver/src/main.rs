//! cairn-csi: serves Cairn's CSI driver on a unix socket.
//!
//! `cairn-csi controller` serves Identity and Controller (one Deployment),
//! and NodeGetCapabilities for the sidecars that ask it there;
//! `cairn-csi node` serves Identity and Node (a DaemonSet, beside the node's
//! agent). Both stop cleanly on SIGTERM or Ctrl-C.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use cairn_csi::{
    agent::{Agents, TlsArgs},
    controller::{ControllerConfig, ControllerService},
    identity::{IdentityService, Role},
    node::{NodeConfig, NodeService, capabilities::CapabilitiesOnly},
};
use clap::{Parser, Subcommand};
use tokio_stream::wrappers::UnixListenerStream;

/// Cairn's CSI driver.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The CSI endpoint the CO dials: a unix socket. A stale socket file is
    /// removed first; its directory is created.
    #[arg(long, global = true, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Log format: text or json.
    #[arg(long, global = true, env = "CAIRN_LOG_FORMAT", default_value = "json", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve Identity and Controller: Volumes for PVCs, heads on pods' nodes.
    Controller {
        /// Namespace of the Volume objects created for PVCs.
        #[arg(long, env = "CAIRN_NAMESPACE", default_value = "cairn-system")]
        namespace: String,
        /// How long CreateVolume waits for a new volume to be ready.
        #[arg(long, env = "CAIRN_READY_TIMEOUT_SECONDS", default_value_t = 120)]
        ready_timeout_seconds: u64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Serve Identity and Node: attach, format and mount volumes on this node.
    Node {
        /// This node's name: the CO's node id.
        #[arg(long, env = "NODE_NAME")]
        node_id: String,
        /// The StorageCluster this node's agent belongs to (the node's
        /// topology.cairn.dev/cluster).
        #[arg(long, env = "CAIRN_CLUSTER")]
        storage_cluster: String,
        /// The local agent (https:// for mutual TLS with the --agent-* files).
        #[arg(long, env = "CAIRN_AGENT_ENDPOINT", default_value = "http://127.0.0.1:7070")]
        agent_endpoint: String,
        /// Node-local bookkeeping (which loop device serves which volume).
        #[arg(long, env = "CAIRN_CSI_STATE_DIR", default_value = "/var/lib/cairn-csi")]
        state_dir: PathBuf,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        fmt.json().init()
    } else {
        fmt.init()
    }
    let role = match &args.command {
        Cmd::Controller { .. } => "controller",
        Cmd::Node { .. } => "node",
    };
    tracing::info!(version = cairn_csi::VERSION, driver = cairn_csi::DRIVER_NAME, role, endpoint = %args.endpoint, "cairn-csi starting");

    let listener = cairn_csi::socket::bind(&args.endpoint)
        .with_context(|| format!("serving --endpoint {}", args.endpoint))?;
    let incoming = UnixListenerStream::new(listener);
    let mut server = tonic::transport::Server::builder();
    let router = match args.command {
        Cmd::Controller { namespace, ready_timeout_seconds, tls } => {
            let config = ControllerConfig {
                namespace,
                ready_timeout: Duration::from_secs(ready_timeout_seconds),
            };
            let controller = ControllerService::connect(config, tls.load()?).await?;
            // The Node service here answers only NodeGetCapabilities, which
            // csi-resizer asks the controller's socket at start.
            server
                .add_service(IdentityService::new(Role::Controller).into_server())
                .add_service(controller.into_server())
                .add_service(CapabilitiesOnly.into_server())
        }
        Cmd::Node { node_id, storage_cluster, agent_endpoint, state_dir, tls } => {
            let agents = Agents::new(tls.load()?);
            let agent =
                agents.channel(&agent_endpoint).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            let identity = IdentityService::new(Role::Node {
                agent: agent.clone(),
                endpoint: agent_endpoint.clone(),
            });
            let node = NodeService::new(NodeConfig {
                node_id,
                storage_cluster,
                agent_endpoint,
                agent,
                state_dir,
            });
            server.add_service(identity.into_server()).add_service(node.into_server())
        }
    };
    // Tests and wrappers wait for this line before dialling the socket.
    println!("listening {}", args.endpoint);
    router.serve_with_incoming_shutdown(incoming, shutdown()).await.context("serving CSI")?;
    Ok(())
}
