//! Loop devices over a frontend's file: attached and detached with
//! `losetup`, and the kernel's view of who uses them (the backing files in
//! sysfs, the mounts in `/proc/self/mountinfo`). Invariant: a loop device is
//! detached only when no filesystem is mounted on it and it is still backed
//! by the file it was attached to, so a volume is never pulled from under a
//! mounted filesystem and a device reused by someone else is never touched.

use std::{
    ffi::OsStr,
    fs, io,
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::FrontendError;

/// Logical block size of the devices attached here: the volume's block.
pub const SECTOR_SIZE: u32 = 4096;

const LOSETUP_ADVICE: &str = "the agent needs root and a free loop device (modprobe loop; in a container, /dev/loop-control and the /dev/loop* nodes must be present)";
/// How long a detach waits for the kernel to let go of the backing file
/// (it defers the detach while something, such as udev's probe, has the
/// device open).
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// A loop device attached to a file. Detached by [`LoopDevice::detach`] or,
/// best effort, on drop.
#[derive(Debug)]
pub struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
    /// The backing file's identity: its path can change (a FUSE mount
    /// detached lazily under the device), this cannot.
    id: FileId,
    direct_io: bool,
    attached: bool,
}

/// A file as the loop driver identifies it: (device, inode).
type FileId = (u64, u64);

/// Attaches `file` to a free loop device with 4096-byte sectors. With
/// `direct_io`, asks for direct I/O (no page cache between the loop device
/// and the file); if the kernel refuses it for this file, attaches with
/// buffered I/O and logs a warning. [`LoopDevice::direct_io`] tells which.
pub fn attach(file: &Path, direct_io: bool) -> Result<LoopDevice, FrontendError> {
    let backing_error = |source| FrontendError::BackingFile { path: file.to_path_buf(), source };
    let backing = std::path::absolute(file).map_err(backing_error)?;
    let meta = fs::metadata(&backing).map_err(backing_error)?;
    let id = (meta.dev(), meta.ino());
    if direct_io {
        let before = devices_backed_by(&backing);
        match losetup_attach(&backing, true) {
            Ok(device) => return Ok(attached(device, backing, id)),
            Err(e @ FrontendError::Command { .. }) => {
                // losetup may have attached the device and failed only to
                // switch direct I/O on: keep that device, buffered.
                let now = devices_backed_by(&backing);
                if let Some(device) = now.into_iter().find(|d| !before.contains(d)) {
                    warn!(device = %device.display(), error = %e, "direct I/O refused; the loop device runs buffered");
                    return Ok(attached(device, backing, id));
                }
                warn!(file = %backing.display(), error = %e, "direct I/O refused; attaching with buffered I/O");
            }
            Err(e) => return Err(e),
        }
    }
    let device = losetup_attach(&backing, false)?;
    Ok(attached(device, backing, id))
}

fn attached(device: PathBuf, backing: PathBuf, id: FileId) -> LoopDevice {
    let direct_io = read_sys(&device, "loop/dio").is_some_and(|v| v == "1");
    info!(device = %device.display(), file = %backing.display(), direct_io, "loop device attached");
    LoopDevice { device, backing, id, direct_io, attached: true }
}

