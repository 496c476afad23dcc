"""Property: for random configs mixing every registered technique, the planner's bytes equal the
measured ``cache.nbytes`` after prefill + decode, exactly, at every length."""

import torch
from helpers import build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import model_config

import kvlab


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=model_config(), prefill=st.integers(1, 40), decode=st.integers(0, 12), batch=st.integers(1, 2))
def test_planner_bytes_equal_measured_cache(config, prefill, decode, batch):
    model = build(config)
    cache = model.new_cache(batch)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (batch, prefill + decode), generator=gen)
    with torch.no_grad():
        model(ids[:, :prefill], cache=cache)
        for t in range(prefill, prefill + decode):
            model(ids[:, t:t + 1], cache=cache)
    planned = kvlab.plan(model.config, context=prefill + decode, batch=batch)
    assert [layer.cache_bytes for layer in planned.layers] == cache.layer_nbytes()
    assert planned.total_bytes == cache.nbytes
