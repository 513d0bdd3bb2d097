//! The CSI endpoint: a unix socket the CO dials (`unix:///csi/csi.sock`).
//! Binding removes a stale socket left by an earlier run and creates the
//! socket's directory; anything else at that path is left alone and
//! refused.

use std::{
    io,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;

/// Why the endpoint cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "endpoint {0:?} is not a unix socket: use unix:///path/to/csi.sock (or an absolute path)"
    )]
    Scheme(String),
    #[error("{path} exists and is not a socket: refusing to remove it")]
    NotSocket { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The socket path of an endpoint: `unix:///p`, `unix:/p` or `/p`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, Error> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::Scheme(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Listens on `endpoint`.
pub fn bind(endpoint: &str) -> Result<UnixListener, Error> {
    let path = socket_path(endpoint)?;
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the directory", dir))?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(&path).map_err(io("removing the stale socket", &path))?;
        }
        Ok(_) => return Err(Error::NotSocket { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting", &path)(e)),
    }
    UnixListener::bind(&path).map_err(io("listening on", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_unix_socket_paths() {
        assert_eq!(socket_path("unix:///csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("unix:/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/csi.sock");
        let endpoint = format!("unix://{}", sock.display());
        drop(bind(&endpoint).unwrap());
        assert!(sock.exists(), "the socket file stays after the listener is dropped");
        drop(bind(&endpoint).unwrap());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(file.to_str().unwrap()), Err(Error::NotSocket { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
