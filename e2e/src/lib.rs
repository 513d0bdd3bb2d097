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
use cairn_api::agent::v1::{
    self as pb, replica_store_client::ReplicaStoreClient, snapshot_copy_client::SnapshotCopyClient,
    volume_heads_client::VolumeHeadsClient,
};
use tonic::transport::Channel;

pub mod faults;
pub mod netns;
pub mod proxy;
pub mod skip;
pub mod tls;

pub use skip::skip;

/// A gRPC client of one agent's replica store.
pub type AgentClient = ReplicaStoreClient<Channel>;
/// A gRPC client of one agent's volume heads.
pub type HeadsClient = VolumeHeadsClient<Channel>;
/// A gRPC client of one agent's copy receiver.
pub type CopyClient = SnapshotCopyClient<Channel>;

/// A client of `agent`'s copy receiver (`SnapshotCopy`).
pub async fn copy_client(agent: &AgentProcess) -> anyhow::Result<CopyClient> {
    Ok(SnapshotCopyClient::new(channel(agent.addr()).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The largest gRPC message the harness sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Path of the `cairn-agent` binary of this workspace, in the same target
/// profile as the running executable. Under cargo (`cargo test`, `cargo run`,
/// which set `CARGO`) it is (re)built first, once per process, so a test or
/// the demo never runs a stale agent. `CAIRN_AGENT_BIN` overrides.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    if let Ok(p) = std::env::var("CAIRN_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    BUILT
        .get_or_init(|| locate_or_build("cairn-agent").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Path of the `cairn` command-line client, found and (re)built like
/// [`agent_binary`]; `CAIRN_CLI_BIN` overrides.
pub fn cli_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    if let Ok(p) = std::env::var("CAIRN_CLI_BIN") {
        return Ok(PathBuf::from(p));
    }
    BUILT
        .get_or_init(|| locate_or_build("cairn").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_or_build(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    // Test and bench executables live in `<profile>/deps`.
    let profile_dir = if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir };
    let bin = profile_dir.join(name);
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = Command::new(cargo);
        // With cairn-e2e selected too, dependencies get the same features
        // as in the build that runs this harness, so the two builds share
        // one cache instead of rebuilding each other's dependencies.
        cmd.args(["build", "--quiet", "-p", "cairn-agent", "-p", "cairn-e2e", "--bin", name]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        // `cargo run` and `cargo test` set per-package variables (such as
        // CARGO_MANIFEST_DIR) for the program they run; build scripts that
        // watch them (ring's) would rebuild on every alternation.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
                cmd.env_remove(&key);
            }
        }
        let status = cmd.status().with_context(|| format!("running cargo to build {name}"))?;
        if !status.success() {
            bail!("cargo build -p cairn-agent --bin {name} failed ({status})");
        }
    }
    if !bin.is_file() {
        bail!(
            "no {name} binary at {}: build it with `cargo build -p cairn-agent --bin {name}`",
            bin.display()
        );
    }
    Ok(bin)
}

/// An `OpenHead` request for a Primary volume of `size` bytes in `chunk`-byte
/// chunks with `replicas` replicas over `agents` (name, endpoint), at epoch
/// 1, without FUSE; change the rest with struct update syntax.
pub fn open_head_request(
    volume: &str,
    size: u64,
    chunk: u64,
    replicas: u32,
    agents: impl IntoIterator<Item = (String, String)>,
) -> pb::OpenHeadRequest {
    pb::OpenHeadRequest {
        volume_id: volume.into(),
        size_bytes: size,
        chunk_size_bytes: chunk,
        replicas,
        layout_version: 1,
        epoch: 1,
        agents: agents
            .into_iter()
            .map(|(name, endpoint)| pb::HeadAgent {
                name,
                endpoint,
                domain: String::new(),
                cost: 0,
            })
            .collect(),
        fuse: false,
        stale_agents: vec![],
        accept_data_loss: false,
        role: pb::VolumeRole::Primary as i32,
    }
}

/// Agents named a1, a2, ... in order, with their endpoints (a stopped one,
/// `None`, with an empty endpoint).
pub fn numbered<'a>(
    agents: impl IntoIterator<Item = Option<&'a AgentProcess>>,
) -> Vec<(String, String)> {
    agents
        .into_iter()
        .enumerate()
        .map(|(i, a)| (format!("a{}", i + 1), a.map(|a| a.endpoint()).unwrap_or_default()))
        .collect()
}

/// A running `cairn-agent` process.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    addr: SocketAddr,
    /// The site listener (mutual TLS), when started with --site-listen.
    site_addr: Option<SocketAddr>,
    data_dir: PathBuf,
}

