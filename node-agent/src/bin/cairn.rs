//! `cairn`: drives agents directly, for demos, tests and people debugging a
//! site. Every command talks to one agent (`--agent`, or `CAIRN_AGENT`).
//!
//! ```text
//! cairn --agent http://127.0.0.1:7070 stat
//! cairn head open VOL --size 1GiB --replicas 2 --agent-list a1=http://..,a2=http://..
//! cairn head status VOL
//! cairn head snapshot VOL s1 --generation 1
//! cairn link register LINK --secret-file F --target-volume VOL      (at the receiver)
//! cairn copy VOL s2 --base s1 --link LINK --secret-file F --to https://site-b:7443 --rate 100MiB
//! ```

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use cairn_api::agent::v1::{
    self as pb, replica_store_client::ReplicaStoreClient, snapshot_copy_client::SnapshotCopyClient,
    volume_heads_client::VolumeHeadsClient,
};
use clap::{Parser, Subcommand};
use tonic::transport::Channel;

/// Drive Cairn agents directly.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The agent to talk to.
    #[arg(long, env = "CAIRN_AGENT", default_value = "http://127.0.0.1:7070", global = true)]
    agent: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capacity, use, and every replica's layers.
    Stat,
    /// Volume heads on this agent.
    #[command(subcommand)]
    Head(HeadCmd),
    /// Links this agent receives.
    #[command(subcommand)]
    Link(LinkCmd),
    /// Copies a snapshot of a volume whose head is open on this agent to a
    /// link's receiver at another site, showing progress.
    Copy {
        volume: String,
        snapshot: String,
        /// The snapshot right before SNAPSHOT, already at the target: only
        /// the layer on top of it is sent. Without it, a full copy.
        #[arg(long)]
        base: Option<String>,
        #[arg(long)]
        link: String,
        /// A file holding the link's pairing secret.
        #[arg(long)]
        secret_file: PathBuf,
        /// The receiving agent (https:// for its site listener).
        #[arg(long)]
        to: String,
        /// A rate limit, e.g. 100MiB (per second); none by default.
        #[arg(long, value_parser = parse_size)]
        rate: Option<u64>,
        /// Which replica each chunk is read from.
        #[arg(long, default_value = "primary", value_parser = ["primary", "replica", "auto"])]
        source: String,
    },
}

#[derive(Debug, Subcommand)]
enum HeadCmd {
    /// Opens a volume's head on this agent (creating its replicas).
    Open {
        volume: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        chunk_size: u64,
        #[arg(long, default_value_t = 2)]
        replicas: u32,
        #[arg(long, default_value_t = 1)]
        epoch: u64,
        #[arg(long, default_value_t = 1)]
        layout_version: u64,
        /// The storage cluster's agents: name=endpoint[@domain],...
        #[arg(long, value_delimiter = ',')]
        agent_list: Vec<String>,
        /// Expose the head through FUSE on this agent.
        #[arg(long)]
        fuse: bool,
        /// `primary` (clients write it) or `remote` (only copies write it).
        #[arg(long, default_value = "primary", value_parser = ["primary", "remote"])]
        role: String,
    },
    /// Failover: makes a remote head writable, from its newest complete
    /// snapshot.
    Promote {
        volume: String,
    },
    /// Seals a last snapshot of a primary head and makes it a remote one.
    Demote {
        volume: String,
        snapshot: String,
        #[arg(long)]
        generation: u64,
    },
    /// Replica health and rebuilds.
    Status {
        volume: String,
    },
    /// Takes a crash-consistent snapshot.
    Snapshot {
        volume: String,
        id: String,
        #[arg(long)]
        generation: u64,
    },
    /// The volume's digest (of the head, or of a snapshot).
    Digest {
        volume: String,
        #[arg(long)]
        snapshot: Option<String>,
    },
    Close {
        volume: String,
    },
}

#[derive(Debug, Subcommand)]
enum LinkCmd {
    /// Registers a link this agent receives.
    Register {
        link: String,
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long)]
        target_volume: String,
    },
}

/// "1GiB", "64MiB", "4096", "10MB" -> bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 64MiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

