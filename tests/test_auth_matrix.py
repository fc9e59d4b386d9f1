"""The JWT matrix on a server configured with an RS256 public key: only what it pins verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.helpers import SECRET, Client

MakeClient = Callable[..., Awaitable[Client]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    base = {"sub": "u1", "tenant": "t1", "bus": ["bu1"], "roles": [], "exp": int(time.time()) + 600}
    base.update(over)
    return base


def _hand_signed(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, as an attacker would (PyJWT refuses to make these)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    if key is None:
        return head + "."
    return head + "." + _b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "private": private,
        "other": other,
        "public_pem": public_pem,
        "ec": ec.generate_private_key(ec.SECP256R1()),
    }


async def _status(client: Client, tok: str) -> int:
    resp = await client.get(
        "/api/v1/sync/activity/changes",
        headers={"Authorization": f"Bearer {tok}", "Device-Id": "d"},
    )
    return resp.status


async def test_rs256_matrix(make_client: MakeClient, keys: dict[str, Any]) -> None:
    client = await make_client(
        jwt_public_key=keys["public_pem"].decode(), jwt_algorithms=("RS256",)
    )
    good = jwt.encode(_claims(), keys["private"], algorithm="RS256")
    assert await _status(client, good) == 200
    refused = {
        "hs256 with the public key as secret": _hand_signed(
            {"alg": "HS256", "typ": "JWT"}, _claims(), keys["public_pem"]
        ),
        "alg none": _hand_signed({"alg": "none", "typ": "JWT"}, _claims(), None),
        "another rsa key": jwt.encode(_claims(), keys["other"], algorithm="RS256"),
        "es256, not pinned": jwt.encode(_claims(), keys["ec"], algorithm="ES256"),
        "the shared hs secret": jwt.encode(_claims(), SECRET, algorithm="HS256"),
        "expired": jwt.encode(
            _claims(exp=int(time.time()) - 120), keys["private"], algorithm="RS256"
        ),
        "no exp": jwt.encode(
            {k: v for k, v in _claims().items() if k != "exp"}, keys["private"], algorithm="RS256"
        ),
        "tampered claims": good.split(".")[0]
        + "."
        + _b64(json.dumps(_claims(tenant="t2")).encode())
        + "."
        + good.split(".")[2],
    }
    for name, tok in refused.items():
        assert await _status(client, tok) == 401, name


async def test_hs256_server_refuses_asymmetric_and_none(
    client: Client, keys: dict[str, Any]
) -> None:
    assert await _status(client, jwt.encode(_claims(), SECRET, algorithm="HS256")) == 200
    assert await _status(client, jwt.encode(_claims(), keys["private"], algorithm="RS256")) == 401
    assert await _status(client, _hand_signed({"alg": "none"}, _claims(), None)) == 401
    assert (
        await _status(
            client, _hand_signed({"alg": "HS256"}, _claims(roles=["supervisor"]), b"guessed-secret")
        )
        == 401
    )
