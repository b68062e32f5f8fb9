"""`meshctl init --from compose.yaml`: a docker compose file as a meshctl topology.

Pure: compose text in, topology text and located warnings out (it reads no other file). A compose service
with a ``command`` or ``entrypoint`` becomes a pod running that command as a plain process; a service that
only names an image is written commented out with a ``# TODO`` line, since meshctl runs programs, not images.
Compose keys with no meaning for processes on one host (volumes, networks, build, ...) are one warning each,
``FILE:LINE`` at the key, and a comment in the pod, so that nothing is dropped silently.

The file is read with the topology's own line-tracking loader (``pods.source``), which interpolates values
as it builds the tree. Compose's ``${VAR}`` syntax is ours, so values must stay as written and be
interpolated when the topology is loaded: every ``$`` is doubled first, and the loader's ``$$`` rule gives
the original text back (doubling adds no line, so lines still point into the compose file).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshctl.init import TOPOLOGY_FILE, mesh_name
from pods.addressing import is_ip
from pods.durations import parse_duration
from pods.names import dns_label
from pods.source import Entry, Map, Node, Problem, Report, Scalar, Seq, build, compose, scalar_nodes, to_python

__all__ = ["Conversion", "convert", "convert_file"]

#: compose's depends_on conditions -> the topology's (pods.topology.DEPENDENCY_CONDITIONS).
CONDITIONS = {"service_started": "started", "service_healthy": "ready", "service_completed_successfully": "completed"}
#: compose's restart policies -> the topology's; unless-stopped only differs from always across daemon restarts.
RESTART = {"no": "never", "always": "always", "on-failure": "on-failure", "unless-stopped": "always"}
#: deploy.restart_policy.condition -> the topology's restart.
DEPLOY_RESTART = {"none": "never", "on-failure": "on-failure", "any": "always"}

_HOST_GATEWAY = "host-gateway"
_TAG = "tag:yaml.org,2002:"
#: YAML 1.2 core schema spellings; PyYAML (YAML 1.1) also reads yes/no/on/off, 1:30 and 0755 as these types.
_YAML_1_2 = {
    _TAG + "bool": re.compile(r"true|True|TRUE|false|False|FALSE"),
    # A leading zero is text too: PyYAML would read 0755 as octal 493, where the writer meant the digits.
    _TAG + "int": re.compile(r"[-+]?(0|[1-9][0-9]*)|0x[0-9a-fA-F]+"),
    _TAG + "float": re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|"
                               r"\.(nan|NaN|NAN)"),
}
_TOP_IGNORED = {
    "networks": "every pod is reachable from every other by its name, on its own alias",
    "volumes": "processes use the host's files and directories",
    "secrets": "pass secrets through env or files on the host",
    "configs": "processes read their configuration files on the host",
    "include": "convert the included files one by one",
}
#: Service keys with no meaning for a process on this host, with what to do instead where there is something.
_IGNORED = {
    "build": "meshctl runs programs, it builds no images: build the program, the command runs it from the host",
    "volumes": "processes use the host's files: point paths in the command and env at host directories",
    "networks": "every pod is reachable from every other by its name, on its own alias",
    "network_mode": "every pod has its own alias on the host's loopback",
    "container_name": "the pod is named after the service",
    "hostname": "a pod's name is its host name",
    "env_file": "not read, so its values are not copied into the topology; every process inherits the "
                "environment of `meshctl up` (set -a; . ./.env; set +a), or copy them into env",
    "user": "processes run as the user who runs `meshctl up`",
    "stop_signal": "processes get SIGTERM, then SIGKILL after stop_grace_period",
    "profiles": "every service is converted",
    "logging": "logs go to files under $MESHCTL_HOME (`meshctl logs NAME`)",
    "secrets": "pass secrets through env or files on the host",
    "configs": "processes read their configuration files on the host",
}
_GENERIC = "no meaning for a process on this host"


@dataclass
class Conversion:
    """The topology text, what the user should know about it, and whether the compose file was usable."""

    text: str
    warnings: list[Problem]
    errors: list[Problem]
    pods: list[str]
    #: Services written commented out because they have no command (only an image, or a build).
    todo: list[str]


@dataclass
class _Pod:
    name: str
    compose_name: str
    line: int
    image: str | None = None
    command: list[str] | None = None
    replicas: int | None = None
    depends_on: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (condition, line)
    publish: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    add_hosts: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    inherited: list[str] = field(default_factory=list)  # environment names compose takes from the shell
    ready: list[str] | None = None
    restart: str | None = None
    stop_grace_period: str | None = None
    workdir: str | None = None
    compose_aliases: set[str] = field(default_factory=set)  # add_hosts keeping renamed services' names
    ignored: list[str] = field(default_factory=list)  # compose keys not converted, for a comment
    todos: list[str] = field(default_factory=list)


def convert_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Conversion:
    """Convert the compose file at ``path`` for a topology written into ``out_dir``."""
    compose_path = Path(path)
    text = compose_path.read_text(encoding="utf-8")
    return convert(text, str(path), compose_path.resolve().parent, Path(out_dir).resolve())


def convert(text: str, source: str, compose_dir: Path, out_dir: Path) -> Conversion:
    """Convert compose ``text`` (``source`` names it in messages); relative paths are from ``compose_dir``
    and come out relative to ``out_dir``, where the topology goes."""
    return _Converter(source, compose_dir, out_dir).run(text)


class _Converter:
    """One conversion: the compose tree in, a :class:`_Pod` per service, then the rendered text."""

    def __init__(self, source: str, compose_dir: Path, out_dir: Path) -> None:
        self.source = source
        self.report = Report(source)
        self.compose_dir = compose_dir
        self.out_dir = out_dir

    def warn(self, line: int, message: str) -> None:
        self.report.warning(line, message)

    def result(self, text: str = "", pods: Sequence[_Pod] = ()) -> Conversion:
        problems = self.report.sorted()
        return Conversion(text, [p for p in problems if p.severity == "warning"],
                          [p for p in problems if p.severity == "error"],
                          [p.name for p in pods if p.command], [p.name for p in pods if not p.command])

    # ---- the file

    def run(self, text: str) -> Conversion:
        root = compose(text.replace("$", "$$"), self.report)
        if root is None:
            if not self.report.errors:
                self.report.error(1, "the compose file is empty")
            return self.result()
        _as_yaml_1_2(root)
        tree = build(root, self.report, {}, skip_top_level=lambda key: key.startswith("x-"))
        if not isinstance(tree, Map) or not isinstance(services := tree.get("services"), Map):
            self.report.error(tree.line, "not a compose file: no 'services' mapping at top level")
            return self.result()
        for key, entry in tree.entries.items():
            if key in ("services", "name", "version"):  # version: obsolete in compose itself, says nothing
                continue
            self.warn(entry.key_line, f"{key}: ignored ({_TOP_IGNORED.get(key, _GENERIC)})")
        default_name = mesh_name(self.compose_dir.name, "mesh")
        name_node = tree.get("name")
        name = (mesh_name(str(name_node.value), default_name)
                if isinstance(name_node, Scalar) and name_node.value and "$" not in str(name_node.value)
                else default_name)
        names = self._pod_names(services)
        pods = [self._pod(entry, names[key]) for key, entry in services.entries.items()]
        runnable = {p.compose_name: p for p in pods if p.command}
        for pod in pods:
            self._resolve_references(pod, names, runnable)
        self._keep_compose_names(pods, runnable)
        for pod in pods:
            if not pod.command:
                what = f"only names the image {pod.image}" if pod.image else "has no command"
                self.warn(pod.line, f"services.{pod.compose_name} {what}: meshctl runs programs, not images; "
                                    f"written commented out with a TODO (give pod {pod.name!r} a command)")
        if not runnable:
            self.warn(services.line, "no service has a command, so the topology has no pod yet and will not "
                                     "validate: see the TODO lines")
        return self.result(_render(self.source, name, pods), pods)

    def _pod_names(self, services: Map) -> dict[str, str]:
        """compose name -> pod name: pod names are DNS labels (they are host names in every pod).

        Names that are labels already are kept first, so that converting ``Web`` cannot take ``web``'s name.
        """
        names = {key: key for key in services.entries if dns_label(key)}
        taken = set(names.values())
        for key, entry in services.entries.items():
            if key in names:
                continue
            base = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:63].rstrip("-") or "pod"
            name, n = base, 2
            while name in taken:
                name, n = f"{base[:60]}-{n}", n + 1
            names[key] = name
            taken.add(name)
            kept = "" if key.lower() in taken else f"; every pod still resolves {key!r} to it"
            self.warn(entry.key_line, f"services.{key}: renamed to pod {name!r} (pod names are DNS labels: "
                                      f"lowercase letters, digits and '-'){kept}")
        return {key: names[key] for key in services.entries}  # file order

    # ---- one service

    def _pod(self, entry: Entry, name: str) -> _Pod:
        pod = _Pod(name, entry.key, entry.key_line)
        where = f"services.{entry.key}"
        if not isinstance(entry.value, Map):
            self.warn(entry.key_line, f"{where} is not a mapping: left out")
            return pod
        keys = entry.value.entries
        handlers: dict[str, Callable[[_Pod, Entry, str], None]] = {
            "image": self._image, "environment": self._environment, "ports": self._ports,
            "expose": self._expose, "extra_hosts": self._extra_hosts, "links": self._links,
            "depends_on": self._depends_on, "healthcheck": self._healthcheck, "restart": self._restart,
            "working_dir": self._working_dir, "stop_grace_period": self._stop_grace_period,
            "scale": self._scale, "deploy": self._deploy,
        }
        pod.command = self._command(keys.get("entrypoint"), keys.get("command"), where)
        for key, item in keys.items():
            if key in ("command", "entrypoint"):
                continue
            if key in handlers:
                handlers[key](pod, item, f"{where}.{key}")
            else:
                self.warn(item.key_line, f"{where}.{key}: ignored ({_IGNORED.get(key, _GENERIC)})")
                pod.ignored.append(key)
        if key_entry := keys.get("working_dir"):
            self._workdir_from_volume(pod, keys.get("volumes"), key_entry)
        return pod

    def _command(self, entrypoint: Entry | None, command: Entry | None, where: str) -> list[str] | None:
        """compose runs the entrypoint with the command as its arguments; an image's own are unknown here."""
        words: list[str] = []
        for entry, key in ((entrypoint, "entrypoint"), (command, "command")):
            if entry is None:
                continue
            node = entry.value
            if isinstance(node, Scalar) and isinstance(node.value, str):
                try:
                    words += shlex.split(node.value)
                except ValueError as exc:
                    self.warn(entry.key_line, f"{where}.{key} cannot be split into words ({exc}): left out")
            elif isinstance(node, Seq) and all(isinstance(i, Scalar) and i.value is not None for i in node.items):
                words += [_text(i.value) for i in node.items]  # type: ignore[union-attr]
            elif not (isinstance(node, Scalar) and node.value is None):
                self.warn(entry.key_line, f"{where}.{key} must be a string or a list of strings: left out")
        return words or None

    def _image(self, pod: _Pod, entry: Entry, where: str) -> None:
        value = entry.value.value if isinstance(entry.value, Scalar) else None
        if isinstance(value, str) and value.strip() and not any(c.isspace() for c in value):
            pod.image = value
        else:
            self.warn(entry.key_line, f"{where}: not an image reference: left out")

    def _environment(self, pod: _Pod, entry: Entry, where: str) -> None:
        pairs: list[tuple[str, Any, int]] = []
        node = entry.value
        if isinstance(node, Map):
            pairs = [(k, e.value.value if isinstance(e.value, Scalar) else e.value, e.key_line)
                     for k, e in node.entries.items()]
        elif isinstance(node, Seq):
            for item in node.items:
                if isinstance(item, Scalar) and isinstance(item.value, str):
                    key, eq, value = item.value.partition("=")
                    pairs.append((key, value if eq else None, item.line))
                else:
                    self.warn(item.line, f"{where}: expected KEY=VALUE, got {to_python(item)!r}: left out")
        else:
            self.warn(entry.key_line, f"{where} must be a mapping or a list of KEY=VALUE: left out")
        for key, value, line in pairs:
            key = key.replace("$$", "$")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                self.warn(line, f"{where}: {key!r} is not a variable name a process can be given: left out")
            elif value is None:
                pod.inherited.append(key)  # compose passes the shell's value: every process inherits up's
            elif isinstance(value, Map | Seq):
                self.warn(line, f"{where}.{key} must be a string, number or boolean: left out")
            else:
                pod.env[key] = _text(value)

    def _ports(self, pod: _Pod, entry: Entry, where: str) -> None:
        for item in _items(entry):
            if isinstance(item, Map):  # the long form
                spec = {k: e.value.value for k, e in item.entries.items() if isinstance(e.value, Scalar)}
                target, published = spec.get("target"), spec.get("published")
                host_ip, protocol = spec.get("host_ip"), spec.get("protocol") or "tcp"
                if target is None:
                    self.warn(item.line, f"{where}: a port without 'target': left out")
                    continue
                parts = [str(host_ip)] if host_ip else []
                text = ":".join([*parts, str(published), str(target)]) if published is not None else str(target)
                self._port(pod, f"{text}/{protocol}", item.line, where)
            elif isinstance(item, Scalar) and item.value is not None:
                self._port(pod, _text(item.value), item.line, where)
            else:
                self.warn(item.line, f"{where}: expected a port like \"8080:80\": left out")

    def _port(self, pod: _Pod, text: str, line: int, where: str) -> None:
        """``[IP:][HOST:]CONTAINER[/PROTO]`` -> publish HOST:CONTAINER (ranges expanded), or a declared port."""
        spec, _, protocol = text.partition("/")
        if protocol not in ("", "tcp"):
            self.warn(line, f"{where}: {text!r}: only tcp can be published: left out")
            return
        parts = _split_colons(spec)
        if len(parts) == 1:
            self.warn(line, f"{where}: {text!r} has no host side (compose would pick a random host port): "
                            "not published; declared in the pod's ports for `meshctl export`")
            for port in _expand(parts[0]) or [parts[0]]:
                _add(pod.ports, port)
            return
        host_ip = parts[0].strip("[]") if len(parts) == 3 else ""
        host, container = parts[-2], parts[-1]
        if host_ip and not host_ip.startswith("127.") and "$" not in host_ip:
            self.warn(line, f"{where}: {text!r}: published on 127.0.0.1 instead of {host_ip} (meshctl publishes "
                            "on loopback only)")
            host_ip = ""
        hosts, containers = _expand(host) or [host], _expand(container) or [container]
        if len(hosts) != len(containers):
            self.warn(line, f"{where}: {text!r}: a host range must match the container range: left out")
            return
        for h, c in zip(hosts, containers, strict=True):
            _add(pod.publish, f"{host_ip}:{h}:{c}" if host_ip else f"{h}:{c}")

    def _expose(self, pod: _Pod, entry: Entry, where: str) -> None:
        for item in _items(entry):
            text = _text(item.value) if isinstance(item, Scalar) else ""
            number, _, protocol = text.partition("/")
            ports = _expand(number)
            if not ports or protocol not in ("", "tcp"):
                self.warn(item.line, f"{where}: {text or to_python(item)!r} is not a tcp port: left out")
                continue
            for port in ports:  # compose's tcp is any TCP; ours says "not HTTP", so only an explicit /tcp says it
                _add(pod.ports, f"{port}/tcp" if protocol else port)

    def _extra_hosts(self, pod: _Pod, entry: Entry, where: str) -> None:
        node = entry.value
        pairs: list[tuple[str, str, int]] = []
        if isinstance(node, Map):
            pairs = [(k, _text(e.value.value), e.key_line) for k, e in node.entries.items()
                     if isinstance(e.value, Scalar)]
        else:
            for item in _items(entry):
                text = _text(item.value) if isinstance(item, Scalar) else ""
                sep = "=" if "=" in text else ":"  # "name=ip", or "name:ip" where the ip may be IPv6
                host, found, ip = text.partition(sep)
                if found:
                    pairs.append((host, ip.strip("[]"), item.line))
                else:
                    self.warn(item.line, f"{where}: expected HOST:IP, got {text!r}: left out")
        for host, ip, line in pairs:
            if ip == _HOST_GATEWAY:
                self.warn(line, f"{where}: {host} -> host-gateway is 127.0.0.1 (the host is on loopback here; "
                                "a program listening on 0.0.0.0 or 127.0.0.1 is reachable there)")
                ip = "127.0.0.1"
            pod.add_hosts[host] = ip

    def _links(self, pod: _Pod, entry: Entry, where: str) -> None:
        """``links: [db:database]``: the alias becomes an add_hosts name for the pod (a plain link resolves anyway)."""
        for item in _items(entry):
            service, _, alias = (_text(item.value) if isinstance(item, Scalar) else "").partition(":")
            pod.depends_on.setdefault(service, ("started", item.line))  # compose starts linked services first
            if alias and alias != service:
                pod.add_hosts[alias] = service

    def _depends_on(self, pod: _Pod, entry: Entry, where: str) -> None:
        node = entry.value
        if isinstance(node, Seq):
            for item in node.items:
                if isinstance(item, Scalar) and isinstance(item.value, str):
                    pod.depends_on[item.value] = ("started", item.line)
            return
        if not isinstance(node, Map):
            self.warn(entry.key_line, f"{where} must be a list or a mapping: left out")
            return
        for service, dep in node.entries.items():
            condition = "started"
            if isinstance(dep.value, Map):
                cond = dep.value.get("condition")
                value = cond.value if isinstance(cond, Scalar) else "service_started"
                if value not in CONDITIONS:
                    self.warn(dep.key_line, f"{where}.{service}.condition {value!r} is not one of "
                                            f"{', '.join(CONDITIONS)}: waiting for it to be started")
                condition = CONDITIONS.get(value, "started")
                for key, extra in dep.value.entries.items():
                    if key == "required" and isinstance(extra.value, Scalar) and extra.value.value is False:
                        self.warn(extra.key_line, f"{where}.{service}.required: false is not kept (meshctl "
                                                  "waits for every dependency)")
                    elif key == "restart" and isinstance(extra.value, Scalar) and extra.value.value is True:
                        self.warn(extra.key_line, f"{where}.{service}.restart: true is not kept (a pod is not "
                                                  "restarted when its dependency is)")
            pod.depends_on[service] = (condition, dep.key_line)

    def _healthcheck(self, pod: _Pod, entry: Entry, where: str) -> None:
        """test -> an exec ready probe; compose's timings are not kept (meshctl probes on its own schedule)."""
        node = entry.value
        if not isinstance(node, Map):
            self.warn(entry.key_line, f"{where} must be a mapping: left out")
            return
        disable = node.get("disable")
        test = node.get("test")
        timings = [k for k in node.entries if k not in ("test", "disable")]
        if isinstance(disable, Scalar) and disable.value is True:
            return
        words: list[str] | None = None
        if isinstance(test, Scalar) and isinstance(test.value, str):
            words = ["sh", "-c", test.value]  # a string is CMD-SHELL
        elif isinstance(test, Seq) and test.items and all(isinstance(i, Scalar) for i in test.items):
            items = [_text(i.value) for i in test.items]  # type: ignore[union-attr]
            if items[0] == "NONE":
                return
            if items[0] == "CMD" and len(items) > 1:
                words = items[1:]
            elif items[0] == "CMD-SHELL" and len(items) == 2:
                words = ["sh", "-c", items[1]]
        if words is None:
            line = test.line if test is not None else entry.key_line
            self.warn(line, f"{where}.test: expected [CMD, ...], [CMD-SHELL, \"...\"] or a string (the image's "
                            "own healthcheck is not known here): no readiness probe")
            return
        pod.ready = words
        if timings:
            self.warn(entry.key_line, f"{where}: {', '.join(timings)} not kept (meshctl probes every 50-250 ms "
                                      "until ready, then every 2 s)")

    def _restart(self, pod: _Pod, entry: Entry, where: str) -> None:
        value = entry.value.value if isinstance(entry.value, Scalar) else None
        if value is False:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        policy, _, retries = str(value).partition(":")
        if policy not in RESTART:
            self.warn(entry.key_line, f"{where}: {value!r} is not one of {', '.join(RESTART)}: left out")
            return
        pod.restart = RESTART[policy]
        if retries:
            self.warn(entry.key_line, f"{where}: the limit of {retries} restarts is not kept (meshctl backs off "
                                      "up to 10 s between restarts, without a limit)")

    def _working_dir(self, pod: _Pod, entry: Entry, where: str) -> None:
        value = entry.value.value if isinstance(entry.value, Scalar) else None
        if isinstance(value, str) and value:
            pod.workdir = value

    def _workdir_from_volume(self, pod: _Pod, volumes: Entry | None, working_dir: Entry) -> None:
        """A working_dir inside a bind mount (``./src:/app``) is that host directory: the usual dev compose file.
        Otherwise a container path is kept as written, with a warning when it does not exist here."""
        if pod.workdir is None or "$" in pod.workdir:
            return
        for item in _items(volumes) if volumes is not None else []:
            if isinstance(item, Map):  # the long form: {type: bind, source: ./src, target: /app}
                spec = {k: _text(e.value.value) for k, e in item.entries.items() if isinstance(e.value, Scalar)}
                host, target = spec.get("source", ""), spec.get("target", "")
            else:
                text = _text(item.value) if isinstance(item, Scalar) else ""
                host, _, rest = text.partition(":")
                target = rest.partition(":")[0]
            if not host.startswith((".", "/", "~")) or not target:
                continue  # a named volume: no host directory
            inside = os.path.relpath(pod.workdir, target) if pod.workdir.startswith("/") else ".."
            if inside == "." or not inside.startswith(".."):
                where = self.compose_dir / os.path.expanduser(host) / inside
                pod.workdir = os.path.relpath(os.path.normpath(where), self.out_dir)
                return
        if os.path.isabs(pod.workdir) and not os.path.isdir(pod.workdir):
            self.warn(working_dir.key_line, f"services.{pod.compose_name}.working_dir: {pod.workdir} is a path "
                                            "in the container and does not exist here: set workdir to the host "
                                            "directory the program runs in")

    def _stop_grace_period(self, pod: _Pod, entry: Entry, where: str) -> None:
        value = _text(entry.value.value) if isinstance(entry.value, Scalar) else ""
        if "$" in value or parse_duration(value) is not None:
            pod.stop_grace_period = value
        else:
            self.warn(entry.key_line, f"{where}: {value!r} is not a duration like 10s or 1m30s: left out")

    def _scale(self, pod: _Pod, entry: Entry, where: str) -> None:
        value = entry.value.value if isinstance(entry.value, Scalar) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            pod.replicas = value
        elif value == 0:
            self.warn(entry.key_line, f"{where}: 0 replicas is not a pod: kept at 1")
        else:
            self.warn(entry.key_line, f"{where}: {to_python(entry.value)!r} is not a number of replicas: left out")

    def _deploy(self, pod: _Pod, entry: Entry, where: str) -> None:
        if not isinstance(entry.value, Map):
            return
        for key, item in entry.value.entries.items():
            if key == "replicas":
                self._scale(pod, item, f"{where}.replicas")
            elif key == "restart_policy" and isinstance(item.value, Map) and "condition" in item.value.entries:
                cond = item.value.get("condition")
                value = cond.value if isinstance(cond, Scalar) else None
                if value in DEPLOY_RESTART and pod.restart is None:
                    pod.restart = DEPLOY_RESTART[value]
                others = [k for k in item.value.entries if k != "condition"]
                if others:
                    self.warn(item.key_line, f"{where}.restart_policy: {', '.join(others)} not kept")
            else:
                self.warn(item.key_line, f"{where}.{key}: ignored ({_GENERIC})")
                pod.ignored.append(f"deploy.{key}")

    # ---- between services

    def _resolve_references(self, pod: _Pod, names: dict[str, str], runnable: dict[str, _Pod]) -> None:
        """Dependencies and host aliases name compose services: use the pod names, drop what is no pod."""
        where = f"services.{pod.compose_name}"
        depends: dict[str, tuple[str, int]] = {}
        for service, (condition, line) in pod.depends_on.items():
            if service not in names:
                self.warn(line, f"{where}.depends_on: no service named {service!r}: left out")
            elif service not in runnable:
                pod.todos.append(f"depends_on {names[service]}: {condition} once {names[service]} is a pod")
            else:
                target = runnable[service]
                if condition == "completed" and (target.restart or "never") == "always":
                    self.warn(line, f"{where}.depends_on.{service}: it restarts always, so it never completes: "
                                    "waiting for it to be started instead")
                    condition = "started"
                depends[names[service]] = (condition, line)
        pod.depends_on = depends
        hosts: dict[str, str] = {}
        for host, value in pod.add_hosts.items():
            if value in names:
                if value not in runnable:
                    pod.todos.append(f"add_hosts {host}: {names[value]} once {names[value]} is a pod")
                    continue
                value = names[value]
            elif not is_ip(value) and "$" not in value:
                self.warn(pod.line, f"{where}: extra host {host} -> {value!r} is neither an IP address nor a "
                                    "service: left out")
                continue
            hosts[host] = value
        pod.add_hosts = hosts

    def _keep_compose_names(self, pods: list[_Pod], runnable: dict[str, _Pod]) -> None:
        """A renamed service is still called by its compose name (in URLs, env values): every pod resolves it."""
        # Host names are case-insensitive: an old name that differs from a pod's name only in case cannot be kept.
        taken = {p.name for p in pods}
        renamed = {p.compose_name: p.name for p in runnable.values()
                   if p.compose_name != p.name and p.compose_name.lower() not in taken}
        for pod in runnable.values():
            for old, new in renamed.items():
                if old not in pod.add_hosts:
                    pod.add_hosts[old] = new
                    pod.compose_aliases.add(old)


