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
MAX_VOCAB = 1 << 20  # ids above 65535 are stored as uint32


def check_bpe_vocab(vocab_size: int) -> None:
    """Refuse a BPE vocabulary size outside [300, MAX_VOCAB] (bytes + specials need 300)."""
    if not 300 <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"BPE vocab size {vocab_size} must be between 300 and {MAX_VOCAB}")


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


def _is_file(item: object) -> bool:
    try:
        return isinstance(item, str) and "\n" not in item and Path(item).is_file()
    except OSError:  # a text too long to be a file name
        return False


# names under which tokenizer.json files commonly carry each special token, most specific first
_SPECIAL_NAMES = {
    "eos": ("[EOS]", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>"),
    "bos": ("[BOS]", "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}


class HFTokenizer:
    """A local ``tokenizer.json`` (any ``tokenizers`` model: BPE, Unigram, WordPiece) with paratrain's
    special ids.

    The ids come from ``tokenizer_config.json`` beside the file when it names ``eos_token`` etc.,
    else from the usual token names (``</s>``, ``<|endoftext|>``, ``<s>``, ``<pad>``, ...); a missing
    BOS, PAD, SEP or MASK falls back to EOS, and a tokenizer without any EOS token is refused.
    """

    name = "hf"

    def __init__(self) -> None:
        self._tok = None  # a tokenizers.Tokenizer once trained or loaded
        self.path: Path | None = None

    @staticmethod
    def _file(path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p / TOKENIZER_FILE if p.is_dir() else p

    @classmethod
    def load(cls, path: str | Path, special: dict[str, int] | None = None) -> HFTokenizer:
        """Load a ``tokenizer.json`` file (or a directory with one); ``special`` fixes the ids."""
        from tokenizers import Tokenizer as RustTokenizer

        p = cls._file(path)
        if not p.is_file():
            raise ConfigError(f"no tokenizer at '{p}'; give a local tokenizer.json (nothing is downloaded)")
        try:
            hf = RustTokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise ConfigError(f"tokenizer file '{p}' is corrupt ({e}); re-create it") from None
        tok = cls()
        tok.path = p
        tok._set(hf, special or tok._special_ids(hf, p))
        return tok

    def _special_ids(self, hf, path: Path) -> dict[str, int]:
        named: dict[str, str] = {}
        cfg = path.with_name("tokenizer_config.json")
        if cfg.is_file():
            try:
                raw = json.loads(cfg.read_text())
            except ValueError:
                raw = {}
            for kind in _SPECIAL_NAMES:
                v = raw.get(f"{kind}_token")
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    named[kind] = v
        ids: dict[str, int] = {}
        for kind, names in _SPECIAL_NAMES.items():
            for t in ((named[kind],) if kind in named else ()) + names:
                if (i := hf.token_to_id(t)) is not None:
                    ids[kind] = i
                    break
        if "eos" not in ids:
            raise ConfigError(f"tokenizer '{path}' has no end-of-text token (none of {', '.join(_SPECIAL_NAMES['eos'])}"
                              "); add one, or name it as eos_token in tokenizer_config.json")
        return {k: ids.get(k, ids["eos"]) for k in ("pad", "bos", "eos", "sep", "mask")}

    def _set(self, tok, special: dict[str, int]) -> None:
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.mask_id = (
            int(special[k]) for k in ("pad", "bos", "eos", "sep", "mask"))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a file name); returns the file."""
        target = Path(path)
        if target.is_dir() or not target.suffix:
            target.mkdir(parents=True, exist_ok=True)
            target = target / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        self._hf.save(str(tmp))
        tmp.replace(target)
        return target

    @property
    def _hf(self):
        if self._tok is None:
            raise RuntimeError(f"{type(self).__name__} is not trained or loaded yet")
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (no special tokens added)."""
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        size = self.vocab_size if self._tok is not None else "untrained"
        return f"{type(self).__name__}(vocab_size={size})"


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained locally with the ``tokenizers`` package.

    The five special tokens take ids 0..4 in the order [PAD], [BOS], [EOS], [SEP], [MASK].
    Create one with ``BPETokenizer().train(...)`` or ``BPETokenizer.load(path)``.
    """

    name = "bpe"

    def train(self, files_or_iterator: Sequence[str | Path] | Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on file paths or on text; returns ``self``.

        A list/tuple counts as file paths when it holds a ``Path`` or only names of existing files;
        anything else (a generator, a list of texts) is taken as an iterator of text chunks.
        """
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        check_bpe_vocab(vocab_size)
        tok = RustTokenizer(models.BPE())
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
        if is_list and (any(isinstance(f, Path) for f in items) or all(_is_file(f) for f in items)):
            for p in items:
                if not Path(p).is_file():
                    raise ConfigError(f"BPE training file '{p}' not found; check the path")
            tok.train([str(p) for p in items], trainer)
        else:
            tok.train_from_iterator(files_or_iterator, trainer)
        self._set(tok, self._special_ids(tok, Path(TOKENIZER_FILE)))
        return self

    def _special_ids(self, hf, path: Path) -> dict[str, int]:
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ConfigError("tokenizer.json lacks the special tokens [PAD] [BOS] [EOS] [SEP] [MASK]; "
                              "retrain it with `paratrain prepare ... --tokenizer bpe`")
        return dict(zip(("pad", "bos", "eos", "sep", "mask"), ids, strict=True))

    @classmethod
    def load(cls, path: str | Path, special: dict[str, int] | None = None) -> BPETokenizer:
        """Load from a ``tokenizer.json`` file or a directory holding one."""
        if not cls._file(path).is_file():
            raise ConfigError(f"no BPE tokenizer at '{cls._file(path)}'; make one: "
                              "`paratrain prepare ... --tokenizer bpe`")
        return super().load(path, special)  # type: ignore[return-value]


def tokenizer_of_shards(shard_dir: Path, meta: dict) -> Tokenizer:
    """The tokenizer a shards directory was made with, from its ``meta.json`` dict."""
    kind = meta.get("tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.load(shard_dir, special=meta.get("special_ids"))
    return BPETokenizer.load(shard_dir)


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; ``"hf:PATH"`` -> HFTokenizer of a local tokenizer.json; a shards
    directory -> the tokenizer its ``meta.json`` names; a ``tokenizer.json`` file, or a directory
    with one -> BPETokenizer (paratrain's own special tokens)."""
    if str(name_or_dir) == "byte":
        return ByteTokenizer()
    if str(name_or_dir).startswith("hf:"):
        return HFTokenizer.load(str(name_or_dir)[3:])
    p = Path(name_or_dir)
    meta = p / "meta.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except ValueError:
            info = None
        if isinstance(info, dict) and info.get("tokenizer") in ("byte", "hf", "bpe"):
            return tokenizer_of_shards(p, info)
    if p.is_file() or (p / TOKENIZER_FILE).is_file():
        return BPETokenizer.load(p)
    if str(name_or_dir).startswith("bpe"):
        raise ConfigError("tokenizer 'bpe' must be trained first; give the directory with its tokenizer.json")
    raise ConfigError(f"unknown tokenizer '{name_or_dir}': use 'byte', 'hf:PATH' or a directory with a "
                      "tokenizer.json")
