//! The CSI node plugin as kubelet drives it: real `cairn-agent` processes
//! (three, a volume striped over them with two replicas), the head opened
//! on one of them the way the operator does (OpenHead, fuse=false), and
//! `cairn-csi node` processes, one per "node", called over their unix
//! sockets with the generated CSI client: stage, publish, write, unpublish,
//! unstage; the volume moved to another node at a newer epoch with its
//! files; raw block, read-only, xfs and expansion; idempotent repeats; the
//! error codes of every RPC; ABORTED for a concurrent call. Identity in
//! both roles.
//!
//! The tests that attach volumes need root, /dev/fuse, loop devices and
//! the filesystem tools; they are skipped with a message otherwise. The
//! identity and validation tests run anywhere.

mod support;

use std::{
    collections::HashMap,
    ffi::OsStr,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use cairn_api::{
    agent::v1 as pb,
    csi::v1::{
        self as csi,
        volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode},
    },
};
use cairn_e2e::{AgentProcess, pattern};
use support::CsiProcess;
use tonic::Code;

const MIB: u64 = 1 << 20;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    for need in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(need).exists() {
            return Some(format!("{need} is missing"));
        }
    }
    let tools = ["losetup", "blkid", "mount", "umount", "mkfs.ext4", "resize2fs"];
    for tool in tools.iter().chain(&["mkfs.xfs", "xfs_growfs"]) {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

macro_rules! needs_root {
    () => {
        if let Some(why) = skip_reason() {
            cairn_e2e::skip(&format!("needs root, /dev/fuse, loop devices and mkfs tools ({why})"));
            return;
        }
    };
}

/// Undoes, even when a test fails, every mount and loop device under the
/// test's directory (after the processes are gone: declare it before them).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Loop devices first, while their files still have their paths
        // (detaching a mounted one is deferred until it is unmounted).
        for entry in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let backing = std::fs::read_to_string(entry.path().join("loop/backing_file"));
            if backing.is_ok_and(|b| Path::new(b.trim()).starts_with(&self.0)) {
                let _ = Command::new("losetup").arg("-d").arg(format!("/dev/{name}")).status();
            }
        }
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|p| p.replace("\\040", " ")))
            .filter(|p| Path::new(p).starts_with(&self.0))
            .collect();
        points.reverse();
        for p in &points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Whether this process may grow a mounted ext4 (online resize needs
/// CAP_SYS_RESOURCE, which some containers drop even for root).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps >> 24 & 1 == 1)
}

/// The loop devices attached to `file`.
fn loops_of(file: &Path) -> usize {
    let out = Command::new("losetup").arg("-j").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Three agents named a1..a3, each with its own FUSE directory.
fn agents(base: &Path) -> Vec<AgentProcess> {
    (1..=3)
        .map(|i| {
            let data = base.join(format!("agent-{i}"));
            let fuse = base.join(format!("fuse-{i}"));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(&fuse).unwrap();
            let args = [OsStr::new("--fuse-dir"), fuse.as_os_str()];
            AgentProcess::start_args(&data, &format!("a{i}"), &args).unwrap()
        })
        .collect()
}

/// The OpenHead request the operator sends: `volume` over the three
/// agents, two replicas, 64 MiB chunks, without FUSE.
fn open_request(
    volume: &str,
    size: u64,
    epoch: u64,
    agents: &[AgentProcess],
) -> pb::OpenHeadRequest {
    pb::OpenHeadRequest {
        epoch,
        ..cairn_e2e::open_head_request(
            volume,
            size,
            64 * MIB,
            2,
            cairn_e2e::numbered(agents.iter().map(Some)),
        )
    }
}

/// Opens the head on `agent` as the operator does, and returns the publish
/// context ControllerPublishVolume hands the node.
async fn publish_on(agent: &AgentProcess, request: pb::OpenHeadRequest) -> HashMap<String, String> {
    agent.heads().await.unwrap().open_head(request.clone()).await.unwrap();
    cairn_csi::publish_context(&request)
}

fn capability(access_type: AccessType, mode: Mode) -> Option<csi::VolumeCapability> {
    Some(csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn mount_cap(fs: &str) -> Option<csi::VolumeCapability> {
    let m =
        MountVolume { fs_type: fs.into(), mount_flags: vec![], volume_mount_group: String::new() };
    capability(AccessType::Mount(m), Mode::SingleNodeWriter)
}

fn block_cap() -> Option<csi::VolumeCapability> {
    capability(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter)
}

fn stage_req(
    volume: &str,
    staging: &Path,
    cap: Option<csi::VolumeCapability>,
    ctx: &HashMap<String, String>,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: volume.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: cap,
        secrets: Default::default(),
        volume_context: Default::default(),
    }
}

fn publish_req(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: Option<csi::VolumeCapability>,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        publish_context: Default::default(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: cap,
        readonly,
        secrets: Default::default(),
        volume_context: Default::default(),
    }
}

fn unstage_req(volume: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
    }
}

fn unpublish_req(volume: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
    }
}

