//! What the Kubernetes API server does with a Cairn object on create or
//! update, done here without one, from the CRD manifests in `deploy/crds/`:
//! strict decoding (unknown fields), structural defaulting, OpenAPI schema
//! validation (with the `jsonschema` crate), list-set uniqueness, and the
//! `x-kubernetes-validations` CEL rules (with the `cel` crate, the renamed
//! `cel-interpreter`), `oldSelf` bound on updates. Errors are rendered the
//! way the API server words them, so tests can compare them with what
//! `kubectl apply` prints.
//!
//! As in the API server, CEL rules are not evaluated when a schema error
//! "blocks" them (enum, required, too long, too many, wrong type); a note
//! says so instead.
//!
//! Limits: the rules stay within standard CEL (`has`, `size`, `in`,
//! `matches`, comparisons), which both the API server and the `cel` crate
//! evaluate; the Kubernetes CEL libraries (`quantity()`, `url()`, list
//! extensions) are not used, so nothing here needs them. CEL cost budgets
//! are not estimated.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("api/ is in the repository").to_owned()
}

/// The YAML documents of a file, as JSON, without empty ones.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            serde_json::to_value(yaml).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// One CRD as the API server would serve it.
pub struct Crd {
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// The version's `openAPIV3Schema`.
    pub schema: Value,
    /// The version's `additionalPrinterColumns`.
    pub printer_columns: Vec<Value>,
    validator: jsonschema::Validator,
}

/// The CRDs in `deploy/crds/`, by kind.
pub fn load_crds() -> BTreeMap<String, Crd> {
    let dir = repo_root().join("deploy/crds");
    let mut crds = BTreeMap::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for doc in yaml_documents(&path) {
            let crd = Crd::from_manifest(&doc);
            crds.insert(crd.kind.clone(), crd);
        }
    }
    crds
}

impl Crd {
    pub fn from_manifest(crd: &Value) -> Crd {
        let spec = &crd["spec"];
        let version = &spec["versions"][0];
        let schema = version["schema"]["openAPIV3Schema"].clone();
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(false)
            .build(&json_schema(&schema))
            .unwrap_or_else(|e| {
                panic!("the schema of {} does not compile: {e}", spec["names"]["kind"])
            });
        Crd {
            kind: spec["names"]["kind"].as_str().unwrap().to_owned(),
            plural: spec["names"]["plural"].as_str().unwrap().to_owned(),
            namespaced: spec["scope"] == "Namespaced",
            schema,
            printer_columns: version["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            validator,
        }
    }

    /// What a create (`old` = None) or an update of `old` to `object`
    /// answers: the object as stored (defaults applied) or the field errors,
    /// worded as the API server words them.
    pub fn admit(&self, object: &Value, old: Option<&Value>) -> Result<Value, Vec<String>> {
        let unknown = unknown_fields(&self.schema, object);
        if !unknown.is_empty() {
            return Err(unknown
                .into_iter()
                .map(|f| format!("strict decoding error: unknown field \"{f}\""))
                .collect());
        }
        let mut object = object.clone();
        apply_defaults(&self.schema, &mut object);
        let old = old.map(|o| {
            let mut o = o.clone();
            apply_defaults(&self.schema, &mut o);
            o
        });

        let mut errors = vec![];
        let mut blocking = false;
        for e in self.validator.iter_errors(&object) {
            let (message, blocks) = schema_error(&e, &object);
            blocking |= blocks;
            errors.push(message);
        }
        errors.sort();
        errors.dedup();
        errors.extend(duplicate_set_items(&self.schema, &object, &mut FieldPath::root()));
        if blocking {
            errors.push(
                "<nil>: Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation"
                    .into(),
            );
        } else {
            evaluate_rules(
                &self.schema,
                &object,
                old.as_ref(),
                &mut FieldPath::root(),
                &mut errors,
            );
        }
        if errors.is_empty() { Ok(object) } else { Err(errors) }
    }
}

/// What `kubectl apply` prints for these errors of an object.
pub fn kubectl_message(kind: &str, name: &str, errors: &[String]) -> String {
    let prefix = format!("The {kind} \"{name}\" is invalid: ");
    match errors {
        [one] => format!("{prefix}{one}"),
        many => {
            let mut out = prefix;
            for e in many {
                write!(out, "\n* {e}").unwrap();
            }
            out
        }
    }
}

/// The OpenAPI v3 schema as a draft-4 JSON schema: `nullable` becomes a
/// `null` type; Kubernetes extensions are left for the validator to
/// ignore.
fn json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    "properties" => Value::Object(
                        v.as_object()
                            .unwrap()
                            .iter()
                            .map(|(name, s)| (name.clone(), json_schema(s)))
                            .collect(),
                    ),
                    "items" | "additionalProperties" if v.is_object() => json_schema(v),
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            if let (Some(Value::Bool(true)), Some(Value::String(t))) =
                (map.get("nullable"), map.get("type"))
            {
                out.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// A field path in the API server's notation: `spec.windows[0].start`.
#[derive(Clone, Debug)]
pub struct FieldPath(Vec<Segment>);

#[derive(Clone, Debug)]
enum Segment {
    Field(String),
    Index(usize),
}

impl FieldPath {
    pub fn root() -> Self {
        FieldPath(vec![])
    }

    fn child(&self, name: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Segment::Field(name.to_owned()));
        p
    }

    fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Segment::Index(i));
        p
    }

    /// The path of a JSON pointer into `root`.
    fn from_pointer(pointer: &str, root: &Value) -> Self {
        let mut path = FieldPath::root();
        let mut node = Some(root);
        for raw in pointer.split('/').skip(1) {
            let seg = raw.replace("~1", "/").replace("~0", "~");
            match node {
                Some(Value::Array(items)) => {
                    let i: usize = seg.parse().unwrap_or(0);
                    path = path.index(i);
                    node = items.get(i);
                }
                other => {
                    node = other.and_then(|n| n.get(&seg));
                    path = path.child(&seg);
                }
            }
        }
        path
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("<nil>");
        }
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Fields the schema does not declare (the API server's strict decoding
/// refuses them), as paths.
fn unknown_fields(schema: &Value, object: &Value) -> Vec<String> {
    fn walk(schema: &Value, value: &Value, path: &FieldPath, top: bool, out: &mut Vec<String>) {
        if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
            return;
        }
        match value {
            Value::Object(map) => {
                let props = schema.get("properties").and_then(Value::as_object);
                let extra = schema.get("additionalProperties").filter(|a| a.is_object());
                for (k, v) in map {
                    if top && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                        continue;
                    }
                    match (props.and_then(|p| p.get(k)), extra) {
                        (Some(s), _) | (None, Some(s)) => walk(s, v, &path.child(k), false, out),
                        (None, None) => out.push(path.child(k).to_string()),
                    }
                }
            }
            Value::Array(items) => {
                if let Some(s) = schema.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        walk(s, v, &path.index(i), false, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = vec![];
    walk(schema, object, &FieldPath::root(), true, &mut out);
    out
}

/// Structural defaulting: a missing property with a `default` gets it,
/// then defaulting goes on inside it.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, s) in props {
                    if let (false, Some(d)) = (map.contains_key(name), s.get("default")) {
                        map.insert(name.clone(), d.clone());
                    }
                    if let Some(v) = map.get_mut(name) {
                        apply_defaults(s, v);
                    }
                }
            } else if let Some(s) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for v in map.values_mut() {
                    apply_defaults(s, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for v in items {
                    apply_defaults(s, v);
                }
            }
        }
        _ => {}
    }
}

