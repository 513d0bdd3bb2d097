//! Site-to-site copies over mutual TLS: site A's agent copies to site B's
//! site listener with a certificate signed by A's CA, which B trusts; a
//! sender whose certificate is signed by a CA B does not trust is refused
//! at the handshake and nothing is written at B; a plain-text attempt at the
//! TLS listener fails too.

use std::ffi::{OsStr, OsString};

use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, pattern, tls::SiteCa};
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const SECRET: &[u8] = b"site-a-to-site-b-pairing-secret";

fn open(volume: &str, name: &str, a: &AgentProcess) -> pb::OpenHeadRequest {
    let role = if volume == "dst" { pb::VolumeRole::Remote } else { pb::VolumeRole::Primary };
    pb::OpenHeadRequest {
        role: role as i32,
        ..cairn_e2e::open_head_request(volume, SIZE, SIZE, 1, [(name.to_string(), a.endpoint())])
    }
}

async fn source(heads: &mut HeadsClient, a: &AgentProcess, name: &str) {
    heads.open_head(open("src", name, a)).await.unwrap();
    let req = pb::HeadWriteRequest {
        volume_id: "src".into(),
        offset: 0,
        data: pattern(7, 4 * MIB as usize).into(),
    };
    heads.head_write(req).await.unwrap();
    let snap = pb::HeadSnapshotRequest {
        volume_id: "src".into(),
        snapshot_id: "s1".into(),
        generation: 1,
    };
    heads.head_snapshot(snap).await.unwrap();
}

fn copy(to: String) -> pb::CopySnapshotRequest {
    pb::CopySnapshotRequest {
        volume_id: "src".into(),
        snapshot_id: "s1".into(),
        base_snapshot_id: String::new(),
        link_id: "a-to-b".into(),
        pairing_secret: SECRET.to_vec().into(),
        target_endpoint: to,
        rate_bytes_per_sec: 0,
        source: pb::SourceSelection::Primary as i32,
        ..Default::default()
    }
}

fn args(extra: &[OsString]) -> Vec<&OsStr> {
    extra.iter().map(|a| a.as_os_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_trusted_site_can_copy_and_the_wrong_ca_writes_nothing() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (ca_a, ca_b, ca_x) =
        (SiteCa::new("a").unwrap(), SiteCa::new("b").unwrap(), SiteCa::new("x").unwrap());
    let certs = dirs[3].path();
    let a_args = ca_a.agent_args("a1", &[&ca_b], certs).unwrap();
    let x_args = ca_x.agent_args("x1", &[&ca_b], certs).unwrap();
    let mut b_args = ca_b.agent_args("b1", &[&ca_a], certs).unwrap();
    b_args.extend(["--site-listen".into(), "127.0.0.1:0".into()]);

    let a1 = AgentProcess::start_args(dirs[0].path(), "a1", &args(&a_args)).unwrap();
    let x1 = AgentProcess::start_args(dirs[1].path(), "x1", &args(&x_args)).unwrap();
    let b1 = AgentProcess::start_args(dirs[2].path(), "b1", &args(&b_args)).unwrap();
    let site_b = b1.site_endpoint().expect("b1 has a site listener");

    let mut heads_b = b1.heads().await.unwrap();
    heads_b.open_head(open("dst", "b1", &b1)).await.unwrap();
    let register = pb::RegisterLinkRequest {
        link_id: "a-to-b".into(),
        pairing_secret: SECRET.to_vec().into(),
        target_volume_id: "dst".into(),
    };
    cairn_e2e::copy_client(&b1).await.unwrap().register_link(register).await.unwrap();

    // A sender from an untrusted site, even with the right link and secret:
    // refused at the handshake, nothing written.
    let mut heads_x = x1.heads().await.unwrap();
    source(&mut heads_x, &x1, "x1").await;
    let refused = heads_x.copy_snapshot(copy(site_b.clone())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    eprintln!("untrusted sender: {}", refused.message());
    let snaps = |mut h: HeadsClient| async move {
        let req = pb::HeadDigestRequest { volume_id: "dst".into(), snapshot_id: "s1".into() };
        h.head_digest(req).await
    };
    assert!(snaps(heads_b.clone()).await.is_err(), "no s1 at B");
    let empty = pb::HeadDigestRequest { volume_id: "dst".into(), snapshot_id: String::new() };
    let head_b = heads_b.head_digest(empty.clone()).await.unwrap().into_inner().digest;

    // Plain text at the TLS listener: no.
    let mut heads_a = a1.heads().await.unwrap();
    source(&mut heads_a, &a1, "a1").await;
    let plain = site_b.replace("https://", "http://");
    assert!(heads_a.copy_snapshot(copy(plain)).await.is_err());
    assert_eq!(
        heads_b.head_digest(empty).await.unwrap().into_inner().digest,
        head_b,
        "B untouched"
    );

    // The trusted site: copied and sealed with the same digest.
    let done = heads_a.copy_snapshot(copy(site_b)).await.unwrap().into_inner();
    let at_b = snaps(heads_b.clone()).await.unwrap().into_inner().digest;
    assert_eq!(done.digest, at_b);
    assert_eq!(done.bytes_sent, 4 * MIB);
}
