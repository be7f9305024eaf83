"""Shared fixtures: a tiny corpus, tiny configs, and a private data cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from paratrain.config import Config

torch.set_num_threads(1)

TINY_MODEL = [
    "--model.n_layer=2", "--model.n_head=2", "--model.d_model=32", "--model.d_ff=64",
    "--model.max_seq_len=64", "--data.seq_len=32", "--train.warmup_steps=2",
    "--train.eval_every=0", "--train.log_every=1", "--train.eval_batches=2", "--train.threads=1",
]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["PARATRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 200 KB of real Python source as a text corpus."""
    from paratrain.data import stdlib_files

    out = tmp_path_factory.mktemp("corpus")
    text, size = [], 0
    for f in stdlib_files():
        t = f.read_text(errors="replace")
        text.append(t)
        size += len(t)
        if size > 200_000:
            break
    (out / "code.py.txt").write_text("".join(text))
    return out


def tiny_config(run_dir: Path, corpus_dir: Path | None, *overrides: str) -> Config:
    """A tiny GPT config writing to run_dir; text corpus when given."""
    base = list(TINY_MODEL) + [f'--run.dir="{run_dir}"']
    if corpus_dir is not None:
        base.append(f'--data.source="text:{corpus_dir}/*.txt"')
    return Config.load(None, base + list(overrides))