# --------------------------------------------------------------------------- rendering


def _render(source: str, name: str, pods: list[_Pod]) -> str:
    lines = [
        f"# Converted from {os.path.basename(source)} by `meshctl init --from`: each compose service with a command",
        "# is a pod, a plain process on its own loopback alias 127.0.x.1 that the other pods reach by its name.",
        "# The command is compose's entrypoint + command (an image's own ENTRYPOINT and CMD are not known here);",
        "# ports are published on 127.0.0.1 only; ${VAR} values are kept, meshctl interpolates them as compose",
        "# does. Compose keys meshctl has no use for were reported when this file was written and are listed",
        "# in each pod; services that only name an image are below as TODO, commented out.",
        f"# Next: meshctl validate {TOPOLOGY_FILE} (are the programs on PATH?), then meshctl up {TOPOLOGY_FILE} -d",
        f"name: {name}",
        "pods:",
    ]
    for pod in pods:
        body = _pod_lines(pod)
        if pod.command:
            lines += body
        else:
            lines.append(f"  # TODO: {pod.name} has no command: meshctl runs programs, not images. Install the "
                         "program, then uncomment")
            lines.append("  # this pod and give it the command (e.g. what the image's ENTRYPOINT and CMD run).")
            lines += ["  # " + line[2:] for line in body]
    return "\n".join(lines) + "\n"


