"""Every Python example in docs/sdk.md runs, as written, against a live stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from control.pki import issue_service_cert
from tests.support import LiveStack

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_the_examples_this_test_expects() -> None:
    assert len(EXAMPLES) == 6


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_sdk_doc_example_runs(echo_stack: LiveStack, tmp_path: Path, index: int) -> None:
    issued = issue_service_cert(
        echo_stack.pki, tenant="acme", service="batch",
        trust_domain=echo_stack.config.auth.mtls.trust_domain, out_dir=tmp_path,
    )  # fmt: skip
    env = {
        **os.environ,
        "AIRLOCK_ADDRESS": echo_stack.address,
        "AIRLOCK_SERVICE_ADDRESS": echo_stack.stack.mtls_address or "",
        "AIRLOCK_CA": str(echo_stack.pki.ca_cert),
        "AIRLOCK_WORKER_CA": str(echo_stack.pki.attest_ca_cert),
        "AIRLOCK_TOKEN": echo_stack.token("acme"),
        "AIRLOCK_CLIENT_CERT": str(issued.cert),
        "AIRLOCK_CLIENT_KEY": str(issued.key),
    }
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLES[index]], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    expected = {  # what each example must print, so a silently broken one fails
        0: ["['echo', 'slow']", "Name one prime number. stop", "Count to five."],
        1: ["['Say hello.', 'Say goodbye.']", "Describe an air gap in one sentence.", "[stop, "],
        2: ["ping"],
        3: ["A batch job says hello."],
        4: ["level software suite mlkem768-x25519", "Only the worker can read this."],
        5: ["fix the request: params.max_tokens INVALID_ARGUMENT"],
    }[index]
    for text in expected:
        assert text in result.stdout, result.stdout
