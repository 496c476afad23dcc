"""Model configuration: global sizes plus one ``LayerSpec`` per layer.

A ``LayerSpec`` names its attention technique (``type``); the technique's registered spec class holds
its parameters. Configs round-trip through JSON (and YAML) and are validated on construction, with
messages that name the offending field (``layers[3].n_kv_heads: ...``).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from kvlab._version import __version__
from kvlab.config_options import (
    BASE_OPTIONS,
    MAX_LAYERS,
    apply_kv_sharing,
    expand_layer_shorthand,
    spec_class,
    validate_decoder_options,
    validate_hyper_connections,
    validate_per_layer_embeddings,
)
from kvlab.errors import ConfigError
from kvlab.typecheck import check_feature_sizes, check_field_types, check_layer_sizes

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}


def canonical_dtype(name: str, field_name: str = "dtype") -> str:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{field_name}: unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return name




def _check_positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value <= 0):
            raise ConfigError(f"{owner}{name}: must be a positive number, got {value!r}")


def _build_dataclass(cls: type, data: dict, where: str):
    """Construct ``cls`` from ``data``, rejecting unknown keys with a message naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        name = unknown[0] if str(unknown[0]).isidentifier() else repr(unknown[0])
        raise ConfigError(f"{where}{name}: unknown field for {cls.__name__}")
    required = [f.name for f in fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in data]
    if required:
        raise ConfigError(f"{where}{required[0]}: missing (required by {cls.__name__})")
    try:
        return cls(**data)
    except TypeError as exc:  # missing required field
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {exc}") from None


_ROPE_SCALING_KEYS = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class RopeConfig:
    """Rotary position embedding. ``scaling`` follows Hugging Face's ``rope_scaling`` dict
    (``{"type": "linear" | "llama3" | "yarn" | ..., "factor": ...}``)."""

    theta: float = 10000.0
    partial: float = 1.0  # fraction of head_dim that is rotated
    interleaved: bool = False  # pairs (0,1),(2,3)... instead of rotate-half (0,d/2),(1,d/2+1)...
    scaling: dict | None = None
    max_position: int | None = None  # the model's max_position_embeddings (YaRN needs it)

    def __post_init__(self) -> None:
        check_field_types(self, "rope.")
        _check_positive("rope.", theta=self.theta, max_position=self.max_position)
        if not 0.0 < self.partial <= 1.0:
            raise ConfigError(f"rope.partial: must be in (0, 1], got {self.partial}")
        if self.scaling is not None and not isinstance(self.scaling, dict):
            raise ConfigError(f"rope.scaling: expected an object or null, got {self.scaling!r}")
        for key, value in (self.scaling or {}).items():  # numbers (or lists of them) and flags, all finite
            values = value if isinstance(value, list) else [value]
            if key not in ("type", "rope_type") and not all(
                    v is None or isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)) for v in values):
                raise ConfigError(f"rope.scaling.{key}: must be a finite number, got {value!r}")
        kind = (self.scaling or {}).get("rope_type", (self.scaling or {}).get("type"))
        for key in _ROPE_SCALING_KEYS.get(kind, ()):
            if not isinstance(self.scaling.get(key), (int, float)) or not math.isfinite(self.scaling[key]):
                raise ConfigError(f"rope.scaling.{key}: required for {kind} scaling, got {self.scaling.get(key)!r}")

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "rope.") -> RopeConfig | None:
        return None if data is None else _build_dataclass(cls, data, where)


