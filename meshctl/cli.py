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
from typing import TYPE_CHECKING, Any, NoReturn

import click

from meshctl.client import ControlError, call
from meshctl.state import StateDir, aliases_in_use, all_meshes, running_meshes
from pods.runloop import run as run_loop

if TYPE_CHECKING:
    from pods.topology import Topology

USAGE_ERROR = 2


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"meshctl: {message}", err=True)
    sys.exit(code)


def _load(file: str, project: str | None = None) -> Topology:
    from pods.topology import TopologyError, load_topology

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
    from pods.replica import PYTHON_ALIASES, pod_ports
    from pods.sidecars import check_sidecars, sidecar_launches

    problems, warnings = check_sidecars(topo)
    for w in warnings:
        click.echo(w, err=True)
    launches = {} if problems else sidecar_launches(topo)
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


def _check_project(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Mesh names become directory names: no paths, no surprises."""
    from meshctl.state import valid_mesh_name

    if value is not None and not valid_mesh_name(value):
        raise click.BadParameter(f"{value!r} is not a mesh name (lower-case letters, digits, '.', '_', '-')")
    return value


project_option = click.option("-p", "--project", callback=_check_project,
                              help="Mesh name (default: the only running mesh).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meshctl")
def main() -> None:
    """meshctl: a service mesh on one host, without containers."""


@main.command(short_help="Check a topology file.")
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check a topology file; print one FILE:LINE line per problem (exit 2 if any)."""
    topo = _load(file)
    _preflight(topo)
    replicas = sum(p.replicas for p in topo.pods.values())
    click.echo(f"{file}: ok (mesh '{topo.name}', {len(topo.pods)} pods, {replicas} replicas)")


prometheus_options = [
    click.option("--prometheus", "with_prometheus", is_flag=True,
                 help="Also run the real Prometheus server as a pod (as a `prometheus:` section would)."),
    click.option("--prometheus-bin", default=None, help="Prometheus binary (default: `prometheus` on PATH)."),
]


def _with_prometheus_options(fn: Any) -> Any:
    for option in reversed(prometheus_options):
        fn = option(fn)
    return fn


def _prepare(file: str, project: str | None, with_prometheus: bool, prometheus_bin: str | None,
             announce: bool) -> Topology:
    """The topology to run: loaded, checked, and with the Prometheus pod added when asked for."""
    from pods.prometheus import with_prometheus as add_prometheus
    from pods.topology import PrometheusSpec

    topo = _load(file, project)
    spec = topo.prometheus
    if spec is None and (with_prometheus or prometheus_bin):
        spec = PrometheusSpec()
    if spec is not None and prometheus_bin:
        spec = replace(spec, bin=prometheus_bin)
    topo = replace(topo, prometheus=None)
    if announce:
        _preflight(topo)
    if spec is None:
        return topo
    if not shutil.which(spec.bin):
        if announce:
            click.echo(f"{topo.path}:{spec.line}: prometheus: '{spec.bin}' not found; install it "
                       "(apt-get install prometheus) or pass --prometheus-bin PATH. Starting the mesh without it.",
                       err=True)
        return topo
    try:
        return add_prometheus(topo, replace(spec, bin=shutil.which(spec.bin) or spec.bin),
                              StateDir.for_mesh(topo.name).root / "prometheus")
    except ValueError as exc:
        click.echo(f"{topo.path}:{spec.line}: prometheus: {exc}", err=True)
        sys.exit(USAGE_ERROR)


@main.command(short_help="Start a mesh (foreground, or -d).")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-d", "--detach", is_flag=True, help="Run in the background; return once every pod is Ready.")
@project_option
@click.option("--wait-timeout", default=60.0, show_default=True, help="Seconds -d waits for readiness.")
@_with_prometheus_options
def up(file: str, detach: bool, project: str | None, wait_timeout: float, with_prometheus: bool,
       prometheus_bin: str | None) -> None:
    """Start the mesh described by FILE (foreground unless -d; Ctrl-C stops it, twice forces)."""
    topo = _prepare(file, project, with_prometheus, prometheus_bin, announce=True)
    state = StateDir.for_mesh(topo.name)
    pid = state.supervisor_alive()
    if pid:
        fail(f"mesh '{topo.name}' is already running (supervisor pid {pid}); `meshctl down -p {topo.name}` first")
    from meshctl.state import acquire_mesh_lock

    try:
        state.create()
    except OSError as exc:
        fail(str(exc))
    lock = acquire_mesh_lock(state)  # held by the supervisor for its whole life
    if lock is None:
        fail(f"mesh '{topo.name}' is already running or starting; `meshctl down -p {topo.name}` first")
    if detach:
        extra = (["--prometheus"] if with_prometheus else []) + (
            ["--prometheus-bin", prometheus_bin] if prometheus_bin else [])
        _up_detached(file, topo, state, wait_timeout, extra, lock)
    else:
        sys.exit(_run_supervisor(topo, state, foreground=True))


def _run_supervisor(topo: Topology, state: StateDir, foreground: bool) -> int:
    from meshctl.supervisor.printer import Printer
    from meshctl.supervisor.supervisor import Supervisor

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

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):  # a closed terminal too
            loop.add_signal_handler(sig, on_signal)
        return await sup.run()

    return run_loop(main_task())


