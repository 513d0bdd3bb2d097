//! The `fuse` frontend over an in-memory volume: I/O through the mounted
//! file reaches the volume byte for byte, fsync flushes it, volume errors
//! reach readers as errnos, and ext4 on a loop device over the file survives
//! a full teardown and remount. These tests need root, `/dev/fuse` and (for
//! ext4) loop devices, `mkfs.ext4` and `e2fsck`; without them they print
//! why and pass as skipped.

use std::{
    fs::{self, File, OpenOptions},
    ops::Range,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use anyhow::{Context, bail, ensure};
use cairn_agent::frontend::{
    BlockVolume, FrontendError, VolumeIoError, fuse::FuseFrontend, loop_device,
};

const MIB: u64 = 1 << 20;

/// A volume in memory that counts flushes and trims and can be told to
/// fail reads in a range or to refuse writes.
#[derive(Debug)]
struct MemVolume {
    data: Mutex<Vec<u8>>,
    flushes: AtomicU64,
    trims: AtomicU64,
    failing_reads: Mutex<Option<Range<u64>>>,
    read_only: AtomicBool,
}

impl MemVolume {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(MemVolume {
            data: Mutex::new(vec![0; size as usize]),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            failing_reads: Mutex::new(None),
            read_only: AtomicBool::new(false),
        })
    }

    fn range(&self, offset: u64, len: u64) -> Result<Range<usize>, VolumeIoError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(VolumeIoError::OutOfRange { offset, len, size }),
        }
    }

    fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl BlockVolume for MemVolume {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeIoError> {
        let r = self.range(offset, buf.len() as u64)?;
        if let Some(bad) = &*self.failing_reads.lock().unwrap()
            && offset < bad.end
            && bad.start < r.end as u64
        {
            return Err(VolumeIoError::Io(format!("simulated read error at {offset}")));
        }
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeIoError> {
        if self.read_only.load(Ordering::SeqCst) {
            return Err(VolumeIoError::ReadOnly("fenced by a newer head".into()));
        }
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> Result<(), VolumeIoError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeIoError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Bytes that differ from one `seed` to the next and from zeros.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Why this machine cannot run a privileged test, if it cannot.
fn missing(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (modprobe fuse)".into());
    }
    if tools.contains(&"losetup") && !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control is missing (modprobe loop)".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> =
        std::env::split_paths(&path).chain(["/sbin".into(), "/usr/sbin".into()]).collect();
    tools
        .iter()
        .find(|tool| !dirs.iter().any(|d| d.join(tool).is_file()))
        .map(|tool| format!("{tool} is not installed"))
}

/// Prints why the test is skipped and returns true, or returns false.
fn skipped(tools: &[&str]) -> bool {
    match missing(tools) {
        Some(why) => {
            cairn_e2e::skip(&format!("needs root and /dev/fuse ({why})"));
            true
        }
        None => false,
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out =
        Command::new(program).args(args).output().with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A filesystem mounted (on a device), unmounted on drop (lazily if busy), so
/// a failing test leaves no mount behind.
struct Mounted {
    path: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(fstype: &str, source: &Path, path: &Path) -> anyhow::Result<Self> {
        run("mount", &["-t", fstype, path_str(source), path_str(path)])?;
        Ok(Mounted { path: path.canonicalize()?, mounted: true })
    }

    fn unmount(&mut self) -> anyhow::Result<()> {
        run("umount", &[path_str(&self.path)])?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted && self.unmount().is_err() {
            let _ = run("umount", &["-l", path_str(&self.path)]);
        }
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

fn is_mount_point(path: &Path) -> bool {
    let path = path.canonicalize().unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == path.to_str())
}

#[test]
fn a_file_in_the_fuse_mount_reads_and_writes_the_volume() -> anyhow::Result<()> {
    if skipped(&[]) {
        return Ok(());
    }
    let size = 64 * MIB;
    let volume = MemVolume::new(size);
    let dir = tempfile::tempdir()?;
    let mut fuse = FuseFrontend::mount(volume.clone(), dir.path(), "volume")?;

    assert_eq!(fs::metadata(fuse.file())?.len(), size);
    let names: Vec<_> = fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["volume"]);

    let file = OpenOptions::new().read(true).write(true).open(fuse.file())?;
    let mut expected = vec![0u8; size as usize];
    let writes = [(1, 100), (4095, 8193), (10 * MIB + 7, 3 * MIB as usize + 5), (size - 3, 3)];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        file.write_all_at(&data, offset)?;
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    for &(offset, len) in &writes {
        let mut back = vec![0u8; len + 10];
        let at = offset.saturating_sub(5);
        let n = file.read_at(&mut back, at)?;
        let want = &expected[at as usize..(at as usize + len + 10).min(size as usize)];
        assert_eq!(&back[..n], want, "read back at {at}");
    }
    let seen = volume.contents();
    assert_eq!(first_difference(&seen, &expected), None, "the volume holds other bytes");

    // The file ends where the volume does.
    assert_eq!(file.read_at(&mut [0u8; 16], size)?, 0);
    let past_end = file.write_at(b"x", size).unwrap_err();
    assert_eq!(past_end.raw_os_error(), Some(libc::ENOSPC), "{past_end}");

    // fsync reaches the volume's flush.
    let before = volume.flushes.load(Ordering::SeqCst);
    file.sync_all()?;
    assert_eq!(volume.flushes.load(Ordering::SeqCst), before + 1);
    file.sync_data()?;
    assert_eq!(volume.flushes.load(Ordering::SeqCst), before + 2);

    // A punched hole is a trim: it reads as zeros.
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a plain syscall on a descriptor this test owns.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, 8192, 16384) };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    assert_eq!(volume.trims.load(Ordering::SeqCst), 1);
    expected[8192..8192 + 16384].fill(0);
    let mut back = vec![1u8; 20000];
    file.read_exact_at(&mut back, 4096)?;
    assert_eq!(back, expected[4096..24096]);

    drop(file);
    fuse.unmount()?;
    assert!(!is_mount_point(dir.path()));
    Ok(())
}

#[test]
fn volume_errors_reach_the_reader_as_errnos_and_the_mount_keeps_serving() -> anyhow::Result<()> {
    if skipped(&[]) {
        return Ok(());
    }
    let volume = MemVolume::new(16 * MIB);
    let data = pattern(7, 16 * MIB as usize);
    volume.write_at(0, &data)?;
    let dir = tempfile::tempdir()?;
    let mut fuse = FuseFrontend::mount(volume.clone(), dir.path(), "volume")?;
    let file = OpenOptions::new().read(true).write(true).open(fuse.file())?;

    *volume.failing_reads.lock().unwrap() = Some(8 * MIB..9 * MIB);
    let mut buf = vec![0u8; 4096];
    let err = file.read_exact_at(&mut buf, 8 * MIB + 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // The session survives: other reads work, and the same read works once
    // the volume recovers.
    file.read_exact_at(&mut buf, 4 * MIB)?;
    assert_eq!(buf, data[4 * MIB as usize..4 * MIB as usize + 4096]);
    *volume.failing_reads.lock().unwrap() = None;
    file.read_exact_at(&mut buf, 8 * MIB + 4096)?;
    assert_eq!(buf, data[8 * MIB as usize + 4096..8 * MIB as usize + 8192]);

    // A fenced volume refuses writes with EROFS.
    volume.read_only.store(true, Ordering::SeqCst);
    let err = file.write_all_at(b"late", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    volume.read_only.store(false, Ordering::SeqCst);
    file.write_all_at(b"back", 0)?;
    assert_eq!(&volume.contents()[..4], b"back");

    drop(file);
    fuse.unmount()?;
    Ok(())
}

#[test]
fn ext4_on_a_loop_device_over_the_fuse_file_survives_remount() -> anyhow::Result<()> {
    if skipped(&["losetup", "mkfs.ext4", "e2fsck", "mount", "umount"]) {
        return Ok(());
    }
    let volume = MemVolume::new(256 * MIB);
    let dir = tempfile::tempdir()?;
    let (fuse_dir, ext4_dir) = (dir.path().join("fuse"), dir.path().join("ext4"));
    fs::create_dir(&fuse_dir)?;
    fs::create_dir(&ext4_dir)?;
    let files: Vec<(String, Vec<u8>)> =
        [("small", 17 * 1024 + 3), ("one-mib", MIB as usize), ("large", 6 * MIB as usize + 123)]
            .into_iter()
            .enumerate()
            .map(|(i, (name, len))| (name.to_string(), pattern(100 + i as u64, len)))
            .collect();
    let mut checksums = Vec::new();

    // First life: make the filesystem and write the files.
    {
        let mut fuse = FuseFrontend::mount(volume.clone(), &fuse_dir, "volume")?;
        let mut device = loop_device::attach(fuse.file(), true)?;
        println!(
            "{} over {}: direct I/O {}",
            device.path().display(),
            fuse.file().display(),
            device.direct_io()
        );
        assert_eq!(loop_device::devices_backed_by(fuse.file()), [device.path()]);
        run("mkfs.ext4", &["-q", path_str(device.path())])?;
        let mut ext4 = Mounted::new("ext4", device.path(), &ext4_dir)?;
        assert_eq!(loop_device::mounted_at(device.path()), Some(ext4.path.clone()));
        for (name, data) in &files {
            let mut f = File::create(ext4.path.join(name))?;
            std::io::Write::write_all(&mut f, data)?;
            f.sync_all()?;
        }
        run("sync", &["-f", path_str(&ext4.path)])?;
        for (name, _) in &files {
            checksums.push(crc32c::crc32c(&fs::read(ext4.path.join(name))?));
        }

        // Nothing is let go from under a mounted filesystem.
        match device.detach() {
            Err(e @ FrontendError::LoopMounted { .. }) => {
                assert!(e.to_string().contains(path_str(&ext4.path)), "{e}")
            }
            other => bail!("detach of a mounted loop device: {other:?}"),
        }
        match fuse.unmount() {
            Err(e @ FrontendError::Attached { .. }) => {
                assert!(e.to_string().contains(path_str(device.path())), "{e}")
            }
            other => bail!("unmount of a FUSE file attached to a loop device: {other:?}"),
        }

        ext4.unmount()?;
        assert_eq!(loop_device::mounted_at(device.path()), None);
        run("e2fsck", &["-fn", path_str(device.path())])?;
        device.detach()?;
        assert!(loop_device::devices_backed_by(fuse.file()).is_empty());
        fuse.unmount()?;
        assert!(!is_mount_point(&fuse_dir));
    }
    assert!(volume.flushes.load(Ordering::SeqCst) > 0, "ext4's flushes reached the volume");

    // Second life: everything set up again over the same volume.
    let mut fuse = FuseFrontend::mount(volume.clone(), &fuse_dir, "volume")?;
    let mut device = loop_device::attach(fuse.file(), true)?;
    run("e2fsck", &["-fn", path_str(device.path())])?;
    let mut ext4 = Mounted::new("ext4", device.path(), &ext4_dir)?;
    assert_eq!(loop_device::mounted_at(device.path()), Some(ext4.path.clone()));
    for ((name, data), checksum) in files.iter().zip(&checksums) {
        let back = fs::read(ext4.path.join(name))?;
        assert_eq!(crc32c::crc32c(&back), *checksum, "{name}");
        assert_eq!(first_difference(&back, data), None, "{name} differs");
    }
    match fuse.unmount() {
        Err(e @ FrontendError::Attached { .. }) => {
            assert!(e.to_string().contains(path_str(device.path())), "{e}")
        }
        other => bail!("unmount of a FUSE file attached to a loop device: {other:?}"),
    }
    ext4.unmount()?;
    device.detach()?;
    fuse.unmount()?;
    assert!(!is_mount_point(&fuse_dir));
    Ok(())
}

#[test]
fn file_names_that_are_not_one_plain_name_are_refused() {
    let volume = MemVolume::new(MIB);
    let dir = tempfile::tempdir().unwrap();
    for name in ["", ".", "..", "a/b", "nul\0byte", &"x".repeat(256)] {
        match FuseFrontend::mount(volume.clone(), dir.path(), name) {
            Err(FrontendError::FileName { .. }) => {}
            other => panic!("{name:?}: {other:?}"),
        }
    }
}

#[test]
fn a_loop_device_falls_back_to_buffered_io_when_direct_io_is_refused() -> anyhow::Result<()> {
    if skipped(&["losetup", "mount", "umount"]) {
        return Ok(());
    }
    // ramfs has no direct I/O, so the kernel refuses a loop device with it.
    let dir = tempfile::tempdir()?;
    let ramfs = Mounted::new("ramfs", Path::new("ramfs"), dir.path())?;
    let file = ramfs.path.join("volume");
    let data = pattern(9, 4 * MIB as usize);
    fs::write(&file, &data)?;
    let mut device = loop_device::attach(&file, true)?;
    assert!(!device.direct_io());
    assert_eq!(loop_device::devices_backed_by(&file), [device.path()]);
    let mut back = vec![0u8; 8192];
    File::open(device.path())?.read_exact_at(&mut back, MIB)?;
    assert_eq!(back, data[MIB as usize..MIB as usize + 8192]);
    device.detach()?;
    assert!(loop_device::devices_backed_by(&file).is_empty());
    Ok(())
}

#[test]
fn a_fuse_mount_dropped_under_a_loop_device_serves_it_until_detached() -> anyhow::Result<()> {
    if skipped(&["losetup"]) {
        return Ok(());
    }
    let volume = MemVolume::new(8 * MIB);
    let dir = tempfile::tempdir()?;
    let fuse = FuseFrontend::mount(volume.clone(), dir.path(), "volume")?;
    let mut device = loop_device::attach(fuse.file(), true)?;
    drop(fuse);

    // The mount is gone from the namespace, the loop device still works.
    assert!(!is_mount_point(dir.path()));
    let disk = OpenOptions::new().read(true).write(true).open(device.path())?;
    let data = pattern(11, 8192);
    disk.write_all_at(&data, 4096)?;
    disk.sync_all()?;
    assert_eq!(volume.contents()[4096..4096 + 8192], data);
    drop(disk);

    // Once the device lets go, the workers end and release the volume.
    device.detach()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Arc::strong_count(&volume) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(Arc::strong_count(&volume), 1, "the FUSE workers still hold the volume");
    Ok(())
}
