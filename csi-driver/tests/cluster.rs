//! The CSI driver in a real Kubernetes cluster with Cairn installed by its
//! Helm chart (`charts/cairn`: the operator, agents, the CSI controller and
//! node plugins, the `cairn` StorageClass and VolumeSnapshotClass, the
//! latter with `deletionPolicy: Delete`) and the snapshot CRDs and
//! snapshot-controller present. Runs only when
//! `CAIRN_TEST_KUBECONFIG` names its kubeconfig:
//!
//! ```text
//! CAIRN_TEST_KUBECONFIG=~/.kube/config cargo test -p cairn-csi --test cluster -- --ignored --test-threads 1
//! ```
//!
//! `CAIRN_TEST_STORAGE_CLASS` and `CAIRN_TEST_SNAPSHOT_CLASS` (both
//! `cairn` by default) name other classes; `CAIRN_TEST_CAIRN_NAMESPACE`
//! (`cairn-system`) is where the controller creates Volumes. Each test
//! runs in its own namespace and deletes it at the end; pods use the
//! `busybox` image.

use std::{future::Future, path::PathBuf, time::Duration};

use cairn_api::crd::Volume;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, LogParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::GroupVersionKind,
};
use serde_json::json;

const NEEDS: &str = "needs a cluster: set CAIRN_TEST_KUBECONFIG to a kubeconfig of a cluster with Cairn's Helm chart installed and pass --ignored";
const MANAGER: &str = "cairn-test";
/// How long a pod, a PVC or a snapshot may take.
const SLOW: Duration = Duration::from_secs(300);
const IMAGE: &str = "busybox:1.36";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

async fn client() -> Client {
    let path = std::env::var("CAIRN_TEST_KUBECONFIG").expect(NEEDS);
    let kc = Kubeconfig::read_from(PathBuf::from(path)).expect("a readable kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    Client::try_from(cfg).expect("a client")
}

/// Polls `check` every 2 s until it gives a value, up to `timeout`.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not done after {timeout:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A namespace of the test's own (deleted by [`delete_namespace`]).
async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{}", std::process::id());
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&ns)).await.unwrap();
    name
}

async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
}

async fn pvc(client: &Client, ns: &str, name: &str) -> PersistentVolumeClaim {
    pvc_from(client, ns, name, None).await
}

/// A 1 GiB claim, filled from `data_source` (a VolumeSnapshot or a PVC)
/// when given.
async fn pvc_from(
    client: &Client,
    ns: &str,
    name: &str,
    data_source: Option<serde_json::Value>,
) -> PersistentVolumeClaim {
    let class = env_or("CAIRN_TEST_STORAGE_CLASS", "cairn");
    let mut claim = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": "1Gi"}}
        }
    });
    if let Some(source) = data_source {
        claim["spec"]["dataSource"] = source;
    }
    let claim: PersistentVolumeClaim = serde_json::from_value(claim).unwrap();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &claim).await.unwrap()
}

/// Runs `script` in a pod with the claim at /data; its log once it
/// succeeded. The pod is deleted afterwards (and waited for, so the volume
/// is unpublished from its node).
async fn run_pod(client: &Client, ns: &str, name: &str, claim: &str, script: &str) -> String {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": IMAGE,
                "command": ["sh", "-ec", script],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
        }
    }))
    .unwrap();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &pod).await.unwrap();
    let phase = until(&format!("pod {name} finishes"), SLOW, || async {
        let p = api.get(name).await.ok()?;
        let phase = p.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let log = api.logs(name, &LogParams::default()).await.unwrap();
    assert_eq!(phase, "Succeeded", "pod {name} failed; its log:\n{log}");
    api.delete(name, &DeleteParams::default()).await.unwrap();
    until(&format!("pod {name} is gone"), SLOW, || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await;
    log
}

fn volume_snapshots() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"))
}

/// The PV bound to a claim, once it is bound.
async fn bound_pv(client: &Client, ns: &str, claim: &str) -> PersistentVolume {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pv_name = until(&format!("PVC {claim} is bound"), SLOW, || async {
        claims.get(claim).await.ok()?.spec?.volume_name.filter(|n| !n.is_empty())
    })
    .await;
    Api::<PersistentVolume>::all(client.clone()).get(&pv_name).await.unwrap()
}

/// Deletes a claim and waits until its PV and the Volume behind it are gone.
async fn delete_claim(client: &Client, ns: &str, claim: &str, pv: &PersistentVolume) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    claims.delete(claim, &DeleteParams::default()).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_name = pv.name_any();
    until(&format!("PV {pv_name} is deleted"), SLOW, || async {
        matches!(pvs.get_opt(&pv_name).await, Ok(None)).then_some(())
    })
    .await;
    let handle = pv.spec.as_ref().and_then(|s| s.csi.as_ref()).unwrap().volume_handle.clone();
    let volumes: Api<Volume> =
        Api::namespaced(client.clone(), &env_or("CAIRN_TEST_CAIRN_NAMESPACE", "cairn-system"));
    until(&format!("Volume {handle} is deleted"), SLOW, || async {
        matches!(volumes.get_opt(&handle).await, Ok(None)).then_some(())
    })
    .await;
}

/// Writes 4 MiB of random data and its sha256; the digest it printed.
const WRITE: &str = "head -c 4194304 /dev/urandom > /data/blob; sha256sum /data/blob | cut -d' ' -f1 > /data/blob.sha256; sync; cat /data/blob.sha256";
/// The digest of what is there now, then the one written with it.
const READ: &str = "sha256sum /data/blob | cut -d' ' -f1; cat /data/blob.sha256";

