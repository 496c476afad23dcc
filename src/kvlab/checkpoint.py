"""kvlab checkpoints on disk (a folder: config.json + model.safetensors): saving, atomic writes, and
the file-level readers and checks ``kvlab.loading`` (the loader behind ``kvlab.load``) builds on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

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
