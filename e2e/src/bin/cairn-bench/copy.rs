//! `cairn-bench copy`: remote copy between two sites, each a network
//! namespace, joined by one veth pair (the data link), against rsync and
//! against the link itself (iperf3), in one run. Needs root, rsync and
//! iperf3.
//!
//! Site A (namespace `cairn-copy-<pid>-a`) runs agent a1, which holds the
//! source volumes and their heads; site B (`cairn-copy-<pid>-b`) runs agent
//! b1 with the remote volumes, the rsync daemon and the iperf3 server. The
//! bench itself stays in the root namespace and reaches each agent over a
//! management veth of its own, so the data link carries only what goes
//! between the sites and its counters can be read as the copy's traffic.
//! The data link is shaped with `tc tbf` on A's end (A -> B is the copy's
//! direction) where a figure says so; latency comes from a
//! [`DelayProxy`] run inside site B.
//!
//! A 2 GiB volume (`src`, every block written, 64 MiB chunks, one replica)
//! is snapshotted as s1; a plain file in site A holds the same bytes. The
//! two image files rsync works on are kept in /dev/shm (a tmpfs) when it
//! has room, as the disk here is short: rsync would read them from the page
//! cache anyway (they were just written), and it never syncs them, so this
//! can only help rsync. The agents' data is on disk. Then:
//!
//! - `full_copy_link_ratio` (1 Gbit cap): s1 copied in full (block data
//!   bytes / time of the CopySnapshot call) / the rate iperf3 reaches over
//!   the same link in the same run;
//! - `delay_throughput_ratio` (1 Gbit cap): the same full copy to another
//!   remote volume through a proxy adding 20 ms each way / without it;
//! - `incr_vs_rsync_speedup` (link uncapped, both tools): 1% of the 4 KiB
//!   blocks rewritten at random (the same blocks and bytes in the file),
//!   snapshot s2; the time of `rsync --inplace --no-whole-file` of the file
//!   to an rsync daemon in site B that holds the file as of s1 / the time of
//!   Cairn's incremental copy of s2 (base s1);
//! - `incr_vs_ideal_ratio` (100 Mbit cap): another 1% rewritten, snapshot
//!   s3; the incremental copy's time / (changed bytes / the rate iperf3
//!   reaches over the same link);
//! - `wire_bytes_ratio`: bytes A's end of the data link transmitted
//!   (`tx_bytes`) during an incremental copy / the changed bytes; the larger
//!   of the two incremental copies' (compression off);
//! - `cap_error_pct` (link uncapped): a copy of a second volume with
//!   CopySnapshot's own limit at 20 MiB/s; |achieved - cap| / cap * 100,
//!   achieved from GetCopyProgress's bytes_sent over 20 s starting one
//!   second after the first bytes went;
//! - `resume_resent_mib` (link uncapped): the same volume copied to a third
//!   remote volume; the sender (a1) killed with SIGKILL once half the data
//!   is sent, restarted, and the copy asked for again: (data bytes sent over
//!   both attempts - the copy's data bytes) in MiB.
//!
//! Requests are built with `..Default::default()` so that fields added to
//! the messages later leave this code compiling (and meaning the same).
#![allow(clippy::needless_update)]

use std::{
    fs::{File, OpenOptions},
    io::Read,
    net::{Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use cairn_api::{
    BLOCK_SIZE,
    agent::v1 as pb,
    digest::{Accumulator, BlockHash},
};
use cairn_e2e::{AgentClient, AgentProcess, CopyClient, HeadsClient, pattern, proxy::DelayProxy};
use futures::StreamExt;
use rand::{SeedableRng, rngs::StdRng};

use super::{GIB, MIB};

const BS: u64 = BLOCK_SIZE;
const CHUNK: u64 = 64 * MIB;
/// Every agent listens on this port (on all addresses of its namespace).
const AGENT_PORT: u16 = 7070;
const PROXY_PORT: u16 = 7171;
const IPERF_PORT: u16 = 5201;
const RSYNC_PORT: u16 = 8730;
const SECRET: &[u8] = b"cairn-bench-copy-pairing-secret";
/// The big source volume and its remote copy.
const SRC: &str = "src";
const DST: &str = "dst";
/// Where the delayed full copy goes.
const DST_DELAY: &str = "dst-delay";
/// The smaller source of the cap and resume parts, and their targets.
const CAP_SRC: &str = "cap-src";
const DST_CAP: &str = "dst-cap";
const DST_RESUME: &str = "dst-resume";
/// Added each way by the proxy.
const DELAY: Duration = Duration::from_millis(20);
/// Rewritten between two snapshots: 1 block in 100.
const CHANGED_PER_MILLE: u64 = 10;
/// The longest any one copy may take before the bench gives up.
const COPY_TIMEOUT: Duration = Duration::from_secs(240);
const NS_PREFIX: &str = "cairn-copy-";
const WORK_PREFIX: &str = "cairn-bench-copy-";

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// Directory to work in (a fresh subdirectory is made in it); default:
    /// `./target` if it exists, else /tmp. It needs about 9 GiB free.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Much smaller sizes and a shorter cap window: a smoke test. Every
    /// figure is still printed.
    #[arg(long)]
    quick: bool,
    /// Keep the work directory (agent data, image files) at the end.
    /// Namespaces and processes are removed all the same.
    #[arg(long)]
    keep: bool,
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// The big volume (and the image file), every block written.
    volume: u64,
    /// The cap and resume volume, every block written; long enough to
    /// outlast the cap window at the cap rate.
    cap_volume: u64,
    cap_rate: u64,
    cap_window: Duration,
    /// Seconds of each iperf3 run (after one omitted second).
    iperf_secs: u32,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            volume: 2 * GIB,
            cap_volume: 480 * MIB,
            cap_rate: 20 * MIB,
            cap_window: Duration::from_secs(20),
            iperf_secs: 5,
        }
    }

    fn quick() -> Self {
        Sizes {
            volume: 256 * MIB,
            cap_volume: 128 * MIB,
            cap_rate: 20 * MIB,
            cap_window: Duration::from_secs(4),
            iperf_secs: 2,
        }
    }
}

pub fn copy_bench(args: CopyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Err(e) = preflight() {
        eprintln!("cairn-bench copy: cannot run: {e:#}");
        std::process::exit(2);
    }
    let sizes = if args.quick { Sizes::quick() } else { Sizes::full() };
    remove_stale();
    let work = super::work_dir(args.dir.as_deref(), WORK_PREFIX)?;
    let dir = work.path().canonicalize()?;
    registry().dirs.push(dir.clone());
    let (images, need) = match place_images(&sizes) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("cairn-bench copy: cannot run: {e:#}");
            drop(work);
            std::process::exit(2);
        }
    };
    let need = need + 3 * sizes.volume + 512 * MIB;
    let free = free_bytes(&dir).unwrap_or(u64::MAX);
    if free < need {
        let _ = std::fs::remove_dir_all(&images);
        eprintln!(
            "cairn-bench copy: cannot run: it needs about {:.1} GiB free in {} and there are \
             {:.1} GiB; free some or give --dir on a roomier file system",
            need as f64 / GIB as f64,
            dir.display(),
            free as f64 / GIB as f64
        );
        drop(work);
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.spawn(clean_up_on_signal());
    let mut figures = Figures::default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "load average at the start ({cores} cores; other work on the host skews the figures): {}",
        loadavg()
    );
    let res = rt.block_on(run(&dir, &images, sizes, args.quick, &mut figures));
    eprintln!("\nload average at the end: {}", loadavg());
    if let Err(e) = std::fs::remove_dir_all(&images)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("cleanup: removing {}: {e}", images.display());
    }
    registry().dirs.retain(|d| d != &images);
    if let Err(e) = &res {
        eprintln!("cairn-bench copy: failed: {e:#}");
    }
    figures.summary();
    registry().dirs.retain(|d| d != &dir);
    let closed = if args.keep {
        eprintln!("kept the work directory {}", work.keep().display());
        Ok(())
    } else {
        work.close().context("removing the work directory")
    };
    eprintln!("total run time: {:.1} s", started.elapsed().as_secs_f64());
    res?;
    closed
}

