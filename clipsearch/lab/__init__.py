"""Measuring and training models: data sets, recall@k, evaluation and contrastive training. May use both
``retrieval`` and ``indexer``."""
