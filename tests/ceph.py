"""A real single-node Ceph for tests: one monitor, one memstore OSD and radosgw (S3) on loopback.

Started once per test session (tests/conftest.py, fixture `s3_site`) from the Debian packages
`ceph-mon ceph-osd radosgw ceph-common` (scripts/bootstrap.sh installs them as root), in a
temporary directory, with authentication off between the daemons (loopback only) and an S3 user
made with `radosgw-admin`. Every daemon runs in the foreground as a child that dies with the test
process (a parent-death signal), so an interrupted session leaves nothing running.

Facts this relies on (Ceph 16, pacific): with `auth * required = none` the daemons also need
`ms * mode = crc secure`, or radosgw loops on `get_initial_auth_request returned -13`; memstore
needs no disk (`memstore device bytes` is its size); a first start takes about 10-15 s.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
# The child asks for SIGTERM when its parent (this test process) dies, checks the parent is still
# there (it may have died before prctl ran), then becomes the daemon.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def unavailable() -> str | None:
    """Why a local Ceph can't run here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"Ceph is not installed ({', '.join(missing)} missing; scripts/bootstrap.sh installs "
            "ceph-mon ceph-osd radosgw ceph-common with apt as root)"
        )
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed (the gateway and worker extras have it)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class S3Site:
    """What a client needs: the endpoint and a user's keys (tests put them in a 0600 file)."""

    endpoint: str
    access_key: str
    secret_key: str
    credentials_file: Path

    def toml(self) -> str:
        """The `[s3]` section of a configuration that uses this store."""
        return f'[s3]\nendpoint = "{self.endpoint}"\ncredentials_file = "{self.credentials_file}"\n'


class CephCluster:
    """mon + memstore OSD + radosgw in `directory`; `site` once started."""

    def __init__(self, directory: Path, *, memstore_bytes: int = 3 << 30) -> None:
        self.directory = directory
        self.memstore_bytes = memstore_bytes
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.rgw_port = 0
        self.site: S3Site | None = None
        self.started_in = 0.0  # seconds the first start took

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    def start(self, *, timeout: float = 120.0, attempts: int = 3) -> S3Site:
        t0 = time.monotonic()
        for attempt in range(attempts):  # another process may take a port between probe and bind
            try:
                self.site = self._start_once(time.monotonic() + timeout, attempt)
                self.started_in = time.monotonic() - t0
                return self.site
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, deadline: float, attempt: int) -> S3Site:
        d = self.directory / f"cluster{attempt}"
        if d.exists():
            shutil.rmtree(d)
        for sub in ("mon", "osd/ceph-0", "run", "log", "rgw"):
            (d / sub).mkdir(parents=True)
        self.base = d
        mon_port, self.rgw_port = _free_port(), _free_port()
        fsid = str(uuid.uuid4())
        self.conf.write_text(
            _CONF.format(
                fsid=fsid, dir=d, mon_port=mon_port, rgw_port=self.rgw_port, memstore=self.memstore_bytes
            )
        )
        self._run(
            [
                "monmaptool",
                "--create",
                "--fsid",
                fsid,
                "--addv",
                "a",
                f"[v2:127.0.0.1:{mon_port}]",
                str(d / "monmap"),
            ],
            deadline,
        )
        self._run(
            ["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(d / "monmap")], deadline
        )
        self._daemon("mon", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
        self._run(["ceph", "-c", str(self.conf), "--connect-timeout", "30", "osd", "create"], deadline)
        self._run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs"], deadline)
        self._daemon("osd", ["ceph-osd", "-f", "-c", str(self.conf), "-i", "0"])
        self.start_rgw(deadline=deadline)
        access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
        self._run(
            [
                "radosgw-admin",
                "-c",
                str(self.conf),
                "user",
                "create",
                "--uid",
                "airlock-test",
                "--display-name",
                "airlock tests",
                "--access-key",
                access,
                "--secret",
                secret,
            ],
            deadline,
        )
        credentials = self.directory / "s3.credentials"
        credentials.write_text(f"access_key_id = {access}\nsecret_access_key = {secret}\n")
        credentials.chmod(0o600)
        return S3Site(f"http://127.0.0.1:{self.rgw_port}", access, secret, credentials)

    def start_rgw(self, *, deadline: float | None = None) -> None:
        """Start radosgw (again, after `stop_rgw`) on its port and wait until it answers."""
        deadline = deadline or time.monotonic() + 60
        self._daemon("rgw", ["radosgw", "-f", "-c", str(self.conf), "-n", "client.rgw"])
        url = f"http://127.0.0.1:{self.rgw_port}/"
        while time.monotonic() < deadline:
            if self.processes["rgw"].poll() is not None:
                raise RuntimeError(f"radosgw exited {self.processes['rgw'].returncode}{self._logs()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (anonymous listing refused): up
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"radosgw did not answer on {url} in time{self._logs()}")

    def stop_rgw(self) -> None:
        """Take the S3 endpoint away (the cluster behind it stays): an outage of the store."""
        self._stop("rgw")

    def stop(self) -> None:
        """Everything goes: the data is the session's only, so nothing waits for a clean shutdown
        (memstore would write its whole contents to disk on SIGTERM)."""
        for name in ("rgw", "osd", "mon"):
            self._stop(name, kill=True)

    def _stop(self, name: str, *, kill: bool = False) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.kill() if kill else process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = (self.base / "log" / f"{name}.out").open("ab")
        shim = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())]
        self.processes[name] = subprocess.Popen(
            [*shim, shutil.which(cmd[0]) or cmd[0], *cmd[1:]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def _run(self, cmd: list[str], deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"Ceph did not start in time (at {cmd[0]}){self._logs()}")
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd[:3])} timed out{self._logs()}") from None
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd[:3])} exited {done.returncode}: {out}{self._logs()}")

    def _logs(self) -> str:
        tails = []
        for path in sorted((self.base / "log").glob("*")):
            text = path.read_bytes()[-1500:].decode(errors="replace")
            tails.append(f"\n--- {path.name}:\n{text}")
        return "".join(tails)


# One node, no authentication between daemons (loopback only; the S3 API still requires the
# user's signed requests), size 1 pools with few PGs (no manager runs to autoscale them).
_CONF = """[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
ms cluster mode = crc secure
ms service mode = crc secure
ms client mode = crc secure
ms mon cluster mode = crc secure
ms mon service mode = crc secure
ms mon client mode = crc secure
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
crash dir = {dir}/crash
mon data = {dir}/mon/$cluster-$id
osd data = {dir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore}
keyring = /dev/null
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {dir}/rgw
"""
