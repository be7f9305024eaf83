"""Tokenizers: a fixed byte tokenizer and a locally trained byte-level BPE.

Both expose the same small interface: ``encode``, ``decode``, ``vocab_size``, ``name`` and the
special ids ``pad_id``, ``bos_id``, ``eos_id``, ``sep_id``, ``mask_id``.  Nothing is downloaded:
BPE is trained on the user's own files with the ``tokenizers`` package.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from paratrain.config import ConfigError

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """What the rest of paratrain needs from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    sep_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """The special ids of ``tok`` as a dict (the form stored in shard meta)."""
    return {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "sep": tok.sep_id, "mask": tok.mask_id}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then PAD=256, BOS=257, EOS=258, SEP=259, MASK=260."""

    name = "byte"
    vocab_size = 261
    pad_id = 256
    bos_id = 257
    eos_id = 258
    sep_id = 259
    mask_id = 260

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE trained locally with the ``tokenizers`` package.

    The five special tokens take ids 0..4 in the order [PAD], [BOS], [EOS], [SEP], [MASK].
    Create one with ``BPETokenizer().train(...)`` or ``BPETokenizer.load(path)``.
    """

    name = "bpe"

    def __init__(self) -> None:
        self._tok = None  # a tokenizers.Tokenizer once trained or loaded

    # ---- construction -----------------------------------------------------------------
    def train(self, files_or_iterator: Sequence[str | Path] | Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on file paths or on text; returns ``self``.

        A list/tuple counts as file paths when it holds a ``Path`` or only names of existing files;
        anything else (a generator, a list of texts) is taken as an iterator of text chunks.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not 300 <= vocab_size <= 65535:
            raise ConfigError(f"BPE vocab size {vocab_size} must be between 300 and 65535 (uint16 shards)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        items = files_or_iterator
        is_list = isinstance(items, (list, tuple)) and len(items) > 0
        if is_list and (any(isinstance(f, Path) for f in items)
                        or all(isinstance(f, str) and Path(f).is_file() for f in items)):
            for p in items:
                if not Path(p).is_file():
                    raise ConfigError(f"BPE training file '{p}' not found; check the path")
            tok.train([str(p) for p in items], trainer)
        else:
            tok.train_from_iterator(files_or_iterator, trainer)
        self._set(tok)
        return self

    def _set(self, tok) -> None:
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ConfigError("tokenizer.json lacks the special tokens [PAD] [BOS] [EOS] [SEP] [MASK]; "
                              "retrain it with `paratrain prepare ... --tokenizer bpe`")
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.mask_id = ids
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a file name); returns the file."""
        target = Path(path)
        if target.is_dir() or not target.suffix:
            target.mkdir(parents=True, exist_ok=True)
            target = target / TOKENIZER_FILE
        tmp = target.with_name(target.name + ".tmp")
        self._hf.save(str(tmp))
        tmp.replace(target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load from a ``tokenizer.json`` file or a directory holding one."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise ConfigError(f"no BPE tokenizer at '{p}'; make one: `paratrain prepare ... --tokenizer bpe`")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise ConfigError(f"tokenizer file '{p}' is corrupt ({e}); re-run `paratrain prepare`") from None
        tok = cls()
        tok._set(hf)
        return tok

    # ---- use ------------------------------------------------------------------------------
    @property
    def _hf(self):
        if self._tok is None:
            raise RuntimeError("BPETokenizer is not trained or loaded yet")
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        size = self.vocab_size if self._tok is not None else "untrained"
        return f"BPETokenizer(vocab_size={size})"


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; a ``tokenizer.json`` file, or a directory with one -> BPETokenizer.

    A shards directory whose ``meta.json`` names the byte tokenizer also gives a ByteTokenizer.
    """
    if str(name_or_dir) == "byte":
        return ByteTokenizer()
    p = Path(name_or_dir)
    if p.is_file() or (p / TOKENIZER_FILE).is_file():
        return BPETokenizer.load(p)
    meta = p / "meta.json"
    if meta.is_file():
        try:
            kind = json.loads(meta.read_text()).get("tokenizer")
        except (ValueError, AttributeError):
            kind = None
        if kind == "byte":
            return ByteTokenizer()
    if str(name_or_dir) == "bpe":
        raise ConfigError("tokenizer 'bpe' must be trained first; give the directory with its tokenizer.json")
    raise ConfigError(f"unknown tokenizer '{name_or_dir}': use 'byte' or a directory with a tokenizer.json")