fn stats_req(volume: &str, path: &str) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: volume.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    }
}

fn expand_req(volume: &str, path: &str, required: i64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: volume.into(),
        volume_path: path.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: required, limit_bytes: 0 }),
        staging_target_path: String::new(),
        volume_capability: None,
        secrets: Default::default(),
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(resp) => panic!("expected an error, got {resp:?}"),
        Err(s) => s.code(),
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.display().to_string();
    text.lines().any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

fn bytes_usage(stats: &csi::NodeGetVolumeStatsResponse) -> csi::VolumeUsage {
    stats
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .cloned()
        .expect("a BYTES usage")
}

/// Writes `data` to `path` and makes it durable.
fn write_synced(path: &Path, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_answers_by_role_and_the_node_is_ready_while_its_agent_answers() {
    let base = tempfile::tempdir().unwrap();
    let agent_dir = base.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = AgentProcess::start_named(&agent_dir, "a1").unwrap();

    let controller =
        CsiProcess::start(&base.path().join("ctrl/csi.sock"), &["controller".as_ref()]);
    let node = CsiProcess::node(base.path(), "node-a", &agent.endpoint());

    for (p, controller_service) in [(&controller, true), (&node, false)] {
        let mut id = p.identity().await;
        let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.name, cairn_csi::DRIVER_NAME);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        use csi::plugin_capability::{Type, service::Type as S};
        let services: Vec<S> = caps
            .capabilities
            .iter()
            .map(|c| match &c.r#type {
                Some(Type::Service(s)) => S::try_from(s.r#type).unwrap(),
                other => panic!("unexpected capability {other:?}"),
            })
            .collect();
        assert!(services.contains(&S::VolumeAccessibilityConstraints), "{services:?}");
        assert_eq!(services.contains(&S::ControllerService), controller_service, "{services:?}");
        let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(true));
    }

    // The node's topology is its agent's storage cluster.
    let mut n = node.node_client().await;
    let info = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(info.max_volumes_per_node, 0);
    assert_eq!(
        info.accessible_topology.unwrap().segments,
        HashMap::from([(cairn_csi::TOPOLOGY_CLUSTER_KEY.to_string(), "site-a".to_string())])
    );
    let caps = n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap();
    use csi::node_service_capability::{Type, rpc::Type as R};
    let rpcs: Vec<R> = caps
        .into_inner()
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => R::try_from(r.r#type).unwrap(),
            None => panic!("empty capability"),
        })
        .collect();
    assert_eq!(rpcs, [R::StageUnstageVolume, R::GetVolumeStats, R::VolumeCondition]);

    // Without its agent the node is not ready.
    agent.terminate().unwrap();
    let probe = node.identity().await.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    let probe = controller.identity().await.probe(csi::ProbeRequest {}).await.unwrap();
    assert_eq!(probe.into_inner().ready, Some(true));
}

