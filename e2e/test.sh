#!/usr/bin/env bash
# Cairn's test command: format check, clippy with warnings denied, every test
# of the workspace (unit, crash-consistency, property, process-level).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
