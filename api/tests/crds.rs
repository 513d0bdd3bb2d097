//! The CRD manifests in `deploy/crds/` are exactly what the types in
//! `cairn_api::crd` generate, and they are what the API server accepts: a
//! structural schema (every node typed, no `anyOf`/`oneOf`), list-map keys
//! that are required, defaults that validate, CEL rules that compile and
//! carry a message, printer columns that point at fields that exist.

mod apiserver;

use std::{collections::BTreeSet, fs};

use apiserver::{Crd, load_crds, repo_root};
use cairn_api::crd::{GENERATED_HEADER, manifests};
use serde_json::Value;

const REGENERATE: &str = "run `cargo run -p cairn-api --bin crdgen` and commit deploy/crds";

#[test]
fn committed_crds_are_what_the_types_generate() {
    let dir = repo_root().join("deploy/crds");
    let generated = manifests();
    let mut problems = vec![];
    for (name, yaml) in &generated {
        match fs::read_to_string(dir.join(name)) {
            Ok(committed) if committed == *yaml => {}
            Ok(committed) => {
                let line = committed
                    .lines()
                    .zip(yaml.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(committed.lines().count().min(yaml.lines().count()));
                problems.push(format!(
                    "{name} differs from the types from line {}: committed {:?}, generated {:?}",
                    line + 1,
                    committed.lines().nth(line).unwrap_or("<end>"),
                    yaml.lines().nth(line).unwrap_or("<end>")
                ));
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    for entry in fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".cairn.dev.yaml") && !generated.iter().any(|(n, _)| *n == name) {
            problems.push(format!("{name} is no longer generated (no type makes it)"));
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/crds is out of date with cairn_api::crd:\n  {}\n{REGENERATE}",
        problems.join("\n  ")
    );
}

#[test]
fn every_manifest_says_it_is_generated() {
    for (name, yaml) in manifests() {
        assert!(yaml.starts_with(&format!("{GENERATED_HEADER}\n")), "{name}");
    }
}

#[test]
fn the_resources_are_named_scoped_and_have_a_status_subresource() {
    let expected = [
        ("StorageCluster", "storageclusters", "scluster", "Cluster"),
        ("Volume", "volumes", "cvol", "Namespaced"),
        ("RemoteLink", "remotelinks", "rlink", "Namespaced"),
        ("SnapshotSchedule", "snapshotschedules", "snapsched", "Namespaced"),
    ];
    let crds = cairn_api::crd::crds();
    assert_eq!(crds.len(), expected.len());
    for (crd, (kind, plural, short, scope)) in crds.iter().zip(expected) {
        let names = &crd.spec.names;
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{plural}.cairn.dev").as_str()));
        assert_eq!((names.kind.as_str(), names.plural.as_str()), (kind, plural));
        assert_eq!(names.short_names.as_deref(), Some(&[short.to_owned()][..]), "{kind}");
        assert_eq!(names.categories.as_deref(), Some(&["cairn".to_owned()][..]), "{kind}");
        assert_eq!(crd.spec.group, "cairn.dev");
        assert_eq!(crd.spec.scope, scope, "{kind}");
        let [version] = &crd.spec.versions[..] else { panic!("{kind}: one version") };
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let subresources = version.subresources.as_ref().expect("subresources");
        assert!(subresources.status.is_some(), "{kind}: status subresource");
    }
}

/// Problems that make the API server refuse a CRD's schema (or silently
/// ignore part of it).
fn structural_problems(schema: &Value, path: &str, in_atomic_list: bool, out: &mut Vec<String>) {
    let obj = schema.as_object().expect("a schema is an object");
    for forbidden in ["anyOf", "oneOf", "allOf", "not", "$ref", "uniqueItems"] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: has {forbidden}"));
        }
    }
    let untyped_ok = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let type_ = obj.get("type").and_then(Value::as_str);
    if type_.is_none() && !untyped_ok {
        out.push(format!("{path}: has no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!("{path}: has both properties and additionalProperties"));
    }
    if let Some(values) = obj.get("enum").and_then(Value::as_array) {
        let fits = |v: &Value| match type_ {
            Some("string") => v.is_string(),
            Some("integer") => v.is_i64(),
            Some("number") => v.is_number(),
            Some("boolean") => v.is_boolean(),
            _ => false,
        };
        if let Some(bad) = values.iter().find(|v| !fits(v)) {
            out.push(format!("{path}: enum value {bad} is not a {type_:?}"));
        }
    }
    if let Some(default) = obj.get("default") {
        let mut crd_like = serde_json::json!({"type": "object", "properties": {"v": schema}});
        crd_like["required"] = serde_json::json!(["v"]);
        let check = jsonschema::draft4::new(&crd_like).unwrap();
        if !check.is_valid(&serde_json::json!({ "v": default })) {
            out.push(format!("{path}: default {default} does not validate"));
        }
    }
    if let Some(rules) = obj.get("x-kubernetes-validations").and_then(Value::as_array) {
        for r in rules {
            let rule = r["rule"].as_str().unwrap_or_default();
            match r["message"].as_str() {
                None => out.push(format!("{path}: rule {rule:?} has no message")),
                Some(m) if m.contains('\n') => out.push(format!("{path}: message has a newline")),
                Some(_) => {}
            }
            if let Err(e) = cel::Program::compile(rule) {
                out.push(format!("{path}: rule {rule:?} does not compile: {e}"));
            }
            if apiserver::is_transition_rule(rule) && in_atomic_list {
                out.push(format!(
                    "{path}: transition rule {rule:?} inside a list that is not a list-type map \
                     is never evaluated"
                ));
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, s) in props {
            structural_problems(s, &format!("{path}.{k}"), in_atomic_list, out);
        }
    }
    if let Some(s) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        structural_problems(s, &format!("{path}[*]"), in_atomic_list, out);
    }
    if type_ == Some("array") {
        let Some(items) = obj.get("items") else {
            out.push(format!("{path}: an array without items"));
            return;
        };
        let is_map = obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map");
        if is_map {
            let required: BTreeSet<&str> = items["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for key in obj["x-kubernetes-list-map-keys"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                if !required.contains(key) && items["properties"][key].get("default").is_none() {
                    out.push(format!(
                        "{path}: list-map key {key} is neither required nor defaulted"
                    ));
                }
            }
        }
        structural_problems(items, &format!("{path}[*]"), in_atomic_list || !is_map, out);
    }
}

#[test]
fn schemas_are_structural_with_compiling_rules_and_valid_defaults() {
    let mut problems = vec![];
    for crd in load_crds().values() {
        structural_problems(&crd.schema, &crd.kind, false, &mut problems);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The schema node a printer column's JSON path names, if any.
fn schema_at<'a>(crd: &'a Crd, json_path: &str) -> Option<&'a Value> {
    let mut node = &crd.schema;
    for field in json_path.trim_start_matches('.').split('.') {
        node = node.get("properties")?.get(field)?;
    }
    Some(node)
}

#[test]
fn printer_columns_point_at_fields_of_their_type() {
    let mut problems = vec![];
    for crd in load_crds().values() {
        assert!(!crd.printer_columns.is_empty(), "{} has no printer columns", crd.kind);
        for column in &crd.printer_columns {
            let (name, path, type_) = (&column["name"], &column["jsonPath"], &column["type"]);
            let path = path.as_str().unwrap();
            if path == ".metadata.creationTimestamp" {
                continue;
            }
            let Some(node) = schema_at(crd, path) else {
                problems.push(format!("{} column {name}: {path} is not in the schema", crd.kind));
                continue;
            };
            let fits = match type_.as_str().unwrap() {
                "date" => node["type"] == "string" && node["format"] == "date-time",
                "integer" => node["type"] == "integer",
                other => node["type"] == other,
            };
            if !fits {
                problems.push(format!(
                    "{} column {name}: {path} is a {}, not a {type_}",
                    crd.kind, node["type"]
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
