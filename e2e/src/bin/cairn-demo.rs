//! cairn-demo: Cairn in one command. Part one starts a real `cairn-agent`
//! on a data dir, writes a volume, snapshots it twice, checks every byte and
//! every digest against an in-memory reference, streams a snapshot's delta,
//! restarts the agent and checks again, then deletes a snapshot and shows
//! the space come back. Part two (`striped`) stripes a volume over three
//! agents with two replicas, mounts ext4 on it through FUSE and a loop
//! device where root and /dev/fuse are there (gRPC I/O otherwise), kills an
//! agent while writing, brings it back and has it rebuilt while writing, and
//! checks every file, the filesystem and every chunk's replicas. Part three
//! (`two_sites`) is the disaster-recovery story: site A copies a volume's
//! snapshots to site B over mutual TLS under a bandwidth cap, B's receiver
//! is killed mid-copy and the copy resumes, site A is lost and B promoted,
//! A fails back with only the delta, and a planned switchover ends it.
//!
//! ```text
//! cargo run --release -p cairn-e2e --bin cairn-demo [-- --keep] [-- --data-dir DIR]
//! ```
//!
//! Exits 0 when every check holds; 1 with the failing step otherwise.
//!
//! Structure: `Demo::run` calls one method per numbered step; each prints
//! its lines and ends with `ok` (a row of the summary) or an error. A step
//! talks to the agents through `Node`s and checks them against `Expected`,
//! so more nodes and sites slot in as more steps.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::{Accumulator, BLOCK_SIZE, Digest, agent::v1 as pb};
use cairn_e2e::{AgentClient, AgentProcess, Reference, disk_usage, pattern};
use clap::Parser;

#[path = "cairn-demo/striped.rs"]
mod striped;
#[path = "cairn-demo/two_sites.rs"]
mod two_sites;

const BS: u64 = BLOCK_SIZE;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The most bytes one read or write may carry.
const MAX_IO: u64 = 4 * MIB;

const VOLUME: &str = "demo";
const VOLUME_SIZE: u64 = GIB;
/// Bytes written sequentially at the start of the volume.
const SEQUENTIAL: u64 = 32 * MIB;
/// Single blocks written far apart, in different chunks.
const SCATTERED: [u64; 8] = [
    50 * MIB,
    177 * MIB + 3 * BS,
    304 * MIB + 6 * BS,
    431 * MIB + 9 * BS,
    558 * MIB + 12 * BS,
    685 * MIB + 15 * BS,
    812 * MIB + 18 * BS,
    939 * MIB + 21 * BS,
];

/// Cairn's demo: one agent, one volume, two snapshots, every byte checked.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Keep the temporary data dir at the end (a --data-dir is always kept).
    #[arg(long)]
    keep: bool,
    /// Run the agent on this directory (new or empty) instead of a temporary
    /// one.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// One agent of the demo: its process, a connected client, its data dir.
struct Node {
    name: &'static str,
    data_dir: PathBuf,
    agent: Option<AgentProcess>,
    client: AgentClient,
}

impl Node {
    async fn start(name: &'static str, data_dir: &Path) -> Result<Self> {
        let agent = AgentProcess::start(data_dir)
            .with_context(|| format!("starting agent {name} on {}", data_dir.display()))?;
        let client = agent.client().await?;
        Ok(Node { name, data_dir: data_dir.to_path_buf(), agent: Some(agent), client })
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("the agent runs")
    }

    /// SIGTERM, and a clean exit (the agent flushes every replica).
    fn stop(&mut self) -> Result<()> {
        match self.agent.take() {
            Some(a) => a.terminate().with_context(|| format!("stopping agent {}", self.name)),
            None => Ok(()),
        }
    }

    /// Stops the agent cleanly and starts a new one on the same data dir;
    /// returns how long each took.
    async fn restart(&mut self) -> Result<(Duration, Duration)> {
        let t = Instant::now();
        self.stop()?;
        let stopped = t.elapsed();
        let t = Instant::now();
        *self = Node::start(self.name, &self.data_dir.clone()).await?;
        Ok((stopped, t.elapsed()))
    }

