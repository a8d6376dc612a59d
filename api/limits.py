"""Request limits against hostile input: every one answered with a 4xx OpenAI error, and
the memory a request may take bounded by them.

- `HeaderLimitMiddleware`: request header lines over `MAX_HEADER_BYTES` get a 431.
- `BodyLimitMiddleware`: a body over `MAX_REQUEST_BYTES` (`UPLOAD_MAX_BYTES` plus the
  multipart framing for `POST /v1/files`) gets a 413 as soon as its Content-Length says
  so, or as soon as the bytes received pass the limit: nothing more is read into memory.
  A JSON body is then checked before anything parses it: UTF-8, lone surrogates
  (`"\\ud800"`), and its nesting depth (`MAX_JSON_DEPTH`); each a 400 naming the field.
  After a large body, freed heap is handed back to the system (`malloc_trim`).
- `HeadLimitedHttpToolsProtocol`: uvicorn's httptools protocol with a bound on the
  request head as it arrives (`uvicorn --http api.limits:HeadLimitedHttpToolsProtocol`).
  httptools has none: a 200 MB header line is read whole, in 65 s of a blocked event loop.
- `check_chat_limits`: messages, their text, and n × max_tokens of a chat request.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import ctypes.util
import functools
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import error_response
from common.errors import (
    HeadersTooLargeError,
    InvalidRequestError,
    RequestTooLargeError,
    ServiceError,
)
from common.schemas import ChatCompletionRequest, find_lone_surrogate
from common.settings import Settings, get_settings

# Room for the multipart framing around an upload (boundaries, part headers, `purpose`).
MULTIPART_SLACK = 1024 * 1024
UPLOAD_PATHS = frozenset({"/v1/files", "/v1/files/"})
# A head (request line and headers) this much over MAX_HEADER_BYTES is cut off by the
# protocol; up to there the middleware answers (the request line may be long: job ids).
HEAD_SLACK = 64 * 1024
# Bodies at least this large give their freed memory back afterwards.
TRIM_BYTES = 1024 * 1024


def _error_body(err: ServiceError) -> bytes:
    return json.dumps(err.to_dict(), separators=(",", ":")).encode()


async def send_error(scope: Scope, receive: Receive, send: Send, err: ServiceError) -> None:
    """An OpenAI error object as a complete ASGI response (`api.errors.error_response`)."""
    await error_response(err)(scope, receive, send)


# -- headers ---------------------------------------------------------------------------


def header_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """Bytes of the header lines as sent (`name: value\\r\\n`)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def headers_too_large(limit: int) -> HeadersTooLargeError:
    return HeadersTooLargeError(f"the request's headers are larger than {limit} bytes in all")


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and header_bytes(scope.get("headers") or []) > self.max_bytes:
            await send_error(scope, receive, send, headers_too_large(self.max_bytes))
            return
        await self.app(scope, receive, send)


class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
    """httptools gathers a whole header line before uvicorn sees it, without bound. This
    counts the bytes of each request head as they arrive; past MAX_HEADER_BYTES plus
    HEAD_SLACK it answers 431, reads and drops what the client still sends for a few
    seconds (so that it gets the answer rather than a reset), then closes."""

    drain_seconds = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_limit = get_settings().max_header_bytes + HEAD_SLACK
        self.head_bytes = 0
        self.in_head = True
        self.refused = False

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True
        self.head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.in_head and self.head_bytes > self.head_limit and not self.transport.is_closing():
            self.refuse_head()

    def refuse_head(self) -> None:
        self.refused = True
        self.logger.warning("Request head over %d bytes refused.", self.head_limit)
        body = _error_body(headers_too_large(self.head_limit - HEAD_SLACK))
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.drain_seconds, self.transport.close)


# -- bodies ----------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def body_too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"the request body is larger than {limit} bytes")


