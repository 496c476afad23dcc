"""The decoder: embeddings, a stack of pre-norm blocks whose attention is chosen per layer from the
technique registry, a final norm and the LM head. One model class serves every technique."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from kvlab.attention._common import ForwardContext
from kvlab.cache import Cache
from kvlab.config import ModelConfig
from kvlab.errors import InputError, InputTypeError, KvlabError, UnsupportedError
from kvlab.hyper_connections import HyperConnection, HyperHead, widen
from kvlab.linear_layout import fuse_, group_forward
from kvlab.mlp import GatedMLP
from kvlab.norms import RMSNorm
from kvlab.per_layer_embeddings import PerLayerEmbeddings, PerLayerInput
from kvlab.registry import get_technique

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s attention module: its technique's registered module class."""
    spec = cfg.layer(layer_idx)
    return get_technique(spec.type).module_cls(spec, cfg, layer_idx)


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Parameter names follow Hugging Face's Llama."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        spec = cfg.layer(layer_idx)
        self.layer_idx = layer_idx
        norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, unit_offset=cfg.norm_unit_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = build_attention(cfg, layer_idx)
        self.post_attention_layernorm = norm()  # sandwich_norms: on the attention output, else before the MLP
        self.sandwich = cfg.sandwich_norms
        self.pre_feedforward_layernorm = norm() if self.sandwich else None
        self.post_feedforward_layernorm = norm() if self.sandwich else None
        self.mlp = GatedMLP(cfg.d_model, spec.mlp_hidden, cfg.mlp_act)
        # PLE: a residual update at the end of the block (None without per_layer_embeddings)
        self.per_layer = None if cfg.per_layer_embeddings is None else PerLayerInput(
            cfg.d_model, cfg.per_layer_embeddings["dim"], cfg.norm_eps, cfg.mlp_act, cfg.norm_unit_offset)
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.layer_scalar else None)  # a checkpoint buffer
        hc = cfg.hyper_connections  # mHC around both sublayers (None: plain residual sums)
        self.attn_hc = None if hc is None else HyperConnection(cfg.d_model, hc, cfg.norm_eps)
        self.ffn_hc = None if hc is None else HyperConnection(cfg.d_model, hc, cfg.norm_eps)

    def attention_branch(self, x: torch.Tensor, ctx: ForwardContext, cache_layer) -> torch.Tensor:
        out = self.self_attn(self.input_layernorm(x), ctx, cache_layer)
        return self.post_attention_layernorm(out) if self.sandwich else out

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, h: torch.Tensor, ctx: ForwardContext, cache_layer) -> torch.Tensor:
        """``h [B, S, d]`` -> same (``[B, S, n, d]`` with ``n`` hyper-connection streams). Residuals are
        plain sums unless the config has ``hyper_connections`` (then each sublayer has an mHC site)."""
        attention = lambda x: self.attention_branch(x, ctx, cache_layer)  # noqa: E731
        h = self.residual(h, attention, self.attn_hc)
        h = self.residual(h, self.mlp_branch, self.ffn_hc)
        if self.per_layer is not None:  # ctx.per_layer_inputs [B, S, L, P], set by Model.forward
            h = h + self.per_layer(h, ctx.per_layer_inputs[:, :, self.layer_idx])
        return h if self.layer_scalar is None else h * self.layer_scalar

    @staticmethod
    def residual(h: torch.Tensor, branch, hc: nn.Module | None = None) -> torch.Tensor:
        """``h + branch(h)``; with hyper-connections ``h`` is ``[B, S, n, d]`` and ``hc`` mixes the streams."""
        return h + branch(h) if hc is None else hc(h, branch)


