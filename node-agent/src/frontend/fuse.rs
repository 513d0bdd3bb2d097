//! The `fuse` frontend: one [`BlockVolume`] served as the only regular file
//! of a FUSE mount, for a loop device ([`super::loop_device`]) to turn into a
//! block device. Invariant: every byte read or written through the file is
//! the volume's byte at the same offset (nothing is cached or reordered
//! here), an fsync of the file returns only after [`BlockVolume::flush`], and
//! the mount is never let go while a loop device still uses the file.

use std::{
    cell::RefCell,
    ffi::{CString, OsStr, OsString},
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session,
    SessionACL, WriteFlags,
};
use tracing::{info, warn};

use super::{BlockVolume, FrontendError, VolumeIoError, loop_device};

/// Largest read or write the kernel sends in one request (1 MiB: the
/// kernel's default `fs.fuse.max_pages_limit` of 256 pages).
pub const MAX_IO_BYTES: u32 = 1 << 20;

/// Worker threads of a mount unless [`FuseOptions`] says otherwise.
pub const DEFAULT_THREADS: usize = 8;

/// How long the kernel may cache names and attributes. The file's size is
/// fixed for the life of the mount, so this only saves round trips.
const ATTR_TTL: Duration = Duration::from_secs(3600);
const BLOCK: u32 = 4096;
const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);
/// Requests the kernel may keep in flight asynchronously (readahead and
/// asynchronous direct I/O from the loop device).
const MAX_BACKGROUND: u16 = 64;

/// How a mount serves its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseOptions {
    /// Worker threads, each reading requests from its own clone of the
    /// `/dev/fuse` descriptor, so that volume I/O that blocks (a head waiting
    /// on its replicas) does not hold up other requests.
    pub threads: usize,
    /// Open the file in FUSE direct-I/O mode: the kernel keeps no page cache
    /// for it, so buffered users (and a loop device without direct I/O) do
    /// not cache every block twice.
    pub direct_io: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions { threads: DEFAULT_THREADS, direct_io: true }
    }
}

/// Mounts volumes as files.
#[derive(Debug, Clone, Copy)]
pub struct FuseFrontend;

impl FuseFrontend {
    /// Serves `volume` as `mountpoint/file_name` with [`FuseOptions::default`].
    /// `mountpoint` must be an existing directory; the caller must be root.
    pub fn mount(
        volume: Arc<dyn BlockVolume>,
        mountpoint: &Path,
        file_name: &str,
    ) -> Result<FuseMount, FrontendError> {
        Self::mount_with(volume, mountpoint, file_name, &FuseOptions::default())
    }

