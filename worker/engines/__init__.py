"""Inference engines and where their weights come from (torch, transformers and vLLM live only here)."""
