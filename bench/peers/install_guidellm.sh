#!/usr/bin/env bash
# Install guidellm (a serving-benchmark client) in its own venv: .peers/guidellm (git-ignored),
# so its dependencies never touch the project's. bench/serving.py uses it when it is there.
# Idempotent: does nothing when the venv already runs `guidellm --version`; a half-built venv is rebuilt.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
VENV="$ROOT/.peers/guidellm"
PY="$VENV/bin/python"
GUIDELLM_VERSION=0.8.1
TORCH_VERSION=2.13.0

check() {
    "$VENV/bin/guidellm" --version
}

if [ -x "$VENV/bin/guidellm" ] && check >/dev/null 2>&1; then
    echo "guidellm peer already installed: $(check 2>/dev/null | tail -1)"
    exit 0
fi

if [ -d "$VENV" ]; then
    echo "removing incomplete venv $VENV"
    rm -rf "$VENV"
fi

BASE_PY=python3.11
if [ -x "$ROOT/.venv/bin/python" ]; then
    BASE_PY=$(readlink -f "$ROOT/.venv/bin/python")
fi
mkdir -p "$ROOT/.peers"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.peers/pip-cache}"
"$BASE_PY" -m venv "$VENV"

# guidellm requires torch; the CPU build (pip's find-links, /opt/wheels) keeps the CUDA one out.
CONSTRAINTS="$ROOT/.peers/guidellm-constraints.txt"
echo "torch==${TORCH_VERSION}+cpu" >"$CONSTRAINTS"

"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==${TORCH_VERSION}+cpu"
"$PY" -m pip install --quiet -c "$CONSTRAINTS" "guidellm==${GUIDELLM_VERSION}"

if ! out=$(check 2>&1); then
    echo "$out" >&2
    echo "ERROR: guidellm installed into $VENV but 'guidellm --version' fails (see above)." >&2
    exit 1
fi
echo "$out" | tail -1
echo "guidellm peer ready: $VENV/bin/guidellm"
