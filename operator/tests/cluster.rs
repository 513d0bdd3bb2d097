//! The operator against a real Kubernetes API server. Runs only when
//! `CAIRN_TEST_KUBECONFIG` names a kubeconfig (a kind cluster will do):
//!
//! ```text
//! CAIRN_TEST_KUBECONFIG=~/.kube/config cargo test -p cairn-operator --test cluster -- --ignored --test-threads 1
//! ```
//!
//! The generated CRDs are applied; agents run here as processes on
//! loopback and announce themselves; the operator's controllers run in this
//! process (the API server only stores objects, so it needs no route to the
//! agents). Each test uses its own namespace and storage cluster names and
//! deletes them at the end.

use std::{path::PathBuf, sync::Arc, time::Duration};

use cairn_api::crd::{RemoteLink, SnapshotSchedule, StorageCluster, Volume};
use cairn_e2e::AgentProcess;
use cairn_operator::{
    agent::GrpcAgents,
    context::Context,
    metrics::Metrics,
    storage_cluster::{Announcement, announce},
};
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::GroupVersionKind,
    discovery::Discovery,
    runtime::events::Recorder,
};
use serde_json::json;

const NEEDS: &str = "needs a cluster: set CAIRN_TEST_KUBECONFIG to a kubeconfig and pass --ignored";
const MANAGER: &str = "cairn-test";

async fn client() -> Client {
    let path = std::env::var("CAIRN_TEST_KUBECONFIG").expect(NEEDS);
    let kc = Kubeconfig::read_from(PathBuf::from(path)).expect("a readable kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    Client::try_from(cfg).expect("a client")
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Applies the generated CRDs and waits until they are served.
async fn crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in cairn_api::crd::crds() {
        api.patch(&crd.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
            .await
            .unwrap();
    }
    for crd in cairn_api::crd::crds() {
        for _ in 0..60 {
            let got = api.get(&crd.name_any()).await.unwrap();
            let established = got
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(&ns)).await.unwrap();
}

/// Applies every object of a YAML file (several documents).
async fn apply_file(client: &Client, path: &PathBuf) -> Vec<Result<(), kube::Error>> {
    let text = std::fs::read_to_string(path).unwrap();
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value.clone()).unwrap();
        let types = obj.types.clone().unwrap();
        let gvk = GroupVersionKind::try_from(&types).unwrap();
        let (ar, caps) = discovery.resolve_gvk(&gvk).expect("a known kind");
        let api: Api<DynamicObject> = match (caps.scope, obj.namespace()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                namespace(client, &ns).await;
                Api::namespaced_with(client.clone(), &ns, &ar)
            }
            _ => Api::all_with(client.clone(), &ar),
        };
        out.push(
            api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&value))
                .await
                .map(drop),
        );
    }
    out
}

/// The message an invalid example's comment says kubectl prints.
fn expected_message(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.contains("prints:") {
            let m = lines.next().unwrap().trim_start_matches('#').trim();
            return m.split_once(" is invalid: ").map_or(m, |(_, rest)| rest).to_string();
        }
    }
    panic!("{} names no expected message", path.display())
}

#[tokio::test]
#[ignore = "needs a cluster: set CAIRN_TEST_KUBECONFIG to a kubeconfig and pass --ignored"]
async fn every_invalid_example_is_refused_with_its_message() {
    let c = client().await;
    crds(&c).await;
    for r in apply_file(&c, &repo("deploy/examples/two-sites.yaml")).await {
        r.expect("the valid example applies");
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/examples/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let want = expected_message(&f);
        let results = apply_file(&c, &f).await;
        let err = results
            .into_iter()
            .find_map(Result::err)
            .unwrap_or_else(|| panic!("{} was accepted", f.display()));
        let kube::Error::Api(status) = err else { panic!("{}: {err}", f.display()) };
        assert_eq!(status.code, 422, "{}: {status:?}", f.display());
        assert!(
            status.message.contains(&want),
            "{}:\n  got  {}\n  want {want}",
            f.display(),
            status.message
        );
    }
}

/// Agents on loopback, announced to the cluster, and the operator's
/// controllers in this process.
struct Site {
    _dirs: Vec<tempfile::TempDir>,
    agents: Vec<AgentProcess>,
}