/// A value as the API server quotes it in `Invalid value: ...`.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => serde_json::to_string(s).unwrap(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => go_float(n.as_f64().unwrap()),
        },
        other => other.to_string(),
    }
}

/// A float as Go's `%v` prints it: the shortest digits, with an exponent
/// when it is below -4 or from 6 up (`1`, `4096`, `1.048576e+06`).
fn go_float(f: f64) -> String {
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

/// An OpenAPI validation error as the API server words it, and whether it
/// blocks the CEL rules.
fn schema_error(e: &jsonschema::ValidationError<'_>, root: &Value) -> (String, bool) {
    use jsonschema::error::ValidationErrorKind as K;
    let path = FieldPath::from_pointer(e.instance_path().as_str(), root);
    let value = e.instance();
    let invalid = |body: String| format!("{path}: Invalid value: {}: {body}", go_value(value));
    let limit = |l: &Value| go_float(l.as_f64().unwrap());
    match e.kind() {
        K::Required { property } => {
            (format!("{}: Required value", path.child(property.as_str().unwrap())), true)
        }
        K::Enum { options } => {
            let supported: Vec<String> = options.as_array().unwrap().iter().map(go_value).collect();
            (
                format!(
                    "{path}: Unsupported value: {}: supported values: {}",
                    go_value(value),
                    supported.join(", ")
                ),
                true,
            )
        }
        K::Minimum { limit: l } => (
            invalid(format!("{path} in body should be greater than or equal to {}", limit(l))),
            false,
        ),
        K::Maximum { limit: l } => {
            (invalid(format!("{path} in body should be less than or equal to {}", limit(l))), false)
        }
        K::Pattern { pattern } => {
            (invalid(format!("{path} in body should match '{pattern}'")), false)
        }
        K::MinLength { limit } => {
            (invalid(format!("{path} in body should be at least {limit} chars long")), false)
        }
        K::MaxLength { limit } => {
            (format!("{path}: Too long: may not be more than {limit} bytes"), true)
        }
        K::MinItems { limit } => {
            (invalid(format!("{path} in body should have at least {limit} items")), false)
        }
        K::MaxItems { limit } => (
            format!(
                "{path}: Too many: {}: must have at most {limit} items",
                value.as_array().map_or(0, Vec::len)
            ),
            true,
        ),
        K::Type { .. } => (invalid(format!("{path} in body has the wrong type: {e}")), true),
        _ => (invalid(e.to_string()), false),
    }
}

/// `x-kubernetes-list-type: set` lists with a repeated item.
fn duplicate_set_items(schema: &Value, value: &Value, path: &mut FieldPath) -> Vec<String> {
    let mut out = vec![];
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, v) in map {
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    out.extend(duplicate_set_items(s, v, &mut path.child(k)));
                }
            }
        }
        Value::Array(items) => {
            let set = schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set");
            for (i, v) in items.iter().enumerate() {
                if set && items[..i].contains(v) {
                    out.push(format!("{}: Duplicate value: {}", path.index(i), go_value(v)));
                }
                if let Some(s) = schema.get("items") {
                    out.extend(duplicate_set_items(s, v, &mut path.index(i)));
                }
            }
        }
        _ => {}
    }
    out
}

