//! Hosts as network namespaces for process-level tests: a bridge in the
//! root namespace and one namespace per host, each joined to the bridge by
//! a veth pair, all in one /24. The test process (in the root namespace)
//! reaches every host; a host's link can be cut and restored, which looks
//! to the others like a host that stops answering (no refusal, no reset).
//! Needs root and `ip`; everything made is removed on drop.

use std::{net::Ipv4Addr, process::Command, sync::atomic::AtomicU32};

use anyhow::{Context, bail};

/// Why namespaces cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("`ip` cannot be run: {e}")),
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One host: its namespace, the root side of its veth pair, its address.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    link: String,
    pub ip: Ipv4Addr,
}

/// A bridge and its hosts.
#[derive(Debug)]
pub struct Lan {
    bridge: String,
    hosts: Vec<Host>,
}

static LANS: AtomicU32 = AtomicU32::new(0);

impl Lan {
    /// Makes `n` hosts (at most 200) on a fresh /24 (10.7x.y.0/24, unique to
    /// this process and LAN).
    pub fn new(n: usize) -> anyhow::Result<Self> {
        if n > 200 {
            bail!("at most 200 hosts on a LAN, not {n}");
        }
        let k = LANS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = (std::process::id() % 10_000) * 10 + k % 10;
        let (b, c) = (70 + (id / 256 % 10) as u8, (id % 256) as u8);
        let mut lan = Lan { bridge: format!("cb{id}"), hosts: Vec::new() };
        ip(&["link", "add", &lan.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.{b}.{c}.1/24"), "dev", &lan.bridge])?;
        ip(&["link", "set", &lan.bridge, "up"])?;
        for i in 0..n {
            let host = Host {
                netns: format!("cn{id}h{i}"),
                link: format!("cv{id}h{i}"),
                ip: Ipv4Addr::new(10, b, c, 2 + i as u8),
            };
            let peer = format!("cp{id}h{i}");
            ip(&["netns", "add", &host.netns])?;
            lan.hosts.push(host.clone());
            ip(&["link", "add", &host.link, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &host.link, "master", &lan.bridge])?;
            ip(&["link", "set", &host.link, "up"])?;
            ip(&["link", "set", &peer, "netns", &host.netns])?;
            let ns = host.netns.as_str();
            ip(&["-n", ns, "addr", "add", &format!("{}/24", host.ip), "dev", &peer])?;
            ip(&["-n", ns, "link", "set", &peer, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Cuts host `i` off the LAN: its packets go nowhere, nothing is
    /// refused.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.hosts[i].link, "down"])
    }

    /// Joins host `i` to the LAN again.
    pub fn restore(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.hosts[i].link, "up"])
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
            let _ = ip(&["link", "del", &h.link]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
