#!/usr/bin/env bash
# Idempotent set-up shared by the demo and the test commands.
#
# Picks a Python, makes sure it can run VAE Lab and its tests, and prints that Python's path as the
# last line of stdout. Nothing is reinstalled while the requirement files are unchanged.
#
#   VAE_LAB_PYTHON=/path/to/python   use an existing interpreter (e.g. ComfyUI's venv) instead of .venv
#   VAE_LAB_VENV=/path/to/venv       where to create the project venv (default: <repo>/.venv)
#
# torch is only installed when the chosen Python has none, and then as the build this project is
# tested with (torch==2.14.1 torchvision==0.29.1); an existing torch is never replaced.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -n "${VAE_LAB_PYTHON:-}" ]; then
  py=$VAE_LAB_PYTHON
  stamp_dir=$root/.cache
else
  venv=${VAE_LAB_VENV:-$root/.venv}
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    python3 -m venv "$venv" >&2
  fi
  py=$venv/bin/python
  stamp_dir=$venv
fi

want=$( { "$py" -c 'import sys; print(sys.executable)'; cat "$root/requirements.txt" "$root/tests/requirements.txt"; } | sha256sum | cut -c1-16)
stamp=$stamp_dir/.vae-lab-setup-$want
if [ -f "$stamp" ]; then
  echo "$py"
  exit 0
fi

# pip's progress goes to stderr so stdout carries only the chosen Python; this machine's pip config
# points at local wheel folders and warns about each missing one, which is noise here.
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2; }
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1 (several GB, once)" >&2
  pip_install torch==2.14.1 torchvision==0.29.1
elif ! "$py" -c 'import torchvision' 2>/dev/null; then
  # lpips needs torchvision; match it to the torch that is already there rather than replacing torch.
  tv=$("$py" - <<'PY'
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print(f"0.{minor + 15}.*" if major == 2 else "")
PY
)
  echo "setup: installing torchvision${tv:+==$tv} to match the existing torch" >&2
  pip_install "torchvision${tv:+==$tv}"
fi
echo "setup: installing requirements" >&2
pip_install -r "$root/requirements.txt" -r "$root/tests/requirements.txt"
mkdir -p "$stamp_dir"
rm -f "$stamp_dir"/.vae-lab-setup-*
touch "$stamp"
echo "$py"
