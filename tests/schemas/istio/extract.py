"""Regenerate the vendored Istio CRD schemas from istio/api's published CRDs.

    git -C ISTIO_API show HEAD:kubernetes/customresourcedefinitions.gen.yaml > crds.yaml
    python tests/schemas/istio/extract.py crds.yaml

Writes ``<Kind>.json`` beside this file: the ``openAPIV3Schema`` of the ``v1`` version of every kind
``meshctl export istio`` emits, as published (descriptions and CEL rules included), compact JSON. The test
makes it strict itself (``additionalProperties: false``), so the files stay the upstream text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

#: Kind -> API group of every Istio object the export writes.
KINDS = {
    "VirtualService": "networking.istio.io",
    "DestinationRule": "networking.istio.io",
    "Sidecar": "networking.istio.io",
    "PeerAuthentication": "security.istio.io",
    "AuthorizationPolicy": "security.istio.io",
    "RequestAuthentication": "security.istio.io",
}
VERSION = "v1"


def extract(crds: str) -> dict[str, dict]:
    """{kind: openAPIV3Schema of its v1 version} from the CRD YAML stream."""
    out = {}
    for doc in yaml.safe_load_all(crds):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        kind = doc["spec"]["names"]["kind"]
        if KINDS.get(kind) != doc["spec"]["group"]:
            continue
        version = next(v for v in doc["spec"]["versions"] if v["name"] == VERSION)
        out[kind] = version["schema"]["openAPIV3Schema"]
    missing = set(KINDS) - set(out)
    if missing:
        raise SystemExit(f"not in the CRDs: {', '.join(sorted(missing))}")
    return out


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    here = Path(__file__).resolve().parent
    for kind, schema in extract(Path(sys.argv[1]).read_text()).items():
        (here / f"{kind}.json").write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(here / f"{kind}.json")


if __name__ == "__main__":
    main()