/// Bytes available to an unprivileged writer on the file system of `path`.
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs is all zeros-valid plain data.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a statvfs we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context("statvfs");
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The directory for the two image files rsync works on: in /dev/shm (a
/// tmpfs, so RAM) when it has room, as the disk of this host is short;
/// else in the work directory. Returns it with the bytes it takes from the
/// work directory's file system.
fn place_images(s: &Sizes) -> anyhow::Result<(PathBuf, u64)> {
    let shm = Path::new("/dev/shm");
    let images = 2 * s.volume;
    let dir = shm.join(format!("{WORK_PREFIX}{}-images", std::process::id()));
    let (dir, on_disk) = if free_bytes(shm).is_ok_and(|f| f >= images + GIB) {
        (dir, 0)
    } else {
        (std::env::temp_dir().join(dir.file_name().expect("a name")), images)
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    registry().dirs.push(dir.clone());
    Ok((dir, on_disk))
}

// ---------------------------------------------------------------- figures

struct Figure {
    name: &'static str,
    value: f64,
    target: &'static str,
    ok: bool,
}

#[derive(Default)]
struct Figures(Vec<Figure>);

impl Figures {
    /// Prints the figure line (stdout) and its target (stderr).
    fn add(&mut self, name: &'static str, value: f64, prec: usize, target: &'static str) {
        println!("figure {name} {value:.prec$}");
        let (op, t) = target.split_at(target.find(|c: char| c.is_ascii_digit()).unwrap_or(0));
        let t: f64 = t.parse().unwrap_or(f64::NAN);
        let ok = match op.trim() {
            "<=" => value <= t,
            ">=" => value >= t,
            _ => false,
        };
        eprintln!(
            "  => {name} = {value:.prec$}   target {target}   {}",
            if ok { "ok" } else { "MISSED" }
        );
        self.0.push(Figure { name, value, target, ok });
    }

    fn summary(&self) {
        if self.0.is_empty() {
            return;
        }
        eprintln!("\nsummary:");
        for f in &self.0 {
            eprintln!(
                "  {:<24} {:>10.3}   target {:<7} {}",
                f.name,
                f.value,
                f.target,
                if f.ok { "ok" } else { "MISSED" }
            );
        }
    }
}

// ------------------------------------------------ preflight and clean-up

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cairn-bench copy needs root (network namespaces, veth pairs, tc); run it as root");
    }
    let missing: Vec<&str> = ["rsync", "iperf3"].into_iter().filter(|t| !on_path(t)).collect();
    if !missing.is_empty() {
        bail!(
            "cairn-bench copy needs rsync and iperf3, and {} missing: install with apt-get \
             install rsync iperf3",
            match missing.as_slice() {
                [one] => format!("{one} is"),
                _ => format!("{} are", missing.join(" and ")),
            }
        );
    }
    for tool in ["ip", "tc"] {
        if !on_path(tool) {
            bail!(
                "cairn-bench copy needs `{tool}` (iproute2): install with apt-get install iproute2"
            );
        }
    }
    if let Some(why) = cairn_e2e::netns::unavailable() {
        bail!("network namespaces are not available: {why}");
    }
    Ok(())
}

