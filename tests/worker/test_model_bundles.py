"""The worker loads only signed, unaltered model bundles; the bundled model runs signed by default."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from control.launcher import StackError
from control.pki import ensure_dev_pki
from serving.bundle import (
    SIGNATURE,
    create_manifest,
    load_private_key,
    load_trusted_keys,
    sign_bundle,
    verify_bundle,
)
from tests.support import LiveStack
from worker.engines.models import BundlePolicy, ModelError, resolve_model

KEY = ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def trusted(tmp_path: Path) -> Path:
    path = tmp_path / "trusted.pem"
    path.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(b"weights" * 100)
    create_manifest(directory)
    sign_bundle(directory, KEY)
    return directory


def test_a_signed_model_resolves(model_dir: Path, trusted: Path, tmp_path: Path) -> None:
    assert resolve_model(str(model_dir), tmp_path / "cache", BundlePolicy(trusted)) == model_dir


def test_an_unsigned_model_is_refused(model_dir: Path, trusted: Path, tmp_path: Path) -> None:
    (model_dir / SIGNATURE).unlink()
    with pytest.raises(ModelError, match=r"model refused: .*unsigned"):
        resolve_model(str(model_dir), tmp_path / "cache", BundlePolicy(trusted))


def test_an_altered_model_is_refused_naming_the_file(model_dir: Path, trusted: Path, tmp_path: Path) -> None:
    (model_dir / "model.safetensors").write_bytes(b"poisoned")
    with pytest.raises(ModelError, match=r"model\.safetensors differs from the signed manifest"):
        resolve_model(str(model_dir), tmp_path / "cache", BundlePolicy(trusted))


def test_no_trusted_keys_means_no_model(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no trusted keys"):
        resolve_model(str(model_dir), tmp_path / "cache", BundlePolicy(None))


def test_unsigned_models_load_only_when_explicitly_allowed(
    model_dir: Path, trusted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (model_dir / SIGNATURE).unlink()
    with caplog.at_level(logging.WARNING):
        resolve_model(str(model_dir), tmp_path / "cache", BundlePolicy(trusted, require_signed=False))
    assert "UNSIGNED model" in caplog.text
    (model_dir / "config.json").write_text("{}")  # a signature that is present is always checked
    sign_bundle(model_dir, KEY)
    with pytest.raises(ModelError, match=r"config\.json differs"):
        resolve_model(str(model_dir), tmp_path / "cache", BundlePolicy(trusted, require_signed=False))


@pytest.mark.slow
def test_the_bundled_model_is_signed_by_the_dev_bundle_key(bundled_model_dir: Path, state_dir: Path) -> None:
    pki = ensure_dev_pki(state_dir)
    verified = verify_bundle(bundled_model_dir, load_trusted_keys(pki.bundle_trusted))
    assert verified.files >= 3


def test_a_worker_refuses_an_altered_model_and_says_which_file(
    model_dir: Path, tmp_path: Path, state_dir: Path, make_stack: Callable[[str], LiveStack]
) -> None:
    # Signed by the dev bundle key, so only the alteration can be the reason for the refusal.
    sign_bundle(model_dir, load_private_key(ensure_dev_pki(state_dir).bundle_key))
    (model_dir / "model.safetensors").write_bytes(b"poisoned")
    toml = f"""
    [models.tiny]
    engine = "transformers"
    path = "{model_dir}"

    [tenants.acme]
    models = ["tiny"]
    """
    with pytest.raises(StackError) as failed:
        make_stack(textwrap.dedent(toml))
    assert "worker-acme-tiny exited" in str(failed.value)
    assert "model.safetensors differs from the signed manifest" in str(failed.value)
