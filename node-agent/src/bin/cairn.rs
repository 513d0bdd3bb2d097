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
//! cairn link put LINK --volume VOL --to https://site-b:7443 --secret-file F --rate 50MiB
//! cairn link sync LINK [--resync]
//! cairn link switchover LINK final --generation 9
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
        #[arg(long, default_value = "default", value_parser = ["default", "none", "zstd"])]
        compression: String,
    },
}

/// A link's bandwidth policy on the command line.
#[derive(Debug, clap::Args)]
struct PolicyArgs {
    /// A fixed rate, e.g. 100MiB (per second); 0 pauses. None: no limit.
    #[arg(long, value_parser = parse_size, conflicts_with_all = ["adaptive", "window"])]
    rate: Option<u64>,
    /// Adaptive between a floor and a ceiling, e.g. 10MiB:100MiB.
    #[arg(long, conflicts_with = "window")]
    adaptive: Option<String>,
    /// A window: DAYS START-END RATE, e.g. "mon,tue,wed,thu,fri 08:00-18:00 10MiB"
    /// (repeat for more; the first that holds wins).
    #[arg(long)]
    window: Vec<String>,
    /// The windows' time zone (IANA).
    #[arg(long, default_value = "UTC")]
    zone: String,
    /// The rate outside every window (default: no limit).
    #[arg(long, value_parser = parse_size)]
    default_rate: Option<u64>,
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
        /// Cost labels for copies reading from agents, name=N (repeat);
        /// Auto source selection prefers low ones.
        #[arg(long, value_delimiter = ',')]
        cost: Vec<String>,
        /// Open even when agents that may hold acknowledged writes do not
        /// answer: serve what the others hold, losing writes only the
        /// missing agents have.
        #[arg(long)]
        accept_data_loss: bool,
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
    /// The snapshots of this agent's replica of the volume.
    Snapshots {
        volume: String,
    },
    /// Deletes a snapshot on every replica (refused while a link needs it).
    DeleteSnapshot {
        volume: String,
        snapshot: String,
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
    /// Creates or changes a link this agent sends (a running copy takes a
    /// new policy within a second).
    Put {
        link: String,
        #[arg(long)]
        volume: String,
        /// The receiving agent (https:// for its site listener).
        #[arg(long)]
        to: String,
        #[arg(long)]
        secret_file: PathBuf,
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long, default_value = "primary", value_parser = ["primary", "replica", "auto"])]
        source: String,
        #[arg(long, default_value = "default", value_parser = ["default", "none", "zstd"])]
        compression: String,
        /// Copy each snapshot as soon as it is complete here (cascade).
        #[arg(long)]
        forward: bool,
    },
    /// The links this agent sends, with cursor and progress.
    List {
        #[arg(long, default_value = "")]
        volume: String,
    },
    Delete {
        link: String,
    },
    /// Copies every snapshot the link's target lacks, showing progress.
    Sync {
        link: String,
        /// Roll a diverged target back to the newest shared snapshot,
        /// keeping its later snapshots marked divergent (failback).
        #[arg(long)]
        resync: bool,
    },
    /// Planned switchover: demote here (sealing SNAPSHOT), final copy,
    /// promote the target.
    Switchover {
        link: String,
        snapshot: String,
        #[arg(long)]
        generation: u64,
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
            let s =
                ReplicaStoreClient::new(ch.clone()).stat(pb::StatRequest {}).await?.into_inner();
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
        Command::Head(cmd) => head(&ch, &mut heads, cmd).await?,
        Command::Link(LinkCmd::Register { link, secret_file, target_volume }) => {
            let secret = std::fs::read(&secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?;
            let req = pb::RegisterLinkRequest {
                link_id: link.clone(),
                pairing_secret: secret.into(),
                target_volume_id: target_volume.clone(),
            };
            SnapshotCopyClient::new(ch.clone()).register_link(req).await?;
            println!("link {link} registered: copies write volume {target_volume} here");
        }
        Command::Link(cmd) => link(&mut heads, cmd).await?,
        Command::Copy {
            volume,
            snapshot,
            base,
            link,
            secret_file,
            to,
            rate,
            source,
            compression,
        } => {
            let secret = std::fs::read(&secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?;
            let req = pb::CopySnapshotRequest {
                volume_id: volume.clone(),
                snapshot_id: snapshot.clone(),
                base_snapshot_id: base.unwrap_or_default(),
                link_id: link.clone(),
                pairing_secret: secret.into(),
                target_endpoint: to,
                rate_bytes_per_sec: rate.unwrap_or(0),
                source: source_pb(&source),
                compression: compression_pb(&compression),
                policy: None,
            };
            let mut h = heads.clone();
            let copy = tokio::spawn(async move { h.copy_snapshot(req).await });
            show_progress(&mut heads, &volume, &link, &copy).await?;
            let r = copy.await?.context("the copy failed")?.into_inner();
            print_copy(&r);
        }
    }
    Ok(())
}

fn source_pb(s: &str) -> i32 {
    let v = match s {
        "replica" => pb::SourceSelection::Replica,
        "auto" => pb::SourceSelection::Auto,
        _ => pb::SourceSelection::Primary,
    };
    v as i32
}

fn compression_pb(s: &str) -> i32 {
    let v = match s {
        "none" => pb::Compression::None,
        "zstd" => pb::Compression::Zstd,
        _ => pb::Compression::Default,
    };
    v as i32
}

fn rate_pb(r: Option<u64>) -> Option<pb::Rate> {
    Some(match r {
        None => pb::Rate { unlimited: true, bytes_per_sec: 0 },
        Some(n) => pb::Rate { unlimited: false, bytes_per_sec: n },
    })
}

fn policy_pb(a: &PolicyArgs) -> anyhow::Result<Option<pb::BandwidthPolicy>> {
    use pb::bandwidth_policy::Policy;
    let policy = if let Some(ad) = &a.adaptive {
        let (floor, ceiling) = ad.split_once(':').with_context(|| {
            format!("--adaptive {ad:?} is not FLOOR:CEILING, e.g. 10MiB:100MiB")
        })?;
        Policy::Adaptive(pb::AdaptiveBandwidth {
            floor_bytes_per_sec: parse_size(floor).map_err(anyhow::Error::msg)?,
            ceiling_bytes_per_sec: parse_size(ceiling).map_err(anyhow::Error::msg)?,
        })
    } else if !a.window.is_empty() {
        let mut windows = Vec::new();
        for w in &a.window {
            let parts: Vec<&str> = w.split_whitespace().collect();
            let [days, span, rate] = parts[..] else {
                bail!(
                    "--window {w:?} is not DAYS START-END RATE, e.g. \"mon,fri 08:00-18:00 10MiB\""
                );
            };
            let (start, end) = span
                .split_once('-')
                .with_context(|| format!("--window {w:?}: {span:?} is not START-END"))?;
            windows.push(pb::BandwidthWindow {
                days: days.split(',').map(String::from).collect(),
                start: start.into(),
                end: end.into(),
                rate: rate_pb(Some(parse_size(rate).map_err(anyhow::Error::msg)?)),
            });
        }
        Policy::Windows(pb::BandwidthWindows {
            time_zone: a.zone.clone(),
            default_rate: rate_pb(a.default_rate),
            windows,
        })
    } else {
        match a.rate {
            None => return Ok(None),
            r => Policy::Fixed(rate_pb(r).expect("some")),
        }
    };
    Ok(Some(pb::BandwidthPolicy { policy: Some(policy) }))
}

/// A progress bar on stderr until `task` ends.
async fn show_progress<T>(
    heads: &mut VolumeHeadsClient<Channel>,
    volume: &str,
    link: &str,
    task: &tokio::task::JoinHandle<T>,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    while !task.is_finished() {
        ticker.tick().await;
        let req = pb::CopyProgressRequest { volume_id: volume.into(), link_id: link.into() };
        let Ok(p) = heads.get_copy_progress(req).await.map(|r| r.into_inner()) else { continue };
        if !p.snapshot_id.is_empty() && !p.done {
            let done = p.bytes_durable.max(p.bytes_sent).min(p.bytes_total);
            let frac = if p.bytes_total == 0 {
                1.0
            } else {
                (done as f64 / p.bytes_total as f64).min(1.0)
            };
            let bar = "#".repeat((frac * 30.0) as usize);
            eprint!(
                "\r{}: [{bar:<30}] {:>5.1}% of {:.1} MiB, {:>7.1} MiB/s, ETA {:>5.0} s   ",
                p.snapshot_id,
                frac * 100.0,
                mib(p.bytes_total),
                mib(p.rate_bytes_per_sec as u64),
                p.eta_seconds
            );
        }
    }
    eprintln!();
    Ok(())
}

fn print_copy(r: &pb::CopySnapshotResponse) {
    let snapshot = &r.snapshot_id;
    if r.already_present {
        println!("{snapshot} is already at the target (digest {})", hex(&r.digest));
    } else {
        println!(
            "{snapshot} copied: {:.1} MiB in {} blocks ({:.1} MiB on the wire), {:.1} s{}; digest {} at both sites",
            mib(r.bytes_sent),
            r.blocks_sent,
            mib(r.wire_bytes),
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

fn print_link(l: &pb::LinkStatus) {
    let Some(link) = &l.link else { return };
    println!(
        "{:<20} {} -> {}  last copied: {}{}",
        link.link_id,
        link.volume_id,
        link.target_endpoint,
        if l.last_copied_snapshot_id.is_empty() { "none" } else { &l.last_copied_snapshot_id },
        if link.forward { "  (forwards)" } else { "" }
    );
    if let Some(p) = l.progress.as_ref().filter(|p| !p.done) {
        println!(
            "  copying {}: {:.1}/{:.1} MiB, {:.1} MiB/s",
            p.snapshot_id,
            mib(p.bytes_durable.max(p.bytes_sent)),
            mib(p.bytes_total),
            mib(p.rate_bytes_per_sec as u64)
        );
    }
    if !l.last_error.is_empty() {
        println!("  last error: {}", l.last_error);
    }
}

async fn link(heads: &mut VolumeHeadsClient<Channel>, cmd: LinkCmd) -> anyhow::Result<()> {
    match cmd {
        LinkCmd::Register { .. } => unreachable!("handled with the copy client"),
        LinkCmd::Put { link, volume, to, secret_file, policy, source, compression, forward } => {
            let secret = std::fs::read(&secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?;
            let req = pb::Link {
                link_id: link,
                volume_id: volume,
                target_endpoint: to,
                pairing_secret: secret.into(),
                policy: policy_pb(&policy)?,
                source: source_pb(&source),
                compression: compression_pb(&compression),
                forward,
            };
            print_link(&heads.put_link(req).await?.into_inner());
        }
        LinkCmd::List { volume } => {
            for l in heads
                .list_links(pb::ListLinksRequest { volume_id: volume })
                .await?
                .into_inner()
                .links
            {
                print_link(&l);
            }
        }
        LinkCmd::Delete { link } => {
            heads.delete_link(pb::DeleteLinkRequest { link_id: link.clone() }).await?;
            println!("link {link} deleted");
        }
        LinkCmd::Sync { link, resync } => {
            let list = heads.list_links(pb::ListLinksRequest::default()).await?.into_inner();
            let volume = list
                .links
                .iter()
                .filter_map(|l| l.link.as_ref())
                .find(|l| l.link_id == link)
                .map(|l| l.volume_id.clone())
                .with_context(|| format!("no link {link} is sent from this agent"))?;
            let mut h = heads.clone();
            let req = pb::SyncLinkRequest { link_id: link.clone(), resync };
            let task = tokio::spawn(async move { h.sync_link(req).await });
            show_progress(heads, &volume, &link, &task).await?;
            let r = task.await?.context("the sync failed")?.into_inner();
            if !r.divergent_snapshot_ids.is_empty() {
                println!(
                    "resync: the target rolled back to {}; kept, marked divergent: {}",
                    r.common_snapshot_id,
                    r.divergent_snapshot_ids.join(", ")
                );
            }
            if r.copies.is_empty() {
                println!("link {link}: the target has every snapshot already");
            }
            for c in &r.copies {
                print_copy(c);
            }
        }
        LinkCmd::Switchover { link, snapshot, generation } => {
            let req =
                pb::SwitchoverRequest { link_id: link.clone(), snapshot_id: snapshot, generation };
            let r = heads.switchover(req).await?.into_inner();
            for c in r.sync.iter().flat_map(|s| &s.copies) {
                print_copy(c);
            }
            println!(
                "switchover over link {link} done: the target is the primary (digest {})",
                hex(&r.digest)
            );
        }
    }
    Ok(())
}

async fn head(
    ch: &Channel,
    heads: &mut VolumeHeadsClient<Channel>,
    cmd: HeadCmd,
) -> anyhow::Result<()> {
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
            cost,
            accept_data_loss,
        } => {
            let mut costs = std::collections::BTreeMap::new();
            for c in &cost {
                let (name, n) =
                    c.split_once('=').with_context(|| format!("--cost {c:?} is not name=N"))?;
                let n: u32 =
                    n.parse().with_context(|| format!("--cost {c:?}: {n:?} is not a number"))?;
                costs.insert(name.to_string(), n);
            }
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
                    cost: costs.get(name).copied().unwrap_or(0),
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
                accept_data_loss,
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
        HeadCmd::Snapshots { volume } => {
            let req = pb::ListSnapshotsRequest { volume_id: volume };
            let list = ReplicaStoreClient::new(ch.clone()).list_snapshots(req).await?.into_inner();
            for s in list.snapshots {
                println!(
                    "{:<24} generation {:>4}  {:>9} blocks changed{}",
                    s.snapshot_id,
                    s.generation,
                    s.changed_blocks,
                    if s.divergent { "  DIVERGENT (kept from before a resync)" } else { "" }
                );
            }
        }
        HeadCmd::DeleteSnapshot { volume, snapshot } => {
            let req = pb::DeleteHeadSnapshotRequest {
                volume_id: volume.clone(),
                snapshot_id: snapshot.clone(),
            };
            heads.delete_head_snapshot(req).await?;
            println!("snapshot {snapshot} of {volume} deleted");
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
