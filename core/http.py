"""HTTP plumbing shared by the gateway and the GPU manager.

Bounded body reading, the binary-extension header, the ``{"error": ...}``
error shape of the Open Inference Protocol, exception handlers that never leak
a traceback, and a Prometheus ``/metrics`` route per app.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufaas.core.api import is_valid_name
from gpufaas.core.protocol import HEADER_LENGTH, ProtocolError, parse_header_length

logger = logging.getLogger(__name__)

DEVICE_HEADER = "x-gpufaas-device"
CACHE_HEADER = "x-gpufaas-cache"
LOAD_MS_HEADER = "x-gpufaas-load-ms"
COMPUTE_MS_HEADER = "x-gpufaas-compute-ms"
REASON_HEADER = "x-gpufaas-reason"
MODEL_BYTES_HEADER = "x-gpufaas-model-bytes"
LOAD_SOURCE_HEADER = "x-gpufaas-load-source"  # device (a hit), host, or peer:<device id>
BATCH_SIZE_HEADER = "x-gpufaas-batch-size"  # requests that shared one forward pass
# gateway -> GPU manager: comma-separated models to evict first if this request loads its model
EVICT_FIRST_HEADER = "x-gpufaas-evict-first"
MAX_EVICT_HINTS = 64
# gateway -> peer gateway -> GPU manager: a forwarded request's key; a manager runs a key once
# (gpu_manager/admission.py RequestOnce, scale-out #16)
REQUEST_KEY_HEADER = "x-gpufaas-request-key"
# client -> gateway (and a replica -> the placement owner, the time left): the request's deadline
TIMEOUT_HEADER = "x-gpufaas-timeout-ms"


def error_response(
    status: int, message: str, *, reason: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    all_headers = dict(headers or {})
    if reason:
        all_headers["X-Gpufaas-Reason"] = reason
    return JSONResponse({"error": message}, status_code=status, headers=all_headers)


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes``, and with 415 if
    it is compressed (:func:`check_content_encoding`)."""
    check_content_encoding(request.headers.get("content-encoding"))
    check_declared_length(request.headers.get("content-length"), max_bytes=max_bytes)
    return await _bounded(request.stream(), max_bytes=max_bytes)


async def read_asgi_body(
    receive: Receive, *, declared: str | None, max_bytes: int, encoding: str | None = None
) -> bytes:
    """:func:`read_body` for a bare ASGI app: ``declared`` is the Content-Length header,
    ``encoding`` the Content-Encoding header."""
    check_content_encoding(encoding)
    check_declared_length(declared, max_bytes=max_bytes)

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProtocolError("the client went away before sending the whole body")
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    return await _bounded(chunks(), max_bytes=max_bytes)


@dataclass(frozen=True)
class FastPost:
    """A ``POST`` a bare-ASGI fast path answers: the path's match, the headers (lower-case
    names), and ``read``, the bounded body reader (413 and 415 as :func:`read_body`)."""

    match: re.Match[str]
    headers: dict[str, str]
    read: Callable[[], Awaitable[bytes]]


