"""``keep``: the layer as it is (a plan's "no change" entry)."""

from __future__ import annotations

from kvlab.convert.registry import ConvertEnv, LayerWork, register_target


@register_target("keep")
def keep(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Leave the layer unchanged."""
    return work