    /// Bytes the volume's data files take on disk.
    fn volume_usage(&self, volume: &str) -> Result<u64> {
        let dir = self.data_dir.join("volumes").join(volume);
        disk_usage(&dir).with_context(|| format!("measuring {}", dir.display()))
    }
}

/// A snapshot the volume must have, and its content.
struct Snap {
    id: &'static str,
    generation: u64,
    content: Reference,
}

/// What the volume must hold: the head and each live snapshot, oldest first.
struct Expected {
    head: Reference,
    snapshots: Vec<Snap>,
}

impl Expected {
    fn snapshot(&self, id: &str) -> &Reference {
        &self.snapshots.iter().find(|s| s.id == id).expect("a known snapshot").content
    }
}

/// A row of the summary table.
struct Row {
    step: String,
    result: &'static str,
    figure: String,
}

struct Demo {
    data_dir: PathBuf,
    /// The running agents; the demo has one so far.
    nodes: Vec<Node>,
    expected: Expected,
    rows: Vec<Row>,
    step: usize,
    title: String,
}

impl Demo {
    fn new(data_dir: &Path) -> Self {
        Demo {
            data_dir: data_dir.to_path_buf(),
            nodes: Vec::new(),
            expected: Expected { head: Reference::new(VOLUME_SIZE), snapshots: Vec::new() },
            rows: Vec::new(),
            step: 0,
            title: String::new(),
        }
    }

    fn begin(&mut self, title: impl Into<String>) {
        self.step += 1;
        self.title = title.into();
        println!("\n[{}] {}", self.step, self.title);
    }

    fn ok(&mut self, figure: String) {
        println!("    ok: {figure}");
        self.rows.push(Row {
            step: format!("{}. {}", self.step, self.title),
            result: "ok",
            figure,
        });
    }

    fn failed(&mut self, err: &anyhow::Error) {
        self.rows.push(Row {
            step: format!("{}. {}", self.step, self.title),
            result: "FAILED",
            figure: format!("{err}"),
        });
    }

    async fn run(&mut self) -> Result<()> {
        self.start_agent().await?;
        self.create_volume().await?;
        self.write_data().await?;
        self.flush().await?;
        self.snapshot("demo-1", 1).await?;
        self.change_data().await?;
        self.snapshot("demo-2", 2).await?;
        self.check("Read back and verify").await?;
        self.stream_delta("demo-1", "demo-2").await?;
        self.restart().await?;
        self.check("Verify after restart").await?;
        self.delete_snapshot("demo-1").await?;
        for node in &mut self.nodes {
            node.stop()?;
        }
        let mut part_two = striped::Striped::new(&self.data_dir);
        part_two.run(self).await?;
        let mut part_three = two_sites::TwoSites::new(&self.data_dir);
        part_three.run(self).await
    }

    async fn start_agent(&mut self) -> Result<()> {
        self.begin("Start the agent");
        // Found (or built) first, so the time below is the agent's own.
        let bin = cairn_e2e::agent_binary()?;
        println!("    binary   {}", bin.display());
        println!("    data dir {}", self.data_dir.display());
        let t = Instant::now();
        let node = Node::start("agent-1", &self.data_dir).await?;
        let took = t.elapsed();
        println!(
            "    cairn-agent pid {} serving on {} after {}",
            node.agent().pid(),
            node.agent().addr(),
            ms(took)
        );
        self.nodes.push(node);
        self.ok(format!("serving after {}", ms(took)));
        Ok(())
    }

