//! Mounts as the kernel reports them (`/proc/self/mountinfo`, read by
//! `cairn-host`), and the tools that make filesystems: `mount`/`umount`,
//! `blkid` to find what a device holds, `mkfs.<fs>` only on an empty
//! device, `resize2fs` and `xfs_growfs` to grow one. Nothing here formats a
//! device that holds a filesystem or anything else blkid recognises.

use std::{
    ffi::{OsStr, OsString},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

// Reading mountinfo is the host crate's, shared with the agent's frontend.
pub use cairn_host::mountinfo::{Mount, device_number, mounted_at, mounts};

use super::{Error, run, run_status};
use crate::capability::FsType;

/// The device node a mount is a bind of (raw block publishing), if it is
/// one.
pub fn bound_device(m: &Mount) -> Option<PathBuf> {
    let from_dev = m.fstype == "devtmpfs" || m.fstype == "tmpfs";
    let name = m.root.strip_prefix("/").ok()?;
    let loop_name = name.to_str().is_some_and(|n| n.starts_with("loop") && !n.contains('/'));
    (from_dev && loop_name).then(|| Path::new("/dev").join(name))
}

/// Where the device node itself is bind-mounted (raw block volumes
/// published into pods): binds of `/<name>` from the filesystem of /dev.
pub fn node_binds(device: &Path) -> Vec<PathBuf> {
    let Some(name) = device.file_name() else { return Vec::new() };
    let root = Path::new("/").join(name);
    mounts()
        .into_iter()
        .filter(|m| m.root == root && (m.fstype == "devtmpfs" || m.fstype == "tmpfs"))
        .map(|m| m.mountpoint)
        .collect()
}

/// `mount [-t fstype] [-o options] source target`.
pub async fn mount(
    source: &Path,
    target: &Path,
    fstype: Option<&str>,
    options: &[String],
) -> Result<(), Error> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(t) = fstype {
        args.extend(["-t".into(), t.into()]);
    }
    if !options.is_empty() {
        args.extend(["-o".into(), options.join(",").into()]);
    }
    args.extend([source.as_os_str().to_owned(), target.as_os_str().to_owned()]);
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    run("mount", &args).await.map(drop)
}

/// Bind-mounts `source` on `target`, read-only if asked (a bind mount
/// takes `ro` only on a remount).
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), Error> {
    mount(source, target, None, &["bind".into()]).await?;
    if read_only
        && let Err(e) = mount(Path::new("none"), target, None, &["remount,bind,ro".into()]).await
    {
        let _ = umount(target).await;
        return Err(e);
    }
    Ok(())
}

/// Unmounts everything mounted at `path` (stacked mounts too).
pub async fn umount(path: &Path) -> Result<(), Error> {
    while mounted_at(path).is_some() {
        run("umount", &[path.as_os_str()]).await?;
    }
    Ok(())
}

/// What blkid finds on a device: `None` for nothing it knows (an empty
/// device), else the filesystem (or partition table, or other) type.
pub async fn probe(device: &Path) -> Result<Option<String>, Error> {
    let args: [&OsStr; 6] = [
        "-p".as_ref(),
        "-o".as_ref(),
        "value".as_ref(),
        "-s".as_ref(),
        "TYPE".as_ref(),
        device.as_os_str(),
    ];
    // Exit status 2: nothing was found.
    match run_status("blkid", &args, &[2]).await? {
        (0, out) if !out.is_empty() => Ok(Some(out)),
        (0, _) => {
            // Something without a TYPE (a partition table): not empty.
            let pt: [&OsStr; 6] = [
                "-p".as_ref(),
                "-o".as_ref(),
                "value".as_ref(),
                "-s".as_ref(),
                "PTTYPE".as_ref(),
                device.as_os_str(),
            ];
            let (_, pt) = run_status("blkid", &pt, &[2]).await?;
            Ok(Some(if pt.is_empty() { "unknown".into() } else { format!("partition table {pt}") }))
        }
        _ => Ok(None),
    }
}

/// Formats an empty device.
pub async fn mkfs(fs: FsType, device: &Path) -> Result<(), Error> {
    let program = format!("mkfs.{}", fs.as_str());
    let force = match fs {
        FsType::Ext4 => "-F",
        FsType::Xfs => "-f",
    };
    run(&program, &[force.as_ref(), "-q".as_ref(), device.as_os_str()]).await.map(drop)
}

/// Grows the filesystem mounted at `mountpoint` (from `device`) to the
/// device's size.
pub async fn grow(fs: FsType, device: &Path, mountpoint: &Path) -> Result<(), Error> {
    match fs {
        FsType::Ext4 => run("resize2fs", &[device.as_os_str()]).await.map(drop),
        FsType::Xfs => run("xfs_growfs", &[mountpoint.as_os_str()]).await.map(drop),
    }
}

/// Space and inodes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statvfs is a valid value for libc to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}
