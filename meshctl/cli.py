"""The ``meshctl`` command line.

Commands talk to a running mesh through its control socket; everything else
they need (logs, hosts files, records) is in the mesh's state directory.
Usage errors exit 2 with one line per problem, runtime failures exit 1; no
command shows a traceback for a mistake of the user's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import click

from meshctl.control import ControlError, call
from meshctl.state import StateDir, aliases_in_use, all_meshes, running_meshes
from pods.topology import Topology, TopologyError, load_topology

USAGE_ERROR = 2


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"meshctl: {message}", err=True)
    sys.exit(code)


def _load(file: str, project: str | None = None) -> Topology:
    try:
        topo = load_topology(file)
    except TopologyError as err:
        for problem in err.problems:
            click.echo(str(problem), err=True)
        sys.exit(USAGE_ERROR)
    for warning in topo.warnings:
        click.echo(str(warning), err=True)
    if project:
        topo = replace(topo, name=project)
    return topo


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


CAP_NET_BIND_SERVICE = 10


def _can_bind_privileged() -> bool:
    """Root is not enough (capabilities can be dropped) and not needed (the capability is)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _preflight(topo: Topology) -> None:
    """Problems we can see before starting anything: missing programs, privileged ports."""
    from meshctl.sidecars import check_sidecars
    from pods.replica import PYTHON_ALIASES, pod_ports

    problems, warnings = check_sidecars(topo)
    for w in warnings:
        click.echo(w, err=True)
    launches = {} if problems else sidecar_launches_preview(topo)
    limit = _unprivileged_port_start()
    root = _can_bind_privileged()
    for pod in topo.pods.values():
        prog = pod.service.command[0] if pod.service.command else ""
        if prog and prog not in PYTHON_ALIASES and "${" not in prog:
            found = shutil.which(prog, path=os.environ.get("PATH")) if "/" not in prog else (
                str(pod.service.workdir / prog) if os.access(pod.service.workdir / prog, os.X_OK) else None)
            if not found:
                problems.append(f"{topo.path}:{pod.service.command_line}: pod '{pod.name}': command "
                                f"'{prog}' not found on PATH")
        if not root:
            ports = set(pod_ports(pod))
            if pod.name in launches:
                lp = launches[pod.name]
                ports.update((p, pod.sidecar_line) for p in (*lp.listener_ports, lp.admin_port) if p)
            for port, line in sorted(ports):
                if port < limit:
                    problems.append(
                        f"{topo.path}:{line}: pod '{pod.name}' uses port {port}, which needs root here "
                        f"(unprivileged ports start at {limit}); run as root or choose ports >= {limit}")
                    break
    if problems:
        for p in problems:
            click.echo(p, err=True)
        sys.exit(USAGE_ERROR)


def sidecar_launches_preview(topo: Topology) -> dict[str, Any]:
    """Sidecar ports without writing anything (validate must not touch the state dir)."""
    import tempfile

    from meshctl.sidecars import sidecar_launches

    with tempfile.TemporaryDirectory() as tmp:
        return sidecar_launches(topo, Path(tmp))


def _pick_mesh(project: str | None, need_running: bool = True) -> StateDir:
    if project:
        state = StateDir.for_mesh(project)
        if need_running and not state.supervisor_alive():
            known = ", ".join(s.mesh for s in running_meshes()) or "none"
            fail(f"mesh '{project}' is not running (running: {known})")
        if not state.root.exists():
            fail(f"no mesh named '{project}'")
        return state
    pool = running_meshes() if need_running else (running_meshes() or all_meshes())
    if not pool:
        fail("no mesh is running (start one with `meshctl up FILE`)")
    if len(pool) > 1:
        fail("several meshes are running: " + ", ".join(s.mesh for s in pool) + "; pick one with -p NAME")
    return pool[0]


def _status(state: StateDir) -> dict[str, Any]:
    try:
        return call(state.control_socket, "GET", "/v1/status")
    except ControlError as exc:
        fail(str(exc))


