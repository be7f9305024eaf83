"""GPU check on one CUDA device: does paratrain train there, and how good is the planner's
GPU model?  Prints one JSON object (and writes it to ``--out`` when given).

1. ``paratrain doctor --json`` (CUDA, cuDNN, NCCL world-1 all-reduce, gloo).
2. The measured bf16 / fp32 matmul ceilings of the device (8192^3 products).
3. Gradient codecs on CUDA tensors (payload device, error feedback, GPU vs CPU decode).
   Device agreement, plain and through one parameter server (needs pyzmq there): the
   default gpt for 10 fp32 steps on the GPU (NCCL, 1 rank) and on the CPU (gloo, 1 rank),
   same seed and batch: the largest loss difference.
4. Planner accuracy: for GPT sizes in bf16 autocast on 1 GPU, the planner's predicted step
   time and peak memory (``paratrain plan``'s model, ``--gpu-type`` spec) against the
   measured median step time and ``torch.cuda.max_memory_allocated``; and the step time
   predicted with the compute efficiency fitted to one model's timed forward + backward
   (what ``paratrain plan --efficiency`` takes), which tests the rest of the time model.

    python benchmarks/gpu_check.py [--steps 30] [--gpu-type h200] [--out FILE]

Nothing here runs in CI (it needs a GPU); results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from paratrain.config import Config  # noqa: E402
from paratrain.planner.flops import spec_from_config  # noqa: E402
from paratrain.planner.hardware import get_spec  # noqa: E402
from paratrain.planner.measure import predict, run_layout  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# (name, n_layer, d_model, n_head, seq_len, batch, activation checkpointing): byte vocabulary,
# GPT-2-like shapes
GPT_SIZES = [("gpt-25m", 6, 512, 8, 512, 32, "none"), ("gpt2-small-shape", 12, 768, 12, 1024, 16, "none"),
             ("gpt2-small-shape-ac", 12, 768, 12, 1024, 16, "full"),
             ("gpt-350m-shape", 24, 1024, 16, 1024, 8, "none")]
REFERENCE = "gpt2-small-shape"  # the model whose forward + backward calibrates the compute efficiency


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
    """Every gradient codec on a CUDA tensor: payload on the GPU, error feedback exact
    (decoded + residual == input), and the GPU decode equal to the CPU one where the codec
    is deterministic (stochastic rounding and PowerSGD's random start use per-device RNGs)."""
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


def tiny_config(backend: str, steps: int, **parallel: Any) -> Config:
    cfg = Config.default()
    data = cfg.to_dict()
    data["parallel"].update(nproc=1, backend=backend, **parallel)
    data["train"].update(steps=steps, eval_every=0, log_every=1, deterministic=True)
    data["checkpoint"].update(every=0, keep=0, resume=False, path="")
    return Config.from_dict(data)


def agreement(steps: int, **parallel: Any) -> dict[str, Any]:
    """The same run on the GPU and on the CPU: the largest loss difference."""
    gpu = run_layout(tiny_config("nccl", steps, **parallel), timeout_s=600)
    cpu = run_layout(tiny_config("gloo", steps, **parallel), timeout_s=600)
    out: dict[str, Any] = {"gpu_status": gpu.get("status"), "cpu_status": cpu.get("status")}
    if gpu.get("status") == "ok" and cpu.get("status") == "ok":
        diffs = [abs(a - b) for a, b in zip(gpu["losses"], cpu["losses"], strict=True)]
        out.update(steps=len(diffs), max_abs_loss_diff=max(diffs), gpu_losses=gpu["losses"],
                   cpu_losses=cpu["losses"])
    else:
        out.update(gpu_reason=gpu.get("reason"), cpu_reason=cpu.get("reason"))
    return out


def size_config(name: str, layers: int, d: int, heads: int, seq: int, batch: int, recompute: str,
                steps: int) -> Config:
    cfg = Config.default()
    data = cfg.to_dict()
    data["model"].update(n_layer=layers, d_model=d, n_head=heads, d_ff=4 * d, max_seq_len=seq, dropout=0.0)
    data["data"].update(seq_len=seq, batch_size=batch)
    data["train"].update(steps=steps, warmup_steps=5, eval_every=0, log_every=1, precision="bf16", lr=3e-4,
                         activation_checkpointing=recompute)
    data["parallel"].update(nproc=1, backend="nccl")
    data["checkpoint"].update(every=0, keep=0, resume=False, path="")
    data["run"]["name"] = name
    return Config.from_dict(data)


def fwd_bwd_ms(cfg: Config, repeats: int = 10) -> float:
    """Median forward + backward (bf16 autocast) of the config's model on one batch, in ms."""
    from paratrain.data import build_data
    from paratrain.models import build_model
    from paratrain.models.loss import lm_loss_sum

    data = build_data(cfg, 0, 1)
    model = build_model(cfg.model, data.vocab_size, data.pad_id).cuda()
    batch = {k: v.cuda() for k, v in next(data.train).items()}

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss_sum(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def planner_accuracy(steps: int, gpu_type: str) -> list[dict[str, Any]]:
    """Spec-sheet prediction, and a prediction whose compute efficiency is fitted to one
    reference model's measured forward + backward (``REFERENCE``) and then used for all."""
    hw = get_spec(gpu_type)
    ref = next(s for s in GPT_SIZES if s[0] == REFERENCE)
    ref_cfg = size_config(*ref, steps)
    ref_spec = spec_from_config(ref_cfg, REFERENCE)
    ref_ms = fwd_bwd_ms(ref_cfg)
    model_flops = ref_spec.flops_per_token("none") * ref_cfg.data.batch_size * ref_cfg.data.seq_len
    eff = model_flops / (ref_ms / 1e3 * hw.peak_flops)
    hw_cal = hw.with_(efficiency=eff)
    rows = []
    for name, layers, d, heads, seq, batch, recompute in GPT_SIZES:
        cfg = size_config(name, layers, d, heads, seq, batch, recompute, steps)
        pred_s, pred_mem = predict(cfg, spec_from_config(cfg, name), hw)
        cal_s, _ = predict(cfg, spec_from_config(cfg, name), hw_cal)
        t0 = time.time()
        res = run_layout(cfg, timeout_s=300)
        row: dict[str, Any] = {"model": name, "layers": layers, "d_model": d, "seq": seq, "batch": batch,
                               "recompute": recompute, "calibrated_efficiency": eff,
                               "reference_fwd_bwd_ms": ref_ms, "predicted_calibrated_step_ms": cal_s * 1e3,
                               "predicted_step_ms": pred_s * 1e3,
                               "predicted_mem_mb": pred_mem[0] / 2**20, "wall_s": time.time() - t0}
        if res.get("status") != "ok":
            row.update(status="error", reason=res.get("reason"))
        else:
            # skip the first steps (CUDA context, allocator warm-up, kernel autotuning)
            measured = statistics.median(res["step_ms_all"][5:] or res["step_ms_all"])
            mem = (res.get("peak_device_mem_mb") or [None])[0]
            # the planner's memory includes a fixed reserve for the CUDA context and fragmentation
            reserve = hw.reserved_bytes / 2**20
            row.update(status="ok", measured_step_ms=measured, step_ratio=pred_s * 1e3 / measured,
                       step_ratio_calibrated=cal_s * 1e3 / measured,
                       mfu=res.get("mfu"), tokens_per_s=res.get("tokens_per_s"), measured_mem_mb=mem,
                       predicted_mem_less_reserve_mb=row["predicted_mem_mb"] - reserve,
                       mem_ratio=(row["predicted_mem_mb"] - reserve) / mem if mem else None,
                       final_loss=res.get("final_loss"), params=res.get("params"))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gpu-type", default="h200")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    t0 = time.time()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    steps = [("doctor", doctor), ("matmul", lambda: {"bf16_tflops": matmul_tflops(torch.bfloat16),
                                                      "fp32_tflops": matmul_tflops(torch.float32)}),
             ("codecs", codecs_on_device), ("agreement", lambda: agreement(10)),
             ("ps_agreement", lambda: agreement(10, sync="ps")),
             ("planner", lambda: planner_accuracy(args.steps, args.gpu_type))]
    for key, fn in steps:
        try:
            res[key] = fn()
        except Exception as e:  # one failing part must not hide the others' results
            res[key] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        print(f"[gpu_check] {key} done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    res["wall_s"] = time.time() - t0
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
