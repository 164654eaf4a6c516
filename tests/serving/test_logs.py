"""Log lines carry the request id of the call being served, and only that call's."""

from __future__ import annotations

import asyncio
import json
import logging

from serving.logs import JsonFormatter, bind_request_id, current_request_id


def _line(message: str) -> dict[str, object]:
    record = logging.LogRecord("airlock.test", logging.INFO, __file__, 1, message, None, None)
    return dict(json.loads(JsonFormatter("gateway").format(record)))


async def test_each_call_task_logs_its_own_request_id() -> None:
    async def call(request_id: str) -> dict[str, object]:
        bind_request_id(request_id)
        await asyncio.sleep(0)  # interleave with the other call
        return _line("working")

    first, second = await asyncio.gather(call("rid-a"), call("rid-b"))
    assert (first["request_id"], second["request_id"]) == ("rid-a", "rid-b")
    assert current_request_id() == ""  # the calls' ids stayed in their tasks
    assert "request_id" not in _line("outside any call")


def test_an_explicit_request_id_wins() -> None:
    record = logging.LogRecord("airlock.test", logging.INFO, __file__, 1, "x", None, None)
    record.request_id = "explicit"
    assert json.loads(JsonFormatter("worker").format(record))["request_id"] == "explicit"
