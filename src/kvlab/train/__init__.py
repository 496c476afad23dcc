"""Training loop (single process or torchrun data-parallel)."""
