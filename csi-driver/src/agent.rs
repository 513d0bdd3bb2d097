//! Reaching agents: one lazily connected gRPC channel per endpoint, plain
//! for `http://`, mutual TLS for `https://` with the client certificate and
//! the agents' CA from the `--agent-ca/--agent-cert/--agent-key` files (the
//! operator's agent client does the same).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::{
    Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// The mutual-TLS files for agents served over https://.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The CA that signed the agents' certificates.
    #[arg(long, env = "CAIRN_AGENT_CA", requires_all = ["agent_cert", "agent_key"])]
    pub agent_ca: Option<PathBuf>,
    /// This driver's client certificate for agents served over https://.
    #[arg(long, env = "CAIRN_AGENT_TLS_CERT", requires_all = ["agent_ca", "agent_key"])]
    pub agent_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, env = "CAIRN_AGENT_TLS_KEY", requires_all = ["agent_ca", "agent_cert"])]
    pub agent_key: Option<PathBuf>,
}

/// Why agent TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub struct TlsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl TlsArgs {
    /// The client TLS configuration, `None` when no files are given.
    pub fn load(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let (Some(ca), Some(cert), Some(key)) = (&self.agent_ca, &self.agent_cert, &self.agent_key)
        else {
            return Ok(None);
        };
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|source| TlsError { path: p.clone(), source });
        Ok(Some(
            ClientTlsConfig::new()
                .identity(Identity::from_pem(read(cert)?, read(key)?))
                .ca_certificate(Certificate::from_pem(read(ca)?)),
        ))
    }
}

/// Channels to agents, one per endpoint, connected on first use.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
}

impl Agents {
    /// `tls` is used for `https://` endpoints.
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Agents { tls, channels: Default::default() }
    }

    /// The channel to `endpoint`; `INVALID_ARGUMENT` for an endpoint that
    /// cannot be dialled (not a URI, https:// without TLS files).
    pub fn channel(&self, endpoint: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let mut e = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| Status::invalid_argument(format!("agent endpoint {endpoint:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        if endpoint.starts_with("https://") {
            let tls = self.tls.clone().ok_or_else(|| {
                Status::invalid_argument(format!(
                    "agent {endpoint} is served over https: start cairn-csi with --agent-ca, --agent-cert and --agent-key"
                ))
            })?;
            e = e
                .tls_config(tls)
                .map_err(|e| Status::invalid_argument(format!("agent {endpoint}: {e}")))?;
        }
        let c = e.connect_lazy();
        channels.insert(endpoint.to_string(), c.clone());
        Ok(c)
    }
}
