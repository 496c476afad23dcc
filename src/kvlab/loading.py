"""The one place that turns a checkpoint into a model: it reads the files (a kvlab folder, a Hugging Face
folder or a GGUF file, or a named model that resolves to one), maps the tensors through the pure
mappings in ``kvlab.hf`` / ``kvlab.hf.gguf``, validates every tensor's name, shape and dtype against the
model the config builds, and loads them. ``kvlab.load`` is ``load`` here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from kvlab.checkpoint import WEIGHTS, check_state, read_safetensors_file
from kvlab.config import ModelConfig, read_config_file
from kvlab.errors import KvlabError, UnsupportedError
from kvlab.model import TORCH_DTYPES, Model
from kvlab.named_models import resolve


def checkpoint_path(source: str | Path) -> Path:
    """The file or folder ``source`` names (a named model resolved); refused in one line if absent."""
    path = Path(resolve(source))
    if not path.exists():
        raise KvlabError(f"{path}: no such checkpoint folder or file")
    return path


def load(source: str | Path, dtype: str | None = None) -> Model:
    """A model from a kvlab or Hugging Face checkpoint folder, a GGUF file or a named model
    (``kvlab models`` lists them). ``dtype`` (float32, bfloat16, float16) overrides the stored one."""
    path = checkpoint_path(source)
    if is_gguf(path):
        config, state = read_gguf_checkpoint(path, dtype)
        return build_model(config, state, str(path))
    data = read_config_file(path)
    if "kvlab_version" in data:
        config, state = read_kvlab_checkpoint(path, data, dtype)
    else:
        config, state = read_hf_checkpoint(path, data, dtype)
    return build_model(config, state, str(path))


def read_model_config(source: str | Path) -> ModelConfig:
    """The config ``load(source)`` builds, without reading the weights (e.g. to pick a dtype first)."""
    path = checkpoint_path(source)
    if is_gguf(path):
        return read_gguf_config(path)
    data = read_config_file(path)
    if "kvlab_version" in data:
        return ModelConfig.from_dict(data)
    from kvlab.hf import config_from_hf

    return config_from_hf(data, str(path / "config.json"))


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], where: str) -> Model:
    """Build ``config`` on the meta device (no allocation), then take ``state``'s tensors as the
    parameters (validated by ``install_state``) and cast to the config's dtype."""
    with torch.device("meta"):
        model = Model(config)
    install_state(model, state, where, assign=True)
    return model.to(TORCH_DTYPES[config.dtype])


def install_state(model: Model, state: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """Load ``state`` into ``model`` after checking names, shapes and dtypes (one-line errors). Tied
    embeddings take the LM head from ``embed_tokens.weight``. ``assign=False`` copies into the existing
    parameters (their layout and any optimizer's references stay); ``True`` adopts the tensors."""
    tied = model.config.tie_embeddings
    if tied and "embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    check_state(model, state, where)
    check_dtypes(model, state, where)
    model.load_state_dict(state, assign=assign)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
        model.decode_layout_()  # the tied tensor is the LM head too: give it the decode layout again


def check_dtypes(model: Model, state: dict[str, torch.Tensor], where: str) -> None:
    """Floating-point parameters need floating-point tensors (any width: they are cast); anything else
    must match exactly. An integer tensor in a weights file is refused, never silently cast."""
    expected = model.state_dict()
    for name, tensor in state.items():
        want = expected[name].dtype
        if want.is_floating_point != tensor.dtype.is_floating_point or (
                not want.is_floating_point and want != tensor.dtype):
            raise KvlabError(f"{where}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                             f"expected {'a floating-point dtype' if want.is_floating_point else want}")


def _with_dtype(config: ModelConfig, dtype: str | None) -> ModelConfig:
    if dtype:
        config.dtype = dtype
        config.validate()
    return config


# ---- kvlab and Hugging Face folders --------------------------------------------------------------
def read_kvlab_checkpoint(path: Path, data: dict, dtype: str | None) -> tuple[ModelConfig, dict]:
    config = ModelConfig.from_dict({**data, "dtype": dtype} if dtype else data)
    weights = path / WEIGHTS
    if not weights.exists():
        raise KvlabError(f"{path}: config.json found but no {WEIGHTS}")
    return config, read_safetensors_file(weights)


def read_hf_checkpoint(path: Path, hf: dict, dtype: str | None) -> tuple[ModelConfig, dict]:
    from kvlab.hf import config_from_hf, get_family

    where = str(path / "config.json")
    family = get_family(hf, where)
    config = _with_dtype(config_from_hf(hf, where), dtype)
    if family.convert_state is None:
        raise UnsupportedError(f"{path}: model family '{hf['model_type']}' can be planned but not loaded yet")
    return config, family.convert_state(read_hf_weights(path), config)


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: the shards its index names, or every ``*.safetensors`` file."""
    from kvlab.safe_io import weight_files

    files = weight_files(path)  # an index's shard names must stay inside the folder
    if not files:
        raise KvlabError(f"{path}: no .safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors_file(file))
    return state


# ---- GGUF files ------------------------------------------------------------------------------------
def is_gguf(path: str | Path) -> bool:
    """A file named ``*.gguf`` or starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_source(source: str | Path) -> Path | None:
    """The GGUF file ``source`` (a path or a named model) stands for, else None."""
    path = Path(resolve(source))
    return path if is_gguf(path) else None


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # ValueError, struct.error, IndexError on truncated or corrupt files
        raise KvlabError(f"{path}: cannot read GGUF ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None


def gguf_reader(path: str | Path):
    """A ``gguf.GGUFReader`` of ``path`` (cached per file version: parsing the metadata takes seconds
    and the tokenizer, config and weights all need it)."""
    stat = Path(path).stat()
    return _reader(str(path), stat.st_mtime_ns, stat.st_size)


def read_gguf_metadata(path: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A GGUF file's metadata (key -> Python value) and its tensors' shapes in torch order."""
    reader = gguf_reader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    return meta, shapes


def read_gguf_config(path: str | Path) -> ModelConfig:
    from kvlab.hf.gguf import gguf_config

    meta, shapes = read_gguf_metadata(path)
    return gguf_config(meta, shapes, str(path))


def read_gguf_checkpoint(path: Path, dtype: str | None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and kvlab state dict of a GGUF file, every tensor dequantized to the config's dtype."""
    from gguf.quants import dequantize

    from kvlab.hf.gguf import convert_tensor, gguf_config

    meta, shapes = read_gguf_metadata(path)
    config = _with_dtype(gguf_config(meta, shapes, str(path)), dtype)
    target = TORCH_DTYPES[config.dtype]
    state = {}
    for tensor in gguf_reader(path).tensors:
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedError(f"{path}: tensor {tensor.name} has GGML type {tensor.tensor_type.name}, "
                                   "which kvlab cannot dequantize") from None
        except Exception as exc:  # a block count that does not fit the declared shape
            raise KvlabError(f"{path}: tensor {tensor.name} is corrupt ({exc})") from None
        if values.dtype.kind != "f":
            raise UnsupportedError(f"{path}: tensor {tensor.name} has GGML type {tensor.tensor_type.name}, "
                                   "not a floating-point type")
        values = values if values.flags.writeable else values.copy()  # F32 data is a view of the file
        values = torch.from_numpy(values.astype(np.float32, copy=False).reshape(shapes[tensor.name]))
        name, value = convert_tensor(tensor.name, values, meta, str(path))
        state[name] = value.to(target)
    return config, state
