#!/usr/bin/env bash
# Installs everything kpscale needs on a fresh Debian/Ubuntu machine with Python >= 3.11:
# ffmpeg (torchcodec links against it), libosmesa6 (MuJoCo rendering on CPU), curl (the local
# cluster's health checks), chromium (screenshots of the MLflow UI), and a virtual environment
# .venv with kpscale and its pinned stack. Re-running it is cheap: it skips what
# is already there and reinstalls Python packages only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
dpkg -s libosmesa6 >/dev/null 2>&1 || missing+=(libosmesa6)
command -v curl >/dev/null || missing+=(curl)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]} with apt-get"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: kpscale needs Python >= 3.11; $("$python" --version) found (set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.kpscale-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing kpscale and its Python dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
