//! `cairn-faults`: the fault-injection suite over many seeds (see
//! `cairn_e2e::faults`). Each seed is one reproducible schedule of real
//! agent processes killed, restarted, paused, their head moved and their
//! bytes flipped, under a checksummed workload, then checked. Prints one
//! line per schedule and a summary; exits 1 when any violation was found.
//!
//!     cargo run --release -p cairn-e2e --bin cairn-faults -- --seeds 200

use std::{collections::BTreeMap, time::Instant};

use cairn_e2e::faults::{Options, run};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Cairn's fault-injection suite: seeded schedules against real agents")]
struct Args {
    /// How many schedules (seeds first, first+1, ...).
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Nemesis steps per schedule.
    #[arg(long, default_value_t = 12)]
    steps: usize,
    /// Replicas of each chunk (1 or 2).
    #[arg(long, default_value_t = 2)]
    replicas: u32,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut acked, mut checked, mut violations, mut refused, mut lost) = (0, 0, 0, 0, 0);
    let (mut unavailable, mut override_lost, mut unhealed) = (0, 0, 0);
    for seed in args.first..args.first + args.seeds {
        let work = tempfile::tempdir()?;
        let opts = Options { replicas: args.replicas, steps: args.steps, work: work.path().into() };
        let r = run(seed, &opts).await?;
        for (k, n) in &r.faults {
            *faults.entry(k).or_default() += n;
        }
        acked += r.writes_acked;
        checked += r.acked_blocks_checked;
        refused += r.opens_refused;
        lost += r.data_loss_reads + r.latent_corruption;
        violations += r.violations.len();
        unavailable += usize::from(r.unavailable.is_some());
        unhealed += usize::from(r.unhealed.is_some());
        override_lost += r.lost_under_override.len();
        println!(
            "seed {seed}: {} steps, faults {:?}, writes acked {} failed {}, flushes {}, opens refused {}, blocks checked {} ({} acknowledged), DATA_LOSS reads {} latent {}, violations {} ({:.1} s)",
            r.steps,
            r.faults,
            r.writes_acked,
            r.writes_failed,
            r.flushes_acked,
            r.opens_refused,
            r.blocks_checked,
            r.acked_blocks_checked,
            r.data_loss_reads,
            r.latent_corruption,
            r.violations.len(),
            r.elapsed.as_secs_f64()
        );
        for v in &r.violations {
            println!("  VIOLATION: {v}");
        }
        if let Some(why) = &r.unhealed {
            println!("  UNHEALED (liveness, not safety): {why}");
        }
        if let Some(why) = &r.unavailable {
            let forced = if r.unchecked {
                "accept_data_loss refused too: not checked".to_string()
            } else {
                format!(
                    "forced open with accept_data_loss: {} acknowledged writes missing",
                    r.lost_under_override.len()
                )
            };
            println!("  UNAVAILABLE with every agent up (liveness, not safety): {why}; {forced}");
        }
    }
    println!(
        "summary: {} schedules, faults {faults:?}, writes acknowledged {acked}, acknowledged blocks checked {checked}, opens refused {refused}, DATA_LOSS seen {lost}, violations {violations}, unhealed {unhealed}, unavailable with every agent up {unavailable} (acknowledged writes missing when forced: {override_lost}), wall time {:.1} s",
        args.seeds,
        started.elapsed().as_secs_f64()
    );
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
