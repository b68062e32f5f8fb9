"""``python -m sidecar``: run one pod's sidecar proxy.

Configured either from an Envoy static bootstrap (``--envoy``) or from the
topology's short form (``--config``, YAML or JSON). Warnings go to stderr one
line each; a configuration we cannot honour exits 2 with one line.
"""

from __future__ import annotations

import sys

from sidecar import no_tls

no_tls.install(sys.argv[1:])  # before asyncio is imported anywhere: see sidecar/no_tls.py

import argparse  # noqa: E402
import asyncio  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from dataclasses import replace  # noqa: E402

from pods.runloop import run as run_loop  # noqa: E402
from sidecar.config import Bootstrap, ConfigError  # noqa: E402
from sidecar.envoy_config import load_envoy  # noqa: E402
from sidecar.mesh_identity import MeshIdentity, apply_identity, load_identity  # noqa: E402
from sidecar.mesh_tracing import MeshTracing, apply_tracing, parse_collector  # noqa: E402
from sidecar.short_config import compile_short  # noqa: E402


def load(args: argparse.Namespace, pod_ip: str) -> Bootstrap:
    """The compiled model, with the mesh identity's transport sockets when ``--mesh-identity`` is given, then the
    mesh's tracing (``--tracing-collector``) and the node's names (``--service-cluster`` / ``--service-node``)."""
    identity = load_identity(args.mesh_identity) if args.mesh_identity else None
    boot = _compile(args, pod_ip, identity)
    if identity is not None:
        boot = apply_identity(boot, identity)
    if args.service_cluster or args.service_node:  # Envoy's flags win over the bootstrap's node, as in Envoy
        boot = replace(boot, node_cluster=args.service_cluster or boot.node_cluster,
                       node_id=args.service_node or boot.node_id)
    if args.tracing_collector:
        ip, port = parse_collector(args.tracing_collector)
        sampling = 100.0 if args.tracing_sampling is None else args.tracing_sampling
        boot = apply_tracing(boot, MeshTracing(ip, port, sampling, boot.node_cluster))
    elif args.tracing_sampling is not None:
        raise ConfigError("--tracing-sampling needs --tracing-collector")
    return boot


def _compile(args: argparse.Namespace, pod_ip: str, identity: MeshIdentity | None) -> Bootstrap:
    if args.envoy:
        return load_envoy(args.envoy, pod_ip, public_admin=args.public_admin)
    try:
        with open(args.config) as f:
            text = f.read()
        if args.config.endswith(".json"):
            section = json.loads(text)  # what meshctl writes: no YAML parser needed (faster start-up)
        else:
            import yaml

            try:
                section = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{args.config}: cannot read: {exc}") from None
    extra = {}
    if identity is not None and "trust_domain" in inspect.signature(compile_short).parameters:
        extra["trust_domain"] = identity.trust_domain  # RBAC principals by pod name need the mesh's trust domain
    return compile_short(section or {}, pod_ip, public_admin=args.public_admin, source=args.config, **extra)


log = logging.getLogger("sidecar")


async def serve(config: Bootstrap, pod_ip: str, hosts: str | None, source: str,
                admin_socket: str | None = None) -> int:
    from sidecar.app import Sidecar

    sidecar = Sidecar(config, pod_ip, hosts, source, admin_socket=admin_socket)
    failed = await sidecar.start_or_exit_code()
    if failed is not None:
        return failed
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.request_stop)
    names = ", ".join(f"{lst.name}={lst.address}:{lst.port}" for lst in config.listeners)
    admin = f"; admin {config.admin.address}:{config.admin.port}" if config.admin else ""
    if admin_socket:
        admin += f"; admin socket {admin_socket}"
    log.info("live: %s%s", names, admin)
    await sidecar.serve()
    return 0


def _percent(value: str) -> float:
    try:
        pct = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {value!r}") from None
    if not 0.0 <= pct <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {value!r}")
    return pct


