"""`airlock up` checks every port it will bind before it starts anything, naming the key."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from control.preflight import PortError, check_ports


def test_a_port_in_use_is_named_by_its_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            PortError, match=rf"gateway.metrics_listen = '127.0.0.1:{port}': the port is in use"
        ):
            check_ports([("gateway.listen", "127.0.0.1:0"), ("gateway.metrics_listen", f"127.0.0.1:{port}")])
    check_ports([("gateway.listen", "127.0.0.1:0"), ("gateway.mtls_listen", "")])  # 0 and "" are skipped
    with pytest.raises(PortError, match="not an address of this host"):
        check_ports([("--listen", "192.0.2.1:7443")])


def test_up_refuses_a_port_in_use_before_it_loads_any_model(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "airlock.toml"
        config.write_text(
            textwrap.dedent(f"""
            [gateway]
            listen = "127.0.0.1:0"
            mtls_listen = "127.0.0.1:{port}"

            [models.smollm2]
            engine = "transformers"

            [tenants.acme]
            models = ["smollm2"]
        """)
        )
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())", "up",
             "--config", str(config), "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"failed to start: gateway.mtls_listen = '127.0.0.1:{port}': the port is in use" in done.stderr
    assert "ready" not in done.stderr  # no worker started, no model loaded
    assert not (tmp_path / "state" / "run" / "worker-acme-smollm2.log").exists()
