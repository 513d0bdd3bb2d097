//! Test certificates for mutual TLS between sites: a CA per site and agent
//! identities it signs (valid for 127.0.0.1 and localhost), written as PEM
//! files an agent is started with.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::Context;

/// A site's certificate authority.
pub struct SiteCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for SiteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteCa").field("pem", &self.pem).finish_non_exhaustive()
    }
}

impl SiteCa {
    pub fn new(site: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("cairn site {site} CA"));
        let cert = params.self_signed(&key)?;
        Ok(SiteCa { pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// An agent identity: (certificate PEM, key PEM).
    pub fn issue(&self, agent: &str) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            agent.to_string(),
        ])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, agent);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes an identity for `agent` and the trusted `peers`' CAs into
    /// `dir`; returns the agent's arguments (`--tls-cert`, `--tls-key`,
    /// `--peer-ca`).
    pub fn agent_args(
        &self,
        agent: &str,
        peers: &[&SiteCa],
        dir: &Path,
    ) -> anyhow::Result<Vec<OsString>> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = self.issue(agent)?;
        let path = |name: &str| -> PathBuf { dir.join(format!("{agent}-{name}")) };
        let write = |p: &PathBuf, data: &str| {
            std::fs::write(p, data).with_context(|| format!("writing {}", p.display()))
        };
        let (c, k, ca) = (path("cert.pem"), path("key.pem"), path("peer-ca.pem"));
        write(&c, &cert)?;
        write(&k, &key)?;
        write(&ca, &peers.iter().map(|p| p.pem()).collect::<Vec<_>>().concat())?;
        Ok(vec![
            "--tls-cert".into(),
            c.into(),
            "--tls-key".into(),
            k.into(),
            "--peer-ca".into(),
            ca.into(),
        ])
    }
}
