"""``kvlab convert``: retrofit a trained checkpoint to a smaller KV cache, training-free, per layer.

One file per target (``@register_target``): ``heads`` (GQA/MQA merges), ``mla``, ``share``, ``sliding``,
``quant`` (int8/int4), ``block_sparse``, ``deltanet``, ``keep``. Shared pieces: ``spec`` (the ``--to``
grammar), ``calibrate`` (activation statistics), ``build`` (apply a plan), ``budget`` (per-layer search
under a byte budget), ``report`` (the fidelity report).
"""
