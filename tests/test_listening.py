"""Listening sockets of pod processes, and the warning for a wildcard bind (0.0.0.0 / ::).

Addresses: 127.0.181.1 - 127.0.184.1 only; ports are the kernel's free picks.
"""

from __future__ import annotations

import os
import socket

from meshctl.client import call
from meshctl.supervisor import listening
from meshctl.supervisor.listening import Target, format_address, scan
from tests.conftest import free_port, wait_for


def test_addresses_decode_and_format_as_ip_port():
    assert listening._decode("0100007F:0050", socket.AF_INET) == ("127.0.0.1", 80)
    assert listening._decode("00000000000000000000000000000000:1F40", socket.AF_INET6) == ("::", 8000)
    assert listening._decode("00000000000000000000000001000000:1F40", socket.AF_INET6) == ("::1", 8000)
    assert format_address("::", 8000) == "[::]:8000"
    assert format_address("127.0.2.1", 80) == "127.0.2.1:80"


def test_scan_finds_this_process_listening_and_ignores_a_connected_socket():
    ip = "127.0.184.1"
    with socket.socket() as server, socket.socket() as client:
        server.bind((ip, 0))
        server.listen()
        client.connect(server.getsockname())  # ESTABLISHED, not LISTEN: not reported
        me = Target("me-0/service", os.getpid(), ip)
        assert scan([me]) == {me: [(ip, server.getsockname()[1])]}


def test_the_kernels_children_lists_and_the_process_table_agree():
    """A few targets' descendants come from /proc/PID/task/TID/children, many from one process-table pass."""
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               "kids = [subprocess.Popen(['sleep', '60']) for _ in range(2)]; sys.stdin.read(); "
                               "[k.kill() for k in kids]"], stdin=subprocess.PIPE)
    try:
        assert wait_for(lambda: len(listening._tree(parent.pid, listening.children_map())) == 3, 10)
        if listening._has_children_files():
            assert (sorted(listening._tree(parent.pid, listening.KernelChildren()))
                    == sorted(listening._tree(parent.pid, listening.children_map())))
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(10)


def test_sock_diag_and_the_proc_fallback_agree():
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.184.1", 0))
        v4.listen()
        try:
            v6.bind(("::1", 0))
            v6.listen()
        except OSError:  # a host without IPv6: the IPv4 half still compares both readers
            pass
        mine = listening.socket_inodes(os.getpid())  # other tests open and close listeners meanwhile

        def ours(table):
            return {inode: addr for inode, addr in table.items() if inode in mine}

        found = ours(listening._listen_table_netlink())
        assert ("127.0.184.1", v4.getsockname()[1]) in found.values()
        assert found == ours(listening._listen_table_proc())


def test_wildcard_bind_warns_in_ps_up_and_the_log_and_a_pod_ip_bind_does_not(meshctl):
    wild_port = free_port("0.0.0.0")  # free on every address: the wildcard pod takes it on all of them
    good_port, child_port = free_port("127.0.182.1"), free_port("127.0.183.1")
    spawn_child = (f"import subprocess, sys; subprocess.run([sys.executable, '-m', 'http.server', "
                   f"'--bind', '127.0.183.1', '{child_port}'])")
    # http.server's default bind is 0.0.0.0 (or :: where the host has IPv6): the mistake most frameworks make.
    topo = meshctl.write("lst.yaml", f"""
        name: lst
        pods:
          wild:
            ip: 127.0.181.1
            service:
              command: [python, -m, http.server, "{wild_port}"]
              ready: {{tcp: {wild_port}}}
          good:
            ip: 127.0.182.1
            service:
              command: [python, -m, http.server, --bind, "${{POD_IP}}", "{good_port}"]
              ready: {{tcp: {good_port}}}
          parent:
            ip: 127.0.183.1
            service:
              # the listener is a child: descendants count as the pod process's own
              command: [python, -c, "{spawn_child}"]
              ready: {{tcp: {child_port}}}
    """)
    up = meshctl.up(topo, "lst")

    wild_addrs = (f"0.0.0.0:{wild_port}", f"[::]:{wild_port}")
    procs = {p["pod"]: p for p in meshctl.ps("lst")["processes"]}
    (wild_addr,) = procs["wild"]["listening"]
    assert wild_addr in wild_addrs
    (warning,) = procs["wild"]["warnings"]
    assert "wild-0/service" in warning and wild_addr in warning
    assert "${POD_IP}" in warning and "127.0.0.1" in warning  # the fix
    assert procs["good"]["listening"] == [f"127.0.182.1:{good_port}"]
    assert procs["good"]["warnings"] == []
    assert procs["parent"]["listening"] == [f"127.0.183.1:{child_port}"]
    assert procs["parent"]["warnings"] == []

    assert f"warning: {warning}" in up.stderr.splitlines()
    assert "good-0" not in up.stderr and "parent-0" not in up.stderr
    table = meshctl("ps", "-p", "lst").stdout
    assert f"warning: {warning}" in table.splitlines()  # below the table, one line even at 200 columns
    log = meshctl.home / "lst" / "supervisor.log"
    assert wait_for(lambda: log.exists() and warning in log.read_text(), 10), log.read_text()
    assert log.read_text().count(warning) == 1  # one event per process and address, not one per status

    # `?resources=0` (up -d's polling) serves the cached scan: the same answer, without rescanning
    cheap = call(meshctl.home / "lst" / "control.sock", "GET", "/v1/status?resources=0")
    assert {p["pod"]: p["warnings"] for p in cheap["processes"]}["wild"] == [warning]


def test_a_restarted_process_reports_its_new_instance(meshctl):
    port = free_port("127.0.184.1")
    topo = meshctl.write("lsr.yaml", f"""
        name: lsr
        pods:
          web:
            ip: 127.0.184.1
            service:
              command: [python, -m, http.server, --bind, "${{POD_IP}}", "{port}"]
              ready: {{tcp: {port}}}
    """)
    meshctl.up(topo, "lsr")
    (before,) = meshctl.ps("lsr")["processes"]
    assert before["listening"] == [f"127.0.184.1:{port}"]
    meshctl("restart", "web", "-p", "lsr")

    def new_instance_listening():
        (p,) = meshctl.ps("lsr")["processes"]
        return p["pid"] != before["pid"] and p["ready"] and p["listening"] == [f"127.0.184.1:{port}"]

    assert wait_for(new_instance_listening, 20)