def _up_detached(file: str, topo: Topology, state: StateDir, wait_timeout: float, extra: list[str],
                 lock: int) -> None:
    start = time.monotonic()
    log = open(state.supervisor_log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "supervise", file, "--project", topo.name, *extra],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        pass_fds=(lock,))
    log.close()
    os.close(lock)  # the supervisor holds the lock now
    try:
        _wait_ready(topo, state, proc, start, wait_timeout)
    except KeyboardInterrupt:
        _stop_supervisor(state, proc.pid)
        fail(f"interrupted: mesh '{topo.name}' stopped", 130)


def _wait_ready(topo: Topology, state: StateDir, proc: subprocess.Popen[bytes], start: float,
                wait_timeout: float) -> None:
    deadline = start + wait_timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail_lines(state.supervisor_log, 10)
            fail(f"the supervisor of mesh '{topo.name}' exited ({proc.returncode}):\n" + "\n".join(tail))
        if state.control_socket.exists():
            try:
                status = call(state.control_socket, "GET", "/v1/status?resources=0", timeout=5)
            except ControlError:
                status = None
        if status and status["processes"]:
            procs = status["processes"]
            broken = [p for p in procs if p["state"] in ("crashloop", "exited", "failed")]
            if broken:
                _fail_startup(state, topo, broken[0], proc)
            if all(p["ready"] and p["pid"] and p["state"] == "running" for p in procs):
                _print_ready(topo, status, time.monotonic() - start)
                return
        time.sleep(0.05)
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
            os.kill(pid, signal.SIGKILL)  # its reaper now kills what it leaves; wait for both
            try:
                psutil.Process(pid).wait(5)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
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
@_with_prometheus_options
def supervise(file: str, project: str, with_prometheus: bool, prometheus_bin: str | None) -> None:
    """Run a mesh's supervisor in the background (used by `up -d`)."""
    topo = _prepare(file, project, with_prometheus, prometheus_bin, announce=False)
    state = StateDir.for_mesh(topo.name)
    sys.exit(_run_supervisor(topo, state, foreground=False))


@main.command(short_help="Stop a mesh and everything it started.")
@project_option
@click.option("-t", "--timeout", default=30.0, show_default=True, help="Seconds to wait for the supervisor.")
def down(project: str | None, timeout: float) -> None:
    """Stop a mesh: every process gets SIGTERM, then SIGKILL after its grace period."""
    from meshctl.state import mesh_lock_held
    from meshctl.supervisor.reaper import _marked
    from meshctl.supervisor.supervisor import reap_record

    state = _pick_mesh(project, need_running=False)
    pid = state.supervisor_alive()
    deadline = time.monotonic() + 10
    while not pid and mesh_lock_held(state) and time.monotonic() < deadline:
        time.sleep(0.05)  # an `up` is starting this mesh: wait for its supervisor, then stop it
        pid = state.supervisor_alive()
    clean = True
    if pid:
        clean = _stop_supervisor(state, pid, timeout)
    time.sleep(0 if clean else 1.5)  # after a forced kill, the reaper needs a moment
    left = reap_record(state)
    run_id = (state.read_record() or {}).get("run_id", "")
    survivors = _marked(run_id) if run_id else []
    if survivors:
        fail(f"mesh '{state.mesh}': {len(survivors)} processes survived the stop: "
             + ", ".join(str(p.pid) for p in survivors[:10]))
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


@main.command(short_help="List the mesh's processes.")
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


@main.command(short_help="Restart a pod or a replica.")
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


@main.command(short_help="Print (or follow) a pod's logs.")
@click.argument("name")
@project_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--tail", "tail", type=int, default=None, help="Only the last N lines of each log.")
@click.option("--role", type=click.Choice(["service", "sidecar"]))
def logs(name: str, project: str | None, follow: bool, tail: int | None, role: str | None) -> None:
    """Print the logs of a pod (all its replicas) or a replica."""
    from meshctl.observe.logs import follow_logs, log_files

    state = _pick_mesh(project, need_running=False)
    files = log_files(state, name, role)
    if not files:
        fail(f"no logs for '{name}' in mesh '{state.mesh}'")
    follow_logs(files, tail=tail, follow=follow, prefix=len(files) > 1)


@main.command(short_help="Print the hosts file a pod sees.")
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


