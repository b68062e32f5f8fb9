"""Issuing a replica's workload certificate into its identity directory, one generation at a time.

Each issue writes a new generation directory (``gen-N/cert.pem``, ``gen-N/key.pem``, the key 0600 from
its creation) and then swaps the replica's ``current`` symlink to it with one ``rename``: a sidecar
reading ``current/cert.pem`` and ``current/key.pem`` sees the old pair or the new pair, never one of
each (both files of a generation exist before the swap). The previous generation is kept until the
next rotation, because a sidecar may still be reading it or holding connections made with it; older
ones are deleted.

Plain, synchronous file work: a P-256 key and a signature take about a millisecond, so the
supervisor calls this on its event loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshctl.identity.ca import IssuedCert, MeshCA
from pods.identity import CERT_FILE, CURRENT, KEY_FILE, IdentityPlan, ReplicaIdentity

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"gen-(\d+)")


@dataclass
class CertState:
    """What one replica holds now: for ``meshctl certs`` and the rotation timer."""

    replica: str
    pod: str
    identity: str
    generation: int
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime
    rotations: int = 0

    def describe(self) -> dict[str, Any]:
        return {"replica": self.replica, "pod": self.pod, "identity": self.identity,
                "serial": format(self.serial, "x"), "generation": self.generation,
                "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
                "issued_at": self.issued_at.isoformat(), "rotations": self.rotations}


def generations(directory: Path) -> list[int]:
    """The generation numbers present in a replica's identity directory, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _GENERATION.fullmatch(n)))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """A file born with ``mode`` (no window where a key is world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def install(ident: ReplicaIdentity, cert: IssuedCert, generation: int) -> None:
    """Write ``cert`` as generation ``generation`` of the replica and make it ``current``."""
    gdir = ident.dir / f"gen-{generation}"
    if gdir.exists():  # a leftover of a crash between mkdir and swap: never current, safe to replace
        shutil.rmtree(gdir)
    gdir.mkdir(mode=0o700, parents=True)
    _write_new(gdir / KEY_FILE, cert.key_pem, 0o600)
    _write_new(gdir / CERT_FILE, cert.cert_pem, 0o644)
    tmp = ident.dir / f".{CURRENT}.{generation}"
    tmp.unlink(missing_ok=True)
    os.symlink(gdir.name, tmp)  # relative: the state dir may be reached through another path
    os.replace(tmp, ident.dir / CURRENT)
    for old in generations(ident.dir):
        if old < generation - 1:
            shutil.rmtree(ident.dir / f"gen-{old}", ignore_errors=True)


class Issuer:
    """The mesh CA signing for the replicas of one plan; remembers what each replica holds."""

    def __init__(self, plan: IdentityPlan, ca: MeshCA) -> None:
        self.plan = plan
        self.ca = ca
        self.state: dict[str, CertState] = {}

    @property
    def lifetime(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.plan.cert_ttl_s)

    def issue(self, replica: str) -> CertState:
        """A fresh certificate for ``replica``, installed as its next generation (raises OSError)."""
        ident = self.plan.replicas[replica]
        ident.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        before = self.state.get(replica)
        # Numbering continues after the previous run's generations: `current` may still point at one.
        generation = (before.generation if before else max(generations(ident.dir), default=0)) + 1
        cert = self.ca.issue(ident.identity.spiffe_id, dns=ident.dns, ips=ident.ips, lifetime=self.lifetime)
        install(ident, cert, generation)
        state = CertState(replica=replica, pod=ident.pod, identity=ident.identity.spiffe_id, generation=generation,
                          serial=cert.serial, not_before=cert.not_before, not_after=cert.not_after,
                          issued_at=dt.datetime.now(dt.UTC),
                          rotations=before.rotations + 1 if before else 0)
        self.state[replica] = state
        log.debug("issued %s generation %d serial %x for %s", replica, generation, cert.serial, state.identity)
        return state

    def rotate_at(self, replica: str) -> dt.datetime:
        """When ``replica``'s certificate is due: at 2/3 of its lifetime, as SPIRE and Istio rotate."""
        s = self.state[replica]
        return s.issued_at + (s.not_after - s.issued_at) * 2 / 3
