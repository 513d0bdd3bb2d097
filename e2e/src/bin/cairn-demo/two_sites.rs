//! The demo's third part, the two-site story: site A (three agents) and site
//! B (two agents) on loopback, each with its own CA, copying over mutual
//! TLS. A volume on A is written and its snapshots are copied to B over a
//! link under a bandwidth cap, with a progress bar; B's receiving agent is
//! killed mid-copy and the copy resumes at its checkpoint; site A is lost
//! and B is promoted and written; A comes back, is demoted and resynced from
//! B with only the delta (its own late snapshots kept, marked divergent);
//! a planned switchover makes A the primary again. Every step checks digests
//! against an in-memory reference of what the volume must hold.

use std::{
    ffi::{OsStr, OsString},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use cairn_api::agent::v1 as pb;
use cairn_e2e::{AgentProcess, HeadsClient, Reference, pattern, tls::SiteCa};

use super::{Demo, MIB, digest, size};

const VOLUME: &str = "orders";
const SIZE: u64 = 256 * MIB;
const CHUNK: u64 = 32 * MIB;
const SECRET: &[u8] = b"demo-pairing-secret-site-a-b";
/// The link's bandwidth cap.
const CAP: u64 = 48 * MIB;

/// One site: its agents (restartable) and the volume's head on the first.
struct Site {
    name: &'static str,
    dirs: Vec<PathBuf>,
    args: Vec<OsString>,
    agents: Vec<Option<AgentProcess>>,
    heads: Option<HeadsClient>,
    epoch: u64,
}

impl Site {
    fn start(name: &'static str, n: usize, root: &Path, args: Vec<OsString>) -> Result<Site> {
        let mut site =
            Site { name, dirs: Vec::new(), args, agents: Vec::new(), heads: None, epoch: 0 };
        for i in 0..n {
            let dir = root.join(format!("{name}{}", i + 1));
            std::fs::create_dir_all(&dir)?;
            site.dirs.push(dir);
            site.agents.push(None);
            site.restart(i)?;
        }
        Ok(site)
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        let args: Vec<&OsStr> = self.args.iter().map(|a| a.as_os_str()).collect();
        let name = format!("{}{}", self.name, i + 1);
        let agent = AgentProcess::start_args(&self.dirs[i], &name, &args)
            .with_context(|| format!("starting agent {name}"))?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    fn agent(&self, i: usize) -> &AgentProcess {
        self.agents[i].as_ref().expect("running")
    }

    fn kill9(&mut self, i: usize) -> Result<()> {
        if let Some(a) = self.agents[i].take() {
            a.kill9()?;
        }
        Ok(())
    }

    /// The site listener of the head's agent (mutual TLS).
    fn site_endpoint(&self) -> String {
        self.agent(0).site_endpoint().expect("started with --site-listen")
    }

    /// Opens (or reopens, at the next epoch) the volume's head on agent 1.
    async fn open(&mut self, role: pb::VolumeRole) -> Result<()> {
        self.epoch += 1;
        let agents = self
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("{}{}", self.name, i + 1), a.as_ref().unwrap().endpoint()));
        let req = pb::OpenHeadRequest {
            epoch: self.epoch,
            role: role as i32,
            ..cairn_e2e::open_head_request(VOLUME, SIZE, CHUNK, 2, agents)
        };
        let mut heads = self.agent(0).heads().await?;
        heads
            .open_head(req)
            .await
            .with_context(|| format!("opening the head at site {}", self.name))?;
        self.heads = Some(heads);
        Ok(())
    }

    fn heads(&self) -> HeadsClient {
        self.heads.clone().expect("the head is open")
    }

    async fn write(&self, offset: u64, data: Vec<u8>, want: &mut Reference) -> Result<()> {
        want.write(offset, &data);
        let req = pb::HeadWriteRequest { volume_id: VOLUME.into(), offset, data: data.into() };
        self.heads().head_write(req).await.context("writing")?;
        Ok(())
    }

    async fn snapshot(&self, id: &str, generation: u64) -> Result<()> {
        let req = pb::HeadSnapshotRequest {
            volume_id: VOLUME.into(),
            snapshot_id: id.into(),
            generation,
        };
        self.heads().head_snapshot(req).await.with_context(|| format!("snapshot {id}"))?;
        Ok(())
    }

    async fn digest(&self, snapshot: &str) -> Result<cairn_api::Digest> {
        let req = pb::HeadDigestRequest { volume_id: VOLUME.into(), snapshot_id: snapshot.into() };
        digest(&self.heads().head_digest(req).await?.into_inner().digest)
    }

    async fn receive(&self, link: &str) -> Result<()> {
        let req = pb::RegisterLinkRequest {
            link_id: link.into(),
            pairing_secret: SECRET.to_vec().into(),
            target_volume_id: VOLUME.into(),
        };
        cairn_e2e::copy_client(self.agent(0)).await?.register_link(req).await?;
        Ok(())
    }

    async fn put_link(&self, link: &str, to: String, rate: Option<u64>) -> Result<()> {
        let policy = rate.map(|r| pb::BandwidthPolicy {
            policy: Some(pb::bandwidth_policy::Policy::Fixed(pb::Rate {
                unlimited: false,
                bytes_per_sec: r,
            })),
        });
        let req = pb::Link {
            link_id: link.into(),
            volume_id: VOLUME.into(),
            target_endpoint: to,
            pairing_secret: SECRET.to_vec().into(),
            policy,
            compression: pb::Compression::None as i32,
            ..Default::default()
        };
        self.heads().put_link(req).await?;
        Ok(())
    }

    /// Syncs a link, drawing its progress; `interrupt` runs once the copy
    /// has durable bytes at the target past the given fraction.
    async fn sync(
        &self,
        link: &str,
        resync: bool,
        interrupt: Option<f64>,
    ) -> Result<std::result::Result<pb::SyncLinkResponse, tonic::Status>> {
        // A copy broken a moment ago may still be winding down at the sender.
        for _ in 0..40 {
            let busy = self.heads().list_links(pb::ListLinksRequest::default()).await?;
            let running = busy.into_inner().links.iter().any(|l| {
                l.link.as_ref().is_some_and(|x| x.link_id == link)
                    && l.current_rate_bytes_per_sec != 0
            });
            if !running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut h = self.heads();
        let req = pb::SyncLinkRequest { link_id: link.into(), resync };
        let task = tokio::spawn(async move { h.sync_link(req).await.map(|r| r.into_inner()) });
        let mut shown = false;
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let req = pb::CopyProgressRequest { volume_id: VOLUME.into(), link_id: link.into() };
            let Ok(p) = self.heads().get_copy_progress(req).await.map(|r| r.into_inner()) else {
                continue;
            };
            if p.done || p.bytes_total == 0 {
                continue;
            }
            let done = p.bytes_durable.max(p.bytes_sent).min(p.bytes_total);
            let frac = done as f64 / p.bytes_total as f64;
            print!(
                "\r    {:<7} [{:<30}] {:>5.1}%  {:>6.1}/{:.1} MiB  {:>5.1} MiB/s  ETA {:>4.1} s ",
                p.snapshot_id,
                "#".repeat((frac * 30.0) as usize),
                frac * 100.0,
                done as f64 / MIB as f64,
                p.bytes_total as f64 / MIB as f64,
                p.rate_bytes_per_sec / MIB as f64,
                p.eta_seconds
            );
            std::io::stdout().flush().ok();
            shown = true;
            if interrupt.is_some_and(|f| p.bytes_durable as f64 >= f * p.bytes_total as f64) {
                println!();
                task.abort();
                return Ok(Err(tonic::Status::cancelled("interrupted by the demo")));
            }
        }
        if shown {
            println!();
        }
        Ok(task.await?)
    }

    /// Reads the whole volume and compares every block with `want`.
    async fn verify(&self, want: &Reference) -> Result<()> {
        let mut h = self.heads();
        let mut offset = 0;
        while offset < SIZE {
            let req = pb::HeadReadRequest { volume_id: VOLUME.into(), offset, length: 4 * MIB };
            let got = h.head_read(req).await?.into_inner().data;
            if let Some(m) = want.mismatch(offset, &got) {
                anyhow::bail!("site {}: {m}", self.name);
            }
            offset += 4 * MIB;
        }
        ensure!(self.digest("").await? == want.digest(), "site {}: head digest differs", self.name);
        Ok(())
    }
}

