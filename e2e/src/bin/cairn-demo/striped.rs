//! The demo's second part: a volume striped over three agents with two
//! replicas per chunk, served by a volume head. Where root, /dev/fuse and
//! the tools are there, the head is exposed through FUSE, attached with a
//! loop device, formatted ext4 and mounted, and files are written; else the
//! same story runs through the head's gRPC I/O. One agent is killed with
//! SIGKILL while writing goes on, brought back, and rebuilt while writing
//! goes on; then every file (or byte), the filesystem and every chunk's
//! replicas are checked.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, Reference, pattern};

use super::{Demo, GIB, MIB, digest, ms, size};

const VOLUME: &str = "striped";
const CHUNK: u64 = 64 * MIB;
const AGENTS: usize = 3;
const REPLICAS: u32 = 2;
const SNAPSHOT: &str = "striped-1";
/// Files a writer rewrites in turn (1 MiB each), so it never fills the
/// filesystem however long it runs.
const BUSY_FILES: u64 = 32;
/// A writer's pause between writes: an application's steady load, not a
/// flood that would leave the rebuild no disk time on a small machine.
const WRITER_PAUSE: Duration = Duration::from_millis(10);

/// An agent's name and its accumulator for one chunk.
type AgentDigest = (String, Vec<u8>);

/// How the volume reaches the demo.
enum Access {
    /// ext4 on a loop device over the head's FUSE file.
    Filesystem { device: String, mnt: PathBuf, mounted: bool, files: BTreeMap<PathBuf, String> },
    /// The head's gRPC I/O, checked against a reference.
    Grpc { reference: Arc<Mutex<Reference>> },
}

pub struct Striped {
    dir: PathBuf,
    agents: Vec<Option<AgentProcess>>,
    addrs: Vec<std::net::SocketAddr>,
    args: Vec<std::ffi::OsString>,
    heads: Option<HeadsClient>,
    access: Option<Access>,
    fuse: bool,
}

/// Why a real filesystem cannot be mounted here, if it cannot.
pub fn no_filesystem() -> Option<String> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount", "e2fsck"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn file_sum(path: &Path) -> Result<String> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(blake3::hash(&data).to_hex()[..16].to_string())
}

impl Drop for Striped {
    /// Leaves nothing mounted or attached, even when a step failed.
    fn drop(&mut self) {
        if let Some(Access::Filesystem { device, mnt, mounted, .. }) = &self.access {
            if *mounted {
                let _ = Command::new("umount").arg("-l").arg(mnt).status();
            }
            let _ = Command::new("losetup").arg("-d").arg(device).status();
        }
    }
}

impl Striped {
    pub fn new(dir: &Path) -> Self {
        Striped {
            dir: dir.join("striped"),
            agents: Vec::new(),
            addrs: Vec::new(),
            args: Vec::new(),
            heads: None,
            access: None,
            fuse: no_filesystem().is_none(),
        }
    }

    fn heads(&self) -> HeadsClient {
        self.heads.clone().expect("the head is open")
    }

    async fn status(&self) -> Result<pb::HeadStatus> {
        let req = pb::HeadStatusRequest { volume_id: VOLUME.into() };
        Ok(self.heads().get_head_status(req).await?.into_inner())
    }

    pub async fn run(&mut self, demo: &mut Demo) -> Result<()> {
        self.start_agents(demo).await?;
        self.open(demo).await?;
        self.write(demo).await?;
        self.kill_while_writing(demo).await?;
        self.rebuild_while_writing(demo).await?;
        self.verify(demo).await?;
        self.close(demo).await
    }

    async fn start_agents(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin(format!("Start {AGENTS} agents for a striped volume"));
        let fuse_dir = self.dir.join("fuse");
        std::fs::create_dir_all(&fuse_dir)?;
        self.args = vec![
            "--peer-timeout-ms".into(),
            "2000".into(),
            "--rebuild-interval-ms".into(),
            "200".into(),
        ];
        if self.fuse {
            self.args.extend(["--fuse-dir".into(), fuse_dir.into_os_string()]);
        }
        let args: Vec<&OsStr> = self.args.iter().map(|a| a.as_os_str()).collect();
        for i in 1..=AGENTS {
            let data = self.dir.join(format!("a{i}"));
            std::fs::create_dir_all(&data)?;
            let a = AgentProcess::start_args(&data, &format!("a{i}"), &args)
                .with_context(|| format!("starting agent a{i}"))?;
            println!("    a{i}: pid {} on {}", a.pid(), a.addr());
            self.addrs.push(a.addr());
            self.agents.push(Some(a));
        }
        demo.ok(format!("{AGENTS} agents serving"));
        Ok(())
    }

