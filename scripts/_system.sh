# Shared by scripts/check: the system programs some tests run for real (HAProxy in front of
# replicas, a Prometheus server scraping the app), from Debian's packages. Installed only when
# missing, and only where apt-get can run (as root, or with passwordless sudo); elsewhere the
# tests that need them skip with the reason, and fail under CI=true.
ensure_system_programs() {
    local missing=()
    local program package
    for pair in "haproxy:haproxy" "prometheus:prometheus" "promtool:prometheus"; do
        program="${pair%%:*}"
        package="${pair#*:}"
        if ! command -v "$program" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$program" ]]; then
            [[ " ${missing[*]} " == *" $package "* ]] || missing+=("$package")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return
    fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "== not installing ${missing[*]} (needs root); the tests that run them will skip"
            return
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "== no apt-get: install ${missing[*]} yourself; the tests that run them will skip"
        return
    fi
    echo "== installing ${missing[*]} from Debian's packages"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null ||
        { "${sudo[@]}" apt-get update -q >/dev/null &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                --no-install-recommends "${missing[@]}" >/dev/null; }
}
