"""The OpenAI-compatible HTTPS door on live stacks: the official `openai` client (sync, async,
streaming) works unchanged, errors come in OpenAI's shape with the right statuses, every call goes
through the same guard and pipeline as a gRPC call (audit, quotas, cancellation), and the door's
limits hold (body, headers, slow and silent clients, open streams, deadline)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import ECHO_TOML, NO_LOCKOUT, make_policy_dir
from tests.support import LiveStack

WORDS = " ".join(f"w{i}" for i in range(200))


def chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **fields}


def raw(stack: LiveStack) -> httpx.Client:
    return httpx.Client(base_url=stack.http_url, verify=stack.ssl_context(), timeout=30)


def bearer(stack: LiveStack, tenant: str = "acme") -> dict[str, str]:
    return {"authorization": f"Bearer {stack.token(tenant)}"}


def sync_openai(stack: LiveStack, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.http_url}/v1", api_key=stack.token(tenant), max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=stack.ssl_context()),
    )  # fmt: skip


# --- the official client, unchanged -----------------------------------------------------------


def test_the_sync_client_lists_models_and_chats(echo_stack: LiveStack) -> None:
    with sync_openai(echo_stack) as client, sync_openai(echo_stack, "globex") as globex:
        assert [m.id for m in client.models.list()] == ["echo", "slow"]
        assert [m.id for m in globex.models.list()] == ["echo"]  # only what the caller may use
        raw_answer = client.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": "hello airlock world"}]
        )
    answer = raw_answer.parse()
    assert answer.choices[0].message.content == "hello airlock world"
    assert answer.choices[0].finish_reason == "stop" and answer.model == "echo"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        3,
        3,
        6,
    )
    request_id = raw_answer.headers["x-request-id"]
    assert answer.id == f"chatcmpl-{request_id}" and len(request_id) == 32


async def test_the_async_client_chats_and_streams_with_usage(echo_stack: LiveStack) -> None:
    async with echo_stack.openai() as client:
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "one two"}],
            max_completion_tokens=1, temperature=0, top_p=0.5, seed=7, stop=["zzz"], n=1,
        )  # fmt: skip
        assert answer.choices[0].finish_reason == "length"  # max_completion_tokens reached the worker
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "one two three four"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 4)
    assert all(c.usage is None for c in chunks[:-1])


def test_a_sync_stream_ends_with_done_and_no_usage_unless_asked(echo_stack: LiveStack) -> None:
    with sync_openai(echo_stack) as client:
        pieces = [
            c for c in client.chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "a b c"}], stream=True
            )
        ]  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == "a b c"
    assert all(c.usage is None for c in pieces)
    with raw(echo_stack) as http:
        body = http.post("/v1/chat/completions", json=chat("x y", stream=True), headers=bearer(echo_stack))
    assert body.headers["content-type"] == "text/event-stream"
    events = [line for line in body.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


# --- one pipeline: identity, audit, quotas --------------------------------------------------------


async def test_request_ids_travel_both_ways_and_the_audit_names_the_door(echo_stack: LiveStack) -> None:
    with raw(echo_stack) as http:
        answer = http.post("/v1/chat/completions", json=chat("audited"),
                           headers={**bearer(echo_stack), "x-request-id": "http-door-1"})  # fmt: skip
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "http-door-1"
    assert answer.json()["id"] == "chatcmpl-http-door-1"
    async with echo_stack.client() as client:
        await client.generate("audited", model="echo", request_id="grpc-door-1")
    records = {}
    for door, rid in (("http", "http-door-1"), ("grpc", "grpc-door-1")):
        [authz] = echo_stack.audit_records(event="authorization", request_id=rid)
        [request] = echo_stack.audit_records(event="request", request_id=rid)
        assert authz["door"] == door and request["door"] == door
        records[door] = (authz, request)
    # The same events with the same fields, whichever door the call came through.
    for i in (0, 1):
        assert set(records["http"][i]) == set(records["grpc"][i])
    authz, request = records["http"]
    assert (authz["decision"], authz["action"], authz["resource"], authz["subject"]) == (
        "allow", "generate", "model:echo", "acme/tester"
    )  # fmt: skip
    assert (request["outcome"], request["code"], request["prompt_tokens"], request["completion_tokens"]) == (
        "ok", "OK", 1, 1
    )  # fmt: skip


async def test_a_streamed_call_asks_the_policy_for_stream(echo_stack: LiveStack) -> None:
    with raw(echo_stack) as http:
        http.post("/v1/chat/completions", json=chat("s", stream=True),
                  headers={**bearer(echo_stack), "x-request-id": "http-stream-1"})  # fmt: skip
    [authz] = echo_stack.audit_records(event="authorization", request_id="http-stream-1")
    assert authz["action"] == "stream" and authz["rpc"] == "/airlock.v1.Inference/GenerateStream"


async def test_a_client_that_disconnects_aborts_the_engine(echo_stack: LiveStack) -> None:
    async with echo_stack.openai(**{"x-request-id": "http-gone-1"}) as client:
        stream = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": WORDS}], max_tokens=200, stream=True
        )
        got = [await stream.__anext__() for _ in range(3)]
        await stream.close()
    assert len(got) == 3
    await _wait_idle(echo_stack, "acme", "slow")
    produced = (await echo_stack.worker_info("acme", "slow")).produced_tokens
    await asyncio.sleep(0.6)
    assert (await echo_stack.worker_info("acme", "slow")).produced_tokens == produced
    assert produced < 200
    [record] = await _eventually(lambda: echo_stack.audit_records(event="request", request_id="http-gone-1"))
    assert record["code"] == "CANCELLED" and record["door"] == "http"


async def test_a_unary_call_whose_client_leaves_is_cancelled_too(echo_stack: LiveStack) -> None:
    async with echo_stack.openai(**{"x-request-id": "http-gone-2"}) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="slow", messages=[{"role": "user", "content": WORDS}], max_tokens=200, timeout=0.5
            )
    await _wait_idle(echo_stack, "acme", "slow")
    [record] = await _eventually(lambda: echo_stack.audit_records(event="request", request_id="http-gone-2"))
    assert record["code"] == "CANCELLED"


async def _eventually(probe: Callable[[], list[Any]], limit: float = 10.0) -> list[Any]:
    end = time.monotonic() + limit
    while not (found := probe()) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return found


async def _wait_idle(stack: LiveStack, tenant: str, model: str, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while (await stack.worker_info(tenant, model)).active and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert (await stack.worker_info(tenant, model)).active == 0


# --- errors in OpenAI's shape ---------------------------------------------------------------------

ERRORS: dict[str, tuple[dict[str, Any], int, str, str | None]] = {
    # name: (body, status, code, param)
    "unknown-model": (chat(model="no-such-model"), 404, "UNKNOWN_MODEL", "model"),
    "bad-model-name": (chat(model="../etc"), 400, "MODEL_INVALID", "model"),
    "max-tokens-over": (chat(max_tokens=513), 400, "INVALID_ARGUMENT", "max_tokens"),
    "max-tokens-zero": (chat(max_completion_tokens=0), 400, "INVALID_ARGUMENT", "max_tokens"),
    "temperature": (chat(temperature=3.0), 400, "INVALID_ARGUMENT", "temperature"),
    "temperature-type": (chat(temperature="hot"), 400, "INVALID_ARGUMENT", "temperature"),
    "bad-role": (chat() | {"messages": [{"role": "robot", "content": "x"}]}, 400, "INVALID_ARGUMENT",
                 "messages[0].role"),
    "tool-role": (chat() | {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400,
                  "UNSUPPORTED_FIELD", "messages[0].tool_call_id"),
    "no-messages": (chat() | {"messages": []}, 400, "INVALID_ARGUMENT", "messages"),
    "n-2": (chat(n=2), 400, "UNSUPPORTED_FIELD", "n"),
    "tools": (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "UNSUPPORTED_FIELD",
              "tools"),
    "response-format": (chat(response_format={"type": "json_object"}), 400, "UNSUPPORTED_FIELD",
                        "response_format"),
    "penalty": (chat(presence_penalty=1.5), 400, "UNSUPPORTED_FIELD", "presence_penalty"),
    "not-openai": (chat(secret_sauce="canary-field-value"), 400, "UNSUPPORTED_FIELD", None),
    "image": (chat() | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
              400, "UNSUPPORTED_FIELD", "messages[0].content"),
    "usage-without-stream": (chat(stream_options={"include_usage": True}), 400, "INVALID_ARGUMENT",
                             "stream_options"),
    "both-max": (chat(max_tokens=5, max_completion_tokens=6), 400, "INVALID_ARGUMENT",
                 "max_completion_tokens"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_bad_request_gets_openais_error_shape(echo_stack: LiveStack, name: str) -> None:
    body, status, code, param = ERRORS[name]
    with raw(echo_stack) as http:
        answer = http.post("/v1/chat/completions", json=body, headers=bearer(echo_stack))
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["request_id"] == answer.headers["x-request-id"]
    assert "canary" not in answer.text  # a caller's strings are never repeated


def test_a_field_at_its_default_asks_for_nothing_and_is_accepted(echo_stack: LiveStack) -> None:
    body = chat("ok", n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, user=None, tools=None)
    with raw(echo_stack) as http:
        answer = http.post("/v1/chat/completions", json=body, headers=bearer(echo_stack))
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {}),
        (b"[1, 2]", {}),
        (b'"a string"', {}),
        (b"\xff\xfe", {}),
        (b'{"model": "echo", "messages": [{"role": "user", "content": "\\ud800"}]}', {}),  # a lone surrogate
        (b"[" * 60_000, {}),  # nested deeper than the decoder recurses
    ],
)
def test_a_body_that_is_not_a_json_object_is_malformed(
    echo_stack: LiveStack, content: bytes, headers: dict[str, str]
) -> None:
    with raw(echo_stack) as http:
        answer = http.post("/v1/chat/completions", content=content, headers={**bearer(echo_stack), **headers})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "MALFORMED_REQUEST"


def test_authentication_errors_are_401_with_a_bearer_challenge(echo_stack: LiveStack) -> None:
    with raw(echo_stack) as http:
        missing = http.post("/v1/chat/completions", json=chat())
        garbage = http.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer x.y.z"})
        models = http.get("/v1/models")
    for answer, code in ((missing, "TOKEN_MISSING"), (garbage, "TOKEN_MALFORMED"), (models, "TOKEN_MISSING")):
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == code
        assert answer.json()["error"]["type"] == "authentication_error"


def test_routes_the_door_does_not_serve(echo_stack: LiveStack) -> None:
    with raw(echo_stack) as http:
        nowhere = http.post("/v1/embeddings", json={}, headers=bearer(echo_stack))
        completions = http.post(
            "/v1/completions", json={"model": "echo", "prompt": "x"}, headers=bearer(echo_stack)
        )
        wrong_method = http.get("/v1/chat/completions", headers=bearer(echo_stack))
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "UNKNOWN_ROUTE"
    assert completions.status_code == 404  # the workers speak chat only (docs/http.md)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["code"] == "UNKNOWN_ROUTE"


def test_a_bad_request_id_header_is_refused(echo_stack: LiveStack) -> None:
    with raw(echo_stack) as http:
        answer = http.post("/v1/chat/completions", json=chat(),
                           headers={**bearer(echo_stack), "x-request-id": "../../etc"})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "REQUEST_ID_INVALID"


def test_the_door_is_tls_only(echo_stack: LiveStack) -> None:
    with httpx.Client(timeout=5) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://{echo_stack.stack.http_address}/v1/models")


# --- a private stack with tight limits ------------------------------------------------------------

TIGHT_HTTP = """
[http]
timeout_seconds = 2.0
keep_alive_seconds = 2.0
body_timeout_seconds = 1.0
max_header_bytes = 8192
max_streams = 2
"""


@pytest.fixture(scope="module")
def tight(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """Tight HTTP limits, and a globex with a small token budget (acme keeps the repository's)."""
    from control.launcher import Stack
    from gateway import config as config_mod

    run = tmp_path_factory.mktemp("http-tight")
    policy = make_policy_dir(run / "policy")
    head, _, tail = (policy / "tenants.toml").read_text().partition("[tenants.globex.quota]")
    tail = tail.replace("tokens_per_minute = 1000000", "tokens_per_minute = 100", 1)
    (policy / "tenants.toml").write_text(head + "[tenants.globex.quota]" + tail)
    toml = (
        f'policy_dir = "{policy}"\n' + textwrap.dedent(ECHO_TOML) + NO_LOCKOUT + textwrap.dedent(TIGHT_HTTP)
    )
    (run / "airlock.toml").write_text(toml)
    stack = Stack(
        config_mod.load(run / "airlock.toml", state_dir=state_dir), run_dir=run, listen="127.0.0.1:0"
    )
    stack.start(timeout=600)
    try:
        yield LiveStack(stack)
    finally:
        stack.stop(timeout=5)


async def test_quota_refusals_are_429_with_retry_after_and_both_doors_share_the_budget(
    tight: LiveStack,
) -> None:
    with raw(tight) as http:
        # globex may generate 100 tokens a minute: this spends them all (unused ones would be refunded).
        first = http.post(
            "/v1/chat/completions", json=chat(WORDS, max_tokens=100), headers=bearer(tight, "globex")
        )
        second = http.post(
            "/v1/chat/completions", json=chat("b", max_tokens=5), headers=bearer(tight, "globex")
        )
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 100
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "TOKEN_QUOTA_EXCEEDED"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert int(second.headers["retry-after"]) >= 1
    # The gRPC door draws on the same budget: the pipeline is one.
    from airlock import QuotaExceededError

    async with tight.client("globex") as client:
        with pytest.raises(QuotaExceededError) as err:
            await client.generate("c", model="echo", max_tokens=5)
    assert err.value.reason == "TOKEN_QUOTA_EXCEEDED"


async def test_the_doors_deadline_is_504_and_stops_the_engine(tight: LiveStack) -> None:
    with raw(tight) as http:
        answer = http.post("/v1/chat/completions", json=chat(WORDS, model="slow", max_tokens=200),
                           headers=bearer(tight))  # fmt: skip
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    await _wait_idle(tight, "acme", "slow")
    produced = (await tight.worker_info("acme", "slow")).produced_tokens
    await asyncio.sleep(0.5)
    assert (await tight.worker_info("acme", "slow")).produced_tokens == produced


async def test_open_streams_are_bounded(tight: LiveStack) -> None:
    async with tight.openai() as client:
        held = [
            await client.chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "a b c d e f g h"}], stream=True
            )
            for _ in range(2)
        ]
        for stream in held:
            await stream.__anext__()
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "third"}], stream=True
            )
        assert err.value.status_code == 503 and err.value.code == "TOO_MANY_STREAMS"
        assert err.value.response.headers["retry-after"] == "1"
        for stream in held:
            await stream.close()
        # Unary calls are not streams; and a slot comes back once a stream ends.
        assert await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "u"}])
        end = time.monotonic() + 10
        while True:
            try:
                again = await client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "again"}], stream=True
                )
                assert (
                    "".join([c.choices[0].delta.content or "" async for c in again if c.choices]) == "again"
                )
                break
            except openai.InternalServerError:
                assert time.monotonic() < end
                await asyncio.sleep(0.1)