project_option = click.option("-p", "--project", help="Mesh name (default: the only running mesh).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meshctl")
def main() -> None:
    """meshctl: a service mesh on one host, without containers."""


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check a topology file; print one FILE:LINE line per problem (exit 2 if any)."""
    topo = _load(file)
    _preflight(topo)
    replicas = sum(p.replicas for p in topo.pods.values())
    click.echo(f"{file}: ok (mesh '{topo.name}', {len(topo.pods)} pods, {replicas} replicas)")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-d", "--detach", is_flag=True, help="Run in the background; return once every pod is Ready.")
@project_option
@click.option("--wait-timeout", default=60.0, show_default=True, help="Seconds -d waits for readiness.")
def up(file: str, detach: bool, project: str | None, wait_timeout: float) -> None:
    """Start the mesh described by FILE (foreground unless -d; Ctrl-C stops it, twice forces)."""
    topo = _load(file, project)
    _preflight(topo)
    state = StateDir.for_mesh(topo.name)
    pid = state.supervisor_alive()
    if pid:
        fail(f"mesh '{topo.name}' is already running (supervisor pid {pid}); `meshctl down -p {topo.name}` first")
    try:
        state.create()
    except OSError as exc:
        fail(str(exc))
    if detach:
        _up_detached(file, topo, state, wait_timeout)
    else:
        sys.exit(_run_supervisor(topo, state, foreground=True))


def _run_supervisor(topo: Topology, state: StateDir, foreground: bool) -> int:
    from meshctl.printer import Printer
    from meshctl.supervisor import Supervisor

    sup = Supervisor(topo, state, Printer() if foreground else None)

    async def main_task() -> int:
        loop = asyncio.get_running_loop()
        presses = 0

        def on_signal() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                sup.request_stop()
            else:
                sup.force_now()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await sup.run()

    try:
        import uvloop

        return uvloop.run(main_task())
    except ImportError:
        return asyncio.run(main_task())


def _up_detached(file: str, topo: Topology, state: StateDir, wait_timeout: float) -> None:
    start = time.monotonic()
    log = open(state.supervisor_log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "supervise", file, "--project", topo.name],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    log.close()
    deadline = start + wait_timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail_lines(state.supervisor_log, 10)
            fail(f"the supervisor of mesh '{topo.name}' exited ({proc.returncode}):\n" + "\n".join(tail))
        if state.control_socket.exists():
            try:
                status = call(state.control_socket, "GET", "/v1/status", timeout=5)
            except ControlError:
                status = None
        if status and status["processes"]:
            procs = status["processes"]
            broken = [p for p in procs if p["state"] in ("crashloop", "exited", "failed")]
            if broken:
                _fail_startup(state, topo, broken[0], proc)
            if all(p["ready"] for p in procs):
                _print_ready(topo, status, time.monotonic() - start)
                return
        time.sleep(0.03)
    not_ready = [p for p in (status or {}).get("processes", []) if not p["ready"]]
    if not_ready:
        _fail_startup(state, topo, not_ready[0], proc, timed_out=wait_timeout)
    _stop_supervisor(state, proc.pid)
    fail(f"mesh '{topo.name}' did not start within {wait_timeout:g}s")


def _fail_startup(state: StateDir, topo: Topology, bad: dict[str, Any], proc: subprocess.Popen[bytes],
                  timed_out: float | None = None) -> NoReturn:
    key = f"{bad['replica']}/{bad['role']}"
    why = (f"not ready after {timed_out:g}s" if timed_out else
           f"{bad['state']}" + (f", last exit {bad['last_exit']}" if bad.get("last_exit") is not None else ""))
    if bad.get("error"):
        why += f": {bad['error']}"
    click.echo(f"meshctl: {key} failed to get ready ({why}); last log lines:", err=True)
    for line in _tail_lines(state.log_path(bad["replica"], bad["role"]), 15):
        click.echo(f"  {key} | {line}", err=True)
    _stop_supervisor(state, proc.pid)
    click.echo(f"meshctl: mesh '{topo.name}' stopped; logs kept in {state.logs}", err=True)
    sys.exit(1)


def _print_ready(topo: Topology, status: dict[str, Any], elapsed: float) -> None:
    click.echo(f"mesh '{topo.name}' ready in {elapsed:.2f}s")
    for p in status["processes"]:
        pubs = [f"{x['host']}->{x['pod_port']}" for x in status["publish"] if x["pod"] == p["pod"]]
        extra = f"  published {', '.join(pubs)}" if pubs else ""
        click.echo(f"  {p['replica']:<12} {p['ip']:<15} {p['role']:<8} pid {p['pid']}{extra}")


def _stop_supervisor(state: StateDir, pid: int | None, timeout: float = 30.0) -> bool:
    """Ask the supervisor to stop; SIGTERM it if it does not answer; wait for it."""
    import psutil

    try:
        call(state.control_socket, "POST", "/v1/down", timeout=5)
    except ControlError:
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    if pid:
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            return False
    return True


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]


@main.command(hidden=True)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--project", required=True)
def supervise(file: str, project: str) -> None:
    """Run a mesh's supervisor in the background (used by `up -d`)."""
    topo = _load(file, project)
    state = StateDir.for_mesh(topo.name)
    sys.exit(_run_supervisor(topo, state, foreground=False))


