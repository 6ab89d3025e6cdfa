#!/usr/bin/env bash
# Finds the real ComfyUI(s) the host test tier runs against and prints one line per host:
#     <release>\t<ComfyUI folder>\t<its Python>
# Progress goes to stderr. Nothing is printed when no host is found (the host tier then skips, except in CI,
# where a skip fails the run). The first of these that applies wins:
#   1. COMFYUI_DIR (a ComfyUI checkout) with COMFYUI_PYTHON, else its venv/ or .venv/;
#   2. the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<this pack>), with the same Python rules
#      (plus the Windows portable build's python_embeded/);
#   3. every ComfyUI-<version>.tar.gz in VAE_LAB_COMFYUI_ARCHIVES (default: ../shared/comfyui beside the repo),
#      unpacked and set up once under VAE_LAB_HOST_CACHE (default: ~/.cache/vae_lab/hosts/<version>) with the
#      constraints-<version>.txt beside it; reused while the archive, the constraints and requirements.txt are
#      unchanged (idempotent, like tools/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

release_of() {  # comfyui_version.py holds __version__ = "0.8.0" in every release since 0.3
  sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -n 1
}

python_of() {
  local dir=$1
  if [ -n "${COMFYUI_PYTHON:-}" ]; then echo "$COMFYUI_PYTHON"; return; fi
  for candidate in "$dir/venv/bin/python" "$dir/.venv/bin/python" "$dir/../python_embeded/python.exe"; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "hosts: no Python for the ComfyUI in $dir: set COMFYUI_PYTHON or create $dir/venv" >&2
  exit 2
}

emit() {  # <ComfyUI folder> [its Python]
  local dir py release
  dir=$(cd "$1" && pwd)
  py=${2:-$(python_of "$dir")}
  release=$(release_of "$dir")
  printf '%s\t%s\t%s\n' "${release:-unknown}" "$dir" "$py"
}

if [ -n "${COMFYUI_DIR:-}" ]; then
  if [ ! -f "$COMFYUI_DIR/main.py" ]; then
    echo "hosts: COMFYUI_DIR=$COMFYUI_DIR is not a ComfyUI folder (no main.py)" >&2
    exit 2
  fi
  emit "$COMFYUI_DIR"
  exit 0
fi

parent=$(dirname "$root")
if [ "$(basename "$parent")" = custom_nodes ] && [ -f "$parent/../main.py" ]; then
  emit "$parent/.."
  exit 0
fi

archives=${VAE_LAB_COMFYUI_ARCHIVES:-$(dirname "$root")/shared/comfyui}
cache=${VAE_LAB_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vae_lab/hosts}
shopt -s nullglob
for archive in "$archives"/ComfyUI-*.tar.gz; do
  version=$(basename "$archive" .tar.gz)
  version=${version#ComfyUI-}
  constraints=$archives/constraints-$version.txt
  home=$cache/$version
  want=$(cat "$archive" "$constraints" "$root/requirements.txt" 2>/dev/null | sha256sum | cut -c1-16)
  if [ ! -f "$home/.ready-$want" ]; then
    echo "hosts: setting up ComfyUI $version in $home (once; a few minutes)" >&2
    rm -rf "$home"
    mkdir -p "$home"
    tar xzf "$archive" -C "$home"
    python3 -m venv "$home/venv" >&2
    grep -v -E '^(torch|torchvision|torchaudio)([^A-Za-z0-9_-].*)?$' "$home/ComfyUI/requirements.txt" > "$home/requirements-core.txt"
    cons=()
    [ -f "$constraints" ] && cons=(-c "$constraints")
    # This machine's pip config warns about each missing local wheel folder: noise, dropped.
    "$home/venv/bin/python" -m pip install --disable-pip-version-check -q "${cons[@]}" torch torchvision \
      -r "$home/requirements-core.txt" -r "$root/requirements.txt" requests 2>&1 \
      | { grep -v '^WARNING: Location' || true; } >&2
    touch "$home/.ready-$want"
  fi
  emit "$home/ComfyUI" "$home/venv/bin/python"
done
