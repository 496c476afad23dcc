"""Apply per-layer steps to a source model: new specs + state dict -> ``kvlab.Model(new_config)``."""

from __future__ import annotations

import torch
from tqdm import tqdm

from kvlab.config import ModelConfig
from kvlab.convert.registry import ConvertEnv, get_target
from kvlab.convert.spec import Step
from kvlab.errors import ConfigError, KvlabError


def needs_calibration(plan: list[list[Step]]) -> bool:
    return any(get_target(name).needs_calibration for steps in plan for name, _ in steps)


def convert_layers(model, plan: list[list[Step]], stats: list, seed: int = 0,
                   progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The converted config and state dict (``plan``: the steps of every layer, in order)."""
    config = model.config
    if len(plan) != config.n_layers:
        raise ConfigError(f"plan: {len(plan)} layer entries for a {config.n_layers}-layer model")
    state = dict(model.state_dict())
    env = ConvertEnv(config, stats, [], seed, state, plan)
    with torch.no_grad():
        for i, steps in enumerate(tqdm(plan, desc="convert", unit="layer", disable=not progress)):
            work = env.source_layer(i)
            for name, opts in steps:
                work = get_target(name).fn(work, opts, env)
            env.done.append(work)
    layers = [w.spec.to_dict() for w in env.done]
    new_config = ModelConfig.from_dict({**config.to_dict(), "layers": layers})
    out = {k: v for k, v in state.items() if not k.startswith("layers.") or ".self_attn." not in k}
    for work in env.done:
        out.update({f"layers.{work.index}.self_attn.{k}": v for k, v in work.weights.items()})
    return new_config, out


def build_model(config: ModelConfig, state: dict[str, torch.Tensor]):
    """``Model(config)`` holding ``state`` (built on the meta device, then the tensors assigned)."""
    from kvlab.checkpoint import check_state
    from kvlab.model import TORCH_DTYPES, Model

    with torch.device("meta"):
        model = Model(config)
    state = dict(state)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    dtype = TORCH_DTYPES[config.dtype]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        check_state(model, state, "convert")
    except KvlabError as exc:
        raise KvlabError(f"internal: converted weights do not fit the converted config ({exc})") from None
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def convert(model, plan: list[list[Step]], stats: list, seed: int = 0, progress: bool = False):
    """The converted model."""
    return build_model(*convert_layers(model, plan, stats, seed, progress))