def _pod_lines(pod: _Pod) -> list[str]:
    head = f"  {pod.name}:"
    if pod.name != pod.compose_name:
        head += f"  # compose service {pod.compose_name!r}"
    out = [head]
    if pod.ignored:
        out.append(f"    # not converted (see the warnings of `meshctl init`): {', '.join(pod.ignored)}")
    out += [f"    # TODO: {todo}" for todo in pod.todos]
    if pod.image:
        out.append(f"    image: {_flow(pod.image)}")
    if pod.replicas is not None:
        out.append(f"    replicas: {pod.replicas}")
    if pod.depends_on:
        if all(cond == "started" for cond, _ in pod.depends_on.values()):
            out.append(f"    depends_on: {_flow(list(pod.depends_on))}")
        else:
            out.append(f"    depends_on: {_flow({k: c for k, (c, _) in pod.depends_on.items()})}")
    if pod.publish:
        out.append(f"    publish: {_flow(pod.publish)}")
    if pod.ports:
        out.append(f"    ports: {_flow([int(p) if p.isdigit() else p for p in pod.ports])}")
    if pod.add_hosts:
        out.append("    add_hosts:")
        for host, value in pod.add_hosts.items():
            note = "    # the service's compose name" if host in pod.compose_aliases else ""
            out.append(f"      {_flow(host)}: {_flow(value)}{note}")
    out.append("    service:")
    out.append(f"      command: {_flow(pod.command) if pod.command else 'TODO'}")
    if pod.env or pod.inherited:
        out.append("      env:")
        out += [f"        {key}: {_flow(value)}" for key, value in pod.env.items()]
        out += [f"        # {key}: inherited from the environment of `meshctl up`" for key in pod.inherited]
    if pod.ready:
        out.append(f"      ready: {{exec: {_flow(pod.ready)}}}")
    restart = pod.restart or "never"
    out.append(f"      restart: {restart}" + ("" if pod.restart else "                # compose's default (\"no\")"))
    if pod.stop_grace_period:
        out.append(f"      stop_grace_period: {_flow(pod.stop_grace_period)}")
    if pod.workdir:
        out.append(f"      workdir: {_flow(pod.workdir)}")
    return out


