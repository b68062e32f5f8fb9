"""`meshctl export istio`: the topology as manifests for an Istio mesh, checked offline.

Every example exports through the real CLI; every Istio object passes its vendored CRD schema (made strict: an
unknown field fails, like ``kubectl apply --validate=strict``; the CEL rules it reaches are evaluated here) and
every core object Kubernetes' own (``kubernetes-validate``, strict). The must-shows are checked field by field:
the seed's retries, zero trust's mTLS, authorization and JWT, the resilience examples' numbers; a feature Istio
cannot carry is exactly one warning naming it.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pods.topology import load_topology
from tests.conftest import ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
jsonschema = pytest.importorskip("jsonschema", reason="installed with kubernetes-validate (test extra)")

K8S_VERSION = kubernetes_validate.utils.latest_version()
SCHEMAS = ROOT / "tests" / "schemas" / "istio"
API_VERSIONS = {"VirtualService": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1",
                "Sidecar": "networking.istio.io/v1", "PeerAuthentication": "security.istio.io/v1",
                "AuthorizationPolicy": "security.istio.io/v1", "RequestAuthentication": "security.istio.io/v1"}
CORE_KINDS = {"ServiceAccount", "Deployment", "Service"}
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


# --------------------------------------------------------------------------- running the export


def topologies() -> list[Path]:
    """Every example topology (files with a ``pods:`` section; the Envoy configs beside them are not)."""
    return [p for p in sorted((ROOT / "examples").glob("*/*.yaml"))
            if isinstance(doc := yaml.safe_load(p.read_text()), dict) and "pods" in doc]


def images_for(path: Path) -> list[str]:
    return [arg for pod in load_topology(path).pods for arg in ("--image", f"{pod}=registry.example/{pod}:1")]


def export(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl", "export", "istio", str(path), *images_for(path), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def exported(path: Path, *args: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(every object, the warning lines) of a successful export to stdout."""
    proc = export(path, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d], proc.stderr.splitlines()


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def route(vs: dict[str, Any], name: str) -> dict[str, Any]:
    found = [r for r in vs["spec"]["http"] if r.get("name") == name]
    assert len(found) == 1, f"route {name} of {vs['metadata']['name']}: {len(found)} found"
    return found[0]


def warnings_naming(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


def example_default(value: Any) -> Any:
    """A topology value as the example runs by default: ``${VAR:-N}`` is N."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return m.group(1) if m else value


# --------------------------------------------------------------------------- validation


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with ``additionalProperties: false`` wherever an object lists its properties and does not
    keep unknown fields: what the API server's strict field validation does."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("oneOf", "anyOf", "allOf"):
        if key in out:
            # A branch listing properties would refuse its siblings' fields once strict.
            assert not any("properties" in b for b in out[key]), f"{key} branch with properties"
            out[key] = [strict(b) for b in out[key]]
    if "not" in out:
        out["not"] = strict(out["not"])
    return out


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{kind}.json").read_text())


@functools.cache
def validator(kind: str) -> Any:
    schema = strict(crd_schema(kind))
    schema["properties"] = {"apiVersion": {"const": API_VERSIONS[kind]}, "kind": {"const": kind},
                            "metadata": {"type": "object"}, **schema["properties"]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def go_duration(text: str) -> float:
    """Seconds of a duration as CEL's duration() reads it (Go's syntax); ValueError if it is not one."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(text)
    return sum(float(n) * units[u] for n, u in parts)


def _count(obj: dict[str, Any], *keys: str) -> int:
    return sum(k in obj for k in keys)


