"""The per-layer budget search: never over budget, unreachable budgets named, real menus measured."""

import pytest
import torch
from helpers import build, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.convert import budget as bud
from kvlab.convert.build import convert
from kvlab.convert.calibrate import collect
from kvlab.convert.spec import parse_layer_spec
from kvlab.planner import plan

candidate = st.builds(bud.Candidate, st.just("x"), st.integers(0, 1000), st.floats(0, 10, allow_nan=False))
layers = st.lists(st.lists(candidate, min_size=1, max_size=6), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(layers, st.integers(0, 8000))
def test_search_never_exceeds_budget(cands, budget):
    smallest = sum(min(c.bytes for c in layer) for layer in cands)
    if smallest > budget:
        with pytest.raises(bud.UnreachableBudget) as err:
            bud.search(cands, budget)
        assert err.value.smallest == smallest
        return
    choice = bud.search(cands, budget)
    assert sum(layer[j].bytes for layer, j in zip(cands, choice)) <= budget
    # no single-layer swap that fits lowers the error (greedy reaches a local optimum)
    used = sum(layer[j].bytes for layer, j in zip(cands, choice))
    for layer, j in zip(cands, choice):
        for other in layer:
            if used - layer[j].bytes + other.bytes <= budget and other.bytes >= layer[j].bytes:
                assert other.error >= layer[j].error - 1e-12


@settings(max_examples=5, deadline=None)
@given(st.floats(0.05, 1.0))
def test_real_menu_plan_fits_budget(fraction):
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 3))
    stats = collect(model, torch.randint(0, 97, (1, 64)), progress=False)
    context = 64
    menus = [bud.default_menu(model.config, i, context) for i in range(3)]
    cands = MEASURED.setdefault("c", bud.measure(model, stats, context, menus, chunk=16, progress=False))
    budget = int(fraction * plan(model.config, context=context).total_bytes)
    try:
        choice = bud.search(cands, budget)
    except bud.UnreachableBudget:
        return
    steps = [parse_layer_spec(cands[i][j].step) for i, j in enumerate(choice)]
    conv = convert(model, steps, stats)
    assert plan(conv.config, context=context).total_bytes <= budget
    assert [cands[i][j].bytes for i, j in enumerate(choice)] == [layer.cache_bytes for layer in plan(conv.config, context=context).layers]


MEASURED: dict = {}


def test_keep_costs_nothing_and_full_budget_keeps_everything():
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 2))
    stats = collect(model, torch.randint(0, 97, (1, 64)), progress=False)
    menus = [bud.default_menu(model.config, i, 64) for i in range(2)]
    cands = bud.measure(model, stats, 64, menus, chunk=16, progress=False)
    assert all(layer[0].step == "keep" and layer[0].error == 0 for layer in cands)
    assert all(c.error > 0 for layer in cands for c in layer[1:] if c.step.startswith(("gqa", "mla", "deltanet")))
    choice = bud.search(cands, plan(model.config, context=64).total_bytes)
    assert all(cands[i][j].error == 0 for i, j in enumerate(choice))