def _pod_port(spec: Any, launch: Any) -> int:
    """Where a pod takes traffic on its alias: the sidecar's ingress listener, else the service port."""
    if launch is not None:
        ingress = [p for p in launch.listener_ports if p != launch.egress_port]
        if ingress:
            return ingress[0]
    if spec.service.ready is not None and spec.service.ready.port:
        return spec.service.ready.port
    try:
        return int(spec.service.env.get("SERVICE_PORT", "80") or 80)
    except ValueError:
        return 80


def _resolve_target(target: str, project: str | None,
                    path: str) -> tuple[list[tuple[str, int]], str, str, str]:
    """(addresses, Host header, request path, URL shown) for a URL, a pod (published port, else its
    replicas' ingress) or a replica."""
    import socket
    from urllib.parse import urlsplit

    if "://" in target:
        u = urlsplit(target)
        if u.scheme != "http" or not u.hostname:
            fail(f"only http:// URLs are supported, got {target!r}", USAGE_ERROR)
        port = u.port or 80
        try:
            ips = list(dict.fromkeys(i[4][0] for i in socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)))
        except OSError as exc:
            fail(f"cannot resolve {u.hostname}: {exc}", USAGE_ERROR)
        full_path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if path != "/":
            full_path = path
        return [(ips[0], port)], u.netloc, full_path, f"http://{u.netloc}{full_path}"
    state = _pick_mesh(project)
    status = _status(state)
    pubs = [x for x in status["publish"] if x["pod"] == target]
    if pubs:
        host = pubs[0]["host"]
        ip, _, port = host.rpartition(":")
        return [(ip, int(port))], host, path, f"http://{host}{path}"
    procs = [p for p in status["processes"] if target in (p["pod"], p["replica"]) and p["role"] == "service"]
    if not procs:
        fail(f"no pod or replica named '{target}' in mesh '{state.mesh}'", USAGE_ERROR)
    from pods.sidecars import sidecar_launches
    from pods.topology import load_topology

    topo = load_topology(status["file"])
    pod = procs[0]["pod"]
    launch = sidecar_launches(topo).get(pod)
    port = _pod_port(topo.pods[pod], launch)
    addrs = [(p["ip"], port) for p in procs]
    shown = f"http://{addrs[0][0]}:{port}{path}" + (f" (+{len(addrs) - 1} replicas)" if len(addrs) > 1 else "")
    return addrs, f"{addrs[0][0]}:{port}", path, shown


def _duration_option(value: str | None) -> float | None:
    from pods.durations import parse_duration

    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        fail(f"--duration: {value!r} is not a duration (e.g. 10s, 500ms, 1m)", USAGE_ERROR)
    return seconds


MAX_DURATION_S = 600.0


@main.command(short_help="Send load to a pod, replica or URL.")
@click.argument("target")
@project_option
@click.option("-n", "--n", "n", type=int, default=None, help="Number of requests (default 200 without --duration).")
@click.option("--duration", default=None, help="Send for this long (10s, 1m); with --n, whichever ends first.")
@click.option("-c", "--concurrency", default=10, show_default=True,
              help="Connections. Closed model: each waits for its response; with --rate: the connection cap.")
@click.option("--rate", type=float, default=None,
              help="Open model: total requests per second on a fixed schedule. Latency is measured from each "
                   "request's scheduled send time, so a stalled server shows in the percentiles "
                   "(coordinated omission corrected).")
@click.option("--path", default="/", show_default=True)
@click.option("-m", "--method", default="GET", show_default=True)
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value', repeatable.")
@click.option("-d", "--data", default=None, help="Request body, or @file.")
@click.option("--timeout", default=10.0, show_default=True, help="Per-request timeout, seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the text report.")
@click.option("--no-progress", is_flag=True, help="No progress bar even on a terminal.")
@click.option("--fail-under", type=float, default=None, help="Exit 1 when the success ratio is below this (0-1).")
@click.option("--allow-remote", is_flag=True, help="Allow targets outside 127.0.0.0/8 and ::1.")
@click.option("--workers", type=int, default=None,
              help="Processes sharing the load (default: one per CPU for runs of 10000+ requests or --duration).")