#: Python for each CEL rule of the vendored schemas (x-kubernetes-validations): jsonschema ignores them.
CEL: dict[str, Callable[[Any], bool]] = {
    "duration(self) >= duration('1ms')": lambda v: go_duration(v) >= 1e-3,
    '!self.contains("*")': lambda v: "*" not in v,
    'self.all(key, !key.contains("*"))': lambda v: all("*" not in k for k in v),
    "self.all(key, key.size() != 0)": lambda v: all(k != "" for k in v),
    "self.all(key, 0 < int(key) && int(key) <= 65535)": lambda v: all(0 < int(k) <= 65535 for k in v),
    "self.size() == 0": lambda v: len(v) == 0,
    "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1":
        lambda v: _count(v, "selector", "targetRef", "targetRefs") <= 1,
    "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) &&\n"
    "!has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true":
        lambda v: not _count(v, "serviceAccounts", "notServiceAccounts")
        or not _count(v, "principals", "notPrincipals", "namespaces", "notNamespaces"),
    "(has(self.jwksUri) ? 1 : 0) + (has(self.jwks_uri) ? 1 : 0) + (has(self.jwks) ? 1 : 0) <= 1":
        lambda v: _count(v, "jwksUri", "jwks_uri", "jwks") <= 1,
    'url(self).getScheme() in ["http", "https"]': lambda v: v.split("://")[0] in ("http", "https"),
    "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? "
    "self.selector.matchLabels : {}).size() > 0) : true":
        lambda v: "portLevelMtls" not in v or bool(v.get("selector", {}).get("matchLabels")),
}


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The CEL rules ``value`` breaks, walking it along ``schema``; a rule without a Python equivalent above
    fails too, so a regenerated schema cannot bring an unchecked one."""
    out = []
    for check in schema.get("x-kubernetes-validations", ()):
        fn = CEL.get(check["rule"])
        if fn is None:
            out.append(f"{path}: no Python equivalent of CEL rule {check['rule']!r}")
            continue
        try:
            ok = fn(value)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            out.append(f"{path}: {check['message']} ({value!r})")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                out += cel_failures(sub, item, f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += cel_failures(schema["items"], item, f"{path}/{i}")
    return out


def validate_istio(doc: dict[str, Any]) -> None:
    kind = doc["kind"]
    where = f"{kind}/{doc['metadata'].get('name')}"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(doc)]
    assert not errors, f"{where}: " + "; ".join(errors)
    failures = cel_failures(crd_schema(kind)["properties"]["spec"], doc["spec"], "spec")
    assert not failures, f"{where}: " + "; ".join(failures)
    validate_metadata(doc)


def validate_metadata(doc: dict[str, Any]) -> None:
    """ObjectMeta by Kubernetes' own schema (carried by a ConfigMap), and the name and label rules the API
    server applies, which the OpenAPI schemas do not say."""
    meta = doc["metadata"]
    validate_kube({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})
    assert len(meta["name"]) <= 253 and DNS_SUBDOMAIN.fullmatch(meta["name"]), meta["name"]
    assert all(LABEL_VALUE.fullmatch(v) for v in meta.get("labels", {}).values()), meta["labels"]


def validate_kube(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                             f"{'/'.join(map(str, exc.absolute_path))}") from None


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] in API_VERSIONS:
        validate_istio(doc)
    else:
        assert doc["kind"] in CORE_KINDS, f"unexpected kind {doc['kind']}"
        validate_kube(doc)
        validate_metadata(doc)


# --------------------------------------------------------------------------- every example


@pytest.mark.parametrize("path", topologies(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_exports_valid_istio_manifests(path: Path) -> None:
    docs, _ = exported(path)
    assert docs
    for doc in docs:
        validate(doc)
    topo = load_topology(path)
    for pod, spec in topo.pods.items():
        deployment = find(docs, "Deployment", pod)
        template = deployment["spec"]["template"]
        # Istio's sidecar, not ours: no Envoy container, bootstrap ConfigMap or certificate Secret.
        assert [c["name"] for c in template["spec"]["containers"]] == [pod]
        assert "initContainers" not in template["spec"]
        assert template["spec"]["serviceAccountName"] == pod
        assert find(docs, "ServiceAccount", pod)["automountServiceAccountToken"] is False
        assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == ("true" if spec.sidecar else "false")
    assert not [d for d in docs if d["kind"] in ("ConfigMap", "Secret")]


def test_validation_is_strict() -> None:
    """The checks above refuse a misspelt field, a wrong apiVersion and a duration CEL refuses."""
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "b"},
          "spec": {"hosts": ["b"], "http": [{"route": [{"destination": {"host": "b"}}], "retries": {"attempts": 2}}]}}
    validate_istio(vs)
    misspelt = json.loads(json.dumps(vs))
    misspelt["spec"]["http"][0]["retry"] = misspelt["spec"]["http"][0].pop("retries")
    with pytest.raises(AssertionError, match="retry"):
        validate_istio(misspelt)
    with pytest.raises(AssertionError, match="apiVersion"):
        validate_istio({**vs, "apiVersion": "networking.istio.io/v1alpha3"})
    too_short = json.loads(json.dumps(vs))
    too_short["spec"]["http"][0]["timeout"] = "0s"
    with pytest.raises(AssertionError, match="greater than 1ms"):
        validate_istio(too_short)
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"},
              "spec": {"rules": [{"from": [{"source": {"serviceAccounts": ["a"], "principals": ["x"]}}]}]}}
    with pytest.raises(AssertionError, match="serviceAccounts"):
        validate_istio(policy)


# --------------------------------------------------------------------------- the must-shows


def test_seed_sidecar_retries_are_a_virtual_service_of_b_for_a() -> None:
    docs, warnings = exported(ROOT / "examples" / "seed" / "sidecar.yaml")
    vs = find(docs, "VirtualService", "b")
    assert vs["apiVersion"] == "networking.istio.io/v1"
    assert vs["spec"]["hosts"] == ["b"]
    from_a = route(vs, "from-a")
    assert from_a["match"] == [{"sourceLabels": {"app.kubernetes.io/name": "a",
                                                 "app.kubernetes.io/part-of": "seed-sidecar"}}]
    assert from_a["route"] == [{"destination": {"host": "b", "port": {"number": 80}}}]
    assert from_a["retries"]["attempts"] == 2
    assert "5xx" in from_a["retries"]["retryOn"].split(",")
    # Other callers are routed as Istio would without it (a VirtualService 404s what no route matches).
    assert vs["spec"]["http"][-1] == {"name": "default", "route": [{"destination": {"host": "b"}}]}
    # The seed's envoy.yaml: connect_timeout 0.25s on b; its ingress :80 -> A on 127.0.0.1:8000.
    assert find(docs, "DestinationRule", "b")["spec"] == {
        "host": "b", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "0.25s"}}}}
    sidecar = find(docs, "Sidecar", "a")["spec"]
    assert sidecar["ingress"][0]["port"]["number"] == 80
    assert sidecar["ingress"][0]["defaultEndpoint"] == "127.0.0.1:8000"
    assert len(warnings_naming(warnings, "egress listener")) == 1


@pytest.fixture(scope="module")
def zero_trust() -> tuple[list[dict[str, Any]], list[str], Path]:
    return exported(ROOT / "examples" / "zero-trust" / "zero-trust.yaml", "-n", "prod") + (
        ROOT / "examples" / "zero-trust" / "jwks.json",)


def test_zero_trust_mtls_is_peer_authentication(zero_trust: tuple[list[dict[str, Any]], list[str], Path]) -> None:
    docs, _, _ = zero_trust
    mesh = find(docs, "PeerAuthentication", "default")
    assert mesh["metadata"]["namespace"] == "prod"
    assert mesh["spec"] == {"mtls": {"mode": "STRICT"}}
    for pod in ("a", "c"):  # mtls: permissive
        assert find(docs, "PeerAuthentication", pod)["spec"] == {
            "selector": {"matchLabels": {"app.kubernetes.io/name": pod, "app.kubernetes.io/part-of": "zero-trust"}},
            "mtls": {"mode": "PERMISSIVE"}}
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PeerAuthentication"} == {"default", "a", "c"}


def test_zero_trust_allow_is_an_authorization_policy_on_a_principal(
        zero_trust: tuple[list[dict[str, Any]], list[str], Path]) -> None:
    docs, warnings, _ = zero_trust
    policy = find(docs, "AuthorizationPolicy", "b-allow")["spec"]
    assert policy["selector"]["matchLabels"]["app.kubernetes.io/name"] == "b"
    assert policy["action"] == "ALLOW"
    allow, other_ports = policy["rules"]
    assert allow["from"] == [{"source": {"principals": ["cluster.local/ns/prod/sa/a"]}}]
    assert allow["to"] == [{"operation": {"methods": ["GET"], "ports": ["8000"]}}]
    # b's metrics port was never behind its sidecar's RBAC.
    assert other_ports == {"to": [{"operation": {"notPorts": ["8000"]}}]}
    principals = [p for d in docs if d["kind"] == "AuthorizationPolicy" for r in d["spec"].get("rules", [])
                  for f in r.get("from", []) for p in f["source"].get("principals", [])]
    assert principals == ["cluster.local/ns/prod/sa/a"]
    assert not warnings_naming(warnings, "namespace 'default'")


def test_zero_trust_jwt_is_request_authentication_and_a_deny(
        zero_trust: tuple[list[dict[str, Any]], list[str], Path]) -> None:
    docs, _, jwks = zero_trust
    (rule,) = find(docs, "RequestAuthentication", "web-jwt")["spec"]["jwtRules"]
    assert rule["issuer"] == "https://issuer.zero-trust.example"
    assert rule["audiences"] == ["zero-trust-web"]
    assert json.loads(rule["jwks"]) == json.loads(jwks.read_text())
    assert rule["outputPayloadToHeader"] == "x-jwt-payload"
    deny = find(docs, "AuthorizationPolicy", "web-jwt")["spec"]
    assert deny["action"] == "DENY"
    assert deny["rules"] == [{"from": [{"source": {"notRequestPrincipals": ["https://issuer.zero-trust.example/*"]}}],
                              "to": [{"operation": {"ports": ["8443"]}}]}]


def test_principals_without_namespace_say_default_with_a_warning() -> None:
    docs, warnings = exported(ROOT / "examples" / "zero-trust" / "zero-trust.yaml")
    rule = find(docs, "AuthorizationPolicy", "b-allow")["spec"]["rules"][0]
    assert rule["from"] == [{"source": {"principals": ["cluster.local/ns/default/sa/a"]}}]
    (line,) = warnings_naming(warnings, "namespace 'default'")
    assert "zero-trust.yaml:" in line and "-n NAMESPACE" in line
    assert "namespace" not in find(docs, "Deployment", "b")["metadata"]


def egress_route(path: Path, pod: str) -> dict[str, Any]:
    """The first egress route of ``pod``'s short-form sidecar, as written (defaults of ${VAR:-N} applied)."""
    raw = yaml.safe_load(path.read_text())
    return raw["pods"][pod]["sidecar"]["egress"]["routes"][0]


