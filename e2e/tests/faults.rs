//! The fault-injection suite's short fixed set of seeds (CI): each seed is
//! one reproducible schedule against real agent processes (see
//! `cairn_e2e::faults`); every schedule must end with no violation. Longer
//! soaks: `cargo run --release -p cairn-e2e --bin cairn-faults -- --seeds 200`.

use cairn_e2e::faults::{Options, run};

async fn seeds(replicas: u32, seeds: std::ops::Range<u64>) {
    let mut failed = Vec::new();
    for seed in seeds {
        let work = tempfile::tempdir().unwrap();
        let opts = Options { replicas, steps: 10, work: work.path().into() };
        let r = run(seed, &opts).await.unwrap();
        eprintln!("seed {seed}: {r:?}");
        assert!(r.writes_acked > 0, "seed {seed} wrote nothing: {r:?}");
        assert!(r.blocks_checked > 0 || r.unchecked, "seed {seed} checked nothing: {r:?}");
        if let Some(why) = &r.unhealed {
            eprintln!("seed {seed}: not healed: {why}");
        }
        if let Some(why) = &r.unavailable {
            // Liveness, not safety: reported, and tracked by the ignored
            // test below.
            eprintln!("seed {seed}: unavailable with every agent up: {why}");
        }
        if !r.violations.is_empty() {
            failed.push(format!("seed {seed}: {:#?}", r.violations));
        }
    }
    assert!(failed.is_empty(), "violations:\n{}", failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_survive_kills_pauses_head_moves_and_flipped_bytes() {
    seeds(2, 1..7).await;
}

/// Seed 5 ends with chunk 2's two replicas both out of the in-sync set
/// after overlapping failures, though neither missed a write of chunk 2:
/// the set is recorded per volume, not per chunk, so the head refuses to
/// open (safe: nothing stale is served) and `accept_data_loss` cannot open
/// it either (the chunk has no in-sync replica). A known liveness bug.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "fails: the in-sync set is per volume, so overlapping failures wedge a chunk (issue 14, not fixed yet)"]
async fn a_volume_reopens_after_overlapping_failures_that_lost_nothing() {
    let work = tempfile::tempdir().unwrap();
    let opts = Options { replicas: 2, steps: 12, work: work.path().into() };
    let r = run(5, &opts).await.unwrap();
    assert_eq!(r.unavailable, None, "{r:?}");
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
}