# --------------------------------------------------------------------------- values


def _as_yaml_1_2(root: yaml.Node) -> None:
    """Read plain scalars as compose does (YAML 1.2): ``no``/``on`` and ``22:22`` are strings, not PyYAML's
    YAML 1.1 booleans and base-60 numbers, so ``restart: no``, ``DEBUG: yes`` and ``- 22:22`` keep their text."""
    for node in scalar_nodes(root):
        pattern = _YAML_1_2.get(node.tag) if node.style is None else None
        if pattern is not None and not pattern.fullmatch(node.value):
            node.tag = _TAG + "str"


def _flow(value: object) -> str:
    """``value`` as one line of YAML, quoted wherever YAML would read it as something else."""
    if isinstance(value, str) and any(c < " " for c in value):
        return json.dumps(value)  # a JSON string is a double-quoted YAML scalar, on one line
    if isinstance(value, str | int | float | bool):
        return yaml.safe_dump([value], default_flow_style=True, width=1 << 30).strip()[1:-1]
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()


def _text(value: object) -> str:
    """A scalar as the text a process would see (compose stringifies numbers and booleans alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _items(entry: Entry) -> list[Node]:
    return entry.value.items if isinstance(entry.value, Seq) else [entry.value]


def _add(values: list[str], value: str) -> None:
    if value not in values:
        values.append(value)


def _split_colons(text: str) -> list[str]:
    """``IP:HOST:CONTAINER`` split on the colons that are not inside ``${...}`` or an IPv6 ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == ":" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _expand(text: str) -> list[str]:
    """``8080`` or ``8080-8082`` as port numbers; a ``${VAR}`` port as written; [] when it is neither."""
    if "$" in text:
        return [text]
    low, dash, high = text.partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        return []
    first, last = int(low), int(high) if dash else int(low)
    if not 1 <= first <= last <= 65535 or last - first >= 100:
        return []
    return [str(p) for p in range(first, last + 1)]
