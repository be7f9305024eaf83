"""Whole checkpoints across formats: ``paratrain import-hf`` and ``paratrain export-hf`` (the per-model
state-dict adapters they use live in :mod:`paratrain.hf`)."""
