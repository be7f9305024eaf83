"""Memory-mapped token shards: streaming preparation, validated reading, and a local cache.

A shard directory holds ``shard_00000.bin``, ``shard_00001.bin``, ... (raw little-endian uint16
tokens, or uint32 for vocabularies over 65536 ids, documents separated by boundary tokens),
optionally ``tokenizer.json`` (BPE or a Hugging Face tokenizer), and ``meta.json``.  The shards
are written by :func:`paratrain.data.prepare.prepare`.
``meta.json`` is written last and atomically, so a directory without it is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.config import ConfigError
from paratrain.data.sources import open_corpus
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
    """Load and check ``meta.json`` and the shard files it lists (sizes; sha256 if ``verify``)."""
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
        if verify and sha256_file(f) != s["sha256"]:
            raise _bad(d, f"has {s['file']} with a wrong sha256 (corrupted)")
    return meta




class TokenStream:
    """All tokens of a shard directory as one read-only sequence (memory-mapped, not loaded)."""

    def __init__(self, shard_dir: str | Path, verify: bool = False) -> None:
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir, verify=verify)
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


def cache_root() -> Path:
    """``$PARATRAIN_CACHE`` or ``~/.cache/paratrain``."""
    return Path(os.environ.get("PARATRAIN_CACHE") or Path.home() / ".cache" / "paratrain")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_corpus(source: str, tokenizer: str = "byte", bpe_vocab: int = 8192, max_memory_mb: float = 256.0,
                  *, text_field: str = "text", boundary: str = "eos", workers: int = 1) -> Path:
    """The shard directory for ``source`` (a text source of :func:`~paratrain.data.sources.open_corpus`,
    or ``shards:DIR``).

    Sources are prepared on first use into the cache, keyed by the source, the files' paths,
    sizes and mtimes, the tokenizer (an ``hf:`` tokenizer by its file's sha256), the text field
    and the boundary; concurrent callers wait on a lock file and the result appears by an atomic
    rename.  ``shards:DIR`` returns DIR after checking its meta.
    """
    from paratrain.data.prepare import prepare

    if source.startswith("shards:"):
        d = Path(os.path.expanduser(source[len("shards:"):]))
        read_meta(d)
        return d
    corpus = open_corpus(source, text_field)
    listing = [[str(p), st.st_size, st.st_mtime_ns] for p in corpus.files for st in [p.stat()]]
    spec: dict[str, Any] = {"version": VERSION, "source": source, "tokenizer": tokenizer, "files": listing}
    if tokenizer == "bpe":
        spec["bpe_vocab"] = bpe_vocab
    if tokenizer.startswith("hf:"):
        from paratrain.data.tokenizer import HFTokenizer

        spec["tokenizer_sha256"] = sha256_file(HFTokenizer._file(tokenizer[3:]))
    if corpus.kind != "text":
        spec["text_field"] = text_field
    if boundary != "eos":  # keeps the keys of caches made before boundaries were configurable
        spec["boundary"] = boundary
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    root = cache_root() / "corpora"
    name = f"{source.split(':', 1)[0]}-{tokenizer.split(':', 1)[0]}-{key}"
    final = root / name
    if (final / META).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{name}.lock"):
        if (final / META).is_file():  # another process finished while we waited
            return final
        tmp = root / f"{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        prepare(corpus, tmp, tokenizer=tokenizer, max_memory_mb=max_memory_mb, bpe_vocab=bpe_vocab,
                source=source, boundary=boundary, workers=workers)
        shutil.rmtree(final, ignore_errors=True)  # a stale, meta-less leftover
        os.rename(tmp, final)
    return final


def corpus_for(data_cfg: Any) -> Path:
    """The shard directory of a ``[data]`` config (prepared into the cache on first use)."""
    return cached_corpus(data_cfg.source, data_cfg.tokenizer, text_field=data_cfg.text_field,
                         boundary=data_cfg.boundary)
