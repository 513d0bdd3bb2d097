//! Mounts as the kernel reports them in `/proc/self/mountinfo` (this
//! process's mount namespace), with the octal escapes of its fields undone.
//! Read each time it is asked: the kernel is the record, nothing is cached.

use std::{
    ffi::OsStr,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device.
    pub device: String,
    /// The path inside that filesystem mounted here (`/` but for binds).
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: String,
    pub fstype: String,
    pub source: PathBuf,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Parses mountinfo text; a line without every field is skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint options [optional...] - fstype source super
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                device: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                mountpoint: unescape(f.get(4)?),
                options: f.get(5)?.to_string(),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape(f.get(sep + 2)?),
            })
        })
        .collect()
}

/// The mounts of this process's mount namespace (none when mountinfo
/// cannot be read).
pub fn mounts() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t)).unwrap_or_default()
}

/// The topmost mount at `path`, if it is a mount point.
pub fn mounted_at(path: &Path) -> Option<Mount> {
    mounts().into_iter().rfind(|m| m.mountpoint == path)
}

/// `major:minor` of a device node, as mountinfo writes it.
pub fn device_number(device: &Path) -> Option<String> {
    let rdev = fs::metadata(device).ok()?.rdev();
    (rdev != 0).then(|| format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), PathBuf::from(r"/mnt/a b\c"));
        assert_eq!(unescape(r"/plain\"), PathBuf::from(r"/plain\"));
        assert_eq!(unescape(r"\12x"), PathBuf::from(r"\12x"));
    }

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/loop3 rw,errors=continue\n\
                    40 36 0:5 /loop3 /var/lib/pods/x/block ro,nosuid shared:2 - devtmpfs udev rw\n\
                    bad line\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].device, "98:0");
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[0].source, PathBuf::from("/dev/loop3"));
        assert!(!m[0].read_only());
        assert!(m[1].read_only());
        assert_eq!(m[1].fstype, "devtmpfs");
        assert_eq!(m[1].root, PathBuf::from("/loop3"));
    }
}
