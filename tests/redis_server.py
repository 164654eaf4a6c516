"""A real `redis-server` for tests, on a free loopback port (Redis can't bind port 0 and report it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`redis-server` without persistence, bound to 127.0.0.1; `url` once started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server")

    def start(self, *, attempts: int = 5, timeout: float = 20.0, port: int | None = None) -> None:
        binary = self.binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):  # another process may take the port between probe and bind
            chosen = port or _free_port()
            log = self.directory / f"redis-{chosen}.log"
            self.process = subprocess.Popen(
                [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory), "--logfile", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait(chosen, timeout):
                self.url = f"redis://127.0.0.1:{chosen}/0"
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start in {attempts} attempts (logs in {self.directory})")

    def restart(self) -> None:
        """Start again (after `stop`) on the port it had, so clients pointed at `url` find it back."""
        self.start(port=int(self.url.rsplit(":", 1)[1].split("/")[0]))

    def _wait(self, port: int, timeout: float) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
