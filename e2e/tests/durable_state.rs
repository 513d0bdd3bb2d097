//! Process-level tests of the durable replica state (docs/design.md,
//! "Durable replica state"): real agents on loopback, killed with SIGKILL
//! and restarted on their old addresses. A replica that missed
//! acknowledged writes never takes over; a replica that restarted under a
//! head is rebuilt, not trusted; a bad block on the only copy costs that
//! block, not the volume; two heads never share an epoch and a stale open
//! never takes down the live head.

use std::{ffi::OsStr, os::unix::fs::FileExt, path::PathBuf, time::Duration};

use bytes::Bytes;
use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, pattern};
use tonic::Code;

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;
const SIZE: u64 = 8 * MIB;
const CHUNK: u64 = 4 * MIB;
const VOL: &str = "durable";

/// Agents heal every 100 ms, so "several heal intervals" is short.
fn args() -> Vec<&'static OsStr> {
    ["--rebuild-interval-ms", "100"].iter().map(OsStr::new).collect()
}

/// Agents a1, a2, ... each on its own data dir, restartable on their
/// addresses.
struct Site {
    dirs: Vec<tempfile::TempDir>,
    agents: Vec<Option<AgentProcess>>,
    addrs: Vec<std::net::SocketAddr>,
}

impl Site {
    fn start(n: usize) -> Site {
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let agents: Vec<Option<AgentProcess>> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| Some(AgentProcess::start_args(d.path(), &name(i), &args()).unwrap()))
            .collect();
        let addrs = agents.iter().map(|a| a.as_ref().unwrap().addr()).collect();
        Site { dirs, agents, addrs }
    }

    fn kill(&mut self, i: usize) {
        self.agents[i].take().expect("running").kill9().unwrap();
    }

    fn restart(&mut self, i: usize) {
        assert!(self.agents[i].is_none(), "{} is running", name(i));
        let a = AgentProcess::start_on(self.dirs[i].path(), &name(i), self.addrs[i], &args());
        self.agents[i] = Some(a.unwrap());
    }

    /// Every agent, stopped ones included, at its address.
    fn open_request(&self, epoch: u64, replicas: u32) -> pb::OpenHeadRequest {
        let agents = (0..self.addrs.len()).map(|i| (name(i), format!("http://{}", self.addrs[i])));
        pb::OpenHeadRequest {
            epoch,
            ..cairn_e2e::open_head_request(VOL, SIZE, CHUNK, replicas, agents)
        }
    }

    async fn heads(&self, i: usize) -> HeadsClient {
        self.agents[i].as_ref().unwrap().heads().await.unwrap()
    }

    /// Reads `[offset, offset + len)` straight from agent `i`'s replica.
    async fn replica_read(&self, i: usize, offset: u64, len: u64) -> Vec<u8> {
        let mut c = self.agents[i].as_ref().unwrap().client().await.unwrap();
        let mut out = Vec::new();
        for at in (offset..offset + len).step_by(4 * MIB as usize) {
            let n = (offset + len - at).min(4 * MIB);
            let req = pb::ReadBlocksRequest {
                volume_id: VOL.into(),
                offset: at,
                length: n,
                snapshot_id: String::new(),
            };
            out.extend_from_slice(&c.read_blocks(req).await.unwrap().into_inner().data);
        }
        out
    }

    fn layer_files(&self, i: usize) -> Vec<PathBuf> {
        let dir = self.dirs[i].path().join("volumes").join(VOL);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "layer"))
            .collect();
        files.sort();
        files
    }
}

fn name(i: usize) -> String {
    format!("a{}", i + 1)
}

async fn write(h: &mut HeadsClient, offset: u64, data: &[u8]) -> Result<(), tonic::Status> {
    let req =
        pb::HeadWriteRequest { volume_id: VOL.into(), offset, data: Bytes::copy_from_slice(data) };
    h.head_write(req).await.map(drop)
}

async fn flush(h: &mut HeadsClient) -> Result<(), tonic::Status> {
    h.head_flush(pb::HeadFlushRequest { volume_id: VOL.into() }).await.map(drop)
}

async fn read(h: &mut HeadsClient, offset: u64, len: u64) -> Result<Vec<u8>, tonic::Status> {
    let req = pb::HeadReadRequest { volume_id: VOL.into(), offset, length: len };
    h.head_read(req).await.map(|r| r.into_inner().data.to_vec())
}

