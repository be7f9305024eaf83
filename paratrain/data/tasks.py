"""Synthetic sequence-to-sequence tasks with exact answers: reverse, sort and add digits.

Every example is a pure function of ``(seed, split, index)``: it is drawn from its own
``torch.Generator`` (the global RNG is never touched), so any worker can make any example.
Train and val are disjoint by construction: a problem belongs to val exactly when the CRC-32 of
its text is divisible by ``VAL_BUCKETS``, and each split redraws until it gets one of its own.
Tokens are the byte values of the characters ('0'..'9', '+'); specials come from the tokenizer.
"""

from __future__ import annotations

import hashlib
import zlib

import torch
from torch.utils.data import Dataset

from paratrain.config import ConfigError
from paratrain.data.tokenizer import ByteTokenizer, Tokenizer

TASKS = ("reverse", "sort", "add")
SPLITS = ("train", "val")
VAL_BUCKETS = 10  # about one problem in ten belongs to val
IGNORE_INDEX = -100
_MAX_TRIES = 1000


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_of(problem: str) -> str:
    """Which split a problem text belongs to ("train" or "val")."""
    return "val" if zlib.crc32(problem.encode()) % VAL_BUCKETS == 0 else "train"


def _digits(g: torch.Generator, n: int, leading_nonzero: bool = False) -> str:
    d = torch.randint(0, 10, (n,), generator=g).tolist()
    if leading_nonzero and n > 1:
        d[0] = int(torch.randint(1, 10, (1,), generator=g))
    return "".join(map(str, d))


def _draw(task: str, g: torch.Generator, task_len: int) -> tuple[str, str]:
    if task == "reverse":
        s = _digits(g, task_len)
        return s, s[::-1]
    if task == "sort":
        s = _digits(g, task_len)
        return s, "".join(sorted(s))
    la, lb = torch.randint(1, task_len + 1, (2,), generator=g).tolist()
    a, b = _digits(g, la, True), _digits(g, lb, True)
    return f"{a}+{b}", str(int(a) + int(b))


def make_example(task: str, task_len: int, seed: int, split: str, index: int) -> tuple[str, str]:
    """The ``index``-th (problem, answer) pair of ``split``, e.g. ``("12+9", "21")``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (reverse | sort | add)")
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    g = torch.Generator()
    g.manual_seed(derive_seed("task", seed, split, index))
    for _ in range(_MAX_TRIES):
        problem, answer = _draw(task, g, task_len)
        if split_of(problem) == split:
            return problem, answer
    raise ConfigError(
        f"data.task_len = {task_len} leaves too few distinct '{task}' problems for disjoint "
        "train/val splits; raise data.task_len"
    )


def max_lengths(task: str, task_len: int) -> tuple[int, int]:
    """Longest problem and answer (in tokens) for ``task`` at ``task_len`` digits."""
    if task == "add":
        return 2 * task_len + 1, task_len + 1
    return task_len, task_len


def required_seq_len(task: str, task_len: int, arch: str) -> int:
    """The smallest ``data.seq_len`` that holds every example of the task for ``arch``."""
    src, tgt = max_lengths(task, task_len)
    if arch == "seq2seq":
        return max(src, tgt + 1)
    return src + tgt + 2  # [BOS] src [SEP] tgt [EOS] is src+tgt+3 tokens = seq_len + 1


class TaskDataset(Dataset):
    """``n`` examples of a synthetic task, encoded for an encoder-decoder or a decoder-only model.

    ``arch="seq2seq"`` items: ``src`` (digits, PAD-padded to seq_len), ``tgt_in`` ([BOS] + answer,
    PAD-padded), ``labels`` (answer + [EOS], -100 on padding).  ``arch="gpt"`` items:
    ``input_ids`` and ``labels`` from ``[BOS] problem [SEP] answer [EOS]`` padded to seq_len + 1
    and shifted by one; labels are -100 except on the answer and EOS.  All are 1-D LongTensors
    of length ``seq_len``.
    """

    def __init__(self, task: str, n: int, task_len: int, seed: int, split: str = "train",
                 arch: str = "seq2seq", seq_len: int = 32, tokenizer: Tokenizer | None = None) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown task '{task}' (reverse | sort | add)")
        if arch not in ("seq2seq", "gpt"):
            raise ConfigError(f"synthetic tasks need model.arch 'gpt' or 'seq2seq', got {arch!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        need = required_seq_len(task, task_len, arch)
        if seq_len < need:
            raise ConfigError(
                f"data.seq_len = {seq_len} is too short for task {task} with task_len {task_len} "
                f"and arch {arch} (needs >= {need})"
            )
        self.task, self.n, self.task_len, self.seed, self.split = task, n, task_len, seed, split
        self.arch, self.seq_len = arch, seq_len
        self.tokenizer = tokenizer or ByteTokenizer()

    def __len__(self) -> int:
        return self.n

    def example(self, i: int) -> tuple[str, str]:
        """The (problem, answer) text of item ``i``."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} examples")
        return make_example(self.task, self.task_len, self.seed, self.split, i)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        problem, answer = self.example(i)
        s, t = list(problem.encode()), list(answer.encode())
        tok, L = self.tokenizer, self.seq_len
        if self.arch == "seq2seq":
            pad = L - len(t) - 1
            return {
                "src": torch.tensor(s + [tok.pad_id] * (L - len(s))),
                "tgt_in": torch.tensor([tok.bos_id] + t + [tok.pad_id] * pad),
                "labels": torch.tensor(t + [tok.eos_id] + [IGNORE_INDEX] * pad),
            }
        seq = [tok.bos_id, *s, tok.sep_id, *t, tok.eos_id]
        seq += [tok.pad_id] * (L + 1 - len(seq))
        labels = seq[1:]
        first, last = len(s) + 1, len(s) + len(t) + 1  # label positions of the answer and EOS
        labels = [x if first <= j <= last else IGNORE_INDEX for j, x in enumerate(labels)]
        return {"input_ids": torch.tensor(seq[:-1]), "labels": torch.tensor(labels)}