@dataclass(kw_only=True)
class LayerSpec(abc.ABC):
    """What one layer's attention is: the config half of a technique (contract: docs/architecture.md).

    A technique subclasses it in ``kvlab/attention/<name>.py`` with ``@register_spec`` and defines
    ``own_cache_bytes`` (abstract: the exact planner rule of its cache layer), ``SUPPORTED_OPTIONS`` (the
    base options below it implements; ``validate`` rejects any other that is not at its default) and
    ``EXAMPLES`` (small configs the test matrix runs); optionally ``validate`` (call super), FLOP rules,
    ``label``, ``attention_pattern`` and ``WIDTH_FIELDS``. Base options: ``kv_from`` (read an earlier
    layer's cache), ``kv_quant*`` (quantized storage), ``output_gate``, ``v_norm``/``k_eq_v``, ``qk_norm``,
    biases; ``rope`` and ``mlp_hidden`` override the model's for any technique.
    """

    type: ClassVar[str] = "base"
    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset()
    EXAMPLES: ClassVar[dict[str, dict]] = {}
    # per-layer fields that are widths (``compare --widen`` scales them); head counts and windows are not
    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim",)
    n_heads: int
    n_kv_heads: int | None = None  # None -> n_heads (MHA)
    head_dim: int | None = None  # None -> d_model // n_heads
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    softmax_scale: float | None = None  # None -> head_dim ** -0.5
    rope: RopeConfig | None = None  # None -> the model's rope
    kv_from: int | None = None  # index of an earlier layer whose cache this layer reads
    kv_quant: str | None = None  # None | "int8" | "int4"
    kv_quant_group: int = 32
    kv_quant_residual: int = 32  # most recent tokens kept in full precision
    mlp_hidden: int | None = None  # None -> the model's mlp_hidden
    output_gate: str | None = None  # None | "head" | "element": softplus gate from the layer input
    v_norm: bool = False  # RMSNorm without weight on values (Gemma 4)
    k_eq_v: bool = False  # no v_proj: values are the raw key projection (then v_norm); Gemma 4 full layers

    def validate(self, where: str) -> None:
        """Check the spec; ``where`` prefixes messages (``layers[i].``). Subclasses extend."""
        check_field_types(self, where)
        _check_positive(where, softmax_scale=self.softmax_scale, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                        mlp_hidden=self.mlp_hidden, kv_quant_group=self.kv_quant_group)
        for name in ("n_heads", "n_kv_heads", "head_dim", "mlp_hidden"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), int):
                raise ConfigError(f"{where}{name}: must be an integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{where}n_kv_heads: n_heads ({self.n_heads}) is not divisible by "
                              f"n_kv_heads ({self.n_kv_heads})")
        if self.kv_quant not in (None, "int8", "int4"):
            raise ConfigError(f"{where}kv_quant: must be null, 'int8' or 'int4', got {self.kv_quant!r}")
        if self.kv_quant_residual < 0:
            raise ConfigError(f"{where}kv_quant_residual: must be >= 0, got {self.kv_quant_residual}")
        if self.kv_quant == "int4" and self.head_dim is not None and self.head_dim % 2:
            raise ConfigError(f"{where}kv_quant: int4 packs two codes per byte; head_dim ({self.head_dim}) "
                              "must be even")
        if self.output_gate not in (None, "head", "element"):
            raise ConfigError(f"{where}output_gate: must be null, 'head' or 'element', got {self.output_gate!r}")
        for name in ("v_norm", "k_eq_v", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}{name}: must be true or false, got {getattr(self, name)!r}")
        defaults = {f.name: f.default for f in fields(LayerSpec)}
        for name in BASE_OPTIONS:
            if name not in self.SUPPORTED_OPTIONS and getattr(self, name) != defaults[name]:
                raise ConfigError(f"{where}{name}: not supported by '{self.type}' layers")

    def resolved(self, cfg: ModelConfig) -> LayerSpec:
        """A copy with the defaults that depend on the model filled in."""
        head_dim = self.head_dim if self.head_dim is not None else cfg.d_model // self.n_heads
        return dataclasses.replace(self, n_kv_heads=self.n_kv_heads or self.n_heads, head_dim=head_dim,
                                   rope=self.rope or cfg.rope, mlp_hidden=self.mlp_hidden or cfg.mlp_hidden)

    # ---- planner rule (called on a resolved spec) ------------------------------------------
    def cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        """Exact bytes this layer's cache holds after ``tokens`` steps (what ``nbytes`` measures): 0 for a
        consumer of another layer's cache (``kv_from``), else the technique's ``own_cache_bytes``."""
        return 0 if self.kv_from is not None else self.own_cache_bytes(tokens, batch, elem_bytes)

    @abc.abstractmethod
    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        """Bytes of the cache layer this technique's module builds, after ``tokens`` steps."""

    def kv_window(self) -> int | None:
        """The window a ``kv_from`` consumer must share with its producer (None: not windowed)."""
        return None

    def accepts_kv_from(self, producer: LayerSpec) -> bool:
        """Whether this layer may read ``producer``'s cache (beyond the same technique, which always may)."""
        return False

    def attention_pattern(self, seq: int):
        """Bool ``[seq, seq]`` (True: query row sees key column) and a caption, for ``kvlab show-mask``."""
        import torch

        return torch.ones(seq, seq, dtype=torch.bool).tril(), self.label()

    def mha_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        """What plain MHA with this layer's query heads would cache: the baseline of every saving."""
        return 2 * batch * self.n_heads * self.head_dim * tokens * elem_bytes

    def attended_pairs(self, seq_len: int) -> int:
        """(query, key) pairs a causal forward over ``seq_len`` tokens computes scores for."""
        return seq_len * (seq_len + 1) // 2

    def decode_flops(self, context: int) -> int:
        """Attention-core FLOPs (QK^T and AV, 2 per multiply-add) of the token that brings the
        context to ``context`` tokens."""
        return 4 * self.n_heads * self.head_dim * (self.attended_pairs(context) - self.attended_pairs(context - 1))

    def prefill_flops(self, seq_len: int) -> int:
        """Attention-core FLOPs of a causal forward over ``seq_len`` tokens."""
        return 4 * self.n_heads * self.head_dim * self.attended_pairs(seq_len)

    def label(self) -> str:
        return self.type

    @property
    def group_size(self) -> int:
        return self.n_heads // (self.n_kv_heads or self.n_heads)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default or f.default is dataclasses.MISSING:
                out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out

    @staticmethod
    def from_dict(data: dict, where: str = "") -> LayerSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"{where.rstrip('.')}: expected an object, got {type(data).__name__}")
        data = dict(data)
        name = data.pop("type", None)
        if name is None:
            raise ConfigError(f"{where}type: missing (the attention technique, e.g. 'full')")
        cls = spec_class(name, where=f"{where}type")
        if "rope" in data:
            data["rope"] = RopeConfig.from_dict(data["rope"], f"{where}rope.")
        return _build_dataclass(cls, data, where)


