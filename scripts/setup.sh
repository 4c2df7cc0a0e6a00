#!/usr/bin/env bash
# Creates .venv with the locked dependencies (uv.lock) and the project installed editable.
#
#   scripts/setup.sh          # the pipeline (CPU extra)
#   scripts/setup.sh --dev    # plus the test tools
#   scripts/setup.sh --gpu    # a CUDA worker: Unsloth and the versions it pins instead of the CPU extra
#
# The lock is exported and installed with pip rather than `uv sync`: pip takes torch from a local
# wheelhouse where the machine has one (these development machines do), uv always downloads its ~3 GB.
# With bandwidth to spare, `uv sync --extra cpu --group dev` gives the same environment.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=cpu; groups=()
for arg in "$@"; do
  case "$arg" in
    --dev) groups+=(--group dev) ;;
    --gpu) extra=gpu ;;
    *) echo "usage: scripts/setup.sh [--dev] [--gpu]" >&2; exit 2 ;;
  esac
done

python=""
for candidate in python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$candidate; break
  fi
done
[ -n "$python" ] || { echo "error: Python 3.11 or newer is needed" >&2; exit 1; }
# Prefer 3.11 where its torch wheels lie on local disk.
if command -v python3.11 >/dev/null && ls /opt/wheels/torch-*cp311* >/dev/null 2>&1; then python=python3.11; fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 'uv==0.13.9'
.venv/bin/uv export --frozen --no-hashes --no-emit-project --extra "$extra" "${groups[@]}" -o .venv/requirements.txt -q
.venv/bin/python -m pip install -q -r .venv/requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "ready: .venv/bin/mathwizard --help"
