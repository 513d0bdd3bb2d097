#!/usr/bin/env python3
"""Checks the Helm chart and every manifest in deploy/ and e2e/ without a
cluster, as CI does (e2e/test.sh runs it):

1. `helm lint --strict` of charts/cairn with its default values and with
   e2e/kind/values-two-sites.yaml (Helm's own engine, in process, through
   helm-python-sdk);
2. `helm template` of the chart with those values and with a values set that
   turns every optional part on; each rendered object, every YAML file in
   deploy/ (CRDs, examples, cairn.yaml) and e2e/ is validated:
   - Kubernetes kinds against the API's JSON schemas of Kubernetes 1.34
     (kubernetes-validate's bundled copy, strict: unknown fields are errors,
     as `kubectl apply` makes them);
   - cairn.dev kinds against the openAPIV3Schema of their CRD in deploy/crds/
     (jsonschema; unknown fields refused as the API server's strict field
     validation does), and their metadata against ObjectMeta;
   - other groups (snapshot.storage.k8s.io, monitoring.coreos.com, kind's
     config) are skipped with a note: their schemas are not in the tree;
   and so is each manifest e2e/kind/run.sh applies from a here-document;
3. deploy/examples/invalid/*.yaml must be refused: each fails the CRD schema,
   or the field its header names carries a CEL rule (x-kubernetes-validations;
   api/tests/rules.rs evaluates those rules and checks their messages);
4. charts/cairn/crds/ equals deploy/crds/, and deploy/cairn.yaml equals a
   fresh render (deploy/render.py).

    /var/tmp/cairn-deploy-venv/bin/python deploy/validate.py

It needs the venv of deploy/venv.sh and nothing else: no network, no
cluster, no helm binary. Ends with `N passed, N failed`.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402  (deploy/render.py)

ROOT = render.ROOT
KUBERNETES_VERSION = "1.34"
TWO_SITES = ROOT / "e2e" / "kind" / "values-two-sites.yaml"
ONE_NODE = ROOT / "charts" / "cairn" / "values-one-node.yaml"

# Every optional part of the chart on, so that each template is rendered
# and validated at least once.
EVERYTHING: dict[str, Any] = {
    "global": {"imagePullSecrets": [{"name": "registry"}], "imageTag": "dev"},
    "storageClusters": [
        {
            "name": "site-a",
            "nodeSelector": {"cairn.dev/site": "site-a"},
            "failureDomainLabel": "topology.kubernetes.io/zone",
            "defaults": {"replicas": 3, "chunkSizeBytes": 134217728},
            "agent": {"port": 7171, "sitePort": 7444},
        },
        {
            "name": "site-b",
            "gateway": {
                "endpoint": "https://cairn-gw.site-b.example.net:7443",
                "secretRef": {"name": "site-b-gateway"},
            },
        },
    ],
    "storageClasses": [
        {"name": "cairn-xfs", "cluster": "site-a", "fsType": "xfs", "replicas": 3, "default": True},
        {"name": "cairn-anywhere", "cluster": "site-a", "restrictTopology": False, "reclaimPolicy": "Retain"},
    ],
    "volumeSnapshotClass": {"enabled": True, "default": True},
    "tls": {
        "enabled": True,
        "source": "generate",
        "dnsNames": ["cairn-gw.site-a.example.net"],
        "ipAddresses": ["192.0.2.10"],
        "peerCAs": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "agent": {"extraArgs": ["--copy-rate-cap", "104857600"], "tolerations": [{"operator": "Exists"}]},
    "operator": {"replicas": 3},
    "csi": {
        "volumeNamespace": "volumes",
        "controller": {"replicas": 2},
        "sidecars": {"resizer": {"enabled": True}},
    },
}

# Groups whose schemas are not in the tree.
UNCHECKED_GROUPS = {
    "snapshot.storage.k8s.io": "the VolumeSnapshot CRDs come from kubernetes-csi/external-snapshotter",
    "monitoring.coreos.com": "the ServiceMonitor CRD comes from the Prometheus Operator",
    "kind.x-k8s.io": "kind's own cluster config, read by kind, not the API server",
}

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# --------------------------------------------------------------------------
# Output and counting.


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.notes: list[str] = []

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed += 1
        print(f"  FAIL  {what}\n        {why.replace(chr(10), chr(10) + '        ')}")

    def note(self, what: str) -> None:
        if what not in self.notes:
            self.notes.append(what)

    def section(self, title: str) -> None:
        print(f"== {title}")


# --------------------------------------------------------------------------
# Schemas.


class KubernetesSchemas:
    """The Kubernetes API's JSON schemas (kubernetes-validate's bundled copy,
    strict flavour), one validator per kind, built once."""

    def __init__(self, version: str) -> None:
        import referencing
        from kubernetes_validate import utils

        self._utils = utils
        full = [v for v in utils.all_versions() if utils.major_minor(v) == version]
        if not full:
            raise SystemExit(f"kubernetes-validate has no schemas for Kubernetes {version}")
        self.version = version
        self._dir = f"kubernetes-json-schema/v{full[-1]}-local-strict"
        defs = utils.schema_contents(f"{self._dir}/_definitions.json", version)
        self._registry = referencing.Resource.from_contents(defs) @ referencing.Registry()
        self._validators: dict[tuple[str, str], Any] = {}

    def validator(self, api_version: str, kind: str) -> Any | None:
        import jsonschema

        key = (api_version, kind)
        if key not in self._validators:
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            path = f"{self._dir}/{kind.lower()}-{group_version}.json"
            try:
                schema = self._utils.schema_contents(path, self.version)
            except FileNotFoundError:
                self._validators[key] = None
            else:
                self._validators[key] = jsonschema.Draft202012Validator(
                    schema, registry=self._registry
                )
        return self._validators[key]

    def object_meta(self) -> Any:
        """A validator of ObjectMeta alone (the metadata of custom objects)."""
        import jsonschema

        ref = {
            "$id": "https://kubernetes.io/api/cairn-objectmeta",
            "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        }
        return jsonschema.Draft202012Validator(ref, registry=self._registry)


def strict_crd_schema(node: Any) -> Any:
    """An openAPIV3Schema as a JSON schema that also refuses unknown fields
    (the API server's strict field validation) and reads `nullable`."""
    if isinstance(node, list):
        return [strict_crd_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_crd_schema(v) for k, v in node.items()}
    if out.get("type") == "object" and "properties" in out:
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.pop("nullable", False):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


class CustomResources:
    """The cairn.dev CRDs of deploy/crds/: a validator per kind and version."""

    def __init__(self, crd_dir: Path) -> None:
        import jsonschema

        self.kinds: dict[tuple[str, str], dict[str, Any]] = {}
        for path in sorted(crd_dir.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            spec = crd["spec"]
            for v in spec["versions"]:
                raw = v["schema"]["openAPIV3Schema"]
                schema = strict_crd_schema(raw)
                # metadata is checked against ObjectMeta separately.
                top = schema.setdefault("properties", {})
                top["metadata"] = {"type": "object"}
                top.setdefault("apiVersion", {"type": "string"})
                top.setdefault("kind", {"type": "string"})
                self.kinds[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = {
                    "validator": jsonschema.Draft7Validator(schema),
                    "raw": raw,
                    "namespaced": spec["scope"] == "Namespaced",
                    "file": path.relative_to(ROOT),
                }

    def get(self, api_version: str, kind: str) -> dict[str, Any] | None:
        return self.kinds.get((api_version, kind))


def error_text(e: Any) -> str:
    where = ".".join(str(p) for p in e.absolute_path) or "(top)"
    return f"{where}: {e.message[:400]}"


def validate_object(
    obj: dict[str, Any], k8s: KubernetesSchemas, crs: CustomResources, meta: Any, report: Report
) -> list[str] | None:
    """Errors of one object (empty: valid), or None when it cannot be checked
    here (the reason goes into the report's notes)."""
    api_version = str(obj.get("apiVersion", ""))
    kind = str(obj.get("kind", ""))
    group = api_version.split("/")[0] if "/" in api_version else ""
    if not api_version or not kind:
        return ["no apiVersion or kind"]
    if group in UNCHECKED_GROUPS:
        report.note(f"{kind} ({api_version}) not validated: {UNCHECKED_GROUPS[group]}")
        return None
    if group == "cairn.dev":
        cr = crs.get(api_version, kind)
        if cr is None:
            return [f"no CRD in deploy/crds/ defines {kind} in {api_version}"]
        errors = [error_text(e) for e in cr["validator"].iter_errors(obj)]
        metadata = obj.get("metadata") or {}
        errors += [f"metadata.{error_text(e)}" for e in meta.iter_errors(metadata)]
        name = str(metadata.get("name", ""))
        if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
            errors.append(f"metadata.name: {name!r} is not a DNS subdomain")
        if not cr["namespaced"] and "namespace" in metadata:
            errors.append(f"metadata.namespace: {kind} is cluster-scoped; remove the namespace")
        return errors
    validator = k8s.validator(api_version, kind)
    if validator is None:
        return [f"Kubernetes {k8s.version} has no {kind} in {api_version}"]
    return [error_text(e) for e in validator.iter_errors(obj)]


# --------------------------------------------------------------------------
# The checks.


def yaml_documents(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is not None:
            yield doc


def label(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


def check_lint(report: Report, values_sets: list[tuple[str, dict[str, Any] | None]]) -> None:
    import helm_python

    report.section("helm lint --strict charts/cairn")
    for title, values in values_sets:
        result = helm_python.lint(render.CHART, values, strict=True, namespace=render.NAMESPACE)
        problems = [
            f"[{m['path']}] {m['error']}" for m in result.get("messages", []) if m.get("severity", 0) >= 2
        ] + [str(e) for e in result.get("errors", [])]
        if problems:
            report.fail(f"lint with {title}", "\n".join(problems))
        else:
            infos = [m["error"] for m in result.get("messages", []) if m.get("severity", 0) == 1]
            report.ok(f"lint with {title}" + (f" (info: {'; '.join(infos)})" if infos else ""))


def check_renders(
    report: Report,
    values_sets: list[tuple[str, dict[str, Any] | None]],
    validate: Callable[[dict[str, Any]], list[str] | None],
) -> None:
    for title, values in values_sets:
        report.section(f"helm template charts/cairn with {title}")
        try:
            docs = render.render(values)
        except Exception as e:  # the engine's error says which template and line
            report.fail(f"render with {title}", str(e))
            continue
        seen: dict[tuple[str, str, str], str] = {}
        for d in docs:
            key = (d.kind, str((d.obj.get("metadata") or {}).get("namespace", "")), d.name)
            if key in seen:
                report.fail(f"{label(d.obj)} ({d.source})", f"rendered twice (also by {seen[key]})")
                continue
            seen[key] = d.source
            errors = validate(d.obj)
            if errors is None:
                continue
            if errors:
                report.fail(f"{label(d.obj)} ({d.source})", "\n".join(errors))
            else:
                report.ok(f"{label(d.obj)}")


def check_files(report: Report, validate: Callable[[dict[str, Any]], list[str] | None]) -> None:
    report.section("YAML files in deploy/ and e2e/")
    files = sorted(
        p
        for pattern in ("deploy/**/*.yaml", "e2e/**/*.yaml")
        for p in ROOT.glob(pattern)
        if "invalid" not in p.relative_to(ROOT).parts
    )
    for path in files:
        rel = path.relative_to(ROOT)
        if path.name == "test-driver.yaml":
            check_test_driver(report, path)
            continue
        if path.name.startswith("values-"):
            continue  # Helm values, checked by lint and render above
        try:
            docs = list(yaml_documents(path))
        except yaml.YAMLError as e:
            report.fail(str(rel), f"not YAML: {e}")
            continue
        bad = []
        checked = 0
        for obj in docs:
            errors = validate(obj)
            if errors is None:
                continue
            checked += 1
            bad += [f"{label(obj)}: {e}" for e in errors]
        if bad:
            report.fail(str(rel), "\n".join(bad))
        elif checked:
            report.ok(f"{rel} ({checked} object{'s' if checked != 1 else ''})")


# Values the shell variables in e2e/kind/run.sh's manifests stand for when
# they are validated here.
SCRIPT_VARIABLES = {
    "APP_NS": "cairn-e2e",
    "size_bytes": "1073741824",
    "source_volume": "pvc-5b0e2a7c-0000-4000-8000-000000000000",
}
_HEREDOC = re.compile(r"<<-?\s*'?EOF'?\n(.*?)\nEOF\n", re.DOTALL)


def check_script_manifests(report: Report, validate: Callable[[dict[str, Any]], list[str] | None]) -> None:
    """The manifests e2e/kind/run.sh applies from here-documents."""
    script = ROOT / "e2e" / "kind" / "run.sh"
    rel = script.relative_to(ROOT)
    for n, body in enumerate(_HEREDOC.findall(script.read_text()), start=1):
        unknown = sorted(set(re.findall(r"\$\{?(\w+)\}?", body)) - SCRIPT_VARIABLES.keys())
        if unknown:
            report.fail(f"{rel} here-document {n}", f"add {unknown} to SCRIPT_VARIABLES in deploy/validate.py")
            continue
        text = re.sub(r"\$\{?(\w+)\}?", lambda m: SCRIPT_VARIABLES[m.group(1)], body)
        bad, checked = [], 0
        for obj in yaml.safe_load_all(text):
            if obj is None or "apiVersion" not in obj:
                continue  # a shell script inside a pod's command, say
            errors = validate(obj)
            if errors is None:
                continue
            checked += 1
            bad += [f"{label(obj)}: {e}" for e in errors]
        if bad:
            report.fail(f"{rel} here-document {n}", "\n".join(bad))
        elif checked:
            report.ok(f"{rel} here-document {n} ({checked} object{'s' if checked != 1 else ''})")


def check_test_driver(report: Report, path: Path) -> None:
    """The external storage e2e suite's driver definition: the files it
    names exist and the driver is ours."""
    rel = path.relative_to(ROOT)
    d = yaml.safe_load(path.read_text())
    errors = []
    info = d.get("DriverInfo") or {}
    if info.get("Name") != "csi.cairn.dev":
        errors.append(f"DriverInfo.Name is {info.get('Name')!r}, not csi.cairn.dev")
    for section in ("StorageClass", "SnapshotClass"):
        f = (d.get(section) or {}).get("FromFile")
        if f and not (ROOT / f).exists():
            errors.append(f"{section}.FromFile {f} does not exist (paths are relative to the repository)")
    caps = info.get("Capabilities") or {}
    if caps.get("topology") and not info.get("TopologyKeys"):
        errors.append("Capabilities.topology needs TopologyKeys")
    if errors:
        report.fail(str(rel), "\n".join(errors))
    else:
        report.ok(f"{rel} (the e2e suite's driver definition)")


def header_path(text: str) -> str | None:
    """The field an invalid example's header says the API server names:
    `...is invalid: spec.bandwidth.windows[0]: Invalid value...`."""
    m = re.search(r"is invalid: ([A-Za-z0-9_.\[\]]+):", text)
    return m.group(1) if m else None


def schema_at(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in re.findall(r"[A-Za-z0-9_]+|\[\d+\]", path):
        if node is None:
            return None
        if part.startswith("["):
            node = node.get("items")
        else:
            node = (node.get("properties") or {}).get(part)
    return node


def check_invalid_examples(report: Report, crs: CustomResources, meta: Any, k8s: KubernetesSchemas) -> None:
    report.section("deploy/examples/invalid: each must be refused")
    for path in sorted((ROOT / "deploy" / "examples" / "invalid").glob("*.yaml")):
        rel = path.relative_to(ROOT)
        text = path.read_text()
        objs = list(yaml_documents(path))
        errors = [e for obj in objs for e in (validate_object(obj, k8s, crs, meta, report) or [])]
        if errors:
            report.ok(f"{rel}: refused by the schema ({errors[0]})")
            continue
        field = header_path(text)
        cr = crs.get(str(objs[0].get("apiVersion")), str(objs[0].get("kind"))) if objs else None
        node = schema_at(cr["raw"], field) if (cr and field) else None
        if node and node.get("x-kubernetes-validations"):
            report.ok(f"{rel}: passes the plain schema; refused by the CEL rule on {field}")
        else:
            report.fail(
                str(rel),
                "passes the CRD schema, and its header names no field with a CEL rule "
                f"(header field: {field!r}): the API server would accept it",
            )


def check_drift(report: Report) -> None:
    report.section("generated files")
    problems = render.crd_drift()
    if problems:
        report.fail("charts/cairn/crds/ equals deploy/crds/", "\n".join(problems))
    else:
        report.ok("charts/cairn/crds/ equals deploy/crds/")
    problems = render.manifest_drift()
    if problems:
        report.fail(
            "deploy/cairn.yaml equals a fresh render",
            "\n".join(problems) + "\nregenerate: /var/tmp/cairn-deploy-venv/bin/python deploy/render.py",
        )
    else:
        report.ok("deploy/cairn.yaml equals a fresh render")


def main() -> int:
    started = time.monotonic()
    report = Report()
    k8s = KubernetesSchemas(KUBERNETES_VERSION)
    crs = CustomResources(render.CRDS)
    meta = k8s.object_meta()

    def validate(obj: dict[str, Any]) -> list[str] | None:
        return validate_object(obj, k8s, crs, meta, report)

    lint_sets = [("default values", None)] + [
        (str(values.relative_to(ROOT)), yaml.safe_load(values.read_text())) for values in (ONE_NODE, TWO_SITES)
    ]
    check_lint(report, lint_sets)
    check_renders(report, [*lint_sets, ("every optional part on", copy.deepcopy(EVERYTHING))], validate)
    check_files(report, validate)
    check_script_manifests(report, validate)
    check_invalid_examples(report, crs, meta, k8s)
    check_drift(report)

    for n in report.notes:
        print(f"note: {n}")
    print(f"({time.monotonic() - started:.1f} s, Kubernetes {k8s.version} schemas)")
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
