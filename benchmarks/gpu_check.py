"""GPU check on one CUDA device: does paratrain train there, how fast, and how good is the
planner's GPU model?  Writes one JSON object (``--out``) and a markdown table (``--md``).

1. ``paratrain doctor --json`` and the measured bf16 / fp32 matmul ceilings (8192^3).
2. Gradient codecs on CUDA tensors (payload device, error feedback, GPU vs CPU decode).
3. Loss agreement: the default gpt for 10 fp32 steps on the GPU and on the CPU, same seed and
   batch, eager and with ``train.compile`` on both: the largest loss difference.
4. Throughput matrix, bf16, one GPU: GPT and Llama shapes of about 125M, 350M and 1B
   parameters, each eager / compile / compile + float8 (tensorwise; the float8 column needs
   torchao and compute capability >= 8.9), plus full and op-level selective recompute at
   the largest GPT: tokens/s, MFU (model FLOPs over the spec-sheet peak of the dtype in
   use, and over the bf16 peak), measured peak memory against the planner's prediction,
   and the step-time ratios the targets are about.  Runs in this process through the
   trainer (``Trainer.train_step``), the rows the targets need first (see ``run_order``),
   in what is left of ``--budget-s`` (the whole script's, default 450 s); what does not fit
   is listed as skipped.  Llama shapes need ``model.arch = "llama"``; where this checkout
   has no such arch they are skipped with a note.

    python benchmarks/gpu_check.py [--steps 20] [--budget-s 450] [--out FILE] [--md FILE]
    python benchmarks/gpu_check.py --cpu-smoke      # tiny shapes on the CPU (float8 too): checks the script

A GPU machine without network access gets the optional packages as wheels for its Python,
fetched where there is network (``.wheels/`` is git-ignored: carry it)::

    pip download torchao pyzmq --no-deps -d .wheels      # here
    pip install --no-deps .wheels/*.whl && python benchmarks/gpu_check.py     # there

Nothing here runs in CI (it needs a GPU); results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from paratrain.config import Config, ConfigError  # noqa: E402
from paratrain.mfu import compute_dtype, device_peak_flops, mfu  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# name -> (arch, n_layer, d_model, n_head, n_kv_head, d_ff, vocab, seq, batch); largest first
SHAPES: dict[str, tuple] = {
    "gpt-1.3b": ("gpt", 24, 2048, 16, 0, 8192, 50304, 2048, 8),
    "llama-1b": ("llama", 16, 2048, 32, 8, 8192, 128256, 2048, 8),
    "gpt-350m": ("gpt", 24, 1024, 16, 0, 4096, 50304, 1024, 16),
    "llama-350m": ("llama", 24, 1024, 16, 4, 2816, 32000, 1024, 16),
    "gpt-125m": ("gpt", 12, 768, 12, 0, 3072, 50304, 1024, 16),
    "llama-125m": ("llama", 12, 768, 12, 4, 2048, 32000, 1024, 16),
}
SMOKE_SHAPES: dict[str, tuple] = {
    "gpt-tiny": ("gpt", 2, 64, 4, 0, 256, 512, 64, 4),
    "llama-tiny": ("llama", 2, 64, 4, 2, 192, 512, 64, 4),
}
# mode -> train overrides
MODES = {"eager": {}, "compile": {"compile": True}, "compile+float8": {"compile": True, "float8": "tensorwise"},
         "compile+ac_full": {"compile": True, "activation_checkpointing": "full"},
         "compile+ac_selective_op": {"compile": True, "activation_checkpointing": "selective_op"}}
RECOMPUTE_SHAPE = "gpt-1.3b"  # the shape the recompute modes run on


def doctor() -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "paratrain.cli", "doctor", "--json"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"rc": r.returncode, "stdout": r.stdout[-2000:], "stderr": r.stderr[-2000:]}


def matmul_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def codecs_on_device() -> dict[str, Any]:
    """Every gradient codec on a CUDA tensor: payload on the GPU, error feedback exact, and the
    GPU decode equal to the CPU one where the codec is deterministic."""
    from paratrain.grad_compression.codecs import get_codec

    out: dict[str, Any] = {}
    x_cpu = torch.randn(1000, 257, generator=torch.Generator().manual_seed(0))
    for name, kw in [("fp16", {}), ("bf16", {}), ("int8", {}), ("int8", {"rounding": "stochastic"}),
                     ("topk", {"ratio": 0.01}), ("powersgd", {"rank": 4})]:
        key = name + ("-stochastic" if kw.get("rounding") else "")
        row: dict[str, Any] = {}
        decoded = {}
        for dev in ("cpu", "cuda"):
            codec = get_codec(name, **kw)
            state = codec.new_state(error_feedback=True, seed=1)
            x = x_cpu.to(dev)
            payload = codec.encode(x, state)
            y = codec.decode(payload)
            decoded[dev] = y.float().cpu()
            if dev == "cuda":
                row["payload_on"] = sorted({t.device.type for t in payload.tensors})
                row["payload_bytes"] = payload.nbytes
                row["ef_max_err"] = float((y.float() + state.residual - x).abs().max())
        row["gpu_vs_cpu_max_diff"] = float((decoded["cuda"] - decoded["cpu"]).abs().max())
        out[key] = row
    return out


def agreement(steps: int, **train: Any) -> dict[str, Any]:
    """The default gpt, fp32, on the GPU and on the CPU (subprocesses): the largest loss difference."""
    from paratrain.planner.measure import run_layout

    def cfg(backend: str) -> Config:
        data = Config.default().to_dict()
        data["parallel"].update(nproc=1, backend=backend)
        data["train"].update(steps=steps, eval_every=0, log_every=1, deterministic=True, **train)
        data["checkpoint"].update(every=0, keep=0, resume=False, path="")
        return Config.from_dict(data)

    gpu, cpu = run_layout(cfg("nccl"), timeout_s=600), run_layout(cfg("gloo"), timeout_s=600)
    out: dict[str, Any] = {"gpu_status": gpu.get("status"), "cpu_status": cpu.get("status")}
    if gpu.get("status") == "ok" and cpu.get("status") == "ok":
        diffs = [abs(a - b) for a, b in zip(gpu["losses"], cpu["losses"], strict=True)]
        out.update(steps=len(diffs), max_abs_loss_diff=max(diffs), gpu_losses=gpu["losses"], cpu_losses=cpu["losses"])
    else:
        out.update(gpu_reason=gpu.get("reason"), cpu_reason=cpu.get("reason"))
    return out


def shape_config(name: str, shape: tuple, mode: str, steps: int, run_dir: str, device: str) -> Config:
    """A bf16 single-device config for one shape and mode (ConfigError: the arch is unknown here)."""
    arch, layers, d, heads, kv, ff, vocab, seq, batch = shape
    model = dict(arch=arch, n_layer=layers, d_model=d, n_head=heads, d_ff=ff, max_seq_len=seq, dropout=0.0,
                 vocab_size=vocab)
    if arch == "llama":
        model.update(n_kv_head=kv)
    data = Config.default().to_dict()
    unknown = sorted(set(model) - set(data["model"]))
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a key in this checkout")
    data["model"].update(model)
    data["data"].update(seq_len=seq, batch_size=batch)
    data["train"].update(steps=steps + 10, warmup_steps=5, eval_every=0, log_every=1, lr=3e-4,
                         precision="bf16", **MODES[mode])
    data["parallel"].update(nproc=1, backend="nccl" if device == "cuda" else "gloo")
    data["checkpoint"].update(every=0, keep=0, resume=False, path="")
    data["run"].update(name=f"{name}-{mode}", dir=run_dir)
    data["debug"].update(float8_on_cpu=device == "cpu")  # --cpu-smoke: the float8 rows on torch's CPU float8 matmul
    return Config.from_dict(data)


def planner_prediction(cfg: Config, name: str, gpu_type: str) -> dict[str, Any]:
    """The planner's step time and peak memory for ``cfg`` on ``gpu_type`` (less the fixed reserve)."""
    try:
        from paratrain.planner.calibrate import get_spec
        from paratrain.planner.flops import spec_from_config
        from paratrain.planner.measure import predict

        hw = get_spec(gpu_type)
        step_s, mem = predict(cfg, spec_from_config(cfg, name), hw)
        return {"predicted_step_ms": step_s * 1e3, "predicted_mem_mb": (mem[0] - hw.reserved_bytes) / 2**20}
    except (ValueError, KeyError, ConfigError) as e:  # e.g. an arch the planner does not model
        return {"planner": f"not modelled: {e}"}


