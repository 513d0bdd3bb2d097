//! Block-device attributes as the kernel publishes them under
//! `/sys/block/<name>/`. Read-only: nothing here writes to sysfs.

use std::{fs, path::Path};

/// A block device's sysfs attribute (`/sys/block/<name>/<attr>`), without
/// its trailing newline; `None` when the device or attribute is not there.
pub fn read(device: &Path, attr: &str) -> Option<String> {
    let name = device.file_name()?;
    let text = fs::read_to_string(Path::new("/sys/block").join(name).join(attr)).ok()?;
    Some(text.trim_end_matches('\n').to_string())
}
