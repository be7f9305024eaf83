"""Where training text comes from: the Python standard library or the user's own files."""

from __future__ import annotations

import glob as globlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def text_files(pattern: str) -> list[Path]:
    """Files matching ``pattern`` (``**`` recurses; ``~`` expands), sorted; ConfigError if none."""
    expanded = os.path.expanduser(pattern)
    found = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
    if not found:
        raise ConfigError(f"data.source 'text:{pattern}' matched no files; check the glob pattern")
    return found


def source_files(source: str) -> list[Path]:
    """Files of a text source: ``stdlib`` or ``text:GLOB`` (as written in ``data.source``)."""
    if source == "stdlib":
        return stdlib_files()
    if source.startswith("text:"):
        return text_files(source[len("text:"):])
    raise ConfigError(f"source {source!r} is not a text source; use 'stdlib' or 'text:GLOB'")


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
