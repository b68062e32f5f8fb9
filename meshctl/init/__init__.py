"""`meshctl init`: a first topology, either the starter (``starter.py``) or converted from a compose file
(``compose.py``). Both only produce text; the command writes it."""

from __future__ import annotations

import re

#: The file `meshctl init DIR` writes; `up`, `validate` and the printed next steps name it.
TOPOLOGY_FILE = "meshctl.yaml"


def mesh_name(text: str, fallback: str) -> str:
    """``text`` (a directory or compose project name) as a mesh name, which is a directory name under
    MESHCTL_HOME: lowercase, no separators, as compose derives a project name from a directory."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).lstrip("_.-")[:63].rstrip(".")
    return name if name and ".." not in name else fallback
