//! The schema's rules and defaults on objects built here, beyond the
//! examples: what is allowed next to what is refused (growing a volume,
//! promoting a Remote one, a cluster with neither kind of agents), the
//! defaults the API server fills in, and that every admitted example reads
//! back into the Rust types unchanged (the types and the schema agree).

mod apiserver;

use std::collections::BTreeMap;

use apiserver::{Crd, load_crds, repo_root, yaml_documents};
use cairn_api::crd::{
    Compression, RemoteLink, SnapshotSchedule, SourceSelection, StorageCluster, Volume, VolumeRole,
};
use serde_json::{Value, json};

fn crds() -> BTreeMap<String, Crd> {
    load_crds()
}

fn example(kind: &str, name: &str) -> Value {
    yaml_documents(&repo_root().join("deploy/examples/two-sites.yaml"))
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("two-sites.yaml has no {kind} {name}"))
}

/// `object` with the field at `pointer` set (added if missing).
fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    let (parent, field) = pointer.rsplit_once('/').unwrap();
    match object.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}")) {
        Value::Array(items) => items[field.parse::<usize>().unwrap()] = value,
        Value::Object(map) => {
            map.insert(field.to_owned(), value);
        }
        other => panic!("{parent} is {other}"),
    }
    object
}

fn without(mut object: Value, pointer: &str) -> Value {
    let (parent, field) = pointer.rsplit_once('/').unwrap();
    object.pointer_mut(parent).unwrap().as_object_mut().unwrap().remove(field);
    object
}

fn refusal(crd: &Crd, object: &Value, old: Option<&Value>) -> String {
    match crd.admit(object, old) {
        Ok(_) => panic!("admitted: {object:#}"),
        Err(errors) => errors.join("\n"),
    }
}

#[test]
fn a_volume_grows_or_keeps_its_size_but_never_shrinks() {
    let crds = crds();
    let volume = &crds["Volume"];
    let old = example("Volume", "db-data");
    let size = old["spec"]["sizeBytes"].as_i64().unwrap();
    for new_size in [size, size * 2] {
        let grown = with(old.clone(), "/spec/sizeBytes", json!(new_size));
        assert!(volume.admit(&grown, Some(&old)).is_ok(), "{new_size}");
    }
    let shrunk = with(old.clone(), "/spec/sizeBytes", json!(size - 4096));
    assert!(refusal(volume, &shrunk, Some(&old)).contains("sizeBytes can only grow"));
    // A create has no old size: any valid size goes.
    assert!(volume.admit(&shrunk, None).is_ok());
}

#[test]
fn a_remote_volume_is_admitted_unless_made_attachable_and_promotes_by_its_role() {
    let crds = crds();
    let volume = &crds["Volume"];
    let primary = example("Volume", "db-data");
    let remote = with(primary.clone(), "/spec/role", json!("Remote"));
    assert!(volume.admit(&remote, None).is_ok());
    let remote_closed = with(remote.clone(), "/spec/attachable", json!(false));
    assert!(volume.admit(&remote_closed, None).is_ok());
    let remote_open = with(remote.clone(), "/spec/attachable", json!(true));
    assert!(refusal(volume, &remote_open, None).contains("a Remote volume is never attachable"));
    // Failover: the Remote volume becomes Primary; attachable may then be set.
    let promoted = with(remote.clone(), "/spec/attachable", json!(true));
    let promoted = with(promoted, "/spec/role", json!("Primary"));
    assert!(volume.admit(&promoted, Some(&remote)).is_ok());
}

#[test]
fn only_an_attachable_primary_is_attached_to_a_node() {
    let crds = crds();
    let volume = &crds["Volume"];
    let primary = example("Volume", "db-data");
    let attached = with(primary.clone(), "/spec/attachedNode", json!("worker-1"));
    assert!(volume.admit(&attached, Some(&primary)).is_ok());
    let demoted = with(attached.clone(), "/spec/role", json!("Remote"));
    assert!(refusal(volume, &demoted, Some(&attached)).contains("unpublish it"));
    let closed = with(attached, "/spec/attachable", json!(false));
    assert!(refusal(volume, &closed, None).contains("attachedNode is set only on an attachable"));
}

#[test]
fn a_restored_volume_keeps_its_source_through_other_updates_and_a_clone_names_a_volume() {
    let crds = crds();
    let volume = &crds["Volume"];
    let restored = example("Volume", "db-data-test");
    let size = restored["spec"]["sizeBytes"].as_i64().unwrap();
    let grown = with(restored.clone(), "/spec/sizeBytes", json!(size * 2));
    assert!(volume.admit(&grown, Some(&restored)).is_ok(), "the same source may stay");
    let demoted = with(restored.clone(), "/spec/role", json!("Remote"));
    assert!(volume.admit(&demoted, Some(&restored)).is_ok());
    let dropped = without(restored.clone(), "/spec/source");
    assert!(refusal(volume, &dropped, Some(&restored)).contains("source is set only when"));
    let clone = with(restored.clone(), "/spec/source", json!({"volume": {"name": "db-data"}}));
    assert!(volume.admit(&clone, None).is_ok());
    let neither = with(restored, "/spec/source", json!({}));
    assert!(refusal(volume, &neither, None).contains("exactly one of snapshot"));
}

