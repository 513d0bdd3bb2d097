//! `cairn-bench volume`: a replicated volume's head, exposed through FUSE
//! and a loop device, measured with fio against a loop device on a plain
//! file on the same disk, in the same run.
//!
//! Three agents on loopback, a 1 GiB volume with two replicas in 64 MiB
//! chunks, its head opened on the first agent with FUSE; the same fio jobs
//! on both block devices, write jobs first so the reads find written data.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use cairn_api::agent::v1 as pb;

use super::{GIB, MIB};
use cairn_e2e::{AgentProcess, HeadsClient};

const VOLUME: &str = "bench-vol";
const CHUNK: u64 = 64 * MIB;
const AGENTS: usize = 3;
const REPLICAS: u32 = 2;
/// Seconds each fio job runs.
const RUNTIME_S: u32 = 8;

#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    /// Directory to work in (a fresh subdirectory is made in it); default:
    /// `./target` if it exists, else /tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the work directory (agent data and the baseline file) instead of
    /// removing it at the end. Loop devices, the head and the agents are
    /// still detached, closed and stopped.
    #[arg(long)]
    keep: bool,
}

/// One fio job, run identically on both devices.
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    /// `read` or `write`: the section of fio's JSON to read.
    dir: &'static str,
    figure: &'static str,
    /// Compare bandwidth (true) or IOPS (false).
    by_bw: bool,
    target: f64,
}

/// Write jobs first, so the read jobs find written data.
const JOBS: [Job; 4] = [
    Job {
        name: "seq-write",
        rw: "write",
        bs: "1M",
        dir: "write",
        figure: "fio_seq_write_ratio",
        by_bw: true,
        target: 0.3,
    },
    Job {
        name: "rand-write",
        rw: "randwrite",
        bs: "4k",
        dir: "write",
        figure: "fio_rand_write_ratio",
        by_bw: false,
        target: 0.2,
    },
    Job {
        name: "seq-read",
        rw: "read",
        bs: "1M",
        dir: "read",
        figure: "fio_seq_read_ratio",
        by_bw: true,
        target: 0.5,
    },
    Job {
        name: "rand-read",
        rw: "randread",
        bs: "4k",
        dir: "read",
        figure: "fio_rand_read_ratio",
        by_bw: false,
        target: 0.3,
    },
];

/// What fio reports for one job.
#[derive(Debug, Clone, Copy)]
struct FioResult {
    bw_bytes: f64,
    iops: f64,
    io_bytes: u64,
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Runs a command with its output captured; its stdout (trimmed) on
/// success, an error with its stderr otherwise.
fn run(cmd: &str, args: &[&OsStr]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {:?} failed ({}): {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Root, /dev/fuse, loop devices and losetup; fio installed if missing.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cairn-bench volume needs root (FUSE mounts and loop devices); run it as root");
    }
    for need in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(need).exists() {
            bail!("cairn-bench volume needs {need}, which is missing");
        }
    }
    for tool in ["losetup", "fallocate"] {
        if !on_path(tool) {
            bail!("cairn-bench volume needs {tool}, which is not installed");
        }
    }
    if on_path("fio") {
        return Ok(());
    }
    eprintln!("fio is not installed: installing it with `apt-get install -y fio`");
    let install = || run("apt-get", &[os("install"), os("-y"), os("fio")]);
    if let Err(e) = install() {
        eprintln!("  apt-get install failed ({e:#}); running `apt-get update` and retrying");
        run("apt-get", &[os("update")]).context("apt-get update")?;
        install().context("installing fio")?;
    }
    if !on_path("fio") {
        bail!("fio is still not on PATH after apt-get install");
    }
    eprintln!("  fio installed: {}", run("fio", &[os("--version")])?);
    Ok(())
}

/// A loop device attached by the bench; detached on drop.
struct LoopDev {
    device: String,
    detached: bool,
}

