"""Capacity planning: does a model fit a domain? weights + KV cache + margin, with the arithmetic shown.

    python -m worker.isolation.plan --model llama4-maverick-fp8 --domain h100 --gpus 8
    (or `airlock plan ...`)

The KV estimate is an upper bound: every layer keeps K and V for the whole context of every
concurrent sequence (Llama 4's chunked-attention layers need less; vLLM pages it in blocks).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace

__all__ = ["DOMAINS", "MODELS", "DomainShape", "ModelShape", "Plan", "PlanError", "plan"]

GiB = 1 << 30
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


class PlanError(Exception):
    """The placement can't fit; the message carries the whole arithmetic."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int  # total parameters (every expert of an MoE: all of them sit in memory)
    dtype: str  # weights
    layers: int
    kv_heads: int
    head_dim: int
    context: int  # tokens per sequence the engine is configured for (vLLM max_model_len)
    kv_dtype: str = "bf16"
    concurrency: int = 1


# Shapes from the models' published configs (Hugging Face config.json, `text_config`):
# Llama 4 Scout 17B-16E and Maverick 17B-128E both have num_hidden_layers=48, num_key_value_heads=8,
# head_dim=128; Meta's model cards give 109B (Scout) and 400B (Maverick) total parameters.
# Context: vLLM's Llama 4 launch notes serve Maverick FP8 on 8xH100 with max_model_len ~430K and
# Scout BF16 with 1M; we plan for those. SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64 (576/9),
# max_position_embeddings 8192, 134.5M parameters.
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama4-maverick-fp8", 400_000_000_000, "fp8", 48, 8, 128, 430_000),
        ModelShape("llama4-maverick-bf16", 400_000_000_000, "bf16", 48, 8, 128, 430_000),
        ModelShape("llama4-scout", 109_000_000_000, "bf16", 48, 8, 128, 1_048_576),
        ModelShape("smollm2-135m", 134_515_008, "bf16", 30, 3, 64, 8192),
    )
}


@dataclass(frozen=True)
class DomainShape:
    name: str
    kind: str  # "gpu", "mig" or "cpu"
    memory_bytes: int  # per device
    devices: int = 1
    margin: float = 0.10  # activations, CUDA graphs, allocator fragmentation (vLLM's 0.9 utilization)

    @property
    def total_bytes(self) -> int:
        return self.memory_bytes * self.devices


# Memory as NVML reports it: H100 80GB HBM3 81559 MiB, H200 143771 MiB. MIG profiles by their
# nominal size (decimal GB, below what NVML reports, so the plan errs on the safe side).
DOMAINS: dict[str, DomainShape] = {
    "h100": DomainShape("H100 80GB", "gpu", 81559 << 20),
    "h200": DomainShape("H200 141GB", "gpu", 143771 << 20),
    "cpu": DomainShape("CPU", "cpu", 16 * GiB, margin=0.25),
}
_MIG = re.compile(r"mig-(\d)g\.(\d+)gb")


def domain_shape(name: str, devices: int = 1) -> DomainShape:
    match = _MIG.fullmatch(name)
    if match:
        base = DomainShape(f"MIG {match[1]}g.{match[2]}gb", "mig", int(match[2]) * 10**9)
    elif name in DOMAINS:
        base = DOMAINS[name]
    else:
        raise PlanError(f"unknown domain {name!r}: one of {', '.join(DOMAINS)} or mig-<N>g.<M>gb")
    return replace(base, devices=devices)


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    domain: DomainShape
    weights: float
    kv: float
    margin: float

    @property
    def needed(self) -> float:
        return self.weights + self.kv + self.margin

    @property
    def fits(self) -> bool:
        return self.needed <= self.domain.total_bytes

    def lines(self) -> list[str]:
        m, d = self.model, self.domain
        per_token = 2 * m.layers * m.kv_heads * m.head_dim * DTYPE_BYTES[m.kv_dtype]
        verdict = (
            f"fits ({_g(d.total_bytes - self.needed)} spare)"
            if self.fits
            else f"does NOT fit ({_g(self.needed - d.total_bytes)} short)"
        )
        return [
            f"model:    {m.name} ({m.params / 1e9:.3g}B parameters, weights {m.dtype}, KV {m.kv_dtype})",
            f"domain:   {d.devices} x {d.name} ({_g(d.memory_bytes)} each) = {_g(d.total_bytes)}",
            f"weights:  {m.params:,} params x {DTYPE_BYTES[m.dtype]:g} B = {_g(self.weights)}",
            f"kv cache: 2 (K,V) x {m.layers} layers x {m.kv_heads} KV heads x {m.head_dim} head dim x "
            f"{DTYPE_BYTES[m.kv_dtype]:g} B = {per_token:,.0f} B/token; x {m.context:,} tokens x "
            f"{m.concurrency} sequence(s) = {_g(self.kv)}",
            f"margin:   {d.margin:.0%} of {_g(d.total_bytes)} = {_g(self.margin)}",
            f"total:    {_g(self.weights)} + {_g(self.kv)} + {_g(self.margin)} = {_g(self.needed)} "
            f"{'<=' if self.fits else '>'} {_g(d.total_bytes)}: {verdict}",
        ]


def _g(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def estimate(model: ModelShape, domain: DomainShape) -> Plan:
    weights = model.params * DTYPE_BYTES[model.dtype]
    kv = 2 * model.layers * model.kv_heads * model.head_dim * DTYPE_BYTES[model.kv_dtype]
    kv *= model.context * model.concurrency
    return Plan(model, domain, weights, kv, domain.margin * domain.total_bytes)


def plan(model: ModelShape, domain: DomainShape) -> Plan:
    """The plan for `model` on `domain`; PlanError (with the arithmetic) when it can't be placed."""
    result = estimate(model, domain)
    if domain.kind == "mig" and domain.devices > 1:
        # MIG slices have no NVLink or CUDA IPC between them: tensor parallelism across slices is out.
        raise PlanError(
            f"{model.name} on {domain.devices} x {domain.name}: MIG slices can't be grouped (no NVLink "
            "or CUDA IPC inside MIG); use whole GPUs\n" + "\n".join(result.lines())
        )
    if not result.fits:
        raise PlanError(f"{model.name} can't be placed on {domain.devices} x {domain.name}:\n" +
                        "\n".join(result.lines()))  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="airlock plan", description="Check that a model fits a domain.")
    p.add_argument("--model", default="smollm2-135m", help=f"preset: {', '.join(MODELS)}")
    p.add_argument("--domain", default="cpu", help=f"{', '.join(DOMAINS)} or mig-<N>g.<M>gb")
    p.add_argument("--gpus", type=int, default=1, help="devices in the domain (tensor parallel size)")
    p.add_argument("--context", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--concurrency", type=int, help="concurrent sequences at full context (default 1)")
    p.add_argument("--kv-dtype", choices=sorted(DTYPE_BYTES), help="KV cache dtype (default bf16)")
    a = p.parse_args(argv)
    if a.model not in MODELS:
        print(f"airlock plan: unknown model {a.model!r}: one of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    model = MODELS[a.model]
    overrides = {"context": a.context, "concurrency": a.concurrency, "kv_dtype": a.kv_dtype}
    model = replace(model, **{k: v for k, v in overrides.items() if v is not None})
    if a.gpus < 1 or model.context < 1 or model.concurrency < 1:
        print("airlock plan: --gpus, --context and --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        result = plan(model, domain_shape(a.domain, a.gpus))
    except PlanError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
