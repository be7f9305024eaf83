"""The ``paratrain`` command line: train, prepare, plan, compress, doctor, bench, report.

Exit codes: 0 ok; 2 user error (one line on stderr, no traceback); 1 internal error.
Each verb lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from paratrain.config import Config, ConfigError

# verb -> (module, one-line help).  Modules are imported only when their verb runs.
VERBS: dict[str, tuple[str, str]] = {
    "train": ("paratrain.cli", "train a model (locally launches parallel.nproc workers)"),
    "prepare": ("paratrain.cli", "tokenize a corpus into memory-mapped token shards"),
    "plan": ("paratrain.planner.cli", "predict memory, step time and communication; pick the best layout"),
    "compress": ("paratrain.model_compression.cli", "prune, quantize and distill a trained checkpoint"),
    "doctor": ("paratrain.doctor", "check this machine's CUDA, cuDNN, NCCL, gloo and network setup"),
    "bench": ("paratrain.bench", "benchmark collectives and parameter-server transport"),
    "report": ("paratrain.report", "write RUN_DIR/report.md with plots"),
    "import-hf": ("paratrain.hf.convert", "convert a local Hugging Face model directory into a paratrain run"),
    "export-hf": ("paratrain.hf.export", "write a run's checkpoint as a Hugging Face model directory"),
}


class UsageError(ConfigError):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage + exit 2; keep it to one line
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="TOML config file (default: the built-in small GPT)")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout at the end")


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="stdlib | text:GLOB | jsonl:GLOB | parquet:GLOB | hf-dataset:DIR | a file or "
                   "directory of text")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--tokenizer", default="byte", help="byte | bpe | bpe:VOCAB (trained) | hf:PATH")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    p.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size for --tokenizer bpe")
    p.add_argument("--max-memory-mb", type=float, default=256.0, help="bound on the tokenizing buffer")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    p.add_argument("--text-field", default="text", help="jsonl / parquet / hf-dataset: the column with the text")
    p.add_argument("--boundary", default="eos", choices=["eos", "bos", "bos_eos", "none"],
                   help="tokens between documents")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from paratrain.training.launch import launch

    cfg = Config.load(args.config, overrides)
    summary = launch(cfg)
    if args.json:
        print(json.dumps(summary))
    if summary.get("status") != "ok":
        print(f"paratrain: training failed: {summary.get('error', 'see the log above')}", file=sys.stderr)
        return 1
    if "steps" not in summary:  # a process that trained nothing itself (a parameter server under torchrun)
        print(f"done: {summary.get('role', 'finished')}")
        return 0
    vl = summary.get("val_loss")
    tail = f", val loss {vl:.4f}" if isinstance(vl, float) else ""
    print(f"done: {summary['steps']} steps, loss {summary['final_loss']:.4f}{tail} -> {cfg.run_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from paratrain.data import Corpus, open_corpus, prepare
    from paratrain.data.sources import text_files

    src = args.source
    if src == "stdlib" or src.split(":", 1)[0] in ("text", "jsonl", "parquet", "hf-dataset"):
        corpus = open_corpus(src, args.text_field)
    elif Path(src).is_dir():
        corpus = Corpus("text", tuple(text_files(str(Path(src) / "**" / "*"))))
    elif Path(src).is_file():
        corpus = Corpus("text", (Path(src),))
    else:
        raise UsageError(f"source '{src}' is not 'stdlib', 'text:GLOB', 'jsonl:GLOB', 'parquet:GLOB', "
                         "'hf-dataset:DIR', a file or a directory")
    if args.shard_tokens < 1 or args.workers < 1:
        raise UsageError("--shard-tokens and --workers must be at least 1")
    t0 = time.perf_counter()
    meta = prepare(corpus, Path(args.out), tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                   max_memory_mb=args.max_memory_mb, bpe_vocab=args.bpe_vocab, source=src,
                   boundary=args.boundary, workers=args.workers, progress=True)
    rate = meta["total_tokens"] / max(time.perf_counter() - t0, 1e-9)
    print(f"wrote {meta['total_tokens']:,} tokens ({meta['dtype']}) in {len(meta['shards'])} shard(s) to "
          f"{args.out}, {rate:,.0f} tokens/s")
    return 0


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the ``selected`` verb's module is imported for its options."""
    parser = _Parser(prog="paratrain", description="Train large Transformers across processes and machines.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "train":
            _add_train(p)
        elif verb == "prepare":
            _add_prepare(p)
        elif verb == selected:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv[0] if argv else None)
        if argv[:1] == ["train"]:
            # --section.key=value overrides are not argparse options: split them off first
            overrides = [a for a in argv[1:] if a.startswith("--") and "." in a.split("=", 1)[0]]
            rest = [a for a in argv if a not in overrides]
            args = parser.parse_args(rest)
            return cmd_train(args, overrides)
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return 2
        if args.verb == "prepare":
            return cmd_prepare(args)
        return int(importlib.import_module(VERBS[args.verb][0]).main(args) or 0)
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paratrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
