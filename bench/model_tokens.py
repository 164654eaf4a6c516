"""Bundled model tokens/s: the engine alone, in process, vs streamed through gateway and worker.

The same prompt, greedy decoding and token budget on both paths, one request at a time; the stack
must not lose the model's own speed. Prints a table and writes bench/results/model_tokens.json.

    python bench/model_tokens.py [--runs 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_policy import bench_policy_dir  # noqa: E402

from airlock import AsyncClient  # noqa: E402
from airlock.types import GenerationSpec, Message, Sampling  # noqa: E402
from gateway import config as config_mod  # noqa: E402
from gateway.stack import Stack  # noqa: E402
from gateway.tokens import mint_dev_token  # noqa: E402

CONFIG = """
[gateway]
max_tokens = 1024

[models.smollm2]
engine = "transformers"

[tenants.bench]
models = ["smollm2"]
"""
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


async def engine_alone(model_dir: Path, runs: int, max_tokens: int) -> list[float]:
    from worker.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_dir)
    rates = []
    for i in range(runs + 1):
        spec = GenerationSpec(f"r{i}", "smollm2", (Message("user", PROMPT),), Sampling(max_tokens, 0.0))
        start = time.perf_counter()
        tokens = sum([o.tokens async for o in engine.generate(spec)])
        if i:  # the first run warms up
            rates.append(tokens / (time.perf_counter() - start))
    await engine.close()
    return rates


async def through_stack(stack: Stack, runs: int, max_tokens: int) -> list[float]:
    assert stack.pki is not None  # started by the caller
    token = mint_dev_token(stack.pki, stack.config.auth, tenant="bench", subject="bench")
    rates = []
    async with AsyncClient(stack.address, token=token, ca_cert=stack.pki.ca_cert) as client:
        for i in range(runs + 1):
            start = time.perf_counter()
            tokens = 0
            async for chunk in client.stream(PROMPT, max_tokens=max_tokens, temperature=0.0):
                tokens += chunk.tokens
            if i:
                rates.append(tokens / (time.perf_counter() - start))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_tokens.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        path = Path(tmp) / "bench.toml"
        policy = bench_policy_dir(Path(tmp) / "policy")
        path.write_text(f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG))
        cfg = config_mod.load(path, state_dir=Path(tmp) / "state")
        from worker.models import resolve_model

        print("converting the bundled model (first use in this state dir)…", file=sys.stderr)
        model_dir = resolve_model("bundled", cfg.model_cache_dir)
        print("engine alone…", file=sys.stderr)
        alone = asyncio.run(engine_alone(model_dir, args.runs, args.max_tokens))
        with Stack(cfg, listen="127.0.0.1:0", log_level="warning") as stack:
            stack.start(timeout=300)
            print("through gateway and worker…", file=sys.stderr)
            stacked = asyncio.run(through_stack(stack, args.runs, args.max_tokens))
    a, s = statistics.median(alone), statistics.median(stacked)
    print(f"\n{'path':<32} {'tokens/s (median)':>18} {'runs':>6}")
    print(f"{'engine alone, in process':<32} {a:>18.1f} {len(alone):>6}")
    print(f"{'gateway -> worker -> engine':<32} {s:>18.1f} {len(stacked):>6}")
    print(f"ratio through stack / alone: {s / a:.3f}")
    report = {
        "benchmark": "model_tokens",
        "model": "SmolLM2-135M-Instruct (bundled)",
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "engine_alone_tokens_per_s": alone,
        "through_stack_tokens_per_s": stacked,
        "ratio": s / a,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
