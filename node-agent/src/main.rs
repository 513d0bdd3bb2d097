//! The `cairn-agent` binary: locks its data dir, opens the replica store and
//! serves it over gRPC until SIGTERM or SIGINT, then flushes every replica.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use cairn_agent::{
    disk::FileDisk,
    grpc::{replica_store::ReplicaStoreService, volume_heads::VolumeHeadsService},
    lock::DataDirLock,
    store::Store,
    transport,
};
use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Cairn's node agent: stores replicas of volumes on local disk and serves
/// them over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory that holds the agent's metadata and block data. One agent
    /// per directory.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to serve gRPC on; port 0 picks a free port. The bound address
    /// is printed on stdout as `listening <addr>`.
    #[arg(long, env = "CAIRN_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This agent's name in its storage cluster (volume heads reach the
    /// agent of this name through the local store). Defaults to the host
    /// name.
    #[arg(long, env = "CAIRN_AGENT_NAME")]
    name: Option<String>,
    /// How long a volume head waits for another agent before marking its
    /// replica out of sync, in milliseconds.
    #[arg(long, env = "CAIRN_PEER_TIMEOUT_MS", default_value_t = 5000)]
    peer_timeout_ms: u64,
    /// How often an open volume head looks for out-of-sync replicas (an
    /// agent that came back, say) to rebuild, in milliseconds.
    #[arg(long, env = "CAIRN_REBUILD_INTERVAL_MS", default_value_t = 1000)]
    rebuild_interval_ms: u64,
    /// A copy receiver makes its progress durable (a checkpoint a broken
    /// copy resumes from) after this many MiB...
    #[arg(long, env = "CAIRN_COPY_CHECKPOINT_MIB", default_value_t = 8)]
    copy_checkpoint_mib: u64,
    /// ...or after this many milliseconds, whichever comes first.
    #[arg(long, env = "CAIRN_COPY_CHECKPOINT_MS", default_value_t = 5000)]
    copy_checkpoint_ms: u64,
    /// A copy stream that carries no frame (senders ping every 100 ms) for
    /// this many seconds is ended at the receiver; its checkpoint stays,
    /// so the next attempt resumes there, and the target is free for it.
    #[arg(long, env = "CAIRN_COPY_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    copy_idle_timeout_secs: u64,
    /// Caps every copy this agent sends, all links together, at this many
    /// bytes per second (each link's own policy applies too). None: no cap.
    #[arg(long, env = "CAIRN_COPY_RATE_CAP")]
    copy_rate_cap: Option<u64>,
    /// Address of the site listener: the copy receiver (SnapshotCopy) over
    /// mutual TLS, for senders at other sites. Needs --tls-cert, --tls-key
    /// and --peer-ca. Printed on stdout as `site-listening <addr>`.
    #[arg(long, env = "CAIRN_SITE_LISTEN")]
    site_listen: Option<SocketAddr>,
    /// This agent's certificate (PEM), signed by its site's CA.
    #[arg(long, env = "CAIRN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "CAIRN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The CAs (PEM, one or more) of the sites this agent copies with:
    /// senders and receivers are admitted only with certificates they sign.
    #[arg(long, env = "CAIRN_PEER_CA")]
    peer_ca: Option<PathBuf>,
    /// Directory for the FUSE mounts of heads opened with fuse=true
    /// (`<dir>/<volume>/volume`). Without it, heads cannot be exposed
    /// through FUSE.
    #[arg(long, env = "CAIRN_FUSE_DIR")]
    fuse_dir: Option<PathBuf>,
    /// Log format: human-readable text or JSON lines.
    #[arg(long, env = "CAIRN_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `cairn_agent=debug`.
    #[arg(long, env = "CAIRN_LOG", default_value = "info")]
    log: String,
}

