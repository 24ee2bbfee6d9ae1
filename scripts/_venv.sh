# Shared by scripts/check and scripts/run-example: create .venv with a Python
# >= 3.11 and install the project with the given extra into it. The install runs again only
# when pyproject.toml (or the extra) changed since the last one, so a second start is quick.
ensure_venv() {
    local extra="$1"
    local python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
        for candidate in python3 python3.11 python3.12 python3.13; do
            if command -v "$candidate" >/dev/null 2>&1 &&
                "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                python="$candidate"
                break
            fi
        done
    fi
    if [[ -z "$python" ]]; then
        echo "error: lifecycle needs Python >= 3.11; install it or set PYTHON=/path/to/python3.11" >&2
        exit 2
    fi
    if [[ ! -x .venv/bin/python ]]; then
        echo "== creating .venv with $("$python" --version)"
        "$python" -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    # What was installed, keyed by the extra and pyproject.toml's content.
    local stamp=".venv/.installed-$extra"
    local wanted
    wanted="$(.venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        echo "== anyio-lifecycle[$extra] is installed in .venv and pyproject.toml is unchanged"
        return
    fi
    echo "== installing anyio-lifecycle[$extra] into .venv (the first time takes a minute; pip shows its progress)"
    local status
    set +e
    .venv/bin/python -m pip install --progress-bar on --editable ".[$extra]" 2>&1 |
        grep -v -e '^Requirement already satisfied' -e "^WARNING: Location '"
    status=${PIPESTATUS[0]}
    set -e
    if [[ $status -ne 0 ]]; then
        echo "error: installing anyio-lifecycle[$extra] failed (pip exited $status); see above" >&2
        exit 1
    fi
    echo "$wanted" >"$stamp"
}
