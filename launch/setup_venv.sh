#!/usr/bin/env bash
# Makes a virtual environment and installs sfd_jax into it (this repository, editable) with one extra.
#
#   launch/setup_venv.sh DIR [EXTRA]        e.g.  launch/setup_venv.sh ~/sfd_venv tpu
#
# DIR: the venv to make (an existing one is reused). EXTRA: tpu, cuda12, cuda13, torch or test, several joined by
# commas, or nothing for CPU only. The Python is the first of python3.13, python3.12, python3.11 on PATH, else
# python3 if it is 3.11 or newer, else Python 3.12 from uv (`uv python install 3.12`; uv itself is installed with
# pip, or with its installer from astral.sh, if it is missing). Progress goes to stderr; the last line on stdout
# is the venv's python, so `PYTHON=$(launch/setup_venv.sh DIR tpu)` gives the interpreter to run sfd_jax with.
set -euo pipefail

DIR="${1:?usage: launch/setup_venv.sh DIR [EXTRA]  (EXTRA: tpu, cuda12, cuda13, torch, test, or none)}"
EXTRA="${2:-}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

recent_enough() {  # is the interpreter $1 Python 3.11 or newer?
  local version
  version="$("$1" -c 'import sys; print(*sys.version_info[:2])' 2>/dev/null)" || return 1
  set -- $version
  [ "$1" -gt 3 ] || { [ "$1" -eq 3 ] && [ "$2" -ge 11 ]; }
}

python_from_uv() {  # the path of a Python 3.12 that uv manages (uv installed first if needed)
  local uv
  uv="$(command -v uv || true)"
  if [ -z "$uv" ]; then
    echo "no Python >= 3.11 on PATH: installing uv to get one" >&2
    if ! { command -v python3 >/dev/null && python3 -m pip install -q --user uv >&2; }; then
      curl -LsSf https://astral.sh/uv/install.sh | sh >&2
    fi
    uv="$HOME/.local/bin/uv"
  fi
  "$uv" python install 3.12 >&2
  "$uv" python find 3.12
}

choose_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && recent_enough "$candidate"; then
      command -v "$candidate"
      return
    fi
  done
  python_from_uv
}

PYTHON="$(choose_python)"
echo "making $DIR with $PYTHON ($("$PYTHON" --version 2>&1))" >&2
"$PYTHON" -m venv "$DIR" >&2
"$DIR/bin/python" -m pip install -q -e "$REPO${EXTRA:+[$EXTRA]}" >&2
echo "$DIR/bin/python"
