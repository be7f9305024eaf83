"""Knowledge distillation: a smaller student learns from a frozen teacher's logits.

:class:`DistillLoss` follows the trainer's loss convention (``loss_fn(model, batch) ->
summed token loss``), so distillation runs in the ordinary :class:`~paratrain.training.trainer.Trainer`
under any strategy that calls ``loss_fn`` (single process, DDP, ZeRO/FSDP, TP): the teacher is
a plain module on every rank, outside the strategy's wrapping, and only the student trains.
Pipeline parallel computes its loss inside the schedule and does not take a ``loss_fn``.

:func:`finetune` is the in-process driver used by ``paratrain compress`` for fine-tuning,
QAT and distillation alike: the Trainer with a given model and loss, one process, its
metrics written to a run dir of its own.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paratrain.config import Config, ConfigError
from paratrain.models.loss import IGNORE, model_inputs
from paratrain.parallel import ParallelDims
from paratrain.training.spec import RunSpec
from paratrain.training.trainer import Trainer


class DistillLoss:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``, summed over
    the labelled positions (Hinton et al. 2015), where ``_T`` is the softmax at temperature ``T``.

    The ``T^2`` factor keeps the soft-target gradients on the scale of the hard loss.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5) -> None:
        if temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def teacher_logits(self, batch: dict[str, Tensor]) -> Tensor:
        dev = batch["labels"].device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        with torch.no_grad():
            return self.teacher(**model_inputs(batch))

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        labels = batch["labels"]
        mask = labels != IGNORE
        t = self.teacher_logits(batch)[mask].float()
        s = model(**model_inputs(batch))[mask].float()
        T = self.temperature
        loss = F.cross_entropy(s, labels[mask], reduction="sum") * (1.0 - self.alpha)
        if self.alpha > 0:
            kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
            loss = loss + self.alpha * T * T * kl
        return loss


@torch.no_grad()
def teacher_kl(student: nn.Module, teacher: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 over the labelled positions."""
    was = student.training
    student.eval()
    teacher.eval()
    total, n = 0.0, 0
    for b in batches:
        mask = b["labels"] != IGNORE
        s = F.log_softmax(student(**model_inputs(b))[mask].float(), -1)
        t = F.log_softmax(teacher(**model_inputs(b))[mask].float(), -1)
        total += float(F.kl_div(s, t, log_target=True, reduction="sum"))
        n += int(mask.sum())
    student.train(was)
    return total / max(1, n)


def _pick(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices, evenly spread, always including the last."""
    if not 1 <= k <= n:
        raise ConfigError(f"a student needs between 1 and {n} layers, got {k}")
    if k == 1:
        return [n - 1]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def make_student(teacher: nn.Module, n_layer: int, n_dec_layer: int | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping ``n_layer`` evenly spaced blocks (seq2seq: ``n_layer`` encoder
    and ``n_dec_layer`` decoder blocks, default the same), initialized from the teacher's weights
    (as DistilBERT does). Works on pruned teachers too: the blocks are copied, not rebuilt."""
    student = copy.deepcopy(teacher).train()
    student.requires_grad_(True)
    cfg = student.cfg = dataclasses.replace(teacher.cfg)

    def keep(stack: nn.ModuleDict, k: int) -> nn.ModuleDict:
        blocks = list(stack.values())
        return nn.ModuleDict({str(i): blocks[j] for i, j in enumerate(_pick(len(blocks), k))})

    if hasattr(student, "encoder"):
        student.encoder.layers = keep(student.encoder.layers, n_layer)
        n_dec = n_dec_layer or n_layer
        student.decoder.layers = keep(student.decoder.layers, n_dec)
        cfg.n_layer, cfg.n_dec_layer = n_layer, n_dec
    else:
        student.layers = keep(student.layers, n_layer)
        cfg.n_layer = n_layer
    return student


def finetune_config(cfg: Config, run_dir: Path, steps: int, lr: float | None = None,
                    batch_size: int | None = None) -> Config:
    """``cfg`` adapted for an in-process fine-tune: one process, ``steps`` steps, no checkpoints."""
    c = copy.deepcopy(cfg)
    c.run.dir = str(run_dir)
    c.train.steps = steps
    c.train.warmup_steps = min(c.train.warmup_steps, max(0, steps // 10))
    c.train.eval_every = 0
    c.train.hang_timeout_s = 0.0
    if lr is not None:
        c.train.lr = lr
    if batch_size is not None:
        c.data.batch_size = batch_size
    c.parallel.nproc, c.parallel.dp, c.parallel.tp, c.parallel.pp, c.parallel.zero = 1, 0, 1, 1, 0
    c.parallel.sync = "allreduce"
    c.compression.gradient = "none"
    c.checkpoint.every, c.checkpoint.keep, c.checkpoint.resume, c.checkpoint.path = 0, 0, False, ""
    c.validate()
    return c


def finetune(cfg: Config, model: nn.Module, loss_fn: Any = None, steps: int = 100, run_dir: Path | str = "",
             lr: float | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` steps with paratrain's Trainer (one process) on the
    run's training data; ``loss_fn`` defaults to the LM loss. Returns the run summary."""

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    c = finetune_config(cfg, run_dir, steps, lr, batch_size)
    (run_dir / "config.toml").write_text(c.to_toml())
    threads = torch.get_num_threads()
    model.train()
    trainer = Trainer(c, ParallelDims(), RunSpec.from_user(c, model=model, loss_fn=loss_fn))
    try:
        summary = trainer.fit()
    finally:
        trainer.sync.close()
        torch.set_num_threads(threads)
    model.eval()
    return summary
