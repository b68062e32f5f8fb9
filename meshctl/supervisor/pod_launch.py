"""Start one pod process in a private mount namespace whose /etc/hosts is the replica's hosts file.

Run as a script, never imported by the supervisor's event loop: ``python -S -I pod_launch.py PARENT HOSTS
PROGRAM ARGS...``. It asks for SIGKILL at its parent's death (and exits 125 if the parent already died: the
fork raced it), enters new namespaces, binds HOSTS over /etc/hosts, then execs PROGRAM under the same pid.

As a normal user the mount needs a user namespace of its own: the one created here maps only the caller's
own uid and gid (the service sees its real ids, no root inside), and the mounts must be made by this very
process before execve, since capabilities in a new user namespace are dropped when a non-root uid execs.
Standard library only (``-I`` ignores the project's paths): it must start in a few milliseconds.
"""

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1
SIGKILL = 9
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
ORPHANED_EXIT = 125
SETUP_FAILED_EXIT = 126


def _fail(step: str) -> None:
    err = ctypes.get_errno()
    print(f"meshctl: cannot give this pod its own /etc/hosts: {step}: {os.strerror(err)}", file=sys.stderr)
    os._exit(SETUP_FAILED_EXIT)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    parent, hosts, program = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL)
    if os.getppid() != parent:
        os._exit(ORPHANED_EXIT)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if uid != 0 else 0)) != 0:
        _fail("unshare")
    if uid != 0:
        try:
            _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
        except OSError as exc:
            ctypes.set_errno(exc.errno or 0)
            _fail("user namespace id maps")
    # Private first: the bind must not propagate back to the host's mount namespace.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        _fail("make / private")
    if libc.mount(os.fsencode(hosts), b"/etc/hosts", None, MS_BIND, None) != 0:
        _fail(f"bind {hosts} over /etc/hosts")
    try:
        os.execv(program, sys.argv[3:])
    except OSError as exc:
        print(f"meshctl: cannot run {program}: {exc.strerror}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    main()
