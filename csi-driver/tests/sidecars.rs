//! The Kubernetes CSI sidecars' start-up, replayed against the real
//! driver: for every sidecar container the rendered chart
//! (`deploy/cairn.yaml`, the chart with its default values) puts beside
//! `cairn-csi`, the CSI calls that sidecar makes at start, in its order, on
//! the socket it is given, and the checks after which it exits. A sidecar
//! that would exit (a call it needs answered UNIMPLEMENTED, or the driver
//! lacking a capability it cannot run without) leaves its pod never Ready,
//! so each must start.
//!
//! The sequences are those of the sidecar releases the chart names
//! (`csi.sidecars` in charts/cairn/values.yaml), read from their `main`:
//! a new sidecar, or a new release that calls something else at start,
//! needs its sequence here; an image the test does not know fails it.

mod support;

use std::{collections::BTreeMap, ffi::OsStr, path::Path, time::Duration};

use cairn_api::csi::v1::{
    self as csi, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient,
};
use cairn_e2e::AgentProcess;
use support::CsiProcess;
use tonic::{Code, Status, transport::Channel};

use csi::{
    controller_service_capability::rpc::Type as Ctl, node_service_capability::rpc::Type as Nd,
    plugin_capability::service::Type as Svc,
};

/// How long a sidecar's ProbeForever is given before the test calls the
/// driver never ready.
const PROBE_PATIENCE: Duration = Duration::from_secs(20);

/// ControllerServiceCapability.RPC.Type MODIFY_VOLUME (CSI 1.12), which
/// api/proto/csi/v1/csi.proto does not name yet.
const MODIFY_VOLUME: i32 = 14;

/// The sidecars the chart may ship, by image name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Sidecar {
    Provisioner,
    Attacher,
    Snapshotter,
    Resizer,
    LivenessProbe,
    NodeDriverRegistrar,
}

impl Sidecar {
    const ALL: [Sidecar; 6] = [
        Sidecar::Provisioner,
        Sidecar::Attacher,
        Sidecar::Snapshotter,
        Sidecar::Resizer,
        Sidecar::LivenessProbe,
        Sidecar::NodeDriverRegistrar,
    ];

    /// `registry.k8s.io/sig-storage/csi-provisioner:v6.4.0` -> Provisioner.
    fn from_image(image: &str) -> Option<Sidecar> {
        let name = image.rsplit('/').next()?.split([':', '@']).next()?;
        Some(match name {
            "csi-provisioner" => Sidecar::Provisioner,
            "csi-attacher" => Sidecar::Attacher,
            "csi-snapshotter" => Sidecar::Snapshotter,
            "csi-resizer" => Sidecar::Resizer,
            "livenessprobe" => Sidecar::LivenessProbe,
            "csi-node-driver-registrar" => Sidecar::NodeDriverRegistrar,
            _ => return None,
        })
    }
}

/// What a sidecar's start-up came to.
#[derive(Debug)]
enum Start {
    /// It runs; the calls it made, for the failure messages.
    Runs(Vec<String>),
    /// It exits, and why (a call that failed, or a capability it needs).
    Exits { calls: Vec<String>, why: String },
}

/// A sidecar's view of one socket, recording each call.
struct Socket {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    calls: Vec<String>,
}

/// Ends a start-up with "exits" from inside a sequence.
macro_rules! exits {
    ($socket:expr, $($why:tt)*) => {
        return Start::Exits { calls: std::mem::take(&mut $socket.calls), why: format!($($why)*) }
    };
}

/// The result of a call the sidecar cannot start without.
macro_rules! needed {
    ($socket:expr, $call:expr) => {
        match $call {
            Ok(v) => v,
            Err(s) => exits!(
                $socket,
                "{} failed: {:?} {}",
                $socket.calls.last().unwrap(),
                s.code(),
                s.message()
            ),
        }
    };
}

impl Socket {
    async fn new(channel: Channel) -> Socket {
        Socket {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
            calls: Vec::new(),
        }
    }

    async fn plugin_info(&mut self) -> Result<csi::GetPluginInfoResponse, Status> {
        self.calls.push("GetPluginInfo".into());
        let info = self.identity.get_plugin_info(csi::GetPluginInfoRequest {}).await?.into_inner();
        if info.name.is_empty() {
            return Err(Status::internal("GetPluginInfo returned an empty driver name"));
        }
        Ok(info)
    }

