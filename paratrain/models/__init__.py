"""Single-device model definitions (GPT, Llama, encoder-decoder, BERT) and model accounting.

Parallelism (TP, PP, activation checkpointing, FSDP) is applied from outside; see
:mod:`paratrain.models.blocks` for the module names those layers rely on.
"""

from __future__ import annotations

from torch import nn

from paratrain.config import ModelConfig
from paratrain.models.bert import BERT
from paratrain.models.blocks import (
    AttentionCore,
    Block,
    DecoderBlock,
    DecoderLM,
    FeedForward,
    MultiHeadAttention,
    count_params,
    flops_per_token,
    sinusoidal_positions,
)
from paratrain.models.gpt import GPT
from paratrain.models.llama import Llama
from paratrain.models.seq2seq import Seq2Seq

_ARCHS: dict[str, type[nn.Module]] = {"gpt": GPT, "llama": Llama, "seq2seq": Seq2Seq, "bert": BERT}


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int) -> nn.Module:
    """Construct the model named by ``cfg.arch`` ("gpt" | "llama" | "seq2seq" | "bert")."""
    if cfg.arch not in _ARCHS:
        raise ValueError(f"unknown model.arch {cfg.arch!r} ({' | '.join(_ARCHS)})")
    return _ARCHS[cfg.arch](cfg, vocab_size, pad_id)


__all__ = [
    "BERT",
    "GPT",
    "Llama",
    "AttentionCore",
    "Block",
    "DecoderBlock",
    "DecoderLM",
    "FeedForward",
    "MultiHeadAttention",
    "Seq2Seq",
    "build_model",
    "count_params",
    "flops_per_token",
    "sinusoidal_positions",
]
