"""``prepare``: a corpus -> memory-mapped token shards, tokenized in parallel worker processes.

The main process streams the corpus (:class:`~paratrain.data.sources.Corpus`) in pieces, groups
them into jobs and keeps at most two jobs per worker in flight; workers return token arrays, which
are written in corpus order (the result does not depend on the number of workers).  Memory is
bounded by ``max_memory_mb`` on the main side whatever the corpus size; each worker holds its
tokenizer and about one job.  Documents are separated by boundary tokens (``boundary``: EOS after
each, BOS before each, both, or none).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from paratrain.config import ConfigError
from paratrain.data.shards import DEFAULT_SHARD_TOKENS, FORMAT, META, VERSION, Sink, dtype_for
from paratrain.data.sources import Corpus
from paratrain.data.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    check_bpe_vocab,
    special_ids,
)
from paratrain.fileio import write_json_atomic

BOUNDARIES = ("eos", "bos", "bos_eos", "none")
JOB_TIMEOUT_S = 600  # one chunk of text per job: seconds of work at most
Job = list[tuple[str, bool, bool]]  # (text, first piece of a document, last piece)

_worker: dict[str, Any] = {}  # per worker process: tokenizer, boundary ids, dtype


def bpe_vocab_of(spec: str, bpe_vocab: int) -> int | None:
    """The vocabulary a ``bpe`` / ``bpe:VOCAB`` spec trains (None for other kinds); checks the
    spec's form, so a bad one is refused before anything is written."""
    if spec in ("byte", "bpe") or spec.startswith("hf:"):
        return bpe_vocab if spec == "bpe" else None
    if not spec.startswith("bpe:"):
        raise ConfigError(f"tokenizer {spec!r} is not 'byte', 'bpe', 'bpe:VOCAB' or 'hf:PATH'")
    if not spec[4:].isdigit():
        raise ConfigError(f"tokenizer {spec!r}: the BPE vocabulary size must be a whole number, e.g. bpe:8192")
    return int(spec[4:])


def resolve_tokenizer(spec: str, corpus: Corpus, chunk_chars: int, bpe_vocab: int = 8192) -> Tokenizer:
    """``byte`` | ``bpe`` | ``bpe:VOCAB`` (trained on ``corpus`` now, streamed) | ``hf:PATH``."""
    vocab = bpe_vocab_of(spec, bpe_vocab)
    if vocab is not None:
        return BPETokenizer().train((text for text, _ in corpus.pieces(chunk_chars)), vocab)
    return ByteTokenizer() if spec == "byte" else HFTokenizer.load(spec[3:])


def _setup(tok: Tokenizer, boundary: str, dtype: np.dtype) -> None:
    _worker.update(tok=tok, dtype=dtype,
                   bos=tok.bos_id if boundary in ("bos", "bos_eos") else None,
                   eos=tok.eos_id if boundary in ("eos", "bos_eos") else None)


def _init_worker(path: str | None, kind: str, special: dict[str, int], boundary: str, dtype: str) -> None:
    cls = {"bpe": BPETokenizer, "hf": HFTokenizer}.get(kind)
    tok = ByteTokenizer() if cls is None else cls.load(path, special)
    _setup(tok, boundary, np.dtype(dtype))


def encode_job(job: Job) -> np.ndarray:
    """Tokens of one job with its document boundaries (uses the worker's tokenizer)."""
    tok, dtype, bos, eos = _worker["tok"], _worker["dtype"], _worker["bos"], _worker["eos"]
    texts = [t for t, _, _ in job]
    if isinstance(tok, ByteTokenizer):
        encoded: list[Any] = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    else:
        encoded = tok.encode_batch(texts)
    parts: list[Any] = []
    for (_, first, last), ids in zip(job, encoded, strict=True):
        if first and bos is not None:
            parts.append([bos])
        parts.append(ids)
        if last and eos is not None:
            parts.append([eos])
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else np.empty(0, dtype)


def _jobs(corpus: Corpus, chunk_chars: int, job_chars: int, counts: list[int]) -> Iterator[Job]:
    job: Job = []
    size, first = 0, True
    for text, last in corpus.pieces(chunk_chars):
        job.append((text, first, last))
        size, first = size + len(text), last
        counts[0] += last
        if size >= job_chars:
            yield job
            job, size = [], 0
    if job:
        yield job