    /// Serves `volume` as `mountpoint/file_name`. Returns once the kernel has
    /// finished the FUSE handshake, so the file can be opened right away.
    pub fn mount_with(
        volume: Arc<dyn BlockVolume>,
        mountpoint: &Path,
        file_name: &str,
        options: &FuseOptions,
    ) -> Result<FuseMount, FrontendError> {
        check_file_name(file_name)?;
        let mountpoint = mountpoint.canonicalize().map_err(|source| FrontendError::MountPoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
        if !mountpoint.is_dir() {
            return Err(FrontendError::MountPoint {
                path: mountpoint,
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        let file = mountpoint.join(file_name);
        let size = volume.size();
        let fs = VolumeFs::new(volume, file_name, options.direct_io);
        let mut config = Config::default();
        config.n_threads = Some(options.threads.max(1));
        config.clone_fd = true;
        let mount_error = |source| FrontendError::Mount { mountpoint: mountpoint.clone(), source };
        let device = mount_fuse(&mountpoint).map_err(mount_error)?;
        // fuser only serves the descriptor (the handshake, then the
        // workers); mounting and unmounting stay here, so nothing else ever
        // unmounts the path.
        let session = Session::from_fd(fs, device, SessionACL::Owner, config)
            .and_then(Session::spawn)
            .map_err(|source| {
                if let Err(e) = umount(&mountpoint, libc::MNT_DETACH) {
                    warn!(mountpoint = %mountpoint.display(), error = %e, "unmount after a failed FUSE handshake");
                }
                mount_error(source)
            })?;
        info!(
            file = %file.display(),
            size,
            threads = options.threads.max(1),
            direct_io = options.direct_io,
            "volume served over FUSE"
        );
        Ok(FuseMount { session: Some(session), mountpoint, file })
    }
}

fn check_file_name(name: &str) -> Result<(), FrontendError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name == "." || name == ".." {
        "it is a directory's name"
    } else if name.contains('/') || name.contains('\0') {
        "it holds a '/' or a NUL byte"
    } else if name.len() > 255 {
        "it is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(FrontendError::FileName { name: name.to_string(), reason })
}

/// A mounted volume file. Unmounted by [`FuseMount::unmount`] or, best
/// effort, on drop.
#[derive(Debug)]
pub struct FuseMount {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    file: PathBuf,
}

impl FuseMount {
    /// The volume's file (canonical path), the one to attach a loop device to.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The mount point (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the worker threads to end (they hold the
    /// volume). Refused, with the mount left serving, while a loop device
    /// is attached to the file or anything else keeps the mount busy.
    /// Unmounting twice is a no-op.
    pub fn unmount(&mut self) -> Result<(), FrontendError> {
        if self.session.is_none() {
            return Ok(());
        }
        let devices = loop_device::devices_backed_by(&self.file);
        if !devices.is_empty() {
            return Err(FrontendError::Attached { file: self.file.clone(), devices });
        }
        umount(&self.mountpoint, 0).map_err(|source| FrontendError::Unmount {
            mountpoint: self.mountpoint.clone(),
            source,
        })?;
        let Some(session) = self.session.take() else { return Ok(()) };
        // The kernel has torn the connection down: the workers see the
        // device close and end, dropping the volume.
        session.join().map_err(|source| FrontendError::Session {
            mountpoint: self.mountpoint.clone(),
            source,
        })?;
        info!(mountpoint = %self.mountpoint.display(), "FUSE mount unmounted");
        Ok(())
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        match self.unmount() {
            Ok(()) => return,
            Err(e) if self.session.is_none() => {
                warn!(error = %e, "FUSE unmount at drop failed after the kernel let go");
                return;
            }
            Err(e) => warn!(error = %e, "FUSE mount dropped while in use; detaching it lazily"),
        }
        // Still in use (a loop device): take the mount out of the namespace
        // and let the workers (detached) keep serving whoever holds the file
        // until they let go; the connection then ends and the workers exit.
        if let Err(e) = umount(&self.mountpoint, libc::MNT_DETACH) {
            warn!(mountpoint = %self.mountpoint.display(), error = %e, "lazy unmount failed");
        }
        self.session = None;
    }
}

/// Mounts a FUSE filesystem served by a new `/dev/fuse` descriptor at
/// `mountpoint` (type `fuse.cairn`, source `cairn`) and returns the
/// descriptor. The kernel sends its INIT request on the descriptor next.
fn mount_fuse(mountpoint: &Path) -> io::Result<OwnedFd> {
    let device = OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid}",
        device.as_raw_fd(),
        libc::S_IFDIR | 0o755
    );
    let target = CString::new(mountpoint.as_os_str().as_bytes())?;
    let data = CString::new(data)?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"cairn".as_ptr(),
            target.as_ptr(),
            c"fuse.cairn".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(device.into())
}

fn umount(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The errno a volume error reaches the kernel (and the loop device, and
/// the filesystem above it) as.
fn errno(e: &VolumeIoError) -> Errno {
    match e {
        VolumeIoError::OutOfRange { .. } => Errno::EINVAL,
        VolumeIoError::ReadOnly(_) => Errno::EROFS,
        VolumeIoError::Io(_) => Errno::EIO,
    }
}

thread_local! {
    /// Each worker's read buffer, grown to the largest read it has served
    /// (at most [`MAX_IO_BYTES`] in practice) and reused, so a read costs
    /// the volume's copy into it and the kernel's copy out of it, no more.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The filesystem: a root directory holding the volume's file.
#[derive(Debug)]
struct VolumeFs {
    volume: Arc<dyn BlockVolume>,
    size: u64,
    name: OsString,
    open_flags: FopenFlags,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
    /// Set by every write (and trim), cleared by a flush: a `close` only
    /// flushes the volume when something was written since.
    dirty: AtomicBool,
}

impl VolumeFs {
    fn new(volume: Arc<dyn BlockVolume>, name: &str, direct_io: bool) -> Self {
        let open_flags = if direct_io {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            // Only this file writes the volume, so its cache stays valid.
            FopenFlags::FOPEN_KEEP_CACHE
        };
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        VolumeFs {
            size: volume.size(),
            volume,
            name: name.into(),
            open_flags,
            uid,
            gid,
            mounted_at: SystemTime::now(),
            dirty: AtomicBool::new(false),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            ROOT => (FileType::Directory, 0o755, 2, 0),
            FILE => (FileType::RegularFile, 0o600, 1, self.size),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// How many of `len` bytes at `offset` lie inside the volume; `None`
    /// when `offset` is at or past its end.
    fn span(&self, offset: u64, len: usize) -> Option<usize> {
        (offset < self.size).then(|| len.min(usize::try_from(self.size - offset).unwrap_or(len)))
    }

    fn failed(&self, op: &'static str, offset: u64, len: usize, e: &VolumeIoError) -> Errno {
        let errno = errno(e);
        warn!(op, offset, len, errno = errno.code(), error = %e, "volume I/O failed");
        errno
    }

    fn flush_volume(&self) -> Result<(), Errno> {
        self.dirty.store(false, Ordering::SeqCst);
        self.volume.flush().map_err(|e| {
            self.dirty.store(true, Ordering::SeqCst);
            self.failed("flush", 0, 0, &e)
        })
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO_BYTES) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_IO_BYTES) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Asynchronous direct I/O lets a loop device with direct I/O keep
        // many requests in flight instead of one at a time.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            warn!(
                "the kernel's FUSE lacks asynchronous direct I/O; loop devices send one request at a time"
            );
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if self.dirty.load(Ordering::SeqCst)
            && let Err(e) = self.volume.flush()
        {
            warn!(error = %e, "flush at FUSE unmount failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT {
            reply.error(Errno::ENOTDIR);
        } else if name != self.name {
            reply.error(Errno::ENOENT);
        } else if let Some(attr) = self.attr(FILE) {
            reply.entry(&ATTR_TTL, &attr, Generation(0));
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Times are accepted and ignored (`touch` works); the size, owner and
    /// mode of a volume cannot change here.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else { return reply.error(Errno::ENOENT) };
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some_and(|s| s != attr.size)
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&ATTR_TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            FILE => reply.opened(FileHandle(0), self.open_flags),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let Some(len) = self.span(offset, size as usize) else {
            return reply.data(&[]);
        };
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let data = &mut buf[..len];
            match self.volume.read_at(offset, data) {
                Ok(()) => reply.data(data),
                Err(e) => reply.error(self.failed("read", offset, len, &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        if data.is_empty() {
            return reply.written(0);
        }
        // A write running past the end is cut short there, one starting
        // past it gets ENOSPC, as on a block device.
        let Some(len) = self.span(offset, data.len()) else {
            return reply.error(Errno::ENOSPC);
        };
        match self.volume.write_at(offset, &data[..len]) {
            Ok(()) => {
                self.dirty.store(true, Ordering::SeqCst);
                reply.written(len as u32);
            }
            Err(e) => reply.error(self.failed("write", offset, len, &e)),
        }
    }

    /// Called at every `close`: makes the volume durable if anything was
    /// written since the last flush.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if !self.dirty.load(Ordering::SeqCst) {
            return reply.ok();
        }
        match self.flush_volume() {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    /// Always flushes the volume: a loop device turns the flushes of the
    /// filesystem above it into fsyncs of this file.
    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_volume() {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, OsStr::new(".")),
            (ROOT, FileType::Directory, OsStr::new("..")),
            (FILE, FileType::RegularFile, self.name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size / u64::from(BLOCK);
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.attr(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Punching a hole (a loop device's discard) or zeroing a range (its
    /// write-zeroes) trims the volume: it reads as zeros afterwards.
    /// Preallocation inside the volume succeeds (every byte already exists);
    /// nothing can change the size.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const DISCARD: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        if mode & !(KEEP | DISCARD) != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let beyond = offset.checked_add(length).is_none_or(|end| end > self.size);
        if beyond && mode & KEEP == 0 {
            return reply.error(Errno::EFBIG);
        }
        if mode & DISCARD == 0 {
            return reply.ok();
        }
        let len = self.span(offset, usize::MAX).map_or(0, |n| (n as u64).min(length));
        if len == 0 {
            return reply.ok();
        }
        match self.volume.trim(offset, len) {
            Ok(()) => {
                self.dirty.store(true, Ordering::SeqCst);
                reply.ok();
            }
            Err(e) => reply.error(self.failed("trim", offset, len as usize, &e)),
        }
    }
}