def pad_offsets(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Leading zeros per row of a 0/1 mask ``[B, S]``; None when no row is left-padded. Interior zeros
    are refused (only left and right padding are meaningful for a causal decoder)."""
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise InputTypeError(f"attention_mask: expected 0/1 integers or booleans, got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise InputError("attention_mask: values must be 0 (padding) or 1 (token)")
    mask = attention_mask.to(torch.bool)
    offsets = (~mask).int().cumprod(dim=1).sum(dim=1).long()  # leading zeros
    seq = mask.shape[1]
    steps = torch.arange(seq, device=mask.device)
    real_after = (steps[None, :] >= offsets[:, None])
    # after the first real token, zeros may only form a right-padded tail
    trailing = mask.flip(1).logical_not().int().cumprod(1).flip(1).bool()
    if bool((real_after & ~mask & ~trailing).any()):
        raise KvlabError("attention_mask: zeros inside a row; only left or right padding is supported")
    return offsets if bool(offsets.any()) else None


def _check_buildable(config: ModelConfig) -> None:
    if config.extras.get("unsupported"):  # set by an HF family for configs it can plan but not build
        raise UnsupportedError(f"{config.name}: {config.extras['unsupported']}")


def _outer_modules(config: ModelConfig) -> dict[str, nn.Module | None]:
    """The modules around the blocks, by attribute name (None: the option is off)."""
    ple, hc = config.per_layer_embeddings, config.hyper_connections
    return {
        "embed_tokens": nn.Embedding(config.vocab_size, config.d_model),
        "norm": RMSNorm(config.d_model, config.norm_eps, unit_offset=config.norm_unit_offset),
        "per_layer_embeddings": None if ple is None else PerLayerEmbeddings(
            config.d_model, config.n_layers, ple["dim"], ple.get("vocab", config.vocab_size), config.norm_eps),
        "hc_head": None if hc is None else HyperHead(config.d_model, hc, config.norm_eps),
        "lm_head": nn.Linear(config.d_model, config.vocab_size, bias=False),
    }


def count_parameters(config: ModelConfig) -> int:
    """``Model(config).num_parameters()`` without building the model: each part is made on the meta
    device (no memory, no init) one block at a time, and only its shapes are read."""
    _check_buildable(config)

    def numel(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        outer = _outer_modules(config)
        if config.tie_embeddings:
            outer.pop("lm_head")  # the embedding matrix, counted once
        return sum(map(numel, outer.values())) + sum(numel(Block(config, i)) for i in range(config.n_layers))


class Model(nn.Module):
    DECODE_GROUPS = (("lm_head",),)  # decode weight layout of the head (linear_layout.py)

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_buildable(config)
        self.config = config
        outer = _outer_modules(config)
        self.embed_tokens = outer.pop("embed_tokens")
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        for name, module in outer.items():
            setattr(self, name, module)
        self.pack_linears = False  # pack_linears_(): oneDNN-packed weight copies for decode (opt-in)
        self.reset_parameters()
        self._tie_embeddings()
        self.to(TORCH_DTYPES[config.dtype])
        self.decode_layout_()
        self.register_load_state_dict_post_hook(lambda module, _: module.decode_layout_())

    def _tie_embeddings(self) -> None:
        """``lm_head.weight`` IS ``embed_tokens.weight`` (tied configs). Re-done before the decode layout:
        ``load_state_dict(assign=True)`` gives the two names separate parameters, and a loader's later
        re-tie would otherwise put back the row-major embedding as the head (1.7x slower LM head GEMV)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- construction ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @torch.no_grad()
    def decode_layout_(self) -> None:
        """Lay out the weights of the one-token hot path for decode (``kvlab.linear_layout``): each module's
        ``DECODE_GROUPS`` (full attention: q/k/v fused, o; MLP: gate/up fused, down; the LM head, tied: the
        embedding itself, whose row lookup does not care), column-major and, after ``pack_linears_()``,
        packed for oneDNN. Re-run
        after loading and ``.to()`` (which replace the parameters) and before generating (after training
        updated them in place); a no-op when nothing changed."""
        self._tie_embeddings()
        for module in self.modules():
            for names in getattr(module, "DECODE_GROUPS", ()):
                fuse_(module, names, pack=self.pack_linears)

    def pack_linears_(self, on: bool = True) -> Model:
        """Run the hot-path linears through oneDNN on packed copies of their weights (CPU fp32, and bf16 where
        oneDNN has native bf16), where ``linear_layout.packed_pays`` measures that faster, per weight shape:
        1.1-1.6x per linear at 2 threads on a 2-core EPYC, 2.4x for a batch-16 LM head. Opt-in: it holds one
        more copy of those weights (+540 MB for SmolLM2 in fp32), costs ~0.25 s of measurement per weight
        shape and rows bucket, and its fp32 rounding differs from MKL's (SmolLM2 logits vs fp64: 1.2e-4, not
        5.8e-5)."""
        self.pack_linears = bool(on)
        self.decode_layout_()
        return self

    @contextmanager
    def packed_linears(self) -> Iterator[Model]:
        """``pack_linears_()`` for a ``with`` block only; the packed copies are freed after it (unless the
        model was packed before). Batched serving measurements and ``kvlab generate --packed`` get oneDNN's
        speed while the extra copy lives only as long as they run: a comparison keeps a dozen variants alive."""
        was = self.pack_linears
        self.pack_linears_(True)
        try:
            yield self
        finally:
            self.pack_linears_(was)

    def train(self, mode: bool = True) -> Model:
        """``nn.Module.train``; switching to eval mode also re-packs weights a training step updated in
        place (``decode_layout_``), so inference runs the same arithmetic as after a reload."""
        super().train(mode)
        if not mode:
            self.decode_layout_()
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if hasattr(self, "layers"):  # not while __init__ builds the model
            self.decode_layout_()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in seen.values())
        return total - self.embed_tokens.weight.numel() if exclude_embeddings else total

    def new_cache(self, batch_size: int = 1, max_length: int | None = None,
                  dtype: torch.dtype | None = None) -> Cache:
        """An empty cache for ``batch_size`` rows; ``max_length`` preallocates room for that many tokens
        (refused up front, with the planner's estimate, when it would not fit in memory)."""
        for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length or 0, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputTypeError(f"new_cache: {name} must be an integer, got {value!r}")
            if value < low:
                raise InputError(f"new_cache: {name} must be >= {low}, got {value}")
        if max_length and batch_size * max_length >= 2**16 and self.device.type != "meta":
            from kvlab.safe_io import check_memory

            elem = torch.empty((), dtype=dtype or self.dtype).element_size()  # the spec's planner rule, summed
            need = sum(self.config.layer(i).cache_bytes(max_length, batch_size, elem)
                       for i in range(self.config.n_layers))
            check_memory(need, f"a cache of {batch_size} x {max_length:,} tokens", "ask for fewer tokens",
                         self.device)
        built: list = []
        for block in self.layers:
            built.append(block.self_attn.new_cache_layer(batch_size, dtype or self.dtype, self.device, built))
        cache = Cache(built, batch_size)
        cache.built_for = self.config  # forward refuses a cache built for another model
        if max_length:
            cache.reserve(max_length)
        return cache

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False,
                last_only: bool = False, trace: dict | None = None) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` of ``input_ids [B, S]``. With ``cache``, the tokens continue what the
        cache holds and the cache is extended in place. ``attention_mask`` (1 = token, 0 = padding) may
        cover the new tokens or everything so far; padding must be on the left for cached decoding.
        ``last_only``: logits of the last position only, ``[B, 1, vocab]`` (a prefill needs no more).
        ``trace``: a dict the layers record into (``(layer, name) -> value``: the kernel used, entries read)."""
        self._check_input(input_ids, cache)
        batch, seq = input_ids.shape
        start = cache.step if cache is not None else 0
        pad = self._pad_offset(attention_mask, cache, batch, seq)
        ctx = ForwardContext(batch, seq, start, pad, input_ids.device, trace)
        try:
            h = self.embed(input_ids)
        except IndexError:  # a one-token step skips the range check below: the lookup itself refuses
            raise InputError(f"input_ids: token ids must be in [0, {self.config.vocab_size})") from None
        if self.per_layer_embeddings is not None:
            ctx.per_layer_inputs = self.per_layer_embeddings(input_ids, h)  # [B, S, L, P]
        if self.hc_head is not None:
            h = widen(h, self.hc_head.n)  # [B, S, n, d]
        for i, block in enumerate(self.layers):
            h = block(h, ctx, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.step += seq
        if last_only:
            h = h[:, -1:]
        if self.hc_head is not None:
            h = self.hc_head(h)
        h = self.norm(h)
        if return_hidden:
            return h
        logits = group_forward(self, ("lm_head",), h)[0]
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_input(self, input_ids, cache) -> None:
        """Refuse, with kvlab's errors, what would otherwise fail deep inside torch. Cheap: attribute checks,
        plus one range check (a host sync) only for multi-token inputs, never on the one-token decode path.
        Skipped while ``torch.compile`` traces (it would break the graph)."""
        if torch.compiler.is_compiling():
            return
        if not isinstance(input_ids, torch.Tensor):
            raise InputTypeError(f"input_ids: expected a [B, S] tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise InputError(f"input_ids: expected shape [B, S] with B, S >= 1, got {list(input_ids.shape)}")
        if input_ids.dtype not in ID_DTYPES:
            raise InputTypeError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
        if cache is not None:
            if not isinstance(cache, Cache):
                raise InputTypeError(f"cache: expected a kvlab Cache (model.new_cache()), got {type(cache).__name__}")
            built_for = getattr(cache, "built_for", self.config)
            if len(cache.layers) != self.config.n_layers or (built_for is not self.config and built_for != self.config):
                raise InputError("cache: built for another model; make one with this model's new_cache()")
        if input_ids.shape[1] > 1:  # a prompt or a full forward (the decode path skips this)
            end = (cache.step if cache is not None else 0) + input_ids.shape[1]
            if end > self.config.max_seq_len:
                raise InputError(f"input_ids: {end:,} tokens exceed the model's max_seq_len "
                                 f"({self.config.max_seq_len:,})")
            low, high = torch.aminmax(input_ids)
            if int(low) < 0 or int(high) >= self.config.vocab_size:
                raise InputError(f"input_ids: token ids must be in [0, {self.config.vocab_size}), got "
                                 f"{int(low) if int(low) < 0 else int(high)}")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:  # in the weights' dtype, as Gemma does
            h = h * torch.tensor(self.config.embed_scale, dtype=h.dtype)
        return h

    def _pad_offset(self, attention_mask, cache: Cache | None, batch: int, seq: int) -> torch.Tensor | None:
        if cache is not None and cache.batch_size != batch:
            raise KvlabError(f"cache: built for batch {cache.batch_size}, got input batch {batch}")
        if attention_mask is None:
            return cache.pad_offset if cache is not None else None
        if attention_mask.shape[0] != batch:
            raise KvlabError(f"attention_mask: batch {attention_mask.shape[0]} != input batch {batch}")
        start = cache.step if cache is not None else 0
        if attention_mask.shape[1] == start + seq and start:
            attention_mask = attention_mask[:, start:]
        elif attention_mask.shape[1] != seq:
            raise KvlabError(f"attention_mask: length {attention_mask.shape[1]} fits neither the new tokens "
                             f"({seq}) nor all tokens ({start + seq})")
        if start == 0:
            pad = pad_offsets(attention_mask)
            if cache is not None:
                cache.pad_offset = pad
            return pad
        if not bool(attention_mask.bool().all()):
            raise KvlabError("attention_mask: padding after the first forward is not supported; left-pad prompts")
        return cache.pad_offset

    # ---- generation and persistence -----------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """See ``kvlab.generate.generate``."""
        from kvlab.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``model.safetensors`` to the folder ``path``."""
        from kvlab.checkpoint import save_model

        save_model(self, path, overwrite=overwrite)
