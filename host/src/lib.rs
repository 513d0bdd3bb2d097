//! cairn-host: what the kernel of this machine says about its block
//! devices and mounts, read the same way by the agent's FUSE/loop frontend
//! and the CSI node plugin: loop devices and their backing files
//! ([`loop_device`]), mounts from `/proc/self/mountinfo` ([`mountinfo`]),
//! block-device attributes in sysfs ([`sysfs`]), and commands as one line
//! for messages ([`command`]). No async, no error types of its own: a read
//! the kernel refuses is `None`, and the caller says what that means.

pub mod command;
pub mod loop_device;
pub mod mountinfo;
pub mod sysfs;
