"""Packing whole documents into training windows (``data.packing = "docs"``).

The default (``concat``) cuts the token stream into windows regardless of documents.  Here each
window of ``seq_len + 1`` tokens holds whole documents, in corpus order, greedily: a document that
does not fit in what is left of the window starts the next one, the rest is padding (``pad_id``
inputs, ``-100`` labels); a document longer than a window is split into window-sized pieces.
Documents are consecutive in the stream, so a window is one contiguous token range and the index
is just the start of every window.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from paratrain.config import ConfigError
from paratrain.data.shards import TokenStream
from paratrain.data.tasks import IGNORE_INDEX

_SCAN = 1 << 22  # tokens read at a time while looking for boundaries


def document_ends(stream: TokenStream) -> np.ndarray:
    """Exclusive end of every document: after each EOS (``eos``/``bos_eos`` boundaries) or before
    each BOS (``bos``); the stream's end closes the last one."""
    tok, boundary = stream.tokenizer, stream.boundary
    marker, shift = (tok.bos_id, 0) if boundary == "bos" else (tok.eos_id, 1)
    found = [np.flatnonzero(stream.slice(a, min(a + _SCAN, len(stream))) == marker) + a + shift
             for a in range(0, len(stream), _SCAN)]
    ends = np.concatenate([*found, np.array([len(stream)])]).astype(np.int64)
    return np.unique(ends[ends > 0])


def pack_windows(ends: np.ndarray, window: int) -> np.ndarray:
    """Window boundaries ``b`` (window ``i`` is tokens ``[b[i], b[i+1])``, at most ``window`` long)."""
    bounds, start, last_end = [0], 0, 0
    for end in ends.tolist():
        if end - start <= window:
            last_end = end
            continue
        if last_end > start:  # close the window after the last whole document that fit
            bounds.append(last_end)
            start = last_end
        while end - start > window:  # a long document: window-sized pieces
            start += window
            bounds.append(start)
        last_end = end
    if last_end > start:
        bounds.append(last_end)
    return np.asarray(bounds, dtype=np.int64)


class DocWindows(Dataset):
    """``{"input_ids", "labels"}`` windows of whole documents, padded (see the module docstring);
    the last ``val_fraction`` of the windows form the val split."""

    def __init__(self, stream: TokenStream, seq_len: int, split: str = "train", val_fraction: float = 0.0,
                 bounds: np.ndarray | None = None) -> None:
        self.stream, self.seq_len, self.pad_id = stream, seq_len, stream.tokenizer.pad_id
        self.bounds = pack_windows(document_ends(stream), seq_len + 1) if bounds is None else bounds
        total = len(self.bounds) - 1
        n_val = max(1, int(total * val_fraction)) if val_fraction > 0 else 0
        if total - n_val < 1:

            raise ConfigError(f"corpus packs into {total} windows of whole documents, too few for training "
                              "plus validation; use more text or data.packing = 'concat'")
        self.first, self.n = (0, total - n_val) if split == "train" else (total - n_val, n_val)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range for {self.n}")
        a, b = int(self.bounds[self.first + i]), int(self.bounds[self.first + i + 1])
        w = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        w[:b - a] = self.stream.slice(a, b)
        ids = torch.from_numpy(w)
        labels = ids[1:].clone()
        labels[b - a - 1:] = IGNORE_INDEX
        return {"input_ids": ids[:-1].clone(), "labels": labels}
