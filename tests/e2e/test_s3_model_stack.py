"""End to end: a worker streams the bundled model from the local Ceph RGW (s3://…), verifies it
while it streams, loads it and answers; the same bundle with one object tampered with, or missing,
is refused at start-up with the file named, and the engine never loads it."""

from __future__ import annotations

import secrets
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from control.launcher import StackError
from control.pki import ensure_dev_pki
from serving.bundle import create_manifest, load_private_key, sign_bundle
from serving.remote_bundle import push
from serving.s3 import ObjectStore, S3Settings, S3Url
from tests.ceph import S3Site
from tests.support import LiveStack

pytestmark = pytest.mark.slow


def s3_toml(site: S3Site, url: S3Url) -> str:
    return (
        textwrap.dedent(f"""
        [gateway]
        max_tokens = 512

        [models.smollm2]
        engine = "transformers"
        path = "{url}"

        [tenants.acme]
        models = ["smollm2"]
    """)
        + site.toml()
    )


@pytest.fixture(scope="module")
def store(s3_site: S3Site) -> ObjectStore:
    return ObjectStore(S3Settings(s3_site.endpoint, credentials_file=s3_site.credentials_file))


@pytest.fixture(scope="module")
def model_url(store: ObjectStore, bundled_model_dir: Path) -> S3Url:
    """The bundled model (converted and signed by the dev bundle key) pushed to the store."""
    url = S3Url.parse(f"s3://models-{secrets.token_hex(4)}/smollm2/v1")
    push(store, bundled_model_dir, url)
    return url


async def test_a_model_streamed_from_s3_loads_and_answers(
    make_stack: Callable[[str], LiveStack], s3_site: S3Site, model_url: S3Url
) -> None:
    stack = make_stack(s3_toml(s3_site, model_url))
    async with stack.client("acme") as client:
        answer = await client.generate("What is the capital of France?", max_tokens=16, temperature=0.0)
    assert answer.text.strip() and answer.model == "smollm2"
    log = (stack.stack.run_dir / "worker-acme-smollm2.log").read_text()
    assert "streamed and verified" in log or "cached copy verified" in log


@pytest.fixture
def small_bundle(tmp_path: Path, state_dir: Path) -> Path:
    """A model-shaped bundle signed by the dev bundle key: refused before any weight would load, so
    it need not be the real model (and the store holds the real one only once)."""
    directory = tmp_path / "small"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "tokenizer.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(secrets.token_bytes(300_000))
    create_manifest(directory, name="small")
    sign_bundle(directory, load_private_key(ensure_dev_pki(state_dir).bundle_key))
    return directory


@pytest.mark.parametrize("damage", ["tampered", "missing"])
def test_a_tampered_or_missing_object_is_refused_naming_the_file(
    make_stack: Callable[[str], LiveStack],
    s3_site: S3Site,
    store: ObjectStore,
    small_bundle: Path,
    damage: str,
) -> None:
    url = S3Url.parse(f"s3://models-{secrets.token_hex(4)}/smollm2/{damage}")
    push(store, small_bundle, url)
    if damage == "tampered":
        config = bytearray((small_bundle / "config.json").read_bytes())
        config[-2:-1] = b"a"  # same size, another byte
        store.put(url.bucket, url.key("config.json"), bytes(config))
    else:
        store.delete(url.bucket, url.key("tokenizer.json"))
    with pytest.raises(StackError) as caught:
        make_stack(s3_toml(s3_site, url))
    text = str(caught.value)
    named = "config.json" if damage == "tampered" else "tokenizer.json"
    assert named in text and ("differs from the signed manifest" in text or "is missing" in text), text
