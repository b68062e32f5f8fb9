"""Mint a JWT the zero-trust example's `web` pod accepts (or, with options, one it refuses).

    python examples/zero-trust/mint.py                     # a token for sub=alice, valid 1 h
    python examples/zero-trust/mint.py --sub bob --ttl 60  # another subject, 60 s
    python examples/zero-trust/mint.py --issuer someone    # wrong issuer: 401
    python examples/zero-trust/mint.py --ttl -300          # expired 5 min ago: 401 (Envoy allows 60 s of skew)

It signs with ``jwt-signing-key.pem``, the private half of ``jwks.json``'s key (ES256, kid zero-trust-demo).
Both are demo material shipped in the repository: never trust this key for anything real.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jwt

HERE = Path(__file__).resolve().parent
ISSUER = "https://issuer.zero-trust.example"
AUDIENCE = "zero-trust-web"
KID = "zero-trust-demo"


def mint(sub: str = "alice", ttl_s: float = 3600, issuer: str = ISSUER, audience: str = AUDIENCE) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "sub": sub, "iat": now, "exp": now + int(ttl_s)}
    key = (HERE / "jwt-signing-key.pem").read_bytes()
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sub", default="alice")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds until exp (negative: expired)")
    parser.add_argument("--issuer", default=ISSUER)
    parser.add_argument("--audience", default=AUDIENCE)
    args = parser.parse_args()
    print(mint(args.sub, args.ttl, args.issuer, args.audience))


if __name__ == "__main__":
    main()