impl LoopDev {
    /// Attaches `file` with 4 KiB sectors, with direct I/O if
    /// `direct_io` (falling back without it if refused, when
    /// `may_fall_back`).
    fn attach(file: &Path, what: &str, may_fall_back: bool) -> anyhow::Result<Self> {
        let with_dio = [
            os("--find"),
            os("--show"),
            os("--direct-io=on"),
            os("--sector-size"),
            os("4096"),
            file.as_os_str(),
        ];
        let device = match run("losetup", &with_dio) {
            Ok(d) => d,
            Err(e) if may_fall_back => {
                eprintln!(
                    "  {what}: losetup refused --direct-io=on ({e:#}); attaching without direct I/O"
                );
                run(
                    "losetup",
                    &[
                        os("--find"),
                        os("--show"),
                        os("--sector-size"),
                        os("4096"),
                        file.as_os_str(),
                    ],
                )?
            }
            Err(e) => return Err(e),
        };
        let dev = LoopDev { device, detached: false };
        let dio = dev.direct_io();
        eprintln!(
            "  {what}: {} on {} (direct I/O {})",
            dev.device,
            file.display(),
            match dio {
                Some(true) => "on",
                Some(false) => "OFF",
                None => "unknown",
            }
        );
        if dio == Some(false) && !may_fall_back {
            bail!("{what}: the loop device did not take direct I/O");
        }
        Ok(dev)
    }

    /// Whether the kernel does direct I/O on the backing file.
    fn direct_io(&self) -> Option<bool> {
        let name = self.device.strip_prefix("/dev/")?;
        let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).ok()?;
        Some(s.trim() == "1")
    }

    fn detach(&mut self) -> anyhow::Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        run("losetup", &[os("-d"), os(&self.device)]).map(drop)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("cleanup: detaching {}: {e:#}", self.device);
        }
    }
}

/// Everything the bench sets up, torn down in order (loop devices, the
/// head, the agents, the work directory) on drop, even after an error.
struct Rig {
    rt: tokio::runtime::Runtime,
    work: Option<tempfile::TempDir>,
    keep: bool,
    agents: Vec<AgentProcess>,
    heads: Option<HeadsClient>,
    loops: Vec<LoopDev>,
}

impl Rig {
    fn dir(&self) -> &Path {
        self.work.as_ref().expect("work dir until teardown").path()
    }

