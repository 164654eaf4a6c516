"""The fuzz targets' corpus replayed through the same harness functions `make fuzz` runs under
atheris (fuzz/harness.py): a few hundred deterministic inputs per target, no atheris needed."""

from __future__ import annotations

import pytest

from fuzz.harness import TARGETS, Finding, envelope, jwt_token, mutations


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays_without_a_finding(target: str) -> None:
    harness = TARGETS[target]
    for data in mutations(target, 400):
        harness(data)  # a Finding or any unexpected exception fails the test with the input's trace


def test_the_harnesses_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A harness that could never report a finding would make the replay and `make fuzz` pointless:
    break each contract on purpose and see it reported."""
    import fuzz.harness as harness

    monkeypatch.setattr(harness.Opener, "open", lambda self, sealed: b"accepted")
    with pytest.raises(Finding, match="accepted"):
        envelope(b"\x00\x04abcdciphertext")

    def crash(token: str) -> None:
        raise KeyError("kid")

    monkeypatch.setattr(harness._keys()[0], "verify", crash)
    with pytest.raises(KeyError):
        jwt_token(b"\x00token")
