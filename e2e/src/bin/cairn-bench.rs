//! cairn-bench: Cairn's performance figures.
//!
//! `cairn-bench store` measures the replica store in-process against a plain
//! file on the same disk, in the same run. Each figure is one line on stdout,
//! `figure <name> <value>`; progress and raw numbers go to stderr.
//!
//! `cairn-bench volume` measures a replicated volume's head, exposed
//! through FUSE and a loop device, with fio against a loop device on a plain
//! file on the same disk, and then a replica rebuild; `cairn-bench rebuild`
//! runs only the rebuild part (no root needed).
//!
//! `cairn-bench copy` measures remote copy between two sites (network
//! namespaces joined by a veth pair) against rsync and the link (iperf3).

#[path = "cairn-bench/copy.rs"]
mod copy;
#[path = "cairn-bench/rebuild.rs"]
mod rebuild;
#[path = "cairn-bench/volume.rs"]
mod volume;

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use cairn_agent::{Replica, Store, disk::FileDisk};
use cairn_api::{ChunkSet, Geometry, SnapshotId, VolumeId, agent::v1 as pb};
use cairn_e2e::{AgentProcess, pattern};
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const BS: u64 = 4 * KIB;
/// Timed repetitions per ratio; the median is reported.
const REPS: usize = 5;
/// Bytes of pseudo-random data every write draws from.
const POOL: u64 = 64 * MIB;
/// Items per `read_listed` call when streaming a layer.
const STREAM_SLICE: usize = 256;

/// Cairn's benchmarks: one `figure <name> <value>` line per figure on
/// stdout, everything else on stderr.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The replica store, in-process, against a plain file on the same disk.
    Store(StoreArgs),
    /// A volume head through FUSE and a loop device, with fio, against a
    /// loop device on a plain file on the same disk. Needs root and
    /// /dev/fuse.
    Volume(volume::VolumeArgs),
    /// Rebuilding a replica of a 1 GiB volume with 512 MiB written, and
    /// 4 KiB write latency during it (also part of `volume`). No root needed.
    Rebuild(rebuild::RebuildArgs),
    /// Remote copy between two network namespaces joined by a veth pair,
    /// against rsync and iperf3 on the same link. Needs root, rsync, iperf3.
    Copy(copy::CopyArgs),
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Directory to work in (a fresh subdirectory is made in it); default:
    /// `./target` if it exists, else /tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Much smaller sizes: a smoke test. Every figure is still printed.
    #[arg(long)]
    quick: bool,
    /// Keep the data directory instead of removing it at the end.
    #[arg(long)]
    keep: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Store(args) => store_bench(args),
        Command::Volume(args) => volume::volume_bench(args),
        Command::Rebuild(args) => rebuild::rebuild_bench(args),
        Command::Copy(args) => copy::copy_bench(args),
    }
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    seal_rounds: usize,
    /// 1 MiB writes between two seals.
    seal_writes: u64,
    seq_bytes: u64,
    rand_region: u64,
    rand_ops: usize,
    layered_region: u64,
    layers: u64,
    delta_blocks: u64,
    rss_snapshots: u64,
    /// 1 MiB writes per snapshot in the RSS run.
    rss_writes: u64,
    reclaim_bytes: u64,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            seal_rounds: 5,
            seal_writes: 64,
            seq_bytes: GIB,
            rand_region: 256 * MIB,
            rand_ops: 100_000,
            layered_region: 64 * MIB,
            layers: 128,
            delta_blocks: 167_772,
            rss_snapshots: 32,
            rss_writes: 8,
            reclaim_bytes: 64 * MIB,
        }
    }

    fn quick() -> Self {
        Sizes {
            seal_rounds: 3,
            seal_writes: 16,
            seq_bytes: 64 * MIB,
            rand_region: 32 * MIB,
            rand_ops: 10_000,
            layered_region: 16 * MIB,
            layers: 128,
            delta_blocks: 16_384,
            rss_snapshots: 4,
            rss_writes: 8,
            reclaim_bytes: 16 * MIB,
        }
    }
}

/// A figure and its target, for the summary.
struct Figure {
    name: &'static str,
    value: f64,
    target: &'static str,
    ok: bool,
}

