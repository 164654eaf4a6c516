"""Configuration files for the `config.load` tests: written from parts, loaded, or refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load

# The least a valid file needs: one model and one tenant using it.
MINIMAL = """
[models.echo]
engine = "echo"

[tenants.acme]
models = ["echo"]
"""


def write_config(tmp_path: Path, *parts: str) -> Path:
    """`tmp_path/airlock.toml` made of `parts` in order, each dedented."""
    path = tmp_path / "airlock.toml"
    path.write_text("".join(textwrap.dedent(part) for part in parts))
    return path


def load_config(tmp_path: Path, *parts: str) -> Config:
    return load(write_config(tmp_path, *parts), state_dir=tmp_path / "state")


def refused_config(tmp_path: Path, *parts: str) -> ConfigError:
    """The error loading these parts raises; it must name the file, the key and the reason."""
    path = write_config(tmp_path, *parts)
    with pytest.raises(ConfigError) as info:
        load(path, state_dir=tmp_path / "state")
    err = info.value
    assert err.source == str(path)
    assert str(err) == f"{path}: {err.key}: {err.reason}"
    return err
