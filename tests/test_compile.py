"""Throughput features against the eager fp32 run: regional torch.compile (single, DDP, ZeRO-3,
tensor parallel), op-level selective activation checkpointing, bf16 optimizer state, float8
(refused on the CPU; its GPU path run on torch's CPU float8 matmul), and honest MFU.

Compiled runs must report the eager run's losses within 1e-5 over 10 steps (Inductor
generates C++ on this CPU).  Compilation is most of these tests' time, so the multi-process
layouts share one set of worker processes (:func:`tests.test_model_parallel.run_group`).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paratrain.config import Config, ConfigError
from paratrain.training.launch import launch
from tests.conftest import tiny_config
from tests.test_model_parallel import GPT, ROOT, assert_parity, losses, run_group, summary

SINGLE = ["--parallel.nproc=1"]
COMPILE = ["--train.compile=true"]
FLOAT8 = ["--train.float8=tensorwise", "--debug.float8_on_cpu=true"]  # the GPU path, on torch's CPU float8 matmul


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, corpus) -> Path:
    """Eager, compiled and op-level-SAC single-process runs of the same tiny GPT."""
    root = tmp_path_factory.mktemp("compile")
    for name, extra in [("eager", []), ("compiled", COMPILE),
                        ("sac_op", ["--train.activation_checkpointing=selective_op"]),
                        ("bf16_state", ["--train.optim_state_dtype=bf16"]), ("bf16", ["--train.precision=bf16"]),
                        ("float8", FLOAT8)]:
        assert launch(tiny_config(root / name, corpus, *GPT, *SINGLE, *extra))["status"] == "ok"
    return root


def test_compiled_single_process_matches_eager(single_runs):
    assert_parity(single_runs / "eager", single_runs / "compiled")
    cache = single_runs / "compiled" / "compile_cache" / "rank0"
    assert cache.is_dir() and any(cache.rglob("*")), "Inductor's cache belongs in the run directory"
    assert not (single_runs / "eager" / "compile_cache").exists()


def test_op_level_selective_checkpointing_matches_no_checkpointing(single_runs):
    assert_parity(single_runs / "eager", single_runs / "sac_op")


def test_bf16_optimizer_state_trains_close_to_fp32(single_runs):
    a, b = losses(single_runs / "eager"), losses(single_runs / "bf16_state")
    assert max(abs(a[s] - b[s]) for s in a) < 2e-2  # bf16 moments: rounding, not a different optimizer
    assert b[10] < b[1]


def test_mfu_is_a_fraction_with_both_cpu_peaks(single_runs):
    for name in ("eager", "compiled"):
        s = summary(single_runs / name)
        assert 0 < s["mfu"] <= 1, (name, s["mfu"])
        assert s["peak_flops_start"] > 0 and s["peak_flops_end"] > 0
        assert s["peak_flops_per_worker"] >= max(s["peak_flops_start"], s["peak_flops_end"])
        for row in map(json.loads, (single_runs / name / "metrics.jsonl").read_text().splitlines()):
            assert "mfu" not in row or 0 < row["mfu"] <= 1


def test_op_sac_saves_matmuls_and_recomputes_the_rest():
    """Under selective_op a block's backward recomputes element-wise ops but no matmul."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from paratrain.models.blocks import Block
    from paratrain.parallel.memory_policy import apply_activation_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def run(mode: str) -> list[str]:
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"0": Block(16, 2, 32, 0.0, causal=True)})
        model.layer_modules = lambda: list(model.values())
        apply_activation_checkpointing(model, mode)
        x = torch.randn(2, 8, 16, requires_grad=True)
        y = model["0"](x).sum()
        with Count() as c:
            y.backward()
        return c.ops

    none, full, op = run("none"), run("full"), run("selective_op")
    mm = ("mm.default", "addmm.default", "bmm.default")
    assert sum(o in mm for o in full) > sum(o in mm for o in none)  # full recomputes the forward's matmuls
    assert sum(o in mm for o in op) == sum(o in mm for o in none)  # op-level SAC recomputes none of them
    assert len(op) > len(none)  # ... but does recompute the element-wise rest