    async fn open(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Open the volume head: 1 GiB, 2 replicas per 64 MiB chunk");
        let request = pb::OpenHeadRequest {
            fuse: self.fuse,
            ..cairn_e2e::open_head_request(
                VOLUME,
                GIB,
                CHUNK,
                REPLICAS,
                cairn_e2e::numbered(self.agents.iter().map(Option::as_ref)),
            )
        };
        let mut heads = self.agents[0].as_ref().expect("running").heads().await?;
        let status = heads.open_head(request).await.context("OpenHead")?.into_inner();
        self.heads = Some(heads);
        for r in &status.replicas {
            println!(
                "    {} holds a replica of {} of the {} chunks",
                r.agent,
                r.chunks,
                GIB / CHUNK
            );
        }
        if self.fuse {
            println!("    head on a1, exposed through FUSE as {}", status.fuse_file);
            let device = run(
                "losetup",
                &["--find", "--show", "--direct-io=on", "--sector-size", "4096", &status.fuse_file],
            )
            .or_else(|_| {
                run("losetup", &["--find", "--show", "--sector-size", "4096", &status.fuse_file])
            })?;
            let mnt = self.dir.join("mnt");
            std::fs::create_dir_all(&mnt)?;
            self.access = Some(Access::Filesystem {
                device: device.clone(),
                mnt: mnt.clone(),
                mounted: false,
                files: BTreeMap::new(),
            });
            run("mkfs.ext4", &["-q", "-F", &device])?;
            run("mount", &[&device, mnt.to_str().expect("utf-8 path")])?;
            if let Some(Access::Filesystem { mounted, .. }) = &mut self.access {
                *mounted = true;
            }
            println!("    {device} formatted ext4 and mounted at {}", mnt.display());
            demo.ok(format!("ext4 mounted on {device}"));
        } else {
            println!(
                "    head on a1; no filesystem ({}): I/O goes through the head's gRPC API",
                no_filesystem().unwrap_or_default()
            );
            self.access =
                Some(Access::Grpc { reference: Arc::new(Mutex::new(Reference::new(GIB))) });
            demo.ok("head open, gRPC I/O".into());
        }
        Ok(())
    }

    async fn write(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Write");
        let t = Instant::now();
        let bytes = match self.access.as_mut().expect("open") {
            Access::Filesystem { mnt, files, .. } => {
                let mut bytes = 0;
                for i in 0..8u64 {
                    let path = mnt.join(format!("file-{i}"));
                    let data = pattern(i, (4 << 20) + i as usize * 4097);
                    std::fs::write(&path, &data)?;
                    bytes += data.len() as u64;
                    files.insert(path.clone(), blake3::hash(&data).to_hex()[..16].to_string());
                }
                run("sync", &[])?;
                println!("    8 files, {} in all, written and synced", size(bytes));
                bytes
            }
            Access::Grpc { reference } => {
                let mut heads = self.heads.clone().expect("open");
                for i in 0..64u64 {
                    let data = pattern(i, MIB as usize);
                    let offset = i * 8 * MIB;
                    reference.lock().unwrap().write(offset, &data);
                    let req = pb::HeadWriteRequest {
                        volume_id: VOLUME.into(),
                        offset,
                        data: data.into(),
                    };
                    heads.head_write(req).await?;
                }
                heads.head_flush(pb::HeadFlushRequest { volume_id: VOLUME.into() }).await?;
                println!("    64 MiB in 1 MiB writes spread over every chunk, flushed");
                64 * MIB
            }
        };
        let req = pb::HeadSnapshotRequest {
            volume_id: VOLUME.into(),
            snapshot_id: SNAPSHOT.into(),
            generation: 1,
        };
        let d = digest(&self.heads().head_snapshot(req).await?.into_inner().digest)?;
        println!("    snapshot {SNAPSHOT} sealed on every replica of every chunk, digest {d}");
        demo.ok(format!("{} in {}, snapshot {SNAPSHOT}", size(bytes), ms(t.elapsed())));
        Ok(())
    }