def test_outlier_detection_numbers_are_the_topologys() -> None:
    path = ROOT / "examples" / "resilience" / "outlier.yaml"
    docs, warnings = exported(path)
    want = egress_route(path, "guarded")["outlier_detection"]
    got = find(docs, "DestinationRule", "b")["spec"]["trafficPolicy"]["outlierDetection"]
    assert got == {"consecutive5xxErrors": want["consecutive_5xx"], "interval": want["interval"],
                   "baseEjectionTime": want["base_ejection_time"], "maxEjectionPercent": want["max_ejection_percent"]}
    # naive calls b without it: a DestinationRule cannot tell callers apart.
    (line,) = warnings_naming(warnings, "DestinationRule applies to every caller")
    assert "guarded, naive" in line and "outlierDetection" in line


def test_circuit_breaker_and_retry_numbers_are_the_topologys() -> None:
    path = ROOT / "examples" / "resilience" / "circuit-breaker.yaml"
    docs, _ = exported(path)
    pool = find(docs, "DestinationRule", "b")["spec"]["trafficPolicy"]["connectionPool"]
    assert pool == {"http": {"http2MaxRequests": egress_route(path, "a")["circuit_breakers"]["max_requests"]}}

    path = ROOT / "examples" / "resilience" / "fault.yaml"
    docs, _ = exported(path)
    written = egress_route(path, "a")
    pool = find(docs, "DestinationRule", "b")["spec"]["trafficPolicy"]["connectionPool"]
    assert pool == {"http": {"maxRetries": written["circuit_breakers"]["max_retries"]}}
    retries = route(find(docs, "VirtualService", "b"), "from-a")["retries"]
    assert retries["attempts"] == written["retry_policy"]["num_retries"]
    assert retries["retryOn"] == written["retry_policy"]["retry_on"]


