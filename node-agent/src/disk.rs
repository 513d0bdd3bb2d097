//! The `Disk` seam: every byte the replica store puts on disk goes through it,
//! block data files and the redb metadata file alike. `FileDisk` is the real
//! file system; `SimDisk` keeps live and durable bytes apart and can lose
//! power at any sync, so crash consistency is tested rather than argued.
//!
//! Invariant kept by `SimDisk`: after `crash_image`, a file holds exactly what
//! was durable (synced) plus, depending on the `CrashMode`, some of the writes
//! issued after its last sync; a file whose creation or removal was not made
//! durable by a directory sync comes back as it was.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// A file on a [`Disk`].
pub trait DiskFile: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Frees the space of `[offset, offset + len)`; it reads as zeros after.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes of storage the file occupies (not its length).
    fn allocated_bytes(&self) -> io::Result<u64>;
}

/// A file system, as the replica store sees it.
pub trait Disk: Send + Sync + fmt::Debug + 'static {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Opens a file for reading and writing, creating it when `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the creation and removal of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir`; empty if it does not exist.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// (total, available) bytes of the file system holding `path`.
    fn capacity(&self, path: &Path) -> io::Result<(u64, u64)>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileDisk;

#[derive(Debug)]
struct RealFile(File);

impl DiskFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "hole past 2^63"));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is open
        // for as long as `self` lives.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.blocks() * 512)
    }
}

impl Disk for FileDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(true).create(create).open(path)?;
        Ok(Arc::new(RealFile(file)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        match std::fs::read_dir(dir) {
            Ok(rd) => rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn capacity(&self, path: &Path) -> io::Result<(u64, u64)> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `s` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let frsize = s.f_frsize as u64;
        Ok((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
    }
}

/// Which unsynced writes survive a simulated power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// None: only synced bytes are there.
    DropUnsynced,
    /// All of them, as if the crash came just before the failed sync.
    KeepUnsynced,
    /// A pseudo-random subset chosen by the seed (torn writes across files).
    Random(u64),
}

#[derive(Debug, Clone, Default)]
struct SimFileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes and truncations since the last sync, in order.
    pending: Vec<Pending>,
    /// The file's directory entry is durable.
    durable_entry: bool,
}

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(bytes: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, data) => {
            let end = *off as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<PathBuf, Arc<Mutex<SimFileState>>>,
    /// Files removed whose removal is not yet durable, with their state.
    removed: BTreeMap<PathBuf, Arc<Mutex<SimFileState>>>,
    dirs: BTreeSet<PathBuf>,
    syncs: u64,
    fail_at_sync: Option<u64>,
    crashed: bool,
}

/// An in-memory disk that can lose power at a chosen sync.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
}

fn crashed() -> io::Error {
    io::Error::other("simulated power loss")
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Syncs (file and directory) made so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().unwrap().syncs
    }

    /// Loses power when sync number `n` (counting from 1, including the
    /// ones already made) is attempted: that sync and everything after it
    /// fails and nothing of it becomes durable.
    pub fn fail_at_sync(&self, n: u64) {
        self.state.lock().unwrap().fail_at_sync = Some(n);
    }

    pub fn has_crashed(&self) -> bool {
        self.state.lock().unwrap().crashed
    }

    /// Powers off now: every later operation fails.
    pub fn power_off(&self) {
        self.state.lock().unwrap().crashed = true;
    }

    /// The disk as it would be found after power came back.
    pub fn crash_image(&self, mode: CrashMode) -> SimDisk {
        let st = self.state.lock().unwrap();
        let mut rng = match mode {
            CrashMode::Random(seed) => seed | 1,
            _ => 0,
        };
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut files = BTreeMap::new();
        let all = st
            .files
            .iter()
            .map(|(p, f)| (p, f, true))
            .chain(st.removed.iter().map(|(p, f)| (p, f, false)));
        for (path, file, live_entry) in all {
            let f = file.lock().unwrap();
            // A file exists after the crash if its entry was durable; a
            // live file whose creation was not synced may or may not exist.
            let exists = f.durable_entry
                || (live_entry && matches!(mode, CrashMode::KeepUnsynced))
                || (live_entry && matches!(mode, CrashMode::Random(_)) && next() % 2 == 0);
            if !exists {
                continue;
            }
            let mut bytes = f.durable.clone();
            for p in &f.pending {
                let keep = match mode {
                    CrashMode::DropUnsynced => false,
                    CrashMode::KeepUnsynced => true,
                    CrashMode::Random(_) => next() % 2 == 0,
                };
                if keep {
                    apply(&mut bytes, p);
                }
            }
            let state = SimFileState {
                live: bytes.clone(),
                durable: bytes,
                pending: vec![],
                durable_entry: true,
            };
            files.insert(path.clone(), Arc::new(Mutex::new(state)));
        }
        SimDisk {
            state: Arc::new(Mutex::new(SimState {
                files,
                removed: BTreeMap::new(),
                dirs: st.dirs.clone(),
                syncs: 0,
                fail_at_sync: None,
                crashed: false,
            })),
        }
    }

    /// Flips one bit of the live and durable bytes of `path` at `offset`
    /// (silent corruption under the store).
    pub fn corrupt(&self, path: &Path, offset: u64) -> io::Result<()> {
        let st = self.state.lock().unwrap();
        let f = st.files.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut f = f.lock().unwrap();
        let i = offset as usize;
        if i >= f.live.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "offset past end"));
        }
        f.live[i] ^= 1;
        if i < f.durable.len() {
            f.durable[i] ^= 1;
        }
        Ok(())
    }

    /// Paths of the files that exist now.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.lock().unwrap().files.keys().cloned().collect()
    }

    /// Counts a sync; false when power is lost at this one.
    fn take_sync(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.crashed {
            return false;
        }
        st.syncs += 1;
        if st.fail_at_sync == Some(st.syncs) {
            st.crashed = true;
            return false;
        }
        true
    }

    fn check(&self) -> io::Result<()> {
        if self.state.lock().unwrap().crashed { Err(crashed()) } else { Ok(()) }
    }
}