/// State shared by the parts of the store bench.
struct Bench {
    dir: PathBuf,
    store: Store,
    data: Data,
    rng: StdRng,
    sizes: Sizes,
    figures: Vec<Figure>,
}

/// Pseudo-random, never-zero data to write.
struct Data {
    pool: Vec<u8>,
}

impl Data {
    fn new() -> Self {
        // One extra MiB so any slice of up to 1 MiB fits at any offset.
        let pool = pattern(0xCA1E, (POOL + MIB) as usize);
        Data { pool }
    }

    /// The bytes written at byte offset `offset` (up to 1 MiB): a
    /// deterministic function of the offset, so reads can be checked.
    fn at(&self, offset: u64, len: u64) -> &[u8] {
        debug_assert!(len <= MIB);
        let o = (offset % POOL) as usize;
        &self.pool[o..o + len as usize]
    }

    /// One block of data picked by `key`.
    fn block(&self, key: u64) -> &[u8] {
        let o = (key.wrapping_mul(0x9E37_79B9) % (POOL / BS)) * BS;
        self.at(o, BS)
    }
}

fn vol(name: &str) -> anyhow::Result<VolumeId> {
    Ok(VolumeId::new(name)?)
}

fn snap(name: &str) -> anyhow::Result<SnapshotId> {
    Ok(SnapshotId::new(name)?)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn fmt_list(v: &[f64], prec: usize) -> String {
    v.iter().map(|x| format!("{x:.prec$}")).collect::<Vec<_>>().join(" ")
}

/// Flushes every dirty page of every file system, so a timed section does
/// not pay for the previous one's write-back.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Runs `a` and `b` REPS times each, alternating which goes first, and
/// returns their times (seconds) in pairs. With `warm_up`, each first runs
/// once untimed as repetition 0 (the timed ones are then 1..=REPS): on this
/// VM, memory the guest touches for the first time is slow to come.
fn interleave(
    warm_up: bool,
    mut a: impl FnMut(usize) -> anyhow::Result<f64>,
    mut b: impl FnMut(usize) -> anyhow::Result<f64>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    if warm_up {
        eprintln!("  (rep 0 is a warm-up, not counted)");
        a(0)?;
        b(0)?;
    }
    let first = usize::from(warm_up);
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for rep in first..first + REPS {
        if (rep - first) % 2 == 0 {
            ta.push(a(rep)?);
            tb.push(b(rep)?);
        } else {
            tb.push(b(rep)?);
            ta.push(a(rep)?);
        }
    }
    Ok((ta, tb))
}

/// Median of the per-repetition ratios `num[i] / den[i]`.
fn paired_ratio(num: &[f64], den: &[f64]) -> f64 {
    median(num.iter().zip(den).map(|(n, d)| n / d).collect())
}

/// Bytes of disk the files under `path` occupy (st_blocks, not length).
fn disk_usage(path: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += disk_usage(&entry.path())?;
        } else {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

/// Reads `len` bytes at each offset into a fresh zeroed Vec, as the store's
/// read returns one; seconds taken.
fn fresh_vec_pass(f: &File, offsets: impl Iterator<Item = u64>, len: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    for off in offsets {
        let mut v = vec![0u8; len as usize];
        f.read_exact_at(&mut v, off)?;
        std::hint::black_box(v);
    }
    Ok(secs(t.elapsed()))
}

fn create_file(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// A fresh work directory (removed on drop) in `dir`, else in `./target`
/// when it exists, else in the system temp dir: the baseline files go in
/// it too, so both sides use the same disk.
fn work_dir(dir: Option<&Path>, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let base = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.to_path_buf()
        }
        None if Path::new("target").is_dir() => PathBuf::from("target"),
        None => std::env::temp_dir(),
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .with_context(|| format!("creating a work directory in {}", base.display()))
}

fn store_bench(args: StoreArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = work_dir(args.dir.as_deref(), "cairn-bench-")?;
    let dir = tmp.path().canonicalize()?;
    let sizes = if args.quick { Sizes::quick() } else { Sizes::full() };
    eprintln!("cairn-bench store: working in {}", dir.display());
    if args.quick {
        eprintln!(
            "quick mode: reduced sizes (smoke test); figures are not comparable with the targets"
        );
    }
    eprintln!(
        "store and baseline file share {} (same disk); {} repetitions per ratio, median reported",
        dir.display(),
        REPS
    );
    let store = Store::open(Arc::new(FileDisk), &dir)?;
    let mut b = Bench {
        dir: dir.clone(),
        store,
        data: Data::new(),
        rng: StdRng::seed_from_u64(0x5EED),
        sizes,
        figures: Vec::new(),
    };
    let res = b.run_all();
    let Bench { store, figures, .. } = b;
    drop(store);
    if !figures.is_empty() {
        eprintln!("\nsummary:");
        for f in &figures {
            eprintln!(
                "  {:<22} {:>10.3}   target {:<8} {}",
                f.name,
                f.value,
                f.target,
                if f.ok { "ok" } else { "MISSED" }
            );
        }
    }
    eprintln!("total run time: {:.1} s", started.elapsed().as_secs_f64());
    if args.keep {
        let kept = tmp.keep();
        eprintln!("kept the data in {}", kept.display());
        return res;
    }
    let closed = tmp.close();
    res?;
    closed.context("removing the work directory")
}

impl Bench {
    fn run_all(&mut self) -> anyhow::Result<()> {
        self.seal()?;
        self.sequential()?;
        self.random()?;
        self.layered()?;
        self.delta_enum()?;
        self.reclaim()?;
        self.rss()?;
        Ok(())
    }

    fn figure(&mut self, name: &'static str, value: f64, prec: usize, target: &'static str) {
        println!("figure {name} {value:.prec$}");
        let ok = match target.split_at(target.find(|c: char| c.is_ascii_digit()).unwrap_or(0)) {
            ("<", t) => value < t.parse().unwrap_or(f64::NAN),
            ("<=", t) => value <= t.parse().unwrap_or(f64::NAN),
            (">=", t) => value >= t.parse().unwrap_or(f64::NAN),
            ("~", t) => (value - t.parse().unwrap_or(f64::NAN)).abs() <= 0.05,
            _ => true,
        };
        self.figures.push(Figure { name, value, target, ok });
    }

    fn create(&self, name: &str, size: u64) -> anyhow::Result<Arc<Replica>> {
        let v = vol(name)?;
        Ok(self.store.create_replica(&v, Geometry::new(size, 0)?, ChunkSet::All)?)
    }

    fn delete(&self, name: &str) -> anyhow::Result<()> {
        Ok(self.store.delete_replica(&vol(name)?)?)
    }

    /// seal_ms_1g, seal_ms_1t, seal_ratio.
    fn seal(&mut self) -> anyhow::Result<()> {
        let s = self.sizes;
        eprintln!(
            "\n== seal: {} rounds of {} x 1 MiB random writes + flush, then seal (timed)",
            s.seal_rounds, s.seal_writes
        );
        let reps = [("seal-1g", GIB), ("seal-1t", TIB)];
        let replicas: Vec<Arc<Replica>> =
            reps.iter().map(|(n, size)| self.create(n, *size)).collect::<anyhow::Result<_>>()?;
        let mut times = vec![Vec::new(); replicas.len()];
        for round in 0..s.seal_rounds {
            for (i, r) in replicas.iter().enumerate() {
                let size = reps[i].1;
                for _ in 0..s.seal_writes {
                    let off = self.rng.random_range(0..size / MIB) * MIB;
                    r.write(0, off, self.data.at(off + round as u64 * BS, MIB))?;
                }
                r.flush(0)?;
                let id = snap(&format!("s{round}"))?;
                let t = Instant::now();
                r.seal(0, &id, round as u64 + 1)?;
                times[i].push(secs(t.elapsed()) * 1e3);
            }
        }
        for (i, (name, _)) in reps.iter().enumerate() {
            eprintln!("{name}: seal ms {}", fmt_list(&times[i], 3));
            self.delete(name)?;
        }
        let ms_1g = median(times[0].clone());
        let ms_1t = median(times[1].clone());
        self.figure("seal_ms_1g", ms_1g, 3, "<10");
        self.figure("seal_ms_1t", ms_1t, 3, "<10");
        self.figure("seal_ratio", ms_1t / ms_1g, 2, "<=2");
        Ok(())
    }

    /// seq_write_ratio, seq_read_ratio.
    fn sequential(&mut self) -> anyhow::Result<()> {
        let n = self.sizes.seq_bytes;
        eprintln!("\n== sequential: {} MiB in 1 MiB writes then flush / sync_data", n / MIB);
        let dir = self.dir.clone();
        let file_path = |rep: usize| dir.join(format!("baseline-seq-{rep}.dat"));
        let name = |rep: usize| format!("seq-{rep}");
        let data = &self.data;
        let store = &self.store;
        let (ts, tf) = interleave(
            true,
            |rep| {
                if rep > 0 {
                    store.delete_replica(&vol(&name(rep - 1))?)?;
                }
                let r =
                    store.create_replica(&vol(&name(rep))?, Geometry::new(n, 0)?, ChunkSet::All)?;
                settle();
                let t = Instant::now();
                for off in (0..n).step_by(MIB as usize) {
                    r.write(0, off, data.at(off, MIB))?;
                }
                let w = t.elapsed();
                r.flush(0)?;
                let all = t.elapsed();
                eprintln!(
                    "  store rep {rep}: {:.3} s ({:.0} MiB/s; writes {:.3} s, flush {:.3} s)",
                    secs(all),
                    mib_s(n, secs(all)),
                    secs(w),
                    secs(all - w)
                );
                Ok(secs(all))
            },
            |rep| {
                if rep > 0 {
                    std::fs::remove_file(file_path(rep - 1))?;
                }
                let f = create_file(&file_path(rep))?;
                settle();
                let t = Instant::now();
                for off in (0..n).step_by(MIB as usize) {
                    f.write_all_at(data.at(off, MIB), off)?;
                }
                let w = t.elapsed();
                f.sync_data()?;
                let all = t.elapsed();
                eprintln!(
                    "  file  rep {rep}: {:.3} s ({:.0} MiB/s; writes {:.3} s, sync {:.3} s)",
                    secs(all),
                    mib_s(n, secs(all)),
                    secs(w),
                    secs(all - w)
                );
                Ok(secs(all))
            },
        )?;
        eprintln!(
            "seq write: store median {:.0} MiB/s, file median {:.0} MiB/s",
            mib_s(n, median(ts.clone())),
            mib_s(n, median(tf.clone()))
        );
        self.figure("seq_write_ratio", paired_ratio(&tf, &ts), 3, ">=0.7");

        // Read back what the last repetition wrote.
        let last = REPS;
        let r = self.store.replica(&vol(&name(last))?)?;
        let f = File::open(file_path(last))?;
        eprintln!(
            "seq read: warm (one untimed full pass each first, checking the data), so both \
             are served from the page cache: this isolates the store's own overhead \
             (index lookups, CRC32C checks, buffers)"
        );
        let mut buf = vec![0u8; MIB as usize];
        for off in (0..n).step_by(MIB as usize) {
            ensure!(
                r.read(off, MIB, None)? == self.data.at(off, MIB),
                "store data differs at {off}"
            );
            f.read_exact_at(&mut buf, off)?;
            ensure!(buf == self.data.at(off, MIB), "file data differs at {off}");
        }
        let (ts, tf) = interleave(
            false,
            |_| {
                let mut buf = vec![0u8; MIB as usize];
                let t = Instant::now();
                for off in (0..n).step_by(MIB as usize) {
                    r.read_into(off, &mut buf, None)?;
                    std::hint::black_box(&buf);
                }
                Ok(secs(t.elapsed()))
            },
            |_| {
                let mut buf = vec![0u8; MIB as usize];
                let t = Instant::now();
                for off in (0..n).step_by(MIB as usize) {
                    f.read_exact_at(&mut buf, off)?;
                    std::hint::black_box(&buf);
                }
                Ok(secs(t.elapsed()))
            },
        )?;
        let (ms, mf): (Vec<f64>, Vec<f64>) =
            (ts.iter().map(|t| mib_s(n, *t)).collect(), tf.iter().map(|t| mib_s(n, *t)).collect());
        eprintln!("seq read MiB/s: store {}; file {}", fmt_list(&ms, 0), fmt_list(&mf, 0));
        let fresh = fresh_vec_pass(&f, (0..n).step_by(MIB as usize), MIB)?;
        eprintln!(
            "  (context) file read into a fresh zeroed Vec per read, as the store returns: \
             {:.0} MiB/s",
            mib_s(n, fresh)
        );
        self.figure("seq_read_ratio", paired_ratio(&tf, &ts), 3, ">=0.8");
        drop((r, f));
        self.delete(&name(last))?;
        std::fs::remove_file(file_path(last))?;
        Ok(())
    }

    /// rand_write_ratio, rand_read_ratio.
    fn random(&mut self) -> anyhow::Result<()> {
        let (region, ops) = (self.sizes.rand_region, self.sizes.rand_ops);
        let blocks = region / BS;
        eprintln!(
            "\n== random: {ops} x 4 KiB at random blocks of a pre-written {} MiB region",
            region / MIB
        );
        let r = self.create("rand", region)?;
        let path = self.dir.join("baseline-rand.dat");
        let f = create_file(&path)?;
        for off in (0..region).step_by(MIB as usize) {
            r.write(0, off, self.data.at(off, MIB))?;
            f.write_all_at(self.data.at(off, MIB), off)?;
        }
        r.flush(0)?;
        f.sync_data()?;
        let offsets: Vec<Vec<u64>> = (0..=REPS)
            .map(|_| (0..ops).map(|_| self.rng.random_range(0..blocks) * BS).collect())
            .collect();
        let data = &self.data;
        let (ts, tf) = interleave(
            true,
            |rep| {
                settle();
                let t = Instant::now();
                for (k, &off) in offsets[rep].iter().enumerate() {
                    r.write(0, off, data.block(k as u64 + rep as u64))?;
                }
                let w = t.elapsed();
                r.flush(0)?;
                let all = t.elapsed();
                eprintln!(
                    "  store rep {rep}: {:.0} IOPS (writes {:.3} s, flush {:.3} s)",
                    ops as f64 / secs(all),
                    secs(w),
                    secs(all - w)
                );
                Ok(secs(all))
            },
            |rep| {
                settle();
                let t = Instant::now();
                for (k, &off) in offsets[rep].iter().enumerate() {
                    f.write_all_at(data.block(k as u64 + rep as u64), off)?;
                }
                let w = t.elapsed();
                f.sync_data()?;
                let all = t.elapsed();
                eprintln!(
                    "  file  rep {rep}: {:.0} IOPS (writes {:.3} s, sync {:.3} s)",
                    ops as f64 / secs(all),
                    secs(w),
                    secs(all - w)
                );
                Ok(secs(all))
            },
        )?;
        eprintln!(
            "rand write IOPS median: store {:.0}, file {:.0}",
            ops as f64 / median(ts.clone()),
            ops as f64 / median(tf.clone())
        );
        self.figure("rand_write_ratio", paired_ratio(&tf, &ts), 3, ">=0.5");

        eprintln!("rand read: warm (one untimed full pass each first)");
        let mut buf = vec![0u8; MIB as usize];
        for off in (0..region).step_by(MIB as usize) {
            let got = r.read(off, MIB, None)?;
            f.read_exact_at(&mut buf, off)?;
            ensure!(got == buf, "store and file differ in the random region at {off}");
        }
        let (ts, tf) = interleave(
            false,
            |rep| {
                let mut buf = vec![0u8; BS as usize];
                let t = Instant::now();
                for &off in &offsets[rep] {
                    r.read_into(off, &mut buf, None)?;
                    std::hint::black_box(&buf);
                }
                Ok(secs(t.elapsed()))
            },
            |rep| {
                let mut buf = vec![0u8; BS as usize];
                let t = Instant::now();
                for &off in &offsets[rep] {
                    f.read_exact_at(&mut buf, off)?;
                    std::hint::black_box(&buf);
                }
                Ok(secs(t.elapsed()))
            },
        )?;
        let iops = |v: &[f64]| v.iter().map(|t| ops as f64 / t).collect::<Vec<_>>();
        eprintln!(
            "rand read IOPS: store {}; file {}",
            fmt_list(&iops(&ts), 0),
            fmt_list(&iops(&tf), 0)
        );
        let fresh = fresh_vec_pass(&f, offsets[0].iter().copied(), BS)?;
        eprintln!(
            "  (context) file read into a fresh zeroed Vec per read, as the store returns: \
             {:.0} IOPS",
            ops as f64 / fresh
        );
        self.figure("rand_read_ratio", paired_ratio(&tf, &ts), 3, ">=0.5");
        drop((r, f));
        self.delete("rand")?;
        std::fs::remove_file(&path)?;
        Ok(())
    }

    /// Builds a replica whose `region` bytes are written in `rounds`
    /// rounds: the region's extents of `extent` bytes are dealt out at
    /// random (the same deal every time), round i writing the i-th
    /// 1/rounds of them. With `seal`, each round ends with a seal (one
    /// layer per round); without, with a flush (one layer in all, the same
    /// writes, so the same placement of blocks in the data files). A last
    /// seal makes the newest snapshot, returned.
    fn build_layered(
        &mut self,
        name: &str,
        rounds: u64,
        extent: u64,
        seal: bool,
    ) -> anyhow::Result<(Arc<Replica>, SnapshotId)> {
        let region = self.sizes.layered_region;
        let r = self.create(name, region)?;
        let n = region / extent;
        let mut extents: Vec<u64> = (0..n).collect();
        if rounds > 1 {
            extents.shuffle(&mut StdRng::seed_from_u64(0x1A7E5));
        }
        let layers = rounds;
        let mut last = None;
        for i in 0..layers {
            let mut mine =
                extents[(i * n / layers) as usize..((i + 1) * n / layers) as usize].to_vec();
            mine.sort_unstable();
            // Coalesce neighbours into writes of up to 1 MiB.
            let mut k = 0;
            while k < mine.len() {
                let mut m = 1;
                while k + m < mine.len()
                    && mine[k + m] == mine[k] + m as u64
                    && (m as u64 + 1) * extent <= MIB
                {
                    m += 1;
                }
                let off = mine[k] * extent;
                r.write(0, off, self.data.at(off, m as u64 * extent))?;
                k += m;
            }
            r.flush(0)?;
            if seal || i + 1 == layers {
                let id = snap(&format!("l{i}"))?;
                r.seal(0, &id, i + 1)?;
                last = Some(id);
            }
        }
        Ok((r, last.expect("at least one layer")))
    }

    /// layered_read_ratio.
    fn layered(&mut self) -> anyhow::Result<()> {
        let (region, layers) = (self.sizes.layered_region, self.sizes.layers);
        eprintln!(
            "\n== layered: a {} MiB region written in {layers} rounds of random 4 KiB blocks \
             (each round a different 1/{layers}), sealed after every round ({layers} layers) vs \
             the same writes flushed after every round (1 layer, the same block placement in \
             the files); head reads in 1 MiB into one buffer, warm",
            region / MIB
        );
        let t = Instant::now();
        let (many, many_top) = self.build_layered("layered-many", layers, BS, true)?;
        eprintln!("  built {layers} layers in {:.2} s", secs(t.elapsed()));
        let (one, one_top) = self.build_layered("layered-one", layers, BS, false)?;
        let (seq, seq_top) = self.build_layered("layered-seq", 1, BS, true)?;
        let t = Instant::now();
        let (ext, ext_top) = self.build_layered("layered-ext", layers, 64 * KIB, true)?;
        eprintln!("  built {layers} layers of 64 KiB extents in {:.2} s", secs(t.elapsed()));
        let data = &self.data;
        let pass = |r: &Replica, s: Option<&SnapshotId>, check: bool| -> anyhow::Result<f64> {
            let mut got = vec![0u8; MIB as usize];
            let t = Instant::now();
            for off in (0..region).step_by(MIB as usize) {
                r.read_into(off, &mut got, s)?;
                if check {
                    ensure!(got == data.at(off, MIB), "layered data differs at {off}");
                }
                std::hint::black_box(&got);
            }
            Ok(secs(t.elapsed()))
        };
        for r in [&many, &one, &seq, &ext] {
            pass(r, None, true)?;
        }
        let (tm, t1) =
            interleave(false, |_| pass(&many, None, false), |_| pass(&one, None, false))?;
        let mibs = |v: &[f64]| v.iter().map(|t| mib_s(region, *t)).collect::<Vec<_>>();
        eprintln!(
            "layered head read MiB/s: {layers} layers {}; 1 layer, same writes {}",
            fmt_list(&mibs(&tm), 0),
            fmt_list(&mibs(&t1), 0)
        );
        let ts = median((0..REPS).map(|_| pass(&seq, None, false)).collect::<Result<_, _>>()?);
        eprintln!(
            "  (context) 1 layer written sequentially (no fragmentation): {:.0} MiB/s; {layers} \
             fragmented layers reach {:.3} of it",
            mib_s(region, ts),
            ts / median(tm.clone())
        );
        // For context only: the same with 64 KiB extents (fewer, larger
        // reads), and reads as of the newest snapshot (resolved layer by
        // layer rather than through the head's index).
        let te = median((0..REPS).map(|_| pass(&ext, None, false)).collect::<Result<_, _>>()?);
        eprintln!(
            "  (context) {layers} layers of 64 KiB extents: {:.0} MiB/s, ratio to 1 layer {:.3}",
            mib_s(region, te),
            median(t1.clone()) / te
        );
        pass(&many, Some(&many_top), true)?;
        pass(&one, Some(&one_top), true)?;
        pass(&seq, Some(&seq_top), true)?;
        pass(&ext, Some(&ext_top), true)?;
        let sm = pass(&many, Some(&many_top), false)?;
        let s1 = pass(&one, Some(&one_top), false)?;
        let se = pass(&ext, Some(&ext_top), false)?;
        eprintln!(
            "  (context) snapshot reads MiB/s: {layers} layers {:.0}, 64 KiB extents {:.0}, 1 \
             layer {:.0}",
            mib_s(region, sm),
            mib_s(region, se),
            mib_s(region, s1)
        );
        self.figure("layered_read_ratio", paired_ratio(&t1, &tm), 3, ">=0.8");
        drop((many, one, seq, ext));
        for n in ["layered-many", "layered-one", "layered-seq", "layered-ext"] {
            self.delete(n)?;
        }
        Ok(())
    }

    /// delta_enum_ratio.
    fn delta_enum(&mut self) -> anyhow::Result<()> {
        let k = self.sizes.delta_blocks;
        eprintln!(
            "\n== delta enumeration: {k} changed blocks (4 KiB writes at random distinct blocks, \
             sealed) in a 64 GiB replica vs a 1 GiB one; list_layer + read_listed in slices of \
             {STREAM_SLICE}, both warm"
        );
        if k != Sizes::full().delta_blocks {
            eprintln!("  quick mode: {k} blocks instead of {}", Sizes::full().delta_blocks);
        }
        let id = snap("d1")?;
        let mut reps = Vec::new();
        for (name, size) in [("delta-64g", 64 * GIB), ("delta-1g", GIB)] {
            let r = self.create(name, size)?;
            let picked = rand::seq::index::sample(&mut self.rng, (size / BS) as usize, k as usize);
            let t = Instant::now();
            for (j, b) in picked.iter().enumerate() {
                r.write(0, b as u64 * BS, self.data.block(j as u64))?;
            }
            let w = t.elapsed();
            r.flush(0)?;
            let fl = t.elapsed() - w;
            r.seal(0, &id, 1)?;
            eprintln!(
                "  {name}: {:.1}% of its blocks; wrote in {:.2} s, flushed in {:.2} s",
                k as f64 * 100.0 / (size / BS) as f64,
                secs(w),
                secs(fl)
            );
            reps.push((name, r));
        }
        let stream = |r: &Replica| -> anyhow::Result<f64> {
            let t = Instant::now();
            let items = r.list_layer(&id, &[])?;
            let mut n = 0u64;
            for slice in items.chunks(STREAM_SLICE) {
                for b in r.read_listed(slice)? {
                    n += b.data.map_or(0, |d| d.len() as u64);
                }
            }
            let el = secs(t.elapsed());
            ensure!(items.len() as u64 == k && n == k * BS, "streamed {} blocks", items.len());
            Ok(el)
        };
        for (_, r) in &reps {
            stream(r)?;
        }
        let (t64, t1) = interleave(false, |_| stream(&reps[0].1), |_| stream(&reps[1].1))?;
        eprintln!(
            "delta stream s: 64 GiB {}; 1 GiB {} ({:.0} vs {:.0} blocks/s)",
            fmt_list(&t64, 3),
            fmt_list(&t1, 3),
            k as f64 / median(t64.clone()),
            k as f64 / median(t1.clone())
        );
        self.figure("delta_enum_ratio", paired_ratio(&t64, &t1), 3, "<=2");
        for (name, r) in reps {
            drop(r);
            self.delete(name)?;
        }
        Ok(())
    }

    /// disk_reclaimed_ratio.
    fn reclaim(&mut self) -> anyhow::Result<()> {
        let n = self.sizes.reclaim_bytes;
        eprintln!(
            "\n== reclaim: write {0} MiB, seal s1, rewrite the same {0} MiB, seal s2; disk \
             usage around delete_snapshot(s1)",
            n / MIB
        );
        let name = "reclaim";
        let r = self.create(name, GIB)?;
        for (i, shift) in [(1, 0), (2, BS)] {
            for off in (0..n).step_by(MIB as usize) {
                r.write(0, off, self.data.at(off + shift, MIB))?;
            }
            r.flush(0)?;
            r.seal(0, &snap(&format!("s{i}"))?, i)?;
        }
        r.flush(0)?;
        let vdir = self.dir.join("volumes").join(name);
        let before = disk_usage(&vdir)?;
        r.delete_snapshot(&snap("s1")?)?;
        let after = disk_usage(&vdir)?;
        let freed = before.saturating_sub(after);
        eprintln!(
            "  {}: {:.1} MiB before, {:.1} MiB after, {:.1} MiB freed",
            vdir.display(),
            before as f64 / MIB as f64,
            after as f64 / MIB as f64,
            freed as f64 / MIB as f64
        );
        drop(r);
        self.delete(name)?;
        self.figure("disk_reclaimed_ratio", freed as f64 / n as f64, 3, "~1");
        Ok(())
    }

    /// rss_mib_1t: the real agent process.
    fn rss(&mut self) -> anyhow::Result<()> {
        let (snaps, writes) = (self.sizes.rss_snapshots, self.sizes.rss_writes);
        eprintln!(
            "\n== agent RSS: a 1 TiB replica, {} MiB written over {snaps} snapshots over gRPC",
            snaps * writes
        );
        let agent_dir = self.dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let agent = AgentProcess::start(&agent_dir)?;
        eprintln!(
            "  agent pid {} at {}: RSS at start {:.1} MiB",
            agent.pid(),
            agent.addr(),
            agent.rss_bytes()? as f64 / MIB as f64
        );
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let volume_id = "rss-1t".to_string();
        let offsets: Vec<u64> =
            (0..snaps * writes).map(|_| self.rng.random_range(0..TIB / MIB) * MIB).collect();
        let data = &self.data;
        rt.block_on(async {
            let mut c = agent.client().await?;
            c.create_replica(pb::CreateReplicaRequest {
                volume_id: volume_id.clone(),
                size_bytes: TIB,
                chunk_size_bytes: 0,
                chunks: Some(pb::ChunkSet { all: true, chunks: vec![] }),
            })
            .await?;
            for i in 0..snaps {
                for j in 0..writes {
                    let offset = offsets[(i * writes + j) as usize];
                    c.write_blocks(pb::WriteBlocksRequest {
                        epoch: 0,
                        volume_id: volume_id.clone(),
                        offset,
                        data: Bytes::copy_from_slice(data.at(offset, MIB)),
                    })
                    .await?;
                }
                c.flush(pb::FlushRequest { epoch: 0, volume_id: volume_id.clone() }).await?;
                c.seal_snapshot(pb::SealSnapshotRequest {
                    epoch: 0,
                    volume_id: volume_id.clone(),
                    snapshot_id: format!("s{i}"),
                    generation: i + 1,
                })
                .await?;
            }
            let list = c
                .list_snapshots(pb::ListSnapshotsRequest { volume_id: volume_id.clone() })
                .await?
                .into_inner();
            if list.snapshots.len() as u64 != snaps {
                bail!("the agent lists {} snapshots, expected {snaps}", list.snapshots.len());
            }
            anyhow::Ok(())
        })?;
        let rss = agent.rss_bytes()? as f64 / MIB as f64;
        eprintln!("  agent RSS after: {rss:.1} MiB");
        agent.terminate()?;
        self.figure("rss_mib_1t", rss, 1, "<128");
        Ok(())
    }
}
