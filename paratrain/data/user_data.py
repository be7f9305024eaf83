"""User datasets and iterables of batches as the trainer's batch source.

Two kinds of user data are accepted (``paratrain.train(train_data=..., val_data=...)``):

* a **map-style dataset** (a ``torch.utils.data.Dataset``, or anything with ``__len__`` and
  ``__getitem__`` that is not a list/tuple): sharded exactly like paratrain's own data by
  :class:`~paratrain.data.loader.DistributedBatches` (``data.batch_size`` samples per rank,
  seeded shuffle per epoch, so one process with batch ``2B`` sees what two ranks with ``B`` see),
  and collated by the dataset's own ``collate_fn`` attribute when it has one, else by
  ``torch.utils.data.default_collate``;
* an **iterable of ready batches** (a list, a ``DataLoader``, any re-iterable): read in groups
  of ``dp`` consecutive batches, rank ``r`` takes the ``r``-th of each group; an incomplete
  last group is dropped, so every rank runs the same number of steps.  At the end it is
  iterated again (a new epoch); a one-shot iterator that runs out is an error.

A batch is a tensor, or a (nested) tuple/list/dict of tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from paratrain.config import ConfigError
from paratrain.data.loader import DistributedBatches, val_index_ranges

IGNORE = -100


# ---- batches as nested structures of tensors -------------------------------------------------
def tensor_leaves(batch: Any) -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf of a batch (dicts, lists and tuples are walked)."""
    if isinstance(batch, Mapping):
        for k, v in batch.items():
            for path, leaf in tensor_leaves(v):
                yield f"[{k!r}]{path}", leaf
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            for path, leaf in tensor_leaves(v):
                yield f"[{i}]{path}", leaf
    else:
        yield "", batch


