//! `cairn-bench rebuild` (also run at the end of `volume`): how fast a
//! replica is rebuilt, and what a rebuild does to write latency.
//!
//! Three agents on loopback, a 1 GiB volume with two replicas in 64 MiB
//! chunks, its head on a1 (gRPC, no FUSE, so no root is needed); 512 MiB
//! written. Then: 4 KiB writes at random offsets, one at a time, for a few
//! seconds (the baseline latency); a3 killed with SIGKILL and restarted on
//! its address; the head's heal loop rebuilds it while the same 4 KiB
//! writes go on, until a3 is in sync again.
//!
//! - `rebuild_mib_s`: the rebuilt replica's data (its `used_bytes`
//!   afterwards) / the time from the restart until it was in sync;
//! - `rebuild_write_p99_ratio`: p99 write latency during the rebuild /
//!   without one.

use std::{
    ffi::OsStr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use cairn_api::agent::v1 as pb;

use super::{GIB, MIB};
use cairn_e2e::{AgentProcess, HeadsClient, pattern};
use futures::StreamExt;

const VOLUME: &str = "rebuild-vol";
const CHUNK: u64 = 64 * MIB;
const WRITTEN: u64 = 512 * MIB;
/// How long the baseline latency is measured.
const BASELINE: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// Directory to work in (a fresh subdirectory is made in it); default:
    /// `./target` if it exists, else /tmp.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

pub fn rebuild_bench(args: RebuildArgs) -> anyhow::Result<()> {
    let tmp = crate::work_dir(args.dir.as_deref(), "cairn-bench-rebuild-")?;
    let figures = measure(tmp.path())?;
    eprintln!();
    for (name, value, target) in &figures {
        eprintln!("  {name:<26} {value:>9.3}   target {target}");
    }
    Ok(())
}

/// Runs the rebuild measurements in `dir` and prints their `figure` lines;
/// returns (name, value, target) for the summary.
pub fn measure(dir: &Path) -> anyhow::Result<Vec<(&'static str, f64, &'static str)>> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(measure_async(dir))
}

