"""Planner: the papers' worked examples (pure arithmetic), the search and the CLI contract.

Nothing here trains, and only the 2-rank layer probe's smoke test measures anything: the
CPU spec is the documented default.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from paratrain.cli import main as cli_main
from paratrain.config import Config, ModelConfig
from paratrain.planner import cost, flops, memory, search
from paratrain.planner.cost import Layout, Setup, estimate
from paratrain.planner.flops import PRESETS, ModelSpec
from paratrain.planner.hardware import CPU_DEFAULT, GPU_SPECS

# ---- ZeRO (Rajbhandari et al. 2020, figure 1: Ψ = 7.5B, N = 64, K = 12) ---------------------------


@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.40625), (2, 16.640625), (3, 1.875)])
def test_zero_model_states_paper_example(stage: int, gb: float) -> None:
    assert memory.zero_model_states(7.5e9, 64, stage, k=12) / 1e9 == pytest.approx(gb, rel=1e-12)


def test_zero_fp32_and_optimizer_bytes() -> None:
    assert memory.optimizer_state_bytes("adamw", "bf16") == 12
    assert memory.optimizer_state_bytes("adamw", "fp32") == 8
    assert memory.optimizer_state_bytes("sgd", "fp32") == 4
    # fp32 Adam: 4 + 4 + 8 = 16 bytes per parameter too, all sharded under ZeRO-3
    assert memory.zero_model_states(1e9, 4, 0, k=8, param_bytes=4, grad_bytes=4) == 16e9
    assert memory.zero_model_states(1e9, 4, 3, k=8, param_bytes=4, grad_bytes=4) == 4e9
    with pytest.raises(ValueError):
        memory.zero_model_states(1e9, 4, 4)


# ---- activations (Korthikanti et al. 2022, GPT-3 layer: s=2048, b=1, h=12288, a=96, t=8) ---------

GPT3_LAYER = dict(s=2048, b=1, h=12288, a=96)


@pytest.mark.parametrize("kw,expected", [
    (dict(t=1), 2_868_903_936),
    (dict(t=8), 578_813_952),
    (dict(t=8, sp=True), 358_612_992),
    (dict(t=8, sp=True, recompute="selective"), 106_954_752),
    (dict(t=1, recompute="full"), 50_331_648),
])
def test_activation_bytes_paper_values(kw: dict, expected: int) -> None:
    assert memory.activation_bytes_per_layer(**GPT3_LAYER, **kw) == expected


def test_activation_variants() -> None:
    base = memory.activation_bytes_per_layer(**GPT3_LAYER)
    assert memory.activation_bytes_per_layer(**GPT3_LAYER, flash=True) < base  # no s^2 scores
    sbh = 2048 * 12288
    # fp32, no dropout, fused attention: LN 2, QKV in 1, QKV 3, out in 1, attn out 1, MLP in 1, 2f = 8
    assert memory.activation_bytes_per_layer(**GPT3_LAYER, elem_bytes=4, dropout=False, flash=True) == 4 * 17 * sbh


def test_pipeline_inflight() -> None:
    assert memory.pipeline_inflight(8, 32) == 8  # 1F1B: p micro-batches on the first stage
    assert memory.pipeline_inflight(8, 32, "interleaved", 2) == pytest.approx(8 * (1 + 7 / (8 * 32)))
    assert memory.pipeline_inflight(8, 4) == 4
    assert memory.pipeline_inflight(4, 16, "gpipe") == 16
    assert memory.pipeline_inflight(1, 16) == 1


# ---- time ---------------------------------------------------------------------------------------------


def _gpt(l: int = 8, h: int = 1024, a: int = 16, s: int = 1024) -> ModelSpec:  # noqa: E741
    return ModelSpec("t", "gpt", l, h, a, 50257, s)


def test_pipeline_bubble_fraction() -> None:
    hw = GPU_SPECS["a100-80gb"].with_(layer_overhead_s=0.0)
    model = _gpt(l=16)
    setup = Setup(global_batch=32)
    for sched, v, frac in [("1f1b", 1, 0.21875), ("interleaved", 2, 0.109375)]:
        est = estimate(model, Layout(pp=8, dp=1, microbatch=1, schedule=sched, chunks=v), setup, hw)
        tp_ = est.time_parts
        assert tp_["bubble"] / (tp_["compute"] + tp_["tp_comm"]) == pytest.approx(frac)


def test_megatron_training_days_gpt3() -> None:
    days = flops.training_days(300e9, 175e9, 1024, 140e12)
    assert days == pytest.approx(34, abs=0.5)


def test_collective_times() -> None:
    assert cost.allreduce_time(1e9, 1, 1e9, 1e-5) == 0.0
    assert cost.allreduce_time(1e9, 2, 1e9, 0.0) == pytest.approx(1.0)
    assert cost.allreduce_time(1e9, 8, 1e9, 0.0) == pytest.approx(1.75)
    assert cost.gather_time(1e9, 8, 1e9, 0.0) == pytest.approx(0.875)


def test_zero3_moves_one_and_a_half_times_ddp() -> None:
    hw = GPU_SPECS["a100-80gb"].with_(overlap=False, intra_latency=0.0, inter_latency=0.0)
    model, setup = _gpt(), Setup(global_batch=64)
    ddp = estimate(model, Layout(dp=64, microbatch=1), setup, hw).time_parts["dp_comm"]
    z3 = estimate(model, Layout(dp=64, zero=3, microbatch=1), setup, hw).time_parts["zero3_comm"]
    assert z3 / ddp == pytest.approx(1.5)


def test_inter_node_links_are_slower() -> None:
    hw = GPU_SPECS["h100"].with_(overlap=False)
    model = _gpt()
    intra = estimate(model, Layout(dp=8, microbatch=1), Setup(8), hw).time_parts["dp_comm"]
    inter = estimate(model, Layout(dp=16, microbatch=1), Setup(16), hw).time_parts["dp_comm"]
    assert inter > 5 * intra


def test_parameter_server_scales_with_servers() -> None:
    model, setup = _gpt(), Setup(global_batch=16)
    one = estimate(model, Layout(dp=16, microbatch=1, sync="ps", ps_servers=1), setup, CPU_DEFAULT)
    four = estimate(model, Layout(dp=16, microbatch=1, sync="ps", ps_servers=4), setup, CPU_DEFAULT)
    assert four.time_parts["ps_comm"] < one.time_parts["ps_comm"] / 3
    # ps.overlap: all but the last server's share hides behind backward; one server has nothing to hide
    for n in (1, 4):
        lay = Layout(dp=16, microbatch=1, sync="ps", ps_servers=n)
        on, off = (estimate(model, lay, dataclasses.replace(setup, ps_overlap=o), CPU_DEFAULT) for o in (True, False))
        assert on.time_parts["ps_comm"] == off.time_parts["ps_comm"] if n == 1 else (
            on.time_parts["ps_comm"] < off.time_parts["ps_comm"])


def test_probed_layer_factors_replace_modelled_tp_and_zero3_cost() -> None:
    """With the 2-rank probe's factors a tp2 block costs factor x the unsplit block, and an
    FSDP2 unit adds (factor - 1) blocks; without them the modelled terms apply."""
    model = ModelSpec("tiny", "gpt", 4, 128, 4, 256, 128)
    setup = Setup(global_batch=16, precision="fp32")
    hw = CPU_DEFAULT.with_(tp2_layer_factor=1.25, fsdp2_layer_factor=1.5, alloc_bw=0.0)
    peak = hw.peak("fp32") * hw.efficiency
    per_layer_tok = (model.flops_per_token("none") - 6.0 * model.vocab * model.d_model) / model.total_layers
    t_layer = per_layer_tok * 16 * 128 / peak + hw.layer_overhead_s
    head = 6.0 * model.vocab * model.d_model * 16 * 128 / (2 * peak)
    tp = estimate(model, Layout(tp=2, microbatch=16, sp=False), setup, hw)
    assert tp.time_parts["compute"] == pytest.approx(4 * t_layer * 1.25 + head)
    assert tp.time_parts["tp_comm"] == 0.0
    z3 = estimate(model, Layout(dp=2, zero=3, microbatch=16), Setup(global_batch=32, precision="fp32"), hw)
    assert z3.time_parts["zero3_comm"] == pytest.approx(5 * t_layer * 0.5)
    plain = CPU_DEFAULT.with_(alloc_bw=0.0)
    assert estimate(model, Layout(tp=2, microbatch=16, sp=False), setup, plain).time_parts["tp_comm"] > 0
    tp4 = estimate(model, Layout(tp=4, microbatch=16, sp=False), setup, hw)  # measured for 2 ranks only
    assert tp4.time_parts["tp_comm"] > 0


@pytest.mark.slow
def test_layer_probe_runs_on_two_ranks() -> None:
    from paratrain.planner.probe import probe_layers

    r = probe_layers(16, 2, 32, micro=2, seq=8, repeats=2)
    assert r["plain_s"] > 0 and r["tp_ratio"] > 0 and r["fsdp_ratio"] > 0


# ---- FLOPs and parameters -------------------------------------------------------------------------------


def test_gpt2_small_parameter_formula() -> None:
    p = flops.gpt_params(l=12, h=768, V=50257, s=1024)
    assert abs(p - 124.44e6) / 124.44e6 < 0.01  # GPT-2 small: 124M (124,439,808 with tied head)
    assert PRESETS["gpt2-small"][0].params == pytest.approx(p + 2 * 768)  # + final LayerNorm


def test_flops_formulas_agree() -> None:
    B, s, l, h, V = 8, 2048, 96, 12288, 50257  # noqa: E741
    spec = ModelSpec("g", "gpt", l, h, 96, V, s)
    for rc in ("none", "full"):
        assert spec.flops_per_token(rc) * B * s == pytest.approx(flops.megatron_flops(B, s, l, h, V, rc))
    full, none = flops.megatron_flops(B, s, l, h, V, "full"), flops.megatron_flops(B, s, l, h, V)
    layer_share = 72 * B * s * l * h * h * (1 + s / (6 * h))
    assert full - none == pytest.approx(layer_share / 3)  # recompute = one more forward of the layers
    assert flops.megatron_flops(B, s, l, h, V, "selective") - none == pytest.approx(4 * B * s * s * h * l)
    assert flops.mfu(none, 1.0, 1, none) == 1.0
    assert flops.hfu(full, 1.0, 1, full) == 1.0


@pytest.mark.parametrize("arch", ["gpt", "seq2seq", "bert"])
def test_matches_paratrain_models(arch: str) -> None:
    import torch

    from paratrain.models import build_model, count_params
    from paratrain.models import flops_per_token as model_fpt

    torch.set_num_threads(1)
    mc = ModelConfig(arch=arch, n_layer=2, n_head=2, d_model=16, d_ff=40, max_seq_len=24, n_dec_layer=3)
    cfg = Config.default()
    cfg.model, cfg.data.seq_len = mc, 20
    spec = flops.spec_from_config(cfg)
    model = build_model(mc, flops.BYTE_VOCAB, 0)
    assert spec.params == count_params(model)
    expect = model_fpt(mc, flops.BYTE_VOCAB, 20, arch)
    assert flops.model_flops_per_token(arch, 2, 16, 40, 0, 20, n_dec_layer=3) == expect


# ---- search and CLI ---------------------------------------------------------------------------------------


def test_search_ranks_fitting_layouts_first() -> None:
    model, B = PRESETS["gpt3-175b"]
    res = search.search(model, 1024, Setup(B), GPU_SPECS["a100-80gb"])
    assert res.best is not None and res.best.fits
    assert res.best.layout.world == 1024
    assert res.best.layout.tp <= 8
    fitting = [c.step_time_s for c in res.candidates if c.fits]
    assert fitting == sorted(fitting, key=lambda t: float(f"{t:.3g}"))
    assert not any(c.layout.tp == 1 and c.layout.pp == 1 and c.layout.zero == 0 and c.fits
                   for c in res.candidates)  # 175B does not fit replicated
    assert "wins" in search.explain(res)
    assert "TFLOP/s" in search.format_table(res)


def test_fixed_layout_restricts_candidates() -> None:
    model, B = PRESETS["gpt2-small"]
    res = search.search(model, 8, Setup(B), GPU_SPECS["h100"], {"tp": 2, "pp": 2, "zero": 1, "microbatch": 4,
                                                                 "recompute": "full"})
    assert res.candidates and all(
        (c.layout.tp, c.layout.pp, c.layout.dp, c.layout.zero, c.layout.microbatch, c.layout.recompute)
        == (2, 2, 2, 1, 4, "full") for c in res.candidates)


def test_cli_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--preset", "gpt3-175b", "--gpus", "1024", "--gpu-type", "a100-80gb",
                     "--global-batch", "1536", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"tp", "pp", "dp", "zero", "microbatch", "recompute", "memory_gb_per_gpu", "step_time_s",
            "tflops_per_gpu", "mfu", "fits"}
    assert keys <= set(out["best"]) and out["candidates"]
    assert all(keys <= set(c) for c in out["candidates"])
    b = out["best"]
    assert b["tp"] * b["pp"] * b["dp"] == 1024 and b["fits"] and 0 < b["mfu"] < 1


def test_cli_explicit_model_and_fixed_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--layers", "24", "--hidden", "2048", "--heads", "16", "--seq", "2048",
                     "--vocab", "50257", "--gpus", "16", "--gpu-type", "h100", "--tp", "2", "--pp", "2",
                     "--dp", "4", "--zero", "1", "--microbatch", "2", "--recompute", "none"]) == 0
    out = capsys.readouterr().out
    assert "wins" in out and "evaluated" in out


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "gpt9"], "unknown preset"),
    (["--preset", "gpt2-small", "--gpu-type", "tpu"], "unknown --gpu-type"),
    (["--preset", "gpt2-small", "-c", "configs/gpt-tiny.toml"], "not both"),
    (["--layers", "2"], "needs all of"),
    (["--preset", "gpt2-small", "--gpus", "8", "--tp", "2", "--pp", "2", "--dp", "4"], "--gpus"),
    (["--preset", "gpt2-small", "--gpus", "0"], "at least 1"),
    (["--preset", "gpt2-small", "--measure"], "--measure"),
    ([], "say which model"),
])
def test_cli_user_errors(argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_cpu_plan_from_config_uses_config_batch() -> None:
    cfg = Config.default()
    spec = flops.spec_from_config(cfg)
    assert spec.params == 859_520 and spec.vocab == 261
    est = estimate(spec, Layout(dp=2, microbatch=16), Setup(32, "fp32"), CPU_DEFAULT)
    assert est.fits and est.memory_parts["reserved"] == CPU_DEFAULT.reserved_bytes
    assert est.time_parts["dp_comm"] > 0 and est.step_time_s > est.time_parts["compute"]


# ---- self-check plumbing (no runs) ---------------------------------------------------------------------


def test_measure_layouts_and_configs() -> None:
    from paratrain.config import ConfigError
    from paratrain.planner import measure

    assert measure.parse_layout("dp2").nproc == 2
    assert (measure.parse_layout("tp2").tp, measure.parse_layout("pp2").pp) == (2, 2)
    assert measure.parse_layout("zero3").zero == 3 and measure.parse_layout("ps").sync == "ps"
    with pytest.raises(ConfigError):
        measure.parse_layout("xp2")
    base = Config.default()
    cfg, why = measure.layout_config(base, measure.parse_layout("pp2"), 10)
    assert cfg is not None and not why
    assert cfg.parallel.pp == 2 and not cfg.model.tie_embeddings and cfg.train.steps == 10
    assert cfg.checkpoint.keep == 0 and cfg.train.warmup_steps <= 10
    step, per_rank = measure.predict(cfg, flops.spec_from_config(cfg), CPU_DEFAULT)
    assert step > 0 and len(per_rank) == 2 and per_rank[0] != per_rank[1]  # two pipeline stages
    bad = Config.default()
    bad.model.n_head, bad.model.d_model = 3, 129
    _, why = measure.layout_config(bad, measure.parse_layout("tp2"), 10)
    assert why  # reported as "not available: ...", never estimated instead


def test_onebit_adam_sends_a_bit_per_parameter() -> None:
    hw = GPU_SPECS["h100"].with_(overlap=False, intra_latency=0.0, inter_latency=0.0)
    model = _gpt()
    lay = Layout(dp=8, microbatch=1)
    adam = estimate(model, lay, Setup(8), hw).time_parts["dp_comm"]
    onebit = estimate(model, lay, Setup(8, optimizer="onebit_adam"), hw).time_parts["dp_comm"]
    # ring all-reduce 2 (n-1)/n * 2 bytes (bf16 grads) vs all-gather (n-1) * 1/8 byte
    assert adam / onebit == pytest.approx((2 * 7 / 8 * 2) / (7 / 8), rel=1e-6)
    # and the search keeps to the layouts it runs on
    from paratrain.planner.search import layouts

    lays = list(layouts(model, 8, Setup(8, optimizer="onebit_adam"), hw))
    assert lays and all((x.tp, x.pp, x.zero, x.sync) == (1, 1, 0, "allreduce") for x in lays)


@pytest.mark.parametrize("arch", ["gpt", "seq2seq", "bert"])
def test_codec_bytes_match_the_models_tensors(arch: str) -> None:
    """The planner's compressed-exchange bytes, from the shape alone, against the hooks' own formulas
    over the real model's tensors (tests/test_compression_ddp.py checks those against the wire)."""
    import dataclasses
    import math

    from paratrain.grad_compression.codecs import matrix_shape, powersgd_applies
    from paratrain.models import build_model
    from paratrain.planner import codecs

    mc = ModelConfig(arch=arch, n_layer=2, n_head=2, d_model=32, d_ff=80, max_seq_len=24)
    cfg = Config.default()
    cfg.model, cfg.data.seq_len = mc, 20
    spec = flops.spec_from_config(cfg)
    params = [p for p in build_model(mc, flops.BYTE_VOCAB, 0).parameters()]
    assert sorted(tuple(p.shape) for p in params if p.dim() == 2) == sorted(spec.matrices())
    comp = dataclasses.replace(cfg.compression, gradient="powersgd", powersgd_rank=4)
    factors = sum(min(4, *matrix_shape(tuple(p.shape))) * sum(matrix_shape(tuple(p.shape)))
                  for p in params if powersgd_applies(tuple(p.shape), 4))
    vectors = sum(p.numel() for p in params if not powersgd_applies(tuple(p.shape), 4))
    assert codecs.wire_bytes(spec, comp, 2) == 4 * (factors + vectors)  # shared exchange, one bucket
    int8v = dataclasses.replace(comp, powersgd_vectors="int8")
    assert codecs.wire_bytes(spec, int8v, 2) == 4 * factors + vectors + 4 * math.ceil(vectors / 1024)
    assert codecs.wire_bytes(spec, int8v, 4) == 1.5 * 4 * factors + 3 * (vectors + 4 * math.ceil(vectors / 1024))
    n = sum(p.numel() for p in params)
    topk = dataclasses.replace(comp, gradient="topk")
    exact = 8 * sum(math.ceil(0.01 * p.numel()) for p in params)  # the hooks round up per tensor
    assert 0.9 * exact < codecs.wire_bytes(spec, topk, 2) <= exact
    assert codecs.wire_bytes(spec, dataclasses.replace(comp, gradient="int8"), 3) == 2 * (n + 4 * math.ceil(n / 1024))
    assert codecs.wire_bytes(spec, dataclasses.replace(comp, gradient="none"), 2) == 4 * n


def test_compressed_exchange_in_the_step_time_and_search() -> None:
    import dataclasses

    from paratrain.planner.search import layouts

    hw = GPU_SPECS["h100"].with_(overlap=False, intra_latency=0.0, inter_latency=0.0)
    model, lay = _gpt(), Layout(dp=8, microbatch=1)
    comp = dataclasses.replace(Config.default().compression, gradient="int8")
    dense = estimate(model, lay, Setup(8, precision="fp32"), hw).time_parts["dp_comm"]
    int8 = estimate(model, lay, Setup(8, precision="fp32", compression=comp), hw).time_parts["dp_comm"]
    # fp32 ring all-reduce 2 (n-1)/n * 4 bytes vs int8 all-gather (n-1) * (1 + 4/1024) bytes
    assert dense / int8 == pytest.approx((2 * 7 / 8 * 4) / (7 * (1 + 4 / 1024)), rel=1e-3)
    lays = list(layouts(model, 8, Setup(8, compression=comp), hw))
    assert lays and all(x.tp == x.pp == 1 and x.zero <= 1 for x in lays)
