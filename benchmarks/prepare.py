"""``prepare`` throughput and memory: tokens/s with 1 and 2 worker processes, and peak RSS on a
JSON-lines corpus 4x larger than the memory cap given to ``prepare`` (``max_memory_mb``).

A corpus of real text (the Python standard library's source, in records of about 2 KB) is written
at 1x and 4x the cap; each run is a fresh process (so peak RSS is its own) that prepares it with
the byte tokenizer (always in-process: its encoding is a copy) and with a BPE ``tokenizer.json``
trained here (2 worker processes, and 1 for the speedup).  "Flat" means the 4x corpus
peaks at about the same RSS as the 1x one: memory follows the cap, not the corpus.

    python benchmarks/prepare.py [--cap-mb 32] [--workdir /tmp/paratrain-prepare-bench]

Prints one strict JSON object: a row per run (tokenizer, corpus_mb, workers, tokens, tokens_per_s,
rss_before_mb: after imports, peak_rss_mb: main process, peak_worker_rss_mb, growth_mb: peak minus
before) and the ratios rss_growth_4x_over_1x and speedup_2_workers (per tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(path: Path, size_mb: float) -> None:
    """JSON lines of ~2 KB stdlib-source records until ``size_mb`` MiB, written streaming."""
    from paratrain.data import stdlib_files

    if path.is_file() and abs(path.stat().st_size / 2**20 - size_mb) < 1:
        return
    target, written, k = int(size_mb * 2**20), 0, 0
    with open(path, "w") as out:
        while written < target:
            for f in stdlib_files():
                text = f.read_text(errors="replace")
                for i in range(0, len(text), 2000):
                    line = json.dumps({"id": k, "text": text[i:i + 2000]}) + "\n"
                    out.write(line)
                    written, k = written + len(line), k + 1
                    if written >= target:
                        return


def train_tokenizer(work: Path) -> Path:
    """A byte-level BPE of 8192 ids trained on the first 8 MB of the stdlib, saved as tokenizer.json."""
    from paratrain.data import BPETokenizer, stdlib_files

    path = work / "tok" / "tokenizer.json"
    if not path.is_file():
        texts, size = [], 0
        for f in stdlib_files():
            texts.append(f.read_text(errors="replace"))
            size += len(texts[-1])
            if size > 8 * 2**20:
                break
        BPETokenizer().train(texts, 8192).save(path)
    return path


def one_run(spec: dict) -> dict:
    """Prepare one corpus in this process; returns the row (run in a fresh child per row)."""
    from paratrain.data import open_corpus, prepare

    before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    meta = prepare(open_corpus(f"jsonl:{spec['corpus']}"), spec["out"], tokenizer=spec["tokenizer"],
                   max_memory_mb=spec["cap_mb"], workers=spec["workers"], shard_tokens=1 << 24)
    dt = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokenizer": spec["name"], "corpus_mb": spec["corpus_mb"], "workers": spec["workers"],
            "tokens": meta["total_tokens"], "seconds": round(dt, 2), "tokens_per_s": round(meta["total_tokens"] / dt),
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "peak_worker_rss_mb": round(child, 1) if spec["workers"] > 1 else None,
            "growth_mb": round(peak - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap-mb", type=float, default=32.0, help="max_memory_mb given to prepare")
    ap.add_argument("--workdir", default="/tmp/paratrain-prepare-bench")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cap = args.cap_mb
    corpora = {mult: work / f"corpus_{mult}x.jsonl" for mult in (1, 4)}
    for mult, path in corpora.items():
        write_corpus(path, mult * cap)
    tokenizers = {"byte": "byte", "bpe-8192": f"hf:{train_tokenizer(work)}"}
    rows = []
    for name, spec in tokenizers.items():
        for mult, workers in ((1, 2), (4, 2), (4, 1)) if name != "byte" else ((1, 1), (4, 1)):
            one = {"name": name, "tokenizer": spec, "corpus": str(corpora[mult]), "cap_mb": cap, "workers": workers,
                   "corpus_mb": round(corpora[mult].stat().st_size / 2**20, 1), "out": str(work / "out")}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True,
                                  text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {}
    for name in tokenizers:
        w = 1 if name == "byte" else 2
        r = {(row["corpus_mb"] > 2 * cap, row["workers"]): row for row in rows if row["tokenizer"] == name}
        summary[name] = {
            "rss_growth_4x_over_1x": round(r[(True, w)]["growth_mb"] / max(r[(False, w)]["growth_mb"], 0.1), 3),
            "growth_4x_under_cap": r[(True, w)]["growth_mb"] <= cap}
        if w == 2:
            summary[name]["speedup_2_workers"] = round(r[(True, 2)]["tokens_per_s"] / r[(True, 1)]["tokens_per_s"], 3)
    print(json.dumps({"benchmark": "prepare", "cap_mb": cap, "cpus": os.cpu_count(), "rows": rows,
                      "summary": summary}, allow_nan=False))


if __name__ == "__main__":
    main()