    /// Starts a writer that writes until `stop` (and at least 3 times);
    /// returns how many writes it made (gRPC writes go to the reference as
    /// they are made; files are recorded by `record_busy_files`).
    fn writer(&self, stop: Arc<AtomicBool>, round: u64) -> tokio::task::JoinHandle<Result<u64>> {
        match self.access.as_ref().expect("open") {
            Access::Filesystem { mnt, .. } => {
                let mnt = mnt.clone();
                tokio::task::spawn_blocking(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) || n < 3 {
                        let path = mnt.join(format!("busy-{round}-{}", n % BUSY_FILES));
                        std::fs::write(&path, pattern(round * 1000 + n, 1 << 20))?;
                        n += 1;
                        std::thread::sleep(WRITER_PAUSE);
                    }
                    Ok(n)
                })
            }
            Access::Grpc { reference } => {
                let (reference, mut heads) = (reference.clone(), self.heads());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) || n < 3 {
                        let offset = ((round * 7919 + n * 104_729) % (GIB / MIB - 1)) * MIB + 4096;
                        let data = pattern(round * 1000 + n, 256 << 10);
                        reference.lock().unwrap().write(offset, &data);
                        let req = pb::HeadWriteRequest {
                            volume_id: VOLUME.into(),
                            offset,
                            data: data.into(),
                        };
                        heads.head_write(req).await?;
                        n += 1;
                        tokio::time::sleep(WRITER_PAUSE).await;
                    }
                    Ok(n)
                })
            }
        }
    }

    /// Adds the files a writer wrote in `round` to the files to check.
    fn record_busy_files(&mut self, round: u64, n: u64) -> Result<()> {
        if let Some(Access::Filesystem { mnt, files, .. }) = &mut self.access {
            // The last write of each file is what it must hold.
            for i in n.saturating_sub(BUSY_FILES)..n {
                let path = mnt.join(format!("busy-{round}-{}", i % BUSY_FILES));
                let data = pattern(round * 1000 + i, 1 << 20);
                files.insert(path, blake3::hash(&data).to_hex()[..16].to_string());
            }
        }
        Ok(())
    }

    async fn kill_while_writing(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Kill agent a3 (SIGKILL) while writing");
        let stop = Arc::new(AtomicBool::new(false));
        let writer = self.writer(stop.clone(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a3 = self.agents[2].take().expect("running");
        println!("    killing a3 (pid {})", a3.pid());
        a3.kill9()?;
        let t = Instant::now();
        let reason = loop {
            let status = self.status().await?;
            let r = status.replicas.iter().find(|r| r.agent == "a3").context("a3's replica")?;
            if !r.in_sync {
                break r.reason.clone();
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the head did not notice a3 was killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        let n = writer.await??;
        self.record_busy_files(1, n)?;
        println!("    a3 out of sync after {}: {reason}", ms(t.elapsed()));
        println!("    the writer went on: {n} writes of 1 MiB / 256 KiB, none failed");
        demo.ok(format!("I/O went on: {n} writes while a3 was down"));
        Ok(())
    }

    async fn rebuild_while_writing(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Bring a3 back: rebuilt while writing goes on");
        let args: Vec<&OsStr> = self.args.iter().map(|a| a.as_os_str()).collect();
        let data = self.dir.join("a3");
        let a3 = AgentProcess::start_on(&data, "a3", self.addrs[2], &args)
            .context("restarting a3 on its address")?;
        println!("    a3 restarted: pid {} on {}", a3.pid(), a3.addr());
        self.agents[2] = Some(a3);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = self.writer(stop.clone(), 2);
        let t = Instant::now();
        let mut last_phase = String::new();
        let done = loop {
            let status = self.status().await?;
            let r = status.replicas.iter().find(|r| r.agent == "a3").context("a3's replica")?;
            if r.in_sync {
                break r.last_rebuild.clone();
            }
            if let Some(p) = &r.rebuild
                && p.phase != last_phase
            {
                println!(
                    "    rebuild phase {:<6} layers {}/{}, {} copied, head blocks {}/{}",
                    p.phase,
                    p.layers_done,
                    p.layers_total,
                    size(p.bytes_done),
                    p.head_blocks_done,
                    p.head_blocks_total
                );
                last_phase = p.phase.clone();
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("a3 was not rebuilt within 5 minutes: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop.store(true, Ordering::SeqCst);
        let n = writer.await??;
        self.record_busy_files(2, n)?;
        println!("    a3 in sync again: {done}");
        println!("    the writer went on: {n} writes during the rebuild");
        demo.ok(format!("{done}; {n} writes during it"));
        Ok(())
    }

    async fn verify(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Verify files, filesystem and replicas");
        let mut heads = self.heads();
        let checked = match self.access.as_mut().expect("open") {
            Access::Filesystem { device, mnt, mounted, files } => {
                run("sync", &[])?;
                let m = mnt.to_str().expect("utf-8 path").to_string();
                run("umount", &[&m])?;
                *mounted = false;
                run("e2fsck", &["-fn", device])?;
                println!("    e2fsck -fn {device}: clean");
                run("mount", &[device, &m])?;
                *mounted = true;
                for (path, sum) in files.iter() {
                    let got = file_sum(path)?;
                    ensure!(&got == sum, "{}: checksum {got}, written as {sum}", path.display());
                }
                println!(
                    "    remounted (no page cache): {} files, every checksum equal",
                    files.len()
                );
                format!("{} files intact, fsck clean", files.len())
            }
            Access::Grpc { reference } => {
                let want = reference.lock().unwrap().clone();
                let mut at = 0;
                while at < GIB {
                    let req = pb::HeadReadRequest {
                        volume_id: VOLUME.into(),
                        offset: at,
                        length: 4 * MIB,
                    };
                    let got = heads.head_read(req).await?.into_inner().data;
                    if let Some(m) = want.mismatch(at, &got) {
                        bail!("reading the head back: {m}");
                    }
                    at += 4 * MIB;
                }
                let req =
                    pb::HeadDigestRequest { volume_id: VOLUME.into(), snapshot_id: "".into() };
                let d = digest(&heads.head_digest(req).await?.into_inner().digest)?;
                ensure!(d == want.digest(), "head digest {d}, reference {}", want.digest());
                println!("    1 GiB read back through the head: every byte as written");
                println!("    head digest {d} = the reference's");
                "every byte as written, digest equal".to_string()
            }
        };
        heads.head_flush(pb::HeadFlushRequest { volume_id: VOLUME.into() }).await?;
        let mut by_chunk: BTreeMap<(&str, u64), Vec<AgentDigest>> = BTreeMap::new();
        for ((i, a), view) in
            self.agents.iter().enumerate().flat_map(|ia| [(ia, ""), (ia, SNAPSHOT)])
        {
            let mut c = a.as_ref().expect("running").client().await?;
            let req = pb::ChunkDigestsRequest {
                volume_id: VOLUME.into(),
                snapshot_id: view.into(),
                chunks: vec![],
            };
            for cd in c.chunk_digests(req).await?.into_inner().chunks {
                by_chunk
                    .entry((view, cd.chunk))
                    .or_default()
                    .push((format!("a{}", i + 1), cd.accumulator.to_vec()));
            }
        }
        let chunks = GIB / CHUNK;
        ensure!(by_chunk.len() as u64 == 2 * chunks, "{} chunk views held", by_chunk.len());
        for ((view, chunk), reps) in &by_chunk {
            let what =
                if view.is_empty() { "head".to_string() } else { format!("snapshot {view}") };
            ensure!(reps.len() == REPLICAS as usize, "chunk {chunk} has {} replicas", reps.len());
            ensure!(
                reps.iter().all(|r| r.1 == reps[0].1),
                "chunk {chunk} ({what}): replicas on {} and {} differ",
                reps[0].0,
                reps[1].0
            );
        }
        println!(
            "    every chunk's {REPLICAS} replicas have equal digests, head and {SNAPSHOT} ({chunks} chunks)"
        );
        demo.ok(format!("{checked}; replicas of all {chunks} chunks equal"));
        Ok(())
    }

    async fn close(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Detach and close");
        let t = Instant::now();
        if let Some(Access::Filesystem { device, mnt, mounted, .. }) = &mut self.access {
            run("umount", &[mnt.to_str().expect("utf-8 path")])?;
            *mounted = false;
            run("losetup", &["-d", device])?;
            println!("    unmounted {} and detached {device}", mnt.display());
        }
        self.access = None;
        let req = pb::CloseHeadRequest { volume_id: VOLUME.into() };
        self.heads().close_head(req).await.context("CloseHead")?;
        for a in self.agents.iter_mut().filter_map(Option::take) {
            a.terminate()?;
        }
        println!("    head closed, agents stopped");
        demo.ok(format!("clean in {}", ms(t.elapsed())));
        Ok(())
    }
}