async fn measure_async(dir: &Path) -> anyhow::Result<Vec<(&'static str, f64, &'static str)>> {
    eprintln!(
        "\n== rebuild: 3 agents, a 1 GiB volume, 2 replicas, head on a1 (gRPC), {} MiB written",
        WRITTEN / MIB
    );
    let args = [OsStr::new("--rebuild-interval-ms"), OsStr::new("100")];
    let mut agents = Vec::new();
    for i in 1..=3 {
        let data = dir.join(format!("r{i}"));
        std::fs::create_dir_all(&data)?;
        agents.push(
            AgentProcess::start_args(&data, &format!("a{i}"), &args)
                .with_context(|| format!("starting agent a{i}"))?,
        );
    }
    let request = cairn_e2e::open_head_request(
        VOLUME,
        GIB,
        CHUNK,
        2,
        cairn_e2e::numbered(agents.iter().map(Some)),
    );
    let mut heads = agents[0].heads().await?;
    heads.open_head(request).await.context("OpenHead")?;

    let t = Instant::now();
    let mut writes = futures::stream::iter((0..WRITTEN / MIB).map(|i| {
        let mut h = heads.clone();
        async move {
            let req = pb::HeadWriteRequest {
                volume_id: VOLUME.into(),
                offset: i * MIB,
                data: pattern(i, MIB as usize).into(),
            };
            h.head_write(req).await
        }
    }))
    .buffer_unordered(4);
    while let Some(res) = writes.next().await {
        res.context("writing the volume")?;
    }
    drop(writes);
    heads.head_flush(pb::HeadFlushRequest { volume_id: VOLUME.into() }).await?;
    eprintln!("  wrote {} MiB in {:.1} s", WRITTEN / MIB, t.elapsed().as_secs_f64());

    let mut seed = 1u64;
    let baseline = write_latencies(&heads, &mut seed, |started| started.elapsed() < BASELINE)
        .await
        .context("baseline 4 KiB writes")?;

    let a3 = agents.pop().expect("three agents");
    let (a3_dir, a3_addr) = (a3.data_dir().to_path_buf(), a3.addr());
    a3.kill9()?;
    // A write to a chunk a3 holds marks it out of sync; keep writing
    // until the head has noticed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&heads, "a3").await?.in_sync {
        if Instant::now() > deadline {
            bail!("the head did not notice a3 was killed");
        }
        write_latencies(&heads, &mut seed, |started| started.elapsed() < Duration::from_millis(50))
            .await?;
    }
    let restarted = Instant::now();
    agents.push(AgentProcess::start_on(&a3_dir, "a3", a3_addr, &args).context("restarting a3")?);
    // A watcher polls the head status while the writer measures.
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (heads, done, seen) = (heads.clone(), done.clone(), seen.clone());
        async move {
            loop {
                let s = status(&heads, "a3").await?;
                seen.fetch_or(s.rebuild.is_some(), Ordering::SeqCst);
                if s.in_sync {
                    done.store(true, Ordering::SeqCst);
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let during = write_latencies(&heads, &mut seed, |_| {
        !done.load(Ordering::SeqCst) && restarted.elapsed() < Duration::from_secs(600)
    })
    .await
    .context("4 KiB writes during the rebuild")?;
    if !done.load(Ordering::SeqCst) {
        watcher.abort();
        bail!("a3 was not rebuilt within 10 minutes");
    }
    watcher.await??;
    let seen_rebuild = seen.load(Ordering::SeqCst);
    let took = restarted.elapsed();
    let a3_status = status(&heads, "a3").await?;
    let mut client = agents[2].client().await?;
    let stat = client.stat(pb::StatRequest {}).await?.into_inner();
    let bytes = stat
        .replicas
        .iter()
        .find(|r| r.volume_id == VOLUME)
        .map(|r| r.used_bytes)
        .context("a3 holds no replica after the rebuild")?;
    eprintln!(
        "  a3 killed, restarted and rebuilt: {} MiB in {:.2} s (from its restart; {}); rebuild \
         seen in progress: {seen_rebuild}",
        bytes / MIB,
        took.as_secs_f64(),
        a3_status.last_rebuild
    );
    let (b50, b99) = (percentile(&baseline, 50.0), percentile(&baseline, 99.0));
    let (d50, d99) = (percentile(&during, 50.0), percentile(&during, 99.0));
    eprintln!(
        "  4 KiB writes without a rebuild: {} writes, p50 {:.2} ms, p99 {:.2} ms",
        baseline.len(),
        b50 * 1e3,
        b99 * 1e3
    );
    eprintln!(
        "  4 KiB writes during the rebuild: {} writes, p50 {:.2} ms, p99 {:.2} ms",
        during.len(),
        d50 * 1e3,
        d99 * 1e3
    );
    let mib_s = bytes as f64 / MIB as f64 / took.as_secs_f64();
    let ratio = d99 / b99;
    println!("figure rebuild_mib_s {mib_s:.1}");
    println!("figure rebuild_write_p99_ratio {ratio:.2}");
    heads.close_head(pb::CloseHeadRequest { volume_id: VOLUME.into() }).await?;
    for a in agents {
        a.terminate()?;
    }
    Ok(vec![("rebuild_mib_s", mib_s, "(measured)"), ("rebuild_write_p99_ratio", ratio, "<= 3")])
}

async fn status(heads: &HeadsClient, agent: &str) -> anyhow::Result<pb::ReplicaHealth> {
    let s = heads
        .clone()
        .get_head_status(pb::HeadStatusRequest { volume_id: VOLUME.into() })
        .await?
        .into_inner();
    s.replicas
        .into_iter()
        .find(|r| r.agent == agent)
        .with_context(|| format!("no replica on {agent} in the head status"))
}

/// 4 KiB writes at random aligned offsets, one at a time, while `go` says
/// so; their latencies in seconds.
async fn write_latencies(
    heads: &HeadsClient,
    seed: &mut u64,
    mut go: impl FnMut(Instant) -> bool,
) -> anyhow::Result<Vec<f64>> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut h = heads.clone();
    while go(started) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let offset = (*seed % (GIB / 4096)) * 4096;
        let req = pb::HeadWriteRequest {
            volume_id: VOLUME.into(),
            offset,
            data: pattern(*seed, 4096).into(),
        };
        let t = Instant::now();
        h.head_write(req).await.context("a 4 KiB write")?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i]
}