/// What exists now that an interrupted run must remove: namespaces, the
/// root ends of the management links, processes started here, the work
/// directory.
#[derive(Debug, Default)]
struct Registry {
    netns: Vec<String>,
    links: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: Vec::new(),
    links: Vec::new(),
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT or SIGTERM: kills what was started here, removes the
/// namespaces and the work directory, and exits (130).
async fn clean_up_on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("\ncairn-bench copy: interrupted; cleaning up");
    let r = std::mem::take(&mut *registry());
    for pid in r.pids {
        // SAFETY: kill only sends a signal, to a child this process started
        // and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(200));
    for ns in r.netns {
        let _ = ip(&["netns", "del", &ns]);
    }
    for l in r.links {
        let _ = ip(&["link", "del", &l]);
    }
    for d in r.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    std::process::exit(130);
}

/// Removes what a run killed with SIGKILL left: its namespaces (named
/// after its pid, which is gone), the processes it started in them (agents,
/// daemons: nothing else runs there), its work directory and its image
/// files.
fn remove_stale() {
    for parent in [Path::new("/dev/shm").to_path_buf(), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(WORK_PREFIX).and_then(|r| r.strip_suffix("-images"))
            else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("removing {}, left by an earlier run", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let Some((pid, side)) = rest.split_once('-') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing namespace {name}, left by an earlier run (pid {pid} is gone)");
        let pids = ip(&["netns", "pids", name]).unwrap_or_default();
        for p in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // A work directory of the run, from an agent's --data-dir.
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into()).collect();
            let work = args
                .iter()
                .position(|a| a == "--data-dir")
                .and_then(|i| args.get(i + 1))
                .and_then(|d| Path::new(d).parent().map(Path::to_path_buf))
                .filter(|w| {
                    w.file_name().is_some_and(|n| n.to_string_lossy().starts_with(WORK_PREFIX))
                });
            eprintln!("  killing pid {p} in it: {}", args.join(" "));
            // SAFETY: kill only sends a signal, to a process inside a
            // namespace only this bench makes, left by a run that is gone.
            unsafe { libc::kill(p, libc::SIGKILL) };
            if let Some(w) = work {
                std::thread::sleep(Duration::from_millis(200));
                eprintln!("  removing its work directory {}", w.display());
                let _ = std::fs::remove_dir_all(w);
            }
        }
        let _ = ip(&["netns", "del", name]);
        let _ = Command::new("ip")
            .args(["link", "del", &format!("cpm{pid}{side}")])
            .stderr(Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------ the sites

/// Runs a command, failing with its stderr; returns its stdout.
fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run_cmd(Command::new("ip").args(args))
}

/// A command run inside namespace `ns`.
fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Moves the calling thread into namespace `ns` (sockets it opens from
/// then on belong there).
fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns with a namespace file's open descriptor changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
    }
    Ok(())
}

/// Two namespaces joined by a veth pair (A's end `a_dev`, B's `b_dev`), and
/// a management veth from the root namespace to each. Everything made is
/// removed on drop, also after a failure half-way.
#[derive(Debug)]
struct Sites {
    a: String,
    b: String,
    a_dev: String,
    b_dev: String,
    a_data: Ipv4Addr,
    b_data: Ipv4Addr,
    a_mgmt: Ipv4Addr,
    b_mgmt: Ipv4Addr,
    made_ns: Vec<String>,
    made_links: Vec<String>,
}

impl Sites {
    fn new() -> anyhow::Result<Self> {
        let pid = std::process::id();
        // A /28 of 10.100.0.0/14 from the pid: data .0/30, management A
        // .4/30, management B .8/30.
        let base = (pid % 16384) * 16;
        let addr = |k: u32| {
            let v = base + k;
            Ipv4Addr::new(10, 100 + (v >> 16) as u8, (v >> 8) as u8, v as u8)
        };
        let in_use = ip(&["-4", "-o", "addr", "show"])?;
        for k in [1, 2, 5, 6, 9, 10] {
            let a = format!("inet {}/", addr(k));
            if in_use.contains(&a) {
                bail!("address {} is already in use on this host; run again", addr(k));
            }
        }
        let mut s = Sites {
            a: format!("{NS_PREFIX}{pid}-a"),
            b: format!("{NS_PREFIX}{pid}-b"),
            a_dev: format!("cpd{pid}a"),
            b_dev: format!("cpd{pid}b"),
            a_data: addr(1),
            b_data: addr(2),
            a_mgmt: addr(6),
            b_mgmt: addr(10),
            made_ns: Vec::new(),
            made_links: Vec::new(),
        };
        for ns in [s.a.clone(), s.b.clone()] {
            ip(&["netns", "add", &ns])?;
            registry().netns.push(ns.clone());
            s.made_ns.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (a, b) = (s.a.clone(), s.b.clone());
        ip(&[
            "link", "add", &s.a_dev, "netns", &a, "type", "veth", "peer", "name", &s.b_dev,
            "netns", &b,
        ])?;
        for (ns, dev, addr) in [(&a, &s.a_dev, s.a_data), (&b, &s.b_dev, s.b_data)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for (ns, side, root_k, ns_k) in [(&a, 'a', 5, 6), (&b, 'b', 9, 10)] {
            let root_end = format!("cpm{pid}{side}");
            ip(&["link", "add", &root_end, "type", "veth", "peer", "name", "mgmt", "netns", ns])?;
            registry().links.push(root_end.clone());
            s.made_links.push(root_end.clone());
            ip(&["addr", "add", &format!("{}/30", addr(root_k)), "dev", &root_end])?;
            ip(&["link", "set", &root_end, "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/30", addr(ns_k)), "dev", "mgmt"])?;
            ip(&["-n", ns, "link", "set", "mgmt", "up"])?;
        }
        Ok(s)
    }

    /// Shapes A -> B to `mbit` Mbit/s with a token bucket filter on A's end.
    fn cap(&self, mbit: u64) -> anyhow::Result<()> {
        // A bucket of 4 ms of the rate (at least 64 KiB, so a full-size GSO
        // packet fits), and up to 50 ms of queue.
        let burst = (mbit * 1_000_000 / 8 / 250).max(64 * 1024);
        let (rate, burst) = (format!("{mbit}mbit"), burst.to_string());
        let (ns, dev) = (self.a.as_str(), self.a_dev.as_str());
        let args = ["-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate];
        run_cmd(Command::new("tc").args(args).args(["burst", &burst, "latency", "50ms"]))
            .context("tc tbf (is the sch_tbf module available?)")?;
        eprintln!(
            "  data link A -> B capped at {mbit} Mbit/s (tc tbf, burst {burst} B, latency 50 ms)"
        );
        Ok(())
    }

    fn uncap(&self) -> anyhow::Result<()> {
        let out = Command::new("tc")
            .args(["-n", &self.a, "qdisc", "del", "dev", &self.a_dev, "root"])
            .output()?;
        // Deleting the default qdisc fails harmlessly.
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("Cannot delete")
        {
            bail!("tc qdisc del: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        eprintln!("  data link uncapped");
        Ok(())
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        let link = |ns: &str, dev: &str| -> anyhow::Result<serde_json::Value> {
            let out = ip(&["-n", ns, "-j", "-s", "link", "show", "dev", dev])?;
            let v: serde_json::Value = serde_json::from_str(&out).context("ip -j output")?;
            Ok(v[0]["stats64"]["tx"].clone())
        };
        let num = |v: &serde_json::Value, k: &str| {
            v[k].as_u64().with_context(|| format!("no tx {k} in `ip -s -j link`"))
        };
        let a = link(&self.a, &self.a_dev)?;
        let b = link(&self.b, &self.b_dev)?;
        let (ns, dev) = (self.a.as_str(), self.a_dev.as_str());
        let q =
            run_cmd(Command::new("tc").args(["-n", ns, "-j", "-s", "qdisc", "show", "dev", dev]))?;
        let q: serde_json::Value = serde_json::from_str(&q).context("tc -j output")?;
        let qdisc = q
            .as_array()
            .and_then(|qs| qs.iter().find(|x| x["kind"] == "tbf"))
            .and_then(|x| x["bytes"].as_u64());
        Ok(Counters {
            a_tx: num(&a, "bytes")?,
            a_packets: num(&a, "packets")?,
            b_tx: num(&b, "bytes")?,
            tbf: qdisc,
        })
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for ns in &self.made_ns {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
        // Normally gone with their namespace's end.
        for l in &self.made_links {
            let _ = Command::new("ip").args(["link", "del", l]).stderr(Stdio::null()).status();
        }
        let mut r = registry();
        r.netns.retain(|n| !self.made_ns.contains(n));
        r.links.retain(|l| !self.made_links.contains(l));
    }
}

/// Transmit counters of the data link's two ends.
#[derive(Debug, Clone, Copy)]
struct Counters {
    /// A's end (A -> B: the copy's data): bytes and packets as the veth
    /// counts them (a GSO packet is one packet, headers once).
    a_tx: u64,
    a_packets: u64,
    /// B's end (acknowledgements, replies).
    b_tx: u64,
    /// Bytes A's tbf queue sent, when one is installed: it counts every
    /// segment's headers, as a 1500-byte-MTU wire carries them.
    tbf: Option<u64>,
}

impl Counters {
    fn since(&self, before: &Counters) -> Counters {
        Counters {
            a_tx: self.a_tx - before.a_tx,
            a_packets: self.a_packets - before.a_packets,
            b_tx: self.b_tx - before.b_tx,
            tbf: self.tbf.zip(before.tbf).map(|(n, b)| n - b),
        }
    }
}

/// A process started here (a daemon in a namespace), killed on drop.
#[derive(Debug)]
struct Daemon {
    what: &'static str,
    child: Child,
}

impl Daemon {
    fn spawn(what: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        registry().pids.push(child.id());
        Ok(Daemon { what, child })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        if let Err(e) = self.child.wait() {
            eprintln!("cleanup: waiting for {} (pid {pid}): {e}", self.what);
        }
        registry().pids.retain(|p| *p != pid);
    }
}

/// An agent in a site's namespace, listening on all its addresses; the
/// bench reaches it at its management address, the other site at its data
/// address.
#[derive(Debug)]
struct SiteAgent {
    name: &'static str,
    ns: String,
    dir: PathBuf,
    data: Ipv4Addr,
    mgmt: SocketAddr,
    process: Option<AgentProcess>,
}

impl SiteAgent {
    fn start(
        name: &'static str,
        ns: &str,
        dir: PathBuf,
        data: Ipv4Addr,
        mgmt: Ipv4Addr,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut a = SiteAgent {
            name,
            ns: ns.to_string(),
            dir,
            data,
            mgmt: SocketAddr::from((mgmt, AGENT_PORT)),
            process: None,
        };
        a.restart()?;
        Ok(a)
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        let listen = SocketAddr::from(([0, 0, 0, 0], AGENT_PORT));
        let p = AgentProcess::start_in_netns(&self.ns, &self.dir, self.name, listen, &[])
            .with_context(|| format!("starting agent {} in {}", self.name, self.ns))?;
        registry().pids.push(p.pid());
        eprintln!("  {}: pid {} in {}, {}", self.name, p.pid(), self.ns, self.endpoint());
        self.process = Some(p);
        Ok(())
    }

    fn take(&mut self) -> anyhow::Result<AgentProcess> {
        let p = self.process.take().with_context(|| format!("{} is not running", self.name))?;
        registry().pids.retain(|x| *x != p.pid());
        Ok(p)
    }

    fn kill9(&mut self) -> anyhow::Result<()> {
        self.take()?.kill9()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        self.take()?.terminate()
    }

    /// Its endpoint as the other site (and its own heads) reach it.
    fn endpoint(&self) -> String {
        format!("http://{}:{AGENT_PORT}", self.data)
    }

    async fn heads(&self) -> anyhow::Result<HeadsClient> {
        Ok(HeadsClient::new(cairn_e2e::channel(self.mgmt).await?)
            .max_decoding_message_size(cairn_e2e::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cairn_e2e::MAX_MESSAGE_BYTES))
    }

    async fn receiver(&self) -> anyhow::Result<CopyClient> {
        Ok(CopyClient::new(cairn_e2e::channel(self.mgmt).await?))
    }

    async fn store(&self) -> anyhow::Result<AgentClient> {
        cairn_e2e::connect(self.mgmt).await
    }
}

impl Drop for SiteAgent {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            registry().pids.retain(|x| *x != p.pid());
        }
    }
}

/// A [`DelayProxy`] running on a thread of its own inside a namespace.
#[derive(Debug)]
struct NsProxy {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl NsProxy {
    fn start(
        ns: &str,
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || -> u64 {
            let rt = match enter_netns(&ns).and_then(|()| {
                Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
            }) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return 0;
                }
            };
            rt.block_on(async move {
                match DelayProxy::start_on(listen, target, delay).await {
                    Ok(p) => {
                        let _ = ready_tx.send(Ok(p.addr()));
                        let _ = stopped.await;
                        p.forwarded()
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e).context("proxy bind")));
                        0
                    }
                }
            })
        });
        let addr = ready_rx.recv().context("the proxy thread ended")??;
        Ok(NsProxy { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// Stops it; the bytes it forwarded (both directions).
    fn stop(&mut self) -> u64 {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread.take().map(|t| t.join().unwrap_or(0)).unwrap_or(0)
    }
}

impl Drop for NsProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Samples the transmit byte counter of a device of namespace `ns` every
/// few milliseconds from a thread inside it (`/proc/thread-self/net/dev`
/// is the thread's namespace's), to see when a copy's data was on the link.
#[derive(Debug)]
struct TxSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<(Instant, u64)>>>,
}

impl TxSampler {
    fn start(ns: &str, dev: &str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, dev, halt) = (ns.to_string(), format!("{dev}:"), stop.clone());
        let thread = std::thread::spawn(move || {
            enter_netns(&ns)?;
            let mut samples = Vec::new();
            loop {
                let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
                // After the name: 8 receive fields, then transmit bytes.
                let tx = text
                    .lines()
                    .find_map(|l| l.trim_start().strip_prefix(dev.as_str()))
                    .and_then(|rest| rest.split_whitespace().nth(8))
                    .and_then(|v| v.parse::<u64>().ok())
                    .with_context(|| format!("no {dev} in /proc/net/dev of {ns}"))?;
                samples.push((Instant::now(), tx));
                if halt.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(samples);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        TxSampler { stop, thread }
    }

    fn finish(self) -> anyhow::Result<Vec<(Instant, u64)>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().map_err(|_| anyhow::anyhow!("the sampler thread panicked"))?
    }
}

/// Where a copy's time went, from when its bytes crossed A's end of the
/// data link: before the first 64 KiB (start-up), between that and the
/// last but 16 KiB (transfer, with the rate on the link), after (tail).
fn phases(called: Instant, returned: Instant, samples: &[(Instant, u64)]) -> String {
    // From the last sample before the call on.
    let from = samples.iter().rposition(|(t, _)| *t <= called).unwrap_or(0);
    let samples = &samples[from..];
    let (Some(&(_, base)), Some(&(_, last))) = (samples.first(), samples.last()) else {
        return "no samples".into();
    };
    // The first packet (the connection's SYN) goes once the sender has
    // counted the blocks and taken the digest; data follows the
    // receiver's answer.
    let any = samples.iter().find(|(_, b)| *b > base).map_or(called, |s| s.0);
    let first = samples.iter().find(|(_, b)| b.saturating_sub(base) >= 64 * 1024);
    let done = samples.iter().find(|(_, b)| last.saturating_sub(*b) < 16 * 1024);
    let (Some(&(t0, b0)), Some(&(t1, b1))) = (first, done) else {
        return "the link carried too little to tell".into();
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "start-up {:.0} ms until data is on the link ({:.0} ms before the first packet: the \
         sender's block count and digest; {:.0} ms from there: connection, the receiver's \
         set-up, first reads), transfer {:.0} ms ({:.1} MiB on the link at {}), tail {:.0} ms \
         (after the data left A: the receiver's last writes, flush, digest, seal and answer)",
        ms(t0.saturating_duration_since(called)),
        ms(any.saturating_duration_since(called)),
        ms(t0.saturating_duration_since(any)),
        ms(t1.saturating_duration_since(t0)),
        mib(b1.saturating_sub(b0)),
        mb_s(b1.saturating_sub(b0) as f64 / secs(t1.saturating_duration_since(t0)).max(1e-6)),
        ms(returned.saturating_duration_since(t1))
    )
}

// -------------------------------------------------------------- helpers

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn mb_s(bytes_per_sec: f64) -> String {
    format!("{:.1} MB/s ({:.0} Mbit/s)", bytes_per_sec / 1e6, bytes_per_sec * 8.0 / 1e6)
}

fn open_request(
    volume: &str,
    size: u64,
    agent: &SiteAgent,
    role: pb::VolumeRole,
    epoch: u64,
) -> pb::OpenHeadRequest {
    pb::OpenHeadRequest {
        epoch,
        role: role as i32,
        ..cairn_e2e::open_head_request(
            volume,
            size,
            CHUNK,
            1,
            [(agent.name.to_string(), agent.endpoint())],
        )
    }
}

fn copy_request(
    volume: &str,
    snapshot: &str,
    base: &str,
    link: &str,
    endpoint: &str,
    rate: u64,
) -> pb::CopySnapshotRequest {
    pb::CopySnapshotRequest {
        volume_id: volume.into(),
        snapshot_id: snapshot.into(),
        base_snapshot_id: base.into(),
        link_id: link.into(),
        pairing_secret: Bytes::from_static(SECRET),
        target_endpoint: endpoint.into(),
        rate_bytes_per_sec: rate,
        source: pb::SourceSelection::Primary as i32,
        // Every figure is measured without compression.
        compression: pb::Compression::None as i32,
        ..Default::default()
    }
}

/// 4 MiB of the image at piece `i` (seeded per volume).
fn piece(seed: u64, i: u64) -> Vec<u8> {
    pattern(seed.wrapping_mul(0x1_0000_0001).wrapping_add(i), (4 * MIB) as usize)
}

/// Writes every block of `volume` (4 MiB writes, 4 in flight), and the
/// same bytes to `image` if given; then flushes.
async fn fill(
    heads: &HeadsClient,
    volume: &str,
    size: u64,
    seed: u64,
    image: Option<Arc<File>>,
) -> anyhow::Result<()> {
    let mut writes = futures::stream::iter((0..size.div_ceil(4 * MIB)).map(|i| {
        let mut h = heads.clone();
        let image = image.clone();
        async move {
            let off = i * 4 * MIB;
            let mut data = piece(seed, i);
            data.truncate((size - off).min(4 * MIB) as usize);
            if let Some(f) = image {
                f.write_all_at(&data, off).context("writing the image file")?;
            }
            let req = pb::HeadWriteRequest {
                volume_id: volume.into(),
                offset: off,
                data: data.into(),
                ..Default::default()
            };
            h.head_write(req).await.with_context(|| format!("writing {volume} at {off}"))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(4);
    while let Some(r) = writes.next().await {
        r?;
    }
    heads
        .clone()
        .head_flush(pb::HeadFlushRequest { volume_id: volume.into(), ..Default::default() })
        .await?;
    Ok(())
}

/// Rewrites 1% of `volume`'s blocks, picked at random by `seed`, with new
/// random bytes (the same in `image` if given); the blocks, ascending.
async fn rewrite(
    heads: &HeadsClient,
    volume: &str,
    size: u64,
    seed: u64,
    image: Option<&File>,
) -> anyhow::Result<Vec<u64>> {
    let blocks = size / BS;
    let n = (blocks * CHANGED_PER_MILLE).div_ceil(1000);
    let mut picked =
        rand::seq::index::sample(&mut StdRng::seed_from_u64(seed), blocks as usize, n as usize)
            .into_iter()
            .map(|b| b as u64)
            .collect::<Vec<_>>();
    picked.sort_unstable();
    let content = |b: u64| pattern((seed << 40) ^ b ^ 0xB10C, BS as usize);
    if let Some(f) = image {
        for &b in &picked {
            f.write_all_at(&content(b), b * BS).context("rewriting the image file")?;
        }
    }
    let mut writes = futures::stream::iter(picked.iter().map(|&b| {
        let mut h = heads.clone();
        let req = pb::HeadWriteRequest {
            volume_id: volume.into(),
            offset: b * BS,
            data: content(b).into(),
            ..Default::default()
        };
        async move { h.head_write(req).await }
    }))
    .buffer_unordered(32);
    while let Some(r) = writes.next().await {
        r.with_context(|| format!("rewriting blocks of {volume}"))?;
    }
    drop(writes);
    Ok(picked)
}

async fn snapshot(
    heads: &HeadsClient,
    volume: &str,
    id: &str,
    generation: u64,
) -> anyhow::Result<Vec<u8>> {
    let req = pb::HeadSnapshotRequest {
        volume_id: volume.into(),
        snapshot_id: id.into(),
        generation,
        ..Default::default()
    };
    let r = heads.clone().head_snapshot(req).await.with_context(|| format!("snapshot {id}"))?;
    Ok(r.into_inner().digest.to_vec())
}

/// Runs one CopySnapshot; the response and the call's wall time.
async fn copy(
    heads: &HeadsClient,
    req: pb::CopySnapshotRequest,
) -> anyhow::Result<(pb::CopySnapshotResponse, f64)> {
    let what =
        format!("copying {} of {} over link {}", req.snapshot_id, req.volume_id, req.link_id);
    let t = Instant::now();
    let r = tokio::time::timeout(COPY_TIMEOUT, heads.clone().copy_snapshot(req))
        .await
        .with_context(|| format!("{what}: no answer within {COPY_TIMEOUT:?}"))?
        .with_context(|| what.clone())?
        .into_inner();
    Ok((r, secs(t.elapsed())))
}

async fn progress(heads: &HeadsClient, volume: &str) -> anyhow::Result<pb::CopyProgressResponse> {
    let req = pb::CopyProgressRequest { volume_id: volume.into(), ..Default::default() };
    Ok(heads.clone().get_copy_progress(req).await?.into_inner())
}

/// The digest of an image file, as the agents define a volume's.
fn file_digest(path: &Path, size: u64) -> anyhow::Result<Vec<u8>> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut acc = Accumulator::default();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 * MIB) as usize;
        f.read_exact(&mut buf[..n])?;
        for (i, block) in buf[..n].chunks_exact(BS as usize).enumerate() {
            if !cairn_api::digest::is_zero(block) {
                acc.add(&BlockHash::of(off / BS + i as u64, block));
            }
        }
        off += n as u64;
    }
    Ok(acc.digest(size).0.to_vec())
}

/// CPU seconds (user + system, all threads) process `pid` has used.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("/proc/<pid>/stat has no ')'")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("no utime")?.parse::<u64>()?
        + f.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf only returns a number.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn hex(d: &[u8]) -> String {
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------ the bench

/// Everything one run sets up. Fields drop in order: the agents and
/// daemons before the namespaces they live in.
struct Rig {
    s: Sizes,
    dir: PathBuf,
    a1: SiteAgent,
    b1: SiteAgent,
    rsyncd: Option<Daemon>,
    src: HeadsClient,
    dst: HeadsClient,
    recv: CopyClient,
    image_a: PathBuf,
    image_b: PathBuf,
    /// Data bytes of a full copy of `src` (from the first full copy).
    full_bytes: u64,
    full_rate: f64,
    /// tx bytes of A's end / changed bytes, per incremental copy.
    wire: Vec<(&'static str, f64)>,
    sites: Sites,
}

async fn run(
    dir: &Path,
    images: &Path,
    s: Sizes,
    quick: bool,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    eprintln!(
        "cairn-bench copy: working in {}; the image files rsync works on in {}",
        dir.display(),
        images.display()
    );
    if quick {
        eprintln!(
            "quick mode: reduced sizes (smoke test); figures are not comparable with the targets"
        );
    }
    let sites = Sites::new().context("making the two sites")?;
    eprintln!(
        "\n== set-up: site A = netns {} ({}), site B = netns {} ({}), joined by veth {} <-> {}; \
         the bench reaches the agents over management veths ({}, {})",
        sites.a,
        sites.a_data,
        sites.b,
        sites.b_data,
        sites.a_dev,
        sites.b_dev,
        sites.a_mgmt,
        sites.b_mgmt
    );
    let a1 = SiteAgent::start("a1", &sites.a, dir.join("a1"), sites.a_data, sites.a_mgmt)?;
    let b1 = SiteAgent::start("b1", &sites.b, dir.join("b1"), sites.b_data, sites.b_mgmt)?;
    let (src, dst, recv) = (a1.heads().await?, b1.heads().await?, b1.receiver().await?);
    let site_a = images.join("site-a");
    let site_b = images.join("site-b-rsync");
    std::fs::create_dir_all(&site_a)?;
    std::fs::create_dir_all(&site_b)?;
    let mut rig = Rig {
        s,
        dir: dir.to_path_buf(),
        a1,
        b1,
        rsyncd: None,
        src,
        dst,
        recv,
        image_a: site_a.join("image.img"),
        image_b: site_b.join("image.img"),
        full_bytes: 0,
        full_rate: 0.0,
        wire: Vec::new(),
        sites,
    };
    rig.set_up().await?;
    rig.full_copies(figures).await?;
    rig.incremental_vs_rsync(figures).await?;
    rig.incremental_at_100mbit(figures).await?;
    rig.cap(figures).await?;
    rig.resume(figures).await?;
    eprintln!("\n== tear-down");
    rig.rsyncd = None;
    let mut first = None;
    for a in [&mut rig.a1, &mut rig.b1] {
        if let Err(e) = a.terminate() {
            eprintln!("cleanup: stopping {}: {e:#}", a.name);
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

impl Rig {
    async fn open_remote(&mut self, volume: &str, size: u64, link: &str) -> anyhow::Result<()> {
        let req = open_request(volume, size, &self.b1, pb::VolumeRole::Remote, 1);
        self.dst.open_head(req).await.with_context(|| format!("opening {volume} at B"))?;
        let register = pb::RegisterLinkRequest {
            link_id: link.into(),
            pairing_secret: Bytes::from_static(SECRET),
            target_volume_id: volume.into(),
            ..Default::default()
        };
        self.recv.register_link(register).await.with_context(|| format!("registering {link}"))?;
        Ok(())
    }

    /// Closes a remote volume's head and deletes its replica (disk space).
    async fn drop_remote(&mut self, volume: &str) -> anyhow::Result<()> {
        let close = pb::CloseHeadRequest { volume_id: volume.into(), ..Default::default() };
        self.dst.close_head(close).await.with_context(|| format!("closing {volume} at B"))?;
        let del = pb::DeleteReplicaRequest { volume_id: volume.into(), ..Default::default() };
        self.b1.store().await?.delete_replica(del).await?;
        Ok(())
    }

    /// A copy with A's transmit counter sampled: the response, the call's
    /// wall time and where that time went.
    async fn traced_copy(
        &self,
        req: pb::CopySnapshotRequest,
    ) -> anyhow::Result<(pb::CopySnapshotResponse, f64, String)> {
        let sampler = TxSampler::start(&self.sites.a, &self.sites.a_dev);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let called = Instant::now();
        let res = copy(&self.src, req).await;
        let returned = Instant::now();
        let samples = sampler.finish()?;
        let (r, t) = res?;
        Ok((r, t, phases(called, returned, &samples)))
    }

    fn receiver_endpoint(&self) -> String {
        self.b1.endpoint()
    }

    async fn set_up(&mut self) -> anyhow::Result<()> {
        let s = self.s;
        let req = open_request(SRC, s.volume, &self.a1, pb::VolumeRole::Primary, 1);
        self.src.open_head(req).await.context("opening src at A")?;
        self.open_remote(DST, s.volume, "main").await?;
        let image = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&self.image_a)
                .context("creating the image file")?,
        );
        let t = Instant::now();
        fill(&self.src, SRC, s.volume, 1, Some(image.clone())).await?;
        image.sync_data()?;
        let d1 = snapshot(&self.src, SRC, "s1", 1).await?;
        eprintln!(
            "  {SRC}: {} MiB volume, every block written ({:.1} s, with the same bytes to {}), \
             snapshot s1 (digest {}..)",
            s.volume / MIB,
            secs(t.elapsed()),
            self.image_a.display(),
            hex(&d1)
        );
        Ok(())
    }

    /// Runs iperf3 from A to B over the data link; the receiver's rate in
    /// bytes per second.
    fn iperf(&self) -> anyhow::Result<f64> {
        let mut last = String::new();
        for attempt in 1..=3 {
            match self.iperf_once()? {
                Ok(rate) => {
                    eprintln!(
                        "  iperf3 A -> B, {} s (first second omitted): {} received",
                        self.s.iperf_secs,
                        mb_s(rate)
                    );
                    return Ok(rate);
                }
                Err(why) => {
                    eprintln!("  iperf3 attempt {attempt} gave no result: {why}");
                    last = why;
                }
            }
        }
        bail!("iperf3 gave no result in 3 attempts: {last}")
    }

    /// One iperf3 run with a fresh server: the receiver's rate in bytes per
    /// second, or why there is none.
    fn iperf_once(&self) -> anyhow::Result<Result<f64, String>> {
        let sites = &self.sites;
        let (port, b) = (IPERF_PORT.to_string(), sites.b_data.to_string());
        let _server = Daemon::spawn(
            "iperf3 -s",
            in_ns(&sites.b, "iperf3").args(["-s", "-1", "-p", &port, "-B", &b]),
        )?;
        let secs = self.s.iperf_secs.to_string();
        let args = ["-c", &b, "-p", &port, "-t", &secs, "-O", "1", "-J"];
        // The server may not listen yet. With -J, iperf3 exits 0 even when
        // it could not connect: the JSON says.
        let mut tries = 0;
        loop {
            let out = in_ns(&sites.a, "iperf3").args(args).stdin(Stdio::null()).output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(Ok(bps / 8.0));
            }
            let why = match v["error"].as_str() {
                Some(e) => e.to_string(),
                None => text.chars().take(300).collect(),
            };
            tries += 1;
            if !why.contains("unable to connect") || tries >= 30 {
                return Ok(Err(why));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// full_copy_link_ratio and delay_throughput_ratio, at 1 Gbit/s.
    async fn full_copies(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        eprintln!("\n== full copy at a 1 Gbit/s cap, without and with {DELAY:?} each way");
        self.sites.cap(1000)?;
        let link = self.iperf()?;
        super::settle();
        let endpoint = self.receiver_endpoint();
        let before = self.sites.counters()?;
        let (r, t) = copy(&self.src, copy_request(SRC, "s1", "", "main", &endpoint, 0)).await?;
        let wire = self.sites.counters()?.since(&before);
        ensure!(!r.already_present && r.resumed_from_block == 0, "not a fresh full copy: {r:?}");
        self.full_bytes = r.bytes_sent;
        self.full_rate = r.bytes_sent as f64 / t;
        eprintln!(
            "  full copy s1: {:.0} MiB of block data in {t:.2} s (agent: {} ms) = {}; A sent {:.0} \
             MiB on the link",
            mib(r.bytes_sent),
            r.elapsed_ms,
            mb_s(self.full_rate),
            mib(wire.a_tx)
        );
        eprintln!("  link rate (iperf3): {}; target >= 0.85 of it", mb_s(link));
        figures.add("full_copy_link_ratio", self.full_rate / link, 3, ">=0.85");

        self.open_remote(DST_DELAY, self.s.volume, "delayed").await?;
        let listen = SocketAddr::from((self.sites.b_data, PROXY_PORT));
        let target = SocketAddr::from(([127, 0, 0, 1], AGENT_PORT));
        let mut proxy = NsProxy::start(&self.sites.b, listen, target, DELAY)?;
        eprintln!(
            "  delay proxy in site B on {} -> b1 ({DELAY:?} each way, {:?} round trip added)",
            proxy.addr,
            DELAY * 2
        );
        super::settle();
        let endpoint = format!("http://{}", proxy.addr);
        let (rd, td) =
            copy(&self.src, copy_request(SRC, "s1", "", "delayed", &endpoint, 0)).await?;
        let forwarded = proxy.stop();
        ensure!(rd.bytes_sent == r.bytes_sent, "the delayed copy sent {} bytes", rd.bytes_sent);
        let delayed = rd.bytes_sent as f64 / td;
        eprintln!(
            "  full copy s1 through the delay: {td:.2} s = {} (proxy forwarded {:.0} MiB); \
             without: {}",
            mb_s(delayed),
            mib(forwarded),
            mb_s(self.full_rate)
        );
        figures.add("delay_throughput_ratio", delayed / self.full_rate, 3, ">=0.9");
        self.drop_remote(DST_DELAY).await?;
        self.sites.uncap()?;
        Ok(())
    }

    /// Starts the rsync daemon in site B and waits until it answers.
    fn start_rsyncd(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.join("rsyncd.conf");
        let module_dir = self.image_b.parent().context("image path")?;
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = 0\ngid = 0\n[cairn]\npath = {}\nread only = false\n",
                module_dir.display()
            ),
        )?;
        let log = self.dir.join("rsyncd.log");
        self.rsyncd = Some(Daemon::spawn(
            "rsync --daemon",
            in_ns(&self.sites.b, "rsync")
                .arg("--daemon")
                .arg("--no-detach")
                .arg(format!("--config={}", conf.display()))
                .arg(format!("--address={}", self.sites.b_data))
                .arg(format!("--port={RSYNC_PORT}"))
                .arg(format!("--log-file={}", log.display())),
        )?);
        let url = format!("rsync://{}:{RSYNC_PORT}/", self.sites.b_data);
        for _ in 0..50 {
            let ok = in_ns(&self.sites.a, "rsync")
                .arg(&url)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success();
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the rsync daemon in site B does not answer at {url} (see {})", log.display())
    }

    /// incr_vs_rsync_speedup, link uncapped.
    async fn incremental_vs_rsync(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        let s = self.s;
        eprintln!(
            "\n== incremental copy vs rsync --inplace --no-whole-file, link uncapped for both"
        );
        let t = Instant::now();
        std::fs::copy(&self.image_a, &self.image_b).context("copying the image to site B")?;
        // An hour older than the source, as a previous version is: rsync's
        // quick check (size and mtime) must not take the files for equal.
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        File::options().write(true).open(&self.image_b)?.set_modified(old)?;
        eprintln!(
            "  site B's rsync module holds the image as of s1 ({:.1} s to copy it)",
            secs(t.elapsed())
        );
        self.start_rsyncd()?;
        let image = OpenOptions::new().write(true).open(&self.image_a)?;
        let changed = rewrite(&self.src, SRC, s.volume, 11, Some(&image)).await?;
        image.sync_data()?;
        drop(image);
        let d2 = snapshot(&self.src, SRC, "s2", 2).await?;
        let changed_bytes = changed.len() as u64 * BS;
        eprintln!(
            "  rewrote {} random blocks of 4 KiB ({:.2}% of {}; {:.1} MiB) in the volume and in \
             the image; snapshot s2",
            changed.len(),
            changed.len() as f64 * 100.0 / (s.volume / BS) as f64,
            s.volume / BS,
            mib(changed_bytes)
        );

        super::settle();
        let endpoint = self.receiver_endpoint();
        let before = self.sites.counters()?;
        let cpu = |a: &SiteAgent| a.process.as_ref().map_or(Ok(0.0), |p| cpu_secs(p.pid()));
        let cpu0 = (cpu(&self.a1)?, cpu(&self.b1)?);
        let (r, t_cairn, went) =
            self.traced_copy(copy_request(SRC, "s2", "s1", "main", &endpoint, 0)).await?;
        let cpu1 = (cpu(&self.a1)?, cpu(&self.b1)?);
        let wire = self.sites.counters()?.since(&before);
        ensure!(
            r.bytes_sent == changed_bytes,
            "the incremental copy sent {} data bytes, {changed_bytes} changed",
            r.bytes_sent
        );
        ensure!(r.digest.to_vec() == d2, "the copy's digest is not s2's");
        eprintln!(
            "  cairn: {:.3} s (agent: {} ms), {} blocks, {:.2} MiB of data; A sent {} B in {} \
             packets, B sent {} B",
            t_cairn,
            r.elapsed_ms,
            r.blocks_sent,
            mib(r.bytes_sent),
            wire.a_tx,
            wire.a_packets,
            wire.b_tx
        );
        eprintln!("  where the time went: {went}");
        eprintln!(
            "  CPU used during cairn's copy: a1 (sender) {:.0} ms, b1 (receiver) {:.0} ms, of \
             {:.0} ms; {} scattered blocks are {} runs, written through the receiver's head \
             up to 32 at a time ({:.0} us per block over the whole copy)",
            (cpu1.0 - cpu0.0) * 1e3,
            (cpu1.1 - cpu0.1) * 1e3,
            t_cairn * 1e3,
            changed.len(),
            changed.windows(2).filter(|w| w[1] != w[0] + 1).count() + 1,
            t_cairn * 1e6 / changed.len() as f64
        );
        self.wire.push(("uncapped", wire.a_tx as f64 / changed_bytes as f64));

        super::settle();
        let dest = format!("rsync://{}:{RSYNC_PORT}/cairn/image.img", self.sites.b_data);
        let before = self.sites.counters()?;
        let t = Instant::now();
        let out = run_cmd(
            in_ns(&self.sites.a, "rsync")
                .args(["--inplace", "--no-whole-file", "--stats"])
                .arg(&self.image_a)
                .arg(&dest),
        )
        .context("rsync")?;
        let t_rsync = secs(t.elapsed());
        let wire = self.sites.counters()?.since(&before);
        let stat = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().replace(',', ""))
                .unwrap_or_else(|| "?".into())
        };
        eprintln!(
            "  rsync: {t_rsync:.3} s; literal data {}, matched data {}, sent {}, received {}; A \
             sent {:.1} MiB on the link, B {:.1} MiB",
            stat("Literal data:"),
            stat("Matched data:"),
            stat("Total bytes sent:"),
            stat("Total bytes received:"),
            mib(wire.a_tx),
            mib(wire.b_tx)
        );
        // Both ends hold the same bytes as the volume: the comparison is fair.
        let t = Instant::now();
        let da = file_digest(&self.image_a, s.volume)?;
        let db = file_digest(&self.image_b, s.volume)?;
        ensure!(da == d2, "the image file in site A does not hold s2's bytes");
        ensure!(db == d2, "rsync's copy in site B does not hold s2's bytes");
        eprintln!(
            "  checked: both image files have s2's digest {}.. ({:.1} s)",
            hex(&d2),
            secs(t.elapsed())
        );
        eprintln!("  speedup = rsync {t_rsync:.3} s / cairn {t_cairn:.3} s");
        figures.add("incr_vs_rsync_speedup", t_rsync / t_cairn, 1, ">=15");
        self.rsyncd = None;
        for f in [&self.image_a, &self.image_b] {
            std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
        }
        Ok(())
    }

    /// incr_vs_ideal_ratio and wire_bytes_ratio, at 100 Mbit/s.
    async fn incremental_at_100mbit(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        let s = self.s;
        eprintln!("\n== incremental copy at a 100 Mbit/s cap");
        let changed = rewrite(&self.src, SRC, s.volume, 12, None).await?;
        let d3 = snapshot(&self.src, SRC, "s3", 3).await?;
        let changed_bytes = changed.len() as u64 * BS;
        eprintln!(
            "  rewrote another {} random blocks ({:.1} MiB); snapshot s3",
            changed.len(),
            mib(changed_bytes)
        );
        self.sites.cap(100)?;
        let link = self.iperf()?;
        super::settle();
        let endpoint = self.receiver_endpoint();
        let before = self.sites.counters()?;
        let (r, t, went) =
            self.traced_copy(copy_request(SRC, "s3", "s2", "main", &endpoint, 0)).await?;
        let wire = self.sites.counters()?.since(&before);
        ensure!(r.bytes_sent == changed_bytes, "sent {} data bytes", r.bytes_sent);
        ensure!(r.digest.to_vec() == d3, "the copy's digest is not s3's");
        let ideal = changed_bytes as f64 / link;
        eprintln!(
            "  cairn: {t:.3} s (agent: {} ms) for {:.2} MiB; ideal at the iperf3 rate ({}): \
             {ideal:.3} s",
            r.elapsed_ms,
            mib(changed_bytes),
            mb_s(link)
        );
        eprintln!("  where the time went: {went}");
        figures.add("incr_vs_ideal_ratio", t / ideal, 3, "<=1.15");

        let ratio = wire.a_tx as f64 / changed_bytes as f64;
        self.wire.push(("100 Mbit", ratio));
        eprintln!(
            "  wire: A's veth sent {} B in {} packets (avg {:.0} B: GSO packets, TCP/IP headers \
             once each), B's {} B",
            wire.a_tx,
            wire.a_packets,
            wire.a_tx as f64 / wire.a_packets.max(1) as f64,
            wire.b_tx
        );
        if let Some(q) = wire.tbf {
            eprintln!(
                "  (context) A's tbf queue sent {q} B = {:.4} x the changed bytes: it counts the \
                 headers of every 1500-byte segment, as a real 1500-MTU wire carries them",
                q as f64 / changed_bytes as f64
            );
        }
        let list =
            self.wire.iter().map(|(w, r)| format!("{w} {r:.4}")).collect::<Vec<_>>().join(", ");
        let worst = self.wire.iter().map(|(_, r)| *r).fold(f64::NAN, f64::max);
        eprintln!("  tx bytes of A's veth / changed bytes: {list}; the larger is the figure");
        figures.add("wire_bytes_ratio", worst, 4, "<=1.05");
        self.sites.uncap()?;
        Ok(())
    }

    /// cap_error_pct, link uncapped.
    async fn cap(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        let s = self.s;
        eprintln!(
            "\n== CopySnapshot's own limit at {:.1} MiB/s, link uncapped: a full copy of c1 \
             ({} MiB), achieved rate over {:?} from GetCopyProgress",
            mib(s.cap_rate),
            s.cap_volume / MIB,
            s.cap_window
        );
        let req = open_request(CAP_SRC, s.cap_volume, &self.a1, pb::VolumeRole::Primary, 1);
        self.src.open_head(req).await.context("opening cap-src at A")?;
        let t = Instant::now();
        fill(&self.src, CAP_SRC, s.cap_volume, 2, None).await?;
        snapshot(&self.src, CAP_SRC, "c1", 1).await?;
        eprintln!(
            "  {CAP_SRC}: {} MiB, every block written ({:.1} s), snapshot c1",
            s.cap_volume / MIB,
            secs(t.elapsed())
        );
        self.open_remote(DST_CAP, s.cap_volume, "capped").await?;
        super::settle();
        let endpoint = self.receiver_endpoint();
        let task = {
            let heads = self.src.clone();
            let req = copy_request(CAP_SRC, "c1", "", "capped", &endpoint, s.cap_rate);
            tokio::spawn(async move { copy(&heads, req).await })
        };
        let mut samples: Vec<(Instant, u64)> = Vec::new();
        let mut first: Option<Instant> = None;
        let window_end = loop {
            let p = progress(&self.src, CAP_SRC).await?;
            let now = Instant::now();
            if p.snapshot_id == "c1" && !p.done && p.bytes_sent > 0 {
                first.get_or_insert(now);
                samples.push((now, p.bytes_sent));
            }
            if let Some(f) = first
                && now >= f + Duration::from_secs(1) + s.cap_window
            {
                ensure!(!p.done, "the capped copy ended before the window did");
                break now;
            }
            if task.is_finished() {
                bail!("the capped copy ended before the window did: {:?}", task.await?);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (r, t) = task.await??;
        let first = first.expect("set before the window ends");
        let start = first + Duration::from_secs(1);
        let &(t0, b0) = samples.iter().find(|(t, _)| *t >= start).context("no sample")?;
        let &(t1, b1) =
            samples.iter().rev().find(|(t, _)| *t <= window_end).context("no sample")?;
        let achieved = (b1 - b0) as f64 / secs(t1 - t0);
        let per_second: Vec<String> = (0..s.cap_window.as_secs())
            .filter_map(|k| {
                let at = |d: u64| {
                    samples.iter().find(|(t, _)| *t >= start + Duration::from_secs(d)).copied()
                };
                let ((ta, ba), (tb, bb)) = (at(k)?, at(k + 1)?);
                Some(format!("{:.1}", mib(bb - ba) / secs(tb - ta)))
            })
            .collect();
        eprintln!(
            "  window {:.2} s from {:.2} s after the first bytes: {:.1} MiB sent = {:.3} MiB/s \
             (cap {:.3} MiB/s); {} samples",
            secs(t1 - t0),
            secs(t0 - first),
            mib(b1 - b0),
            achieved / MIB as f64,
            mib(s.cap_rate),
            samples.len()
        );
        eprintln!("  MiB/s per second of the window: {}", per_second.join(" "));
        eprintln!(
            "  the whole copy: {:.0} MiB in {t:.2} s = {:.3} MiB/s (start-up included)",
            mib(r.bytes_sent),
            mib(r.bytes_sent) / t
        );
        let err = (achieved - s.cap_rate as f64).abs() / s.cap_rate as f64 * 100.0;
        figures.add("cap_error_pct", err, 2, "<=5");
        self.drop_remote(DST_CAP).await?;
        Ok(())
    }

    /// resume_resent_mib, link uncapped: the sender is killed mid-copy.
    ///
    /// What is sent again depends on where the kill falls between two
    /// checkpoints, so after the measured kill (at half the data, as the
    /// figure is defined) the same copy is killed three more times at
    /// other points, for context.
    async fn resume(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        let s = self.s;
        let total = s.cap_volume;
        eprintln!(
            "\n== resume: a full copy of c1 ({} MiB), link uncapped, no limit; the sender a1 \
             killed with SIGKILL once half is sent, restarted, the copy asked for again (the \
             receiver checkpoints at its defaults: 8 MiB or 5 s); then killed 3 more times at \
             other points, for context",
            total / MIB
        );
        self.open_remote(DST_RESUME, total, "resumed").await?;
        // Where each attempt is killed: block data durable before it plus
        // sent in it reaching this. The first is the figure's.
        let kill_points: Vec<u64> =
            (0..4u64).map(|k| total / 2 + k * (total / 10 + 2 * MIB)).collect();
        // Per killed attempt: (durable before it, sent in it, A's veth tx).
        let mut attempts: Vec<(u64, u64, u64)> = Vec::new();
        let mut epoch = 1;
        for (k, &point) in kill_points.iter().enumerate() {
            let (start, sent, wire) = self.kill_sender_at(point).await?;
            eprintln!(
                "  attempt {}: from {:.2} MiB durable; SIGKILL to a1 with {:.2} MiB sent in this \
                 attempt (A's veth had carried {:.2} MiB)",
                k + 1,
                mib(start),
                mib(sent),
                mib(wire)
            );
            attempts.push((start, sent, wire));
            self.a1.restart()?;
            self.src = self.a1.heads().await?;
            epoch += 1;
            let req = open_request(CAP_SRC, total, &self.a1, pb::VolumeRole::Primary, epoch);
            self.src.open_head(req).await.context("reopening cap-src after the restart")?;
        }
        let endpoint = self.receiver_endpoint();
        let (r, t) =
            copy(&self.src, copy_request(CAP_SRC, "c1", "", "resumed", &endpoint, 0)).await?;
        let last_start = r.resumed_from_block * BS;
        ensure!(last_start + r.bytes_sent == total, "the last attempt: {r:?}");
        eprintln!(
            "  attempt {}: from {:.2} MiB durable, sent {:.2} MiB in {t:.2} s, sealed (digest \
             checked by the copy)",
            attempts.len() + 1,
            mib(last_start),
            mib(r.bytes_sent)
        );
        let mut starts: Vec<u64> = attempts.iter().map(|a| a.0).collect();
        starts.push(last_start);
        ensure!(starts[0] == 0, "the first attempt resumed from {}", starts[0]);
        let mut resent = Vec::new();
        for (k, &(start, sent, wire)) in attempts.iter().enumerate() {
            let next = starts[k + 1];
            ensure!(next >= start, "attempt {} went back to {next}", k + 2);
            let again = (start + sent).saturating_sub(next);
            eprintln!(
                "  kill {}: sent again {:.2} MiB = {:.2} MiB counted as sent but never on the \
                 link (queued in the sender) + {:.2} MiB that left A but was not checkpointed at B",
                k + 1,
                mib(again),
                mib(sent.saturating_sub(wire)),
                mib((start + wire.min(sent)).saturating_sub(next))
            );
            resent.push(again);
        }
        let sent_all: u64 = attempts.iter().map(|a| a.1).sum::<u64>() + r.bytes_sent;
        ensure!(
            sent_all - total == resent.iter().sum::<u64>(),
            "resent per kill does not add up: {sent_all} sent for {total}"
        );
        let others: Vec<String> = resent[1..].iter().map(|r| format!("{:.2}", mib(*r))).collect();
        eprintln!(
            "  the figure is kill 1 (at half): attempt 1 + attempt 2 - total; the other kills \
             sent again {} MiB (mean over all 4: {:.2} MiB)",
            others.join(", "),
            mib(resent.iter().sum::<u64>()) / resent.len() as f64
        );
        figures.add("resume_resent_mib", mib(resent[0]), 2, "<=8");
        Ok(())
    }

    /// Starts (or resumes) the copy of c1 to dst-resume and SIGKILLs a1 once
    /// the durable bytes before this attempt plus the bytes sent in it reach
    /// `point`. Returns (durable before the attempt, sent in it per the last
    /// progress sample before the kill, bytes A's veth sent in it).
    async fn kill_sender_at(&mut self, point: u64) -> anyhow::Result<(u64, u64, u64)> {
        let endpoint = self.receiver_endpoint();
        let before = self.sites.counters()?;
        let task = {
            let heads = self.src.clone();
            let req = copy_request(CAP_SRC, "c1", "", "resumed", &endpoint, 0);
            tokio::spawn(async move { copy(&heads, req).await })
        };
        // The progress of an earlier, finished copy of c1 says done; a new
        // attempt resets it.
        let last = loop {
            let p = progress(&self.src, CAP_SRC).await?;
            if p.snapshot_id == "c1" && !p.done && p.resumed_from_block * BS + p.bytes_sent >= point
            {
                break p;
            }
            if task.is_finished() {
                bail!("the copy ended before the sender could be killed: {:?}", task.await?);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let pid = self.a1.process.as_ref().map(|p| p.pid()).context("a1 is not running")?;
        // SAFETY: kill only sends a signal, to the agent this bench started
        // and has not reaped (kill9 below reaps it).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        self.a1.kill9()?;
        let attempt = task.await?;
        ensure!(attempt.is_err(), "the copy did not break with its sender: {attempt:?}");
        let wire = self.sites.counters()?.since(&before);
        Ok((last.resumed_from_block * BS, last.bytes_sent, wire.a_tx))
    }
}
