# Shared by scripts/check and scripts/run-example: create .venv with a Python
# >= 3.11 and install the project with the given extra into it.
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
    echo "== installing lifecycle[$extra] into .venv"
    .venv/bin/python -m pip install --quiet --editable ".[$extra]"
}