def train_in_process(cfg: Config, steps: int, device: str) -> dict[str, Any]:
    """Build the trainer, run warm-up steps (compilation happens here), then time ``steps`` steps."""
    from paratrain.parallel import ParallelDims
    from paratrain.training.spec import RunSpec
    from paratrain.training.trainer import Trainer

    torch._dynamo.reset()  # every shape compiles afresh (no recompile limit carried across runs)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ParallelDims.from_env(cfg, init=False), RunSpec.from_config(cfg))
    losses, times = [], []
    for i in range(steps + 3):
        s0 = time.perf_counter()
        loss_sum, n = trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - s0)
        losses.append(trainer.reduced_loss(loss_sum, n))
        if i == 2:
            warm_s = time.perf_counter() - t0
    step_s = statistics.median(times)
    tok_s = trainer.tokens_per_step / step_s
    dtype = compute_dtype(cfg.train.precision, cfg.train.float8)
    name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    peak, bf16_peak = device_peak_flops(device, name, dtype), device_peak_flops(device, name, "bf16")
    out = {"status": "ok", "params": trainer.n_params, "step_ms": step_s * 1e3, "tokens_per_s": tok_s,
           "mfu": mfu(trainer.flops_per_token, tok_s, 1, peak), "peak_dtype": dtype,
           "mfu_vs_bf16_peak": mfu(trainer.flops_per_token, tok_s, 1, bf16_peak), "warmup_s": warm_s,
           "first_loss": losses[0], "last_loss": losses[-1]}
    if device == "cuda":
        out["measured_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del trainer
    gc.collect()
    return out


def run_order(names: list[str], device: str) -> list[tuple[str, str]]:
    """(shape, mode) rows in the order they run: first those the targets are read from (the
    largest shape compiled, with float8 and -- on a GPU -- with full recompute, and the
    350M-class GPT compiled), then their eager baselines, then the rest, largest shapes first;
    so what the time budget cuts off is what is needed least."""
    big, mid = names[0], next((n for n in names if n.startswith("gpt-350m")), names[-1])
    first = [(big, "compile"), (big, "compile+float8")]
    if device == "cuda":  # the recompute targets are GPU targets
        first.append((big, "compile+ac_full"))
    first += [(mid, "compile"), (big, "eager"), (mid, "eager")]
    if device == "cuda":
        first.append((big, "compile+ac_selective_op"))
    rest = [(n, m) for n in names for m in ("eager", "compile", "compile+float8") if (n, m) not in first]
    return list(dict.fromkeys(first)) + rest


def throughput_matrix(shapes: dict[str, tuple], steps: int, budget_s: float, gpu_type: str,
                      device: str) -> list[dict[str, Any]]:
    """Every shape x mode that fits in ``budget_s``, in ``run_order``; see the module docstring."""
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    for name, mode in run_order(list(shapes), device):
        row: dict[str, Any] = {"model": name, "mode": mode}
        rows.append(row)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cfg = shape_config(name, shapes[name], mode, steps, tmp, device)
            except ConfigError as e:
                row.update(status="skipped", reason=f"arch {shapes[name][0]!r} unknown here: {e}")
                continue
            if time.time() - t_start > budget_s:
                row.update(status="skipped", reason=f"over the {budget_s:.0f} s budget")
                continue
            row.update(planner_prediction(cfg, name, gpu_type) if device == "cuda" else {})
            t0 = time.time()
            try:
                row.update(train_in_process(cfg, steps, device))
            except ConfigError as e:  # float8 without torchao / fp8 tensor cores: the one-line refusal
                row.update(status="refused", reason=str(e))
            except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            row["wall_s"] = time.time() - t0
        if "measured_mem_mb" in row and "predicted_mem_mb" in row:
            row["mem_ratio"] = row["predicted_mem_mb"] / row["measured_mem_mb"]
        print(json.dumps(row), file=sys.stderr, flush=True)
    _ratios(rows)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Per model: compile and float8 speed-ups over eager / compile; recompute cost over compile."""
    ok = {(r["model"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    for (model, mode), r in ok.items():
        base = ok.get((model, "eager" if mode == "compile" else "compile"))
        if base and mode != "eager":
            r["time_ratio_vs_" + ("eager" if mode == "compile" else "compile")] = r["step_ms"] / base["step_ms"]


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    """One table row per (model, mode)."""
    head = (f"| model ({device}) | mode | params | tokens/s | MFU | MFU vs bf16 peak | step ms | ratio | "
            "peak mem MB | planner mem MB | status |\n|---|---|---|---|---|---|---|---|---|---|---|\n")

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    lines = []
    for r in rows:
        ratio = r.get("time_ratio_vs_eager", r.get("time_ratio_vs_compile"))
        status = r.get("status", "")
        if status != "ok":
            status += f": {r.get('reason', '')}"[:80]
        lines.append(f"| {r['model']} | {r['mode']} | {f(r.get('params', 0) / 1e6, '.1f')}M | "
                     f"{f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('mfu'), '.3f')} | "
                     f"{f(r.get('mfu_vs_bf16_peak'), '.3f')} | {f(r.get('step_ms'), '.1f')} | {f(ratio, '.2f')} | "
                     f"{f(r.get('measured_mem_mb'), ',.0f')} | {f(r.get('predicted_mem_mb'), ',.0f')} | {status} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (after 3 warm-up steps)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole script")
    ap.add_argument("--gpu-type", default="h200")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--md", default="gpu_check.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script itself)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (torch.cuda.is_available() is False); --cpu-smoke runs tiny shapes "
              "on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    t0 = time.time()
    res: dict[str, Any] = {"device": "cpu" if smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    # the matrix gets what is left of the budget, less a minute for the row that overruns it
    parts = [("throughput", lambda: throughput_matrix(SMOKE_SHAPES if smoke else SHAPES, 3 if smoke else args.steps,
                                                      args.budget_s - 60 - (time.time() - t0), args.gpu_type,
                                                      device))]
    if not smoke:
        parts = [("doctor", doctor), ("matmul", lambda: {"bf16_tflops": matmul_tflops(torch.bfloat16),
                                                         "fp32_tflops": matmul_tflops(torch.float32)}),
                 ("codecs", codecs_on_device), ("agreement", lambda: agreement(10)),
                 ("agreement_compile", lambda: agreement(10, compile=True)), *parts]
    for key, fn in parts:
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' results
            res[key] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        print(f"[gpu_check] {key} done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    res["wall_s"] = time.time() - t0
    text = json.dumps(res, indent=2, default=str)
    with open(args.out, "w") as f:
        f.write(text)
    if isinstance(res["throughput"], list):
        with open(args.md, "w") as f:
            f.write(markdown(res["throughput"], res["device"]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
