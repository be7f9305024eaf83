"""Losses as (sum, count) pairs, so every parallel layout can normalise by the global count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything in a batch except the labels: the keyword arguments of ``model.forward``."""
    return {k: v for k, v in batch.items() if k != "labels"}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over labelled positions (label -100 is ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The default loss of paratrain's own models: forward, then summed token cross-entropy."""
    return token_loss_sum(model(**model_inputs(batch)), batch["labels"])


def count_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())


@torch.no_grad()
def eval_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss_sum, labelled tokens, exactly-matched samples, samples] for one batch.

    A sample matches exactly when every labelled position's argmax is right; with teacher
    forcing that is the same as greedy decoding producing the whole answer.
    """
    mask = labels != IGNORE
    right = (logits.argmax(-1) == labels) | ~mask
    exact = right.flatten(1).all(dim=1) & mask.flatten(1).any(dim=1)
    return torch.tensor(
        [float(token_loss_sum(logits, labels)), float(mask.sum()), float(exact.sum()), float(labels.shape[0])],
        dtype=torch.float64,
    )