impl AgentProcess {
    /// Starts an agent on `data_dir`, listening on a free loopback port, and
    /// waits until it serves.
    pub fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts an agent named `name` (its name in the storage cluster).
    pub fn start_named(data_dir: &Path, name: &str) -> anyhow::Result<Self> {
        Self::spawn(data_dir, "127.0.0.1:0".parse().unwrap(), Some(name), &[])
    }

    /// Starts an agent named `name` with extra command-line arguments.
    pub fn start_args(
        data_dir: &Path,
        name: &str,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        Self::spawn(data_dir, "127.0.0.1:0".parse().unwrap(), Some(name), args)
    }

    /// Starts an agent named `name` on `listen` with extra arguments: an
    /// agent restarted on its old address, say.
    pub fn start_on(
        data_dir: &Path,
        name: &str,
        listen: SocketAddr,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        Self::spawn(data_dir, listen, Some(name), args)
    }

    /// Starts an agent listening on `listen` (port 0 picks one).
    pub fn start_with(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        Self::spawn(data_dir, listen, None, &[])
    }

    /// Starts an agent named `name` inside network namespace `netns` (see
    /// [`netns::Lan`]), listening on `listen` there. Needs root.
    pub fn start_in_netns(
        netns: &str,
        data_dir: &Path,
        name: &str,
        listen: SocketAddr,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        Self::spawn_in(Some(netns), data_dir, listen, Some(name), args)
    }

    fn spawn(
        data_dir: &Path,
        listen: SocketAddr,
        name: Option<&str>,
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        Self::spawn_in(None, data_dir, listen, name, extra)
    }

    fn spawn_in(
        netns: Option<&str>,
        data_dir: &Path,
        listen: SocketAddr,
        name: Option<&str>,
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let bin = agent_binary()?;
        // `ip netns exec` enters the namespace and execs the agent, so the
        // child's pid is the agent's.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(name) = name {
            cmd.arg("--name").arg(name);
        }
        cmd.args(extra);
        let mut child = cmd
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
        let mut stdout = BufReader::new(stdout);
        let mut site_addr = None;
        let addr = loop {
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            if let Some(a) = line.trim().strip_prefix("site-listening ") {
                site_addr = Some(a.parse().with_context(|| format!("agent printed {line:?}"))?);
                continue;
            }
            let Some(addr) = line.trim().strip_prefix("listening ") else {
                let status = child.wait()?;
                bail!("cairn-agent did not start ({status}); see its log above");
            };
            break addr.parse().with_context(|| format!("agent printed {line:?}"))?;
        };
        Ok(AgentProcess { child, addr, site_addr, data_dir: data_dir.to_path_buf() })
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

