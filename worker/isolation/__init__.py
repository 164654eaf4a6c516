"""Isolation domains: discovery, capacity plans, the memory arena, canaries and the scrubber."""
