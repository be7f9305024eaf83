"""Datasets over token shards and synthetic tasks, and the deterministic data-parallel batcher.

All item tensors are 1-D LongTensors of length ``data.seq_len``; labels use -100 for "no loss".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from paratrain.config import Config, ConfigError
from paratrain.data.cache import corpus_for
from paratrain.data.packing import DocWindows
from paratrain.data.shards import TokenStream
from paratrain.data.tasks import IGNORE_INDEX, TaskDataset, derive_seed
from paratrain.data.tokenizer import ByteTokenizer, Tokenizer, special_ids

Batch = dict[str, torch.Tensor]


def _split_windows(n_tokens: int, window: int, split: str, val_fraction: float) -> tuple[int, int]:
    """(first window, number of windows) of ``split``; val is the last ``val_fraction`` of them."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    total = n_tokens // window
    n_val = max(1, int(total * val_fraction)) if val_fraction > 0 else 0
    if total - n_val < 1:
        raise ConfigError(
            f"corpus has {n_tokens} tokens, too few for a training window of {window} tokens "
            "plus validation; use more text or a smaller data.seq_len"
        )
    return (0, total - n_val) if split == "train" else (total - n_val, n_val)


class LMWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: ``{"input_ids": w[:-1], "labels": w[1:]}``."""

    def __init__(self, stream: TokenStream, seq_len: int, split: str = "train",
                 val_fraction: float = 0.0) -> None:
        self.stream, self.seq_len, self.split = stream, seq_len, split
        self.first, self.n = _split_windows(len(stream), seq_len + 1, split, val_fraction)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range for {self.n}")
        start = (self.first + i) * (self.seq_len + 1)
        w = torch.from_numpy(self.stream.slice(start, start + self.seq_len + 1).astype(np.int64))
        return {"input_ids": w[:-1].clone(), "labels": w[1:].clone()}


class MLMWindows(Dataset):
    """Non-overlapping ``seq_len`` windows with BERT masking, fixed per ``(seed, window)``.

    Each non-special token is chosen with probability ``mask_prob`` (at least one per window);
    a chosen token becomes [MASK] 80% of the time, a random ordinary token 10%, itself 10%.
    Items: ``{"input_ids": masked, "labels": original at chosen positions, else -100}``.
    """

    def __init__(self, stream: TokenStream, seq_len: int, split: str = "train", val_fraction: float = 0.0,
                 mask_prob: float = 0.15, tokenizer: Tokenizer | None = None, seed: int = 0) -> None:
        self.stream, self.seq_len, self.split = stream, seq_len, split
        self.mask_prob, self.seed = mask_prob, seed
        self.tokenizer = tokenizer or stream.tokenizer
        self.first, self.n = _split_windows(len(stream), seq_len, split, val_fraction)
        self._special = torch.tensor(sorted(special_ids(self.tokenizer).values()))
        ordinary = torch.ones(self.tokenizer.vocab_size, dtype=torch.bool)
        ordinary[self._special] = False
        self._ordinary = ordinary.nonzero().squeeze(1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range for {self.n}")
        gi = self.first + i
        ids = torch.from_numpy(self.stream.slice(gi * self.seq_len, (gi + 1) * self.seq_len).astype(np.int64))
        g = torch.Generator()
        g.manual_seed(derive_seed("mlm", self.seed, gi))
        L = self.seq_len
        maskable = ~torch.isin(ids, self._special)
        chosen = (torch.rand(L, generator=g) < self.mask_prob) & maskable
        kind = torch.rand(L, generator=g)
        random_ids = self._ordinary[torch.randint(len(self._ordinary), (L,), generator=g)]
        fallback = int(torch.randint(L, (1,), generator=g))
        if not chosen.any() and maskable.any():
            where = maskable.nonzero().squeeze(1)
            chosen[where[fallback % len(where)]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        out = ids.clone()
        out[chosen & (kind < 0.8)] = self.tokenizer.mask_id
        swap = chosen & (kind >= 0.8) & (kind < 0.9)
        out[swap] = random_ids[swap]
        return {"input_ids": out, "labels": labels}


def collate(items: Sequence[Batch]) -> Batch:
    """Stack a list of item dicts into one batch dict."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class DistributedBatches:
    """Endless, deterministic micro-batches for one data-parallel rank.

    Epoch ``e`` uses ``perm_e = torch.randperm(len(dataset))`` from a generator seeded with
    ``seed + e`` (identity without shuffle).  With ``G = batch_size * dp_size`` there are
    ``len(dataset) // G`` micro-batches per epoch; the tail that does not fill a global batch is
    dropped.  Global micro-batch ``k`` is ``j = k % nb`` of epoch ``k // nb`` and this rank takes
    ``perm_e[j*G + rank*batch_size : j*G + (rank+1)*batch_size]``.  Hence one process with batch
    ``2B`` sees exactly what ranks 0 and 1 with batch ``B`` see, concatenated in rank order.
    """

    def __init__(self, dataset: Dataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"data.batch_size = {batch_size} must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.dataset, self.batch_size, self.rank, self.dp_size = dataset, batch_size, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * dp_size
        self.n = len(dataset)
        self.batches_per_epoch = self.n // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"dataset has {self.n} samples, fewer than one global batch of {self.global_batch} "
                f"({batch_size} per rank x {dp_size} ranks); lower data.batch_size"
            )
        self.micro_batch = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (all ranks)."""
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, k: int) -> list[int]:
        """Dataset indices of this rank's part of global micro-batch ``k``."""
        epoch, j = divmod(k, self.batches_per_epoch)
        start = j * self.global_batch + self.rank * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size].tolist()

    def epoch_indices(self, epoch: int) -> list[int]:
        """All indices this rank sees in ``epoch``, in order."""
        k0 = epoch * self.batches_per_epoch
        return [i for k in range(k0, k0 + self.batches_per_epoch) for i in self.indices(k)]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = collate([self.dataset[i] for i in self.indices(self.micro_batch)])
        self.micro_batch += 1
        return batch

    @property
    def epoch(self) -> int:
        """The epoch the next micro-batch belongs to."""
        return self.micro_batch // self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: the index of the next micro-batch."""
        return {"micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by :meth:`state_dict`."""
        k = state.get("micro_batch")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"bad data loader state {state!r}: need {{'micro_batch': int >= 0}}")
        self.micro_batch = k