def test_float8_is_refused_on_cpu(tmp_path, corpus):
    from paratrain.parallel.float8 import REFUSED, apply_float8

    cfg = tiny_config(tmp_path / "f8", corpus, *GPT, *SINGLE, "--train.float8=rowwise")
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        apply_float8(torch.nn.Linear(16, 16), cfg, torch.device("cpu"))
    r = subprocess.run([sys.executable, "-m", "paratrain.cli", "train", *GPT, *SINGLE, "--train.float8=tensorwise",
                        f'--run.dir="{tmp_path / "cli"}"', "--model.n_layer=1", "--train.steps=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert REFUSED in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_float8_swap_keeps_the_head_and_unaligned_layers_and_stays_close_to_fp32():
    """torchao's swap as training applies it (the CPU check aside; torch's float8 matmul also runs
    on the CPU): the block linears become Float8Linear in both recipes, the LM head and a layer
    of unaligned size stay nn.Linear, and a float8 forward/backward is close to fp32 (not equal)."""
    from paratrain.models import build_model
    from paratrain.parallel.float8 import swap_linears_to_float8

    cfg = Config.load(None, ["--model.n_layer=2"])
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for recipe in ("tensorwise", "rowwise"):
        torch.manual_seed(0)
        ref = build_model(cfg.model, 256, 0)
        ref.odd = torch.nn.Linear(128, 40)  # 40 outputs: not a multiple of 16
        model = copy.deepcopy(ref)
        assert swap_linears_to_float8(model, recipe) == 12
        assert type(model.lm_head) is torch.nn.Linear and type(model.odd) is torch.nn.Linear
        assert all(type(m).__name__ == "Float8Linear" for n, m in model.named_modules()  # (not public in torchao)
                   if n.startswith("layers.") and isinstance(m, torch.nn.Linear))
        losses = []
        for m in (ref, model):
            loss = m(x).pow(2).mean()
            loss.backward()
            losses.append(loss.item())
        g, g8 = (m.get_parameter("layers.0.ffn.fc1.weight").grad for m in (ref, model))
        # close to fp32, and not equal to it: the matmuls really ran in float8
        assert 0 < abs(losses[0] - losses[1]) < 0.01 * abs(losses[0]), (recipe, losses)
        assert 1e-3 < (g8 - g).norm() / g.norm() < 0.15, recipe


def test_fsdp_bf16_policy_gathers_bf16_and_reduces_fp32():
    from paratrain.parallel.sharding import mixed_precision_policy

    mp = mixed_precision_policy("bf16")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("fp32").param_dtype is None


@pytest.mark.slow
def test_compiled_parallel_layouts_match_single_process(single_runs, tmp_path_factory, corpus):
    """DDP(2), ZeRO-3(2) and tp2 compiled, against the eager single-process run; ZeRO-2 in bf16
    (FSDP2's mixed-precision policy) against single-process bf16 autocast; and ZeRO-2 with
    float8 linears (the GPU path, on the CPU by ``debug.float8_on_cpu``) against one process."""
    root = tmp_path_factory.mktemp("compile_mp")
    dp2 = ["--parallel.nproc=2", "--data.batch_size=4"]
    layouts = {"ddp2": dp2, "zero3": [*dp2, "--parallel.zero=3"], "tp2": ["--parallel.nproc=2", "--parallel.tp=2"]}
    cfgs = [tiny_config(root / name, corpus, *GPT, *extra, *COMPILE) for name, extra in layouts.items()]
    cfgs.append(tiny_config(root / "zero2_bf16", corpus, *GPT, *dp2, "--parallel.zero=2", "--train.precision=bf16"))
    cfgs.append(tiny_config(root / "zero2_f8", corpus, *GPT, *dp2, "--parallel.zero=2", *FLOAT8))
    run_group(2, cfgs, timeout=900)
    for name in layouts:
        assert_parity(single_runs / "eager", root / name)
        assert (root / name / "compile_cache" / "rank1").is_dir()
    a, b = losses(single_runs / "bf16"), losses(root / "zero2_bf16")
    assert max(abs(a[s] - b[s]) for s in a) < 2e-2, (a, b)  # bf16 rounding apart, the same training
    # ZeRO-2 all-gathers the float8 weights (one scale pass per step) against one process in float8;
    # the activations' dynamic scales differ with the per-rank batch, so the two agree to ~1e-3
    a, b, fp32 = losses(single_runs / "float8"), losses(root / "zero2_f8"), losses(single_runs / "eager")
    assert max(abs(a[s] - b[s]) for s in a) < 5e-3, (a, b)
    assert 1e-6 < max(abs(a[s] - fp32[s]) for s in a) < 2e-2, (a, fp32)  # float8 matmuls, close to fp32


@pytest.mark.slow
def test_compiled_parameter_server_workers_match_single_process(single_runs, tmp_path, corpus):
    """Two compiled workers around two sync parameter servers (AdamW on the servers), their
    pushes leaving during the compiled blocks' backward (ps.overlap)."""
    cfg = tiny_config(tmp_path / "ps", corpus, *GPT, *COMPILE, "--parallel.nproc=2", "--data.batch_size=4",
                      "--parallel.sync=ps", "--ps.mode=sync", "--ps.servers=2")
    assert launch(cfg)["status"] == "ok"
    assert_parity(single_runs / "eager", tmp_path / "ps")
    rows = map(json.loads, (tmp_path / "ps" / "metrics.jsonl").read_text().splitlines())
    assert sum(r.get("ps_early_pushes", 0) for r in rows) > 0
