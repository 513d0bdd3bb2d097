//! Mutual TLS between sites: each site has a CA; an agent has an identity
//! (certificate and key) signed by its site's CA and trusts the CAs of the
//! sites it copies with (`--peer-ca`). A receiver's site listener admits
//! only senders whose certificate chains to a trusted CA (and the link's
//! pairing secret is checked on top); a sender checks the receiver's
//! certificate the same way, against the host in the link's endpoint.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{what} is needed for site-to-site copies over mutual TLS: give --tls-cert, --tls-key and --peer-ca together"
    )]
    Missing { what: &'static str },
    #[error("reading {what} from {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} in {} is not PEM: expected a line starting with -----BEGIN", path.display())]
    NotPem { what: &'static str, path: PathBuf },
}

/// An agent's TLS material for site-to-site copies.
#[derive(Debug, Clone)]
pub struct SiteTls {
    identity: Identity,
    peer_ca: Certificate,
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(TlsError::NotPem { what, path: path.to_path_buf() });
    }
    Ok(bytes)
}

impl SiteTls {
    /// Loads the agent's certificate and key and the trusted peer CAs (PEM
    /// files; `peer_ca` may hold several certificates). `None` when none of
    /// the three is given; an error naming what is missing when only some
    /// are.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        peer_ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, peer_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(SiteTls {
                identity: Identity::from_pem(
                    read_pem("the agent certificate (--tls-cert)", cert)?,
                    read_pem("the agent key (--tls-key)", key)?,
                ),
                peer_ca: Certificate::from_pem(read_pem("the peer CAs (--peer-ca)", ca)?),
            })),
            (None, _, _) => Err(TlsError::Missing { what: "--tls-cert" }),
            (_, None, _) => Err(TlsError::Missing { what: "--tls-key" }),
            (_, _, None) => Err(TlsError::Missing { what: "--peer-ca" }),
        }
    }

    /// The site listener's config: this identity, and a client certificate
    /// required, chaining to a peer CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.peer_ca.clone())
    }

    /// A sender's config: this identity presented, the receiver checked
    /// against the peer CAs.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().identity(self.identity.clone()).ca_certificate(self.peer_ca.clone())
    }
}