def check_batch(batch: Any, name: str, index: int) -> Any:
    """Return ``batch`` if every leaf is a tensor; else raise a one-line ConfigError."""
    for path, leaf in tensor_leaves(batch):
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(
                f"{name} gave batch {index} with a {type(leaf).__name__} at batch{path}; a batch must be a "
                "tensor or a tuple/list/dict of tensors (give the dataset a collate_fn that builds tensors)"
            )
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device`` (structure and container types kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return moved if type(batch) is dict else _rebuild(batch, moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _rebuild(original: Mapping, items: dict) -> Any:
    try:
        return type(original)(items)
    except Exception:  # a mapping type without a dict constructor: a plain dict works for **kwargs
        return items


def samples_in(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor (1 for a scalar)."""
    for _, leaf in tensor_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0]) if leaf.dim() else 1
    return 1


def count_items(batch: Any) -> int:
    """The weight of a batch's mean loss: labelled tokens (``labels`` != -100) when the batch is a
    dict with a ``labels`` tensor, else its number of samples."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if isinstance(labels, torch.Tensor):
        return int((labels != IGNORE).sum())
    return samples_in(batch)


def tokens_in(batch: Any) -> int:
    """Tokens in a batch (``input_ids`` or ``labels`` elements), else its number of samples."""
    if isinstance(batch, Mapping):
        for key in ("input_ids", "labels"):
            if isinstance(batch.get(key), torch.Tensor):
                return int(batch[key].numel())
    return samples_in(batch)


# ---- sources ------------------------------------------------------------------------------------
def is_map_style(data: Any) -> bool:
    """A dataset indexed by sample (sharded by the distributed sampler) rather than batches to iterate."""
    if isinstance(data, IterableDataset):
        return False
    if isinstance(data, Dataset):
        return True
    if isinstance(data, (list, tuple, Mapping, str, bytes, torch.Tensor)):
        return False
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def collate_items(collate_fn: Callable, items: list, name: str, index: int) -> Any:
    """``collate_fn(items)``, checked; a failure to collate is a one-line ConfigError."""
    try:
        batch = collate_fn(items)
    except (TypeError, RuntimeError) as e:
        kind = type(items[0]).__name__ if items else "nothing"
        raise ConfigError(
            f"{name} items ({kind}) cannot be collated into a batch: {str(e).splitlines()[0]}; "
            "return tensors/numbers (or dicts/tuples of them) from __getitem__, or give the dataset a collate_fn"
        ) from None
    return check_batch(batch, name, index)


class DatasetBatches(DistributedBatches):
    """:class:`DistributedBatches` over a user dataset, collated by its ``collate_fn`` or default_collate."""

    def __init__(self, dataset: Any, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 name: str = "train_data") -> None:
        try:
            super().__init__(dataset, batch_size, dp_rank, dp_size, seed)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        self.name = name
        self.collate_fn = getattr(dataset, "collate_fn", None) or default_collate

    def __next__(self) -> Any:
        items = [self.dataset[i] for i in self.indices(self.micro_batch)]
        batch = collate_items(self.collate_fn, items, self.name, self.micro_batch)
        self.micro_batch += 1
        return batch


class IterableBatches:
    """Ready batches from an iterable: rank ``r`` takes the ``r``-th of every ``dp`` consecutive ones."""

    def __init__(self, source: Iterable, dp_rank: int, dp_size: int, name: str = "train_data") -> None:
        if not isinstance(source, Iterable):
            raise ConfigError(
                f"{name} is a {type(source).__name__}: pass a map-style Dataset or an iterable of batches"
            )
        self.source, self.rank, self.dp, self.name = source, dp_rank, dp_size, name
        self.one_shot = isinstance(source, Iterator)
        self.epoch, self.group = 0, 0  # epoch, and groups of dp batches consumed in it
        self._it: Iterator | None = None

    def __iter__(self) -> Iterator[Any]:
        return self

    def _read_group(self) -> list:
        assert self._it is not None
        return list(itertools.islice(self._it, self.dp))

    def _open(self) -> None:
        """(Re)start iterating the source at the current (epoch, group) position."""
        self._it = iter(self.source)
        for _ in range(self.group):
            if len(self._read_group()) < self.dp:
                raise ConfigError(f"{self.name} is shorter than the position a checkpoint recorded in it")

    def __next__(self) -> Any:
        if self._it is None:
            self._open()
        group = self._read_group()
        if len(group) < self.dp:  # end of an epoch
            if self.group == 0:
                raise ConfigError(f"{self.name} yields fewer than {self.dp} batches (one per data-parallel rank)")
            if self.one_shot:
                raise ConfigError(
                    f"{self.name} ran out after {self.group * self.dp} batches; pass a re-iterable "
                    "(a list, Dataset or DataLoader) instead of an iterator, or lower train.steps"
                )
            self.epoch, self.group = self.epoch + 1, 0
            self._open()
            group = self._read_group()
            if len(group) < self.dp:
                raise ConfigError(f"{self.name} yielded no full group of {self.dp} batches when iterated again")
        index = self.group * self.dp + self.rank
        self.group += 1
        return check_batch(group[self.rank], self.name, index)

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: the epoch and the groups of ``dp`` batches consumed in it."""
        return {"epoch": self.epoch, "group": self.group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by :meth:`state_dict` (the source is re-iterated up to it)."""
        self.epoch, self.group = int(state["epoch"]), int(state["group"])
        self._it = None  # reopened (and fast-forwarded) on the next batch


def train_source(data: Any, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 name: str = "train_data") -> DatasetBatches | IterableBatches:
    """The endless batch source of this rank for a user dataset or iterable of batches."""
    if is_map_style(data):
        return DatasetBatches(data, batch_size, dp_rank, dp_size, seed, name)
    return IterableBatches(data, dp_rank, dp_size, name)


def user_val_batches(data: Any, batch_size: int, dp_rank: int = 0, dp_size: int = 1, max_batches: int = 0,
                     name: str = "val_data") -> list:
    """This rank's validation batches, in order; sharded like :func:`paratrain.data.val_batches`."""
    if not is_map_style(data):
        out, group = [], 0
        it = iter(data)
        while not max_batches or group < max_batches:
            chunk = list(itertools.islice(it, dp_size))
            if len(chunk) < dp_size:
                break
            out.append(check_batch(chunk[dp_rank], name, group * dp_size + dp_rank))
            group += 1
        return out
    collate_fn = getattr(data, "collate_fn", None) or default_collate
    ranges = val_index_ranges(len(data), batch_size, dp_rank, dp_size, max_batches)
    return [collate_items(collate_fn, [data[i] for i in idx], name, j) for j, idx in enumerate(ranges)]


@dataclass
class UserData:
    """The data side of a run on user data (the trainer reads the same fields as from a DataBundle)."""

    train: DatasetBatches | IterableBatches
    val: Any = None
    vocab_size: int = 0
    pad_id: int = 0
    task: str = "user"
    exact_match: bool = False


def precheck(data: Any, batch_size: int, name: str) -> None:
    """Build the first batch of a map-style dataset, or look at the first batch of a list/tuple, so a
    wrong item type is reported before any worker starts (other iterables are checked in the workers)."""
    if is_map_style(data):
        n = min(batch_size, len(data))
        if n:
            collate_items(getattr(data, "collate_fn", None) or default_collate, [data[i] for i in range(n)], name, 0)
    elif isinstance(data, (list, tuple)) and data:
        check_batch(data[0], name, 0)