def traffic(target: str, project: str | None, n: int | None, duration: str | None, concurrency: int,
            rate: float | None, path: str, method: str, headers: tuple[str, ...], data: str | None,
            timeout: float, as_json: bool, no_progress: bool, fail_under: float | None, allow_remote: bool,
            workers: int | None) -> None:
    """Send requests to a pod, a replica (a-1) or a URL; report groups, statuses, errors and latency."""
    from meshctl.traffic.engine import LoadSpec
    from meshctl.traffic.report import build_request, run_sync, stderr_is_tty
    from pods.addressing import is_loopback

    seconds = _duration_option(duration)
    if n is None and seconds is None:
        n = 200
    if (n is not None and n < 1) or concurrency < 1 or (rate is not None and rate <= 0) or timeout <= 0:
        fail("--n, --concurrency, --rate and --timeout must be positive", USAGE_ERROR)
    if fail_under is not None and not 0 <= fail_under <= 1:
        fail("--fail-under takes a ratio between 0 and 1", USAGE_ERROR)
    if not path.startswith("/"):
        fail("--path must start with /", USAGE_ERROR)
    hdrs: dict[str, str] = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            fail(f"-H {h!r}: expected 'Name: value'", USAGE_ERROR)
        hdrs[name.strip()] = value.strip()
    body = b""
    if data is not None:
        if data.startswith("@"):
            try:
                body = Path(data[1:]).read_bytes()
            except OSError as exc:
                fail(f"-d {data}: {exc.strerror or exc}", USAGE_ERROR)
        else:
            body = data.encode()
    addrs, host, req_path, shown = _resolve_target(target, project, path)
    if not allow_remote:
        remote = [ip for ip, _ in addrs if not is_loopback(ip)]
        if remote:
            fail(f"refusing to send load to {remote[0]}: only 127.0.0.0/8 and ::1 are allowed "
                 "(--allow-remote to override)", USAGE_ERROR)
    request = build_request(method.upper(), host, req_path, hdrs, body)
    spec = LoadSpec(targets=tuple(addrs), request=request, head=method.upper() == "HEAD", n=n,
                    duration_s=min(seconds or MAX_DURATION_S, MAX_DURATION_S), concurrency=concurrency, rate=rate,
                    timeout_s=timeout)
    from meshctl.traffic.workers import auto_workers

    if workers is not None and workers < 1:
        fail("--workers must be at least 1", USAGE_ERROR)
    report = run_sync(spec, shown, progress=not no_progress and not as_json and stderr_is_tty(),
                      workers=workers or auto_workers(spec))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())
    if fail_under is not None and report.success_ratio < fail_under:
        click.echo(f"meshctl: success ratio {report.success_ratio:.4f} is below --fail-under {fail_under}", err=True)
        sys.exit(1)


@main.command("prometheus-config", short_help="Print the Prometheus scrape config.")
@click.argument("file", type=click.Path(dir_okay=False))
@project_option
def prometheus_config(file: str, project: str | None) -> None:
    """Print the Prometheus scrape config for FILE (the running mesh's, if it is up)."""
    from pods.prometheus import CONFIG_FILE, POD_NAME, scrape_config
    from pods.replica import plan_mesh
    from pods.sidecars import sidecar_launches
    from pods.topology import PrometheusSpec

    topo = _load(file, project)
    state = StateDir.for_mesh(topo.name)
    running = state.root / "prometheus" / CONFIG_FILE
    if state.supervisor_alive() and running.exists():
        click.echo(running.read_text(), nl=False)
        return
    spec = topo.prometheus or PrometheusSpec()
    from pods.prometheus import with_prometheus as add_prometheus

    topo = add_prometheus(replace(topo, prometheus=None), spec, state.root / "prometheus") \
        if POD_NAME not in topo.pods else topo
    plan = plan_mesh(topo, state.hosts, taken=aliases_in_use(exclude=topo.name))
    plan.sidecars = sidecar_launches(topo)
    click.echo(scrape_config(plan), nl=False)


@main.command(short_help="Live golden signals per pod and edge.")
@project_option
@click.option("--window", default="10s", show_default=True, help="Sliding window for rates and percentiles.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between polls.")
@click.option("--once", is_flag=True, help="One snapshot (two polls --interval apart), plain table.")
@click.option("--watch", is_flag=True, help="Not a terminal: print a snapshot every interval.")
@click.option("--count", type=int, default=None, help="With --watch: stop after this many snapshots.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def stats(project: str | None, window: str, interval: float, once: bool, watch: bool, count: int | None,
          output: str) -> None:
    """Live golden signals per pod and per edge (q quits); --once or -o json for scripts."""
    from meshctl.observe.collector import Collector
    from meshctl.observe.view import live
    from meshctl.observe.view import once as run_once
    from meshctl.observe.view import watch as run_watch

    seconds = _duration_option(window)
    if interval <= 0 or (count is not None and count < 1):
        fail("--interval and --count must be positive", USAGE_ERROR)
    state = _pick_mesh(project)
    collector = Collector(state, window_s=seconds or 10.0)
    as_json = output == "json"
    interactive = sys.stdout.isatty() and sys.stdin.isatty() and not as_json
    try:
        if once or (not interactive and not watch):
            asyncio.run(run_once(collector, interval, as_json))
        elif watch:
            asyncio.run(run_watch(collector, interval, as_json, count))
        else:
            asyncio.run(live(collector, interval))
    except (OSError, ControlError) as exc:
        fail(f"cannot read the mesh's stats: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