#[tokio::test(flavor = "multi_thread")]
async fn node_rpcs_refuse_bad_requests_with_the_csi_codes() {
    let base = tempfile::tempdir().unwrap();
    // No agent is needed to refuse these: nothing reaches it.
    let node = CsiProcess::node(base.path(), "node-a", "http://127.0.0.1:9");
    let mut n = node.node_client().await;
    let stage = base.path().join("staging/v1");
    let target = base.path().join("pods/p1/v1");
    let ctx = HashMap::new();
    let s = |r| async { code(node.node_client().await.node_stage_volume(r).await) };

    // NodeStageVolume: missing or malformed fields, unsupported capabilities.
    assert_eq!(s(stage_req("", &stage, mount_cap("ext4"), &ctx)).await, Code::InvalidArgument);
    assert_eq!(
        s(stage_req("v1", Path::new(""), mount_cap("ext4"), &ctx)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        s(stage_req("v1", Path::new("rel/x"), mount_cap(""), &ctx)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        s(stage_req("v1", Path::new("/a/../b"), mount_cap(""), &ctx)).await,
        Code::InvalidArgument
    );
    assert_eq!(s(stage_req("V/1", &stage, mount_cap(""), &ctx)).await, Code::InvalidArgument);
    assert_eq!(s(stage_req("v1", &stage, None, &ctx)).await, Code::InvalidArgument);
    assert_eq!(s(stage_req("v1", &stage, mount_cap("btrfs"), &ctx)).await, Code::InvalidArgument);
    let multi = capability(AccessType::Block(BlockVolume {}), Mode::MultiNodeMultiWriter);
    assert_eq!(s(stage_req("v1", &stage, multi, &ctx)).await, Code::InvalidArgument);
    // Not published to this node: no publish context.
    assert_eq!(s(stage_req("v1", &stage, mount_cap(""), &ctx)).await, Code::FailedPrecondition);
    let garbled = HashMap::from([
        (cairn_csi::PUBLISH_EPOCH_KEY.to_string(), "1".to_string()),
        (cairn_csi::PUBLISH_OPEN_HEAD_KEY.to_string(), "%%%".to_string()),
    ]);
    assert_eq!(s(stage_req("v1", &stage, mount_cap(""), &garbled)).await, Code::InvalidArgument);

    // NodeUnstageVolume: fields required; unknown volume is already done.
    assert_eq!(code(n.node_unstage_volume(unstage_req("", &stage)).await), Code::InvalidArgument);
    assert_eq!(
        code(n.node_unstage_volume(unstage_req("v1", Path::new(""))).await),
        Code::InvalidArgument
    );
    n.node_unstage_volume(unstage_req("v1", &stage)).await.unwrap();

    // NodePublishVolume: fields required; a volume not staged here.
    let p = |r| async { code(node.node_client().await.node_publish_volume(r).await) };
    assert_eq!(
        p(publish_req("", &stage, &target, mount_cap(""), false)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        p(publish_req("v1", &stage, Path::new(""), mount_cap(""), false)).await,
        Code::InvalidArgument
    );
    assert_eq!(p(publish_req("v1", &stage, &target, None, false)).await, Code::InvalidArgument);
    assert_eq!(
        p(publish_req("v1", Path::new(""), &target, mount_cap(""), false)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        p(publish_req("v1", &stage, Path::new("/x/../y"), mount_cap(""), false)).await,
        Code::InvalidArgument
    );
    assert_eq!(p(publish_req("v1", &stage, &target, mount_cap(""), false)).await, Code::NotFound);

    // NodeUnpublishVolume: fields required; an absent target is done.
    assert_eq!(
        code(n.node_unpublish_volume(unpublish_req("", &target)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_unpublish_volume(unpublish_req("v1", Path::new(""))).await),
        Code::InvalidArgument
    );
    n.node_unpublish_volume(unpublish_req("v1", &target)).await.unwrap();

    // NodeGetVolumeStats and NodeExpandVolume: fields required; unknown
    // volumes are NOT_FOUND.
    assert_eq!(code(n.node_get_volume_stats(stats_req("", "/x")).await), Code::InvalidArgument);
    assert_eq!(code(n.node_get_volume_stats(stats_req("v1", "")).await), Code::InvalidArgument);
    assert_eq!(code(n.node_get_volume_stats(stats_req("v1", "some/path")).await), Code::NotFound);
    assert_eq!(code(n.node_expand_volume(expand_req("", "/x", 0)).await), Code::InvalidArgument);
    assert_eq!(code(n.node_expand_volume(expand_req("v1", "", 0)).await), Code::InvalidArgument);
    assert_eq!(code(n.node_expand_volume(expand_req("v1", "some/path", 0)).await), Code::NotFound);
    assert_eq!(code(n.node_expand_volume(expand_req("v1", "/x", -1)).await), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ext4_volume_keeps_its_files_when_it_moves_to_another_node() {
    needs_root!();
    let base = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(base.path().to_path_buf());
    let agents = agents(base.path());
    let node_a = CsiProcess::node(base.path(), "node-a", &agents[0].endpoint());
    let node_b = CsiProcess::node(base.path(), "node-b", &agents[1].endpoint());
    let (vol, size) = ("pvc-files", 256 * MIB);
    let ctx1 = publish_on(&agents[0], open_request(vol, size, 1, &agents)).await;
    let staging = base.path().join("kubelet/staging/pvc-files");
    let target = base.path().join("kubelet/pods/p1/volumes/pvc-files");
    let target_ro = base.path().join("kubelet/pods/p2/volumes/pvc-files");

    // Two stages at once: one does the work, the other is told to retry.
    let (mut c1, mut c2) = (node_a.node_client().await, node_a.node_client().await);
    let (r1, r2) = tokio::join!(
        c1.node_stage_volume(stage_req(vol, &staging, mount_cap("ext4"), &ctx1)),
        c2.node_stage_volume(stage_req(vol, &staging, mount_cap("ext4"), &ctx1)),
    );
    let codes = [
        r1.map(|_| Code::Ok).unwrap_or_else(|s| s.code()),
        r2.map(|_| Code::Ok).unwrap_or_else(|s| s.code()),
    ];
    assert!(codes.contains(&Code::Ok) && codes.contains(&Code::Aborted), "{codes:?}");
    let mut n = node_a.node_client().await;
    // Repeats are no-ops; a different access type is a conflict.
    n.node_stage_volume(stage_req(vol, &staging, mount_cap("ext4"), &ctx1)).await.unwrap();
    let conflict = n.node_stage_volume(stage_req(vol, &staging, block_cap(), &ctx1)).await;
    assert_eq!(code(conflict), Code::AlreadyExists);
    assert!(is_mountpoint(&staging));

    n.node_publish_volume(publish_req(vol, &staging, &target, mount_cap("ext4"), false))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(vol, &staging, &target, mount_cap("ext4"), false))
        .await
        .unwrap();
    let mismatch =
        n.node_publish_volume(publish_req(vol, &staging, &target, mount_cap("ext4"), true)).await;
    assert_eq!(code(mismatch), Code::AlreadyExists);
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4)
        .map(|i| (target.join(format!("file-{i}")), pattern(i, (MIB as usize) + i as usize * 4097)))
        .collect();
    for (path, data) in &files {
        write_synced(path, data);
    }

    // A read-only publish of the same staging mount refuses writes.
    n.node_publish_volume(publish_req(vol, &staging, &target_ro, mount_cap("ext4"), true))
        .await
        .unwrap();
    assert_eq!(std::fs::read(target_ro.join("file-1")).unwrap(), files[1].1);
    let e = std::fs::write(target_ro.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // Stats: the filesystem's bytes and inodes, and a healthy head.
    let stats = n
        .node_get_volume_stats(stats_req(vol, target.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    let bytes = bytes_usage(&stats);
    assert!(bytes.total > 200 * MIB as i64 && bytes.total <= size as i64, "{stats:?}");
    assert!(bytes.used >= 4 * MIB as i64, "{stats:?}");
    assert!(stats.usage.iter().any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32));
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{condition:?}");
    let gone = n.node_get_volume_stats(stats_req(vol, "/no/such/path")).await;
    assert_eq!(code(gone), Code::NotFound);

    // Unstaging while published is refused; undo in order, twice.
    let busy = n.node_unstage_volume(unstage_req(vol, &staging)).await;
    assert_eq!(code(busy), Code::FailedPrecondition);
    assert!(std::fs::read(target.join("file-0")).unwrap() == files[0].1, "still mounted");
    for t in [&target, &target_ro] {
        for _ in 0..2 {
            n.node_unpublish_volume(unpublish_req(vol, t)).await.unwrap();
        }
        assert!(!t.exists(), "unpublish removes {}", t.display());
    }
    for _ in 0..2 {
        n.node_unstage_volume(unstage_req(vol, &staging)).await.unwrap();
    }
    assert!(!is_mountpoint(&staging));
    let fuse_a = base.path().join("fuse-1").join(vol).join("volume");
    assert!(fuse_a.exists(), "the head stays open and exposed on agent 1");
    assert!(Command::new("losetup").arg("-j").arg(&fuse_a).output().unwrap().stdout.is_empty());

    // The operator moves the head to agent 2 at epoch 2; node-b stages it
    // and finds the files.
    let ctx2 = publish_on(&agents[1], open_request(vol, size, 2, &agents)).await;
    let staging_b = base.path().join("kubelet-b/staging/pvc-files");
    let target_b = base.path().join("kubelet-b/pods/p3/volumes/pvc-files");
    let mut nb = node_b.node_client().await;
    // An old publish context (epoch 1, agent 1's request) is refused by the
    // agent: that head was fenced.
    let stale = nb.node_stage_volume(stage_req(vol, &staging_b, mount_cap("ext4"), &ctx1)).await;
    assert_ne!(code(stale), Code::Ok);
    // Asking for xfs on this ext4 volume never reformats it.
    let other_fs = nb.node_stage_volume(stage_req(vol, &staging_b, mount_cap("xfs"), &ctx2)).await;
    assert_eq!(code(other_fs), Code::FailedPrecondition);
    nb.node_stage_volume(stage_req(vol, &staging_b, mount_cap(""), &ctx2)).await.unwrap();
    nb.node_publish_volume(publish_req(vol, &staging_b, &target_b, mount_cap(""), false))
        .await
        .unwrap();
    for (path, data) in &files {
        let moved = target_b.join(path.file_name().unwrap());
        assert!(std::fs::read(&moved).unwrap() == *data, "{} differs", moved.display());
    }
    nb.node_unpublish_volume(unpublish_req(vol, &target_b)).await.unwrap();
    nb.node_unstage_volume(unstage_req(vol, &staging_b)).await.unwrap();

    for (i, a) in agents.iter().enumerate().take(2) {
        a.heads()
            .await
            .unwrap()
            .close_head(pb::CloseHeadRequest { volume_id: vol.into() })
            .await
            .unwrap_or_else(|e| panic!("closing on a{}: {e}", i + 1));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_block_volume_is_published_as_its_device() {
    needs_root!();
    let base = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(base.path().to_path_buf());
    let agents = agents(base.path());
    let node = CsiProcess::node(base.path(), "node-a", &agents[0].endpoint());
    let (vol, size) = ("pvc-raw", 128 * MIB);
    let ctx = publish_on(&agents[0], open_request(vol, size, 1, &agents)).await;
    let staging = base.path().join("kubelet/staging/pvc-raw");
    let target = base.path().join("kubelet/pods/p1/volumeDevices/pvc-raw");
    let target_ro = base.path().join("kubelet/pods/p2/volumeDevices/pvc-raw");
    let mut n = node.node_client().await;
    for _ in 0..2 {
        n.node_stage_volume(stage_req(vol, &staging, block_cap(), &ctx)).await.unwrap();
    }
    let wrong =
        n.node_publish_volume(publish_req(vol, &staging, &target, mount_cap(""), false)).await;
    assert_eq!(code(wrong), Code::FailedPrecondition);
    for _ in 0..2 {
        n.node_publish_volume(publish_req(vol, &staging, &target, block_cap(), false))
            .await
            .unwrap();
    }
    {
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&target).unwrap().file_type().is_block_device());
    }

    // Bytes written through the published device reach the head.
    let data = pattern(7, 64 * 1024);
    {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&target)
            .unwrap();
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut().copy_from_slice(&data);
        dev.write_all_at(buf.as_ref(), 8 * MIB).unwrap();
        dev.sync_all().unwrap();
    }
    let read = agents[0]
        .heads()
        .await
        .unwrap()
        .head_read(pb::HeadReadRequest {
            volume_id: vol.into(),
            offset: 8 * MIB,
            length: data.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.data == data, "the head serves what was written through the device");

    // Read-only: readable, writes refused.
    n.node_publish_volume(publish_req(vol, &staging, &target_ro, block_cap(), true)).await.unwrap();
    let mut got = vec![0u8; data.len()];
    std::fs::File::open(&target_ro).unwrap().read_exact_at(&mut got, 8 * MIB).unwrap();
    assert!(got == data);
    // The kernel refuses either the open for writing or the write itself.
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(&target_ro)
        .and_then(|f| f.write_all_at(&[1; 4096], 8 * MIB).and_then(|()| f.sync_all()));
    let e = write.expect_err("a read-only block publish takes no writes");
    let refused = [libc::EROFS, libc::EPERM, libc::EACCES];
    assert!(e.raw_os_error().is_some_and(|c| refused.contains(&c)), "{e}");
    std::fs::File::open(&target).unwrap().read_exact_at(&mut got, 8 * MIB).unwrap();
    assert!(got == data, "the read-only publish changed nothing");

    // A restarted plugin finds its volumes again (records and the kernel).
    drop(node);
    let node = CsiProcess::node(base.path(), "node-a", &agents[0].endpoint());
    let mut n = node.node_client().await;
    n.node_stage_volume(stage_req(vol, &staging, block_cap(), &ctx)).await.unwrap();
    let stats = n
        .node_get_volume_stats(stats_req(vol, target.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bytes_usage(&stats).total, size as i64, "{stats:?}");

    // Unstaging while the device is published into a pod is refused.
    let busy = n.node_unstage_volume(unstage_req(vol, &staging)).await;
    assert_eq!(code(busy), Code::FailedPrecondition);
    let fuse_file = base.path().join("fuse-1").join(vol).join("volume");
    assert_eq!(loops_of(&fuse_file), 2, "a read-only device beside the writable one");
    for t in [&target, &target_ro] {
        n.node_unpublish_volume(unpublish_req(vol, t)).await.unwrap();
        assert!(!t.exists());
    }
    assert_eq!(loops_of(&fuse_file), 1, "the read-only device went with its publish");
    n.node_unstage_volume(unstage_req(vol, &staging)).await.unwrap();
    assert_eq!(loops_of(&fuse_file), 0);
    agents[0]
        .heads()
        .await
        .unwrap()
        .close_head(pb::CloseHeadRequest { volume_id: vol.into() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_and_ext4_filesystems_grow_to_the_device_on_expand() {
    needs_root!();
    let base = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(base.path().to_path_buf());
    let agents = agents(base.path());
    let node = CsiProcess::node(base.path(), "node-a", &agents[0].endpoint());
    let mut n = node.node_client().await;
    let size = 512 * MIB;
    let mut cases = vec![("pvc-xfs", "xfs", "-d size=320m")];
    if has_cap_sys_resource() {
        cases.push(("pvc-ext4", "ext4", "128M"));
    } else {
        eprintln!(
            "ext4 online growth not tested: resize2fs needs CAP_SYS_RESOURCE, which this process lacks"
        );
    }
    for (vol, fs, made) in cases {
        // The filesystem was made smaller than the volume (as if the volume
        // had grown since): expanding grows it to the device.
        let request = open_request(vol, size, 1, &agents);
        let exposed = agents[0]
            .heads()
            .await
            .unwrap()
            .open_head(pb::OpenHeadRequest { fuse: true, ..request.clone() })
            .await
            .unwrap()
            .into_inner();
        premake(&exposed.fuse_file, fs, made);
        let ctx = cairn_csi::publish_context(&request);
        let staging = base.path().join(format!("kubelet/staging/{vol}"));
        let target = base.path().join(format!("kubelet/pods/p1/{vol}"));
        n.node_stage_volume(stage_req(vol, &staging, mount_cap(fs), &ctx)).await.unwrap();
        n.node_publish_volume(publish_req(vol, &staging, &target, mount_cap(fs), false))
            .await
            .unwrap();
        write_synced(&target.join("before"), &pattern(1, MIB as usize));
        let path = target.to_str().unwrap();
        let before =
            bytes_usage(&n.node_get_volume_stats(stats_req(vol, path)).await.unwrap().into_inner());

        let too_big = n.node_expand_volume(expand_req(vol, path, 2 * size as i64)).await;
        assert_eq!(code(too_big), Code::FailedPrecondition, "the head is not that big yet");
        let gone = n.node_expand_volume(expand_req(vol, "/no/such/path", 0)).await;
        assert_eq!(code(gone), Code::NotFound);
        for _ in 0..2 {
            let r = n.node_expand_volume(expand_req(vol, path, size as i64)).await.unwrap();
            assert_eq!(r.into_inner().capacity_bytes, size as i64);
        }
        let after =
            bytes_usage(&n.node_get_volume_stats(stats_req(vol, path)).await.unwrap().into_inner());
        assert!(after.total > before.total + 100 * MIB as i64, "{fs}: {before:?} -> {after:?}");
        assert_eq!(std::fs::read(target.join("before")).unwrap(), pattern(1, MIB as usize));

        n.node_unpublish_volume(unpublish_req(vol, &target)).await.unwrap();
        n.node_unstage_volume(unstage_req(vol, &staging)).await.unwrap();
        agents[0]
            .heads()
            .await
            .unwrap()
            .close_head(pb::CloseHeadRequest { volume_id: vol.into() })
            .await
            .unwrap();
    }
}

/// Makes a filesystem on the head's file through a loop device of its own.
fn premake(fuse_file: &str, fs: &str, size_args: &str) {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--sector-size", "4096", fuse_file])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut mkfs = Command::new(format!("mkfs.{fs}"));
    mkfs.arg(if fs == "xfs" { "-f" } else { "-F" }).arg("-q");
    let args: Vec<&str> = size_args.split(' ').collect();
    let status = if fs == "xfs" {
        mkfs.args(&args).arg(&dev).status()
    } else {
        mkfs.arg(&dev).args(&args).status()
    };
    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    assert!(status.unwrap().success(), "mkfs.{fs} {size_args} {dev}");
}

/// A 4096-byte aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `len` initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}
