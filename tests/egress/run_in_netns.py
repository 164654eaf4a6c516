"""Run a whole stack inside a fresh network namespace that has only loopback, serve one request,
and print what the test checks as JSON: interfaces, the answer, the TCP connections the kernel saw.

    python -m tests.egress.run_in_netns CONFIG STATE_DIR RUN_DIR

Exit code 77 means no network namespace could be made here (the test skips with the reason).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import sys
from pathlib import Path

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CONTROL = ("192.0.2.1", 9)  # TEST-NET-1: must be unreachable, and the hook must log the attempt


def enter_loopback_only_namespace() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        print(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        sys.exit(77)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new namespace's lo starts down
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def control_connect() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(CONTROL)
        except OSError as exc:
            return exc.errno or -1
    return 0


def tcp_peers() -> list[str]:
    """Remote addresses of every TCP socket in this namespace (gRPC's C sockets included)."""
    peers = []
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            remote = line.split()[2]
            host = remote.rsplit(":", 1)[0]
            raw = bytes.fromhex(host)
            if len(raw) == 4:
                peers.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                peers.append(socket.inet_ntop(socket.AF_INET6, words))
    return peers


def main() -> int:
    config_path, state_dir, run_dir = (Path(a) for a in sys.argv[1:4])
    enter_loopback_only_namespace()
    from airlock import Client
    from control.launcher import Stack
    from control.tokens import mint_dev_token
    from gateway import config as config_mod

    result: dict[str, object] = {
        "interfaces": [name for _, name in socket.if_nameindex()],
        "control_errno": control_connect(),
        "enetunreach": errno.ENETUNREACH,
    }
    cfg = config_mod.load(config_path, state_dir=state_dir)
    with Stack(cfg, run_dir=run_dir, listen="127.0.0.1:0") as stack:
        stack.start(timeout=600)
        assert stack.pki is not None
        token = mint_dev_token(stack.pki, cfg.auth, tenant="acme", subject="tester")
        with Client(stack.address, token=token, ca_cert=stack.pki.ca_cert) as client:
            answer = client.generate("Say hello.", max_tokens=8, temperature=0.0)
        result["answer_tokens"] = answer.completion_tokens
        result["tcp_peers"] = tcp_peers()
        result["pids"] = {c.name: c.process.pid for c in stack.children()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