    /// csi-lib-utils' ProbeForever: Probe until ready (an unset `ready`
    /// counts as ready); an error other than "not there yet" ends it.
    async fn probe_forever(&mut self) -> Result<(), Status> {
        self.calls.push("Probe (until ready)".into());
        let deadline = tokio::time::Instant::now() + PROBE_PATIENCE;
        loop {
            let ready = self.identity.probe(csi::ProbeRequest {}).await?.into_inner().ready;
            if ready.unwrap_or(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "Probe said not ready for {PROBE_PATIENCE:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn plugin_services(&mut self) -> Result<Vec<Svc>, Status> {
        self.calls.push("GetPluginCapabilities".into());
        let caps = self.identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {});
        Ok(caps
            .await?
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(csi::plugin_capability::Type::Service(s)) => Svc::try_from(s.r#type).ok(),
                _ => None,
            })
            .collect())
    }

    /// As numbers: the driver may offer types our protobuf does not name.
    async fn controller_rpcs(&mut self) -> Result<Vec<i32>, Status> {
        self.calls.push("ControllerGetCapabilities".into());
        let caps =
            self.controller.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {});
        Ok(caps
            .await?
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| {
                c.r#type.map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
            })
            .collect())
    }

    async fn node_rpcs(&mut self) -> Result<Vec<Nd>, Status> {
        self.calls.push("NodeGetCapabilities".into());
        let caps = self.node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {});
        Ok(caps
            .await?
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(csi::node_service_capability::Type::Rpc(r)) => Nd::try_from(r.r#type).ok(),
                None => None,
            })
            .collect())
    }

    async fn node_info(&mut self) -> Result<csi::NodeGetInfoResponse, Status> {
        self.calls.push("NodeGetInfo".into());
        Ok(self.node.node_get_info(csi::NodeGetInfoRequest {}).await?.into_inner())
    }

    /// What `sidecar` does at start against this socket.
    async fn start(&mut self, sidecar: Sidecar) -> Start {
        match sidecar {
            // external-provisioner: ProbeForever, the driver's name, then
            // plugin and controller capabilities (each fatal on error).
            Sidecar::Provisioner => {
                needed!(self, self.probe_forever().await);
                needed!(self, self.plugin_info().await);
                needed!(self, self.plugin_services().await);
                needed!(self, self.controller_rpcs().await);
            }
            // external-attacher: ProbeForever, the name, CONTROLLER_SERVICE
            // (without it a trivial handler), then controller capabilities.
            Sidecar::Attacher => {
                needed!(self, self.probe_forever().await);
                needed!(self, self.plugin_info().await);
                let services = needed!(self, self.plugin_services().await);
                if services.contains(&Svc::ControllerService) {
                    needed!(self, self.controller_rpcs().await);
                }
            }
            // external-snapshotter: the name, ProbeForever, and it exits
            // unless the controller offers CREATE_DELETE_SNAPSHOT. (With the
            // VolumeGroupSnapshot CRDs installed it also asks
            // GroupControllerGetCapabilities, and only logs a failure.)
            Sidecar::Snapshotter => {
                needed!(self, self.plugin_info().await);
                needed!(self, self.probe_forever().await);
                let rpcs = needed!(self, self.controller_rpcs().await);
                if !rpcs.contains(&(Ctl::CreateDeleteSnapshot as i32)) {
                    exits!(self, "the controller does not offer CREATE_DELETE_SNAPSHOT");
                }
            }
            // external-resizer 2.x: the name; CONTROLLER_SERVICE or exit;
            // EXPAND_VOLUME at the controller, else NodeGetCapabilities on
            // the same socket (a failure exits); MODIFY_VOLUME; it exits
            // when it can neither resize nor modify.
            Sidecar::Resizer => {
                needed!(self, self.plugin_info().await);
                let services = needed!(self, self.plugin_services().await);
                if !services.contains(&Svc::ControllerService) {
                    exits!(self, "the driver does not offer the controller service");
                }
                let rpcs = needed!(self, self.controller_rpcs().await);
                let resize = if rpcs.contains(&(Ctl::ExpandVolume as i32)) {
                    needed!(self, self.controller_rpcs().await);
                    true
                } else {
                    needed!(self, self.node_rpcs().await).contains(&Nd::ExpandVolume)
                };
                let rpcs = needed!(self, self.controller_rpcs().await);
                if !resize && !rpcs.contains(&MODIFY_VOLUME) {
                    exits!(self, "the driver offers neither EXPAND_VOLUME nor MODIFY_VOLUME");
                }
            }
            // livenessprobe: the name at start (fatal), then a Probe per
            // health check; not ready is a failed check, and kubelet
            // restarts the pod's containers.
            Sidecar::LivenessProbe => {
                needed!(self, self.plugin_info().await);
                self.calls.push("Probe (health check)".into());
                let ready = needed!(self, self.identity.probe(csi::ProbeRequest {}).await);
                if !ready.into_inner().ready.unwrap_or(true) {
                    exits!(self, "Probe answers not ready: the liveness check fails");
                }
            }
            // node-driver-registrar: the name (fatal), then it registers the
            // socket with kubelet, which asks NodeGetInfo to fill the CSINode.
            Sidecar::NodeDriverRegistrar => {
                needed!(self, self.plugin_info().await);
                needed!(self, self.node_info().await);
            }
        }
        Start::Runs(std::mem::take(&mut self.calls))
    }
}