    async fn create_volume(&mut self) -> Result<()> {
        self.begin("Create volume");
        let req = pb::CreateReplicaRequest {
            volume_id: VOLUME.into(),
            size_bytes: VOLUME_SIZE,
            chunk_size_bytes: 0,
            chunks: Some(pb::ChunkSet { all: true, chunks: vec![] }),
        };
        let info = self.nodes[0].client.create_replica(req).await?.into_inner();
        let chunks = info.size_bytes.div_ceil(info.chunk_size_bytes);
        println!(
            "    volume {VOLUME:?}: {}, {chunks} chunks of {}",
            size(info.size_bytes),
            size(info.chunk_size_bytes)
        );
        self.ok(format!("{} in {chunks} chunks", size(info.size_bytes)));
        Ok(())
    }

    async fn write_data(&mut self) -> Result<()> {
        self.begin("Write data");
        let t = Instant::now();
        for i in 0..SEQUENTIAL / MIB {
            self.write(i * MIB, pattern(i, MIB as usize)).await?;
        }
        println!("    {} sequential, in 1 MiB writes", size(SEQUENTIAL));
        for (i, &offset) in SCATTERED.iter().enumerate() {
            self.write(offset, pattern(1000 + i as u64, BS as usize)).await?;
        }
        println!(
            "    {} single 4 KiB blocks, from {} to {}",
            SCATTERED.len(),
            at(SCATTERED[0]),
            at(SCATTERED[7])
        );
        let bytes = SEQUENTIAL + SCATTERED.len() as u64 * BS;
        self.ok(format!("{} written at {}", size(bytes), rate(bytes, t.elapsed())));
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.begin("Flush");
        let t = Instant::now();
        self.nodes[0].client.flush(pb::FlushRequest { epoch: 0, volume_id: VOLUME.into() }).await?;
        self.ok(format!("durable in {}", ms(t.elapsed())));
        Ok(())
    }

    async fn snapshot(&mut self, id: &'static str, generation: u64) -> Result<()> {
        self.begin(format!("Snapshot {id}"));
        let t = Instant::now();
        let req = pb::SealSnapshotRequest {
            epoch: 0,
            volume_id: VOLUME.into(),
            snapshot_id: id.into(),
            generation,
        };
        let info = self.nodes[0].client.seal_snapshot(req).await?.into_inner();
        let took = t.elapsed();
        let content = self.expected.head.clone();
        let digest = digest(&info.digest)?;
        ensure!(
            digest == content.digest(),
            "snapshot {id}: the agent's digest {digest} is not the reference's {}",
            content.digest()
        );
        println!("    sealed {id} (generation {generation}) in {}", ms(took));
        let since = self.expected.snapshots.last().map_or("the volume was created", |s| s.id);
        println!("    {} blocks changed since {since}", info.changed_blocks);
        println!("    digest {}", digest);
        self.expected.snapshots.push(Snap { id, generation, content });
        self.ok(format!("{} changed blocks, sealed in {}", info.changed_blocks, ms(took)));
        Ok(())
    }

    async fn change_data(&mut self) -> Result<()> {
        self.begin("Overwrite and trim");
        self.write(8 * MIB, pattern(2000, MAX_IO as usize)).await?;
        for (i, &offset) in SCATTERED[..2].iter().enumerate() {
            self.write(offset, pattern(3000 + i as u64, BS as usize)).await?;
        }
        println!("    overwrote {} at {} and 2 single blocks", size(MAX_IO), at(8 * MIB));
        self.trim(20 * MIB, 2 * MIB).await?;
        self.trim(SCATTERED[2], BS).await?;
        println!("    trimmed {} at {} and 1 single block", size(2 * MIB), at(20 * MIB));
        self.ok(format!(
            "{} + 2 blocks rewritten, {} + 1 block trimmed",
            size(MAX_IO),
            size(2 * MIB)
        ));
        Ok(())
    }

    /// A step that only verifies everything (see `verify`).
    async fn check(&mut self, title: &'static str) -> Result<()> {
        self.begin(title);
        let figure = self.verify().await?;
        self.ok(figure);
        Ok(())
    }

