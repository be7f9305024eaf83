"""Memory-mapped token shards: their format, validated reading and verification.

A shard directory holds ``shard_00000.bin``, ``shard_00001.bin``, ... (raw little-endian uint16
tokens, or uint32 for vocabularies over 65536 ids, documents separated by boundary tokens),
optionally ``tokenizer.json`` (BPE or a Hugging Face tokenizer), and ``meta.json``.  The shards
are written by :func:`paratrain.data.prepare.prepare`.
``meta.json`` is written last and atomically, so a directory without it is never used.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.config import ConfigError
from paratrain.data.tokenizer import Tokenizer, tokenizer_of_shards
from paratrain.fileio import sha256_file

FORMAT = "paratrain-shards"
VERSION = 1
META = "meta.json"
DTYPE = np.dtype("<u2")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB per uint16 shard


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 tokens when every id fits, else uint32."""
    return DTYPES["uint16"] if vocab_size <= 1 << 16 else DTYPES["uint32"]


def shard_name(i: int) -> str:
    """File name of shard number ``i``."""
    return f"shard_{i:05d}.bin"


class Sink:
    """Tokens -> a fixed-size buffer -> consecutive shard files, hashed as they are written."""

    def __init__(self, out_dir: Path, shard_tokens: int, buffer_tokens: int, dtype: np.dtype = DTYPE) -> None:
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.buf, self.n, self.total = np.empty(max(1, buffer_tokens), dtype), 0, 0
        self.shards: list[dict[str, Any]] = []
        self._f, self._hash, self._in_shard = None, hashlib.sha256(), 0

    def append(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, len(self.buf) - self.n)
            self.buf[self.n:self.n + take] = tokens[pos:pos + take]  # casts to the shard dtype in place
            self.n, pos = self.n + take, pos + take
            if self.n == len(self.buf):
                self.flush()
        self.total += len(tokens)

    def flush(self) -> None:
        pos = 0
        while pos < self.n:
            if self._f is None:
                self._f = open(self.out_dir / shard_name(len(self.shards)), "wb")
                self._hash, self._in_shard = hashlib.sha256(), 0
            take = min(self.n - pos, self.shard_tokens - self._in_shard)
            view = memoryview(self.buf[pos:pos + take])
            self._f.write(view)
            self._hash.update(view)
            self._in_shard, pos = self._in_shard + take, pos + take
            if self._in_shard == self.shard_tokens:
                self._end_shard()
        self.n = 0

    def _end_shard(self) -> None:
        self._f.close()
        self._f = None
        self.shards.append({"file": shard_name(len(self.shards)), "tokens": self._in_shard,
                            "sha256": self._hash.hexdigest()})

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        if self._f is not None:
            self._end_shard()
        return self.shards


def _bad(d: Path, problem: str) -> ConfigError:
    return ConfigError(f"shards dir {d} {problem}; re-run `paratrain prepare SOURCE --out {d}`")


def read_meta(shard_dir: str | Path, verify: bool = False) -> dict[str, Any]:
    """Load and check ``meta.json`` and the shard files it lists (sizes; contents if ``verify``)."""
    d = Path(shard_dir)
    path = d / META
    if not path.is_file():
        raise ConfigError(f"shards dir {d} has no meta.json; run `paratrain prepare SOURCE --out {d}`")
    try:
        meta = json.loads(path.read_text())
        shards = meta["shards"]
        ok = (meta["format"] == FORMAT and meta["dtype"] in DTYPES and isinstance(shards, list)
              and meta["total_tokens"] == sum(int(s["tokens"]) for s in shards))
        newer = int(meta["version"]) > VERSION
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(d, f"has a corrupt meta.json ({type(e).__name__}: {e})") from None
    if not ok:
        raise _bad(d, "has a corrupt meta.json (wrong format, dtype or token count)")
    if newer:
        raise ConfigError(f"shards dir {d} has format version {meta['version']}; upgrade paratrain")
    size = DTYPES[meta["dtype"]].itemsize
    for s in shards:
        f = d / s["file"]
        if not f.is_file():
            raise _bad(d, f"is missing {s['file']}")
        if f.stat().st_size != int(s["tokens"]) * size:
            raise _bad(d, f"has {s['file']} of the wrong size (truncated or overwritten)")
    if verify:
        verify_shards(d, meta, "full")
    return meta


def verify_shards(d: Path, meta: dict[str, Any], mode: str = "sample") -> None:
    """Check shard contents against ``meta.json``: sha256 and every token id below ``vocab_size``.

    ``mode = "full"`` reads every shard whole.  ``"sample"`` (the default of ``data.verify``) hashes
    up to 4 shards chosen at random on each open (all of them when there are no more) and checks
    the ids of 3 windows of 64 Ki tokens (start, middle, end) in every other shard."""
    import random

    shards = [s for s in meta["shards"] if int(s["tokens"]) > 0]
    vocab = int(meta["vocab_size"])
    pick = random.Random().sample(range(len(shards)), min(4, len(shards)))  # own RNG: the global one is the user's
    full = set(range(len(shards))) if mode == "full" else set(pick)
    for i, s in enumerate(shards):
        f, n = d / s["file"], int(s["tokens"])
        if i in full and sha256_file(f) != s["sha256"]:
            raise _bad(d, f"has {s['file']} with a wrong sha256 (corrupted or overwritten)")
        tokens = np.memmap(f, dtype=DTYPES[meta["dtype"]], mode="r", shape=(n,))
        w = 1 << 16
        spans = [(0, n)] if i in full else [(0, w), (max(0, n // 2 - w // 2), n // 2 + w // 2), (max(0, n - w), n)]
        for a, b in spans:
            for lo in range(a, min(b, n), 1 << 24):
                top = int(tokens[lo:min(b, n, lo + (1 << 24))].max(initial=0))
                if top >= vocab:
                    raise _bad(d, f"has token id {top} in {s['file']}, outside its vocabulary of {vocab} "
                                  "(corrupted, or made with another tokenizer)")


class TokenStream:
    """All tokens of a shard directory as one read-only sequence (memory-mapped, not loaded)."""

    def __init__(self, shard_dir: str | Path, verify: bool | str = False) -> None:
        # verify: True / "full" reads every shard whole, "sample" a cheap part (see verify_shards)
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir)
        if verify:
            verify_shards(self.dir, self.meta, "sample" if verify == "sample" else "full")
        self.dtype = DTYPES[self.meta["dtype"]]
        self._maps = [np.memmap(self.dir / s["file"], dtype=self.dtype, mode="r", shape=(int(s["tokens"]),))
                      for s in self.meta["shards"] if int(s["tokens"]) > 0]
        self._starts = [0]
        for m in self._maps:
            self._starts.append(self._starts[-1] + len(m))
        self._tokenizer: Tokenizer | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer these shards were made with."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_of_shards(self.dir, self.meta)
        return self._tokenizer

    @property
    def boundary(self) -> str:
        """How documents are separated: eos | bos | bos_eos | none (older shards: eos)."""
        return str(self.meta.get("boundary", "eos"))

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a fresh array of the shard dtype (may span shards)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"slice [{start}, {stop}) out of range for {len(self)} tokens")
        out = np.empty(stop - start, self.dtype)
        i, pos = bisect_right(self._starts, start) - 1, 0
        while pos < len(out):
            local = start + pos - self._starts[i]
            take = min(len(out) - pos, len(self._maps[i]) - local)
            out[pos:pos + take] = self._maps[i][local:local + take]
            pos += take
            i += 1
        return out

    def __repr__(self) -> str:
        return f"TokenStream({str(self.dir)!r}, tokens={len(self)}, shards={len(self._maps)})"
