#!/usr/bin/env bash
# One-command set-up for development and CI on a fresh Debian/Ubuntu machine:
#   1. the system libraries headless Qt needs (Xvfb + xcb), when apt-get is available;
#   2. torch 2.13.0 first (so pip does not pull the multi-GB CUDA build as a dependency);
#   3. this package, editable, with its test extra (napari + PyQt6, peft, pytest).
# Run it inside the Python environment you want to use (a venv, conda env or the system Python).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "napari-medplib needs Python 3.11 or later; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=python3.11 (or newer)." >&2
  exit 2
fi

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-xinerama0 libgl1 libegl1 libxkbcommon-x11-0 libdbus-1-3 libfontconfig1"
  missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "== installing system packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
else
  echo "== apt-get not found: install Xvfb and the xcb libraries for headless Qt yourself (or use a desktop)"
fi

echo "== installing torch 2.13.0"
"$PYTHON" -m pip install "torch==2.13.0"
echo "== installing napari-medplib with its test extra"
"$PYTHON" -m pip install -e ".[test]"
echo "== done; try it with: $PYTHON -m napari_medplib demo   and run the tests with: $PYTHON -m pytest"
