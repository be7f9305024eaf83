"""``paratrain report RUN_DIR``: report.md with PNG plots and the summary table.

Plots (when the run recorded the data): loss and val loss vs step, tokens/s, peak memory
per process, communication bytes per step, and the parameter-server staleness histogram
(any metrics.jsonl field whose name contains "stale": a number per step, a list of
samples, or a {staleness: count} histogram).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from paratrain.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (with metrics.jsonl / summary.json)")
    parser.add_argument("--out", default="", help="where report.md and the PNGs go (default: RUN_DIR)")


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """(metrics rows, summary, config text) of a run dir; ConfigError when it is not one."""
    if not run_dir.is_dir():
        raise ConfigError(f"run dir '{run_dir}' does not exist")
    rows: list[dict[str, Any]] = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for ln in metrics.read_text().splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict):
                rows.append(row)
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{run_dir}/summary.json is not valid JSON") from None
        if not isinstance(summary, dict):
            raise ConfigError(f"{run_dir}/summary.json is not a JSON object; is it a paratrain summary?")
    if not rows and not summary:
        raise ConfigError(f"'{run_dir}' has neither metrics.jsonl nor summary.json: not a paratrain run dir")
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else ""
    return rows, summary, config


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if _number(r.get(key)) and _number(r.get("step"))]
    return [p[0] for p in pts], [p[1] for p in pts]


def staleness_counts(rows: list[dict[str, Any]], summary: dict[str, Any]) -> Counter:
    """Staleness value -> count, from the fields named like ``*stale*`` (summary first, else metrics)."""
    counts: Counter = Counter()
    # the summary's whole-job histogram (every worker) wins over rank 0's per-step fields
    sources = [v for k, v in summary.items() if "stale" in k and isinstance(v, (dict, list))]
    if not sources:
        sources = [v for r in rows for k, v in r.items() if "stale" in k]
    for v in sources:
        if _number(v):
            counts[v] += 1
        elif isinstance(v, list):
            counts.update(x for x in v if _number(x))
        elif isinstance(v, dict):
            for k, c in v.items():
                try:
                    if math.isfinite(float(k)):
                        counts[float(k)] += int(c)
                except (TypeError, ValueError, OverflowError):
                    continue
    return counts


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=100, layout="tight")
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xlabel == "step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def make_plots(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> dict[str, str]:
    """Write the PNGs that have data; returns {plot name: file name}."""
    made: dict[str, str] = {}

    def save(fig, name: str, key: str) -> None:
        try:
            fig.savefig(out / name)
        except (ValueError, OverflowError):  # values matplotlib cannot lay out (e.g. 1e308): no plot
            return
        made[key] = name

    xs, ys = _series(rows, "loss")
    vx, vy = _series(rows, "val_loss")
    if xs or vx:
        fig, ax = _figure("Loss", "step", "loss")
        if xs:
            ax.plot(xs, ys, label="train loss", lw=1.2)
        if vx:
            ax.plot(vx, vy, "o-", label="val loss", lw=1.2)
        ax.legend()
        save(fig, "loss.png", "loss")
    xs, ys = _series(rows, "tokens_per_s")
    if xs:
        fig, ax = _figure("Throughput", "step", "tokens / s")
        ax.plot(xs, ys, lw=1.0)
        save(fig, "tokens_per_s.png", "throughput")
    rss = summary.get("peak_rss_mb")
    rss = [v for v in rss if _number(v)] if isinstance(rss, list) else []
    if rss:
        world = summary.get("world_size") if isinstance(summary.get("world_size"), int) else len(rss)
        labels = [f"rank {i}" if i < world else f"server {i - world}" for i in range(len(rss))]
        fig, ax = _figure("Peak memory per process", "", "peak RSS (MB)")
        ax.bar(labels, rss, color=["C0" if i < world else "C1" for i in range(len(rss))])
        save(fig, "memory.png", "memory")
    xs, ys = _series(rows, "comm_bytes")
    if xs and any(ys):
        fig, ax = _figure("Communication per step (one worker)", "step", "MB sent")
        ax.plot(xs, [y / 2**20 for y in ys], lw=1.0)
        save(fig, "comm_bytes.png", "comm")
    counts = staleness_counts(rows, summary)
    if counts:
        fig, ax = _figure("Parameter-server staleness", "staleness (clocks)", "count")
        keys = sorted(counts)
        ax.bar([str(int(k)) if float(k).is_integer() else f"{k:g}" for k in keys], [counts[k] for k in keys])
        save(fig, "staleness.png", "staleness")
    return made


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) if len(v) <= 8 else f"{len(v)} values"
    if isinstance(v, dict):
        return json.dumps(v)[:120]
    return "—" if v is None else str(v)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.md`` and the PNGs for ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    rows, summary, _ = load_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(rows, summary, out)
    titles = {"loss": "Loss and validation loss", "throughput": "Throughput", "memory": "Peak memory per process",
              "comm": "Communication bytes per step", "staleness": "Parameter-server staleness"}
    md = [f"# Run report: {run_dir.name}", ""]
    status = summary.get("status", "unknown (no summary.json)")
    md += [f"Status: **{status}**" + (f" — {summary['error']}" if summary.get("error") else ""), ""]
    if summary:
        md += ["## Summary", "", "| key | value |", "|---|---|"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if k != "recoveries"]
        md.append("")
    recoveries = summary.get("recoveries")
    for rec in [r for r in recoveries if isinstance(r, dict)] if isinstance(recoveries, list) else []:
        md.append(f"- restart {rec.get('attempt')}: failed after step {rec.get('failed_after_step')}, resumed "
                  f"from step {rec.get('resumed_from_step')}, lost {_fmt(rec.get('lost_s'))} s")
    md.append("")
    for key, title in titles.items():
        if key in plots:
            md += [f"## {title}", "", f"![{title}]({plots[key]})", ""]
    if "staleness" not in plots:
        md += ["No parameter-server staleness recorded (not a parameter-server run).", ""]
    md.append(f"{len(rows)} metrics lines from {run_dir / 'metrics.jsonl'}.")
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(args: argparse.Namespace) -> int:
    path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0