async fn channel(agent: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(agent.to_string())
        .with_context(|| format!("--agent {agent:?} is not a URL such as http://127.0.0.1:7070"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the agent at {agent}"))
}

const MAX: usize = 8 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ch = channel(&cli.agent).await?;
    let mut heads = VolumeHeadsClient::new(ch.clone())
        .max_decoding_message_size(MAX)
        .max_encoding_message_size(MAX);
    match cli.command {
        Command::Stat => {
            let s = ReplicaStoreClient::new(ch).stat(pb::StatRequest {}).await?.into_inner();
            println!(
                "capacity {:.1} GiB, used {:.1} MiB, available {:.1} GiB",
                mib(s.capacity_bytes) / 1024.0,
                mib(s.used_bytes),
                mib(s.available_bytes) / 1024.0
            );
            for r in s.replicas {
                let layers: Vec<String> = r
                    .layers
                    .iter()
                    .map(|l| {
                        let name = if l.snapshot_id.is_empty() { "head" } else { &l.snapshot_id };
                        format!("{name}:{}", l.blocks)
                    })
                    .collect();
                println!(
                    "{:<24} {:>10.1} MiB  {}",
                    r.volume_id,
                    mib(r.used_bytes),
                    layers.join(" ")
                );
            }
        }
        Command::Head(cmd) => head(&mut heads, cmd).await?,
        Command::Link(LinkCmd::Register { link, secret_file, target_volume }) => {
            let secret = std::fs::read(&secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?;
            let req = pb::RegisterLinkRequest {
                link_id: link.clone(),
                pairing_secret: secret.into(),
                target_volume_id: target_volume.clone(),
            };
            SnapshotCopyClient::new(ch).register_link(req).await?;
            println!("link {link} registered: copies write volume {target_volume} here");
        }
        Command::Copy { volume, snapshot, base, link, secret_file, to, rate, source } => {
            let secret = std::fs::read(&secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?;
            let req = pb::CopySnapshotRequest {
                volume_id: volume.clone(),
                snapshot_id: snapshot.clone(),
                base_snapshot_id: base.unwrap_or_default(),
                link_id: link,
                pairing_secret: secret.into(),
                target_endpoint: to,
                rate_bytes_per_sec: rate.unwrap_or(0),
                source: match source.as_str() {
                    "replica" => pb::SourceSelection::Replica,
                    "auto" => pb::SourceSelection::Auto,
                    _ => pb::SourceSelection::Primary,
                } as i32,
            };
            let mut h = heads.clone();
            let copy = tokio::spawn(async move { h.copy_snapshot(req).await });
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            while !copy.is_finished() {
                ticker.tick().await;
                let p = heads
                    .get_copy_progress(pb::CopyProgressRequest { volume_id: volume.clone() })
                    .await?
                    .into_inner();
                if p.snapshot_id == snapshot && !p.done {
                    let done = p.bytes_durable.max(p.bytes_sent).min(p.bytes_total);
                    let frac = if p.bytes_total == 0 {
                        1.0
                    } else {
                        (done as f64 / p.bytes_total as f64).min(1.0)
                    };
                    let bar = "#".repeat((frac * 30.0) as usize);
                    eprint!(
                        "\r{snapshot}: [{bar:<30}] {:>5.1}% of {:.1} MiB, {:>7.1} MiB/s, ETA {:>5.0} s   ",
                        frac * 100.0,
                        mib(p.bytes_total),
                        mib(p.rate_bytes_per_sec as u64),
                        p.eta_seconds
                    );
                }
            }
            eprintln!();
            let r = copy.await?.context("the copy failed")?.into_inner();
            if r.already_present {
                println!("{snapshot} is already at the target (digest {})", hex(&r.digest));
            } else {
                println!(
                    "{snapshot} copied: {:.1} MiB in {} blocks, {:.1} s{}; digest {} at both sites",
                    mib(r.bytes_sent),
                    r.blocks_sent,
                    r.elapsed_ms as f64 / 1000.0,
                    if r.resumed_from_block > 0 {
                        format!(", resumed at block {}", r.resumed_from_block)
                    } else {
                        String::new()
                    },
                    hex(&r.digest)
                );
            }
        }
    }
    Ok(())
}

async fn head(heads: &mut VolumeHeadsClient<Channel>, cmd: HeadCmd) -> anyhow::Result<()> {
    match cmd {
        HeadCmd::Promote { volume } => {
            let r = heads
                .promote_head(pb::PromoteHeadRequest { volume_id: volume.clone() })
                .await?
                .into_inner();
            let base = if r.base_snapshot_id.is_empty() { "none" } else { &r.base_snapshot_id };
            println!(
                "{volume} promoted: writable from snapshot {base} (digest {})",
                hex(&r.digest)
            );
        }
        HeadCmd::Demote { volume, snapshot, generation } => {
            let req = pb::DemoteHeadRequest {
                volume_id: volume.clone(),
                snapshot_id: snapshot.clone(),
                generation,
            };
            let d = heads.demote_head(req).await?.into_inner().digest;
            println!("{volume} demoted after snapshot {snapshot} (digest {})", hex(&d));
        }
        HeadCmd::Open {
            volume,
            size,
            chunk_size,
            replicas,
            epoch,
            layout_version,
            agent_list,
            fuse,
            role,
        } => {
            let mut agents = Vec::new();
            for a in &agent_list {
                let Some((name, rest)) = a.split_once('=') else {
                    bail!("--agent-list entry {a:?} is not name=endpoint[@domain]");
                };
                let (endpoint, domain) = rest.split_once('@').unwrap_or((rest, ""));
                agents.push(pb::HeadAgent {
                    name: name.into(),
                    endpoint: endpoint.into(),
                    domain: domain.into(),
                });
            }
            let req = pb::OpenHeadRequest {
                volume_id: volume,
                size_bytes: size,
                chunk_size_bytes: chunk_size,
                replicas,
                layout_version,
                epoch,
                agents,
                fuse,
                stale_agents: vec![],
                role: if role == "remote" {
                    pb::VolumeRole::Remote
                } else {
                    pb::VolumeRole::Primary
                } as i32,
            };
            print_status(&heads.open_head(req).await?.into_inner());
        }
        HeadCmd::Status { volume } => {
            let req = pb::HeadStatusRequest { volume_id: volume };
            print_status(&heads.get_head_status(req).await?.into_inner());
        }
        HeadCmd::Snapshot { volume, id, generation } => {
            let req =
                pb::HeadSnapshotRequest { volume_id: volume, snapshot_id: id.clone(), generation };
            let d = heads.head_snapshot(req).await?.into_inner().digest;
            println!("snapshot {id} sealed on every replica; digest {}", hex(&d));
        }
        HeadCmd::Digest { volume, snapshot } => {
            let req = pb::HeadDigestRequest {
                volume_id: volume,
                snapshot_id: snapshot.unwrap_or_default(),
            };
            println!("{}", hex(&heads.head_digest(req).await?.into_inner().digest));
        }
        HeadCmd::Close { volume } => {
            heads.close_head(pb::CloseHeadRequest { volume_id: volume.clone() }).await?;
            println!("head of {volume} closed");
        }
    }
    Ok(())
}

fn print_status(s: &pb::HeadStatus) {
    println!(
        "volume {} epoch {}{}",
        s.volume_id,
        s.epoch,
        if s.fuse_file.is_empty() { String::new() } else { format!(" fuse {}", s.fuse_file) }
    );
    for r in &s.replicas {
        let state =
            if r.in_sync { "in sync".to_string() } else { format!("OUT OF SYNC: {}", r.reason) };
        println!("  {:<12} {:>5} chunks  {state}", r.agent, r.chunks);
        if let Some(p) = &r.rebuild {
            println!(
                "               rebuilding: {} layers {}/{}, {:.1} MiB, head blocks {}/{}, {:.1} s",
                p.phase,
                p.layers_done,
                p.layers_total,
                mib(p.bytes_done),
                p.head_blocks_done,
                p.head_blocks_total,
                p.elapsed_ms as f64 / 1000.0
            );
        }
        if !r.last_rebuild.is_empty() {
            println!("               last rebuild: {}", r.last_rebuild);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("12XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("MiB").unwrap_err().contains("not a size"));
    }
}
