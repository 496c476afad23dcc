"""Trainer state (optimizer, scheduler, RNG states, data position, step) without pickle: the tensors go to
``trainer_state.safetensors``, everything else to ``trainer_state.json``, which names each tensor by its
key. Python floats round-trip exactly through JSON (``repr``), tensors through safetensors, so a resumed
run is bit-exact; loading never executes anything a file says.

Encoding of the JSON side: dicts with plain string keys stay objects; tuples, dicts with other keys and
non-finite floats become ``{"__tuple__": [...]}``, ``{"__items__": [[k, v], ...]}``, ``{"__float__": "nan"}``;
tensors and numpy arrays become ``{"__tensor__": key}`` / ``{"__ndarray__": key, "dtype": "uint32"}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.errors import KvlabError

TENSORS = "trainer_state.safetensors"
JSON = "trainer_state.json"
_MARKERS = ("__tuple__", "__items__", "__float__", "__tensor__", "__ndarray__")


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return _encode(value.item(), key, tensors)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{i}", tensors)]
                              for i, (k, v) in enumerate(value.items())]}
    raise TypeError(f"trainer state: cannot store a {type(value).__name__} at {key}")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    marker = next((m for m in _MARKERS if m in value), None)
    if marker is None:
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    body = value[marker]
    if marker == "__tuple__" and isinstance(body, list):
        return tuple(_decode(v, tensors, where) for v in body)
    if marker == "__items__" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in body}
    if marker == "__float__" and body in ("nan", "inf", "-inf"):
        return float(body)
    if marker in ("__tensor__", "__ndarray__") and isinstance(body, str):
        if body not in tensors:
            raise KvlabError(f"{where}: tensor {body!r} is missing from {TENSORS}")
        if marker == "__tensor__":
            return tensors[body]
        dtype = value.get("dtype")
        if dtype not in ("uint32", "int32", "int64", "uint64", "float64", "float32"):
            raise KvlabError(f"{where}: unsupported array dtype {dtype!r}")
        return tensors[body].numpy().astype(dtype)
    raise KvlabError(f"{where}: malformed entry {str(value)[:80]}")


def save_state(folder: str | Path, state: dict) -> None:
    """Write ``state`` as ``folder/trainer_state.{json,safetensors}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "state", tensors)
    save_file(tensors, str(folder / TENSORS))
    (folder / JSON).write_text(json.dumps(encoded) + "\n")


def load_state(folder: str | Path) -> dict:
    """The state ``save_state`` wrote; a missing, truncated or forged file is a one-line ``KvlabError``."""
    from kvlab.safe_io import read_json, read_safetensors

    folder = Path(folder)
    where = str(folder / JSON)
    if not (folder / JSON).exists() and (folder / "trainer.pt").exists():
        raise KvlabError(f"{folder / 'trainer.pt'}: a pickle written by an older kvlab; kvlab never unpickles, "
                         "so this run cannot be resumed (start a new one)")
    data = read_json(folder / JSON, what="trainer state")
    tensors = read_safetensors(folder / TENSORS)
    state = _decode(data, tensors, where)
    if not isinstance(state, dict):
        raise KvlabError(f"{where}: expected an object")
    return state


def capture(trainer) -> dict:
    """Everything a resumed ``Trainer`` needs to continue bit-exactly."""
    import dataclasses
    import random

    return {"step": trainer.step, "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "data": trainer.train_data.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "train_config": dataclasses.asdict(trainer.cfg)}


def restore(trainer, state: dict) -> None:
    """Put ``capture``'s dict back: optimizer (shapes checked against the parameters), scheduler, data
    position, RNG states and step."""
    import random

    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for index, entry in state["optimizer"]["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise KvlabError(f"optimizer state {index}.{name}: shape {tuple(value.shape)} does not match "
                                 f"parameter {tuple(params[index].shape)}")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.train_data.load_state_dict(state["data"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.step = int(state["step"])
