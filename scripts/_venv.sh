# shellcheck shell=bash
# Shared by scripts/*: create or reuse .venv and install fluxrig with the given extras.
# The install is skipped when pyproject.toml has not changed since the last one (stamp file),
# so repeated runs start in a second.
VENV="${FLUXRIG_VENV:-$PWD/.venv}"

ensure_venv() {
    local extras="$1"
    local py="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$py" -m venv "$VENV"
    fi
    local stamp="$VENV/.fluxrig-${extras:-base}.stamp"
    local want
    want="$(cat pyproject.toml setup.py engine/*.c | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}"  # "": no extras
        echo "$want" >"$stamp"
    fi
}