@main.command()
@project_option
@click.option("-t", "--timeout", default=30.0, show_default=True, help="Seconds to wait for the supervisor.")
def down(project: str | None, timeout: float) -> None:
    """Stop a mesh: every process gets SIGTERM, then SIGKILL after its grace period."""
    from meshctl.supervisor import reap_record

    state = _pick_mesh(project, need_running=False)
    pid = state.supervisor_alive()
    if pid:
        _stop_supervisor(state, pid, timeout)
    left = reap_record(state)
    extra = f" (cleaned up {left} leftover processes)" if left else ""
    click.echo(f"mesh '{state.mesh}' is down{extra}")


def _fmt_uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024 / 1024:.1f}M"


@main.command()
@project_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def ps(project: str | None, output: str) -> None:
    """List the mesh's processes: state, readiness, restarts, CPU and memory."""
    state = _pick_mesh(project)
    status = _status(state)
    if output == "json":
        keys = ("pod", "replica", "ip", "role", "pid", "state", "ready", "restarts", "last_exit",
                "uptime_s", "cpu_percent", "rss_bytes")
        click.echo(json.dumps({
            "mesh": status["mesh"], "supervisor": {"pid": status["supervisor"]["pid"]},
            "processes": [{k: p[k] for k in keys} for p in status["processes"]],
        }, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mesh {status['mesh']} (supervisor pid {status['supervisor']['pid']})",
                  box=None, header_style="bold")
    for col in ("POD", "REPLICA", "IP", "PROCESS", "PID", "STATE", "READY", "RESTARTS", "UPTIME", "CPU %",
                "RSS"):
        table.add_column(col, justify="right" if col in ("PID", "RESTARTS", "CPU %", "RSS") else "left")
    for p in status["processes"]:
        st = p["state"]
        if st in ("crashloop", "exited", "failed", "backoff") and p["last_exit"] is not None:
            st = f"[red]{st} (exit {p['last_exit']})[/red]"
        table.add_row(p["pod"], p["replica"], p["ip"], p["role"], str(p["pid"] or "-"), st,
                      "yes" if p["ready"] else "[yellow]no[/yellow]", str(p["restarts"]),
                      _fmt_uptime(p["uptime_s"]),
                      "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.1f}", _fmt_bytes(p["rss_bytes"]))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@main.command()
@click.argument("name")
@project_option
@click.option("--role", type=click.Choice(["service", "sidecar"]), help="Only this process of each replica.")
def restart(name: str, project: str | None, role: str | None) -> None:
    """Restart a pod (all its replicas) or one replica."""
    state = _pick_mesh(project)
    url = f"/v1/restart/{name}" + (f"?role={role}" if role else "")
    try:
        result = call(state.control_socket, "POST", url, timeout=120)
    except ControlError as exc:
        fail(str(exc))
    click.echo("restarted " + ", ".join(result["restarted"]))


@main.command()
@click.argument("name")
@project_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--tail", "tail", type=int, default=None, help="Only the last N lines of each log.")
@click.option("--role", type=click.Choice(["service", "sidecar"]))
def logs(name: str, project: str | None, follow: bool, tail: int | None, role: str | None) -> None:
    """Print the logs of a pod (all its replicas) or a replica."""
    from meshctl.logview import follow_logs, log_files

    state = _pick_mesh(project, need_running=False)
    files = log_files(state, name, role)
    if not files:
        fail(f"no logs for '{name}' in mesh '{state.mesh}'")
    follow_logs(files, tail=tail, follow=follow, prefix=len(files) > 1)


@main.command()
@click.argument("name")
@project_option
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False),
              help="Compute from a topology file instead of a running mesh.")
