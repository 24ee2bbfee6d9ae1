"""The Dockerfile and the Kubernetes manifest agree with the app they ship."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MANIFEST = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))


def instruction(name: str) -> list[str]:
    """The exec-form (JSON) arguments of the Dockerfile's last ``name`` instruction."""
    joined = DOCKERFILE.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.startswith(f"{name} ")]
    assert lines, f"the Dockerfile has no {name}"
    args = lines[-1].removeprefix(f"{name} ").strip()
    if name == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :]
    parsed = json.loads(args)  # exec form, or this raises
    assert isinstance(parsed, list)
    return [str(a) for a in parsed]


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def deployment() -> dict[str, Any]:
    (found,) = [doc for doc in MANIFEST if doc["kind"] == "Deployment"]
    return found  # type: ignore[no-any-return]


def container() -> dict[str, Any]:
    (found,) = deployment()["spec"]["template"]["spec"]["containers"]
    return found  # type: ignore[no-any-return]


def test_dockerfile_runs_uvicorn_directly_as_a_non_root_user() -> None:
    cmd = instruction("CMD")
    assert cmd[0] == "uvicorn"  # exec form: uvicorn is PID 1 and receives SIGTERM itself
    assert "STOPSIGNAL SIGTERM" in DOCKERFILE
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, flags=re.MULTILINE)
    assert "/livez" in " ".join(instruction("HEALTHCHECK"))


def test_termination_grace_period_covers_drain_graceful_and_shutdown() -> None:
    env = {item["name"]: item.get("value") for item in container()["env"]}
    drain_delay = float(env["DRAIN_DELAY"])
    graceful = float(option(instruction("CMD"), "--timeout-graceful-shutdown"))

    # The app's own shutdown budget, read from the app itself.
    from example_app.main import lc

    assert lc.shutdown_timeout is not None
    needed = drain_delay + graceful + lc.shutdown_timeout
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < {needed}"
    assert grace <= needed + 15, "the grace period is far longer than the drain needs"
    assert drain_delay > 0


def test_probes_use_the_library_routes_and_no_prestop_sleep() -> None:
    spec = container()
    assert spec["startupProbe"]["httpGet"]["path"] == "/startupz"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert "lifecycle" not in spec  # no preStop hook at all
    from example_app.main import app

    paths = {getattr(route, "path", None) for route in app.routes}
    assert {"/startupz", "/readyz", "/livez", "/healthz"} <= paths
    (service,) = [doc for doc in MANIFEST if doc["kind"] == "Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_the_image_command_starts_the_app(tmp_path: Path) -> None:
    """Run the Dockerfile's CMD as it is (on loopback and a free port), then its HEALTHCHECK."""
    port = free_port()
    cmd = instruction("CMD")
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    executable = Path(sys.executable).parent / cmd[0]
    env = {**os.environ, "SQLITE_PATH": str(tmp_path / "items.db")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    process = subprocess.Popen(
        [str(executable), *cmd[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the app did not start in 20 s"
                time.sleep(0.1)
        assert response.status_code == 200
        healthcheck = instruction("HEALTHCHECK")
        script = healthcheck[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        assert subprocess.run([sys.executable, "-c", script], timeout=10).returncode == 0
    finally:
        process.terminate()
        process.communicate(timeout=20)


def pod_spec() -> dict[str, Any]:
    return deployment()["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_a_request_admitted_at_the_last_moment_fits_the_graceful_window() -> None:
    # The app keeps accepting until the drain delay ends; a request admitted then may run for
    # the deadline middleware's max_timeout, and uvicorn waits --timeout-graceful-shutdown for
    # it. Measured from SIGTERM: drain_delay + max_timeout <= drain_delay + graceful.
    import lifecycle
    from example_app.main import app

    [deadline] = [m for m in app.user_middleware if m.cls is lifecycle.DeadlineMiddleware]
    max_timeout = float(deadline.kwargs["max_timeout"])
    env = {item["name"]: item.get("value") for item in container()["env"]}
    drain_delay = float(env["DRAIN_DELAY"])
    graceful = float(option(instruction("CMD"), "--timeout-graceful-shutdown"))
    assert drain_delay + max_timeout <= drain_delay + graceful, (
        f"a request admitted {drain_delay}s after SIGTERM may run {max_timeout}s, but uvicorn "
        f"stops waiting {graceful}s after the drain delay; raise --timeout-graceful-shutdown "
        f"or lower max_timeout"
    )


def test_the_image_runs_the_python_the_tests_run_on() -> None:
    [base] = re.findall(r"^FROM python:(\d+)\.(\d+)-slim$", DOCKERFILE, flags=re.MULTILINE)
    assert tuple(map(int, base)) == sys.version_info[:2], (
        f"the Dockerfile builds on Python {'.'.join(base)}, the tests run on "
        f"{sys.version_info.major}.{sys.version_info.minor}"
    )


def test_the_image_tag_is_pinned_to_the_project_version() -> None:
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container()["image"] == f"lifecycle-example:{version}"


def test_the_pod_meets_the_restricted_pod_security_profile() -> None:
    """The "restricted" Pod Security Standard's rules, as the admission controller applies them.

    https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted
    """
    pod = pod_spec()
    pod_context = pod.get("securityContext", {})
    assert pod_context.get("runAsNonRoot") is True
    assert pod_context.get("runAsUser", 1) != 0
    assert pod_context.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    allowed_volumes = {"emptyDir", "configMap", "secret", "projected", "persistentVolumeClaim"}
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= allowed_volumes, volume
    for spec in pod["containers"]:
        context = spec["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert not context.get("privileged", False)
        assert context["capabilities"]["drop"] == ["ALL"]
        assert set(context["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert context.get("runAsUser", 1) != 0
        assert not any("hostPort" in port for port in spec.get("ports", []))
        # Beyond "restricted": a read-only root, with emptyDirs where the app writes.
        assert context["readOnlyRootFilesystem"] is True
        mounts = {mount["mountPath"] for mount in spec["volumeMounts"]}
        sqlite_dir = re.search(r"SQLITE_PATH=(\S+)/[^/\s]+", DOCKERFILE)
        assert sqlite_dir is not None
        assert {sqlite_dir.group(1), "/tmp"} <= mounts