async fn site(c: &Client, cluster: &str, n: usize) -> Site {
    namespace(c, "cairn-system").await;
    let api: Api<StorageCluster> = Api::all(c.clone());
    let sc = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StorageCluster", "metadata": {"name": cluster},
                    "spec": {"nodeSelector": {}, "defaults": {"replicas": n.min(2)}}});
    api.patch(cluster, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&sc)).await.unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let name = format!("{cluster}-a{}", i + 1);
        let a = AgentProcess::start_named(d.path(), &name).unwrap();
        let ann = Announcement {
            cluster: cluster.into(),
            agent: name,
            address: a.addr().to_string(),
            node: None,
            domain: None,
        };
        tokio::spawn(announce(c.clone(), "cairn-system".into(), ann));
        agents.push(a);
    }
    Site { _dirs: dirs, agents }
}

fn operator(c: &Client) {
    let ctx = Arc::new(Context {
        client: c.clone(),
        agents: Arc::new(GrpcAgents::new(None)),
        recorder: Recorder::new(c.clone(), "cairn-operator".into()),
        metrics: Arc::new(Metrics::default()),
    });
    tokio::spawn(cairn_operator::run(ctx));
}

async fn wait_for<T, F: Fn() -> Fut, Fut: Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    f: F,
) -> T {
    for _ in 0..secs * 2 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what}: not within {secs} s")
}

async fn apply<K>(api: &Api<K>, name: &str, v: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&v)).await.unwrap();
}

