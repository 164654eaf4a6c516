"""The converted bundled model is verified by digest before every use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from worker.engines import models


def test_converted_copy_verifies_and_is_reused(bundled_model_dir: Path, state_dir: Path) -> None:
    manifest = json.loads((bundled_model_dir / models.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]
    assert manifest["source_sha256"] == models.sha256_file(models.bundled_gguf())
    mtime = os.stat(bundled_model_dir / "model.safetensors").st_mtime_ns
    assert models.resolve_model("bundled", state_dir / "models") == bundled_model_dir
    assert os.stat(bundled_model_dir / "model.safetensors").st_mtime_ns == mtime  # not converted again


def _fake_copy(tmp_path: Path) -> tuple[Path, str]:
    target = tmp_path / "copy"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"weights")
    files = {name: models.sha256_file(target / name) for name in ("config.json", "model.safetensors")}
    (target / models.MANIFEST).write_text(json.dumps({"source_sha256": "abc", "files": files}))
    return target, "abc"


def test_verify_accepts_an_intact_copy(tmp_path: Path) -> None:
    target, source = _fake_copy(tmp_path)
    assert models._verify(target, source) is None


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda t: (t / "model.safetensors").write_bytes(b"tampered"), "model.safetensors does not match"),
        (lambda t: (t / "config.json").unlink(), "config.json is missing"),
        (lambda t: (t / models.MANIFEST).write_text("not json"), "manifest unreadable"),
    ],
)
def test_verify_names_what_is_wrong(tmp_path: Path, damage, problem: str) -> None:  # type: ignore[no-untyped-def]
    target, source = _fake_copy(tmp_path)
    damage(target)
    assert problem in (models._verify(target, source) or "")


def test_verify_rejects_a_copy_of_another_source(tmp_path: Path) -> None:
    target, _ = _fake_copy(tmp_path)
    assert "different GGUF" in (models._verify(target, "other") or "")


def test_local_directory_must_be_a_model(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match=r"no config\.json"):
        models.resolve_model(str(tmp_path), tmp_path / "cache")
