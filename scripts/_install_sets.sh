# Sourced by scripts/check: build the sdist and wheel once, check them, then install the
# wheel into clean venvs (.venvs/<set>, rebuilt when pyproject.toml changes) and run the
# focused suite of tests/install/ in each, from that directory, so that the tests import the
# installed wheel and not the source tree. Each venv holds its install set plus pytest and
# pytest-timeout, nothing else. Prints a table at the end.
UV=.venv/bin/uv
RESULTS=()

build_dists() {
    echo "== build sdist and wheel (the wheel is built from the sdist)"
    rm -rf dist
    "$UV" build --quiet --out-dir dist .
    .venv/bin/twine check --strict dist/*
    .venv/bin/python - <<'PY'
import sys, zipfile
from pathlib import Path
[wheel] = Path("dist").glob("*.whl")
names = zipfile.ZipFile(wheel).namelist()
if "lifecycle/py.typed" not in names:
    sys.exit(f"error: {wheel.name} lacks lifecycle/py.typed")
print(f"{wheel.name}: {len(names)} files, lifecycle/py.typed included")
PY
}

# install_set NAME SPEC SUITE [lowest]: the wheel with SPEC (e.g. "" or "[trio]") in
# .venvs/NAME; with "lowest", the core dependencies at the lowest versions their bounds allow.
install_set() {
    local name="$1" spec="$2" suite="$3" venv=".venvs/$1" start status
    local -a resolution=()
    if [[ "${4:-}" == lowest ]]; then
        # lowest-direct lowers direct requirements only: name the core dependencies directly.
        mapfile -t resolution < <(.venv/bin/python -c 'import tomllib
print("--resolution=lowest-direct")
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
    fi
    start=$SECONDS
    local wheel stamp
    wheel="$(ls dist/*.whl)"
    stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]]; then
        rm -rf "$venv"
        "$UV" venv --quiet --python "$(.venv/bin/python -c 'import sys; print(sys.executable)')" "$venv"
        "$UV" pip install --quiet --python "$venv/bin/python" "${resolution[@]}" "$wheel$spec" \
            "pytest>=8.2" "pytest-timeout>=2.3"
        echo "$stamp" >"$venv/.stamp"
    fi
    # The source changes between runs: always reinstall this run's wheel, its deps stay.
    "$UV" pip install --quiet --python "$venv/bin/python" --reinstall-package anyio-lifecycle \
        --no-deps "$wheel"
    echo "== install set $name: anyio-lifecycle$spec, pytest tests/install/$suite"
    status=pass
    (cd tests/install && INSTALL_SET="$name" "../../$venv/bin/python" -m pytest -q "$suite") || status=FAIL
    RESULTS+=("$name|wheel$spec${4:+ ($4)}: tests/install/$suite|$status|$((SECONDS - start))")
}

print_table() {
    printf '\n%-10s %-45s %-6s %s\n' "set" "what ran" "result" "seconds"
    local row failed=0
    for row in "${RESULTS[@]}"; do
        IFS='|' read -r name what status secs <<<"$row"
        printf '%-10s %-45s %-6s %s\n' "$name" "$what" "$status" "$secs"
        [[ "$status" == pass ]] || failed=1
    done
    return "$failed"
}

# editable_set: an editable install (the source tree) with mypy, type-checking a user's app.
editable_set() {
    local venv=".venvs/editable" start=$SECONDS status stamp
    stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]]; then
        rm -rf "$venv"
        "$UV" venv --quiet --python "$(.venv/bin/python -c 'import sys; print(sys.executable)')" "$venv"
        "$UV" pip install --quiet --python "$venv/bin/python" --editable . "mypy>=1.11" \
            "pyright>=1.1.380" "pytest>=8.2" "pytest-timeout>=2.3"
        echo "$stamp" >"$venv/.stamp"
    fi
    echo "== install set editable: pip install -e ., mypy and pyright on a user's app"
    status=pass
    (cd tests/install && "../../$venv/bin/python" -m pytest -q test_editable.py) || status=FAIL
    RESULTS+=("editable|-e . + mypy, pyright: tests/install/test_editable.py|$status|$((SECONDS - start))")
}

# deploy_checks: the Kubernetes manifest against the API schema (kubernetes-validate) and
# a policy checker (checkov), both from PyPI, in a venv of their own. Both run offline:
# kubernetes-validate ships its schemas, and checkov's --skip-download keeps it from asking
# its vendor's servers for guidelines. Each rule deploy/checkov.yaml skips says why.
deploy_checks() {
    local venv=".venvs/deploy" start=$SECONDS status=pass want="kubernetes-validate>=1.31 checkov>=3.2"
    if [[ ! -x "$venv/bin/checkov" || "$(cat "$venv/.stamp" 2>/dev/null)" != "$want" ]]; then
        rm -rf "$venv"
        "$UV" venv --quiet --python "$(.venv/bin/python -c 'import sys; print(sys.executable)')" "$venv"
        # shellcheck disable=SC2086
        "$UV" pip install --quiet --python "$venv/bin/python" $want
        echo "$want" >"$venv/.stamp"
    fi
    echo "== deploy: kubernetes-validate and checkov on deploy/kubernetes.yaml"
    "$venv/bin/kubernetes-validate" --strict deploy/kubernetes.yaml || status=FAIL
    "$venv/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
        --config-file deploy/checkov.yaml -f deploy/kubernetes.yaml || status=FAIL
    RESULTS+=("deploy|kubernetes-validate + checkov: deploy/|$status|$((SECONDS - start))")
}