#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    state: Arc<Mutex<SimFileState>>,
}

impl DiskFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.check()?;
        let f = self.state.lock().unwrap();
        let start = offset as usize;
        let end = start + buf.len();
        if end > f.live.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"));
        }
        buf.copy_from_slice(&f.live[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.disk.check()?;
        let mut f = self.state.lock().unwrap();
        let p = Pending::Write(offset, buf.to_vec());
        apply(&mut f.live, &p);
        f.pending.push(p);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if !self.disk.take_sync() {
            return Err(crashed());
        }
        let mut f = self.state.lock().unwrap();
        f.durable = f.live.clone();
        f.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.disk.check()?;
        Ok(self.state.lock().unwrap().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.disk.check()?;
        let mut f = self.state.lock().unwrap();
        let p = Pending::SetLen(len);
        apply(&mut f.live, &p);
        f.pending.push(p);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.check()?;
        let mut f = self.state.lock().unwrap();
        let end = (offset + len).min(f.live.len() as u64);
        if offset >= end {
            return Ok(());
        }
        let p = Pending::Write(offset, vec![0; (end - offset) as usize]);
        apply(&mut f.live, &p);
        f.pending.push(p);
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.disk.check()?;
        let f = self.state.lock().unwrap();
        Ok(f.live.chunks(4096).filter(|c| c.iter().any(|&b| b != 0)).count() as u64 * 4096)
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        let mut st = self.state.lock().unwrap();
        for a in path.ancestors() {
            st.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        self.check()?;
        let mut st = self.state.lock().unwrap();
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !st.dirs.contains(parent) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        let state = match st.files.get(path) {
            Some(f) => f.clone(),
            None if create => {
                let f = Arc::new(Mutex::new(SimFileState::default()));
                st.removed.remove(path);
                st.files.insert(path.to_path_buf(), f.clone());
                f
            }
            None => return Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
        };
        Ok(Arc::new(SimFile { disk: self.clone(), state }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        let mut st = self.state.lock().unwrap();
        if let Some(f) = st.files.remove(path)
            && f.lock().unwrap().durable_entry
        {
            st.removed.insert(path.to_path_buf(), f);
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        let mut st = self.state.lock().unwrap();
        let gone: Vec<PathBuf> = st.files.keys().filter(|p| p.starts_with(path)).cloned().collect();
        for p in gone {
            let f = st.files.remove(&p).unwrap();
            if f.lock().unwrap().durable_entry {
                st.removed.insert(p, f);
            }
        }
        st.dirs.retain(|d| !d.starts_with(path));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if !self.take_sync() {
            return Err(crashed());
        }
        let mut st = self.state.lock().unwrap();
        for (p, f) in &st.files {
            if p.parent() == Some(dir) {
                f.lock().unwrap().durable_entry = true;
            }
        }
        st.removed.retain(|p, _| p.parent() != Some(dir));
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.check()?;
        let st = self.state.lock().unwrap();
        let mut names: BTreeSet<String> = st
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        for d in &st.dirs {
            if d.parent() == Some(dir)
                && let Some(n) = d.file_name()
            {
                names.insert(n.to_string_lossy().into_owned());
            }
        }
        Ok(names.into_iter().collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let st = self.state.lock().unwrap();
        st.files.contains_key(path) || st.dirs.contains(path)
    }

    fn capacity(&self, _path: &Path) -> io::Result<(u64, u64)> {
        self.check()?;
        let st = self.state.lock().unwrap();
        let used: u64 = st.files.values().map(|f| f.lock().unwrap().live.len() as u64).sum();
        const SIZE: u64 = 1 << 40;
        Ok((SIZE, SIZE.saturating_sub(used)))
    }
}

/// redb's storage backend over a [`DiskFile`], so the metadata store's bytes
/// go through the same seam as block data.
#[derive(Debug)]
pub struct RedbBackend(pub Arc<dyn DiskFile>);

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read_at(out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_at_power_loss() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = disk.open(Path::new("/d/a"), true).unwrap();
        f.write_at(b"old", 0).unwrap();
        f.sync().unwrap();
        disk.sync_dir(Path::new("/d")).unwrap();
        f.write_at(b"new", 0).unwrap();
        let after = disk.crash_image(CrashMode::DropUnsynced);
        let g = after.open(Path::new("/d/a"), false).unwrap();
        let mut buf = [0u8; 3];
        g.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"old");
        let kept = disk.crash_image(CrashMode::KeepUnsynced);
        kept.open(Path::new("/d/a"), false).unwrap().read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"new");
    }

    #[test]
    fn file_creation_needs_a_directory_sync() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = disk.open(Path::new("/d/a"), true).unwrap();
        f.write_at(b"x", 0).unwrap();
        f.sync().unwrap();
        let after = disk.crash_image(CrashMode::DropUnsynced);
        assert!(!after.exists(Path::new("/d/a")));
    }

    #[test]
    fn power_fails_at_the_chosen_sync() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = disk.open(Path::new("/d/a"), true).unwrap();
        disk.fail_at_sync(2);
        f.sync().unwrap();
        assert!(f.sync().is_err());
        assert!(disk.has_crashed());
        assert!(f.write_at(b"x", 0).is_err());
    }
}
