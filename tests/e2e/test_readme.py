"""The README's Python snippet runs as written against a running stack: only its address, the CA's
path, the command's path and its state directory are the ones this test's stack has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import LiveStack

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_snippet_runs(echo_stack: LiveStack, tmp_path: Path) -> None:
    (snippet,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert "token = " in snippet  # defines what it uses
    airlock = tmp_path / "airlock"  # the snippet runs `.venv/bin/airlock`: this checkout's command
    airlock.write_text(f"#!{sys.executable}\nimport sys\nfrom control.cli import main\nsys.exit(main())\n")
    airlock.chmod(0o755)
    state = echo_stack.config.state_dir
    code = (
        snippet.replace('".venv/bin/airlock"', repr(str(airlock)))
        .replace('"--subject", "alice"]', f'"--subject", "alice", "--state-dir", {str(state)!r}]')
        .replace('"127.0.0.1:7443"', repr(echo_stack.address))
        .replace('"~/.local/state/airlock/pki/ca.crt"', repr(str(echo_stack.pki.ca_cert)))
        .replace(
            'client.generate("Hello", max_tokens=32)', 'client.generate("Hello", model="echo", max_tokens=32)'
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello\nTell me a story")
