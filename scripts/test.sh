#!/usr/bin/env bash
# Installs everything the test suite needs (Python venv, pip packages, Debian chromium/espeak-ng)
# and runs the whole suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)  # the Realtime browser test bundles OpenAI's JS SDK
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" python3-venv >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
# Ray for cluster mode (cluster/, tests/test_cluster.py); the single-host server never imports it
.venv/bin/pip install -q -r requirements-cluster.txt
# @openai/agents-realtime for tests/test_realtime_browser.py, into the git-ignored .cache/realtime-js (skipped
# when the pinned versions are there already)
.venv/bin/python -m tests.realtime_js_bundle >/dev/null

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