#[tokio::test]
#[ignore = "needs a cluster: set CAIRN_TEST_KUBECONFIG to a kubeconfig and pass --ignored"]
async fn volumes_become_ready_snapshots_are_scheduled_pruned_and_copied_and_a_failover_goes_by_spec()
 {
    let c = client().await;
    crds(&c).await;
    let ns = "cairn-it";
    namespace(&c, ns).await;
    let _a = site(&c, "it-site-a", 2).await;
    let _b = site(&c, "it-site-b", 1).await;
    operator(&c);

    // The clusters see their agents.
    let clusters: Api<StorageCluster> = Api::all(c.clone());
    wait_for("it-site-a Ready with 2/2 agents", 60, || async {
        let sc = clusters.get("it-site-a").await.ok()?;
        (sc.status?.agents_ready.as_deref() == Some("2/2")).then_some(())
    })
    .await;

    // A primary at A and its remote twin at B become Ready.
    let volumes: Api<Volume> = Api::namespaced(c.clone(), ns);
    let vol = |name: &str, cluster: &str, role: &str| {
        json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "Volume",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "it"}},
        "spec": {"cluster": cluster, "sizeBytes": 268435456, "role": role}})
    };
    apply(&volumes, "db", vol("db", "it-site-a", "Primary")).await;
    apply(&volumes, "db-copy", vol("db-copy", "it-site-b", "Remote")).await;
    for name in ["db", "db-copy"] {
        wait_for(&format!("Volume {name} Ready"), 90, || async {
            let v = volumes.get(name).await.ok()?;
            (v.status?.phase == cairn_api::crd::VolumePhase::Ready).then_some(())
        })
        .await;
    }

    // A link and a schedule every minute keeping 1 at the primary.
    let links: Api<RemoteLink> = Api::namespaced(c.clone(), ns);
    apply(
        &links,
        "db-to-b",
        json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLink",
        "metadata": {"name": "db-to-b", "namespace": ns},
        "spec": {"sourceVolume": "db", "targetCluster": "it-site-b", "targetVolume": "db-copy"}}),
    )
    .await;
    let schedules: Api<SnapshotSchedule> = Api::namespaced(c.clone(), ns);
    apply(
        &schedules,
        "every-minute",
        json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "SnapshotSchedule",
        "metadata": {"name": "every-minute", "namespace": ns},
        "spec": {"volumeSelector": {"matchLabels": {"app": "it"}}, "schedule": "* * * * *",
                 "retention": {"primary": {"count": 1}}}}),
    )
    .await;
    let first = wait_for("a scheduled snapshot", 150, || async {
        schedules.get("every-minute").await.ok()?.status?.last_snapshot
    })
    .await;
    // The link copies it and reports the recovery point.
    let copied = wait_for("the link's first copy", 120, || async {
        let st = links.get("db-to-b").await.ok()?.status?;
        Some((st.last_copied_snapshot?.id, st.lag_seconds?))
    })
    .await;
    assert!(copied.1 < 300, "lag {} s", copied.1);
    // A later run prunes the first at the primary once the link has moved on.
    wait_for("the first snapshot pruned at the primary", 240, || async {
        let v = volumes.get("db").await.ok()?;
        let id = v.status?.volume_id?;
        let mut agent = _a.agents[0].client().await.ok()?;
        let req = cairn_api::agent::v1::ListSnapshotsRequest { volume_id: id };
        let snaps = agent.list_snapshots(req).await.ok()?.into_inner().snapshots;
        (!snaps.iter().any(|s| s.snapshot_id == first) && !snaps.is_empty()).then_some(())
    })
    .await;

    // A planned switchover by spec: the operator holds both roles, the
    // agents demote, copy and promote, then the specs are flipped.
    let role_of = |name: &'static str| {
        let volumes = volumes.clone();
        async move {
            let v = volumes.get(name).await.ok()?;
            let held = v
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("cairn.dev/role-hold"));
            let st = v.status?;
            (!held && st.role == Some(v.spec.role)).then_some(v.spec.role)
        }
    };
    let merge = |v: serde_json::Value| Patch::Merge(v);
    links
        .patch(
            "db-to-b",
            &PatchParams::default(),
            &merge(json!({"spec": {"switchover": {"request": "sw-1"}}})),
        )
        .await
        .unwrap();
    use cairn_api::crd::VolumeRole::{Primary, Remote};
    wait_for("switchover: db Remote, db-copy Primary", 240, || async {
        (role_of("db").await? == Remote && role_of("db-copy").await? == Primary).then_some(())
    })
    .await;
    // Nothing lost: the final snapshot has the same digest at both sites.
    let last = |name: &'static str| {
        let volumes = volumes.clone();
        async move {
            let snaps = volumes.get(name).await.ok()?.status?.snapshots;
            snaps.into_iter().find(|s| s.id == "switchover-sw-1").map(|s| s.digest)
        }
    };
    let (da, db) = wait_for("the final snapshot listed at both sites", 60, || async {
        Some((last("db").await?, last("db-copy").await?))
    })
    .await;
    assert_eq!(da, db, "the switchover's final snapshot differs between the sites");
    // And back, over a link the other way.
    apply(
        &links,
        "back-to-a",
        json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLink",
        "metadata": {"name": "back-to-a", "namespace": ns},
        "spec": {"sourceVolume": "db-copy", "targetCluster": "it-site-a", "targetVolume": "db",
                 "switchover": {"request": "sw-2"}}}),
    )
    .await;
    wait_for("switchover back: db Primary, db-copy Remote", 240, || async {
        (role_of("db").await? == Primary && role_of("db-copy").await? == Remote).then_some(())
    })
    .await;

    // Failover by spec: the remote twin becomes the primary.
    apply(&volumes, "db-copy", vol("db-copy", "it-site-b", "Primary")).await;
    wait_for("db-copy promoted", 60, || async {
        let st = volumes.get("db-copy").await.ok()?.status?;
        (st.role == Some(cairn_api::crd::VolumeRole::Primary)).then_some(())
    })
    .await;

    // Failback by spec: the old primary is demoted and resynced from the
    // new one; only what changed crosses, and the link reports it synced.
    apply(&volumes, "db", vol("db", "it-site-a", "Remote")).await;
    wait_for("db demoted", 60, || async { (role_of("db").await? == Remote).then_some(()) }).await;
    links
        .patch(
            "back-to-a",
            &PatchParams::default(),
            &merge(json!({"spec": {"resyncRequest": "fb-1"}})),
        )
        .await
        .unwrap();
    wait_for("the failback resync done", 240, || async {
        let st = links.get("back-to-a").await.ok()?.status?;
        let synced = st
            .conditions
            .iter()
            .any(|c| c.type_ == "Synced" && c.status == cairn_api::crd::ConditionStatus::True);
        (st.last_resync_request.as_deref() == Some("fb-1") && synced).then_some(())
    })
    .await;

    // Clean up: the links first (a volume one uses cannot be deleted).
    let dp = kube::api::DeleteParams::default();
    links.delete("back-to-a", &dp).await.unwrap();
    links.delete("db-to-b", &dp).await.unwrap();
    schedules.delete("every-minute", &dp).await.unwrap();
    for name in ["db", "db-copy"] {
        volumes.delete(name, &dp).await.unwrap();
    }
    wait_for("volumes deleted through their finalizers", 60, || async {
        volumes.get_opt("db").await.ok()?.is_none().then_some(())
    })
    .await;
    clusters.delete("it-site-a", &dp).await.ok();
    clusters.delete("it-site-b", &dp).await.ok();
}
