"""The pieces of a gateway of several processes that need no process (gateway/group.py); the
processes themselves are tested end to end in tests/e2e/test_gateway_processes.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from airlock.v1 import admin_pb2
from gateway.group import (
    Place,
    admin_socket_of,
    merge_lockouts,
    metrics_listen_of,
    parse_place,
    watch_lead,
)
from gateway.main import format_route, parse_route
from gateway.quota import Share
from gateway.routing import Route


def test_a_place_is_parsed_checked_and_gives_its_share() -> None:
    assert parse_place("1/3") == Place(1, 3)
    assert parse_place("0/1").lead and not parse_place("2/3").lead
    assert parse_place("2/3").share == Share(2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0", ""):
        with pytest.raises(ValueError, match="--process must be I/N"):
            parse_place(bad)


@pytest.mark.parametrize(
    "route",
    [
        Route("acme", "echo", "echo", "127.0.0.1:9001"),
        Route("acme", "big", "vllm", "[::1]:9002", shared=True),
    ],
)
def test_a_route_goes_to_another_process_as_it_was(route: Route) -> None:
    assert parse_route(format_route(route)) == route


def test_each_process_gets_its_own_metrics_port_and_admin_socket() -> None:
    assert metrics_listen_of("0.0.0.0:9100", 0) == "0.0.0.0:9100"
    assert metrics_listen_of("0.0.0.0:9100", 2) == "0.0.0.0:9102"
    assert metrics_listen_of("127.0.0.1:0", 3) == "127.0.0.1:0"  # any free one
    assert metrics_listen_of("", 1) == ""  # off everywhere
    assert metrics_listen_of("[::1]:9100", 1) == "[::1]:9101"
    lead = Path("/run/airlock/gateway-admin.sock")
    assert admin_socket_of(lead, 1) == Path("/run/airlock/gateway-admin-p1.sock")


def lockout(key: str, seconds_left: float, failures: int) -> admin_pb2.Lockout:
    kind = key.split(":", 1)[0]
    return admin_pb2.Lockout(key=key, kind=kind, seconds_left=seconds_left, failures=failures)


def test_lockout_tables_merge_into_one_locked_keys_first() -> None:
    lead = admin_pb2.ListLockoutsResponse(
        lockouts=[lockout("peer:10.0.0.7", 0, 3), lockout("subject:acme/a", 40, 5)]
    )
    other = admin_pb2.ListLockoutsResponse(
        lockouts=[lockout("peer:10.0.0.7", 120, 10), lockout("peer:10.0.0.8", 0, 1)]
    )
    merged = merge_lockouts([lead, other]).lockouts
    assert [(e.key, e.seconds_left, e.failures) for e in merged] == [
        ("peer:10.0.0.7", 120, 13),  # failures counted in either process, the longest lockout kept
        ("subject:acme/a", 40, 5),
        ("peer:10.0.0.8", 0, 1),
    ]
    assert lead.lockouts[0].failures == 3  # the inputs are left as they were


async def test_a_process_stops_when_its_lead_is_gone() -> None:
    stopping = asyncio.Event()
    await asyncio.wait_for(watch_lead(os.getppid() + 1_000_000, stopping, every=0.01), 5)
    assert stopping.is_set()
    stopping = asyncio.Event()
    task = asyncio.create_task(watch_lead(os.getppid(), stopping, every=0.01))
    await asyncio.sleep(0.05)
    assert not task.done()  # its lead is there: it keeps watching until the process stops
    stopping.set()
    await asyncio.wait_for(task, 5)
