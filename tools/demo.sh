#!/usr/bin/env bash
# The main job: set up once, then run the standalone demo (arguments are passed through).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/tools/setup.sh" | tail -n 1)
exec "$py" "$root/tools/demo.py" "$@"
