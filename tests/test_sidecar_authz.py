"""The RBAC and JWT filters in our sidecar alone: the short form's model, bad input, and a running sidecar
refusing malformed and oversized tokens with Envoy's 401s (never a traceback, never unbounded work).

Addresses: 127.0.236.x only. (Behaviour equal to the real Envoy's is tests/conformance/test_security_filters.py.)
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sidecar.config import ConfigError, HeaderMatch
from sidecar.envoy_config import compile_envoy
from sidecar.envoy_export import export_envoy_yaml
from sidecar.jwt_authn import (
    BAD_FORMAT,
    HEADER_BAD_B64,
    HEADER_BAD_JSON,
    JWT_AUTHN,
    VERIFICATION_FAIL,
    HeaderLocation,
    Jwt,
    JwtAuthnFilter,
    JwtRule,
    Requirement,
)
from sidecar.rbac import RBAC, Policy, RbacFilter, RbacRules, Rule, StringMatch
from sidecar.short_config import compile_short
from tests.conformance.harness import envoy_binary
from tests.conftest import free_port
from tests.test_sidecar_proxy import SidecarProc
from tests.upstreams import UpstreamServer, serve_upstream

POD = "127.0.236.1"
UPSTREAM = "127.0.236.2"
ISSUER = "https://issuer.test"
KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _j(obj: object) -> str:
    return _b64(json.dumps(obj).encode())


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ec_jwk = json.loads(ECAlgorithm.to_jwk(KEY.public_key()))
    ec_jwk.update(kid="ec", alg="ES256")
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    rsa_jwk.update(kid="rsa", alg="RS256")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk, rsa_jwk]}))
    return path


def token(key: object = KEY, alg: str = "ES256", kid: str = "ec", **claims: object) -> str:
    payload = {"iss": ISSUER, "aud": "svc", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


# --- the short form compiles into the model ---------------------------------------------------------------------

def _ingress(**auth: object) -> dict:
    return {"ingress": {"port": 8080, "to": 9000, **auth}}


def _filters(boot) -> list:  # noqa: ANN001
    return list(boot.listeners[0].hcm.http_filters)


def test_allow_compiles_to_an_rbac_allow_policy_per_entry() -> None:
    boot = compile_short(_ingress(allow=[{"from": ["a", "spiffe://other/ns/x"], "methods": ["GET", "HEAD"],
                                          "paths": ["/api/*", "/health"]}, {"paths": ["/public/*"]}]),
                         POD, trust_domain="lab")
    [f] = _filters(boot)
    assert f.name == RBAC
    get, head = (Rule("header", HeaderMatch(name=":method", exact=m)) for m in ("GET", "HEAD"))
    api, health, public = (Rule("url_path", StringMatch(**kw)) for kw in ({"prefix": "/api/"}, {"exact": "/health"},
                                                                        {"prefix": "/public/"}))
    first = Policy(name="allow-0",
                   permissions=(Rule("and_rules", (Rule("or_rules", (get, head)), Rule("or_rules", (api, health)))),),
                   principals=(Rule("authenticated", StringMatch(exact="spiffe://lab/pod/a")),
                               Rule("authenticated", StringMatch(exact="spiffe://other/ns/x"))))
    second = Policy(name="allow-1", permissions=(Rule("and_rules", (Rule("or_rules", (public,)),)),),
                    principals=(Rule("any"),))
    assert f.config == RbacFilter(rules=RbacRules(action="ALLOW", policies=(first, second)))


def test_deny_jwt_and_their_order(jwks_file: Path) -> None:
    boot = compile_short(_ingress(deny=[{"methods": ["DELETE"]}], allow=[{"paths": ["/x"]}],
                                  jwt={"issuer": ISSUER, "audiences": ["svc"], "jwks": str(jwks_file),
                                       "forward_payload_header": "X-Jwt", "paths": ["/api/*", "/exact"]},
                                  fault={"abort": {"percent": 0}}), POD)
    names = [f.name for f in _filters(boot)]
    assert names == ["envoy.filters.http.fault", JWT_AUTHN, RBAC, RBAC]
    jwt_cfg: JwtAuthnFilter = _filters(boot)[1].config
    [p] = jwt_cfg.providers
    assert (p.name, p.issuer, p.audiences, p.jwks_file, p.forward_payload_header, p.forward) == \
        ("jwt", ISSUER, ("svc",), str(jwks_file), "x-jwt", False)
    assert [k.kid for k in p.keys] == ["ec", "rsa"]
    assert p.locations() == ((HeaderLocation("authorization", "Bearer "),), ("access_token",))
    req = Requirement("provider", provider="jwt")
    assert jwt_cfg.rules == (JwtRule(prefix="/api/", requires=req), JwtRule(path="/exact", requires=req))
    deny, allow = _filters(boot)[2].config, _filters(boot)[3].config
    assert (deny.rules.action, deny.rules_stat_prefix, allow.rules.action, allow.rules_stat_prefix) == \
        ("DENY", "deny.", "ALLOW", "")


def test_short_form_exports_to_what_the_real_envoy_accepts(jwks_file: Path, tmp_path: Path) -> None:
    import subprocess

    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("the real Envoy is not installed")
    boot = compile_short(_ingress(deny=[{"paths": ["/admin/*"]}], allow=[{"from": ["a"], "methods": ["GET"]}],
                                  jwt={"issuer": ISSUER, "jwks": str(jwks_file), "from_header": "x-token"}),
                         POD, trust_domain="lab")
    out = tmp_path / "envoy.yaml"
    out.write_text(export_envoy_yaml(boot))
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # and it reads back into the same filters
    import yaml

    again = compile_envoy(yaml.safe_load(out.read_text()), POD)
    assert again.listeners[0].hcm.http_filters == boot.listeners[0].hcm.http_filters


@pytest.mark.parametrize(("auth", "message"), [
    ({"allow": [{"form": ["a"]}]}, "ingress.allow[0].form: unknown key (did you mean 'from'?)"),
    ({"allow": [{"methods": ["FETCH"]}]}, "ingress.allow[0].methods[0]: unknown method 'FETCH'"),
    ({"allow": [{"paths": ["api/*"]}]}, "ingress.allow[0].paths[0]: a path starts with '/'"),
    ({"allow": [{"paths": ["/a/*/b"]}]}, "'*' is only allowed as a final '/*'"),
    ({"allow": [{"from": ["a"]}]}, "ingress.allow[0].from[0]: the pod name 'a' needs the mesh's mtls"),
    ({"allow": [{"from": ["spiffe://"]}]}, "is not a SPIFFE id"),
    ({"allow": []}, "ingress.allow: at least one entry is required"),
    ({"deny": [{"methods": []}]}, "ingress.deny[0].methods: at least one method is required"),
    ({"jwt": {"issuer": ISSUER}}, "ingress.jwt.jwks: required"),
    ({"jwt": {"issuer": ISSUER, "jwks": "/nonexistent/jwks.json"}},
     "ingress.jwt.jwks: cannot read /nonexistent/jwks.json: No such file or directory"),
    ({"jwt": {"issuer": ISSUER, "jwks": "/etc/hostname", "remote": 1}}, "ingress.jwt.remote: unknown key"),
])
def test_short_form_errors(auth: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        compile_short(_ingress(**auth), POD)
    assert message in str(e.value)


def test_jwks_file_that_is_not_a_jwks(tmp_path: Path) -> None:
    bad = tmp_path / "jwks.json"
    for text, message in (("{", "the JWKS is not valid JSON"), ('{"keys": 1}', "needs a [keys] array"),
                          ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}', "not a valid EC key"),
                          ('{"keys": [{"kty": "none"}]}', "[kty] 'none' is not supported"),
                          ('{"keys": [{"kty": "RSA", "alg": "none", "n": "AQAB", "e": "AQAB"}]}',
                           "[alg] 'none' is not supported")):
        bad.write_text(text)
        with pytest.raises(ConfigError) as e:
            compile_short(_ingress(jwt={"issuer": ISSUER, "jwks": str(bad)}), POD)
        assert message in str(e.value), text


def _envoy_doc(filters: list[dict]) -> dict:
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "in", "http_filters": [*filters, {"name": "envoy.filters.http.router"}],
           "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"],
                                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}}
    return {"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "c", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}]}}


def _rbac(rules: dict) -> dict:
    return {"name": RBAC, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                                           "rules": rules}}


@pytest.mark.parametrize(("f", "message"), [
    (_rbac({"action": "ALLOW", "policies": {"p": {"permissions": [{"url_path": {"path": {"safe_regex": {
        "regex": "(a"}}}}], "principals": [{"any": True}]}}}), "policies.p.permissions[0].url_path.path.safe_regex."
                                                              "regex: invalid RE2 regex '(a'"),
    (_rbac({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}], "principals": [{"any": True}],
                                                  "condition": {}}}}), "CEL conditions are not supported"),
    (_rbac({"action": "PERMIT"}), "rules.action: must be one of ALLOW, DENY, LOG"),
    (_rbac({"action": "ALLOW", "policies": {"p": {"permissions": [{"metadata": {}}], "principals": [{"any": True}]}}}),
     "metadata matchers are not supported"),
    (_rbac({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}],
                                                  "principals": [{"direct_remote_ip": {"address_prefix": "300.1.1.1",
                                                                                       "prefix_len": 8}}]}}}),
     "invalid CIDR range"),
    ({"name": JWT_AUTHN, "typed_config": {"providers": {"p": {"remote_jwks": {}}}}},
     "remote_jwks is not supported: the sidecar fetches nothing at run time"),
    ({"name": JWT_AUTHN, "typed_config": {"providers": {"p": {"local_jwks": {"filename": "/nonexistent"}}}}},
     "local_jwks.filename: cannot read /nonexistent"),
])
def test_envoy_form_errors(f: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        compile_envoy(_envoy_doc([f]), POD)
    assert message in str(e.value)


# --- token parsing: every malformation is a status, never an exception ---------------------------------------------

def test_malformed_tokens_are_statuses() -> None:
    good = token()
    h, p, s = good.split(".")
    cases = {
        "": BAD_FORMAT, "a.b": BAD_FORMAT, f"{h}.{p}.": BAD_FORMAT, f"{h}.{p}.{s}.x": BAD_FORMAT,
        f"%%%.{p}.{s}": HEADER_BAD_B64, f"{h[:-1]}~.{p}.{s}": HEADER_BAD_B64, f"A.{p}.{s}": HEADER_BAD_B64,
        f"{_b64(b'[')}.{p}.{s}": HEADER_BAD_JSON, f"{_b64(b'{} ')}x.{p}.{s}": HEADER_BAD_B64,
        f"{_b64(b'[' * 100000)}.{p}.{s}": HEADER_BAD_JSON,  # nesting: refused before json could recurse
        f"{_b64(bytes(range(256)))}.{p}.{s}": HEADER_BAD_JSON,
        f"{_j({'alg': 1})}.{p}.{s}": "Jwt header [alg] field is required and must be a string",
        f"{_j({'alg': 'none'})}.{p}.{s}": "Jwt header [alg] is not supported",
        f"{_j({'alg': 'ES256', 'kid': 5})}.{p}.{s}": "Jwt header [kid] field is not a string",
        f"{h}.{_j({'exp': True})}.{s}": "Jwt payload [exp] field is not an integer",
        f"{h}.{_j({'nbf': -1})}.{s}": "Jwt payload [nbf] field is not a positive 64 bit integer",
        f"{h}.{_j({'aud': [1]})}.{s}": "Jwt payload [aud] field is not a string or string list",
        f"{h}.{_j({'jti': {}})}.{s}": "Jwt payload [jti] field is not a string",
        f"{h}.{p}.{s}~": "Jwt signature is an invalid Base64url encoded",
    }
    for text, status in cases.items():
        assert Jwt(text).status == status, text
    assert Jwt(good).status == ""


# --- a running sidecar --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[UpstreamServer, int]]:
    yield from serve_upstream(UPSTREAM)


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[UpstreamServer, int],
       jwks_file: Path) -> Iterator[SidecarProc]:
    wd: Path = tmp_path_factory.mktemp("authz")
    admin, port = free_port(POD), free_port(POD)
    config = {"admin": {"port": admin}, "access_log": str(wd / "access.log"),
              "ingress": {"port": port, "to": f"{UPSTREAM}:{upstream[1]}",
                          "jwt": {"issuer": ISSUER, "audiences": ["svc"], "jwks": str(jwks_file),
                                  "forward_payload_header": "x-jwt-payload", "paths": ["/api/*"]},
                          "deny": [{"methods": ["DELETE"]}],
                          "allow": [{"paths": ["/api/*", "/health"]},
                                    {"from": ["spiffe://lab/pod/a"], "paths": ["/peer/*"]}]}}
    proc = SidecarProc(wd, POD, admin, config=config)
    proc.port = port  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.stop()


def get(sc: SidecarProc, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    c = http.client.HTTPConnection(POD, sc.port, timeout=10)  # type: ignore[attr-defined]
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def test_good_tokens_pass_with_their_payload(sc: SidecarProc, upstream: tuple[UpstreamServer, int]) -> None:
    server = upstream[0]
    for i, tok in enumerate([token(), token(key=RSA_KEY, alg="RS256", kid="rsa")]):
        status, _, _ = get(sc, f"/api/ok{i}", {"authorization": f"Bearer {tok}", "x-jwt-payload": "forged"})
        assert status == 200
        with server.lock:
            rec = next(r for r in server.requests if r.target == f"/api/ok{i}")
        assert rec.header("authorization") is None  # not forwarded (Envoy's default)
        assert rec.header("x-jwt-payload") == tok.split(".")[1]


@pytest.mark.parametrize(("value", "status", "body"), [
    (None, 401, b"Jwt is missing"),
    ("Bearer x.y", 401, BAD_FORMAT.encode()),
    ("Bearer " + "A" * 5000 + ".B.C", 401, HEADER_BAD_JSON.encode()),
    ("Bearer " + ".".join(["A" * 4000] * 3), 401, VERIFICATION_FAIL.encode()),  # over MAX_TOKEN_BYTES: no decoding
    ("Bearer \u00ff\u00fe.x.y", 401, BAD_FORMAT.encode()),
])
def test_bad_authorization_headers_are_401s(sc: SidecarProc, value: str | None, status: int, body: bytes) -> None:
    got = get(sc, "/api/x", {"authorization": value.encode("latin-1").decode("latin-1")} if value else {})
    assert got[:2] == (status, body)
    assert got[2]["www-authenticate"].startswith(f'Bearer realm="http://{POD}:')


def test_token_variants_get_envoys_answers(sc: SidecarProc) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    assert get(sc, "/api/x", {"authorization": f"Bearer {token(key=other)}"})[:2] == (401, b"Jwt verification fails")
    assert get(sc, "/api/x", {"authorization": f"Bearer {token(aud='x')}"})[:2] == \
        (403, b"Audiences in Jwt are not allowed")
    assert get(sc, "/api/x", {"authorization": f"Bearer {token(exp=int(time.time()) - 120)}"})[:2] == \
        (401, b"Jwt is expired")
    hs = jwt.encode({"iss": ISSUER, "aud": "svc"}, "k" * 32, algorithm="HS256", headers={"kid": "ec"})
    assert get(sc, "/api/x", {"authorization": f"Bearer {hs}"})[:2] == \
        (401, b"Jwks doesn't have key to match kid or alg from Jwt")


def test_rbac_in_the_short_form(sc: SidecarProc) -> None:
    assert get(sc, "/health")[0] == 200
    assert get(sc, "/other")[:2] == (403, b"RBAC: access denied")
    assert get(sc, "/health", method="DELETE")[:2] == (403, b"RBAC: access denied")
    assert get(sc, "/peer/x")[:2] == (403, b"RBAC: access denied")  # plaintext: no peer identity


def test_a_huge_authorization_header_is_bounded(sc: SidecarProc) -> None:
    """Over the header limit: refused by the codec before any filter; the sidecar keeps serving."""
    with socket.create_connection((POD, sc.port), timeout=10) as s:  # type: ignore[attr-defined]
        s.sendall(b"GET /api/x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer " + b"A" * 70000 + b"\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 431"), head[:100]
    t0 = time.monotonic()
    for _ in range(20):  # 20 worst-case tokens (just under the token bound) are answered promptly
        tok = ".".join([_b64(b'{"alg":"ES256","kid":"ec"}'), _b64(b"{" + b'"a":1,' * 900 + b'"b":2}'), "A" * 86])
        assert get(sc, "/api/x", {"authorization": f"Bearer {tok}"})[0] == 401
    assert time.monotonic() - t0 < 5
    assert get(sc, "/health")[0] == 200
    assert "Traceback" not in sc.stderr()


def test_stats(sc: SidecarProc) -> None:
    from tests.test_sidecar_proxy import request

    body = request(POD, sc.admin_port, "/stats").body.decode()
    stats = dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)
    for name in ("http.ingress_http.jwt_authn.allowed", "http.ingress_http.jwt_authn.denied",
                 "http.ingress_http.rbac.allowed", "http.ingress_http.rbac.denied",
                 "http.ingress_http.rbac.deny.allowed", "http.ingress_http.rbac.deny.denied"):
        assert int(stats[name]) > 0, name
