//! The fault-injection suite: real agent processes, a workload of
//! numbered, checksummed blocks that records every acknowledged write and
//! flush, a seeded nemesis, and a checker. `run(seed)` plays one schedule;
//! `scenario(..)` plays a named one (the reproductions).
//!
//! The cluster: agents a1..a3 on loopback, one volume of `SIZE` bytes in
//! 1 MiB chunks with two replicas (one for the single-copy schedules), its
//! head on one agent. The nemesis, between bursts of writes, after the
//! cluster recovered from the last fault: SIGKILL and restart (on the same
//! address) an agent, kill one for a burst, pause one (SIGSTOP, SIGCONT
//! after a burst), move the head to another agent one epoch up the way the
//! operator does (the full agent list, no `stale_agents`), flip a byte of
//! a stopped agent's layer file, or the double fault of the first
//! scenario (a replica dies, writes go on, the head agent dies, the head
//! is moved to the replica that missed them).
//!
//! What the checker asserts, after every agent is back and the head is
//! open and healed: every block read through the head is the last version
//! whose write and a later flush were both acknowledged, or a version
//! written after that (acknowledged or not: a write not yet flushed may be
//! lost or may land); never another version, never bytes that are not a
//! block this workload wrote there (each block carries its index, version
//! and a BLAKE3 of its body); a read refused with DATA_LOSS is counted, not
//! passed. Then every replica's copy of every chunk it holds, read
//! directly, equals what the head returned (a refusal there is latent
//! corruption found, counted apart). Liveness is reported apart from
//! safety: replicas not healed within 60 s (`unhealed`: then only the
//! in-sync ones are compared), a head that will not reopen with every agent
//! up (`unavailable`).
//!
//! Invariant: a schedule is a function of its seed (the RNG drives every
//! choice); only timings differ between runs.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use cairn_api::agent::v1 as pb;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{AgentProcess, HeadsClient};

const MIB: u64 = 1 << 20;
/// The volume's size: 8 MiB, 2048 blocks.
pub const SIZE: u64 = 8 * MIB;
const CHUNK: u64 = MIB;
const BS: u64 = 4096;
const BLOCKS: u64 = SIZE / BS;
const VOL: &str = "faults";
const AGENTS: usize = 3;
const MAGIC: &[u8; 8] = b"cairnflt";

/// What one schedule did and found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub steps: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    pub writes_acked: usize,
    pub writes_failed: usize,
    pub flushes_acked: usize,
    /// Head opens the agents refused (a refusal is allowed; serving stale
    /// data is not).
    pub opens_refused: usize,
    /// Blocks the checker read back, and those that had to hold a version.
    pub blocks_checked: usize,
    pub acked_blocks_checked: usize,
    /// Reads refused with DATA_LOSS (through the head / at one replica).
    pub data_loss_reads: usize,
    pub latent_corruption: usize,
    /// Every way the promise was broken (safety: an acknowledged write
    /// lost, stale or foreign bytes served, an in-sync replica differing).
    pub violations: Vec<String>,
    /// Replicas still out of sync when the checker gave up waiting (a
    /// liveness failure: the volume serves with fewer copies), and why.
    pub unhealed: Option<String>,
    /// With every agent up the head still refused to open (no data was
    /// served; a liveness failure, not a safety one): the last refusal.
    /// The checker then opens with `accept_data_loss` and checks anyway.
    pub unavailable: Option<String>,
    /// What that forced open found missing (writes the override lost; none
    /// means the refusal protected nothing).
    pub lost_under_override: Vec<String>,
    /// Even the forced open was refused: the data could not be checked.
    pub unchecked: bool,
    pub elapsed: Duration,
}

/// One block's history as the workload knows it.
#[derive(Debug, Default, Clone)]
struct History {
    /// The newest version whose write and a later flush were acknowledged
    /// (0: zeros, never written).
    durable: u64,
    /// Versions written after it (acknowledged or not): each may be there.
    since: Vec<u64>,
    /// The newest acknowledged version not yet covered by a flush.
    acked: Option<u64>,
}

/// The block `index` at `version`: header (magic, index, version, BLAKE3 of
/// the body) and a body derived from both.
pub fn block(index: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    let body = crate::pattern(index.wrapping_mul(1_000_003) ^ version, BS as usize - 56);
    b[56..].copy_from_slice(&body);
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&index.to_le_bytes());
    b[16..24].copy_from_slice(&version.to_le_bytes());
    b[24..56].copy_from_slice(blake3::hash(&body).as_bytes());
    b
}