async fn status(h: &mut HeadsClient) -> pb::HeadStatus {
    let req = pb::HeadStatusRequest { volume_id: VOL.into() };
    h.get_head_status(req).await.unwrap().into_inner()
}

fn replica<'a>(s: &'a pb::HeadStatus, agent: &str) -> &'a pb::ReplicaHealth {
    s.replicas.iter().find(|r| r.agent == agent).unwrap_or_else(|| panic!("{agent}: {s:?}"))
}

/// Waits until every replica of the head is in sync again.
async fn healed(h: &mut HeadsClient) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(h).await;
        if s.replicas.iter().all(|r| r.in_sync) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "not healed: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_missed_an_acknowledged_write_never_takes_over() {
    let mut s = Site::start(2);
    let mut h1 = s.heads(0).await;
    h1.open_head(s.open_request(1, 2)).await.unwrap();
    let old = pattern(1, MIB as usize);
    write(&mut h1, 0, &old).await.unwrap();
    flush(&mut h1).await.unwrap();

    // a2 dies; a write is acknowledged (and flushed) with only a1.
    s.kill(1);
    let new = pattern(2, MIB as usize);
    write(&mut h1, 0, &new).await.expect("acknowledged with a1 alone");
    flush(&mut h1).await.expect("flushed with a1 alone");
    assert!(!replica(&status(&mut h1).await, "a2").in_sync);

    // a1 dies; a2 comes back, and a head is opened on it at a higher epoch
    // naming both agents and no stale ones, as the operator does.
    s.kill(0);
    s.restart(1);
    let mut h2 = s.heads(1).await;
    let err = h2.open_head(s.open_request(2, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("agents a1 ") && err.message().contains("accept_data_loss"),
        "the refusal names the missing agent and the override: {err:?}"
    );
    let err = read(&mut h2, 0, BS).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "no head serves the old data: {err:?}");

    // a1 returns: the open works, the acknowledged write reads back, and
    // a2 is rebuilt from a1, never the reverse.
    s.restart(0);
    let opened = h2.open_head(s.open_request(3, 2)).await.unwrap().into_inner();
    let a2 = replica(&opened, "a2");
    assert!(!a2.in_sync && a2.reason.contains("not in the in-sync set"), "{opened:?}");
    assert!(read(&mut h2, 0, MIB).await.unwrap() == new, "the acknowledged write is served");
    healed(&mut h2).await;
    assert!(s.replica_read(0, 0, MIB).await == new, "a1 keeps the acknowledged write");
    assert!(s.replica_read(1, 0, MIB).await == new, "a2 was rebuilt from a1");
    assert!(read(&mut h2, 0, MIB).await.unwrap() == new);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_override_opens_on_the_stale_replica_and_says_so() {
    let mut s = Site::start(2);
    let mut h1 = s.heads(0).await;
    h1.open_head(s.open_request(1, 2)).await.unwrap();
    let old = pattern(3, MIB as usize);
    write(&mut h1, 0, &old).await.unwrap();
    flush(&mut h1).await.unwrap();
    s.kill(1);
    write(&mut h1, 0, &pattern(4, MIB as usize)).await.unwrap();
    flush(&mut h1).await.unwrap();
    s.kill(0);
    s.restart(1);
    // a1 is lost for good: the administrator accepts the loss.
    let mut h2 = s.heads(1).await;
    let forced = pb::OpenHeadRequest { accept_data_loss: true, ..s.open_request(2, 2) };
    let opened = h2.open_head(forced).await.unwrap().into_inner();
    assert!(replica(&opened, "a2").in_sync, "{opened:?}");
    assert!(!replica(&opened, "a1").in_sync, "{opened:?}");
    assert!(read(&mut h2, 0, MIB).await.unwrap() == old, "what a2 holds");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_restarted_under_a_head_is_rebuilt_not_trusted() {
    let mut s = Site::start(2);
    let mut h = s.heads(0).await;
    h.open_head(s.open_request(1, 2)).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let first = pattern(5, 2 * MIB as usize);
    write(&mut h, 0, &first).await.unwrap();
    model[..first.len()].copy_from_slice(&first);
    flush(&mut h).await.unwrap();
    // These reach a2's memory but are never flushed there.
    let second = pattern(6, MIB as usize);
    write(&mut h, 5 * MIB, &second).await.unwrap();
    model[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&second);
    // a2 restarts well within the peer timeout (5 s).
    s.kill(1);
    s.restart(1);
    flush(&mut h).await.expect("a1 has every write");
    let st = status(&mut h).await;
    let a2 = replica(&st, "a2");
    assert!(!a2.in_sync, "a restarted replica is not taken for the one written to: {st:?}");
    assert!(a2.reason.contains("incarnation"), "{st:?}");
    healed(&mut h).await;
    flush(&mut h).await.unwrap();
    assert!(s.replica_read(0, 0, SIZE).await == model, "a1 holds every acknowledged write");
    assert!(s.replica_read(1, 0, SIZE).await == model, "a2 was rebuilt with every write");
    let req = pb::HeadDigestRequest { volume_id: VOL.into(), snapshot_id: String::new() };
    let digest = h.head_digest(req).await.unwrap().into_inner().digest;
    let want = cairn_api::digest::image_digest(
        SIZE,
        model.chunks(BS as usize).enumerate().map(|(i, d)| (i as u64, d)),
    );
    assert_eq!(&digest[..], &want.0[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_block_on_the_only_copy_costs_that_block_and_nothing_more() {
    let mut s = Site::start(1);
    let mut h = s.heads(0).await;
    h.open_head(s.open_request(1, 1)).await.unwrap();
    let data = pattern(7, 2 * MIB as usize);
    write(&mut h, 0, &data).await.unwrap();
    flush(&mut h).await.unwrap();
    // One write from offset 0 into a fresh replica: slot i holds block i.
    let files = s.layer_files(0);
    assert_eq!(files.len(), 1, "{files:?}");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&files[0]).unwrap();
    let at = 5 * BS + 100;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    assert_eq!(byte[0], data[at as usize], "slot 5 holds block 5");
    f.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let bad = read(&mut h, 5 * BS, BS).await.unwrap_err();
    assert_eq!(bad.code(), Code::DataLoss, "{bad:?}");
    assert!(bad.message().contains("byte offset 20480"), "names the block: {bad:?}");
    let rest = |h: &mut HeadsClient| {
        let mut h = h.clone();
        let data = data.clone();
        async move {
            assert!(read(&mut h, 0, 5 * BS).await.unwrap() == data[..5 * BS as usize]);
            let from = 6 * BS as usize;
            let got = read(&mut h, 6 * BS, 2 * MIB - 6 * BS).await.unwrap();
            assert!(got == data[from..], "the rest of the chunk reads back");
        }
    };
    rest(&mut h).await;
    // Several heal intervals pass: nothing "repairs" the only copy.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = status(&mut h).await;
    assert!(replica(&st, "a1").in_sync, "{st:?}");
    rest(&mut h).await;
    assert_eq!(read(&mut h, 5 * BS, BS).await.unwrap_err().code(), Code::DataLoss);

    // After a restart the data is still there, bad block included.
    s.kill(0);
    s.restart(0);
    let mut h = s.heads(0).await;
    h.open_head(s.open_request(2, 1)).await.unwrap();
    rest(&mut h).await;
    assert_eq!(read(&mut h, 5 * BS, BS).await.unwrap_err().code(), Code::DataLoss);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_heads_never_share_an_epoch_and_a_stale_open_leaves_the_live_head() {
    let s = Site::start(3);
    let mut h1 = s.heads(0).await;
    h1.open_head(s.open_request(1, 2)).await.unwrap();
    let data = pattern(8, MIB as usize);
    write(&mut h1, 0, &data).await.unwrap();

    // Another agent at the same epoch is refused by the replicas.
    let mut h3 = s.heads(2).await;
    let err = h3.open_head(s.open_request(1, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("belongs to the head on agent a1"), "{err:?}");
    write(&mut h1, MIB, &data).await.expect("the head at epoch 1 keeps serving");

    // A newer head on a1, then a stale open there: refused, and the live
    // head keeps serving.
    h1.open_head(s.open_request(5, 2)).await.unwrap();
    let err = h1.open_head(s.open_request(4, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(status(&mut h1).await.epoch, 5);
    write(&mut h1, 2 * MIB, &data).await.expect("the epoch-5 head still serves");
    // A stale open elsewhere fails at the replicas; a1's head serves on.
    let err = h3.open_head(s.open_request(3, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    write(&mut h1, 3 * MIB, &data).await.unwrap();
    flush(&mut h1).await.unwrap();
    for at in [0, MIB, 2 * MIB, 3 * MIB] {
        assert!(read(&mut h1, at, MIB).await.unwrap() == data, "at {at}");
    }
}