def hosts(name: str, project: str | None, file: str | None) -> None:
    """Print the hosts file a pod (or replica) sees: /etc/hosts format."""
    if file:
        from pods.replica import plan_mesh

        topo = _load(file, project)
        plan = plan_mesh(topo, StateDir.for_mesh(topo.name).hosts, taken=aliases_in_use(exclude=topo.name))
        reps = plan.find(name)
        if not reps:
            fail(f"no pod or replica named '{name}' in {file}", USAGE_ERROR)
        click.echo("\n".join(plan.hosts_text(r) for r in reps), nl=False)
        return
    state = _pick_mesh(project)
    status = _status(state)
    reps = sorted({p["replica"] for p in status["processes"] if name in (p["pod"], p["replica"])})
    if not reps:
        fail(f"no pod or replica named '{name}' in mesh '{state.mesh}'", USAGE_ERROR)
    for r in reps:
        click.echo((state.hosts / f"{r}.hosts").read_text(), nl=False)


def _target_url(target: str, project: str | None, path: str) -> str:
    if "://" in target:
        return target
    state = _pick_mesh(project)
    status = _status(state)
    pubs = [x for x in status["publish"] if x["pod"] == target]
    if pubs:
        host = pubs[0]["host"]
        return f"http://{host}{path}"
    procs = [p for p in status["processes"] if target in (p["pod"], p["replica"])]
    if not procs:
        fail(f"no pod or replica named '{target}' in mesh '{state.mesh}'", USAGE_ERROR)
    topo = load_topology(status["file"])
    spec = topo.pods[procs[0]["pod"]]
    port = (spec.service.ready.port if spec.service.ready and spec.service.ready.port else None) or \
        int(spec.service.env.get("SERVICE_PORT", "80") or 80)
    return f"http://{procs[0]['ip']}:{port}{path}"


@main.command()
@click.argument("target")
@project_option
@click.option("-n", "--n", "n", default=200, show_default=True, help="Number of requests.")
@click.option("-c", "--concurrency", default=10, show_default=True)
@click.option("--path", default="/", show_default=True)
@click.option("--timeout", default=10.0, show_default=True, help="Per-request timeout, seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the text report.")
def traffic(target: str, project: str | None, n: int, concurrency: int, path: str, timeout: float,
            as_json: bool) -> None:
    """Send requests to a pod (its published port, else its alias) or a URL; group the answers."""
    from urllib.parse import urlsplit

    from meshctl.traffic import run
    from pods.replica import is_loopback

    if n < 1 or concurrency < 1:
        fail("--n and --concurrency must be at least 1", USAGE_ERROR)
    url = _target_url(target, project, path)
    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        fail(f"refusing to send load to {host}: only 127.0.0.0/8 and ::1 are allowed", USAGE_ERROR)
    report = asyncio.run(run(url, n, concurrency, timeout))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())


if __name__ == "__main__":
    main()
