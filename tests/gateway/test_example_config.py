"""airlock.example.toml documents the defaults: it must parse to exactly the built-in configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway import config as config_mod

ROOT = Path(__file__).resolve().parents[2]


def test_example_file_equals_the_defaults(tmp_path: Path) -> None:
    example = config_mod.load(ROOT / "airlock.example.toml", state_dir=tmp_path)
    defaults = config_mod.load(None, state_dir=tmp_path)
    assert dataclasses.replace(example, source="") == dataclasses.replace(defaults, source="")
