//! Agents as hosts: three agent processes, each in its own network
//! namespace on a bridge, serve a 1 GiB volume with two replicas. One host's
//! link is cut while a writer writes (its agent stops answering: no
//! refusal, only silence), so the head marks it out of sync after the peer
//! timeout and goes on; the link is restored and the head rebuilds the
//! replica while the writer goes on. Afterwards every byte reads back as
//! written and every chunk's replicas have equal digests, head and
//! snapshot.
//!
//! Needs root and `ip netns`; skipped with a message otherwise.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, Reference, netns, pattern};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * MIB;
const VOL: &str = "lan-vol";
const SNAP: &str = "before-cut";

async fn replica(heads: &HeadsClient, agent: &str) -> pb::ReplicaHealth {
    let s = heads
        .clone()
        .get_head_status(pb::HeadStatusRequest { volume_id: VOL.into() })
        .await
        .unwrap()
        .into_inner();
    s.replicas.into_iter().find(|r| r.agent == agent).unwrap()
}

async fn wait_for(heads: &HeadsClient, agent: &str, in_sync: bool, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let r = replica(heads, agent).await;
        if r.in_sync == in_sync {
            return if in_sync { r.last_rebuild } else { r.reason };
        }
        assert!(Instant::now() < deadline, "{agent} not in_sync={in_sync} in time: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_cut_off_the_network_is_rebuilt_when_it_returns() {
    if let Some(why) = netns::unavailable() {
        cairn_e2e::skip(&format!("needs root and network namespaces ({why})"));
        return;
    }
    let lan = netns::Lan::new(3).unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let args = [
        OsStr::new("--peer-timeout-ms"),
        OsStr::new("1000"),
        OsStr::new("--rebuild-interval-ms"),
        OsStr::new("200"),
    ];
    let agents: Vec<AgentProcess> = lan
        .hosts()
        .iter()
        .zip(&dirs)
        .enumerate()
        .map(|(i, (h, d))| {
            let listen = SocketAddr::new(h.ip.into(), 7070);
            AgentProcess::start_in_netns(&h.netns, d.path(), &format!("a{}", i + 1), listen, &args)
                .unwrap()
        })
        .collect();
    let mut heads = agents[0].heads().await.unwrap();
    let open = cairn_e2e::open_head_request(
        VOL,
        GIB,
        CHUNK,
        2,
        cairn_e2e::numbered(agents.iter().map(Some)),
    );
    heads.open_head(open).await.unwrap();

    // Data in every chunk, and a snapshot of it.
    let reference = Arc::new(Mutex::new(Reference::new(GIB)));
    for i in 0..GIB / CHUNK {
        let (offset, data) = (i * CHUNK + 12 * 4096, pattern(i, 2 * MIB as usize));
        reference.lock().unwrap().write(offset, &data);
        let req = pb::HeadWriteRequest { volume_id: VOL.into(), offset, data: data.into() };
        heads.head_write(req).await.unwrap();
    }
    let snap =
        pb::HeadSnapshotRequest { volume_id: VOL.into(), snapshot_id: SNAP.into(), generation: 1 };
    heads.head_snapshot(snap).await.unwrap();

    // A writer that keeps going throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (stop, writes, reference, mut heads) =
            (stop.clone(), writes.clone(), reference.clone(), heads.clone());
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let offset = (n * 7_919 % (GIB / (64 << 10))) * (64 << 10);
                let data = pattern(10_000 + n, 64 << 10);
                reference.lock().unwrap().write(offset, &data);
                let req = pb::HeadWriteRequest { volume_id: VOL.into(), offset, data: data.into() };
                heads.head_write(req).await.unwrap();
                n += 1;
                writes.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    lan.cut(2).unwrap();
    let t = Instant::now();
    let reason = wait_for(&heads, "a3", false, Duration::from_secs(30)).await;
    eprintln!("a3 out of sync {:?} after its link was cut: {reason}", t.elapsed());
    assert!(reason.contains("no answer"), "silence is a timeout: {reason}");
    let before = writes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = writes.load(Ordering::SeqCst);
    assert!(after > before + 10, "writes go on while a3 is cut off ({before} -> {after})");

    lan.restore(2).unwrap();
    let done = wait_for(&heads, "a3", true, Duration::from_secs(120)).await;
    eprintln!("a3 back: {done}");
    assert!(done.starts_with("rebuilt") && done.contains("1 snapshot layers"), "{done}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    heads.head_flush(pb::HeadFlushRequest { volume_id: VOL.into() }).await.unwrap();

    // Every chunk's replicas agree, head and snapshot.
    let mut by_chunk: BTreeMap<(String, u64), Vec<Vec<u8>>> = BTreeMap::new();
    for a in &agents {
        let mut c = a.client().await.unwrap();
        for view in ["", SNAP] {
            let req = pb::ChunkDigestsRequest {
                volume_id: VOL.into(),
                snapshot_id: view.into(),
                chunks: vec![],
            };
            for cd in c.chunk_digests(req).await.unwrap().into_inner().chunks {
                by_chunk
                    .entry((view.to_string(), cd.chunk))
                    .or_default()
                    .push(cd.accumulator.to_vec());
            }
        }
    }
    assert_eq!(by_chunk.len() as u64, 2 * GIB / CHUNK);
    for ((view, chunk), accs) in by_chunk {
        assert_eq!(accs.len(), 2, "chunk {chunk} ({view:?}) has two replicas");
        assert_eq!(accs[0], accs[1], "chunk {chunk} ({view:?}): replicas differ");
    }
    // And every byte reads back as written.
    let want = reference.lock().unwrap().clone();
    for at in (0..GIB).step_by(4 * MIB as usize) {
        let req = pb::HeadReadRequest { volume_id: VOL.into(), offset: at, length: 4 * MIB };
        let got = heads.head_read(req).await.unwrap().into_inner().data;
        assert!(want.mismatch(at, &got).is_none(), "{:?}", want.mismatch(at, &got));
    }
    heads.close_head(pb::CloseHeadRequest { volume_id: VOL.into() }).await.unwrap();
    for a in agents {
        a.terminate().unwrap();
    }
}