/// What a block's bytes are: `Ok(version)` (0 for zeros) or why they are
/// no block this workload wrote at `index`.
pub fn decode(index: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    if &data[..8] != MAGIC {
        return Err(format!("block {index}: not a block of the workload"));
    }
    let at = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let version = u64::from_le_bytes(data[16..24].try_into().unwrap());
    if at != index {
        return Err(format!("block {index}: holds block {at} (version {version})"));
    }
    if blake3::hash(&data[56..]).as_bytes() != &data[24..56] {
        return Err(format!("block {index}: version {version} with a body that fails its hash"));
    }
    Ok(version)
}

/// How a schedule is played.
#[derive(Debug, Clone)]
pub struct Options {
    /// Replicas of each chunk (1 or 2).
    pub replicas: u32,
    /// Nemesis steps (each: a burst of writes, a flush, one fault).
    pub steps: usize,
    /// Where the agents' data dirs go.
    pub work: PathBuf,
}

struct Agent {
    name: String,
    dir: PathBuf,
    addr: SocketAddr,
    process: Option<AgentProcess>,
    /// SIGSTOPped: continued before the next fault.
    paused: bool,
}

impl Agent {
    fn start(&mut self) -> anyhow::Result<()> {
        let args: Vec<&std::ffi::OsStr> =
            ["--peer-timeout-ms", "1000", "--rebuild-interval-ms", "300"]
                .iter()
                .map(std::ffi::OsStr::new)
                .collect();
        let p = AgentProcess::start_on(&self.dir, &self.name, self.addr, &args)
            .with_context(|| format!("restarting {}", self.name))?;
        self.addr = p.addr();
        self.process = Some(p);
        Ok(())
    }

    fn signal(&mut self, sig: i32) {
        if let Some(p) = &self.process {
            // SAFETY: a signal to our own child's pid.
            unsafe { libc::kill(p.pid() as i32, sig) };
        }
    }

    fn up(&self) -> bool {
        self.process.is_some() && !self.paused
    }
}

struct Cluster {
    agents: Vec<Agent>,
    replicas: u32,
    head: usize,
    epoch: u64,
    /// The head's agent restarted since the head was opened there.
    head_lost: bool,
}

impl Cluster {
    fn request(&self, epoch: u64) -> pb::OpenHeadRequest {
        let agents = self
            .agents
            .iter()
            .map(|a| (a.name.clone(), format!("http://{}", a.addr)))
            .collect::<Vec<_>>();
        pb::OpenHeadRequest {
            epoch,
            ..crate::open_head_request(VOL, SIZE, CHUNK, self.replicas, agents)
        }
    }

    async fn heads(&self, i: usize) -> anyhow::Result<HeadsClient> {
        let p = self.agents[i].process.as_ref().context("agent down")?;
        tokio::time::timeout(Duration::from_secs(10), p.heads())
            .await
            .context("connect timed out")?
    }

    /// Opens the head on agent `i` one epoch up (as the operator moves a
    /// head). Refused opens are counted, not errors.
    async fn move_head(&mut self, i: usize, r: &mut Report) -> bool {
        self.open_at(i, false, r).await
    }

    async fn open_at(&mut self, i: usize, accept_data_loss: bool, r: &mut Report) -> bool {
        // Every attempt takes a new epoch, as the operator's reservation
        // does: a refused open may have fenced some replicas at it.
        let epoch = self.epoch + 1;
        self.epoch = epoch;
        trace(|| format!("open the head at a{} epoch {epoch}", i + 1));
        let Ok(mut h) = self.heads(i).await else { return false };
        let req = pb::OpenHeadRequest { accept_data_loss, ..self.request(epoch) };
        let open = tokio::time::timeout(Duration::from_secs(20), h.open_head(req));
        match open.await {
            Ok(Ok(_)) => {
                self.head = i;
                self.head_lost = false;
                true
            }
            Ok(Err(e)) => {
                trace(|| format!("open refused: {:?} {}", e.code(), e.message()));
                r.unavailable = Some(e.message().to_string());
                r.opens_refused += 1;
                false
            }
            Err(_) => {
                trace(|| "open timed out".into());
                r.opens_refused += 1;
                false
            }
        }
    }
}

