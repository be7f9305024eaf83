"""The ``paratrain`` command line: train, config, prepare, plan, compress, doctor, bench, report.

Exit codes: 0 ok; 2 user error (one line on stderr, no traceback); 1 internal error.
Each verb lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
the small ones live here (``LOCAL``).  Verbs in ``TAKES_OVERRIDES`` accept ``--section.key=value``
(or ``--section.key value``) config overrides, which reach them as ``args.overrides``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from paratrain import __version__
from paratrain.config import Config, ConfigError
from paratrain.fileio import dumps_strict, stdout_to_devnull
from paratrain.overrides import split_overrides

# verb -> (module, one-line help).  Modules are imported only when their verb runs.
VERBS: dict[str, tuple[str, str]] = {
    "train": ("paratrain.cli", "train a model (locally launches parallel.nproc workers)"),
    "config": ("paratrain.cli", "print the resolved config (defaults, file, overrides) as TOML"),
    "prepare": ("paratrain.cli", "tokenize a corpus into memory-mapped token shards"),
    "plan": ("paratrain.planner.cli", "predict memory, step time and communication; pick the best layout"),
    "compress": ("paratrain.model_compression.cli", "prune, quantize and distill a trained checkpoint"),
    "doctor": ("paratrain.doctor", "check this machine's CUDA, cuDNN, NCCL, gloo and network setup"),
    "bench": ("paratrain.bench", "benchmark collectives and parameter-server transport"),
    "report": ("paratrain.report", "write RUN_DIR/report.md with plots"),
    "import-hf": ("paratrain.convert.import_hf", "convert a local Hugging Face model directory into a paratrain run"),
    "export-hf": ("paratrain.convert.export_hf", "write a run's checkpoint as a Hugging Face model directory"),
}


class UsageError(ConfigError):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage + exit 2; keep it to one line
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_train(p: argparse.ArgumentParser) -> None:
    from paratrain.config_docs import render_help  # only `train --help` needs the key reference

    p.usage = "%(prog)s [-c CONFIG] [--json] [--section.key=VALUE | --section.key VALUE ...]"
    p.epilog = render_help()
    p.add_argument("-c", "--config", help="TOML config file (default: the built-in small GPT)")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout at the end")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s show [CONFIG] [-c CONFIG] [--section.key=VALUE ...]"
    p.epilog = "Keys and their meanings: `paratrain train --help` or docs/config.md."
    p.add_argument("action", choices=["show"], help="show: print the resolved config as TOML")
    p.add_argument("file", nargs="?", metavar="CONFIG", help="TOML config file (default: the built-in config)")
    p.add_argument("-c", "--config", help="the same, as an option")


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


def cmd_train(args: argparse.Namespace) -> int:
    from paratrain.training.launch import launch  # torch: loaded when a verb needs it, so `paratrain -h` is instant

    cfg = Config.load(args.config, args.overrides)
    summary = launch(cfg)
    if args.json:
        print(dumps_strict(summary))
    if summary.get("status") != "ok":
        print(f"paratrain: training failed: {summary.get('error', 'see the log above')}", file=sys.stderr)
        return 1
    if "steps" not in summary:  # a process that trained nothing itself (a parameter server under torchrun)
        print(f"done: {summary.get('role', 'finished')}")
        return 0
    vl, fl = summary.get("val_loss"), summary.get("final_loss")
    tail = f", val loss {vl:.4f}" if isinstance(vl, float) else ""
    loss = f", loss {fl:.4f}" if isinstance(fl, float) else ""
    print(f"done: {summary['steps']} steps{loss}{tail} -> {cfg.run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.file and args.config:
        raise UsageError("give the config file once: CONFIG or -c CONFIG")
    print(Config.load(args.file or args.config, args.overrides).to_toml(), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from paratrain.data import Corpus, open_corpus, prepare  # torch and numpy, for this verb only
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


# verbs implemented in this module: verb -> (add_arguments, main)
LOCAL: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": (_add_train, cmd_train),
    "config": (_add_config, cmd_config),
    "prepare": (_add_prepare, cmd_prepare),
}
TAKES_OVERRIDES = {"train", "config"}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the ``selected`` verb's options are built (and its module imported)."""
    parser = _Parser(prog="paratrain", description="Train large Transformers across processes and machines.",
                     epilog="`paratrain VERB --help` for a verb's options; config keys: `paratrain train --help`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if verb != selected:
            continue
        if verb in LOCAL:
            LOCAL[verb][0](p)
        else:
            importlib.import_module(module).add_arguments(p)
    return parser


def _run(argv: list[str]) -> int:
    verb = argv[0] if argv else None
    overrides: list[str] = []
    if verb in TAKES_OVERRIDES:  # config overrides are not argparse options: split them off first
        overrides, rest = split_overrides(argv[1:])
        argv = [verb, *rest]
    parser = build_parser(verb)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    if args.verb is None:
        parser.print_help()
        return 2
    args.overrides = overrides
    if args.verb in LOCAL:
        return LOCAL[args.verb][1](args)
    return int(importlib.import_module(VERBS[args.verb][0]).main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run one ``paratrain`` command line; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paratrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `paratrain ... --json | head`: the reader left; end quietly like any filter
        stdout_to_devnull()
        return 141  # 128 + SIGPIPE, what a shell reports for a filter its reader left


if __name__ == "__main__":
    sys.exit(main())