#[test]
fn a_storage_cluster_needs_exactly_one_kind_of_agents() {
    let crds = crds();
    let cluster = &crds["StorageCluster"];
    let local = example("StorageCluster", "site-a");
    let neither = without(local.clone(), "/spec/nodeSelector");
    assert!(refusal(cluster, &neither, None).contains("set exactly one of nodeSelector"));
    let all_nodes = with(local, "/spec/nodeSelector", json!({}));
    assert!(cluster.admit(&all_nodes, None).is_ok(), "{{}} selects every node");
}

#[test]
fn windows_may_end_at_midnight_but_not_start_there_or_end_before_starting() {
    let crds = crds();
    let link = &crds["RemoteLink"];
    let base = example("RemoteLink", "db-data-to-site-b");
    let window = |start: &str, end: &str| {
        let o = with(base.clone(), "/spec/bandwidth/windows/0/start", json!(start));
        with(o, "/spec/bandwidth/windows/0/end", json!(end))
    };
    assert!(link.admit(&window("18:00", "24:00"), None).is_ok());
    assert!(link.admit(&window("00:00", "00:01"), None).is_ok());
    for (start, end) in [("08:00", "08:00"), ("18:00", "08:00")] {
        assert!(refusal(link, &window(start, end), None).contains("end must be after start"));
    }
    assert!(refusal(link, &window("24:00", "24:00"), None).contains("should match"));
    let repeated_day = with(base, "/spec/bandwidth/windows/0/days", json!(["mon", "mon"]));
    assert_eq!(
        refusal(link, &repeated_day, None),
        "spec.bandwidth.windows[0].days[1]: Duplicate value: \"mon\""
    );
}

#[test]
fn unknown_fields_are_refused_as_by_strict_decoding() {
    let crds = crds();
    let object = with(example("Volume", "db-data"), "/spec/size", json!("20Gi"));
    assert_eq!(
        refusal(&crds["Volume"], &object, None),
        "strict decoding error: unknown field \"spec.size\""
    );
}

#[test]
fn the_api_server_fills_in_the_defaults() {
    let crds = crds();
    let minimal = |kind: &str, spec: Value| {
        json!({
            "apiVersion": "cairn.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": spec,
        })
    };
    let stored = crds["StorageCluster"]
        .admit(&minimal("StorageCluster", json!({"nodeSelector": {}})), None)
        .unwrap();
    let cluster: StorageCluster = serde_json::from_value(stored).unwrap();
    assert_eq!(cluster.spec.defaults.replicas, 2);
    assert_eq!(cluster.spec.defaults.chunk_size_bytes, 64 << 20);

    let stored = crds["Volume"]
        .admit(&minimal("Volume", json!({"cluster": "site-a", "sizeBytes": 4096})), None)
        .unwrap();
    let volume: Volume = serde_json::from_value(stored).unwrap();
    assert_eq!(volume.spec.role, VolumeRole::Primary);
    assert!(volume.spec.is_attachable());
    assert_eq!(volume.spec.replicas, None, "unset: the cluster's default");

    let spec = json!({"sourceVolume": "a", "targetCluster": "b", "targetVolume": "a"});
    let stored = crds["RemoteLink"].admit(&minimal("RemoteLink", spec), None).unwrap();
    let link: RemoteLink = serde_json::from_value(stored).unwrap();
    assert_eq!(link.spec.source_selection, SourceSelection::Auto);
    assert_eq!(link.spec.compression, Compression::Auto);
    assert!(!link.spec.paused);
    assert_eq!(link.spec.bandwidth, None, "unset: no limit");

    let spec = json!({
        "volumeSelector": {},
        "schedule": "0 * * * *",
        "retention": {"primary": {"count": 1}},
    });
    let stored = crds["SnapshotSchedule"].admit(&minimal("SnapshotSchedule", spec), None).unwrap();
    let schedule: SnapshotSchedule = serde_json::from_value(stored).unwrap();
    assert_eq!(schedule.spec.time_zone, "UTC");
    assert!(schedule.spec.copy);
    assert!(!schedule.spec.suspend);
}

#[test]
fn every_admitted_example_reads_back_into_the_types_unchanged() {
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(stored: &Value) -> Value {
        let typed: T = serde_json::from_value(stored.clone())
            .unwrap_or_else(|e| panic!("{} does not read as its type: {e}", stored["kind"]));
        serde_json::to_value(typed).unwrap()
    }
    let crds = crds();
    for object in yaml_documents(&repo_root().join("deploy/examples/two-sites.yaml")) {
        let kind = object["kind"].as_str().unwrap();
        let stored = crds[kind].admit(&object, None).unwrap();
        let back = match kind {
            "StorageCluster" => round_trip::<StorageCluster>(&stored),
            "Volume" => round_trip::<Volume>(&stored),
            "RemoteLink" => round_trip::<RemoteLink>(&stored),
            "SnapshotSchedule" => round_trip::<SnapshotSchedule>(&stored),
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(back, stored, "{kind} changes when read into its type and written back");
    }
}