    /// Reads the head and every snapshot in full and compares each block with
    /// the reference; checks the snapshot list and every digest.
    async fn verify(&mut self) -> Result<String> {
        let t = Instant::now();
        let mut bytes = 0;
        let views: Vec<(String, &'static str)> = std::iter::once(("head".to_string(), ""))
            .chain(self.expected.snapshots.iter().map(|s| (format!("snapshot {}", s.id), s.id)))
            .collect();
        for (name, id) in &views {
            let want = if id.is_empty() { &self.expected.head } else { self.expected.snapshot(id) };
            bytes += read_and_compare(&mut self.nodes[0].client, id, want)
                .await
                .with_context(|| format!("verifying the {name}"))?;
            println!("    {name}: {} identical to the reference", size(want.size));
        }
        let took = t.elapsed();
        let listed = self.nodes[0]
            .client
            .list_snapshots(pb::ListSnapshotsRequest { volume_id: VOLUME.into() })
            .await?
            .into_inner()
            .snapshots;
        let got: Vec<(&str, u64)> =
            listed.iter().map(|s| (s.snapshot_id.as_str(), s.generation)).collect();
        let want: Vec<(&str, u64)> =
            self.expected.snapshots.iter().map(|s| (s.id, s.generation)).collect();
        ensure!(got == want, "the agent lists snapshots {got:?}; expected {want:?}");
        for (s, e) in listed.iter().zip(&self.expected.snapshots) {
            let d = digest(&s.digest)?;
            ensure!(
                d == e.content.digest(),
                "snapshot {}: the agent's digest {d} is not the reference's {}",
                e.id,
                e.content.digest()
            );
        }
        let head = head_digest(&mut self.nodes[0].client).await?;
        ensure!(
            head == self.expected.head.digest(),
            "head: the agent's digest {head} is not the reference's {}",
            self.expected.head.digest()
        );
        let n = listed.len();
        println!(
            "    digests of the head and {n} snapshot{} match the reference",
            if n == 1 { "" } else { "s" }
        );
        Ok(format!("{} read at {}, digests match", size(bytes), rate(bytes, took)))
    }

    async fn stream_delta(&mut self, from: &str, to: &'static str) -> Result<()> {
        self.begin(format!("Stream the delta of {to}"));
        let req = pb::StreamLayerRequest {
            volume_id: VOLUME.into(),
            snapshot_id: to.into(),
            chunks: vec![],
        };
        let mut stream = self.nodes[0].client.stream_layer(req).await?.into_inner();
        let zero_crc = crc32c::crc32c(&[0u8; BS as usize]);
        let mut got = std::collections::BTreeMap::new();
        while let Some(batch) = stream.message().await? {
            for b in batch.blocks {
                let crc = if b.data.is_empty() { zero_crc } else { crc32c::crc32c(&b.data) };
                ensure!(b.crc32c == crc, "streamed block {}: CRC32C field does not match", b.index);
                got.insert(b.index, b.data.to_vec());
            }
        }
        let want = self.expected.snapshot(to).changed_since(self.expected.snapshot(from));
        if got != want {
            let diff = want
                .iter()
                .find(|(b, d)| got.get(b) != Some(d))
                .map(|(b, _)| *b)
                .or_else(|| got.keys().find(|b| !want.contains_key(b)).copied());
            bail!(
                "the delta of {to} has {} blocks, expected {}; first difference at block {diff:?}",
                got.len(),
                want.len()
            );
        }
        let data = got.values().filter(|d| !d.is_empty()).count() as u64;
        let trimmed = got.len() as u64 - data;
        println!("    {data} blocks with new data, {trimmed} trimmed blocks (sent as zero blocks)");
        println!(
            "    {} to ship to a replica of {from}, instead of {}",
            size(data * BS),
            size(VOLUME_SIZE)
        );
        self.ok(format!("{} changed blocks ({} of data)", got.len(), size(data * BS)));
        Ok(())
    }

    async fn restart(&mut self) -> Result<()> {
        self.begin("Restart the agent");
        let old = self.nodes[0].agent().pid();
        let (stopped, started) = self.nodes[0].restart().await?;
        println!("    SIGTERM: pid {old} flushed and exited 0 in {}", ms(stopped));
        println!(
            "    new agent: pid {} on {}, serving after {}",
            self.nodes[0].agent().pid(),
            self.nodes[0].agent().addr(),
            ms(started)
        );
        self.ok(format!("stop {}, start {}", ms(stopped), ms(started)));
        Ok(())
    }

    async fn delete_snapshot(&mut self, id: &'static str) -> Result<()> {
        self.begin(format!("Delete {id}"));
        let before = self.nodes[0].volume_usage(VOLUME)?;
        let req = pb::DeleteSnapshotRequest { volume_id: VOLUME.into(), snapshot_id: id.into() };
        self.nodes[0].client.delete_snapshot(req).await?;
        self.expected.snapshots.retain(|s| s.id != id);
        let after = self.nodes[0].volume_usage(VOLUME)?;
        println!(
            "    disk use of volume {VOLUME:?}: {} before, {} after",
            size(before),
            size(after)
        );
        println!("    (what demo-2 overwrote or trimmed is freed; the rest moved into demo-2)");
        ensure!(
            after < before,
            "deleting {id} freed no space: {before} bytes before, {after} after"
        );
        let figure = self.verify().await?;
        println!("    verified: {figure}");
        self.ok(format!("{} -> {} on disk", size(before), size(after)));
        Ok(())
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.expected.head.write(offset, &data);
        let req = pb::WriteBlocksRequest {
            epoch: 0,
            volume_id: VOLUME.into(),
            offset,
            data: data.into(),
        };
        self.nodes[0]
            .client
            .write_blocks(req)
            .await
            .with_context(|| format!("writing at {}", at(offset)))?;
        Ok(())
    }

    async fn trim(&mut self, offset: u64, length: u64) -> Result<()> {
        self.expected.head.trim(offset, length);
        let req = pb::TrimRequest { epoch: 0, volume_id: VOLUME.into(), offset, length };
        self.nodes[0]
            .client
            .trim(req)
            .await
            .with_context(|| format!("trimming at {}", at(offset)))?;
        Ok(())
    }

    fn print_summary(&self) {
        let w = self.rows.iter().map(|r| r.step.len()).max().unwrap_or(4).max(4);
        println!("\n{:<w$}  {:<6}  figure", "step", "result");
        println!("{:-<w$}  ------  {:-<40}", "", "");
        for r in &self.rows {
            println!("{:<w$}  {:<6}  {}", r.step, r.result, r.figure);
        }
    }
}

/// Reads a view of the volume (the head when `snapshot` is empty) in 4 MiB
/// reads and compares every block with `want`; returns the bytes read.
async fn read_and_compare(c: &mut AgentClient, snapshot: &str, want: &Reference) -> Result<u64> {
    let mut offset = 0;
    while offset < want.size {
        let length = MAX_IO.min(want.size - offset);
        let req = pb::ReadBlocksRequest {
            volume_id: VOLUME.into(),
            offset,
            length,
            snapshot_id: snapshot.into(),
        };
        let data = c
            .read_blocks(req)
            .await
            .with_context(|| format!("reading {} at {}", size(length), at(offset)))?
            .into_inner()
            .data;
        ensure!(
            data.len() as u64 == length,
            "read {} bytes at {}, asked {length}",
            data.len(),
            at(offset)
        );
        if let Some(m) = want.mismatch(offset, &data) {
            bail!("mismatch: {m}");
        }
        offset += length;
    }
    Ok(want.size)
}

/// The head's digest, assembled from the agent's per-chunk accumulators.
async fn head_digest(c: &mut AgentClient) -> Result<Digest> {
    let req = pb::ChunkDigestsRequest {
        volume_id: VOLUME.into(),
        snapshot_id: String::new(),
        chunks: vec![],
    };
    let mut acc = Accumulator::default();
    for ch in c.chunk_digests(req).await?.into_inner().chunks {
        let bytes: [u8; 32] = ch.accumulator[..]
            .try_into()
            .with_context(|| format!("chunk {}: accumulator is not 32 bytes", ch.chunk))?;
        acc.merge(&Accumulator::from_bytes(&bytes));
    }
    Ok(acc.digest(VOLUME_SIZE))
}

fn digest(bytes: &[u8]) -> Result<Digest> {
    Digest::try_from(bytes).map_err(|len| anyhow::anyhow!("digest is {len} bytes, not 32"))
}

/// A byte count for humans: "1 GiB", "36.0 MiB", "12 KiB".
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= GIB && b.is_multiple_of(GIB) => format!("{} GiB", b / GIB),
        b if b >= GIB => format!("{:.2} GiB", b as f64 / GIB as f64),
        b if b >= MIB && b.is_multiple_of(MIB) => format!("{} MiB", b / MIB),
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b => format!("{} KiB", b.div_ceil(1024)),
    }
}

