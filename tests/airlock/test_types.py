"""`validate_request`: every refusal names the field at fault; defaults are applied once, here; the
request is only read."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from airlock.errors import InvalidRequestError
from airlock.types import (
    MODEL_NAME,
    GenerationSpec,
    Limits,
    Message,
    Sampling,
    check_model,
    check_request_id,
    new_request_id,
    validate_request,
)
from airlock.v1 import inference_pb2 as pb

LIMITS = Limits()


def request(
    messages: list[tuple[str, str]] | None = None, *, request_id: str = "req-1", **params: Any
) -> pb.GenerateRequest:
    if messages is None:
        messages = [("user", "hello")]
    return pb.GenerateRequest(
        request_id=request_id,
        model="echo",
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        params=pb.SamplingParams(**params),
    )


def refused(req: pb.GenerateRequest, limits: Limits = LIMITS) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        validate_request(req, limits, "req-1")
    return info.value


def test_a_valid_request_becomes_a_spec_with_defaults_applied() -> None:
    spec = validate_request(
        request([("system", "be brief"), ("user", "hi"), ("assistant", "")]), LIMITS, "req-1"
    )
    assert spec == GenerationSpec(
        request_id="req-1",
        model="echo",
        messages=(Message("system", "be brief"), Message("user", "hi"), Message("assistant", "")),
        sampling=Sampling(
            max_tokens=LIMITS.default_max_tokens, temperature=0.7, top_p=1.0, seed=None, stop=()
        ),
    )


def test_explicit_sampling_parameters_are_kept() -> None:
    spec = validate_request(
        request(max_tokens=12, temperature=0.5, top_p=0.25, seed=0, stop=["\n\n", "END"]), LIMITS, "req-1"
    )
    assert spec.sampling == Sampling(max_tokens=12, temperature=0.5, top_p=0.25, seed=0, stop=("\n\n", "END"))
    # and the worker is asked for exactly that, every parameter explicit
    relayed = request()
    relayed.params.CopyFrom(spec.sampling.to_proto())
    assert validate_request(relayed, LIMITS, "req-1").sampling == spec.sampling


def test_default_max_tokens_comes_from_the_limits() -> None:
    spec = validate_request(request(), Limits(max_tokens=100, default_max_tokens=7), "req-1")
    assert spec.sampling.max_tokens == 7


def test_empty_messages_are_refused() -> None:
    assert refused(request([])).field == "messages"


def test_too_many_messages_are_refused() -> None:
    limits = Limits(max_messages=2)
    assert validate_request(request([("user", "a"), ("user", "b")]), limits, "req-1").messages
    assert refused(request([("user", "a")] * 3), limits).field == "messages"


@pytest.mark.parametrize("role", ["tool", "", "User", "system "])
def test_an_unknown_role_is_refused_naming_its_index(role: str) -> None:
    err = refused(request([("user", "hi"), (role, "x")]))
    assert err.field == "messages[1].role"
    assert err.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize("contents", [[""], ["   "], ["", " \n\t "]])
def test_messages_without_any_content_are_refused(contents: list[str]) -> None:
    assert refused(request([("user", c) for c in contents])).field == "messages"


@pytest.mark.parametrize("max_tokens", [0, -1, LIMITS.max_tokens + 1, 2**31 - 1])
def test_max_tokens_out_of_range_is_refused(max_tokens: int) -> None:
    assert refused(request(max_tokens=max_tokens)).field == "params.max_tokens"


def test_max_tokens_at_the_limit_is_accepted() -> None:
    assert (
        validate_request(request(max_tokens=LIMITS.max_tokens), LIMITS, "req-1").sampling.max_tokens == 1024
    )
    assert validate_request(request(max_tokens=1), LIMITS, "req-1").sampling.max_tokens == 1


@pytest.mark.parametrize("temperature", [-0.5, 2.5, math.inf, math.nan])
def test_temperature_out_of_range_is_refused(temperature: float) -> None:
    assert refused(request(temperature=temperature)).field == "params.temperature"


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_temperature_bounds_are_inclusive(temperature: float) -> None:
    assert (
        validate_request(request(temperature=temperature), LIMITS, "req-1").sampling.temperature
        == temperature
    )


@pytest.mark.parametrize("top_p", [0.0, -0.25, 1.5, math.nan])
def test_top_p_out_of_range_is_refused(top_p: float) -> None:
    assert refused(request(top_p=top_p)).field == "params.top_p"


def test_top_p_of_one_is_accepted() -> None:
    assert validate_request(request(top_p=1.0), LIMITS, "req-1").sampling.top_p == 1.0


def test_too_many_stop_strings_are_refused() -> None:
    ok = ["a", "b", "c", "d"]
    assert validate_request(request(stop=ok), LIMITS, "req-1").sampling.stop == tuple(ok)
    assert refused(request(stop=[*ok, "e"])).field == "params.stop"


@pytest.mark.parametrize("stop", ["", "x" * (LIMITS.max_stop_chars + 1)])
def test_empty_or_overlong_stop_strings_are_refused(stop: str) -> None:
    assert refused(request(stop=["fine", stop])).field == "params.stop"


def test_a_stop_string_at_the_length_limit_is_accepted() -> None:
    stop = "x" * LIMITS.max_stop_chars
    assert validate_request(request(stop=[stop]), LIMITS, "req-1").sampling.stop == (stop,)


def test_the_spec_carries_the_calls_request_id_and_the_request_is_only_read() -> None:
    req = request(request_id="")
    before = req.SerializeToString()
    spec = validate_request(req, LIMITS, "call-7")  # the interceptor resolved and checked it
    assert spec.request_id == "call-7" and spec.sampling.max_tokens == LIMITS.default_max_tokens
    assert req.SerializeToString() == before  # no id, no max_tokens written back


def test_a_new_request_id_is_fresh_each_time() -> None:
    first, second = new_request_id(), new_request_id()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


@pytest.mark.parametrize("request_id", ["a", "A.b_c-9", "x" * 64])
def test_well_formed_request_ids_are_kept(request_id: str) -> None:
    assert check_request_id(request_id) == request_id


@pytest.mark.parametrize(
    "request_id",
    ["", "x" * 65, "a/b", "../etc", "a\nb", "abc\n", "a b", "é", "id;drop", "\x00"],
)
def test_malformed_request_ids_are_refused(request_id: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_request_id(request_id)
    assert (info.value.field, info.value.reason) == ("request_id", "REQUEST_ID_INVALID")
    assert info.value.message.startswith("request_id must be")


@pytest.mark.parametrize(
    "model", ["x" * 64, "Echo", "echo.v2", "-echo", "echo_2", "échο", "echo\n", "m" * 1_000_000]
)
def test_a_model_name_that_cant_name_a_model_is_refused_without_repeating_it(model: str) -> None:
    req = request()
    req.model = model
    err = refused(req)
    assert (err.reason, err.field) == ("MODEL_INVALID", "model")
    assert model not in str(err)  # the name is never echoed back


@pytest.mark.parametrize("model", ["", "echo", "a", "smollm2", "llama-4-maverick", "x" * 63])
def test_every_name_a_model_can_be_configured_under_passes(model: str) -> None:
    assert check_model(model) == model
    req = request()
    req.model = model
    assert validate_request(req, LIMITS, "req-1").model == model


def test_the_model_bound_is_the_one_configuration_allows() -> None:
    from gateway import config as config_mod

    assert config_mod.NAME.pattern == MODEL_NAME.pattern  # a configured model always passes
