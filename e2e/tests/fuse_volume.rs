//! A real filesystem on a striped, replicated volume: three agent processes,
//! a 1 GiB volume with two replicas, its head exposed through FUSE on one
//! agent, attached with a loop device, formatted ext4 and mounted; files
//! written and checked; a snapshot taken while a writer writes (the
//! filesystem frozen for that instant) mounts read-only as a clean
//! filesystem; an agent killed with SIGKILL while files are being written,
//! restarted and rebuilt while a writer keeps writing, after which every
//! chunk's replicas have equal digests; closing the head refused while the
//! filesystem is mounted.
//!
//! Needs root, /dev/fuse and loop devices; skipped with a message otherwise.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, pattern};
use tonic::Code;

const GIB: u64 = 1 << 30;
const VOL: &str = "fs-vol";

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
    for tool in ["losetup", "mkfs.ext4", "mount", "umount", "e2fsck", "fsfreeze"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Undoes the mount and the loop device even if the test fails.
struct Attached {
    device: String,
    mnt: PathBuf,
    mounted: bool,
}

impl Attached {
    fn umount(&mut self) {
        if self.mounted {
            run("umount", &[self.mnt.to_str().unwrap()]);
            self.mounted = false;
        }
    }

    fn mount(&mut self) {
        run("mount", &[&self.device, self.mnt.to_str().unwrap()]);
        self.mounted = true;
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Every chunk's replicas, on whichever agents hold them, have equal head
/// digests.
async fn assert_chunk_replicas_agree(agents: &[Option<AgentProcess>]) {
    let mut by_chunk: std::collections::BTreeMap<u64, Vec<(String, Vec<u8>)>> = Default::default();
    for (i, a) in agents.iter().enumerate() {
        let mut client = a.as_ref().unwrap().client().await.unwrap();
        let resp = client
            .chunk_digests(pb::ChunkDigestsRequest {
                volume_id: VOL.into(),
                snapshot_id: String::new(),
                chunks: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        for c in resp.chunks {
            by_chunk
                .entry(c.chunk)
                .or_default()
                .push((format!("a{}", i + 1), c.accumulator.to_vec()));
        }
    }
    assert_eq!(by_chunk.len() as u64, GIB / (64 << 20), "every chunk is held");
    for (chunk, accs) in by_chunk {
        assert_eq!(accs.len(), 2, "chunk {chunk} has two replicas");
        assert_eq!(
            accs[0].1, accs[1].1,
            "chunk {chunk}: replicas on {} and {} differ",
            accs[0].0, accs[1].0
        );
    }
}

fn checksum(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_on_a_striped_volume_keeps_its_files_when_an_agent_is_killed() {
    if let Some(why) = skip_reason() {
        cairn_e2e::skip(&format!("needs root, /dev/fuse and loop devices ({why})"));
        return;
    }
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let fuse_dir = tempfile::tempdir().unwrap();
    let args: [&OsStr; 6] = [
        OsStr::new("--fuse-dir"),
        fuse_dir.path().as_os_str(),
        OsStr::new("--peer-timeout-ms"),
        OsStr::new("2000"),
        OsStr::new("--rebuild-interval-ms"),
        OsStr::new("200"),
    ];
    let mut agents: Vec<Option<AgentProcess>> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Some(AgentProcess::start_args(d.path(), &format!("a{}", i + 1), &args).unwrap())
        })
        .collect();
    let request = |agents: &[Option<AgentProcess>]| pb::OpenHeadRequest {
        fuse: true,
        ..cairn_e2e::open_head_request(
            VOL,
            GIB,
            64 << 20,
            2,
            cairn_e2e::numbered(agents.iter().map(Option::as_ref)),
        )
    };
    let mut heads = agents[0].as_ref().unwrap().heads().await.unwrap();
    let status = heads.open_head(request(&agents)).await.unwrap().into_inner();
    assert!(!status.fuse_file.is_empty(), "{status:?}");

    let device = run("losetup", &["--find", "--show", "--sector-size", "4096", &status.fuse_file]);
    let mnt = tempfile::tempdir().unwrap();
    let mut fs = Attached { device: device.clone(), mnt: mnt.path().to_path_buf(), mounted: false };
    run("mkfs.ext4", &["-q", "-F", &device]);
    fs.mount();

    // Files written and synced, then an agent killed while more are written.
    let mut sums = Vec::new();
    let write_file = |i: usize| {
        let path = mnt.path().join(format!("file-{i}"));
        std::fs::write(&path, pattern(i as u64, (3 << 20) + i * 4097)).unwrap();
        path
    };
    for i in 0..6 {
        let p = write_file(i);
        sums.push((p.clone(), checksum(&p)));
    }
    run("sync", &[]);

    // A snapshot taken while a writer keeps writing: the filesystem is
    // frozen for the moment of the snapshot, as a CSI snapshotter does.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), mnt.path().to_path_buf());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::fs::write(dir.join(format!("busy-{}", i % 8)), pattern(100 + i, 1 << 20))
                    .unwrap();
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    run("fsfreeze", &["-f", mnt.path().to_str().unwrap()]);
    let snap = pb::HeadSnapshotRequest {
        volume_id: VOL.into(),
        snapshot_id: "while-writing".into(),
        generation: 1,
    };
    let sealed = heads.head_snapshot(snap).await;
    run("fsfreeze", &["-u", mnt.path().to_str().unwrap()]);
    sealed.unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0, "the writer was writing");
    let exposed = heads
        .expose_snapshot(pb::ExposeSnapshotRequest {
            volume_id: VOL.into(),
            snapshot_id: "while-writing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap_dev = run(
        "losetup",
        &["--find", "--show", "--read-only", "--sector-size", "4096", &exposed.fuse_file],
    );
    let snap_mnt = tempfile::tempdir().unwrap();
    let mut snap_fs =
        Attached { device: snap_dev.clone(), mnt: snap_mnt.path().to_path_buf(), mounted: false };
    run("e2fsck", &["-fn", &snap_dev]);
    run("mount", &["-o", "ro", &snap_dev, snap_mnt.path().to_str().unwrap()]);
    snap_fs.mounted = true;
    for (p, sum) in &sums {
        let in_snap = snap_mnt.path().join(p.file_name().unwrap());
        assert_eq!(&checksum(&in_snap), sum, "{} as of the snapshot", in_snap.display());
    }
    snap_fs.umount();
    drop(snap_fs);
    heads
        .hide_snapshot(pb::HideSnapshotRequest {
            volume_id: VOL.into(),
            snapshot_id: "while-writing".into(),
        })
        .await
        .unwrap();

    let a2_addr = agents[1].as_ref().unwrap().addr();
    agents[1].take().unwrap().kill9().unwrap();
    for i in 6..12 {
        let p = write_file(i);
        sums.push((p.clone(), checksum(&p)));
    }
    run("sync", &[]);

    let status = |mut heads: cairn_e2e::HeadsClient| async move {
        heads
            .get_head_status(pb::HeadStatusRequest { volume_id: VOL.into() })
            .await
            .unwrap()
            .into_inner()
    };
    let health = status(heads.clone()).await;
    let a2 = health.replicas.iter().find(|r| r.agent == "a2").unwrap();
    assert!(!a2.in_sync, "the killed agent is out of sync: {health:?}");

    // It comes back on its address and is rebuilt while a writer writes.
    agents[1] = Some(AgentProcess::start_on(dirs[1].path(), "a2", a2_addr, &args).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), mnt.path().to_path_buf());
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || i < 4 {
                let path = dir.join(format!("during-rebuild-{i}"));
                let data = pattern(500 + i, (1 << 20) + i as usize * 513);
                std::fs::write(&path, &data).unwrap();
                written.push((path, blake3::hash(&data)));
                i += 1;
            }
            written
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen_progress = false;
    loop {
        let health = status(heads.clone()).await;
        let a2 = health.replicas.iter().find(|r| r.agent == "a2").unwrap().clone();
        seen_progress |= a2.rebuild.is_some();
        if a2.in_sync {
            assert!(a2.last_rebuild.starts_with("rebuilt"), "{a2:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a2 not rebuilt in time: {health:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = writer.join().unwrap();
    run("sync", &[]);
    eprintln!("rebuild progress seen: {seen_progress}; files written during it: {}", during.len());
    heads.head_flush(pb::HeadFlushRequest { volume_id: VOL.into() }).await.unwrap();
    assert_chunk_replicas_agree(&agents).await;
    for (p, sum) in during {
        sums.push((p, sum));
    }

    // Closing the head under a mounted filesystem is refused, saying where.
    let err = heads.close_head(pb::CloseHeadRequest { volume_id: VOL.into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(mnt.path().to_str().unwrap()), "{err:?}");

    // Remount (no page cache left) and check every file and the filesystem.
    fs.umount();
    run("e2fsck", &["-fn", &device]);
    fs.mount();
    for (p, sum) in &sums {
        assert_eq!(&checksum(p), sum, "{} is intact", p.display());
    }
    fs.umount();
    drop(fs);
    heads.close_head(pb::CloseHeadRequest { volume_id: VOL.into() }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_head_agent_leaves_no_dead_mount_in_the_way() {
    if let Some(why) = skip_reason() {
        cairn_e2e::skip(&format!("needs root, /dev/fuse and loop devices ({why})"));
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let fuse_dir = tempfile::tempdir().unwrap();
    let args = [OsStr::new("--fuse-dir"), fuse_dir.path().as_os_str()];
    let agent = AgentProcess::start_args(data.path(), "solo", &args).unwrap();
    let request = |epoch, endpoint: String| pb::OpenHeadRequest {
        epoch,
        fuse: true,
        ..cairn_e2e::open_head_request(
            "solo-vol",
            64 << 20,
            64 << 20,
            1,
            [("solo".to_string(), endpoint)],
        )
    };
    let mut heads = agent.heads().await.unwrap();
    let status = heads.open_head(request(1, agent.endpoint())).await.unwrap().into_inner();
    let device = run("losetup", &["--find", "--show", "--sector-size", "4096", &status.fuse_file]);
    let detach = Attached { device, mnt: PathBuf::new(), mounted: false };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&status.fuse_file).unwrap();
        f.write_all_at(&pattern(1, 8192), 0).unwrap();
        f.sync_all().unwrap();
    }

    agent.kill9().unwrap();
    let dead = std::fs::metadata(&status.fuse_file).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "the old mount is dead: {dead}");

    // A new agent detaches the dead mount at start, so the head can be
    // exposed at the same place again, with the data written before.
    let agent = AgentProcess::start_args(data.path(), "solo", &args).unwrap();
    let mut heads = agent.heads().await.unwrap();
    let again = heads.open_head(request(2, agent.endpoint())).await.unwrap().into_inner();
    assert_eq!(again.fuse_file, status.fuse_file);
    let mut got = vec![0u8; 8192];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&again.fuse_file).unwrap().read_exact_at(&mut got, 0).unwrap();
    }
    assert_eq!(got, pattern(1, 8192));
    drop(detach);
    heads.close_head(pb::CloseHeadRequest { volume_id: "solo-vol".into() }).await.unwrap();
    agent.terminate().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_same_epoch_open_with_fuse_exposes_a_head_opened_without_it() {
    if let Some(why) = skip_reason() {
        cairn_e2e::skip(&format!("needs root, /dev/fuse and loop devices ({why})"));
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let fuse_dir = tempfile::tempdir().unwrap();
    let args = [OsStr::new("--fuse-dir"), fuse_dir.path().as_os_str()];
    let agent = AgentProcess::start_args(data.path(), "solo", &args).unwrap();
    let request = |fuse| pb::OpenHeadRequest {
        fuse,
        ..cairn_e2e::open_head_request(
            "late-fuse",
            64 << 20,
            64 << 20,
            1,
            [("solo".to_string(), agent.endpoint())],
        )
    };
    let mut heads = agent.heads().await.unwrap();
    // Opened the way the operator opens it: no FUSE.
    let plain = heads.open_head(request(false)).await.unwrap().into_inner();
    assert!(plain.fuse_file.is_empty(), "{plain:?}");
    heads
        .head_write(pb::HeadWriteRequest {
            volume_id: "late-fuse".into(),
            offset: 4096,
            data: pattern(3, 8192).into(),
        })
        .await
        .unwrap();

    // The CSI node repeats it with fuse=true: the same head, now a file.
    let exposed = heads.open_head(request(true)).await.unwrap().into_inner();
    assert!(!exposed.fuse_file.is_empty(), "{exposed:?}");
    assert_eq!(exposed.epoch, 1);
    assert!(exposed.fuse_file.starts_with(fuse_dir.path().to_str().unwrap()));
    let mut got = vec![0u8; 8192];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&exposed.fuse_file).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 64 << 20);
        f.read_exact_at(&mut got, 4096).unwrap();
    }
    assert_eq!(got, pattern(3, 8192), "the file serves what was written before");

    // Repeats, with or without fuse, keep the one mount.
    for fuse in [true, false] {
        let again = heads.open_head(request(fuse)).await.unwrap().into_inner();
        assert_eq!(again.fuse_file, exposed.fuse_file, "fuse={fuse}");
    }
    assert!(Path::new(&exposed.fuse_file).exists());

    heads.close_head(pb::CloseHeadRequest { volume_id: "late-fuse".into() }).await.unwrap();
    assert!(!Path::new(&exposed.fuse_file).exists(), "closing the head unmounts it");
    agent.terminate().unwrap();
}