def test_a_body_over_the_limit_is_413(tight: LiveStack) -> None:
    limit = tight.config.gateway.max_message_bytes
    with raw(tight) as http:
        answer = http.post("/v1/chat/completions", json=chat("x" * limit), headers=bearer(tight))
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "BODY_TOO_LARGE"


def test_headers_over_the_limit_are_431(tight: LiveStack) -> None:
    with raw(tight) as http:
        whole = http.get("/v1/models", headers={**bearer(tight), "x-padding": "p" * 9000})
        # More than the server reads at once: refused by the server while it still arrives.
        arriving = http.get("/v1/models", headers={**bearer(tight), "x-padding": "p" * 70_000})
    assert whole.status_code == 431 and whole.json()["error"]["code"] == "HEADERS_TOO_LARGE"
    assert arriving.status_code == 431


def _tls(stack: LiveStack) -> ssl.SSLSocket:
    host, port = stack.stack.http_address.rsplit(":", 1)  # type: ignore[union-attr]
    sock = socket.create_connection((host, int(port)), timeout=15)
    return stack.ssl_context().wrap_socket(sock, server_hostname=host)


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """How long until the server closed the connection (at most `seconds`, else fails)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError("the server kept the connection open") from None
    except (ssl.SSLError, OSError):
        pass
    return time.monotonic() - start


def test_a_slow_body_is_408(tight: LiveStack) -> None:
    with _tls(tight) as sock:
        token = tight.token()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n"
                "content-type: application/json\r\ncontent-length: 100\r\n\r\n{")  # fmt: skip
        sock.sendall(head.encode())
        sock.settimeout(10)
        answer = ""
        while '"BODY_TIMEOUT"' not in answer and (got := sock.recv(65536)):
            answer += got.decode()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"BODY_TIMEOUT"' in answer


@pytest.mark.parametrize("sent", [b"", b"GET /v1/models HTTP/1.1\r\nhost: x\r\n"])
def test_silent_idle_or_trickling_connections_are_closed(tight: LiveStack, sent: bytes) -> None:
    # Nothing after the handshake, or a request head that never ends: closed after keep_alive_seconds.
    with _tls(tight) as sock:
        sock.sendall(sent) if sent else None
        assert _closed_within(sock, 10) < 8


def test_an_idle_keep_alive_connection_is_closed(tight: LiveStack) -> None:
    with _tls(tight) as sock:
        sock.sendall(
            f"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tight.token()}\r\n\r\n".encode()
        )
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert _closed_within(sock, 10) < 8


def test_a_silent_tcp_connection_is_closed_at_the_handshake_timeout(tight: LiveStack) -> None:
    host, port = tight.stack.http_address.rsplit(":", 1)  # type: ignore[union-attr]
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        assert _closed_within(sock, 14) < 13  # 10 s, as the gRPC door


def test_the_http_door_can_be_disabled(make_stack: Callable[[str], LiveStack]) -> None:
    live = make_stack(ECHO_TOML + '\n[http]\nlisten = ""\n')
    assert live.stack.http_address is None
    assert json.loads(live.stack.gateway.ready_file.read_text())["http_port"] is None  # type: ignore[union-attr]


async def test_sigterm_lets_http_streams_finish_and_takes_no_new_connection(
    make_stack: Callable[[str], LiveStack],
) -> None:
    live = make_stack(ECHO_TOML)
    gateway = live.stack.gateway
    assert gateway is not None
    host, port = live.stack.http_address.rsplit(":", 1)  # type: ignore[union-attr]
    words = " ".join(["word"] * 60)  # 3 s at the slow model's 20 tokens/s
    async with live.openai() as client:
        stream = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": words}], max_tokens=60, stream=True
        )
        first = await stream.__anext__()
        gateway.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while True:  # the door stops listening at once...
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < end, "the HTTP door kept accepting connections after SIGTERM"
            await asyncio.sleep(0.05)
        rest = [chunk async for chunk in stream]  # ...and the stream in flight finishes
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text == words
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] in ("stop", "length")
    assert gateway.process.wait(timeout=15) == 0