/// With `CAIRN_FAULTS_TRACE` set, each step is told on stderr.
fn trace(what: impl FnOnce() -> String) {
    if std::env::var_os("CAIRN_FAULTS_TRACE").is_some() {
        eprintln!("[faults {:?}] {}", std::time::SystemTime::now(), what());
    }
}

/// Plays schedule `seed` with `opts`; the report says what was checked and
/// every violation found.
pub async fn run(seed: u64, opts: &Options) -> anyhow::Result<Report> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = start_cluster(opts)?;
    let mut r = Report { seed, ..Default::default() };
    let started = Instant::now();
    if !c.move_head(0, &mut r).await {
        bail!("the first OpenHead was refused");
    }
    let mut hist = vec![History::default(); BLOCKS as usize];
    let mut version = 0u64;
    for _ in 0..opts.steps {
        r.steps += 1;
        burst(&mut c, &mut rng, &mut hist, &mut version, &mut r).await;
        nemesis(&mut c, &mut rng, &mut hist, &mut version, &mut r).await?;
    }
    burst(&mut c, &mut rng, &mut hist, &mut version, &mut r).await;
    check(&mut c, &hist, &mut r).await?;
    r.elapsed = started.elapsed();
    Ok(r)
}

fn start_cluster(opts: &Options) -> anyhow::Result<Cluster> {
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let dir = opts.work.join(format!("a{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let mut a = Agent {
            name: format!("a{}", i + 1),
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            process: None,
            paused: false,
        };
        a.start()?;
        agents.push(a);
    }
    Ok(Cluster { agents, replicas: opts.replicas, head: 0, epoch: 0, head_lost: false })
}

/// A burst of single-block writes through the head, then a flush; each
/// outcome goes into the blocks' histories.
async fn burst(
    c: &mut Cluster,
    rng: &mut StdRng,
    hist: &mut [History],
    version: &mut u64,
    r: &mut Report,
) {
    let Ok(mut h) = c.heads(c.head).await else { return };
    let n = rng.random_range(5..25);
    for _ in 0..n {
        let index = rng.random_range(0..BLOCKS);
        *version += 1;
        let req = pb::HeadWriteRequest {
            volume_id: VOL.into(),
            offset: index * BS,
            data: Bytes::from(block(index, *version)),
        };
        hist[index as usize].since.push(*version);
        let write = tokio::time::timeout(Duration::from_secs(5), h.head_write(req)).await;
        match write {
            Ok(Ok(_)) => {
                r.writes_acked += 1;
                hist[index as usize].acked = Some(*version);
            }
            Ok(Err(_)) => r.writes_failed += 1,
            // A head that does not answer (its agent paused and the head
            // not movable): the application waits; so does the burst.
            Err(_) => {
                r.writes_failed += 1;
                return;
            }
        }
    }
    trace(|| format!("burst of {n} writes at a{}", c.head + 1));
    let flush = pb::HeadFlushRequest { volume_id: VOL.into() };
    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), h.head_flush(flush)).await {
        r.flushes_acked += 1;
        for b in hist.iter_mut() {
            if let Some(v) = b.acked.take() {
                b.durable = v;
                b.since.retain(|&x| x > v);
            }
        }
    }
}

/// Brings the cluster back from the last fault: paused agents continued,
/// down ones started, the head reopened where its agent restarted, and up
/// to 45 s for every replica to be in sync again. So faults overlap only
/// where a schedule step says so (two replicas outlive one fault at a
/// time; `double` is the step that does not wait).
async fn recover(c: &mut Cluster, r: &mut Report) -> anyhow::Result<()> {
    for a in c.agents.iter_mut() {
        if a.paused {
            a.signal(libc::SIGCONT);
            a.paused = false;
        }
        if a.process.is_none() {
            a.start()?;
        }
    }
    if c.head_lost {
        c.head_lost = !c.move_head(c.head, r).await;
    }
    if let Ok(mut h) = c.heads(c.head).await {
        let _ = wait_in_sync(&mut h, Duration::from_secs(45)).await;
    }
    Ok(())
}

