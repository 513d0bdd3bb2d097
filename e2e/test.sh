#!/usr/bin/env bash
# Cairn's test command: the Helm chart and manifests, the shell scripts,
# format check, clippy with warnings denied, every test of the workspace
# (unit, crash-consistency, property, process-level).
set -euo pipefail
cd "$(dirname "$0")/.."

# The chart and manifest checks run in a Python venv of pinned PyPI packages
# (Helm's engine, the Kubernetes API schemas, shellcheck); deploy/venv.sh
# makes it, and .ci/run calls that first.
venv="${CAIRN_DEPLOY_VENV:-/var/tmp/cairn-deploy-venv}"
if [[ ! -x "$venv/bin/python" || ! -x "$venv/bin/shellcheck" ]]; then
  echo "missing the Python venv $venv that checks the Helm chart, the manifests and the shell scripts." >&2
  echo "create it (pinned packages from PyPI, deploy/requirements.txt) with:  deploy/venv.sh" >&2
  exit 1
fi
if [[ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$(sha256sum deploy/requirements.txt | cut -d' ' -f1)" ]]; then
  echo "the venv $venv predates deploy/requirements.txt: bring it up to date with:  deploy/venv.sh" >&2
  exit 1
fi
echo "== helm lint/template, manifests against the API schemas and CRDs, generated files (deploy/validate.py)"
"$venv/bin/python" deploy/validate.py
echo "== shell scripts (bash -n, shellcheck)"
scripts=(.ci/run e2e/test.sh e2e/kind/run.sh deploy/venv.sh)
for s in "${scripts[@]}"; do
  bash -n "$s"
done
"$venv/bin/shellcheck" "${scripts[@]}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