    /// Tears everything down; every step is tried, the first error returned.
    fn teardown(&mut self) -> anyhow::Result<()> {
        let mut first: Option<anyhow::Error> = None;
        let mut note = |e: anyhow::Error| {
            eprintln!("cleanup: {e:#}");
            first.get_or_insert(e);
        };
        for mut l in self.loops.drain(..) {
            if let Err(e) = l.detach() {
                note(e.context(format!("detaching {}", l.device)));
            }
        }
        if let Some(mut heads) = self.heads.take() {
            let closed = self.rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    heads.close_head(pb::CloseHeadRequest { volume_id: VOLUME.into() }),
                )
                .await
            });
            match closed {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => note(anyhow::anyhow!("CloseHead: {s}")),
                Err(_) => note(anyhow::anyhow!("CloseHead timed out")),
            }
        }
        for a in self.agents.drain(..) {
            let pid = a.pid();
            if let Err(e) = a.terminate() {
                note(e.context(format!("stopping agent pid {pid}")));
            }
        }
        if let Some(work) = self.work.take() {
            // A FUSE mount left behind (an agent that died) would make the
            // directory impossible to remove: detach it lazily first.
            for m in mounts_under(work.path()) {
                eprintln!("cleanup: {} is still mounted; unmounting it (lazy)", m.display());
                if let Err(e) = run("umount", &[os("-l"), m.as_os_str()]) {
                    note(e);
                }
            }
            if self.keep {
                let kept = work.keep();
                eprintln!("kept the work directory {}", kept.display());
            } else {
                let path = work.path().to_path_buf();
                if let Err(e) = work.close() {
                    note(anyhow::Error::from(e).context(format!("removing {}", path.display())));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// Runs one fio job on `device`.
fn fio(job: &Job, device: &str) -> anyhow::Result<FioResult> {
    fio_run(job, device, true)
}

/// Writes the whole device once (1 MiB writes, not timed), so every read
/// that follows finds written data, however far the timed writes got.
fn fill(device: &str) -> anyhow::Result<FioResult> {
    let job = Job {
        name: "fill",
        rw: "write",
        bs: "1M",
        dir: "write",
        figure: "",
        by_bw: true,
        target: 0.0,
    };
    fio_run(&job, device, false)
}

fn fio_run(job: &Job, device: &str, time_based: bool) -> anyhow::Result<FioResult> {
    let mut args = [
        format!("--name={}", job.name),
        format!("--filename={device}"),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        "--iodepth=16".into(),
        "--direct=1".into(),
        "--ioengine=libaio".into(),
        "--time_based".into(),
        format!("--runtime={RUNTIME_S}"),
        "--size=1G".into(),
        "--output-format=json".into(),
    ]
    .to_vec();
    if !time_based {
        args.retain(|a| a != "--time_based" && !a.starts_with("--runtime="));
    }
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let out = run("fio", &args)?;
    // fio may print notes before its JSON.
    let json = out.find('{').map(|i| &out[i..]).context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(json).context("parsing fio's JSON")?;
    let sect = &v["jobs"][0][job.dir];
    let num = |k: &str| sect[k].as_f64().with_context(|| format!("fio JSON has no {k}"));
    let res = FioResult {
        bw_bytes: num("bw_bytes")?,
        iops: num("iops")?,
        io_bytes: num("io_bytes")? as u64,
    };
    if res.io_bytes == 0 {
        bail!("fio {} on {device} did no I/O", job.name);
    }
    Ok(res)
}

fn describe(r: &FioResult) -> String {
    format!(
        "{:8.1} MB/s {:9.0} IOPS ({:.0} MiB moved)",
        r.bw_bytes / 1e6,
        r.iops,
        r.io_bytes as f64 / MIB as f64
    )
}

pub fn volume_bench(args: VolumeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Err(e) = preflight() {
        eprintln!("cairn-bench volume: cannot run: {e:#}");
        std::process::exit(2);
    }
    let work = super::work_dir(args.dir.as_deref(), "cairn-bench-volume-")?;
    let mut rig = Rig {
        rt: tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        work: Some(work),
        keep: args.keep,
        agents: Vec::new(),
        heads: None,
        loops: Vec::new(),
    };
    let mut figures = Vec::new();
    let res = run_bench(&mut rig, &mut figures);
    if let Err(e) = &res {
        eprintln!("cairn-bench volume: failed: {e:#}");
    }
    let cleaned = rig.teardown();
    // The rebuild part, once the fio rig is gone (its own agents, same
    // disk).
    let rebuild = match &res {
        Ok(()) => {
            let dir = super::work_dir(args.dir.as_deref(), "cairn-bench-rebuild-")?;
            Some(crate::rebuild::measure(dir.path()))
        }
        Err(_) => None,
    };
    if !figures.is_empty() {
        eprintln!("\nsummary:");
        for (name, value, target) in &figures {
            eprintln!(
                "  {name:<22} {value:>10.3}   target >= {target:<5} {}",
                if value >= target { "ok" } else { "MISSED" }
            );
        }
    }
    match &rebuild {
        Some(Ok(r)) => {
            for (name, value, target) in r {
                eprintln!("  {name:<22} {value:>10.3}   target {target}");
            }
        }
        Some(Err(e)) => eprintln!("  rebuild: failed: {e:#}"),
        None => {}
    }
    eprintln!("total run time: {:.1} s", started.elapsed().as_secs_f64());
    res?;
    if let Some(r) = rebuild {
        r.context("the rebuild part")?;
    }
    cleaned.context("cleaning up")
}

fn run_bench(rig: &mut Rig, figures: &mut Vec<(&'static str, f64, f64)>) -> anyhow::Result<()> {
    let dir = rig.dir().canonicalize()?;
    eprintln!("cairn-bench volume: working in {}", dir.display());
    let fuse_dir = dir.join("fuse");
    std::fs::create_dir_all(&fuse_dir)?;

    // The baseline: a preallocated 1 GiB file on the same disk.
    let baseline = dir.join("baseline.img");
    run("fallocate", &[os("-l"), os(&GIB.to_string()), baseline.as_os_str()])
        .context("preallocating the baseline file")?;

    eprintln!(
        "\n== set-up: {AGENTS} agents on loopback, a 1 GiB volume, {REPLICAS} replicas, {} MiB \
         chunks, head on a1 through FUSE",
        CHUNK / MIB
    );
    for i in 1..=AGENTS {
        let data = dir.join(format!("a{i}"));
        std::fs::create_dir_all(&data)?;
        let extra = [os("--fuse-dir"), fuse_dir.as_os_str()];
        let a = AgentProcess::start_args(&data, &format!("a{i}"), &extra)
            .with_context(|| format!("starting agent a{i}"))?;
        eprintln!("  a{i}: pid {} at {}", a.pid(), a.addr());
        rig.agents.push(a);
    }
    let request = pb::OpenHeadRequest {
        fuse: true,
        ..cairn_e2e::open_head_request(
            VOLUME,
            GIB,
            CHUNK,
            REPLICAS,
            cairn_e2e::numbered(rig.agents.iter().map(Some)),
        )
    };
    let a1 = &rig.agents[0];
    let mut heads = rig.rt.block_on(a1.heads())?;
    let status = rig.rt.block_on(heads.open_head(request)).context("OpenHead")?.into_inner();
    rig.heads = Some(heads);
    if status.fuse_file.is_empty() {
        bail!("OpenHead returned no FUSE file: {status:?}");
    }
    eprintln!("  head open on a1, FUSE file {}", status.fuse_file);

    let cairn = LoopDev::attach(Path::new(&status.fuse_file), "cairn", true)?;
    let cairn_dev = cairn.device.clone();
    rig.loops.push(cairn);
    let base = LoopDev::attach(&baseline, "baseline", false)?;
    let base_dev = base.device.clone();
    rig.loops.push(base);

    eprintln!(
        "\n== fio: --direct=1 --ioengine=libaio --iodepth=16 --time_based --runtime={RUNTIME_S} \
         --size=1G, the same job on each device (baseline first), write jobs before read jobs"
    );
    let mut filled = false;
    for job in &JOBS {
        if job.dir == "read" && !filled {
            filled = true;
            eprintln!(
                "  (untimed) writing each whole device once with 1 MiB writes before the reads"
            );
            for (what, dev) in [("baseline", &base_dev), ("cairn", &cairn_dev)] {
                let t = Instant::now();
                let r = fill(dev).with_context(|| format!("filling {what}"))?;
                eprintln!(
                    "  fill       {what:<8} {} in {:.1} s",
                    describe(&r),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        let b = fio(job, &base_dev).with_context(|| format!("fio {} on the baseline", job.name))?;
        let c = fio(job, &cairn_dev).with_context(|| format!("fio {} on cairn", job.name))?;
        eprintln!("  {:<10} baseline {}", job.name, describe(&b));
        eprintln!("  {:<10} cairn    {}", job.name, describe(&c));
        let ratio = if job.by_bw { c.bw_bytes / b.bw_bytes } else { c.iops / b.iops };
        println!("figure {} {ratio:.3}", job.figure);
        figures.push((job.figure, ratio, job.target));
    }
    Ok(())
}
