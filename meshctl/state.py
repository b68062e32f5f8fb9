"""The state directory of a mesh: logs, hosts files, pid records, control socket.

Everything a later ``meshctl`` command (or a later ``up`` after a crash) needs
to find the mesh lives here, so the CLI stays stateless. Records are written
atomically (tmp + rename): a reader never sees half a file, even if the
supervisor is killed mid-write.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pods.atomic_file import write_atomic
from pods.names import valid_mesh_name

HOME_ENV = "MESHCTL_HOME"
#: AF_UNIX paths are limited to 108 bytes on Linux.
MAX_SOCKET_PATH = 107


def meshctl_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".meshctl")


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1), mode=0o600, durable=True)


def process_alive(pid: int, create_time: float) -> bool:
    """True when ``pid`` still is the process we started (pid reuse is checked via create time)."""
    import psutil  # imported here: most CLI commands never need it, and it costs start-up time

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass(frozen=True, order=True)
class StateDir:
    root: Path

    @classmethod
    def for_mesh(cls, mesh: str) -> StateDir:
        if not valid_mesh_name(mesh):
            raise ValueError(f"{mesh!r} is not a mesh name")
        return cls(meshctl_home() / mesh)

    @property
    def mesh(self) -> str:
        return self.root.name

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def hosts(self) -> Path:
        return self.root / "hosts"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def record_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def log_path(self, replica: str, role: str) -> Path:
        return self.logs / f"{replica}.{role}.log"

    def create(self) -> None:
        """Make the directory private: it holds the control socket and logs."""
        for d in (self.root, self.logs, self.hosts):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if len(str(self.control_socket)) > MAX_SOCKET_PATH:
            raise OSError(f"state dir path too long for a unix socket: {self.control_socket} "
                          f"(set {HOME_ENV} to a shorter directory)")

    def read_record(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return None

    def write_record(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_file, record)

    def supervisor_alive(self) -> int | None:
        """The pid of this mesh's live supervisor, or None."""
        rec = self.read_record()
        if not rec or "supervisor" not in rec:
            return None
        sup = rec["supervisor"]
        if process_alive(sup["pid"], sup["create_time"]):
            return sup["pid"]
        return None




def mesh_lock_held(state: StateDir) -> bool:
    """True while some process (a supervisor, or an `up` handing over to one) holds the mesh's lock."""
    try:
        fd = os.open(state.lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def acquire_mesh_lock(state: StateDir) -> int | None:
    """An fd holding the mesh's exclusive lock, or None when another process has it.

    flock locks belong to the open file description, so a supervisor that
    inherits this fd keeps the mesh locked for as long as it lives.
    """
    fd = os.open(state.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def all_meshes() -> list[StateDir]:
    home = meshctl_home()
    if not home.is_dir():
        return []
    return sorted(StateDir(d) for d in home.iterdir() if d.is_dir() and valid_mesh_name(d.name)
                  and (d / "state.json").exists())


def running_meshes() -> list[StateDir]:
    return [s for s in all_meshes() if s.supervisor_alive()]


def aliases_by_mesh() -> dict[str, frozenset[str]]:
    """The aliases each running mesh (under this MESHCTL_HOME) holds."""
    return {s.mesh: frozenset((s.read_record() or {}).get("aliases", [])) for s in running_meshes()}


def listening_aliases() -> frozenset[str]:
    """Loopback addresses with listening sockets: meshes under another MESHCTL_HOME, or any other program.

    Asked of the kernel's sock_diag (listening sockets only, as `ss -lt`): psutil's net_connections parsed the
    whole TCP table, TIME_WAIT included (30 ms of `up` on a machine that had just run a benchmark)."""
    from meshctl.supervisor.listen_table import listen_table

    try:
        table = listen_table()
    except OSError:
        return frozenset()
    return frozenset(ip for ip, _ in table.values() if ip.startswith("127."))