@dataclass
class DataBundle:
    """What a worker needs from the data side.

    ``task``: "lm" (``input_ids``/``labels``), "lm-docs" (the same over whole documents, padding
    labelled -100: ``data.packing = "docs"``), "mlm" (same keys, masked), "seq2seq-task"
    (``src``/``tgt_in``/``labels``) or "lm-task" (``input_ids``/``labels``, loss on the answer only).
    ``exact_match`` is True for synthetic tasks, where whole answers can be scored.
    """

    train: DistributedBatches
    val_dataset: Dataset
    vocab_size: int
    pad_id: int
    tokenizer: Tokenizer
    task: str
    exact_match: bool
    train_dataset: Dataset | None = None
    seq_len: int = 0


def build_data(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> DataBundle:
    """Datasets and this rank's training batches for ``cfg`` (text corpora come from the cache)."""
    d, arch, seed = cfg.data, cfg.model.arch, cfg.run.seed
    train_ds: Dataset
    val_ds: Dataset
    if d.source.startswith("synthetic:"):
        name = d.source.split(":", 1)[1]
        if arch not in ("gpt", "seq2seq"):
            raise ConfigError(f"model.arch = {arch!r} cannot train on {d.source}; use 'gpt' or 'seq2seq'")
        tok: Tokenizer = ByteTokenizer()
        n_val = max(64, round(d.num_samples * d.val_fraction)) if d.val_fraction > 0 else 0
        train_ds, val_ds = (
            TaskDataset(name, n, d.task_len, seed, split, arch, d.seq_len, tok)
            for split, n in (("train", d.num_samples), ("val", n_val))
        )
        task, exact, vocab = ("seq2seq-task" if arch == "seq2seq" else "lm-task"), True, tok.vocab_size
    else:
        stream = TokenStream(corpus_for(d), verify=d.verify)
        tok, vocab = stream.tokenizer, stream.vocab_size
        if arch == "bert":
            train_ds, val_ds = (
                MLMWindows(stream, d.seq_len, split, d.val_fraction, d.mask_prob, tok, seed)
                for split in ("train", "val")
            )
            task = "mlm"
        elif arch in ("gpt", "llama") and d.packing == "docs":

            train_ds = DocWindows(stream, d.seq_len, "train", d.val_fraction)
            val_ds = DocWindows(stream, d.seq_len, "val", d.val_fraction, bounds=train_ds.bounds)
            task = "lm-docs"
        elif arch in ("gpt", "llama"):
            train_ds, val_ds = (
                LMWindows(stream, d.seq_len, split, d.val_fraction) for split in ("train", "val")
            )
            task = "lm"
        else:
            raise ConfigError(f"model.arch = {arch!r} needs a synthetic:* source, got {d.source!r}")
        exact = False
    train = DistributedBatches(train_ds, d.batch_size, dp_rank, dp_size, seed)
    return DataBundle(train=train, val_dataset=val_ds, vocab_size=vocab, pad_id=tok.pad_id, tokenizer=tok,
                      task=task, exact_match=exact, train_dataset=train_ds, seq_len=d.seq_len)


def val_batches(bundle: DataBundle | Dataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                max_batches: int = 0) -> list[Batch]:
    """This rank's validation micro-batches: the val set in order, sharded like training.

    Global batch ``j`` covers samples ``[j*G, (j+1)*G)`` with ``G = batch_size * dp_size``, capped at
    ``max_batches`` (0: all).  If the val set is smaller than one global batch, every rank gets one
    batch of ``len // dp_size`` samples; an empty list means there is nothing to evaluate.  All
    ranks get the same number of batches.
    """
    ds = bundle.val_dataset if isinstance(bundle, DataBundle) else bundle
    return [collate([ds[i] for i in idx]) for idx in val_index_ranges(len(ds), batch_size, dp_rank, dp_size,
                                                                      max_batches)]


def val_index_ranges(n: int, batch_size: int, dp_rank: int, dp_size: int, max_batches: int = 0) -> list[range]:
    """Sample indices of this rank's val batches over a val set of ``n`` samples (see val_batches)."""
    nb = n // (batch_size * dp_size)
    if nb == 0:
        batch_size, nb = n // dp_size, 1
        if batch_size == 0:
            return []
    if max_batches > 0:
        nb = min(nb, max_batches)
    G = batch_size * dp_size
    return [range(j * G + dp_rank * batch_size, j * G + (dp_rank + 1) * batch_size) for j in range(nb)]