def _content_type(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return None


def _is_json(kind: bytes | None) -> bool:
    """Whether FastAPI would parse a body of this type as JSON (no type counts as JSON)."""
    return kind is None or kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


# Per byte: +1 opens an array or object, -1 closes one, 0 anything else.
_STEPS = np.zeros(256, np.int8)
_STEPS[list(b"[{")] = 1
_STEPS[list(b"]}")] = -1
_DEPTH_CHUNK = 1 << 20


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether arrays and objects in this JSON text nest more than `limit` deep, from the
    bytes, before any parser recurses into them: escaped backslashes and quotes are
    dropped, then the brackets outside strings counted (a megabyte at a time)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in body else body
    depth, quotes = 0, 0
    for start in range(0, len(text), _DEPTH_CHUNK):
        chunk = np.frombuffer(text, np.uint8, count=min(_DEPTH_CHUNK, len(text) - start), offset=start)
        quoted = np.cumsum(chunk == 34, dtype=np.int32)  # quotes so far: odd inside a string
        quoted += quotes
        steps = _STEPS[chunk]
        steps[(quoted & 1) == 1] = 0
        levels = np.cumsum(steps, dtype=np.int32)
        levels += depth
        if int(levels.max()) > limit:
            return True  # unclosed brackets (invalid JSON) count too
        depth, quotes = int(levels[-1]), int(quoted[-1])
    return False


# A surrogate escape (`\ud83d`); whether it is part of a pair is decided on the parsed text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def json_body_error(body: bytes, max_depth: int) -> InvalidRequestError | None:
    """What is wrong with a JSON body that a parser would accept or choke on, or None:
    not UTF-8, a lone surrogate (its field named), or nested too deep."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return InvalidRequestError("the request body must be JSON encoded as UTF-8")
    try:
        codecs.decode(body, "utf-8")
    except UnicodeDecodeError:
        # Parse it with the bad bytes as stand-ins to say which field holds them.
        param = _bad_string(body.decode("utf-8", "surrogateescape"))
        where = f"{param}: " if param else ""
        return InvalidRequestError(f"{where}the request body is not valid UTF-8", param=param or None)
    if json_too_deep(body, max_depth):
        return InvalidRequestError(f"the request body nests arrays and objects more than {max_depth} deep")
    if _SURROGATE_ESCAPE.search(body):
        param = _bad_string(body)
        if param is not None:
            where = f"{param}: " if param else ""
            return InvalidRequestError(
                f"{where}the string holds a lone UTF-16 surrogate, which is not valid Unicode", param=param or None
            )
    return None


def _bad_string(text: str | bytes) -> str | None:
    """The path of the first string holding a surrogate (None: none, or not JSON)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None  # not JSON: the parser after this says so
    return find_lone_surrogate(value)


class _Trimmer:
    """glibc's malloc keeps freed heap (in every thread's arena) for reuse; after a large
    body it is handed back to the system. One trim at a time, in a thread."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self.trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
        self.lock = threading.Lock()

    def run(self) -> None:
        if self.trim is not None and self.lock.acquire(blocking=False):
            try:
                self.trim(0)
            finally:
                self.lock.release()


TRIMMER = _Trimmer()


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, max_bytes: int, upload_max_bytes: int, max_json_depth: int, trim_bytes: int = TRIM_BYTES
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes + MULTIPART_SLACK
        self.max_json_depth = max_json_depth
        self.trim_bytes = trim_bytes

    def limit_for(self, scope: Scope, kind: bytes | None) -> int:
        """An upload (multipart, to `POST /v1/files`) has its own limit; the rest this one."""
        upload = kind == b"multipart/form-data" and get_route_path(scope) in UPLOAD_PATHS
        return self.upload_max_bytes if upload and scope.get("method") == "POST" else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = _content_type(scope)
        limit = self.limit_for(scope, kind)
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await send_error(scope, receive, send, body_too_large(limit))
                return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            # No route reads their bodies: nothing to count, and a resumed stream's chunks
            # then go out without passing through here.
            await self.app(scope, receive, send)
            return
        received = [0]
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH") and _is_json(kind):
                await self._json(scope, receive, send, limit, received)
            else:
                await self._streamed(scope, receive, send, limit, received)
        finally:
            if received[0] >= self.trim_bytes:
                # The request's objects are gone by now; the trim needs no waiting for.
                asyncio.get_running_loop().run_in_executor(None, TRIMMER.run)

    async def _json(self, scope: Scope, receive: Receive, send: Send, limit: int, received: list[int]) -> None:
        """Read the whole body (it is parsed whole anyway), check it, hand it on."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunk = message.get("body", b"")
            received[0] += len(chunk)
            if received[0] > limit:
                del chunks
                await send_error(scope, receive, send, body_too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        if body:
            check = functools.partial(json_body_error, body, self.max_json_depth)
            # A large body is checked off the event loop (tens of milliseconds for 8 MiB).
            err = await anyio.to_thread.run_sync(check) if len(body) >= TRIM_BYTES else check()
            del check
            if err is not None:
                await send_error(scope, receive, send, err)
                return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        del body

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int, received: list[int]) -> None:
        """Count the bytes as the app reads them; past the limit the app's reading fails,
        and whatever it answers to that is replaced by the 413."""
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal exceeded
            if exceeded:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await send_error(scope, receive, send, body_too_large(limit))


# -- chat requests ---------------------------------------------------------------------


def check_chat_limits(req: ChatCompletionRequest, settings: Settings) -> int:
    """Refuse a chat request over the message limits or n × max_tokens; the largest
    max_tokens each choice may have."""
    if len(req.messages) > settings.max_messages:
        raise InvalidRequestError(
            f"messages: at most {settings.max_messages} messages are allowed, got {len(req.messages)}",
            param="messages",
            code="array_above_max_length",
        )
    chars = sum(m.text_chars() for m in req.messages)
    # What else the chat template renders into the prompt: the tools and its arguments
    # (before: uncounted, a 7.7 MB `tools` array cost the API 6.7 s of rendering and
    # tokenizing before the context check refused it).
    extra = sum(
        len(json.dumps(value, ensure_ascii=False, default=str))
        for value in ([t.model_dump(exclude_none=True) for t in req.tools or []], req.chat_template_kwargs)
        if value
    )
    if chars + extra > settings.max_prompt_chars:
        what = "the messages" + (" and tools" if extra else "")
        raise InvalidRequestError(
            f"messages: {what} hold {chars + extra} characters; at most {settings.max_prompt_chars} are allowed",
            param="tools" if extra > chars else "messages",
            code="string_above_max_length",
        )
    cap = settings.max_total_completion_tokens
    wanted = req.requested_max_tokens
    if wanted is not None and req.n * wanted > cap:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise InvalidRequestError(f"{param}: n × {param} must be at most {cap}, got {req.n} × {wanted}", param=param)
    return max(1, cap // max(1, req.n))


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Both middlewares; the header check runs first."""
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        upload_max_bytes=settings.upload_max_bytes,
        max_json_depth=settings.max_json_depth,
    )
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes)