def test_canary_split_is_route_weights() -> None:
    path = ROOT / "examples" / "resilience" / "canary.yaml"
    docs, _ = exported(path)
    targets = egress_route(path, "a")["to"]
    split = route(find(docs, "VirtualService", "b"), "from-a")["route"]
    assert [(r["destination"]["host"], r["weight"]) for r in split] == [
        (t["target"].split(":")[0], int(example_default(t["weight"]))) for t in targets]
    assert not [d for d in docs if d["kind"] == "DestinationRule"]  # nothing but defaults


def test_local_rate_limit_is_one_warning() -> None:
    path = ROOT / "examples" / "resilience" / "ratelimit.yaml"
    docs, warnings = exported(path)
    (line,) = warnings_naming(warnings, "local_ratelimit")
    assert line.startswith(f"{path}:") and ": warning: " in line and "pod 'b'" in line
    assert not [d for d in docs if d["kind"] in ("VirtualService", "DestinationRule", "AuthorizationPolicy")]


def test_output_directory_puts_mesh_wide_objects_in_mesh_yaml(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = export(ROOT / "examples" / "zero-trust" / "zero-trust.yaml", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(str(out / f"{n}.yaml") for n in ("a", "b", "c", "web", "mesh"))
    mesh = [d for d in yaml.safe_load_all((out / "mesh.yaml").read_text()) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in mesh] == [("PeerAuthentication", "default")]
    b = [d for d in yaml.safe_load_all((out / "b.yaml").read_text()) if d]
    assert [d["kind"] for d in b] == ["ServiceAccount", "Deployment", "Service", "Sidecar", "AuthorizationPolicy"]


# --------------------------------------------------------------------------- everything the mapping covers


SHORT_FORM = """\
name: everything
mtls: permissive
pods:
  b:
    replicas: 2
    mtls: strict
    sidecar:
      ingress:
        port: 8000
        to: 8001
        timeout: 3s
        fault: {delay: {fixed: 50ms, percent: 10}}
        circuit_breakers: {max_connections: 7}
        deny: [{from: [c], paths: [/admin/*]}]
        allow: [{from: [a, c], methods: [GET, POST]}, {paths: [/healthz]}]
      access_log: false
    service: {command: [python, -m, services.b]}
  c:
    sidecar:
      ingress: {port: 8080, to: 8001}
      egress:
        port: 9001
        routes:
          - host: b.local
            to: "b:8000"
            lb_policy: least_request
            outlier_detection: {consecutive_5xx: 3, interval: 2s, base_ejection_time: 10s, max_ejection_percent: 50}
      access_log: false
    service: {command: [python, -m, services.a]}
  a:
    sidecar:
      ingress:
        port: 8443
        to: 8001
        tls: {cert: cert.pem, key: key.pem}
        local_ratelimit: {max_tokens: 5, fill_interval: 1s}
        jwt: {issuer: https://issuer.example, jwks: JWKS, paths: [/api/*], from_header: x-token}
      egress:
        port: 9001
        routes:
          - host: b.local
            to: "b:8000"
            timeout: 2s
            retry_policy: {retry_on: "5xx,retriable-status-codes", retriable_status_codes: [503, 429],
                           num_retries: 4, per_try_timeout: 500ms, retry_back_off: {base_interval: 100ms}}
            fault: {abort: {status: 503, percent: 2.5}}
            request_headers_to_add: [{header: {key: x-caller, value: a}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}]
            response_headers_to_remove: [x-internal]
            circuit_breakers: {max_connections: 10, max_pending_requests: 5, max_requests: 20, max_retries: 2}
            connect_timeout: 1s
            health_check: {path: /healthz, interval: 1s, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 1}
          - host: c.local
            to: [{target: "c:8080", weight: 1}, {target: "d:8080", weight: 2}]
            request_mirror_policies: [{cluster: "d:8080", runtime_fraction: {default_value: {numerator: 25}}}]
      access_log: false
    service: {command: [python, -m, services.a]}
  d:
    mtls: off
    ports: ["8080/http"]
    service: {command: [python, -m, services.b]}
"""


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[str]]:
    """A short-form topology using every field the mapping covers (no Envoy runs: the files need not exist)."""
    path = tmp_path_factory.mktemp("everything") / "everything.yaml"
    path.write_text(SHORT_FORM.replace("JWKS", str(ROOT / "examples" / "zero-trust" / "jwks.json")))
    docs, warnings = exported(path, "-n", "ns1")
    for doc in docs:
        validate(doc)
    return docs, warnings


def test_short_form_routes(everything: tuple[list[dict[str, Any]], list[str]]) -> None:
    docs, warnings = everything
    vs = find(docs, "VirtualService", "b")
    from_a = route(vs, "from-a")
    assert from_a["timeout"] == "2s"
    assert from_a["retries"] == {"attempts": 4, "retryOn": "5xx,429,503", "perTryTimeout": "0.5s",
                                 "backoff": "0.1s", "retryIgnorePreviousHosts": False}
    assert from_a["fault"] == {"abort": {"httpStatus": 503, "percentage": {"value": 2.5}}}
    assert from_a["headers"] == {"request": {"set": {"x-caller": "a"}}, "response": {"remove": ["x-internal"]}}
    # b's own ingress (delay fault, timeout) applies to every caller; its route is the catch-all.
    own = vs["spec"]["http"][-1]
    assert own["name"] == "ingress" and "match" not in own
    assert own["fault"] == {"delay": {"fixedDelay": "0.05s", "percentage": {"value": 10.0}}}
    assert own["timeout"] == "3s"
    assert own["retries"] == {"attempts": 0}  # meshctl does not retry without a policy; Istio would
    split = route(find(docs, "VirtualService", "c"), "from-a")
    assert [(r["destination"]["host"], r["weight"]) for r in split["route"]] == [("c", 33), ("d", 67)]
    assert split["mirrors"] == [{"destination": {"host": "d", "port": {"number": 8080}}, "percentage": {"value": 25.0}}]
    assert len(warnings_naming(warnings, "weights [1, 2] are rounded")) == 1


def test_short_form_clusters(everything: tuple[list[dict[str, Any]], list[str]]) -> None:
    docs, warnings = everything
    # Two callers configure b differently: the first one's (c) is exported, with one warning.
    assert find(docs, "DestinationRule", "b")["spec"]["trafficPolicy"] == {
        "loadBalancer": {"simple": "LEAST_REQUEST"},
        "outlierDetection": {"consecutive5xxErrors": 3, "interval": "2s", "baseEjectionTime": "10s",
                             "maxEjectionPercent": 50}}
    (line,) = warnings_naming(warnings, "DestinationRule applies to every caller")
    assert "pods a, c call b:8000" in line and "connectionPool" in line
    assert len(warnings_naming(warnings, "health_check")) == 1
    ingress = find(docs, "Sidecar", "b")["spec"]["ingress"]
    assert ingress == [{"port": {"number": 8000, "protocol": "HTTP", "name": "http-8000"},
                        "defaultEndpoint": "127.0.0.1:8001", "connectionPool": {"tcp": {"maxConnections": 7}}}]


def test_short_form_security(everything: tuple[list[dict[str, Any]], list[str]]) -> None:
    docs, warnings = everything
    assert find(docs, "PeerAuthentication", "default")["spec"] == {"mtls": {"mode": "PERMISSIVE"}}
    assert find(docs, "PeerAuthentication", "b")["spec"]["mtls"] == {"mode": "STRICT"}
    assert not [d for d in docs if d["kind"] == "PeerAuthentication" and d["metadata"]["name"] == "d"]
    assert find(docs, "Deployment", "d")["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    deny = find(docs, "AuthorizationPolicy", "b-deny")["spec"]
    assert deny["action"] == "DENY"
    assert deny["rules"] == [{"from": [{"source": {"principals": ["cluster.local/ns/ns1/sa/c"]}}],
                              "to": [{"operation": {"paths": ["/admin/*"], "ports": ["8000"]}}]}]
    allow = find(docs, "AuthorizationPolicy", "b-allow")["spec"]["rules"]
    assert allow[0]["from"] == [{"source": {"principals": ["cluster.local/ns/ns1/sa/a", "cluster.local/ns/ns1/sa/c"]}}]
    assert allow[0]["to"] == [{"operation": {"methods": ["GET", "POST"], "ports": ["8000"]}}]
    assert allow[1] == {"to": [{"operation": {"paths": ["/healthz"], "ports": ["8000"]}}]}
    (rule,) = find(docs, "RequestAuthentication", "a-jwt")["spec"]["jwtRules"]
    assert rule["fromHeaders"] == [{"name": "x-token"}]
    assert find(docs, "AuthorizationPolicy", "a-jwt")["spec"]["rules"] == [
        {"from": [{"source": {"notRequestPrincipals": ["https://issuer.example/*"]}}],
         "to": [{"operation": {"ports": ["8443"], "paths": ["/api/*"]}}]}]
    for field in ("tls (its own certificate)", "local_ratelimit"):
        assert len(warnings_naming(warnings, field)) == 1, field


ENVOY_FILE = """\
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {http_status: 500, percentage: {numerator: 10, denominator: HUNDRED}}
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  callers:
                    permissions:
                    - or_rules: {rules: [{header: {name: ":method", string_match: {exact: GET}}},
                                         {header: {name: ":method", string_match: {exact: HEAD}}}]}
                    - url_path: {path: {prefix: /pub/}}
                    principals:
                    - authenticated: {principal_name: {exact: "spiffe://envoyfile/pod/a"}}
                    - remote_ip: {address_prefix: 10.0.0.0, prefix_len: 8}
                  debug:
                    permissions: [{header: {name: x-debug, string_match: {exact: "1"}}}]
                    principals: [{any: true}]
                  versioned:
                    permissions: [{url_path: {path: {safe_regex: {regex: "/v[0-9]+/.*"}}}}]
                    principals: [{any: true}]
              shadow_rules:
                action: DENY
                policies:
                  not-get:
                    permissions: [{not_rule: {header: {name: ":method", string_match: {exact: GET}}}}]
                    principals: [{any: true}]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: ingress_route
            virtual_hosts:
            - name: local_service
              domains: ["*"]
              routes:
              - match: {path: /health}
                direct_response: {status: 200, body: {inline_string: "ok"}}
              - match:
                  safe_regex: {regex: "/v[0-9]+/.*"}
                  headers: [{name: x-env, string_match: {exact: canary}}]
                route: {cluster: local_service, timeout: 5s}
              - match: {prefix: /}
                route: {cluster: local_service}
  - name: egress
    address: {socket_address: {address: 127.0.0.1, port_value: 9001}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress_http
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: egress_route
            virtual_hosts:
            - name: b
              domains: ["*"]
              routes:
              - match: {prefix: /api}
                route: {cluster: b, retry_policy: {retry_on: "connect-failure,reset", num_retries: 1}}
              - match: {prefix: /}
                route: {cluster: b, prefix_rewrite: /v2/}
  clusters:
  - name: local_service
    type: STATIC
    load_assignment:
      cluster_name: local_service
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8001}}}}]}]
  - name: b
    type: STRICT_DNS
    lb_policy: RANDOM
    load_assignment:
      cluster_name: b
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: b, port_value: 8000}}}}]}]
"""


@pytest.fixture(scope="module")
def envoy_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[str]]:
    """A pod whose sidecar is an Envoy file: RBAC trees, a listener-wide fault, direct responses, regex routes."""
    root = tmp_path_factory.mktemp("envoyfile")
    (root / "gw.envoy.yaml").write_text(ENVOY_FILE)
    (root / "envoyfile.yaml").write_text(textwrap.dedent("""\
        name: envoyfile
        mtls: strict
        pods:
          b:
            sidecar: {ingress: {port: 8000, to: 8001}, access_log: false}
            service: {command: [python, -m, services.b]}
          a:
            sidecar: {ingress: {port: 8080, to: 8001}, access_log: false}
            service: {command: [python, -m, services.a]}
          gw:
            sidecar: {envoy: gw.envoy.yaml}
            service: {command: [python, -m, services.a]}
        """))
    docs, warnings = exported(root / "envoyfile.yaml", "-n", "t")
    for doc in docs:
        validate(doc)
    return docs, warnings


def test_envoy_file_rbac(envoy_file: tuple[list[dict[str, Any]], list[str]]) -> None:
    docs, warnings = envoy_file
    rules = find(docs, "AuthorizationPolicy", "gw-allow")["spec"]["rules"]
    callers, debug, other_ports = rules
    assert callers["from"] == [{"source": {"principals": ["cluster.local/ns/t/sa/a"]}},
                               {"source": {"remoteIpBlocks": ["10.0.0.0/8"]}}]
    assert callers["to"] == [{"operation": {"methods": ["GET", "HEAD"], "ports": ["8080"]}},
                             {"operation": {"paths": ["/pub/*"], "ports": ["8080"]}}]
    assert debug == {"to": [{"operation": {"ports": ["8080"]}}],
                     "when": [{"key": "request.headers[x-debug]", "values": ["1"]}]}
    assert other_ports == {"to": [{"operation": {"notPorts": ["8080"]}}]}
    (line,) = warnings_naming(warnings, "RBAC policy 'versioned'")
    assert "url_path regex" in line and "refused" in line
    shadow = find(docs, "AuthorizationPolicy", "gw-deny-dry-run")
    assert shadow["metadata"]["annotations"] == {"istio.io/dry-run": "true"}
    assert shadow["spec"]["rules"] == [{"to": [{"operation": {"notMethods": ["GET"], "ports": ["8080"]}}]}]


def test_envoy_file_routes(envoy_file: tuple[list[dict[str, Any]], list[str]]) -> None:
    docs, _ = envoy_file
    own = find(docs, "VirtualService", "gw")["spec"]["http"]
    fault = {"abort": {"httpStatus": 500, "percentage": {"value": 10.0}}}  # the listener's fault filter: every route
    assert own[0] == {"name": "ingress", "match": [{"uri": {"exact": "/health"}}],
                      "directResponse": {"status": 200, "body": {"string": "ok"}}, "fault": fault}
    assert own[1]["match"] == [{"uri": {"regex": "/v[0-9]+/.*"}, "headers": {"x-env": {"exact": "canary"}}}]
    assert own[1]["timeout"] == "5s" and own[1]["fault"] == fault
    assert own[2]["name"] == "ingress-3" and "match" not in own[2]
    b = find(docs, "VirtualService", "b")["spec"]["http"]
    assert [(r["name"], r.get("match", [{}])[0].get("uri")) for r in b] == [
        ("from-gw", {"prefix": "/api"}), ("from-gw-2", None), ("default", None)]
    assert b[0]["retries"] == {"attempts": 1, "retryOn": "connect-failure,reset", "retryIgnorePreviousHosts": False}
    assert b[1]["rewrite"] == {"uri": "/v2/"}
    assert find(docs, "DestinationRule", "b")["spec"]["trafficPolicy"] == {"loadBalancer": {"simple": "RANDOM"}}


def test_hosts_not_exported_as_pods_go_to_mesh_yaml(tmp_path: Path) -> None:
    """--pod a: b's VirtualService (a's retries) is still written, with the mesh-wide objects."""
    proc = export(ROOT / "examples" / "seed" / "sidecar.yaml", "--pod", "a", "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "mesh.yaml"]
    mesh = [d for d in yaml.safe_load_all((tmp_path / "mesh.yaml").read_text()) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in mesh] == [("VirtualService", "b"), ("DestinationRule", "b")]
    assert route(mesh[0], "from-a")["retries"]["attempts"] == 2


def test_workloads_do_not_rely_on_meshctls_sidecar() -> None:
    """Under Istio no listener of ours runs in the pod: the service calls b's Service itself (its egress URL
    rewritten, no proxy variables), and it is probed on its own port, by Istio's agent on localhost."""
    docs, lines = exported(ROOT / "examples" / "seed" / "sidecar.yaml")
    template = find(docs, "Deployment", "a")["spec"]["template"]
    container = template["spec"]["containers"][0]
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]
    assert probes and all(p == {**p, "tcpSocket": {"port": 8000}} for p in probes), probes
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert not {"HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"} & set(env)
    assert env["UPSTREAM_SERVICE"] == "http://b:80", "a called b through its egress listener 127.0.0.1:9001"
    config = json.loads(template["metadata"]["annotations"]["proxy.istio.io/config"])
    assert config == {"proxyMetadata": {"REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION": "true"}}
    assert "proxy.istio.io/config" not in find(docs, "Deployment", "b")["spec"]["template"]["metadata"].get(
        "annotations", {}), "b listens on its pod address: the default probing works"
    assert any("b.local.service:9001 -> b:80" in line for line in lines), lines
