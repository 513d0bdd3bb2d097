//! cairn-e2e: the harness the demo, the benchmarks and the process-level
//! tests share: finding and starting the real `cairn-agent` binary, talking
//! to it over gRPC, and stopping it gently (SIGTERM) or not (SIGKILL).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use cairn_api::agent::v1::replica_store_client::ReplicaStoreClient;
use tonic::transport::Channel;

/// A gRPC client of one agent.
pub type AgentClient = ReplicaStoreClient<Channel>;

/// The largest gRPC message the harness sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Path of the `cairn-agent` binary built with this workspace: next to the
/// running executable (or its parent, for test and bench executables in
/// `deps/`), else built now with cargo. `CAIRN_AGENT_BIN` overrides.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CAIRN_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    for candidate in [dir.join("cairn-agent"), dir.join("../cairn-agent")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    // Not built yet (e.g. `cargo run --bin cairn-demo` builds only the demo).
    let release = dir.ends_with("release") || dir.parent().is_some_and(|p| p.ends_with("release"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "cairn-agent", "--bin", "cairn-agent"]);
    if release {
        cmd.arg("--release");
    }
    eprintln!("building cairn-agent ({})", if release { "release" } else { "debug" });
    let status = cmd.status().context("running cargo to build cairn-agent")?;
    if !status.success() {
        bail!("cargo build -p cairn-agent failed");
    }
    let profile_dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    let built = profile_dir.join("cairn-agent");
    if !built.is_file() {
        bail!("built cairn-agent but cannot find it at {}", built.display());
    }
    Ok(built)
}

/// A running `cairn-agent` process.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl AgentProcess {
    /// Starts an agent on `data_dir`, listening on a free loopback port, and
    /// waits until it serves.
    pub fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts an agent listening on `listen` (port 0 picks one).
    pub fn start_with(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        let bin = agent_binary()?;
        let mut child = Command::new(&bin)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .env("CAIRN_LOG", std::env::var("CAIRN_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let status = child.wait()?;
            bail!("cairn-agent did not start ({status}); see its log above");
        };
        let addr = addr.parse().with_context(|| format!("agent printed {line:?}"))?;
        Ok(AgentProcess { child, addr, data_dir: data_dir.to_path_buf() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connected gRPC client.
    pub async fn client(&self) -> anyhow::Result<AgentClient> {
        connect(self.addr).await
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(mut self) -> anyhow::Result<()> {
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("cairn-agent exited with {status} after SIGTERM");
        }
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Resident memory of the agent process, in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("no VmRSS line")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb * 1024)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to an agent, retrying for a few seconds while it starts.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<AgentClient> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2));
    let mut last = None;
    for _ in 0..50 {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(ReplicaStoreClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES));
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        .with_context(|| format!("connecting to cairn-agent at {addr}"))
}

/// Deterministic pseudo-random bytes (xorshift), so runs are reproducible.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
