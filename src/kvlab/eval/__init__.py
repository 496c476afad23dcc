"""Evaluation of trained kvlab models: perplexity, recall, KV memory and speed (``kvlab eval``)."""
