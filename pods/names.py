"""Names the user chooses that become paths or host names: one definition each."""

from __future__ import annotations

import re

#: A mesh name is a directory name under MESHCTL_HOME: no separators, no surprises.
_MESH_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def valid_mesh_name(name: str) -> bool:
    return bool(_MESH_NAME.fullmatch(name)) and ".." not in name