#: Envoy's --concurrency has no bound; a typo such as 100 would start 100 interpreters (pods/sidecars.py: the same).
MAX_CONCURRENCY = 64


def _concurrency(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not 1 <= n <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_CONCURRENCY}, got {n}")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--envoy", help="Envoy static bootstrap (YAML/JSON)")
    src.add_argument("--config", help="meshctl short form (YAML/JSON)")
    parser.add_argument("--pod-ip", default=os.environ.get("POD_IP", "127.0.0.1"),
                        help="the pod alias: what 0.0.0.0/127.0.0.1/localhost mean (default $POD_IP)")
    parser.add_argument("--hosts", default=os.environ.get("MESH_HOSTS"), help="hosts file (default $MESH_HOSTS)")
    parser.add_argument("--public-admin", action="store_true", help="let the admin bind a non-pod address")
    parser.add_argument("--admin-socket", metavar="PATH",
                        help="serve the whole admin (POST /quitquitquit, /healthcheck/*, /config_dump) on this "
                             "Unix socket, mode 0600; the TCP admin port only serves read-only pages")
    parser.add_argument("--mesh-identity", metavar="FILE",
                        help="the replica's mesh identity (JSON, written by meshctl): mTLS on the ingress and to "
                             "meshed clusters (sidecar/mesh_identity.py)")
    parser.add_argument("--tracing-collector", metavar="IP:PORT",
                        help="report Zipkin spans of every request to this collector (sidecar/mesh_tracing.py)")
    parser.add_argument("--tracing-sampling", metavar="PCT", type=_percent, default=None,
                        help="percent of requests without a sampling decision that start a trace (default 100)")
    parser.add_argument("--service-cluster", metavar="NAME", default="",
                        help="Envoy's node.cluster: the spans' service name (meshctl: the pod)")
    parser.add_argument("--service-node", metavar="NAME", default="", help="Envoy's node.id: the spans' node_id")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration (and the mesh identity and certificate files) and exit")
    parser.add_argument("--live-faults", action="store_true",
                        help="an inactive fault filter on every route, for runtime keys (meshctl fault)")
    parser.add_argument("--concurrency", metavar="N", type=_concurrency, default=1,
                        help="worker processes serving the listeners (Envoy's worker threads; default 1: this "
                             "process serves them itself; see sidecar/workers.py)")
    parser.add_argument("--worker", metavar="SLOT:PARENT_PID:FDS", help=argparse.SUPPRESS)  # sidecar/workers.py
    args = parser.parse_args(argv)
    worker = f"[{args.worker.partition(':')[0]}]" if args.worker else ""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"sidecar{worker}: %(levelname)s: %(message)s")
    try:
        config = load(args, args.pod_ip)
        if args.live_faults:
            from sidecar.http_filters import add_live_faults

            config = add_live_faults(config)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    if args.worker:  # the parent said all there is to say about the configuration
        from sidecar.workers import worker_main

        sys.exit(worker_main(config, args.pod_ip, args.hosts, args.envoy or args.config, args.worker))
    for warning in config.warnings:
        log.warning("%s", warning)
    if args.check:
        if any(lst.tls for lst in config.listeners) or any(c.tls for c in config.clusters):
            from sidecar.tls import validate_tls

            try:
                validate_tls(config)
            except ConfigError as exc:
                log.error("%s", exc)
                sys.exit(2)
        return
    if args.concurrency > 1:
        from sidecar.workers import serve_parent

        worker_args = list(sys.argv[1:] if argv is None else argv)
        code = run_loop(serve_parent(config, args.pod_ip, args.hosts, args.envoy or args.config, args.admin_socket,
                                     args.concurrency, worker_args))
    else:
        code = run_loop(serve(config, args.pod_ip, args.hosts, args.envoy or args.config, args.admin_socket))
    sys.exit(code)


if __name__ == "__main__":
    main()
