//! Process-level tests of the volume head: three real agents on loopback, a
//! volume striped over them with two replicas, I/O through the head of one
//! agent over gRPC; an agent killed with SIGKILL while writing; a newer
//! head fencing the old one; bad requests.

use bytes::Bytes;
use cairn_api::{Digest, agent::v1 as pb, digest::image_digest};
use cairn_e2e::{AgentProcess, HeadsClient, pattern};
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const CHUNK: u64 = 4 * MIB;
const VOL: &str = "striped";

struct Site {
    _dirs: Vec<tempfile::TempDir>,
    agents: Vec<Option<AgentProcess>>,
}

fn site(n: usize) -> Site {
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Some(AgentProcess::start_named(d.path(), &format!("a{}", i + 1)).unwrap()))
        .collect();
    Site { _dirs: dirs, agents }
}

impl Site {
    fn open_request(&self, epoch: u64) -> pb::OpenHeadRequest {
        // A killed agent keeps its place in the layout (with no endpoint).
        let agents = cairn_e2e::numbered(self.agents.iter().map(Option::as_ref));
        pb::OpenHeadRequest { epoch, ..cairn_e2e::open_head_request(VOL, SIZE, CHUNK, 2, agents) }
    }

    async fn heads(&self, i: usize) -> HeadsClient {
        self.agents[i].as_ref().unwrap().heads().await.unwrap()
    }
}

/// Writes through the head in requests of at most 4 MiB, and into `model`.
async fn write(h: &mut HeadsClient, model: &mut [u8], offset: u64, data: Vec<u8>) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    for (i, part) in data.chunks(4 * MIB as usize).enumerate() {
        let at = offset + i as u64 * 4 * MIB;
        let req = pb::HeadWriteRequest {
            volume_id: VOL.into(),
            offset: at,
            data: Bytes::copy_from_slice(part),
        };
        h.head_write(req).await.unwrap_or_else(|e| panic!("HeadWrite at {at}: {e}"));
    }
}

async fn read_all(h: &mut HeadsClient) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(4 * MIB as usize) {
        let req = pb::HeadReadRequest { volume_id: VOL.into(), offset: off, length: 4 * MIB };
        out.extend_from_slice(&h.head_read(req).await.unwrap().into_inner().data);
    }
    out
}

fn digest_of(model: &[u8]) -> Digest {
    image_digest(SIZE, model.chunks(4096).enumerate().map(|(i, d)| (i as u64, d)))
}

async fn head_digest(h: &mut HeadsClient) -> Digest {
    let req = pb::HeadDigestRequest { volume_id: VOL.into(), snapshot_id: String::new() };
    let d = h.head_digest(req).await.unwrap().into_inner().digest;
    Digest(d[..].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_striped_volume_survives_an_agent_killed_while_writing() {
    let mut s = site(3);
    let mut h = s.heads(0).await;
    let status = h.open_head(s.open_request(1)).await.unwrap().into_inner();
    assert_eq!(status.replicas.len(), 3, "{status:?}");
    assert_eq!(status.replicas.iter().map(|r| r.chunks).sum::<u64>(), 2 * SIZE / CHUNK);
    let mut model = vec![0u8; SIZE as usize];
    write(&mut h, &mut model, 0, pattern(1, 10 * MIB as usize)).await;
    write(&mut h, &mut model, 3 * MIB + 17, pattern(2, 5000)).await;
    write(&mut h, &mut model, 40 * MIB - 3, pattern(3, MIB as usize)).await;
    h.head_flush(pb::HeadFlushRequest { volume_id: VOL.into() }).await.unwrap();
    assert!(read_all(&mut h).await == model);
    assert_eq!(head_digest(&mut h).await, digest_of(&model));

    // Kill a2 with SIGKILL between writes; the head goes on with the rest.
    s.agents[1].take().unwrap().kill9().unwrap();
    for i in 0..8u64 {
        write(&mut h, &mut model, i * 7 * MIB + 4096, pattern(10 + i, MIB as usize)).await;
    }
    h.head_flush(pb::HeadFlushRequest { volume_id: VOL.into() }).await.unwrap();
    let status = h
        .get_head_status(pb::HeadStatusRequest { volume_id: VOL.into() })
        .await
        .unwrap()
        .into_inner();
    let a2 = status.replicas.iter().find(|r| r.agent == "a2").unwrap();
    assert!(!a2.in_sync && !a2.reason.is_empty(), "{status:?}");
    assert!(status.replicas.iter().filter(|r| r.agent != "a2").all(|r| r.in_sync));
    assert!(read_all(&mut h).await == model, "files intact with one agent gone");
    assert_eq!(head_digest(&mut h).await, digest_of(&model));
    // A snapshot taken now is sealed on the replicas still in sync.
    let snap = pb::HeadSnapshotRequest {
        volume_id: VOL.into(),
        snapshot_id: "after-kill".into(),
        generation: 1,
    };
    let digest = h.head_snapshot(snap).await.unwrap().into_inner().digest;
    assert_eq!(&digest[..], &digest_of(&model).0[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_opened_elsewhere_with_a_higher_epoch_fences_the_old_one() {
    let s = site(3);
    let mut old = s.heads(0).await;
    old.open_head(s.open_request(1)).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    write(&mut old, &mut model, 0, pattern(4, MIB as usize)).await;
    let mut new = s.heads(2).await;
    new.open_head(s.open_request(2)).await.unwrap();
    let req =
        pb::HeadWriteRequest { volume_id: VOL.into(), offset: 0, data: vec![9u8; 4096].into() };
    let err = old.head_write(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("fenced") && err.message().contains("epoch 2"), "{err:?}");
    // The new head sees what the old one wrote before it was fenced.
    assert!(read_all(&mut new).await == model);
    // Opening with a stale epoch is refused too.
    let err = old.open_head(s.open_request(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_head_requests_get_clear_errors() {
    let s = site(3);
    let mut h = s.heads(0).await;
    h.open_head(s.open_request(1)).await.unwrap();
    let past = pb::HeadWriteRequest {
        volume_id: VOL.into(),
        offset: SIZE - 10,
        data: vec![1u8; 20].into(),
    };
    let err = h.head_write(past).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("outside"), "{err:?}");
    let long = pb::HeadReadRequest { volume_id: VOL.into(), offset: 0, length: 5 * MIB };
    let err = h.head_read(long).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("limit"), "{err:?}");
    let unknown = pb::HeadReadRequest { volume_id: "nope".into(), offset: 0, length: 4096 };
    let err = h.head_read(unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("OpenHead"), "{err:?}");
    let bad_id = pb::HeadReadRequest { volume_id: "../x".into(), offset: 0, length: 4096 };
    assert_eq!(h.head_read(bad_id).await.unwrap_err().code(), Code::InvalidArgument);
    let mut too_many = s.open_request(1);
    too_many.replicas = 4;
    too_many.volume_id = "other".into();
    let err = h.open_head(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("4 replicas need at least 4 agents"), "{err:?}");
}
