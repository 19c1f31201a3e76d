#!/usr/bin/env bash
# Install guidellm (a serving-benchmark client) in its own venv: .peers/guidellm (git-ignored),
# so its dependencies never touch the project's. bench/serving.py uses it when it is there.
# Idempotent: does nothing when the venv already runs `guidellm --version`; a half-built venv is rebuilt.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
GUIDELLM_VERSION=0.8.1
TORCH_VERSION=2.13.0

check() {
    "$VENV/bin/guidellm" --version
}

# shellcheck source=bench/peers/peer_venv.sh
source "$ROOT/bench/peers/peer_venv.sh"
peer_venv guidellm check
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.peers/pip-cache}"

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
