"""``python -m meshctl.supervisor supervise --project NAME``: the background supervisor that `up -d` starts.

It reads the plan `up -d` pickled on its stdin and runs it. The same as the hidden ``meshctl supervise``
command, without the command line's imports (click, the control client, the planner's YAML and sidecar
modules): the supervisor starts the pods sooner, and spends less of the CPU they need.
"""

from __future__ import annotations

import sys

USAGE_ERROR = 2


def fail(message: str, code: int = 1) -> None:
    print(f"meshctl: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str]) -> None:
    from pods.names import valid_mesh_name

    if len(argv) != 3 or argv[0] != "supervise" or argv[1] != "--project":
        fail("usage: python -m meshctl.supervisor supervise --project NAME (a plan on stdin)", USAGE_ERROR)
    project = argv[2]
    if not valid_mesh_name(project):
        fail(f"supervise: {project!r} is not a mesh name", USAGE_ERROR)
    from meshctl.lifecycle import MeshError, read_plan, run_supervisor
    from meshctl.state import StateDir

    try:
        plan = read_plan(sys.stdin.buffer)
    except MeshError as err:
        fail(str(err), err.code)
    except Exception as exc:  # noqa: BLE001 - anything unpicklable is a usage error, not a traceback
        fail(f"supervise: cannot read the plan on stdin: {exc}", USAGE_ERROR)
    if plan.mesh != project:
        fail(f"supervise: the plan is for mesh '{plan.mesh}', not '{project}'", USAGE_ERROR)
    sys.exit(run_supervisor(plan, StateDir.for_mesh(project), foreground=False))


if __name__ == "__main__":
    main(sys.argv[1:])
