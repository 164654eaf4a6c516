"""Bundled model tokens/s (row 5 of docs/benchmarks.md): the engine alone, in process, vs streamed
through gateway and worker.

The same prompt, greedy decoding and token budget on both paths, one request at a time, in
alternating runs (engine alone, then through the stack, and again) so the noise of this shared
machine hits both alike; the stack must keep >= 95% of the model's own speed. Writes
bench/results/model_tokens.json.

    python bench/model_tokens.py [--quick] [--runs 5] [--max-tokens 128] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_policy import bench_policy_dir  # noqa: E402
from common import RESULTS, Row, print_rows, write_report  # noqa: E402

from airlock import AsyncClient  # noqa: E402
from airlock.types import GenerationSpec, Message, Sampling  # noqa: E402
from control.launcher import Stack  # noqa: E402
from control.tokens import mint_dev_token  # noqa: E402
from gateway import config as config_mod  # noqa: E402

CONFIG = """
[gateway]
max_tokens = 1024

[models.smollm2]
engine = "transformers"

[tenants.bench]
models = ["smollm2"]
"""
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


async def one_stream(stream: AsyncIterator[int]) -> float:
    start = time.perf_counter()
    tokens = sum([t async for t in stream])
    return tokens / (time.perf_counter() - start)


async def alternate(
    stack: Stack, model_dir: Path, runs: int, max_tokens: int
) -> tuple[list[float], list[float]]:
    """tokens/s of `runs` runs per path, alternating (after one warm-up run of each)."""
    from worker.engines.transformers import TransformersEngine

    assert stack.pki is not None  # started by the caller
    engine = TransformersEngine(model_dir)
    token = mint_dev_token(stack.pki, stack.config.auth, tenant="bench", subject="bench")

    async def alone(i: int) -> AsyncIterator[int]:
        spec = GenerationSpec(f"r{i}", "smollm2", (Message("user", PROMPT),), Sampling(max_tokens, 0.0))
        async for out in engine.generate(spec):
            yield out.tokens

    alone_rates, stack_rates = [], []
    async with AsyncClient(stack.address, token=token, ca_cert=stack.pki.ca_cert) as client:

        async def stacked() -> AsyncIterator[int]:
            async for chunk in client.stream(PROMPT, timeout=600, max_tokens=max_tokens, temperature=0.0):
                yield chunk.tokens

        for i in range(runs + 1):
            pair = [(alone_rates, alone(i)), (stack_rates, stacked())]
            for rates, stream in pair if i % 2 else reversed(pair):
                rate = await one_stream(stream)
                if i:  # the first run of each warms up
                    rates.append(rate)
    await engine.close()
    return alone_rates, stack_rates


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short run per path (smoke test)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--state-dir", type=Path, help="reuse a state dir (its converted model); default: temporary"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "model_tokens.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.max_tokens = 1, 8
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        path = Path(tmp) / "bench.toml"
        policy = bench_policy_dir(Path(tmp) / "policy")
        path.write_text(f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG))
        cfg = config_mod.load(path, state_dir=args.state_dir or Path(tmp) / "state")
        from worker.engines.models import resolve_model

        print("converting the bundled model (first use in this state dir)…", file=sys.stderr)
        model_dir = resolve_model("bundled", cfg.model_cache_dir)
        with Stack(cfg, run_dir=Path(tmp) / "run", listen="127.0.0.1:0", log_level="warning") as stack:
            stack.start(timeout=300)
            print(f"{args.runs} runs each, alternating: engine alone / through the stack…", file=sys.stderr)
            alone, stacked = asyncio.run(alternate(stack, model_dir, args.runs, args.max_tokens))
    a, s = statistics.median(alone), statistics.median(stacked)
    rows = [Row("5", "bundled model tokens/s through the stack (median of runs)",
                f"the engine alone {a:.1f} tokens/s", s, "tokens/s", s / a, "≥ 95% of the engine alone",
                0.95 * a, ">=")]  # fmt: skip
    print_rows(rows)
    results = {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "max_tokens": args.max_tokens,
        "engine_alone_tokens_per_s": alone,
        "through_stack_tokens_per_s": stacked,
        "ratio": s / a,
    }
    write_report(args.out, "model_tokens", rows, results, quick=args.quick)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
