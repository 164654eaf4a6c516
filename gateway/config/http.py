"""The `[http]` section: the OpenAI-compatible HTTPS door (gateway/http/, docs/http.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config.parser import Parser

__all__ = ["HttpConfig", "parse_http"]


@dataclass(frozen=True)
class HttpConfig:
    """TLS only, with the gRPC door's certificate ([tls] cert and key); bearer tokens only.

    The body is bounded by `gateway.max_message_bytes`, like a gRPC message."""

    listen: str = "127.0.0.1:7445"  # "" disables the HTTP door
    # HTTP carries no deadline: every call gets this one (the SDK's default per-call timeout).
    timeout_seconds: float = 120.0
    # A connection must send a complete request head within this long of opening or of its last
    # answer (idle keep-alive, silent or slow clients); its TLS handshake within 10 s (as gRPC).
    keep_alive_seconds: float = 15.0
    body_timeout_seconds: float = 10.0  # a request body must arrive within this long
    max_header_bytes: int = 65536  # request line and headers (the gRPC door's metadata limit)
    max_streams: int = 512  # event streams open at once on the door; more are refused (503)


def parse_http(p: Parser, raw: dict[str, Any]) -> HttpConfig:
    keys = {"listen", "timeout_seconds", "keep_alive_seconds", "body_timeout_seconds", "max_header_bytes",
            "max_streams"}  # fmt: skip
    t = p.table(raw, "http", keys)
    d = HttpConfig()
    seconds = {}
    for key in ("timeout_seconds", "keep_alive_seconds", "body_timeout_seconds"):
        value = p.get(t, f"http.{key}", float, getattr(d, key))
        if not 0 < value <= 86400:
            raise p.fail(f"http.{key}", "must be in (0, 86400]")
        seconds[key] = value
    header_bytes = p.positive(t, "http.max_header_bytes", d.max_header_bytes)
    if header_bytes < 8192:
        raise p.fail("http.max_header_bytes", "must be at least 8192 (a token alone may take 8 KiB)")
    return HttpConfig(
        listen=p.address(t, "http.listen", d.listen, optional=True),
        max_header_bytes=header_bytes,
        max_streams=p.positive(t, "http.max_streams", d.max_streams),
        **seconds,
    )
