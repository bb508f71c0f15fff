#!/usr/bin/env python3
"""Mint the JWT fuzz seeds (into jwt/) from the test keys in crates/tollgate/tests/fixtures/jwt.

Needs the `cryptography` package. Writes `valid-*.jwt` (tokens the fuzz target's
providers accept at its clock; the target asserts nothing else is ever accepted) and
`bad-*.jwt` (alg none, alg confusion, expired, wrong audience). Run from anywhere:

    python3 fuzz/seeds/gen_jwt_seeds.py
"""

import base64
import hashlib
import hmac
import json
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jwt")
FIXTURES = os.path.join(HERE, "..", "..", "..", "crates", "tollgate", "tests", "fixtures", "jwt")
FAR = 4102444800  # 2100-01-01: valid at the target's clock (1.8e9)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def key(name: str):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def signing_input(header: dict, claims: dict) -> bytes:
    h = b64(json.dumps(header, separators=(",", ":")).encode())
    c = b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{h}.{c}".encode()


def sign(alg: str, k, msg: bytes) -> bytes:
    if alg == "RS256":
        return k.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    if alg == "ES256":
        r, s = decode_dss_signature(k.sign(msg, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if alg == "EdDSA":
        return k.sign(msg)
    if alg == "HS256":
        return hmac.new(k, msg, hashlib.sha256).digest()
    raise ValueError(alg)


def token(alg: str, k, claims: dict, kid: str | None = None) -> str:
    header = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    msg = signing_input(header, claims)
    return f"{msg.decode()}.{b64(sign(alg, k, msg))}"


def write(name: str, text: str) -> None:
    with open(os.path.join(HERE, name), "w") as f:
        f.write(text)


with open(os.path.join(FIXTURES, "hs256.secret"), "rb") as f:
    secret = f.read().rstrip(b"\r\n")
rsa_a, ec_k, ed_k = key("rsa_a.key.pem"), key("ec_p256.key.pem"), key("ed25519.key.pem")
claims = lambda iss, **kw: {"iss": iss, "sub": "fuzz", "aud": "tollgate", "exp": FAR, **kw}

write("valid-rs256.jwt", token("RS256", rsa_a, claims("rsa-issuer")))
write("valid-es256.jwt", token("ES256", ec_k, claims("ec-issuer")))
write("valid-eddsa.jwt", token("EdDSA", ed_k, claims("ed-issuer")))
write("valid-hs256.jwt", token("HS256", secret, claims("hs-issuer")))
write("valid-jwks-rs256.jwt", token("RS256", rsa_a, claims("jwks-issuer"), kid="rsa-a"))
write("valid-jwks-es256.jwt", token("ES256", ec_k, claims("jwks-issuer"), kid="ec-p256"))
with open(os.path.join(FIXTURES, "alice.jwt")) as f:
    write("valid-alice.jwt", f.read().strip())

none = signing_input({"alg": "none", "typ": "JWT"}, claims("rsa-issuer")).decode() + "."
write("bad-alg-none.jwt", none)
with open(os.path.join(FIXTURES, "rsa_a.pub.pem"), "rb") as f:
    pem = f.read()
write("bad-alg-confusion.jwt", token("HS256", pem, claims("rsa-issuer")))
write("bad-expired.jwt", token("RS256", rsa_a, claims("rsa-issuer", exp=1_000_000_000)))
write("bad-audience.jwt", token("RS256", rsa_a, claims("rsa-issuer", aud="other")))
