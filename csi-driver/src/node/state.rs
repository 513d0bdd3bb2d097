//! Node-local records of staged volumes: `<state-dir>/staged/<volume>.json`,
//! one small JSON file per volume, written temp + fsync + rename + fsync of
//! the directory so a crash leaves the old record or the new one. A record
//! says what the kernel cannot: how the volume was staged (access, where)
//! and which head file serves it; the loop device and the mounts are read
//! from the kernel each time.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use super::Error;
use crate::capability::Access;

/// A volume staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    /// The CSI volume id.
    pub volume_id: String,
    pub staging_target_path: PathBuf,
    pub access: Access,
    /// The agent's FUSE file of the head, the loop device's backing file.
    pub fuse_file: PathBuf,
    /// The publish context's OpenHead request (encoded), for the head's
    /// volume id, epoch and placement.
    pub open_head: String,
}

/// The records of one node plugin.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(state_dir: &Path) -> Self {
        StateDir { dir: state_dir.join("staged") }
    }

    fn file(&self, volume: &str) -> PathBuf {
        // `volume` passed crate::volume_id: no '/', no "..".
        self.dir.join(format!("{volume}.json"))
    }

    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    }

    /// The record of `volume`, if it is staged here.
    pub fn load(&self, volume: &str) -> Result<Option<Staged>, Error> {
        let path = self.file(volume);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::State { path, why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading", &path)(e)),
        }
    }

    /// Writes the record atomically.
    pub fn save(&self, staged: &Staged) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir).map_err(self.io("creating", &self.dir))?;
        let path = self.file(&staged.volume_id);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(staged).expect("a record serialises");
        let mut f = std::fs::File::create(&tmp).map_err(self.io("creating", &tmp))?;
        f.write_all(&json).map_err(self.io("writing", &tmp))?;
        f.sync_all().map_err(self.io("syncing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(self.io("renaming to", &path))?;
        self.sync_dir()
    }

    /// Removes the record (a missing one is fine).
    pub fn remove(&self, volume: &str) -> Result<(), Error> {
        let path = self.file(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("removing", &path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<(), Error> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("syncing", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::FsType;

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(state.load("v1").unwrap(), None);
        let staged = Staged {
            volume_id: "v1".into(),
            staging_target_path: "/stage/v1".into(),
            access: Access::Mount { fs_type: FsType::Xfs, flags: vec!["noatime".into()] },
            fuse_file: "/run/cairn/fuse/v1/volume".into(),
            open_head: "AAAA".into(),
        };
        state.save(&staged).unwrap();
        assert_eq!(state.load("v1").unwrap(), Some(staged.clone()));
        let text = std::fs::read_to_string(dir.path().join("staged/v1.json")).unwrap();
        assert!(text.contains("\"type\": \"mount\"") && text.contains("\"xfs\""), "{text}");
        state.remove("v1").unwrap();
        state.remove("v1").unwrap();
        assert_eq!(state.load("v1").unwrap(), None);
    }
}