    /// A client of the agent's volume heads.
    pub async fn heads(&self) -> anyhow::Result<HeadsClient> {
        Ok(VolumeHeadsClient::new(channel(self.addr).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The site listener's endpoint (`https://`, mutual TLS), when the
    /// agent was started with --site-listen.
    pub fn site_endpoint(&self) -> Option<String> {
        self.site_addr.map(|a| format!("https://{a}"))
    }

    /// The agent's gRPC endpoint, as other agents dial it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
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
    Ok(ReplicaStoreClient::new(channel(addr).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A gRPC channel to an agent, retrying for a few seconds while it starts.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2));
    let mut last = None;
    for _ in 0..50 {
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
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

/// What a volume should hold, kept by the demo and the tests to check what an
/// agent returns: the data of every non-zero block, by block index. Offsets
/// and lengths are in bytes and must be whole blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub size: u64,
    pub blocks: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Reference {
    const BS: u64 = cairn_api::BLOCK_SIZE;

    /// An empty (all-zero) volume of `size` bytes.
    pub fn new(size: u64) -> Self {
        Reference { size, blocks: Default::default() }
    }

    fn check(&self, offset: u64, len: u64) {
        assert!(
            offset.is_multiple_of(Self::BS)
                && len.is_multiple_of(Self::BS)
                && offset + len <= self.size,
            "reference: [{offset}, +{len}) is not whole blocks inside {} bytes",
            self.size
        );
    }

    /// Records a write; all-zero blocks read as zeros, so they are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.check(offset, data.len() as u64);
        for (i, d) in data.chunks_exact(Self::BS as usize).enumerate() {
            let b = offset / Self::BS + i as u64;
            if cairn_api::digest::is_zero(d) {
                self.blocks.remove(&b);
            } else {
                self.blocks.insert(b, d.to_vec());
            }
        }
    }

    /// Records a trim: the blocks read as zeros afterwards.
    pub fn trim(&mut self, offset: u64, len: u64) {
        self.check(offset, len);
        let first = offset / Self::BS;
        let gone: Vec<u64> =
            self.blocks.range(first..first + len / Self::BS).map(|(b, _)| *b).collect();
        for b in gone {
            self.blocks.remove(&b);
        }
    }

    /// What a read of `[offset, offset + len)` must return.
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.check(offset, len);
        let mut out = vec![0u8; len as usize];
        let first = offset / Self::BS;
        for (b, d) in self.blocks.range(first..first + len / Self::BS) {
            let at = ((b - first) * Self::BS) as usize;
            out[at..at + d.len()].copy_from_slice(d);
        }
        out
    }

    /// Describes the first block where `got`, read at `offset`, differs from
    /// this reference; `None` when it matches.
    pub fn mismatch(&self, offset: u64, got: &[u8]) -> Option<String> {
        let want = self.read(offset, got.len() as u64);
        let bs = Self::BS as usize;
        let i = got.chunks(bs).zip(want.chunks(bs)).position(|(g, w)| g != w)?;
        let b = offset / Self::BS + i as u64;
        let zero = |d: &[u8]| cairn_api::digest::is_zero(&d[i * bs..(i + 1) * bs]);
        let how = match (zero(&want), zero(got)) {
            (true, _) => "expected zeros, got data",
            (false, true) => "expected data, got zeros",
            (false, false) => "got different data",
        };
        Some(format!("block {b} (byte offset {}): {how}", b * Self::BS))
    }

    /// The digest an agent must report for this content.
    pub fn digest(&self) -> cairn_api::Digest {
        cairn_api::digest::image_digest(self.size, self.blocks.iter().map(|(b, d)| (*b, &d[..])))
    }

    /// Blocks whose content differs from `older`, with their content here
    /// (empty for a block that is now zero).
    pub fn changed_since(&self, older: &Reference) -> std::collections::BTreeMap<u64, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        for (b, d) in &self.blocks {
            if older.blocks.get(b) != Some(d) {
                out.insert(*b, d.clone());
            }
        }
        for b in older.blocks.keys() {
            if !self.blocks.contains_key(b) {
                out.insert(*b, Vec::new());
            }
        }
        out
    }
}

/// Bytes a directory tree takes on disk (allocated blocks, so holes in
/// sparse files do not count).
pub fn disk_usage(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { disk_usage(&entry.path())? } else { meta.blocks() * 512 };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = cairn_api::BLOCK_SIZE;

    #[test]
    fn reference_tracks_writes_trims_and_differences() {
        let mut r = Reference::new(16 * BS);
        r.write(2 * BS, &pattern(1, 3 * BS as usize));
        r.write(3 * BS, &[0; BS as usize]);
        assert_eq!(r.blocks.keys().copied().collect::<Vec<_>>(), [2, 4]);
        let before = r.clone();
        r.trim(4 * BS, 2 * BS);
        r.write(9 * BS, &pattern(2, BS as usize));
        let changed = r.changed_since(&before);
        assert_eq!(changed.keys().copied().collect::<Vec<_>>(), [4, 9]);
        assert!(changed[&4].is_empty());

        let mut got = r.read(0, 16 * BS);
        assert_eq!(r.mismatch(0, &got), None);
        got[(9 * BS + 5) as usize] ^= 1;
        assert_eq!(r.mismatch(0, &got).unwrap(), "block 9 (byte offset 36864): got different data");
        assert!(r.mismatch(BS, &got[BS as usize..2 * BS as usize]).is_none());
        assert!(r.mismatch(0, &[1; BS as usize]).unwrap().contains("expected zeros, got data"));
        assert_ne!(r.digest(), before.digest());
    }
}
