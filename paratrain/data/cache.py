"""The local token cache: a text source prepared once into shards, keyed by what it was made from.

Workers of one job share it: the launcher prepares the source before they start, and concurrent
preparers wait on a lock file (see :func:`cached_corpus`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paratrain.data.prepare import prepare
from paratrain.data.shards import META, VERSION, read_meta
from paratrain.data.sources import open_corpus
from paratrain.data.tokenizer import HFTokenizer
from paratrain.fileio import sha256_file


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
