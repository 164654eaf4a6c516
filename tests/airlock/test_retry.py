"""`once_more`: the one "attest again and try once more" loop of the SDK and the gateway."""

from __future__ import annotations

import grpc
import pytest

from airlock.errors import AirlockError, AttestationError
from airlock.retry import first_message, once_more, rest_of
from airlock.rpcstatus import to_status


class Failed(grpc.aio.AioRpcError):
    def __init__(self, err: AirlockError) -> None:
        status = to_status(err)
        super().__init__(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
                         details=status.details)  # fmt: skip


STALE = AttestationError("attest again", reason="ATTESTATION_STALE")


def attempts(*outcomes: object) -> tuple[list[int], object]:
    calls: list[int] = []

    async def attempt() -> object:
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return calls, attempt


async def test_a_repaired_failure_is_tried_once_more() -> None:
    seen: list[str] = []

    async def recover(err: AirlockError) -> bool:
        seen.append(err.reason)
        return True

    calls, attempt = attempts(Failed(STALE), "answer")
    assert await once_more(attempt, recover) == "answer"  # type: ignore[arg-type]
    assert (len(calls), seen) == (2, ["ATTESTATION_STALE"])


async def test_a_second_failure_or_a_declined_one_propagates_as_the_grpc_error() -> None:
    async def always(err: AirlockError) -> bool:
        return True

    async def never(err: AirlockError) -> bool:
        return False

    calls, attempt = attempts(Failed(STALE), Failed(STALE), "never reached")
    with pytest.raises(grpc.aio.AioRpcError):
        await once_more(attempt, always)  # type: ignore[arg-type]
    assert len(calls) == 2  # once more, never twice more
    calls, attempt = attempts(Failed(STALE), "never reached")
    with pytest.raises(grpc.aio.AioRpcError):
        await once_more(attempt, never)  # type: ignore[arg-type]
    assert len(calls) == 1


async def test_anything_but_a_grpc_failure_is_not_retried() -> None:
    async def recover(err: AirlockError) -> bool:
        raise AssertionError("not asked")

    calls, attempt = attempts(AttestationError("evidence short of policy"), "never reached")
    with pytest.raises(AttestationError):
        await once_more(attempt, recover)  # type: ignore[arg-type]
    assert len(calls) == 1


class FakeStream:
    def __init__(self, *messages: object) -> None:
        self.messages = list(messages)
        self.cancelled = False

    async def read(self) -> object:
        item = self.messages.pop(0) if self.messages else grpc.aio.EOF
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_stream_is_read_from_its_first_message_and_cancelled_when_that_fails() -> None:
    stream = FakeStream("a", "b", "c")
    first = await first_message(stream)
    assert [m async for m in rest_of(first, stream)] == ["a", "b", "c"] and not stream.cancelled
    empty = FakeStream()
    assert [m async for m in rest_of(await first_message(empty), empty)] == []
    failing = FakeStream(Failed(STALE))
    with pytest.raises(grpc.aio.AioRpcError):
        await first_message(failing)
    assert failing.cancelled
