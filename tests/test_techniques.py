"""The registry drives the tests: every registered technique's ``EXAMPLES`` run through the standard
matrix (``matrix.py``), and guards fail when a technique has no examples, no hypothesis strategy, or
accepts a base option it does not declare."""

from __future__ import annotations

import pytest
import torch
from helpers import model_dict
from matrix import *  # noqa: F401,F403
from strategies import LAYER_STRATEGIES

import kvlab
from kvlab.config_options import BASE_OPTIONS
from kvlab.model import Model, count_parameters
from kvlab.registry import techniques


def example_cases(registry=None) -> dict[str, dict]:
    """``technique/example`` -> matrix case, from each registered spec's own ``EXAMPLES``."""
    registry = registry if registry is not None else techniques()
    return {f"{name}/{example}": model_dict(vocab=61, d_model=32, mlp_hidden=48, **case)
            for name, technique in sorted(registry.items())
            for example, case in technique.spec_cls.__dict__.get("EXAMPLES", {}).items()}


CASES = example_cases()
NAMES = sorted(techniques())


@pytest.mark.parametrize("name", NAMES)
def test_every_technique_declares_its_own_examples(name):
    spec_cls = techniques()[name].spec_cls
    examples = spec_cls.__dict__.get("EXAMPLES")  # its own, not a parent's
    assert examples, f"{spec_cls.__name__} declares no EXAMPLES"
    for example, case in examples.items():
        assert any(kvlab.config.spec_class(layer["type"]).type == name for layer in case["layers"]), example


@pytest.mark.parametrize("name", NAMES)
def test_every_technique_has_a_hypothesis_strategy(name):
    assert name in LAYER_STRATEGIES, f"add a strategy for '{name}' to tests/strategies.py"


def _option_value(option: str):
    return {"kv_from": 0, "kv_quant": "int8", "output_gate": "head"}.get(option, True)


@pytest.mark.parametrize("name, option", [(n, o) for n in NAMES for o in BASE_OPTIONS
                                          if o not in techniques()[n].spec_cls.SUPPORTED_OPTIONS])
def test_undeclared_base_options_are_refused_by_name(name, option):
    example = next(iter(techniques()[name].spec_cls.EXAMPLES.values()))
    layer = next(layer for layer in example["layers"] if layer["type"] == name and "kv_from" not in layer)
    layers = [layer, {**layer, option: _option_value(option)}]
    with pytest.raises(kvlab.ConfigError, match=rf"layers\[1\]\.{option}: not supported by '{name}'"):
        kvlab.ModelConfig.from_dict(model_dict(layers, vocab=61, d_model=32, mlp_hidden=48))


def test_planner_counts_the_parameters_of_the_built_model(case):  # ``case``: every example (conftest)
    config = kvlab.ModelConfig.from_dict({k: v for k, v in case.items() if not k.startswith("_")})
    with torch.device("meta"):
        built = Model(config).num_parameters()
    assert count_parameters(config) == built
