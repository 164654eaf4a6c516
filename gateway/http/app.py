"""The HTTP door's ASGI application: OpenAI's chat completions and model list over the gateway's
one guard and one pipeline.

Per call, in the gRPC door's order: the request id (`x-request-id`, checked, or a new one; echoed
on every answer and bound to every log line), the body within its size and time bounds, its JSON
translated (gateway/http/openai.py), then `CallGuard.resolve` (authenticate, rate gate, lockout,
authorize, validate, route: the same code the gRPC interceptor runs, audited with door "http") and
`Pipeline.generate` / `Pipeline.stream` (admit, seal, dispatch, open, relay, record). Nothing else
is decided here. A client that disconnects cancels the call, which aborts the engine; every call
has a deadline (`[http] timeout_seconds`: HTTP carries none), also for a client that stops reading
a stream; the door holds at most `[http] max_streams` streams open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

from airlock.errors import (
    AirlockError,
    DeadlineExceededError,
    InvalidRequestError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.types import REQUEST_ID_HEADER, check_request_id, new_request_id
from airlock.v1 import inference_pb2 as pb
from gateway.auth.guard import CallGuard, Knock
from gateway.call import SERVICE, Call, Generation
from gateway.http.openai import (
    ChatRequest,
    chat_request,
    completion,
    error_response,
    models_list,
    stream_chunks,
)
from gateway.pipeline import Pipeline, deadline_in
from serving.logs import bind_request_id
from serving.rpc import caller_error, header_value

__all__ = ["HttpDoor", "HttpLimits"]

_log = logging.getLogger("airlock.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

GENERATE, STREAM, LIST = (f"/{SERVICE}/{m}" for m in ("Generate", "GenerateStream", "ListModels"))
CHAT, MODELS = "/v1/chat/completions", "/v1/models"
ROUTES = {CHAT: "POST", MODELS: "GET"}
JSON = (b"content-type", b"application/json")
# Past the caller's deadline the worker's own refusal (DEADLINE_EXCEEDED) should win the race.
DEADLINE_SLACK_S = 1.0


class HttpLimits:
    """The door's bounds (gateway/config/http.py documents them)."""

    def __init__(
        self,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        body_timeout: float,
        timeout: float,
        max_streams: int,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.body_timeout = body_timeout
        self.timeout = timeout
        self.max_streams = max_streams


class HttpDoor:
    """The ASGI application (lifespan and http scopes; anything else is refused by the server)."""

    def __init__(self, guard: CallGuard, pipeline: Pipeline, limits: HttpLimits) -> None:
        self.guard = guard
        self.pipeline = pipeline
        self.limits = limits
        self.streams = 0  # open event streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        # The server bounds what it buffers of a head still arriving; a head that came whole in one
        # read is held to the same bound here.
        if sum(len(k) + len(v) for k, v in headers) > self.limits.max_header_bytes:
            too_large = QuotaExceededError("the request headers are too large", reason="HEADERS_TOO_LARGE")
            await _error(send, too_large, new_request_id())
            return
        try:
            request_id = check_request_id(header_value(headers, REQUEST_ID_HEADER) or new_request_id())
        except InvalidRequestError as exc:
            request_id = new_request_id()
            bind_request_id(request_id)
            await _error(send, exc, request_id)
            return
        bind_request_id(request_id)
        path, method = scope["path"], scope["method"]
        if ROUTES.get(path) != method:
            await _no_route(send, request_id, allowed=ROUTES.get(path))
            return
        client = scope.get("client") or ("unknown", 0)
        knock = Knock("http", headers, str(client[0])[:64] or "unknown")
        try:
            async with _watched(receive) as body:
                data = await body.read(self.limits)
                if path == MODELS:
                    await self._models(knock, send, request_id)
                else:
                    await self._chat(knock, data, send, request_id)
        except _Gone:
            return  # the client went away: nothing to answer; the call was cancelled and recorded
        except Exception as exc:
            if isinstance(exc, TimeoutError):  # the door's deadline, before anything was sent
                exc = DeadlineExceededError("deadline exceeded")
            await _error(send, _logged(exc, request_id), request_id)

    async def _models(self, knock: Knock, send: Send, request_id: str) -> None:
        call = await self._admitted(knock, LIST, pb.ListModelsRequest())
        body = models_list(self.pipeline.models(call), call.tenant)
        await _answer(send, 200, body, request_id)

    async def _chat(self, knock: Knock, data: bytes, send: Send, request_id: str) -> None:
        try:
            decoded = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidRequestError("the body is not valid JSON", reason="MALFORMED_REQUEST") from None
        chat = chat_request(decoded)
        deadline = deadline_in(self.limits.timeout)
        at = asyncio.get_running_loop().time() + self.limits.timeout + DEADLINE_SLACK_S
        if not chat.stream:
            call = await self._resolve(knock, GENERATE, chat.request)
            async with asyncio.timeout_at(at):
                response = await self.pipeline.generate(call, chat.request, deadline)
            await _answer(send, 200, completion(response, call.model), request_id)
            return
        if self.streams >= self.limits.max_streams:
            raise UnavailableError("too many open streams; retry later", reason="TOO_MANY_STREAMS")
        self.streams += 1
        try:
            call = await self._resolve(knock, STREAM, chat.request)
            await self._stream(call, chat, send, request_id, deadline, at)
        finally:
            self.streams -= 1

    async def _resolve(self, knock: Knock, method: str, request: pb.GenerateRequest) -> Generation:
        call = await self._admitted(knock, method, request)
        assert isinstance(call, Generation)
        return call

    async def _admitted(self, knock: Knock, method: str, request: Any) -> Call:
        """The guard's resolved call, once its authorization record is written."""
        call, written = self.guard.resolve(knock, method, request)
        if written is not None:
            await written
        return call

    async def _stream(
        self,
        call: Generation,
        chat: ChatRequest,
        send: Send,
        request_id: str,
        deadline: float | None,
        at: float,
    ) -> None:
        chunks = self.pipeline.stream(call, chat.request, deadline)
        started = False
        try:
            async with asyncio.timeout_at(at):
                # Refusals come before the first chunk (quota, attestation): they get their status.
                first = await anext(chunks, None)
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
                    (b"x-request-id", request_id.encode()),
                ]})  # fmt: skip
                started = True
                events = stream_chunks(request_id, call.model, chat.include_usage)
                try:
                    if first is not None:
                        await _event(send, events.chunk(first))
                        async for chunk in chunks:
                            await _event(send, events.chunk(chunk))
                    end = events.done()
                except Exception as exc:  # after the 200: one error event, and no [DONE]
                    end = events.error(_logged(exc, request_id), request_id)
                await send({"type": "http.response.body", "body": end, "more_body": False})
        except TimeoutError:
            if not started:
                raise
            # Started: the client stopped reading, or the answer outlived the deadline. Nothing more
            # can be sent; the server closes the connection of an unfinished response.
        finally:
            await chunks.aclose()


