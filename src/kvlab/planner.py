"""The planner: exact KV-cache bytes and attention FLOPs of any config at any context, without
building the model. Each layer's rule is its spec's ``cache_bytes`` / ``decode_flops`` /
``prefill_flops`` (written beside the technique); this module sums, compares with MHA and fits a
memory budget. Configs come from kvlab JSON/YAML, a Hugging Face ``config.json`` or a preset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from kvlab.config import DTYPE_BYTES, ModelConfig, canonical_dtype, read_config_file
from kvlab.config_options import check_int
from kvlab.errors import ConfigError, KvlabError


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("kvlab.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    path = resources.files("kvlab.presets") / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"preset {name!r} does not exist (presets: {', '.join(preset_names())})")
    return json.loads(path.read_text())


def resolve_config(source: ModelConfig | dict | str | Path) -> ModelConfig:
    """A ModelConfig from a config object, a dict, a preset name, a named model or a file / folder path
    (a GGUF file: its metadata only, the weights stay unread)."""
    if isinstance(source, ModelConfig):
        return source
    where = "config"
    if isinstance(source, (str, Path)):
        where = str(source)
        from kvlab.loading import gguf_source, read_gguf_config

        if (gguf_file := gguf_source(source)) is not None:
            return read_gguf_config(gguf_file)
        if isinstance(source, str) and not Path(source).exists() and source in preset_names():
            data = load_preset(source)
        else:
            data = read_config_file(source)
    else:
        data = source
    if "model_type" in data and "layers" not in data:
        from kvlab.hf import config_from_hf

        return config_from_hf(data, where)
    return ModelConfig.from_dict(data)


@dataclass
class LayerPlan:
    index: int
    type: str
    label: str
    cache_bytes: int
    mha_bytes: int
    decode_flops: int
    prefill_flops: int


@dataclass
class PlanResult:
    name: str
    context: int
    batch: int
    dtype: str
    layers: list[LayerPlan]
    weights_bytes: int | None = None
    budget_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(layer.cache_bytes for layer in self.layers)

    @property
    def mha_bytes(self) -> int:
        return sum(layer.mha_bytes for layer in self.layers)

    @property
    def bytes_per_token(self) -> float:
        """Cache bytes per token per sequence at this context (total / context / batch)."""
        return self.total_bytes / max(self.context, 1) / self.batch

    @property
    def decode_flops(self) -> int:
        return sum(layer.decode_flops for layer in self.layers)

    @property
    def prefill_flops(self) -> int:
        return sum(layer.prefill_flops for layer in self.layers)

    @property
    def max_sequences(self) -> int | None:
        """Sequences of this context that fit in the budget beside the weights."""
        if self.budget_bytes is None:
            return None
        per_sequence = self.total_bytes / self.batch
        free = self.budget_bytes - (self.weights_bytes or 0)
        return max(int(free // per_sequence), 0) if per_sequence else None

    def to_dict(self, per_layer: bool = True) -> dict:
        out = {"name": self.name, "context": self.context, "batch": self.batch, "dtype": self.dtype,
               "total_bytes": self.total_bytes, "bytes_per_token": self.bytes_per_token,
               "mha_equivalent_bytes": self.mha_bytes,
               "reduction_vs_mha": self.mha_bytes / self.total_bytes if self.total_bytes else None,
               "decode_flops_per_token": self.decode_flops, "prefill_flops": self.prefill_flops,
               "weights_bytes": self.weights_bytes, "budget_bytes": self.budget_bytes,
               "max_sequences": self.max_sequences, "notes": self.notes}
        if per_layer:
            out["layers"] = [asdict(layer) for layer in self.layers]
        return out


def weights_bytes(config: ModelConfig, elem_bytes: int) -> int | None:
    """Parameter bytes, from the parameter shapes (``kvlab.model.count_parameters``; None when a layer
    cannot be built, or for a mixture-of-experts model, which kvlab would count as one dense MLP per layer)."""
    from kvlab.errors import UnsupportedError
    from kvlab.model import count_parameters

    if config.extras.get("moe_experts"):
        return None
    try:
        return count_parameters(config) * elem_bytes
    except UnsupportedError:
        return None


def plan(source: ModelConfig | dict | str | Path, context: int = 4096, dtype: str | None = None,
         batch: int = 1, budget_bytes: int | None = None, with_weights: bool | None = None) -> PlanResult:
    """Plan the KV cache of ``source`` holding ``context`` tokens for ``batch`` sequences.

    ``dtype``: cache element type (default: the config's). ``budget_bytes``: total memory for weights
    and caches; the result then says how many sequences fit.
    """
    config = resolve_config(source)
    check_int("context", context)
    check_int("batch", batch)
    dtype = canonical_dtype(dtype or config.dtype, "dtype")
    elem = DTYPE_BYTES[dtype]
    layers = []
    for i in range(config.n_layers):
        spec = config.layer(i)
        layers.append(LayerPlan(i, spec.type, spec.label(), spec.cache_bytes(context, batch, elem),
                                spec.mha_bytes(context, batch, elem), spec.decode_flops(context),
                                spec.prefill_flops(context)))
    result = PlanResult(config.name, context, batch, dtype, layers, budget_bytes=budget_bytes)
    if with_weights or (with_weights is None and budget_bytes is not None):
        result.weights_bytes = weights_bytes(config, elem)
        if result.weights_bytes is None and budget_bytes is not None:
            why = (f"a mixture of {config.extras['moe_experts']} experts, whose weights kvlab does not count"
                   if config.extras.get("moe_experts") else "cannot count its weights")
            raise KvlabError(f"{config.name}: {why}; the KV plan is exact, but --budget needs the weights")
    return result


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or unit == "E":
            return f"{n:.3g} {unit}FLOP"
        n /= 1000
    return f"{n:.3g} EFLOP"


def format_plan(results: list[PlanResult], per_layer: bool = False) -> str:
    """Readable table: one row per context, the MHA-equivalent beside each result."""
    first = results[0]
    lines = [f"{first.name}: {len(first.layers)} layers, cache dtype {first.dtype}, batch {first.batch}"]
    header = (f"{'context':>10} {'KV cache':>12} {'bytes/token':>12} {'MHA-equiv':>12} {'saving':>8} "
              f"{'decode/token':>14} {'prefill':>14}")
    lines += [header, "-" * len(header)]
    for r in results:
        saving = f"{r.mha_bytes / r.total_bytes:.1f}x" if r.total_bytes else "inf"
        lines.append(f"{r.context:>10,} {human_bytes(r.total_bytes):>12} {r.bytes_per_token:>12,.1f} "
                     f"{human_bytes(r.mha_bytes):>12} {saving:>8} {human_flops(r.decode_flops):>14} "
                     f"{human_flops(r.prefill_flops):>14}")
    last = results[-1]
    if last.weights_bytes is not None:
        lines.append(f"weights: {human_bytes(last.weights_bytes)}")
    if last.budget_bytes is not None:
        lines.append(f"budget {human_bytes(last.budget_bytes)}: {last.max_sequences} sequences of "
                     f"{last.context:,} tokens fit beside the weights")
    if per_layer:
        lines += ["", f"per layer at {last.context:,} tokens:",
                  f"{'layer':>5} {'type':>10} {'label':>12} {'KV cache':>12} {'MHA-equiv':>12} {'decode/token':>14}"]
        for layer in last.layers:
            lines.append(f"{layer.index:>5} {layer.type:>10} {layer.label:>12} {human_bytes(layer.cache_bytes):>12} "
                         f"{human_bytes(layer.mha_bytes):>12} {human_flops(layer.decode_flops):>14}")
    lines += last.notes
    return "\n".join(lines)
