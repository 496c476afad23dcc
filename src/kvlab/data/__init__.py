"""Training data: corpora, tokenised streams and synthetic tasks."""
