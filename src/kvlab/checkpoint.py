"""Saving and loading kvlab checkpoints (a folder: config.json + model.safetensors), and the
``kvlab.load`` entry point, which also accepts Hugging Face checkpoint folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvlab.config import ModelConfig, read_config_file
from kvlab.errors import KvlabError

WEIGHTS = "model.safetensors"


def save_model(model, path: str | Path, overwrite: bool = False) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KvlabError(f"{path}: exists and is not a folder")
    if not overwrite and any((path / name).exists() for name in (WEIGHTS, "config.json")):
        raise KvlabError(f"{path}: already holds a checkpoint (pass overwrite=True / --force to replace it)")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(model.config.to_json() + "\n"))


def atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``target``: a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | Path, dtype: str | None = None):
    """A model from a kvlab or Hugging Face checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise KvlabError(f"{path}: no such checkpoint folder")
    data = read_config_file(path)
    if "kvlab_version" in data:
        return _load_kvlab(path, data, dtype)
    from kvlab.hf import load_hf

    return load_hf(path, data, dtype=dtype)


def _load_kvlab(path: Path, data: dict, dtype: str | None):
    from kvlab.model import Model

    if dtype:
        data = {**data, "dtype": dtype}
    config = ModelConfig.from_dict(data)
    weights = path / WEIGHTS
    if not weights.exists():
        raise KvlabError(f"{path}: config.json found but no {WEIGHTS}")
    with torch.device("meta"):
        model = Model(config)
    state = read_safetensors_file(weights)
    if config.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    check_state(model, state, str(weights))
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    from kvlab.model import TORCH_DTYPES

    return model.to(TORCH_DTYPES[config.dtype])


def read_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a truncated or corrupt file is a one-line ``KvlabError``."""
    from kvlab.safe_io import read_safetensors

    return read_safetensors(file)


def check_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse (one line) a state dict whose names or shapes disagree with ``model``."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KvlabError(f"{where}: weights do not match the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise KvlabError(f"{where}: {name} has shape {tuple(tensor.shape)}, config implies "
                             f"{tuple(expected[name].shape)}")
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise KvlabError(f"{where}: {name} is {tensor.dtype}, expected a {expected[name].dtype} tensor")
