"""`meshctl doctor`: real runs of the command on this host, and on hosts made worse on purpose (a /proc without
entries, a PATH without the tools, a tiny open-file limit, a dropped capability)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl import doctor, lifecycle
from meshctl.cli import main
from tests.conftest import ROOT

NAMES = ["python", "linux", "loopback-aliases", "open-files", "processes", "user", "privileged-ports", "pod-hosts",
         "prometheus", "envoy", "node", "chromium", "kubernetes-validate", "curl", "openssl"]
CORE = {"python", "linux", "loopback-aliases", "open-files", "processes"}
APT_TOOLS = {"prometheus": "prometheus", "node": "nodejs", "chromium": "chromium", "curl": "curl",
             "openssl": "openssl"}
BINARIES = {"prometheus": ["prometheus"], "node": ["node", "nodejs"],
            "chromium": ["chromium", "chromium-browser", "google-chrome"], "curl": ["curl"], "openssl": ["openssl"]}


def run(*args: str, env: dict[str, str] | None = None, nofile: int | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess; ``nofile``: its soft open-file limit, as a shell's `ulimit -n` would set."""
    def lower_nofile() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    return subprocess.run([*prefix, sys.executable, "-m", "meshctl", "doctor", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, preexec_fn=lower_nofile,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def by_name(answer: dict) -> dict[str, dict]:
    return {c["name"]: c for c in answer["checks"]}


def test_json_on_this_machine_tells_the_truth():
    res = run("-o", "json")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    answer = json.loads(res.stdout)
    assert set(answer) == {"core_ok", "checks"} and answer["core_ok"] is True
    assert [c["name"] for c in answer["checks"]] == NAMES
    for c in answer["checks"]:
        assert set(c) == {"name", "status", "found", "enables", "fix", "core"}, c
        assert c["status"] in ("ok", "warn", "fail", "unknown") and c["enables"], c
        assert c["core"] == (c["name"] in CORE)
        assert c["status"] != "ok" or c["fix"] is None, c
    checks = by_name(answer)
    assert all(checks[name]["status"] == "ok" for name in CORE)
    v = sys.version_info
    assert checks["python"]["found"] == f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    assert os.uname().release in checks["linux"]["found"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert checks["open-files"]["found"].startswith(f"ulimit -n {soft} ")
    if os.geteuid() == 0:
        assert checks["user"]["found"] == "root"
    else:
        assert checks["user"]["found"].endswith(f"(uid {os.geteuid()}), not root")
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert f"ip_unprivileged_port_start {start}" in checks["privileged-ports"]["found"]
    with socket.socket() as s:  # what privileged-ports claims, tried: port 80 on an alias
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.255.254.1", 80))
            can_bind_80 = True
        except PermissionError:
            can_bind_80 = False
        except OSError:  # in use: the privilege was there
            can_bind_80 = True
    assert (checks["privileged-ports"]["status"] == "ok") == can_bind_80
    for name, package in APT_TOOLS.items():
        on_path = [found for binary in BINARIES[name] if (found := shutil.which(binary))]
        if on_path:
            assert checks[name]["status"] == "ok" and checks[name]["found"] == on_path[0]
        else:
            assert checks[name]["status"] == "warn" and checks[name]["fix"].endswith(f"apt-get install {package}")


def test_table_has_a_line_per_check_and_the_core_verdict():
    res = run()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name in NAMES:
        assert any(line.split()[1:2] == [name] for line in lines if line.strip()), name
    assert lines[-1] == "core: ok (python, linux, loopback-aliases, open-files, processes)"


def test_a_path_without_the_tools_gives_warnings_with_their_install_commands(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "prometheus"  # one tool present: found where PATH says, not where the host has it
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    res = run("-o", "json", env={"PATH": str(bin_dir)})
    assert res.returncode == 0, res.stderr  # optional pieces never fail the core
    checks = by_name(json.loads(res.stdout))
    assert checks["prometheus"]["status"] == "ok" and checks["prometheus"]["found"] == str(fake)
    for name, package in APT_TOOLS.items():
        if name == "prometheus":
            continue
        assert checks[name]["status"] == "warn", checks[name]
        assert checks[name]["found"].startswith("not on PATH")
        assert checks[name]["fix"] in (f"apt-get install {package}", f"sudo apt-get install {package}")
    table = run(env={"PATH": str(bin_dir)})
    assert table.returncode == 0
    line = next(line for line in table.stdout.splitlines() if " curl " in line)
    assert line.split()[0] == "warn" and "apt-get install curl" in line


def test_a_tiny_open_file_limit_fails_the_core():
    res = run("-o", "json", nofile=100)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    answer = json.loads(res.stdout)
    assert answer["core_ok"] is False
    check = by_name(answer)["open-files"]
    assert check["status"] == "fail" and check["found"].startswith("ulimit -n 100 ")
    assert check["fix"] == "ulimit -n 4096"  # the hard limit allows it here
    table = run(nofile=100)
    assert table.returncode == 1 and table.stdout.splitlines()[-1] == "core: 1 problem (open-files)"
    warned = run("-o", "json", nofile=1000)  # low, not too low: a warning, the core still works
    assert warned.returncode == 0
    assert by_name(json.loads(warned.stdout))["open-files"]["status"] == "warn"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="drops a capability it must hold")
def test_without_the_capability_port_80_is_a_warning_with_the_sysctl():
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80:
        pytest.skip("ip_unprivileged_port_start <= 80: port 80 needs no capability here")
    res = run("-o", "json", prefix=("setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"))
    assert res.returncode == 0, res.stderr
    check = by_name(json.loads(res.stdout))["privileged-ports"]
    assert check["status"] == "warn" and check["found"].startswith("no CAP_NET_BIND_SERVICE")
    assert check["fix"] == "sysctl -w net.ipv4.ip_unprivileged_port_start=80"


def test_a_host_without_proc_entries_reports_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(lifecycle, "PROC_ROOT", tmp_path / "no-proc")
    res = CliRunner().invoke(main, ["doctor", "-o", "json"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 0, res.output  # nothing core is read from /proc
    checks = by_name(json.loads(res.output))
    assert checks["privileged-ports"]["status"] == "unknown"
    assert checks["privileged-ports"]["found"] == "capabilities unknown; ip_unprivileged_port_start unknown"
    assert "unprivileged user namespaces: unknown" in checks["pod-hosts"]["found"]
    table = CliRunner().invoke(main, ["doctor"])
    assert table.exit_code == 0 and "unknown" in table.output


def test_read_proc_returns_none_for_whatever_cannot_be_read(tmp_path: Path):
    assert lifecycle.read_proc("sys/net/ipv4/ip_unprivileged_port_start", tmp_path / "missing") is None
    (tmp_path / "sys").mkdir()
    assert lifecycle.read_proc("sys", tmp_path) is None  # a directory: an OSError too
    assert lifecycle.read_proc("version") is not None  # the real /proc


def fake_proc(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, status, fix", [
    ({"sys/net/ipv4/ip_unprivileged_port_start": "80\n", "self/status": "CapEff:\t0000000000000000\n"}, "ok", None),
    ({"sys/net/ipv4/ip_unprivileged_port_start": "1024\n", "self/status": "CapEff:\t0000000000000400\n"}, "ok", None),
    ({"sys/net/ipv4/ip_unprivileged_port_start": "1024\n", "self/status": "CapEff:\t0000000000000000\n"}, "warn",
     "sysctl -w net.ipv4.ip_unprivileged_port_start=80"),
    ({"sys/net/ipv4/ip_unprivileged_port_start": "garbage\n", "self/status": "CapEff:\tzz\n"}, "unknown", None),
    ({"self/status": "CapEff:\t0000000000000000\n"}, "unknown", None),
])
def test_privileged_ports_from_a_fake_proc(tmp_path: Path, files: dict[str, str], status: str, fix: str | None):
    check = doctor.privileged_ports(doctor.Host(proc_root=fake_proc(tmp_path, files)))
    assert check.status == status, check
    assert check.fix is None if fix is None else check.fix.endswith(fix)


@pytest.mark.parametrize("files, summary, fix", [
    ({"sys/user/max_user_namespaces": "15000\n"}, "unprivileged user namespaces: on", None),
    ({"sys/user/max_user_namespaces": "15000\n", "sys/kernel/unprivileged_userns_clone": "0\n"},
     "off (kernel.unprivileged_userns_clone=0, user.max_user_namespaces=15000)",
     "sysctl -w kernel.unprivileged_userns_clone=1"),
    ({"sys/kernel/apparmor_restrict_unprivileged_userns": "1\n", "sys/user/max_user_namespaces": "15000\n"},
     "off (kernel.apparmor_restrict_unprivileged_userns=1", "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ({"sys/user/max_user_namespaces": "0\n"}, "off (user.max_user_namespaces=0)",
     "sysctl -w user.max_user_namespaces=15000"),
    ({}, "unprivileged user namespaces: unknown", None),
])
def test_user_namespace_switches(tmp_path: Path, files: dict[str, str], summary: str, fix: str | None):
    found, got_fix = doctor.user_namespaces(doctor.Host(proc_root=fake_proc(tmp_path, files)))
    assert summary in found
    assert got_fix is None if fix is None else got_fix.endswith(fix)


def test_a_check_that_raises_is_one_unknown_line_and_a_failing_core_check_fails_the_core():
    def exploding(host: doctor.Host) -> doctor.Check:
        raise RuntimeError("boom")

    def broken_core(host: doctor.Host) -> doctor.Check:
        return doctor.Check("broken-core", doctor.FAIL, "nothing works", "everything", "fix-it", core=True)

    checks = doctor.run_checks(doctor.Host(), [doctor.python, exploding, broken_core])
    assert [(c.name, c.status) for c in checks] == [("python", "ok"), ("exploding", "unknown"),
                                                    ("broken-core", "fail")]
    assert "boom" in checks[1].found
    answer = doctor.to_json(checks)
    assert answer["core_ok"] is False
    assert doctor.summary(checks) == "core: 1 problem (broken-core)"


def test_every_check_is_named_after_its_function():
    """A check that raises is reported under its function's name: keep the two the same."""
    assert [fn.__name__.replace("_", "-") for fn in doctor.CHECKS] == NAMES
    assert [fn.__name__.replace("_", "-") for fn in doctor.CORE_CHECKS] == [n for n in NAMES if n in CORE]