/// The sidecar containers of the chart's workload named `name` (kind
/// `kind`), in deploy/cairn.yaml, as (container, image).
fn chart_sidecars(kind: &str, name: &str) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cairn.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if object["kind"].as_str() != Some(kind)
            || object["metadata"]["name"].as_str() != Some(name)
        {
            continue;
        }
        let containers = object["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
        return containers
            .iter()
            .map(|c| {
                (c["name"].as_str().unwrap().to_string(), c["image"].as_str().unwrap().to_string())
            })
            .filter(|(_, image)| !image.contains("/cairn-csi:"))
            .collect();
    }
    panic!("{kind} {name} is not in {}", path.display());
}

/// Starts every sidecar the chart ships in `kind`/`name` against `socket`,
/// and every other known one too: a sidecar that meets UNIMPLEMENTED at
/// start fails the test whether or not it is shipped; one that exits for a
/// missing capability fails it only when the chart ships it.
async fn check_sidecars(kind: &str, name: &str, socket: Channel, role: &[Sidecar]) {
    let shipped = chart_sidecars(kind, name);
    assert!(!shipped.is_empty(), "{kind} {name} has no sidecars");
    let mut shipped_kinds = BTreeMap::new();
    for (container, image) in &shipped {
        let sidecar = Sidecar::from_image(image).unwrap_or_else(|| {
            panic!("{kind} {name} ships {container} ({image}), whose start-up this test does not know: add it")
        });
        shipped_kinds.insert(sidecar, container.clone());
    }
    let mut failures = Vec::new();
    for sidecar in
        Sidecar::ALL.into_iter().filter(|s| role.contains(s) || shipped_kinds.contains_key(s))
    {
        let mut s = Socket::new(socket.clone()).await;
        match s.start(sidecar).await {
            Start::Runs(calls) => eprintln!("{name}: {sidecar:?} starts: {}", calls.join(", ")),
            Start::Exits { calls, why } => {
                let unimplemented = why.contains(&format!("{:?}", Code::Unimplemented));
                match shipped_kinds.get(&sidecar) {
                    Some(container) => failures.push(format!(
                        "{container} ({sidecar:?}) would exit at start: {why} (calls: {})",
                        calls.join(", ")
                    )),
                    None if unimplemented => failures.push(format!(
                        "{sidecar:?} (not shipped) meets UNIMPLEMENTED at start: {why} (calls: {})",
                        calls.join(", ")
                    )),
                    None => eprintln!("{name}: {sidecar:?} is not shipped, and would exit: {why}"),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{kind} {name}:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sidecar_of_the_controller_pod_starts_against_the_controller_socket() {
    let base = tempfile::tempdir().unwrap();
    let controller =
        CsiProcess::start(&base.path().join("ctrl/csi.sock"), &[OsStr::new("controller")]);
    let socket = controller.channel().await;
    let role = [Sidecar::Provisioner, Sidecar::Attacher, Sidecar::Snapshotter, Sidecar::Resizer];
    check_sidecars("Deployment", "cairn-csi-controller", socket.clone(), &role).await;

    // What csi-resizer asks the controller's socket about the nodes is what
    // the node plugins answer; the node RPCs themselves are not served here.
    let mut node = NodeClient::new(socket);
    let caps = node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap();
    assert_eq!(caps.into_inner(), cairn_csi::node::capabilities());
    let info = node.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap_err();
    assert_eq!(info.code(), Code::Unimplemented);
    assert!(info.message().contains("cairn-csi node"), "{}", info.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sidecar_of_the_node_pod_starts_against_the_node_socket() {
    let base = tempfile::tempdir().unwrap();
    let agent_dir = base.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = AgentProcess::start_named(&agent_dir, "a1").unwrap();
    let node = CsiProcess::node(base.path(), "node-a", &agent.endpoint());
    let socket = node.channel().await;
    let role = [Sidecar::NodeDriverRegistrar, Sidecar::LivenessProbe];
    check_sidecars("DaemonSet", "cairn-csi-node-local", socket, &role).await;
}
