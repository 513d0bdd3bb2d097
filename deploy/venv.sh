#!/usr/bin/env bash
# Creates (or brings up to date) the Python virtual environment that
# deploy/render.py and deploy/validate.py run in, from the pinned
# deploy/requirements.txt. Idempotent: does nothing when the environment
# already has exactly these requirements.
#
#   deploy/venv.sh                 # then: /var/tmp/cairn-deploy-venv/bin/python deploy/validate.py
#   CAIRN_DEPLOY_VENV=DIR deploy/venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CAIRN_DEPLOY_VENV:-/var/tmp/cairn-deploy-venv}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum deploy/requirements.txt | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "deploy venv $venv is up to date"
  exit 0
fi
echo "creating the deploy venv in $venv (pinned: deploy/requirements.txt)"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r deploy/requirements.txt
echo "$want" > "$stamp"