def _logged(exc: BaseException, request_id: str) -> AirlockError:
    """What the caller is told of `exc` (`serving.rpc.caller_error`); anything unexpected goes to
    the log with its details, and to the caller as INTERNAL with the request id."""
    err = caller_error(exc, request_id)
    if err is not exc:
        _log.error("internal error", exc_info=exc,
                   extra={"request_id": request_id, "error_type": type(exc).__name__})  # fmt: skip
    return err


class _Gone(Exception):
    """The client disconnected."""


class _Body:
    """The request body, read once within the door's bounds (then the receive channel is only
    watched for a disconnect)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.read_done = asyncio.Event()

    async def read(self, limits: HttpLimits) -> bytes:
        parts, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout):
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise _Gone
                    part = message.get("body", b"")
                    size += len(part)
                    if size > limits.max_body_bytes:
                        raise QuotaExceededError(
                            f"the request body is over {limits.max_body_bytes} bytes", reason="BODY_TOO_LARGE"
                        )
                    parts.append(part)
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            raise DeadlineExceededError(
                "the request body did not arrive in time", reason="BODY_TIMEOUT"
            ) from None
        self.read_done.set()
        return b"".join(parts)


@asynccontextmanager
async def _watched(receive: Receive) -> AsyncIterator[_Body]:
    """The call's body; once it is read, a client that disconnects cancels the call (the pipeline
    records it and aborts the engine), which leaves this block as `_Gone`."""
    task = asyncio.current_task()
    assert task is not None
    body = _Body(receive)
    state = {"active": True, "gone": False}

    async def watch() -> None:
        await body.read_done.wait()
        while (await receive())["type"] != "http.disconnect":
            pass
        if state["active"]:  # not once the answer went out
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield body
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
        raise _Gone from None
    finally:
        state["active"] = False
        watcher.cancel()


async def _event(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _answer(
    send: Send, status: int, body: bytes, request_id: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    headers = [JSON, (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *extra]})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, err: AirlockError, request_id: str) -> None:
    status, body, headers = error_response(err, request_id)
    await _answer(send, status, body, request_id, headers)


class _NoRoute(AirlockError):
    code = grpc.StatusCode.UNIMPLEMENTED  # HTTP 404 (405 with an Allow header for a known path)
    default_reason = "UNKNOWN_ROUTE"


async def _no_route(send: Send, request_id: str, allowed: str | None) -> None:
    err = _NoRoute("no such route" if allowed is None else f"this route takes {allowed} only")
    status, body, headers = error_response(err, request_id)
    if allowed is not None:
        status, headers = 405, [*headers, (b"allow", allowed.encode())]
    await _answer(send, status, body, request_id, headers)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
