"""Memory of ZeRO 1/2/3 against DDP, and of activations under activation checkpointing.

    python benchmarks/memory.py [zero|activations|all] [--layers 16] [--steps 5]

zero: a ~50M-parameter GPT with AdamW, fp32, 2 ranks: peak RSS per rank for DDP and
ZeRO 1/2/3, above a baseline (the same launch with a 2-layer, d_model = 32 model: torch,
gloo, data, the DTensor/FSDP stack), next to the ZeRO paper's model-state prediction in its
fp32 form (params 4 + grads 4 + Adam 8 bytes per parameter: DDP 16Ψ, ZeRO-1 8Ψ + 8Ψ/N,
ZeRO-2 4Ψ + 12Ψ/N, ZeRO-3 16Ψ/N) plus the activations the formula below predicts.  Every
run gets ``MALLOC_MMAP_THRESHOLD_=131072`` (with glibc's default, FSDP2's freed buffers stay in the heap).

activations: per-layer activation memory (RSS held after the forward, differenced over the
layer count so weights and logits cancel) for AC none / selective / full, against Korthikanti
et al.'s s·b·h·(34 + 5·a·s/h) bytes (16-bit, dropout) in its fp32, dropout-free form
s·b·h·(64 + 4·a·s/h) (none), 64·s·b·h (selective), 4·s·b·h (full), with PyTorch's default
attention kernel (flash: never stores the a·s² scores) and the math kernel (stores them).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# ---- ZeRO -------------------------------------------------------------------------------------
def zero_prediction(psi: float, n: int) -> dict[str, float]:
    """Model-state bytes per rank, fp32 form of the ZeRO paper's Table 1 (K = 8 for Adam's m, v)."""
    return {"ddp": 16 * psi, "zero1": 8 * psi + 8 * psi / n, "zero2": 4 * psi + 12 * psi / n, "zero3": 16 * psi / n}


def activation_prediction_fp32(s: int, b: int, h: int, a: int, mode: str) -> float:
    """Korthikanti et al. per-layer activation bytes, fp32 and no dropout (see module docstring)."""
    if mode == "full":
        return 4.0 * s * b * h
    attn_scores = 4.0 * a * s * s * b if mode == "none" else 0.0
    return 64.0 * s * b * h + attn_scores


def zero_bench(layers: int, steps: int) -> dict:
    from paratrain.config import Config
    from paratrain.training.launch import launch

    os.environ.update(MALLOC)
    d, heads, seq, batch = 512, 8, 64, 2
    common = ["--parallel.nproc=2", "--train.threads=1", f"--train.steps={steps}", "--train.warmup_steps=1",
              "--train.eval_every=0", "--train.eval_batches=1", "--train.log_every=1", "--checkpoint.keep=0",
              f"--data.seq_len={seq}", f"--data.batch_size={batch}", "--model.max_seq_len=64"]
    big = [f"--model.n_layer={layers}", f"--model.d_model={d}", f"--model.n_head={heads}", f"--model.d_ff={4 * d}"]
    tiny = ["--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.d_ff=64"]
    layouts = {"ddp": [], "zero1": ["--parallel.zero=1"], "zero2": ["--parallel.zero=2"],
               "zero3": ["--parallel.zero=3"]}
    out: dict = {"layers": layers, "d_model": d, "seq_len": seq, "batch_per_rank": batch, "ranks": 2}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, model: list[str], extra: list[str]) -> dict:
            cfg = Config.load(None, [*common, *model, *extra, f'--run.dir="{tmp}/{name}"'])
            s = launch(cfg)
            assert s["status"] == "ok", s
            return s

        base = {"ddp": run("base_ddp", tiny, []), "fsdp": run("base_fsdp", tiny, ["--parallel.zero=3"])}
        baseline = {k: max(v["peak_rss_mb"]) for k, v in base.items()}
        out["baseline_mb"] = baseline
        rows = {}
        for name, extra in layouts.items():
            s = run(name, big, extra)
            psi = s["params"]
            vocab_logits = 3 * 4 * seq * batch * 261  # logits, their softmax and gradient (fp32)
            acts = layers * activation_prediction_fp32(seq, batch, d, heads, "none") + vocab_logits
            states = zero_prediction(psi, 2)[name]
            above = max(s["peak_rss_mb"]) - baseline["ddp" if name in ("ddp", "zero1") else "fsdp"]
            pred = (states + acts) / 2**20
            rows[name] = {"strategy": s["strategy"], "peak_rss_mb": s["peak_rss_mb"], "above_baseline_mb": above,
                          "predicted_states_mb": states / 2**20, "predicted_mb": pred,
                          "measured_over_predicted": above / pred, "step_time_ms": s["step_time_ms_median"]}
        out["params"] = psi
        out["runs"] = rows
        out["zero3_over_ddp"] = rows["zero3"]["above_baseline_mb"] / rows["ddp"]["above_baseline_mb"]
    return out


# ---- activations ---------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _held_after_forward(n_layer: int, mode: str, math_attn: bool, s: int, b: int, h: int, a: int) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from paratrain.config import ModelConfig
    from paratrain.models import build_model
    from paratrain.models.loss import token_loss_sum
    from paratrain.parallel.memory_policy import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=n_layer, n_head=a, d_model=h, d_ff=4 * h, max_seq_len=s, tie_embeddings=False)
    model = build_model(cfg, 256, 0)
    apply_activation_checkpointing(model, mode)
    x = torch.randint(1, 256, (b, s))
    backend = SDPBackend.MATH if math_attn else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel([backend]):
        token_loss_sum(model(x), x).backward()  # warm-up: allocator, kernels, grads
        model.zero_grad(set_to_none=True)
        gc.collect()
        r0 = _rss_bytes()
        loss = token_loss_sum(model(x), x)
        held = _rss_bytes() - r0
    del loss
    return held


def activations_bench(s: int = 512, b: int = 2, h: int = 512, a: int = 8, l1: int = 2, l2: int = 6) -> dict:
    import torch

    torch.set_num_threads(1)
    rows = {}
    for backend in ("flash", "math"):
        for mode in ("none", "selective", "full"):
            m1 = _held_after_forward(l1, mode, backend == "math", s, b, h, a)
            m2 = _held_after_forward(l2, mode, backend == "math", s, b, h, a)
            per_layer = (m2 - m1) / (l2 - l1)
            pred = activation_prediction_fp32(s, b, h, a, mode)
            rows[f"{backend}/{mode}"] = {"measured_mb_per_layer": per_layer / 2**20,
                                         "predicted_mb_per_layer": pred / 2**20,
                                         "measured_over_predicted": per_layer / pred}
    return {"s": s, "b": b, "h": h, "a": a, "layers": [l1, l2], "per_layer": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=["zero", "activations", "all", "_activations"])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.what == "_activations":  # child with the malloc setting in place from the start
        print(json.dumps(activations_bench()))
        return
    out = {}
    if args.what in ("activations", "all"):
        child = subprocess.run([sys.executable, __file__, "_activations"], env=dict(os.environ, **MALLOC),
                               capture_output=True, text=True, check=True, timeout=900)
        out["activations"] = json.loads(child.stdout.strip().splitlines()[-1])
    if args.what in ("zero", "all"):
        stdout = os.dup(1)
        os.dup2(2, 1)  # the workers' progress lines go to stderr; stdout carries the JSON only
        try:
            out["zero"] = zero_bench(args.layers, args.steps)
        finally:
            sys.stdout.flush()
            os.dup2(stdout, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
