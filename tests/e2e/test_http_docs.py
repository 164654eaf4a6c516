"""Every curl (```bash) and Python example in docs/http.md runs, as written, against a live stack
(```sh blocks are the reader's setup and are not run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import LiveStack

DOC = Path(__file__).resolve().parents[2] / "docs" / "http.md"
EXAMPLES = re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_the_examples_this_test_expects() -> None:
    assert [kind for kind, _ in EXAMPLES] == ["bash"] * 3 + ["python"] * 3


def _env(stack: LiveStack) -> dict[str, str]:
    return {
        **os.environ,
        "AIRLOCK_HTTP_URL": stack.http_url,
        "AIRLOCK_MODEL": "echo",
        "AIRLOCK_CA": str(stack.pki.ca_cert),
        "AIRLOCK_TOKEN": stack.token("acme"),
    }


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_http_doc_example_runs(echo_stack: LiveStack, index: int) -> None:
    kind, code = EXAMPLES[index]
    argv = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(argv, env=_env(echo_stack), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    if index == 0:
        assert [m["id"] for m in json.loads(out)["data"]] == ["echo", "slow"]
    elif index == 1:
        answer = json.loads(out)
        assert answer["id"] == "chatcmpl-docs-curl-1"
        assert answer["choices"][0]["message"]["content"] == "Say hello."
    elif index == 2:
        events = [e for e in out.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]"
        text = "".join(
            c["choices"][0]["delta"].get("content", "") for c in (json.loads(e[6:]) for e in events[:-1])
        )
        assert text == "Count to five."
    else:
        expected = {
            3: ["['echo', 'slow']", "Name one prime number. stop 4"],
            4: ["Count to five.", "[3 tokens]"],
            5: ["refused: 400 UNSUPPORTED_FIELD n"],
        }[index]
        for text in expected:
            assert text in out, out
