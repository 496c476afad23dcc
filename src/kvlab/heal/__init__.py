"""``kvlab heal``: recover a converted model's quality by distillation from its source model.

Stage 1 (``local``) trains each converted attention layer to reproduce its source layer's output on the
source's own hidden states; stage 2 (``kl``) matches the source's next-token distributions end to end.
Both run on ``kvlab.train.trainer.Trainer`` through its objective and parameter-filter hooks."""

from kvlab.heal.fidelity import FidelityProbe, evaluate_fidelity
from kvlab.heal.select import converted_layers, converted_parameters, trainable_names

__all__ = ["FidelityProbe", "converted_layers", "converted_parameters", "evaluate_fidelity", "trainable_names"]