def match_fast_post(
    scope: Scope, receive: Receive, *, path: re.Pattern[str], max_bytes: int
) -> FastPost | None:
    """The :class:`FastPost` for ``scope`` if it is an HTTP ``POST`` to ``path``, else None
    (the request goes on to the full app). Shared by the gateway's and the node's fast paths."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    match = path.match(scope["path"])
    if match is None:
        return None
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

    def read() -> Awaitable[bytes]:
        return read_asgi_body(
            receive,
            declared=headers.get("content-length"),
            max_bytes=max_bytes,
            encoding=headers.get("content-encoding"),
        )

    return FastPost(match=match, headers=headers, read=read)


def check_content_encoding(encoding: str | None) -> None:
    """Refuse (415) a body sent with any Content-Encoding but ``identity``: bodies are never
    decompressed, so no decompression bomb can get past the size limit."""
    value = (encoding or "identity").strip().lower()
    if value not in ("", "identity"):
        raise ProtocolError(
            f"Content-Encoding {value[:32]!r} is not supported; send the body uncompressed",
            status_code=415,
        )


def check_declared_length(declared: str | None, *, max_bytes: int) -> None:
    """Refuse a Content-Length over ``max_bytes`` (413) before reading a byte of the body."""
    if declared is None:
        return
    try:
        declared_bytes = int(declared)
    except ValueError:
        raise ProtocolError(f"invalid Content-Length {declared!r}") from None
    if declared_bytes > max_bytes:
        raise ProtocolError(
            f"request body of {declared_bytes} bytes exceeds the limit of {max_bytes} bytes",
            status_code=413,
        )


async def _bounded(stream: AsyncIterator[bytes], *, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise ProtocolError(
                f"request body exceeds the limit of {max_bytes} bytes", status_code=413
            )
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def header_length(request: Request) -> int | None:
    """The JSON header length of a binary-extension request, if any."""
    return parse_header_length(request.headers.get(HEADER_LENGTH))


def format_evict_first(models: Sequence[str]) -> str:
    """The value of :data:`EVICT_FIRST_HEADER` for these models (at most the first
    :data:`MAX_EVICT_HINTS`)."""
    return ",".join(models[:MAX_EVICT_HINTS])


def parse_evict_first(value: str | None) -> list[str]:
    """The models named by :data:`EVICT_FIRST_HEADER`; a malformed value is a 400."""
    if not value:
        return []
    models = [m.strip() for m in value.split(",")]
    if len(models) > MAX_EVICT_HINTS:
        raise ProtocolError(
            f"{EVICT_FIRST_HEADER} names {len(models)} models; at most {MAX_EVICT_HINTS} allowed"
        )
    bad = [m for m in models if not is_valid_name(m)]
    if bad:
        raise ProtocolError(
            f"{EVICT_FIRST_HEADER} must be comma-separated function names; "
            f"{bad[0][:64]!r} is not one"
        )
    return models


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": "..."}`` with a fitting status, never a traceback."""

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), reason="InvalidRequest")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        return error_response(400, "; ".join(parts) or "invalid request", reason="InvalidRequest")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            f"internal error ({type(exc).__name__}); see the server log",
            reason="InternalError",
        )


def add_metrics_route(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def json_safe(value: Any) -> Any:
    """Plain JSON types for state dumps (enums and tuples become strings and lists)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class _TokenAuth:
    """Pure ASGI middleware (no per-request task or body wrapping, unlike
    ``BaseHTTPMiddleware``): it sits on every request of the hot path."""

    def __init__(
        self, app: ASGIApp, *, expected: bytes, protect: Callable[[str], bool], realm: str
    ) -> None:
        self.app = app
        self.expected = expected
        self.protect = protect
        self.realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.protect(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(
                    401,
                    f"{self.realm} requires 'Authorization: Bearer <token>'",
                    reason="Unauthorized",
                    headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def token_auth(app: ASGIApp, *, token: str, protect: Callable[[str], bool], realm: str) -> ASGIApp:
    """``app`` behind :func:`install_token_auth`'s check, for a bare ASGI front (a fast path
    in front of FastAPI) that must be covered too."""
    return _TokenAuth(app, expected=f"Bearer {token}".encode(), protect=protect, realm=realm)


def install_token_auth(
    app: FastAPI, *, token: str, protect: Callable[[str], bool], realm: str
) -> None:
    """Require ``Authorization: Bearer <token>`` on the paths ``protect`` selects.

    The comparison is constant-time; a missing or wrong token gets a 401 that
    names what is needed, never which part was wrong.
    """
    app.add_middleware(
        _TokenAuth, expected=f"Bearer {token}".encode(), protect=protect, realm=realm
    )


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with every ``$ref`` inlined, for ``openapi_extra``
    (FastAPI does not register the ``$defs`` of schemas given that way)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    result: dict[str, Any] = resolve(schema)
    return result
