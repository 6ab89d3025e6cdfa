#!/usr/bin/env bash
# The test suite: set up once, then pytest. CI tier always; host tier when COMFYUI_DIR names a ComfyUI
# checkout (see README). Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/tools/setup.sh" | tail -n 1)
cd "$root"
exec "$py" -m pytest tests "$@"