class _Progress:
    """A one-line progress report on stderr: tokens, documents, tokens/s (at most once a second)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.t0, self.last = enabled, time.perf_counter(), 0.0

    def update(self, tokens: int, docs: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 1.0 and not final):
            return
        self.last = now
        rate = tokens / max(now - self.t0, 1e-9)
        end = "\n" if final else ""
        print(f"\rprepare: {tokens:,} tokens, {docs:,} documents, {rate / 1e6:.2f} M tokens/s",
              end=end, file=sys.stderr, flush=True)


def prepare(
    files: Sequence[str | Path] | Corpus,
    out_dir: str | Path,
    tokenizer: str = "byte",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_memory_mb: float = 256.0,
    bpe_vocab: int = 8192,
    source: str = "",
    *,
    boundary: str = "eos",
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize a corpus (text files, or a :class:`Corpus` of any format) into shards under
    ``out_dir``; returns the meta dict.

    Shards are uint16, or uint32 when the vocabulary exceeds 65536 ids.  Memory on the main side
    stays within about ``max_memory_mb`` whatever the corpus size (a quarter of it is the token
    buffer, the rest holds text in flight); BPE training (``bpe``/``bpe:VOCAB``) streams the corpus
    too, its own memory being the ``tokenizers`` library's.  ``workers`` > 1 tokenizes in that many
    processes (not for the byte tokenizer, whose encoding is a copy); ``progress`` prints tokens and
    tokens/s to stderr.
    """
    corpus = files if isinstance(files, Corpus) else Corpus("text", tuple(Path(f) for f in files))
    if not corpus.files:
        raise ConfigError("nothing to prepare: the source has no files")
    if all(Path(f).stat().st_size == 0 for f in corpus.files if Path(f).is_file()):  # before `out` is touched
        raise ConfigError(f"nothing to prepare: the source's {len(corpus.files)} file(s) are all empty; "
                          "give it some text")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens = {shard_tokens} must be at least 1")
    if not 0 < max_memory_mb < float("inf"):  # (NaN fails this too)
        raise ConfigError(f"max_memory_mb = {max_memory_mb} must be a positive number of MB")
    if boundary not in BOUNDARIES:
        raise ConfigError(f"boundary {boundary!r} is not one of {' | '.join(BOUNDARIES)}")
    vocab = bpe_vocab_of(tokenizer, bpe_vocab)
    if vocab is not None:
        check_bpe_vocab(vocab)
    workers = max(1, int(workers))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output '{out}' exists and is not a directory; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # invalidate first: a crash below leaves no valid dir
    for old in [*out.glob("shard_*.bin"), out / TOKENIZER_FILE]:
        old.unlink(missing_ok=True)

    budget = int(max_memory_mb * 2**20)
    in_flight = 2 * workers if workers > 1 and tokenizer != "byte" else 1
    # text in flight: bytes ~32 B of Python objects per character, BPE ids ~96 (lists of ints)
    chunk_chars = max(1, budget // ((32 if tokenizer == "byte" else 96) * in_flight))
    tok = resolve_tokenizer(tokenizer, corpus, chunk_chars, bpe_vocab)
    path = tok.save(out) if isinstance(tok, HFTokenizer) else None
    dtype = dtype_for(tok.vocab_size)
    sink = Sink(out, shard_tokens, budget // (4 * dtype.itemsize), dtype)
    counts = [0]
    bar = _Progress(progress)
    jobs = _jobs(corpus, chunk_chars, chunk_chars // 2, counts)
    if workers == 1 or isinstance(tok, ByteTokenizer):  # bytes encode at memory speed: processes only add pickling
        _setup(tok, boundary, dtype)
        for job in jobs:
            sink.append(encode_job(job))
            bar.update(sink.total, counts[0])
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
        args = (str(path) if path else None, tok.name, special_ids(tok), boundary, dtype.str)
        # forkserver, not fork: a fork of a process with threads (torch's, ZeroMQ's, a test
        # runner's) can copy a held lock into the worker, which then never answers
        pool = mp.get_context("forkserver").Pool(workers, _init_worker, args)
        try:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.apply_async(encode_job, (job,)))
                while len(pending) >= in_flight:
                    sink.append(_result(pending.popleft()))
                    bar.update(sink.total, counts[0])
            while pending:
                sink.append(_result(pending.popleft()))
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    shards = sink.close()
    bar.update(sink.total, counts[0], final=True)
    meta = {"format": FORMAT, "version": VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "special_ids": special_ids(tok), "dtype": dtype.name, "byteorder": "little", "shards": shards,
            "total_tokens": sink.total, "documents": counts[0], "boundary": boundary, "source": source}
    write_json_atomic(out / META, meta)
    return meta


def _result(job: Any) -> Any:
    """A worker's encoded chunk; a worker that died or hangs is an error, not a wait forever."""
    try:
        return job.get(timeout=JOB_TIMEOUT_S)
    except mp.TimeoutError:
        raise RuntimeError(f"a tokenizer worker gave no result within {JOB_TIMEOUT_S} s (killed? out of memory?); "
                           "run again with --workers 1 to see its error") from None