pub struct TwoSites {
    dir: PathBuf,
}

impl TwoSites {
    pub fn new(dir: &Path) -> Self {
        TwoSites { dir: dir.join("two-sites") }
    }

    pub async fn run(&mut self, demo: &mut Demo) -> Result<()> {
        demo.begin("Two sites, each with its own CA: A (3 agents) and B (2 agents)");
        let certs = self.dir.join("certs");
        let (ca_a, ca_b) = (SiteCa::new("site-a")?, SiteCa::new("site-b")?);
        let mut a_args = ca_a.agent_args("site-a", &[&ca_b], &certs)?;
        a_args.extend(["--site-listen".into(), "127.0.0.1:0".into()]);
        let mut b_args = ca_b.agent_args("site-b", &[&ca_a], &certs)?;
        b_args.extend(["--site-listen".into(), "127.0.0.1:0".into()]);
        b_args.extend(["--copy-checkpoint-mib".into(), "4".into()]);
        let mut a = Site::start("a", 3, &self.dir, a_args)?;
        let mut b = Site::start("b", 2, &self.dir, b_args)?;
        a.open(pb::VolumeRole::Primary).await?;
        b.open(pb::VolumeRole::Remote).await?;
        b.receive("a-to-b").await?;
        a.put_link("a-to-b", b.site_endpoint(), Some(CAP)).await?;
        demo.ok(format!(
            "{VOLUME} ({}) primary at A, remote at B; link a-to-b over mutual TLS, capped at {}/s",
            size(SIZE),
            size(CAP)
        ));

        demo.begin("Write at A, snapshot s1, copy it to B (the image)");
        let mut want = Reference::new(SIZE);
        for i in 0..48u64 {
            a.write(i * 5 * MIB, pattern(1000 + i, MIB as usize), &mut want).await?;
        }
        a.snapshot("s1", 1).await?;
        let s1_want = want.digest();
        let t = Instant::now();
        let r = a.sync("a-to-b", false, None).await??;
        let c = &r.copies[0];
        ensure!(b.digest("s1").await? == s1_want, "s1 at B differs from what A wrote");
        let rate = c.bytes_sent as f64 / MIB as f64 / t.elapsed().as_secs_f64();
        ensure!(
            rate <= CAP as f64 / MIB as f64 * 1.1,
            "the copy ran at {rate:.1} MiB/s, over the {} cap",
            size(CAP)
        );
        demo.ok(format!(
            "{} in {:.1} s ({rate:.1} MiB/s under the cap); digest equal at B",
            size(c.bytes_sent),
            t.elapsed().as_secs_f64()
        ));

        demo.begin("Change 16 MiB, snapshot s2; kill -9 B's receiving agent mid-copy");
        for i in 0..16u64 {
            a.write(i * 13 * MIB + 2 * MIB, pattern(2000 + i, MIB as usize), &mut want).await?;
        }
        a.snapshot("s2", 2).await?;
        let s2_want = want.digest();
        let broken = a.sync("a-to-b", false, Some(0.4)).await?;
        ensure!(broken.is_err(), "the copy ended before the kill");
        b.kill9(0)?;
        println!("    b1 killed with SIGKILL");
        demo.ok("the copy broke with about 40% of the layer durable at B".into());

        demo.begin("Bring b1 back; the copy resumes at B's checkpoint");
        b.restart(0)?;
        b.open(pb::VolumeRole::Remote).await?;
        a.put_link("a-to-b", b.site_endpoint(), Some(CAP)).await?; // b1's new port
        let r = a.sync("a-to-b", false, None).await??;
        let c = &r.copies[0];
        ensure!(c.resumed_from_block > 0, "the copy started over");
        ensure!(b.digest("s2").await? == s2_want, "s2 at B differs");
        demo.ok(format!(
            "resumed at block {} ({}); sent {} of the 16 MiB layer; digest equal at B",
            c.resumed_from_block,
            super::at(c.resumed_from_block * cairn_api::BLOCK_SIZE),
            size(c.bytes_sent)
        ));

        demo.begin("A goes on: 4 MiB more and snapshot s3, never copied; then site A is lost");
        let mut at_a = Reference { size: want.size, blocks: want.blocks.clone() };
        for i in 0..4u64 {
            a.write(100 * MIB + i * MIB, pattern(3000 + i, MIB as usize), &mut at_a).await?;
        }
        a.snapshot("s3", 3).await?;
        for i in 0..3 {
            a.kill9(i)?;
        }
        demo.ok("a1, a2, a3 killed with SIGKILL; s3 exists only at A".into());

        demo.begin("Failover: promote B (from s2) and write there");
        let p = b
            .heads()
            .promote_head(pb::PromoteHeadRequest { volume_id: VOLUME.into() })
            .await?
            .into_inner();
        ensure!(p.base_snapshot_id == "s2", "promoted from {:?}", p.base_snapshot_id);
        b.verify(&want).await?;
        let delta: [(u64, u64); 3] = [(7 * MIB, MIB), (150 * MIB, 2 * MIB), (250 * MIB, MIB)];
        for (i, (off, len)) in delta.iter().enumerate() {
            b.write(*off, pattern(4000 + i as u64, *len as usize), &mut want).await?;
        }
        b.snapshot("t3", 3).await?;
        let delta_bytes: u64 = delta.iter().map(|d| d.1).sum();
        demo.ok(format!(
            "B is the primary from s2 (every byte checked); {} written, snapshot t3",
            size(delta_bytes)
        ));

        demo.begin("Failback: A returns, is demoted and resynced from B with only the delta");
        for i in 0..3 {
            a.restart(i)?;
        }
        a.open(pb::VolumeRole::Primary).await?;
        let demote = pb::DemoteHeadRequest {
            volume_id: VOLUME.into(),
            snapshot_id: "a-final".into(),
            generation: 4,
        };
        a.heads().demote_head(demote).await?;
        a.receive("b-to-a").await?;
        b.put_link("b-to-a", a.site_endpoint(), None).await?;
        let refused = b.sync("b-to-a", false, None).await?;
        let why = refused.err().context("a diverged target was not refused")?;
        println!("    without resync: {}", why.message());
        let r = b.sync("b-to-a", true, None).await??;
        ensure!(r.common_snapshot_id == "s2", "shared snapshot {:?}", r.common_snapshot_id);
        let sent: u64 = r.copies.iter().map(|c| c.bytes_sent).sum();
        ensure!(sent == delta_bytes, "sent {} for a {} delta", size(sent), size(delta_bytes));
        a.verify(&want).await?;
        ensure!(a.digest("t3").await? == b.digest("t3").await?, "t3 differs between the sites");
        demo.ok(format!(
            "rolled back to s2, {} kept as divergent; {} sent for {} changed; every byte checked",
            r.divergent_snapshot_ids.join(" and "),
            size(sent),
            size(delta_bytes)
        ));

        demo.begin("Planned switchover back to A: demote B, final copy, promote A");
        b.write(64 * MIB, pattern(5000, MIB as usize), &mut want).await?;
        let sw = pb::SwitchoverRequest {
            link_id: "b-to-a".into(),
            snapshot_id: "t4".into(),
            generation: 4,
        };
        b.heads().switchover(sw).await?;
        a.verify(&want).await?;
        let write = pb::HeadWriteRequest {
            volume_id: VOLUME.into(),
            offset: 0,
            data: vec![0u8; 4096].into(),
        };
        ensure!(b.heads().head_write(write).await.is_err(), "B still takes writes");
        demo.ok("A is the primary with every write B acknowledged; B refuses writes".into());
        for i in 0..3 {
            a.kill9(i)?;
        }
        for i in 0..2 {
            b.kill9(i)?;
        }
        Ok(())
    }
}