fn losetup_attach(file: &Path, direct_io: bool) -> Result<PathBuf, FrontendError> {
    let sector = SECTOR_SIZE.to_string();
    let mut args: Vec<&OsStr> =
        vec!["--find".as_ref(), "--show".as_ref(), "--sector-size".as_ref(), sector.as_ref()];
    if direct_io {
        args.push("--direct-io=on".as_ref());
    }
    args.push(file.as_os_str());
    let output = run("losetup", &args, LOSETUP_ADVICE)?;
    let device = PathBuf::from(output.trim());
    let is_loop = device
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(|n| n.strip_prefix("loop"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    if !is_loop || !device.starts_with("/dev") {
        return Err(FrontendError::Output { command: command_line("losetup", &args), output });
    }
    Ok(device)
}

impl LoopDevice {
    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.device
    }

    /// The file behind the device (absolute path).
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Whether the device does direct I/O to its file (as the kernel reports
    /// it in sysfs after the attach).
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Detaches the device and waits until the kernel has let go of the
    /// file. Refused while a filesystem is mounted on the device. A device
    /// found detached, or backed by another file (detached and reused by
    /// someone else), is left alone. Detaching twice is a no-op.
    pub fn detach(&mut self) -> Result<(), FrontendError> {
        if !self.attached {
            return Ok(());
        }
        if let Some(mountpoint) = mounted_at(&self.device) {
            return Err(FrontendError::LoopMounted { device: self.device.clone(), mountpoint });
        }
        if !self.still_ours() {
            self.attached = false;
            return Ok(());
        }
        run("losetup", &["--detach".as_ref(), self.device.as_os_str()], LOSETUP_ADVICE)?;
        let deadline = Instant::now() + DETACH_WAIT;
        while backing_id(&self.device) == Some(self.id) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if backing_id(&self.device) == Some(self.id) {
            warn!(device = %self.device.display(), "loop device still open elsewhere; it detaches when the last user closes it");
        }
        self.attached = false;
        info!(device = %self.device.display(), file = %self.backing.display(), "loop device detached");
        Ok(())
    }

    fn still_ours(&self) -> bool {
        match backing_id(&self.device) {
            Some(id) if id == self.id => true,
            Some(_) => {
                warn!(device = %self.device.display(), file = %self.backing.display(), "loop device was detached and reused by someone else; leaving it alone");
                false
            }
            None => false,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match self.detach() {
            Ok(()) => {}
            Err(FrontendError::LoopMounted { device, mountpoint }) => {
                // The kernel defers the detach of an open device until its
                // last user (the mounted filesystem) lets go.
                warn!(device = %device.display(), mountpoint = %mountpoint.display(), "loop device dropped while mounted; it detaches when unmounted");
                if self.still_ours()
                    && let Err(e) =
                        run("losetup", &["--detach".as_ref(), device.as_os_str()], LOSETUP_ADVICE)
                {
                    warn!(error = %e, "deferred detach failed");
                }
            }
            Err(e) => warn!(error = %e, "loop device detach at drop failed"),
        }
    }
}

/// Where `device` is mounted (the first mount of it in this process's mount
/// namespace), if anywhere.
pub fn mounted_at(device: &Path) -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let rdev = fs::metadata(device).ok().map(|m| m.rdev()).filter(|&r| r != 0);
    let dev_id = rdev.map(|r| format!("{}:{}", libc::major(r), libc::minor(r)));
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mountpoint options... - fstype source super
        let fields: Vec<&str> = line.split(' ').collect();
        let (major_minor, mountpoint) = (*fields.get(2)?, *fields.get(4)?);
        let sep = fields.iter().position(|f| *f == "-")?;
        let source = fields.get(sep + 2).map(|s| unescape(s));
        let same =
            dev_id.as_deref() == Some(major_minor) || source.is_some_and(|s| s.as_path() == device);
        same.then(|| unescape(mountpoint))
    })
}

/// The loop devices whose backing file is `file`, in name order. Matched by
/// path as the kernel shows it (absolute, no symlinks): a file whose mount
/// was detached lazily under a device is no longer found by its old path.
pub fn devices_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(file) = std::path::absolute(file) else { return Vec::new() };
    let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
    let mut devices: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|d| backing_file(d).is_some_and(|f| f == file))
        .collect();
    devices.sort();
    devices
}

/// Whether a loop device is on its way out: detached (`losetup -d`, which
/// sets autoclear) while something still holds it open for a moment (a
/// udev probe, a closing filesystem), and not mounted.
pub fn detaching(device: &Path) -> bool {
    read_sys(device, "loop/autoclear").is_some_and(|a| a.trim() == "1")
        && mounted_at(device).is_none()
}

/// The file behind a loop device, `None` when it is not attached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    read_sys(device, "loop/backing_file").map(PathBuf::from)
}

/// `LOOP_GET_STATUS64` of <linux/loop.h>.
const LOOP_GET_STATUS64: u32 = 0x4C05;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// The identity of the file behind a loop device, `None` when it is not
/// attached (or cannot be opened).
fn backing_id(device: &Path) -> Option<FileId> {
    let disk = fs::File::open(device).ok()?;
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which
    // `info` is laid out as, and keeps no pointer to it.
    let rc = unsafe { libc::ioctl(disk.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    (rc == 0).then_some((info.lo_device, info.lo_inode))
}

/// A block device's sysfs attribute (`/sys/block/<name>/<attr>`), without
/// its trailing newline; `None` when the device or attribute is not there.
pub fn read_sys(device: &Path, attr: &str) -> Option<String> {
    let name = device.file_name()?;
    let text = fs::read_to_string(Path::new("/sys/block").join(name).join(attr)).ok()?;
    Some(text.trim_end_matches('\n').to_string())
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/self/mountinfo`.
pub fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// A command as one line for messages: the program and its arguments.
pub fn command_line(program: &str, args: &[&OsStr]) -> String {
    let mut line = program.to_string();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs a command; its trimmed stdout, or an error with its stderr.
fn run(program: &str, args: &[&OsStr], advice: &'static str) -> Result<String, FrontendError> {
    let command = command_line(program, args);
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source: io::Error| FrontendError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(FrontendError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            advice,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), PathBuf::from(r"/mnt/a b\c"));
        assert_eq!(unescape(r"/plain\"), PathBuf::from(r"/plain\"));
        assert_eq!(unescape(r"\12x"), PathBuf::from(r"\12x"));
    }
}