@dataclass
class ModelConfig:
    """A decoder-only transformer: global sizes plus a per-layer list of attention specs."""

    vocab_size: int
    d_model: int
    n_layers: int
    layers: list[LayerSpec]
    mlp_hidden: int
    mlp_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_embeddings: bool = False
    dtype: str = "float32"
    max_seq_len: int = 4096
    name: str = "kvlab"
    extras: dict = field(default_factory=dict)  # facts an HF family records: "moe_experts", "unsupported"
    hyper_connections: dict | None = None  # mHC residual streams {"streams": 4, ...}; see hyper_connections.py
    # decoder-style options (Gemma 2-4); see model.py and per_layer_embeddings.py
    norm_unit_offset: bool = False  # RMSNorm weights stored as w - 1, applied as (1 + w) (Gemma 1-3)
    sandwich_norms: bool = False  # also norm each sublayer's output (pre/post attention and feed-forward norms)
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(d_model))
    logit_softcap: float | None = None  # final logits -> cap * tanh(logits / cap)
    layer_scalar: bool = False  # a per-layer output scalar (a checkpoint buffer) multiplies each block's output
    per_layer_embeddings: dict | None = None  # {"dim": P, "vocab": V}: Gemma 4's per-layer embeddings (PLE)

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = RopeConfig.from_dict(self.rope)
        if not isinstance(self.layers, list):
            raise ConfigError(f"layers: expected a list of layer specs, got {type(self.layers).__name__}")
        self.layers = [s if isinstance(s, LayerSpec) else LayerSpec.from_dict(s, f"layers[{i}].")
                       for i, s in enumerate(self.layers)]
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        check_field_types(self)
        _check_positive("", vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                        mlp_hidden=self.mlp_hidden, norm_eps=self.norm_eps, max_seq_len=self.max_seq_len)
        for name in ("vocab_size", "d_model", "n_layers", "mlp_hidden", "max_seq_len"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name}: must be an integer, got {getattr(self, name)!r}")
        if self.mlp_act not in ("silu", "gelu_tanh", "gelu"):
            raise ConfigError(f"mlp_act: must be 'silu', 'gelu' or 'gelu_tanh', got {self.mlp_act!r}")
        self.dtype = canonical_dtype(self.dtype)
        validate_hyper_connections(self.hyper_connections)
        validate_decoder_options(self)
        validate_per_layer_embeddings(self.per_layer_embeddings, self.hyper_connections)
        check_feature_sizes(self)
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"n_layers: {self.n_layers} is more than the {MAX_LAYERS} kvlab builds")
        if not isinstance(self.layers, list) or len(self.layers) != self.n_layers:
            count = len(self.layers) if isinstance(self.layers, list) else type(self.layers).__name__
            raise ConfigError(f"layers: has {count} entries but n_layers is {self.n_layers}")
        for i, spec in enumerate(self.layers):
            where = f"layers[{i}]."
            spec.validate(where)
            if spec.head_dim is None and self.d_model % spec.n_heads:
                raise ConfigError(f"{where}head_dim: not given and d_model ({self.d_model}) is not "
                                  f"divisible by n_heads ({spec.n_heads})")
            if spec.kv_quant == "int4" and spec.head_dim is None and (self.d_model // spec.n_heads) % 2:
                raise ConfigError(f"{where}kv_quant: int4 packs two codes per byte; the inferred head_dim "
                                  f"({self.d_model // spec.n_heads}) must be even")
            check_layer_sizes(self, where, spec)
            if spec.kv_from is not None:
                self._validate_kv_from(i, spec)

    def _validate_kv_from(self, i: int, spec: LayerSpec) -> None:
        where = f"layers[{i}].kv_from"
        src = spec.kv_from
        if not isinstance(src, int) or not 0 <= src < i:
            raise ConfigError(f"{where}: must name an earlier layer (0..{i - 1}), got {src!r}")
        producer = self.layers[src]
        if producer.kv_from is not None:
            raise ConfigError(f"{where}: layer {src} itself reuses layer {producer.kv_from}; "
                              f"point at the producer ({producer.kv_from})")
        if producer.type != spec.type and not spec.accepts_kv_from(producer):
            raise ConfigError(f"{where}: layer {src} is '{producer.type}' but this layer is '{spec.type}'")
        if spec.kv_window() is not None and spec.kv_window() != producer.kv_window():
            raise ConfigError(f"{where}: a consumer attends to its producer's keys; its window "
                              f"({spec.kv_window()}) must equal layer {src}'s ({producer.kv_window()})")
        mine, theirs = spec.resolved(self), producer.resolved(self)
        if (mine.n_kv_heads, mine.head_dim) != (theirs.n_kv_heads, theirs.head_dim):
            raise ConfigError(f"{where}: layer {src} has {theirs.n_kv_heads} KV heads of dim "
                              f"{theirs.head_dim}, this layer expects {mine.n_kv_heads} of dim {mine.head_dim}")

    # ---- helpers ----------------------------------------------------------------------------
    def layer(self, i: int) -> LayerSpec:
        """Layer ``i``'s spec with model defaults filled in."""
        return self.layers[i].resolved(self)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rope"] = dataclasses.asdict(self.rope)
        out["layers"] = [s.to_dict() for s in self.layers]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected an object, got {type(data).__name__}")
        data = dict(data)
        data.pop("kvlab_version", None)
        layers = data.get("layers")
        if isinstance(layers, dict):
            data["layers"] = expand_layer_shorthand(layers, data.get("n_layers"))
        if "kv_sharing" in data:  # {"every": k} (CLA-k) or {"last": n} (Gemma 4) -> kv_from per layer
            data["layers"] = apply_kv_sharing(data.pop("kv_sharing"), data.get("layers"))
        return _build_dataclass(cls, data, "")

    def to_json(self) -> str:
        return json.dumps({"kvlab_version": __version__, **self.to_dict()}, indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_config_file(path))


def read_config_file(path: str | Path) -> dict:
    """Parse a JSON or YAML file into a dict, with one-line errors for missing or malformed files."""
    from kvlab.safe_io import read_config

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not (path.exists() or path.is_symlink()):
        raise ConfigError(f"{path}: no such file")
    return read_config(path)
