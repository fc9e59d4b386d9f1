"""JWT principals. Algorithms are pinned by configuration, never taken from the token."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from .errors import ApiError, ErrorCode

SECRET_ENV = "FIELDSYNC_JWT_SECRET"
PUBLIC_KEY_ENV = "FIELDSYNC_JWT_PUBLIC_KEY_FILE"
ALGORITHMS_ENV = "FIELDSYNC_JWT_ALGORITHMS"
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
VERIFIED_CACHE = 10_000
ALL_BUS = "*"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    tenant: str
    bus: frozenset[str] | None  # None: every bu of the tenant
    roles: frozenset[str]
    expires_at: float

    def covers_bu(self, bu: str) -> bool:
        return self.bus is None or bu in self.bus


def is_valid_id(value: object) -> bool:
    """Tenant, bu, user, device and record ids: short and printable, no path separators."""
    return isinstance(value, str) and _ID.match(value) is not None


class TokenVerifier:
    def __init__(
        self, key: str, algorithms: tuple[str, ...] = ("HS256",), leeway_s: float = 30.0
    ) -> None:
        if not key:
            raise ValueError("a JWT secret or public key is required")
        self._key = key
        self._algorithms = list(algorithms)
        self._leeway = leeway_s
        self._verified: OrderedDict[str, Principal] = OrderedDict()

    def verify(self, token: str) -> Principal:
        """The token's principal. Verified tokens are remembered until they expire."""
        known = self.remembered(token)
        if known is not None:
            return known
        principal = self._decode(token)
        self._verified[token] = principal
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return principal

    def remembered(self, token: str) -> Principal | None:
        """The principal of a token verified before and not expired since; no decoding."""
        known = self._verified.get(token)
        if known is None:
            return None
        if known.expires_at + self._leeway > time.time():
            return known
        del self._verified[token]
        return None

    def _decode(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["exp", "sub", "tenant"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"invalid token: {exc}") from None
        return _principal(claims)


def _principal(claims: dict[str, Any]) -> Principal:
    user, tenant = claims.get("sub"), claims.get("tenant")
    bus, roles = claims.get("bus", []), claims.get("roles", [])
    if not (is_valid_id(user) and is_valid_id(tenant)):
        raise _unauthorized("the token's sub and tenant must be short printable ids")
    if not (_is_str_list(bus) and _is_str_list(roles)):
        raise _unauthorized("the token's bus and roles must be lists of strings")
    if not isinstance(claims.get("exp"), int | float):
        raise _unauthorized("the token's exp must be a number")
    bu_set = None if ALL_BUS in bus else frozenset(bus)
    return Principal(str(user), str(tenant), bu_set, frozenset(roles), float(claims["exp"]))


def _is_str_list(value: object) -> bool:
    return (
        isinstance(value, list) and len(value) <= 10_000 and all(isinstance(v, str) for v in value)
    )


def _unauthorized(message: str) -> ApiError:
    return ApiError(ErrorCode.UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: web.Request) -> str:
    token = token_of(request.headers.get("Authorization", ""))
    if token is None:
        raise _unauthorized("send 'Authorization: Bearer <token>'")
    return token


def token_of(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def device_id(request: web.Request) -> str:
    device = request.headers.get("Device-Id", "")
    if not is_valid_id(device):
        raise ApiError(
            ErrorCode.BAD_REQUEST,
            "every sync request names its device in the Device-Id header (1-128 printable chars)",
        )
    return device


def mint_token(
    secret: str,
    *,
    tenant: str,
    user: str,
    bus: list[str],
    roles: list[str] | None = None,
    ttl_s: int = 3600,
    algorithm: str = "HS256",
) -> str:
    now = int(time.time())
    claims = {
        "sub": user,
        "tenant": tenant,
        "bus": bus,
        "roles": roles or [],
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, secret, algorithm=algorithm)


def resolve_secret(db: str) -> tuple[str, str]:
    """The HS256 secret and where it came from: the environment, else a dev secret file.

    The dev secret is generated once with `secrets` and kept beside a SQLite database
    (mode 0600), so `fieldsync token` and `fieldsync serve` agree without configuration.
    """
    env = os.environ.get(SECRET_ENV, "")
    if env:
        return env, SECRET_ENV
    if db.startswith(("postgres://", "postgresql://")):
        raise SystemExit(f"set {SECRET_ENV} when running on PostgreSQL")
    path = Path(db).with_name(Path(db).name + ".jwt-secret")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return path.read_text().strip(), str(path)


def resolve_public_key() -> tuple[str, tuple[str, ...], str] | None:
    """An asymmetric verification key, if configured: (PEM, algorithms, where from).

    The algorithm list is pinned here and must be asymmetric: a token signed with HS256
    using the public key as an HMAC secret (the classic confusion attack) never verifies.
    """
    path = os.environ.get(PUBLIC_KEY_ENV, "")
    if not path:
        return None
    algorithms = tuple(
        a.strip() for a in os.environ.get(ALGORITHMS_ENV, "RS256").split(",") if a.strip()
    )
    if not algorithms or not set(algorithms) <= ASYMMETRIC:
        raise SystemExit(
            f"{ALGORITHMS_ENV} must list asymmetric algorithms ({', '.join(sorted(ASYMMETRIC))})"
        )
    return Path(path).read_text(), algorithms, path
