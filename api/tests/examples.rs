//! The examples in `deploy/examples/` against the generated CRDs, without a
//! Kubernetes API server (see `apiserver`): every object of a valid example
//! is admitted, and every file in `deploy/examples/invalid/` is refused with
//! exactly the `kubectl apply` output its leading comment shows. Every CEL
//! rule of the CRDs is broken by at least one invalid example.

mod apiserver;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use apiserver::{Crd, kubectl_message, load_crds, repo_root, yaml_documents};
use serde_json::Value;

const KNOWN_NON_CAIRN_KINDS: [&str; 2] = ["Namespace", "Secret"];

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    files.sort();
    files
}

fn object_key(object: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (s(&object["kind"]), s(&object["metadata"]["namespace"]), s(&object["metadata"]["name"]))
}

fn crd_of<'a>(crds: &'a BTreeMap<String, Crd>, object: &Value, file: &Path) -> &'a Crd {
    assert_eq!(
        object["apiVersion"],
        "cairn.dev/v1alpha1",
        "{}: {} has apiVersion {}",
        file.display(),
        object["kind"],
        object["apiVersion"]
    );
    let kind = object["kind"].as_str().unwrap_or_default();
    crds.get(kind).unwrap_or_else(|| panic!("{}: no CRD for kind {kind:?}", file.display()))
}

/// The Cairn objects of the valid examples, by (kind, namespace, name).
fn valid_objects() -> BTreeMap<(String, String, String), (PathBuf, Value)> {
    let mut objects = BTreeMap::new();
    for file in yaml_files(&repo_root().join("deploy/examples")) {
        for object in yaml_documents(&file) {
            if KNOWN_NON_CAIRN_KINDS.contains(&object["kind"].as_str().unwrap_or_default()) {
                continue;
            }
            let key = object_key(&object);
            assert!(
                objects.insert(key.clone(), (file.clone(), object)).is_none(),
                "{}: {key:?} appears twice in the examples",
                file.display()
            );
        }
    }
    assert!(!objects.is_empty(), "no examples in deploy/examples");
    objects
}

#[test]
fn every_valid_example_is_admitted() {
    let crds = load_crds();
    for (key, (file, object)) in valid_objects() {
        let crd = crd_of(&crds, &object, &file);
        if let Err(errors) = crd.admit(&object, None) {
            panic!(
                "{}: {key:?} is refused:\n{}",
                file.display(),
                kubectl_message(&crd.kind, &key.2, &errors)
            );
        }
    }
}

/// What an invalid example's leading comment says.
struct Expectation {
    /// The rule it breaks (`# Breaks: ...`).
    breaks: String,
    /// It updates the object of the same kind and name in the valid
    /// examples, rather than creating one.
    update: bool,
    /// The output of `kubectl apply` (the `#   ` lines after `prints:`).
    output: String,
}

fn expectation(file: &Path) -> Expectation {
    let text = fs::read_to_string(file).unwrap();
    let comment: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
    let breaks = comment
        .iter()
        .find_map(|l| l.strip_prefix("# Breaks: "))
        .unwrap_or_else(|| panic!("{}: no leading `# Breaks: <rule>` line", file.display()))
        .to_owned();
    let update = comment.iter().any(|l| l.contains("this is an update of"));
    let prints = comment
        .iter()
        .position(|l| l.ends_with("prints:"))
        .unwrap_or_else(|| panic!("{}: no leading `# ... prints:` line", file.display()));
    let output: Vec<&str> = comment[prints + 1..]
        .iter()
        .map_while(|l| l.strip_prefix("#   "))
        .map(str::trim_end)
        .collect();
    assert!(!output.is_empty(), "{}: no `#   <output>` lines after `prints:`", file.display());
    Expectation { breaks, update, output: output.join("\n") }
}

#[test]
fn every_invalid_example_is_refused_with_the_message_its_comment_shows() {
    let crds = load_crds();
    let valid = valid_objects();
    let files = yaml_files(&repo_root().join("deploy/examples/invalid"));
    assert!(!files.is_empty(), "no examples in deploy/examples/invalid");
    let mut failures = vec![];
    for file in &files {
        let docs = yaml_documents(file);
        assert_eq!(docs.len(), 1, "{}: one object per file", file.display());
        let object = &docs[0];
        let crd = crd_of(&crds, object, file);
        let expected = expectation(file);
        let key = object_key(object);
        let old = valid.get(&key).map(|(_, o)| o);
        match (expected.update, old) {
            (true, None) => panic!(
                "{}: says it updates an example, but no valid example is a {key:?}",
                file.display()
            ),
            (false, Some(_)) => panic!(
                "{}: a valid example has the same kind and name {key:?}, so applying this \
                 would be an update: say \"this is an update of\" it, or rename it",
                file.display()
            ),
            _ => {}
        }
        let printed = match crd.admit(object, if expected.update { old } else { None }) {
            Ok(_) => format!("(admitted: {})", expected.breaks),
            Err(errors) => kubectl_message(&crd.kind, &key.2, &errors),
        };
        let printed: Vec<&str> = printed.lines().map(str::trim_end).collect();
        let printed = printed.join("\n");
        if printed != expected.output {
            failures.push(format!(
                "{}:\n  expected:\n    {}\n  got:\n    {}",
                file.display(),
                expected.output.replace('\n', "\n    "),
                printed.replace('\n', "\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_cel_rule_is_broken_by_an_invalid_example() {
    let crds = load_crds();
    let mut shown = String::new();
    for file in yaml_files(&repo_root().join("deploy/examples/invalid")) {
        shown.push_str(&expectation(&file).output);
        shown.push('\n');
    }
    let mut missing = BTreeSet::new();
    for crd in crds.values() {
        for (path, _, rule) in apiserver::rules(&crd.schema) {
            let message = rule["message"].as_str().unwrap();
            if !shown.contains(message) {
                missing.insert(format!("{} {path}: {message}", crd.kind));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "rules no file in deploy/examples/invalid breaks:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
}