/// An offset for humans: "at 8 MiB", "at 177 MiB + 12 KiB".
fn at(offset: u64) -> String {
    let (m, rest) = (offset / MIB, offset % MIB);
    if rest == 0 { format!("{m} MiB") } else { format!("{m} MiB + {} KiB", rest / 1024) }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn rate(bytes: u64, d: Duration) -> String {
    format!("{:.0} MiB/s", bytes as f64 / MIB as f64 / d.as_secs_f64().max(1e-6))
}

/// The agent's data dir: a temporary one, or the one the user named.
enum DataDir {
    Temp(tempfile::TempDir),
    Chosen(PathBuf),
}

impl DataDir {
    fn new(chosen: Option<PathBuf>) -> Result<Self> {
        match chosen {
            None => Ok(DataDir::Temp(
                tempfile::Builder::new()
                    .prefix("cairn-demo-")
                    .tempdir()
                    .context("creating a temporary data dir")?,
            )),
            Some(dir) => {
                let empty = match std::fs::read_dir(&dir) {
                    Ok(mut entries) => entries.next().is_none(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => bail!("--data-dir {}: {e}", dir.display()),
                };
                ensure!(
                    empty,
                    "--data-dir {} is not empty: give a new or empty directory, or leave out --data-dir",
                    dir.display()
                );
                Ok(DataDir::Chosen(dir))
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Chosen(p) => p,
        }
    }

    /// Removes a temporary dir unless `keep`; says what happened to it.
    fn finish(self, keep: bool) {
        match self {
            DataDir::Temp(t) if !keep => {
                let path = t.path().to_path_buf();
                match t.close() {
                    Ok(()) => println!("data dir {} removed (--keep keeps it)", path.display()),
                    Err(e) => println!("data dir {}: could not remove it: {e}", path.display()),
                }
            }
            DataDir::Temp(t) => println!("data dir kept: {}", t.keep().display()),
            DataDir::Chosen(p) => println!("data dir kept: {}", p.display()),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    println!("Cairn demo: one agent, one volume, two snapshots, every byte checked;");
    match striped::no_filesystem() {
        None => println!(
            "then a volume striped over three agents, ext4 on FUSE + loop, an agent killed and rebuilt."
        ),
        Some(why) => println!(
            "then a volume striped over three agents, an agent killed and rebuilt (gRPC I/O: no filesystem, {why})."
        ),
    }
    println!(
        "Last, two sites: copies under a cap, a node killed mid-copy, failover, failback with the delta, switchover."
    );
    let data_dir = match DataDir::new(args.data_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cairn-demo: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut demo = Demo::new(data_dir.path());
    let t = Instant::now();
    match demo.run().await {
        Ok(()) => {
            demo.print_summary();
            println!("\nAll checks passed in {:.1} s.", t.elapsed().as_secs_f64());
            data_dir.finish(args.keep);
            ExitCode::SUCCESS
        }
        Err(e) => {
            demo.failed(&e);
            demo.print_summary();
            eprintln!("\ncairn-demo: FAILED at step {} ({}): {e:#}", demo.step, demo.title);
            drop(demo); // stops the agents
            data_dir.finish(true);
            ExitCode::FAILURE
        }
    }
}