/// One fault, chosen by the seed, after the last one was recovered from.
async fn nemesis(
    c: &mut Cluster,
    rng: &mut StdRng,
    hist: &mut [History],
    version: &mut u64,
    r: &mut Report,
) -> anyhow::Result<()> {
    recover(c, r).await?;
    let i = rng.random_range(0..AGENTS);
    let kind = match rng.random_range(0..12) {
        0..=2 => "kill-restart",
        3..=4 => "kill",
        5..=6 => "pause",
        7..=8 => "move-head",
        9 => "corrupt",
        10 => "double",
        _ => return Ok(()),
    };
    *r.faults.entry(kind).or_default() += 1;
    trace(|| format!("fault {kind} on a{}", i + 1));
    match kind {
        "kill-restart" => {
            c.agents[i].process.take().unwrap().kill9()?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
            c.agents[i].start()?;
            c.head_lost |= i == c.head;
        }
        // Down (or stopped) for the next burst.
        "kill" => {
            c.agents[i].process.take().unwrap().kill9()?;
            c.head_lost |= i == c.head;
        }
        "pause" => {
            c.agents[i].signal(libc::SIGSTOP);
            c.agents[i].paused = true;
        }
        "move-head" => {
            c.move_head(i, r).await;
        }
        "corrupt" => {
            c.agents[i].process.take().unwrap().kill9()?;
            flip_a_byte(&c.agents[i].dir, rng)?;
            c.agents[i].start()?;
            c.head_lost |= i == c.head;
        }
        // The first scenario: a replica x dies, writes are
        // acknowledged without it, the head agent dies, x comes back and
        // the head is moved to it; then the old head agent comes back too.
        _ => {
            let h = c.head;
            let x = (h + 1 + rng.random_range(0..AGENTS - 1)) % AGENTS;
            c.agents[x].process.take().unwrap().kill9()?;
            burst(c, rng, hist, version, r).await;
            c.agents[h].process.take().unwrap().kill9()?;
            c.agents[x].start()?;
            if !c.move_head(x, r).await {
                c.agents[h].start()?;
                c.head_lost = !c.move_head(h, r).await;
            }
        }
    }
    // A dead or paused head agent: the operator would move the head.
    if !c.agents[c.head].up() {
        let next = (0..AGENTS).find(|&j| c.agents[j].up());
        if let Some(j) = next {
            c.move_head(j, r).await;
        }
    }
    Ok(())
}

