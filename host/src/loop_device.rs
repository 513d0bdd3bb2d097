//! Loop devices as the kernel knows them: the file behind each one (sysfs
//! and `LOOP_GET_STATUS64`), whether it is on its way out, and where a
//! filesystem on it is mounted. The kernel is the record of which device
//! serves which file, so a restarted agent or node plugin finds its devices
//! again; attaching and detaching (`losetup`) stay with each caller, which
//! decides when that is safe.

use std::{
    fs,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use crate::{mountinfo, sysfs};

/// Logical block size of the loop devices Cairn attaches: the volume's
/// block.
pub const SECTOR_SIZE: u32 = 4096;

/// A file as the loop driver identifies it: (device, inode).
pub type FileId = (u64, u64);

/// The file behind a loop device, `None` when it is not attached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    sysfs::read(device, "loop/backing_file").map(PathBuf::from)
}

/// The loop devices whose backing file is `file`, in name order. Matched by
/// path as the kernel shows it (absolute, no symlinks): a file whose mount
/// was detached lazily under a device is no longer found by its old path.
pub fn devices_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(file) = std::path::absolute(file) else { return Vec::new() };
    devices_where(|f| f == file)
}

/// The loop devices whose backing file is under `dir`, in name order.
pub fn devices_backed_under(dir: &Path) -> Vec<PathBuf> {
    devices_where(|f| f.starts_with(dir))
}

/// The attached loop devices whose backing file passes `keep`, by name.
fn devices_where(keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
    let mut devices: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|d| backing_file(d).is_some_and(|f| keep(&f)))
        .collect();
    devices.sort();
    devices
}

/// Where a filesystem on `device` is mounted (its first mount in this
/// process's mount namespace), if anywhere: a mount of the device's
/// `major:minor`, or one whose source is the device's path. Bind mounts of
/// the device node itself (raw block publishing) do not count: their
/// device is the filesystem holding /dev, their source that filesystem's.
pub fn mounted_at(device: &Path) -> Option<PathBuf> {
    let number = mountinfo::device_number(device);
    mountinfo::mounts()
        .into_iter()
        .find(|m| number.as_ref() == Some(&m.device) || m.source == device)
        .map(|m| m.mountpoint)
}

/// Whether a loop device is on its way out: detached (`losetup -d`, which
/// sets autoclear) while something still holds it open for a moment (a
/// udev probe, a closing filesystem), and not mounted.
pub fn detaching(device: &Path) -> bool {
    sysfs::read(device, "loop/autoclear").is_some_and(|a| a.trim() == "1")
        && mounted_at(device).is_none()
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
/// attached (or cannot be opened). Unlike [`backing_file`], it does not
/// change when the file's path does (a FUSE mount detached lazily under
/// the device).
pub fn backing_id(device: &Path) -> Option<FileId> {
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
