"""API keys: who is calling, and what they may see.

Keys come from `API_KEYS` (comma-separated), `API_KEYS_FILE` (one per line, `#` starts a
comment) and `ADMIN_API_KEYS`. Only their SHA-256 digests are kept; a presented key is
hashed and compared with every digest in constant time (`hmac.compare_digest`, no early
exit), and is never logged. A key is known by its id (`key-` and 12 hex digits of its
digest), which is what job, file and batch records store as their owner.

`AuthMiddleware` is a pure ASGI middleware: it decides from the path the router will
route on (Starlette's own `get_route_path` of the ASGI scope), so no Host header, `//`
or percent-encoding makes a protected route look public. Only `GET`/`HEAD` of `/health`
and `/v1/health` are public (and of `/metrics`, `/metrics/targets` unless
`METRICS_REQUIRE_KEY`). With no keys configured the API is open: every caller is
the same anonymous principal (and `make run` listens on loopback only).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from common.errors import AuthenticationError
from common.settings import Settings

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
PUBLIC_METHODS = frozenset({"GET", "HEAD"})
SCOPE_KEY = "llmq.principal"


@dataclass(frozen=True)
class Principal:
    """The caller: `key_id` owns what it creates; an admin sees everyone's."""

    key_id: str
    admin: bool = False

    def owns(self, owner: str | None) -> bool:
        return self.admin or (owner or "") == self.key_id


ANONYMOUS = Principal(key_id="")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def key_id(key: str) -> str:
    return "key-" + _digest(key.encode()).hex()[:12]


def _split(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def _read_keys_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise RuntimeError(f"API_KEYS_FILE {path!r} cannot be read: {exc.strerror}") from exc
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


class KeyRing:
    def __init__(self, keys: list[str], admin_keys: list[str]):
        entries: dict[bytes, Principal] = {}
        for key in keys:
            entries[_digest(key.encode())] = Principal(key_id(key))
        for key in admin_keys:  # a key listed in both is an admin
            entries[_digest(key.encode())] = Principal(key_id(key), admin=True)
        self._entries = list(entries.items())

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        keys = _split(settings.api_keys)
        if settings.api_keys_file:
            keys += _read_keys_file(settings.api_keys_file)
        return cls(keys, _split(settings.admin_api_keys))

    @property
    def open(self) -> bool:
        return not self._entries

    def authenticate(self, key: str) -> Principal | None:
        digest = _digest(key.encode("utf-8", "surrogateescape"))
        found: Principal | None = None
        for known, principal in self._entries:  # every digest, whatever matched
            if hmac.compare_digest(digest, known):
                found = principal
        return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of the first `Authorization: Bearer` header, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG = "Incorrect API key provided."


class AuthMiddleware:
    def __init__(self, app: ASGIApp, ring: KeyRing, public_paths: frozenset[str] = PUBLIC_PATHS):
        self.app = app
        self.ring = ring
        # GET/HEAD of these need no key: the health checks, and the metrics unless
        # METRICS_REQUIRE_KEY (issue 9; api.main passes them).
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        public = scope.get("method") in PUBLIC_METHODS and get_route_path(scope) in self.public_paths
        if self.ring.open or public:
            scope[SCOPE_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers") or [])
        principal = self.ring.authenticate(token) if token is not None else None
        if principal is None:
            await self._refuse(scope, receive, send, MISSING if token is None else WRONG)
            return
        scope[SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        err = AuthenticationError(message, headers={"WWW-Authenticate": 'Bearer realm="llmq"'})
        await error_response(err)(scope, receive, send)


def principal_of(request: Request) -> Principal:
    principal = request.scope.get(SCOPE_KEY)
    if not isinstance(principal, Principal):
        raise RuntimeError("AuthMiddleware is not installed")
    return principal