/// Flips one byte in one of the volume's layer files under `dir` (the
/// agent is stopped).
fn flip_a_byte(dir: &Path, rng: &mut StdRng) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let vol = dir.join("volumes").join(VOL);
    let mut files = Vec::new();
    collect_files(&vol, &mut files);
    files.retain(|f| f.extension().is_some_and(|e| e == "layer"));
    files.sort();
    files.retain(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0));
    if files.is_empty() {
        return Ok(());
    }
    let f = &files[rng.random_range(0..files.len())];
    let len = std::fs::metadata(f)?.len();
    let at = rng.random_range(0..len);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(f)?;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at)?;
    file.write_all_at(&[b[0] ^ 0x20], at)?;
    file.sync_all()?;
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Every agent back, the head open (one epoch up) and healed; then every
/// block through the head, and every replica's copy of it.
async fn check(c: &mut Cluster, hist: &[History], r: &mut Report) -> anyhow::Result<()> {
    for a in c.agents.iter_mut() {
        if a.paused {
            a.signal(libc::SIGCONT);
            a.paused = false;
        }
        if a.process.is_none() {
            a.start()?;
        }
    }
    let mut opened = false;
    for _ in 0..10 {
        if c.move_head(c.head, r).await {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let forced = !opened;
    if forced {
        trace(|| "check: the head never opened with every agent up; forcing it".into());
        if !c.open_at(c.head, true, r).await {
            // Nothing served, nothing to check: a liveness failure (the
            // report's `unavailable`), told apart from the violations.
            r.unchecked = true;
            return Ok(());
        }
    } else {
        r.unavailable = None;
    }
    let mut h = c.heads(c.head).await?;
    trace(|| "check: waiting for the replicas to heal".into());
    let healed = wait_in_sync(&mut h, Duration::from_secs(60)).await;
    let mut image = vec![None; BLOCKS as usize];
    for (index, b) in hist.iter().enumerate() {
        let index = index as u64;
        let req = pb::HeadReadRequest { volume_id: VOL.into(), offset: index * BS, length: BS };
        r.blocks_checked += 1;
        if b.durable > 0 {
            r.acked_blocks_checked += 1;
        }
        match h.head_read(req).await {
            Ok(got) => {
                let data = got.into_inner().data;
                match decode(index, &data) {
                    Ok(v) if v == b.durable || b.since.contains(&v) => {
                        image[index as usize] = Some(data);
                    }
                    Ok(v) => r.violations.push(format!(
                        "block {index}: read version {v}; the acknowledged one is {}{}",
                        b.durable,
                        if b.since.is_empty() {
                            String::new()
                        } else {
                            format!(" (or one of {:?} written after it)", b.since)
                        }
                    )),
                    Err(why) => r.violations.push(why),
                }
            }
            Err(e) if e.code() == tonic::Code::DataLoss => r.data_loss_reads += 1,
            Err(e) => r.violations.push(format!("block {index}: the head refused a read: {e}")),
        }
    }
    let in_sync = match healed {
        Ok(()) => None,
        Err(why) => {
            r.unhealed = Some(why);
            Some(in_sync_agents(&mut h).await)
        }
    };
    compare_replicas(c, &image, in_sync.as_ref(), r).await;
    if forced {
        r.lost_under_override = std::mem::take(&mut r.violations);
    }
    Ok(())
}

/// Polls the head until every replica is in sync (or says why not).
async fn wait_in_sync(h: &mut HeadsClient, limit: Duration) -> Result<(), String> {
    let until = Instant::now() + limit;
    loop {
        let req = pb::HeadStatusRequest { volume_id: VOL.into() };
        let st = tokio::time::timeout(Duration::from_secs(10), h.get_head_status(req))
            .await
            .map_err(|_| "GetHeadStatus timed out".to_string())?
            .map_err(|e| e.to_string())?
            .into_inner();
        let out: Vec<String> = st
            .replicas
            .iter()
            .filter(|x| !x.in_sync)
            .map(|x| format!("{} ({})", x.agent, x.reason))
            .collect();
        if out.is_empty() {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("not healed after {limit:?}: out of sync: {}", out.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The agents the head reports in sync.
async fn in_sync_agents(h: &mut HeadsClient) -> Vec<String> {
    let req = pb::HeadStatusRequest { volume_id: VOL.into() };
    match tokio::time::timeout(Duration::from_secs(10), h.get_head_status(req)).await {
        Ok(Ok(st)) => {
            st.into_inner().replicas.into_iter().filter(|x| x.in_sync).map(|x| x.agent).collect()
        }
        _ => Vec::new(),
    }
}

/// Each replica's copy of each chunk it holds, block by block, against what
/// the head returned: every replica once healed, else those in sync
/// (`only`; one out of sync is rebuilt before it serves).
async fn compare_replicas(
    c: &Cluster,
    image: &[Option<Bytes>],
    only: Option<&Vec<String>>,
    r: &mut Report,
) {
    for a in c.agents.iter().filter(|a| only.is_none_or(|o| o.contains(&a.name))) {
        let Some(p) = &a.process else { continue };
        let Ok(mut client) = p.client().await else { continue };
        let req = pb::ChunkDigestsRequest { volume_id: VOL.into(), ..Default::default() };
        let Ok(held) = client.chunk_digests(req).await else { continue };
        for chunk in held.into_inner().chunks.iter().map(|d| d.chunk) {
            let req = pb::ReadBlocksRequest {
                volume_id: VOL.into(),
                offset: chunk * CHUNK,
                length: CHUNK,
                ..Default::default()
            };
            let data = match client.read_blocks(req).await {
                Ok(d) => d.into_inner().data,
                Err(e) if e.code() == tonic::Code::DataLoss => {
                    r.latent_corruption += 1;
                    continue;
                }
                Err(e) => {
                    r.violations.push(format!("{}: chunk {chunk} unreadable: {e}", a.name));
                    continue;
                }
            };
            for (k, got) in data.chunks(BS as usize).enumerate() {
                let index = chunk * (CHUNK / BS) + k as u64;
                if let Some(want) = &image[index as usize]
                    && got != &want[..]
                {
                    let v = decode(index, got).map_or_else(|e| e, |v| format!("version {v}"));
                    r.violations.push(format!(
                        "{}: block {index} differs from what the head served ({v})",
                        a.name
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_decode_to_their_version_and_anything_else_is_caught() {
        let b = block(7, 42);
        assert_eq!(decode(7, &b), Ok(42));
        assert_eq!(decode(7, &[0u8; 4096]), Ok(0));
        assert!(decode(8, &b).unwrap_err().contains("holds block 7"));
        let mut flipped = b.clone();
        flipped[1000] ^= 1;
        assert!(decode(7, &flipped).unwrap_err().contains("fails its hash"));
        assert!(decode(7, &[1u8; 4096]).unwrap_err().contains("not a block"));
    }
}
