"""Memory-mapped token shards: streaming preparation, validated reading, and a local cache.

A shard directory holds ``shard_00000.bin``, ``shard_00001.bin``, ... (raw little-endian uint16
tokens, every document followed by EOS), optionally ``tokenizer.json`` (BPE), and ``meta.json``.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.config import ConfigError
from paratrain.data.sources import iter_chunks, source_files
from paratrain.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, special_ids
from paratrain.fileio import sha256_file, write_json_atomic

FORMAT = "paratrain-shards"
VERSION = 1
META = "meta.json"
DTYPE = np.dtype("<u2")
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB per shard


def shard_name(i: int) -> str:
    """File name of shard number ``i``."""
    return f"shard_{i:05d}.bin"


class _Sink:
    """Tokens -> a fixed-size buffer -> consecutive shard files, hashed as they are written."""

    def __init__(self, out_dir: Path, shard_tokens: int, buffer_tokens: int) -> None:
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.buf, self.n, self.total = np.empty(max(1, buffer_tokens), DTYPE), 0, 0
        self.shards: list[dict[str, Any]] = []
        self._f, self._hash, self._in_shard = None, hashlib.sha256(), 0

    def append(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, len(self.buf) - self.n)
            self.buf[self.n:self.n + take] = tokens[pos:pos + take]  # casts uint8 -> uint16 in place
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


def prepare(
    files: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str = "byte",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_memory_mb: float = 256.0,
    bpe_vocab: int = 8192,
    source: str = "",
) -> dict[str, Any]:
    """Tokenize ``files`` into uint16 shards under ``out_dir``; returns the meta dict.

    Files are streamed in pieces, so memory on the Python side stays within about
    ``max_memory_mb`` whatever the corpus size (a quarter of it is the token buffer, the rest
    holds text being tokenized).  For ``tokenizer="bpe"`` a BPE of ``bpe_vocab`` tokens is trained
    on the files first (also streamed; its own memory is the ``tokenizers`` library's).
    """
    files = [Path(f) for f in files]
    if not files:
        raise ConfigError("nothing to prepare: the source has no files")
    if all(f.stat().st_size == 0 for f in files):  # checked before the output dir is touched
        raise ConfigError(f"nothing to prepare: the source's {len(files)} file(s) are all empty; give it some text")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens = {shard_tokens} must be at least 1")
    if max_memory_mb <= 0:
        raise ConfigError(f"max_memory_mb = {max_memory_mb} must be positive")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output '{out}' exists and is not a directory; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # invalidate first: a crash below leaves no valid dir
    for old in [*out.glob("shard_*.bin"), out / TOKENIZER_FILE]:
        old.unlink(missing_ok=True)

    budget = int(max_memory_mb * 2**20)
    tok: Tokenizer
    if tokenizer == "byte":
        tok, chunk_chars = ByteTokenizer(), budget // 32
    elif tokenizer == "bpe":
        chunk_chars = budget // 96  # a Python list of ids costs ~36 bytes per token
        tok = BPETokenizer().train((text for text, _ in iter_chunks(files, chunk_chars)), bpe_vocab)
        tok.save(out)
    else:
        raise ConfigError(f"tokenizer {tokenizer!r} is not 'byte' or 'bpe'")

    sink = _Sink(out, shard_tokens, budget // 8)
    eos = np.array([tok.eos_id], DTYPE)
    docs = 0
    for text, last in iter_chunks(files, chunk_chars):
        if text:
            if tokenizer == "byte":
                sink.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
            else:
                sink.append(np.asarray(tok.encode(text), dtype=DTYPE))
        if last:
            sink.append(eos)
            docs += 1
    shards = sink.close()
    meta = {"format": FORMAT, "version": VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "special_ids": special_ids(tok), "dtype": "uint16", "byteorder": "little", "shards": shards,
            "total_tokens": sink.total, "documents": docs, "source": source}
    write_json_atomic(out / META, meta)
    return meta


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
        ok = (meta["format"] == FORMAT and meta["dtype"] == "uint16" and isinstance(shards, list)
              and meta["total_tokens"] == sum(int(s["tokens"]) for s in shards))
        newer = int(meta["version"]) > VERSION
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(d, f"has a corrupt meta.json ({type(e).__name__}: {e})") from None
    if not ok:
        raise _bad(d, "has a corrupt meta.json (wrong format, dtype or token count)")
    if newer:
        raise ConfigError(f"shards dir {d} has format version {meta['version']}; upgrade paratrain")
    for s in shards:
        f = d / s["file"]
        if not f.is_file():
            raise _bad(d, f"is missing {s['file']}")
        if f.stat().st_size != int(s["tokens"]) * DTYPE.itemsize:
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
        tokens = np.memmap(f, dtype=DTYPE, mode="r", shape=(n,))
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
        self._maps = [np.memmap(self.dir / s["file"], dtype=DTYPE, mode="r", shape=(int(s["tokens"]),))
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
            byte = self.meta["tokenizer"] == "byte"
            self._tokenizer = ByteTokenizer() if byte else BPETokenizer.load(self.dir)
        return self._tokenizer

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a fresh uint16 array (may span shards)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"slice [{start}, {stop}) out of range for {len(self)} tokens")
        out = np.empty(stop - start, DTYPE)
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


def cached_corpus(source: str, tokenizer: str = "byte", bpe_vocab: int = 8192,
                  max_memory_mb: float = 256.0) -> Path:
    """The shard directory for ``source`` (``stdlib`` | ``text:GLOB`` | ``shards:DIR``).

    Text sources are prepared on first use into the cache, keyed by the source, the files'
    paths, sizes and mtimes, and the tokenizer; concurrent callers wait on a lock file and the
    result appears by an atomic rename.  ``shards:DIR`` returns DIR after checking its meta.
    """
    if source.startswith("shards:"):
        d = Path(os.path.expanduser(source[len("shards:"):]))
        read_meta(d)
        return d
    files = source_files(source)
    listing = [[str(p), st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]]
    spec = {"version": VERSION, "source": source, "tokenizer": tokenizer, "files": listing}
    if tokenizer == "bpe":
        spec["bpe_vocab"] = bpe_vocab
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    root = cache_root() / "corpora"
    name = f"{source.split(':', 1)[0]}-{tokenizer}-{key}"
    final = root / name
    if (final / META).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{name}.lock"):
        if (final / META).is_file():  # another process finished while we waited
            return final
        tmp = root / f"{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        prepare(files, tmp, tokenizer=tokenizer, max_memory_mb=max_memory_mb, bpe_vocab=bpe_vocab,
                source=source)
        shutil.rmtree(final, ignore_errors=True)  # a stale, meta-less leftover
        os.rename(tmp, final)
    return final
