"""Where training text comes from: the Python standard library, the user's text files, JSON-lines or
Parquet files with a text column, or a local Hugging Face ``datasets`` directory.

Every source is read streaming: text files in pieces, JSON lines one line at a time, Parquet one
record batch at a time (pyarrow ``iter_batches``) and datasets through ``to_iterable_dataset``, so
a corpus larger than memory is prepared with bounded memory.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratrain.config import ConfigError

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` files, sorted.

    Third-party packages (``site-packages``/``dist-packages``), test suites (``test``/``tests``)
    and ``idlelib`` are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    if not found:
        raise ConfigError(f"no standard-library .py files under {root}; use data.source = 'text:GLOB'")
    return sorted(found)


def text_files(pattern: str, kind: str = "text") -> list[Path]:
    """Files matching ``pattern`` (``**`` recurses; ``~`` expands), sorted; ConfigError if none."""
    expanded = os.path.expanduser(pattern)
    found = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
    if not found:
        raise ConfigError(f"data.source '{kind}:{pattern}' matched no files; check the glob pattern")
    return found


RECORD_KINDS = ("jsonl", "parquet", "hf-dataset")
_PARQUET_ROWS = 256  # rows per pyarrow record batch


@dataclass(frozen=True)
class Corpus:
    """A text source resolved to its files.  ``kind``: "text" (one document per file), "jsonl",
    "parquet" (one document per record, its ``text_field``) or "hf-dataset" (``root`` is the
    ``save_to_disk`` directory; ``files`` are the files under it, for the cache key)."""

    kind: str
    files: tuple[Path, ...]
    text_field: str = "text"
    root: Path | None = None

    def pieces(self, chunk_chars: int) -> Iterator[tuple[str, bool]]:
        """``(text, last)`` pieces; ``last`` ends a document (see :func:`iter_chunks`)."""
        if self.kind == "text":
            yield from iter_chunks(self.files, chunk_chars)
            return
        reader = {"jsonl": _jsonl_texts, "parquet": _parquet_texts, "hf-dataset": _dataset_texts}[self.kind]
        for text in reader(self):
            yield text, True


def open_corpus(source: str, text_field: str = "text") -> Corpus:
    """Resolve ``data.source`` (``stdlib`` | ``text:GLOB`` | ``jsonl:GLOB`` | ``parquet:GLOB`` |
    ``hf-dataset:DIR``) to a :class:`Corpus`; ConfigError when nothing matches."""
    kind, _, arg = source.partition(":")
    if source == "stdlib":
        return Corpus("text", tuple(stdlib_files()))
    if kind == "text":
        return Corpus("text", tuple(text_files(arg)))
    if kind in ("jsonl", "parquet"):
        return Corpus(kind, tuple(text_files(arg, kind)), text_field)
    if kind == "hf-dataset":
        root = Path(os.path.expanduser(arg))
        if not (root / "dataset_info.json").is_file() and not (root / "dataset_dict.json").is_file():
            raise ConfigError(f"data.source '{source}': {root} is not a datasets directory "
                              "(save_to_disk output with dataset_info.json or dataset_dict.json)")
        files = tuple(sorted(p for p in root.rglob("*") if p.is_file()))
        return Corpus(kind, files, text_field, root)
    raise ConfigError(f"source {source!r} is not 'stdlib', 'text:GLOB', 'jsonl:GLOB', 'parquet:GLOB' "
                      "or 'hf-dataset:DIR'")


def source_files(source: str) -> list[Path]:
    """Files of a text source (as written in ``data.source``)."""
    return list(open_corpus(source).files)


_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _no_field(where: str, field: str, have: Iterable[str]) -> ConfigError:
    return ConfigError(f"{where} has no text field '{field}' (it has: {', '.join(sorted(have)) or 'none'}); "
                       "set data.text_field")


def _jsonl_texts(c: Corpus) -> Iterator[str]:
    for path in c.files:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ConfigError(f"{path}:{lineno} is not valid JSON; each line must be one object") from None
                if not isinstance(record, dict) or not isinstance(record.get(c.text_field), str):
                    if isinstance(record, dict) and record.get(c.text_field) is not None:
                        kind = _JSON_KINDS.get(type(record[c.text_field]), "not text")
                        raise ConfigError(f"{path}:{lineno}: text field '{c.text_field}' is {kind}, not a string")
                    keys = record.keys() if isinstance(record, dict) else ()
                    raise _no_field(f"{path}:{lineno}", c.text_field, keys)
                yield record[c.text_field]


def _need(module: str, kind: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{kind} sources need the '{module.split('.')[0]}' package: "
                          "pip install 'paratrain[data]'") from None


def _parquet_texts(c: Corpus) -> Iterator[str]:
    pq = _need("pyarrow.parquet", "parquet")

    for path in c.files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise ConfigError(f"'{path}' is not a readable Parquet file ({e})") from None
        if c.text_field not in pf.schema_arrow.names:
            raise _no_field(str(path), c.text_field, pf.schema_arrow.names)
        _need_strings(str(path), c.text_field, pf.schema_arrow.field(c.text_field).type)
        for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=[c.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


def _dataset_texts(c: Corpus) -> Iterator[str]:
    datasets = _need("datasets", "hf-dataset")
    ds = datasets.load_from_disk(str(c.root))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"datasets directory {c.root} has splits {', '.join(ds)} but no 'train'; "
                              f"point data.source at one split: hf-dataset:{c.root}/SPLIT")
        ds = ds["train"]
    if c.text_field not in ds.column_names:
        raise _no_field(f"dataset {c.root}", c.text_field, ds.column_names)
    _need_strings(f"dataset {c.root}", c.text_field, ds.data.schema.field(c.text_field).type)
    for row in ds.select_columns([c.text_field]).to_iterable_dataset():
        if row[c.text_field] is not None:
            yield row[c.text_field]


def _need_strings(where: str, field: str, arrow_type: Any) -> None:
    """Refuse a text column that does not hold strings (it would be trained on as its repr)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):  # (e.g. a pandas categorical column)
        arrow_type = arrow_type.value_type
    if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or getattr(pa.types, "is_string_view", lambda _: False)(arrow_type)):
        raise ConfigError(f"{where}: text field '{field}' holds {arrow_type}, not strings; "
                          "set data.text_field to a string column")


def _open(path: Path):
    try:
        return open(path, encoding="utf-8", errors="replace", newline="")
    except FileNotFoundError:
        raise ConfigError(f"input file '{path}' disappeared or was never there; check the source") from None
    except IsADirectoryError:
        raise ConfigError(f"input '{path}' is a directory, not a text file; narrow the glob") from None


def iter_documents(files: Iterable[str | Path]) -> Iterator[str]:
    """Yield the text of each file (UTF-8, undecodable bytes replaced), one document per file."""
    for path in files:
        with _open(Path(path)) as f:
            yield f.read()


def iter_chunks(files: Iterable[str | Path], chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """Stream files as ``(text, last)`` pieces of at most about ``2 * chunk_chars`` characters.

    Pieces end on a line break where a line is short enough, so tokenizers that merge across
    characters rarely see a cut; ``last`` is True on the final piece of each file (possibly "").
    """
    chunk_chars = max(1, chunk_chars)
    for path in files:
        with _open(Path(path)) as f:
            piece = f.read(chunk_chars)
            while True:
                if piece and not piece.endswith("\n"):
                    piece += f.readline(chunk_chars)
                nxt = f.read(chunk_chars)
                yield piece, not nxt
                if not nxt:
                    break
                piece = nxt