fn init_tracing(args: &Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid filter", args.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %args.data_dir.display(),
        "cairn-agent starting"
    );
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("reading the host name for --name")?,
    };
    let _lock = DataDirLock::acquire(&args.data_dir)?;
    let data_dir = args.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(Arc::new(FileDisk), &data_dir))
        .await?
        .with_context(|| format!("opening the replica store in {}", args.data_dir.display()))?;
    let store = Arc::new(store);
    tracing::info!(replicas = store.replicas().len(), "replica store open");

    if let Some(dir) = &args.fuse_dir {
        report_stale_mounts(dir);
    }

    let site_tls = cairn_agent::copy::tls::SiteTls::load(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.peer_ca.as_deref(),
    )?;
    let site_listener = match (args.site_listen, &site_tls) {
        (None, _) => None,
        (Some(_), None) => anyhow::bail!(
            "--site-listen serves copies over mutual TLS: give --tls-cert, --tls-key and --peer-ca too"
        ),
        (Some(at), Some(_)) => {
            let l = TcpListener::bind(at).await.with_context(|| format!("binding {at}"))?;
            println!("site-listening {}", l.local_addr()?);
            Some(l)
        }
    };
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("listening {addr}");
    tracing::info!(%addr, agent = %name, "serving gRPC");

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cairn_api::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let heads = VolumeHeadsService::new(
        store.clone(),
        name.clone(),
        std::time::Duration::from_millis(args.peer_timeout_ms),
        args.fuse_dir.clone(),
    )
    .with_heal_every(std::time::Duration::from_millis(args.rebuild_interval_ms.max(10)))
    .with_site_tls(site_tls.clone())
    .with_copy_cap(args.copy_rate_cap.filter(|&r| r > 0));
    let copies = cairn_agent::copy::receiver::CopyService::new(store.clone(), heads.heads())
        .with_checkpoints(
            args.copy_checkpoint_mib.max(1) << 20,
            std::time::Duration::from_millis(args.copy_checkpoint_ms.max(10)),
        )
        .with_idle_timeout(std::time::Duration::from_secs(args.copy_idle_timeout_secs.max(1)))
        .with_forwarding(heads.links());
    let site_copies = copies.clone();
    let site = async {
        let (Some(l), Some(tls)) = (site_listener, &site_tls) else { return Ok(()) };
        tracing::info!(addr = %l.local_addr()?, "serving site-to-site copies over mutual TLS");
        tonic::transport::Server::builder()
            .tls_config(tls.server())?
            .initial_connection_window_size(transport::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(transport::H2_STREAM_WINDOW)
            .max_frame_size(transport::H2_MAX_FRAME)
            .add_service(site_copies.into_server())
            .serve_with_incoming_shutdown(TcpIncoming::from(l).with_nodelay(Some(true)), shutdown())
            .await?;
        anyhow::Ok(())
    };
    let main_store = store.clone();
    let main = async move {
        tonic::transport::Server::builder()
            .initial_connection_window_size(transport::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(transport::H2_STREAM_WINDOW)
            .max_frame_size(transport::H2_MAX_FRAME)
            .add_service(ReplicaStoreService::new(main_store).into_server())
            .add_service(heads.into_server())
            .add_service(copies.into_server())
            .add_service(reflection)
            // tonic applies its TCP_NODELAY default only to listeners it binds
            // itself: without it, Nagle holds small replies back until the
            // peer's delayed ACK (~40 ms), a stall on every few replica writes.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown(),
            )
            .await?;
        anyhow::Ok(())
    };
    tokio::try_join!(main, site)?;

    tracing::info!("shutting down: flushing replicas");
    let flushed = tokio::task::spawn_blocking(move || store.flush_all()).await?;
    flushed.context("flushing replicas at shutdown")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Detaches the FUSE mounts a previous, killed agent left under `dir`, and
/// tells the operator what still holds the dead volumes.
fn report_stale_mounts(dir: &std::path::Path) {
    for m in cairn_agent::frontend::stale::clean_stale_mounts(dir) {
        match &m.detached {
            Ok(()) => {
                tracing::warn!(mountpoint = %m.mountpoint.display(), "detached a dead FUSE mount left by a previous agent")
            }
            Err(e) => {
                tracing::error!(mountpoint = %m.mountpoint.display(), error = %e, "a dead FUSE mount left by a previous agent could not be detached: unmount it with umount -l")
            }
        }
        for (device, fs) in &m.loop_devices {
            match fs {
                Some(at) => {
                    tracing::error!(device = %device.display(), mounted_at = %at.display(), "this loop device was on the dead volume and its filesystem is still mounted: unmount it (umount -l), detach the device (losetup -d), then attach the reopened head")
                }
                None => {
                    tracing::warn!(device = %device.display(), "this loop device was on the dead volume: detach it (losetup -d)")
                }
            }
        }
    }
}