#[tokio::test]
#[ignore = "needs a cluster: set CAIRN_TEST_KUBECONFIG (see the file's header) and pass --ignored"]
async fn what_one_pod_wrote_to_a_pvc_the_next_pod_reads_back() {
    let client = client().await;
    let ns = namespace(&client, "cairn-csi-data").await;
    pvc(&client, &ns, "data").await;
    let written = run_pod(&client, &ns, "writer", "data", WRITE).await;
    let written = written.trim().to_string();
    assert_eq!(written.len(), 64, "a sha256: {written:?}");

    // The PV is a Cairn volume: a Volume object named by its handle.
    let pv = bound_pv(&client, &ns, "data").await;
    let csi = pv.spec.as_ref().and_then(|s| s.csi.clone()).expect("a CSI PV");
    assert_eq!(csi.driver, cairn_csi::DRIVER_NAME);
    let volumes: Api<Volume> =
        Api::namespaced(client.clone(), &env_or("CAIRN_TEST_CAIRN_NAMESPACE", "cairn-system"));
    let vol = volumes.get(&csi.volume_handle).await.expect("the Volume behind the PV");
    assert!(vol.spec.size_bytes >= 1 << 30, "{:?}", vol.spec);

    // The writer is gone (unpublished); a second pod reads the same bytes.
    let read = run_pod(&client, &ns, "reader", "data", READ).await;
    let lines: Vec<&str> = read.lines().map(str::trim).collect();
    assert_eq!(lines, [written.as_str(), written.as_str()], "the data and its digest survive");

    delete_claim(&client, &ns, "data", &pv).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs a cluster: set CAIRN_TEST_KUBECONFIG (see the file's header) and pass --ignored"]
async fn a_volume_snapshot_is_ready_restores_and_clones_into_new_pvcs_and_goes_with_its_deletion() {
    let client = client().await;
    let ns = namespace(&client, "cairn-csi-snap").await;
    pvc(&client, &ns, "data").await;
    let written = run_pod(&client, &ns, "writer", "data", WRITE).await;
    let written = written.trim().to_string();
    let pv = bound_pv(&client, &ns, "data").await;
    let handle = pv.spec.as_ref().and_then(|s| s.csi.as_ref()).unwrap().volume_handle.clone();

    let ar = volume_snapshots();
    let snaps: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let snap = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "data-1", "namespace": ns},
        "spec": {
            "volumeSnapshotClassName": env_or("CAIRN_TEST_SNAPSHOT_CLASS", "cairn"),
            "source": {"persistentVolumeClaimName": "data"}
        }
    });
    snaps.patch("data-1", &PatchParams::apply(MANAGER), &Patch::Apply(&snap)).await.unwrap();
    let content = until("VolumeSnapshot data-1 is readyToUse", SLOW, || async {
        let s = snaps.get("data-1").await.ok()?;
        let status = s.data.get("status")?;
        (status.get("readyToUse")? == &json!(true))
            .then(|| status.get("boundVolumeSnapshotContentName")?.as_str().map(String::from))
            .flatten()
    })
    .await;
    assert!(!content.is_empty());

    // The controller recorded it on the Volume as a CSI snapshot, so the
    // volume cannot be deleted from under it.
    let volumes: Api<Volume> =
        Api::namespaced(client.clone(), &env_or("CAIRN_TEST_CAIRN_NAMESPACE", "cairn-system"));
    let vol = volumes.get(&handle).await.unwrap();
    let recorded = vol.annotations().get(cairn_csi::controller::annotation::SNAPSHOTS).cloned();
    assert!(recorded.is_some_and(|r| !r.is_empty()), "{:?}", vol.annotations());

    // A PVC restored from the snapshot, and a clone of the PVC, each read
    // back by a pod: the bytes written before the snapshot and their digest.
    let sources = [
        (
            "restored",
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "data-1"}),
        ),
        ("cloned", json!({"kind": "PersistentVolumeClaim", "name": "data"})),
    ];
    for (claim, source) in sources {
        pvc_from(&client, &ns, claim, Some(source)).await;
        let read = run_pod(&client, &ns, &format!("read-{claim}"), claim, READ).await;
        let lines: Vec<&str> = read.lines().map(str::trim).collect();
        assert_eq!(lines, [written.as_str(), written.as_str()], "{claim}: the source's data");
        let copy_pv = bound_pv(&client, &ns, claim).await;
        let copy =
            copy_pv.spec.as_ref().and_then(|s| s.csi.as_ref()).unwrap().volume_handle.clone();
        let v = volumes.get(&copy).await.unwrap();
        assert_eq!(v.spec.role, cairn_api::crd::VolumeRole::Primary, "{claim}: promoted");
        assert!(v.spec.source.is_some(), "{claim}: its source recorded: {:?}", v.spec);
        assert!(!v.restoring(), "{claim}: Restored=True: {:?}", v.status);
        delete_claim(&client, &ns, claim, &copy_pv).await;
    }

    snaps.delete("data-1", &DeleteParams::default()).await.unwrap();
    until("VolumeSnapshot data-1 is gone", SLOW, || async {
        matches!(snaps.get_opt("data-1").await, Ok(None)).then_some(())
    })
    .await;
    until("the Volume no longer records a CSI snapshot", SLOW, || async {
        let v = volumes.get(&handle).await.ok()?;
        v.annotations().get(cairn_csi::controller::annotation::SNAPSHOTS).is_none().then_some(())
    })
    .await;
    delete_claim(&client, &ns, "data", &pv).await;
    delete_namespace(&client, &ns).await;
}