/// A JSON value as CEL sees it: JSON integers are CEL `int`, as in
/// Kubernetes (never `uint`).
pub fn cel_value(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap()),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(cel_value).collect())),
        Value::Object(map) => {
            let map: HashMap<String, cel::Value> =
                map.iter().map(|(k, v)| (k.clone(), cel_value(v))).collect();
            map.into()
        }
    }
}

/// Whether a rule is a transition rule (it names `oldSelf`).
pub fn is_transition_rule(rule: &str) -> bool {
    rule.contains("oldSelf")
}

/// Evaluates one rule; `Ok(passed)` or the evaluation error.
pub fn evaluate_rule(rule: &str, value: &Value, old: Option<&Value>) -> Result<bool, String> {
    let program = cel::Program::compile(rule).map_err(|e| format!("does not compile: {e}"))?;
    let mut context = cel::Context::default();
    context.add_variable_from_value("self", cel_value(value));
    if let Some(old) = old {
        context.add_variable_from_value("oldSelf", cel_value(old));
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("evaluated to {other:?}, not a bool")),
        Err(e) => Err(format!("evaluation error: {e}")),
    }
}

/// Every rule of the schema, with the schema it sits on and its schema
/// path (`spec.bandwidth.windows[*]`).
pub fn rules(schema: &Value) -> Vec<(String, Value, Value)> {
    fn walk(schema: &Value, path: String, out: &mut Vec<(String, Value, Value)>) {
        if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
            for r in rules {
                out.push((path.clone(), schema.clone(), r.clone()));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                walk(s, p, out);
            }
        }
        if let Some(s) = schema.get("items") {
            walk(s, format!("{path}[*]"), out);
        }
        if let Some(s) = schema.get("additionalProperties").filter(|a| a.is_object()) {
            walk(s, format!("{path}[*]"), out);
        }
    }
    let mut out = vec![];
    walk(schema, String::new(), &mut out);
    out
}

/// Evaluates the rules on `value` and everything inside it. A transition
/// rule runs only where the old object has the same field (list items are
/// matched only in `x-kubernetes-list-type: map` lists, by key).
fn evaluate_rules(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &mut FieldPath,
    errors: &mut Vec<String>,
) {
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
        let type_ = schema.get("type").and_then(Value::as_str).unwrap_or("object");
        for r in rules {
            let rule = r["rule"].as_str().expect("a rule is a string");
            if is_transition_rule(rule) && old.is_none() {
                continue;
            }
            let message =
                r["message"].as_str().map_or_else(|| format!("failed rule: {rule}"), str::to_owned);
            match evaluate_rule(rule, value, old) {
                Ok(true) => {}
                Ok(false) => errors.push(format!("{path}: Invalid value: \"{type_}\": {message}")),
                Err(e) => {
                    errors.push(format!("{path}: Invalid value: \"{type_}\": rule {rule:?} {e}"))
                }
            }
        }
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, v) in map {
                if let Some(s) = props.and_then(|p| p.get(k)).or(extra) {
                    let old_v = old.and_then(|o| o.get(k));
                    evaluate_rules(s, v, old_v, &mut path.child(k), errors);
                }
            }
        }
        Value::Array(items) => {
            let Some(s) = schema.get("items") else { return };
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let is_map =
                schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map");
            for (i, v) in items.iter().enumerate() {
                let old_v = if is_map {
                    old.and_then(Value::as_array).and_then(|olds| {
                        olds.iter().find(|o| keys.iter().all(|k| o.get(k) == v.get(k)))
                    })
                } else {
                    None
                };
                evaluate_rules(s, v, old_v, &mut path.index(i), errors);
            }
        }
        _ => {}
    }
}
