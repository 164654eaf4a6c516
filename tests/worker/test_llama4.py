"""Llama 4's architecture (MoE text model) served through TransformersEngine, tiny and random.

Maverick itself needs a GPU cluster; a randomly initialised model with the same classes and a few
experts proves the engine path handles the architecture. Its output is noise by design.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig

from airlock.types import GenerationSpec, Message, Sampling
from worker.engines.transformers import TransformersEngine


def build_tiny_llama4(target: Path, tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Llama4TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        intermediate_size_mlp=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        max_position_embeddings=512,
        attention_chunk_size=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config)
    assert any("experts" in name for name, _ in model.named_parameters()), "no MoE layers built"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    for extra in ("chat_template.jinja",):
        if (tokenizer_dir / extra).exists() and not (target / extra).exists():
            shutil.copy(tokenizer_dir / extra, target / extra)


async def test_tiny_llama4_moe_generates_tokens(tmp_path: Path, bundled_model_dir: Path) -> None:
    build_tiny_llama4(tmp_path / "llama4-tiny", bundled_model_dir)
    engine = TransformersEngine(tmp_path / "llama4-tiny")
    assert type(engine.model).__name__ == "Llama4ForCausalLM"
    spec = GenerationSpec(
        "r", "llama4-tiny", (Message("user", "hello"),), Sampling(max_tokens=8, temperature=0.0)
    )
    outs = [o async for o in engine.generate(spec)]
    assert outs[-1].finish_reason in ("stop", "length")
    assert outs[-1].completion_tokens == sum(o.tokens for o in outs) > 0
    await engine.close()
