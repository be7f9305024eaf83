"""Gradient codecs: round trips, error feedback, byte counts, the loss safeguard."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paratrain.config import Config
from paratrain.grad_compression import (
    CODECS,
    GradientCompressor,
    LossSafeguard,
    Payload,
    decode,
    get_codec,
    nbytes,
)
from paratrain.grad_compression.codecs import powersgd_applies, topk_count, warmup_ratio, warmup_ratios

SHAPES = [(1000,), (64, 48), (8, 4, 5), (1,)]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_bf16_within_precision(shape):
    x = _randn(*shape)
    for name, eps in (("fp16", 2**-11), ("bf16", 2**-8)):
        y = decode(get_codec(name).encode(x))
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.all((y - x).abs() <= eps * x.abs() + 1e-7), name


def test_fp16_saturates_instead_of_inf():
    y = decode(get_codec("fp16").encode(torch.tensor([1e6, -1e6, 1.0])))
    assert torch.isfinite(y).all() and y[0] == 65504.0 and y[1] == -65504.0


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1024])
def test_int8_error_bound(rounding, chunk):
    x = _randn(3001) * torch.linspace(0.01, 10, 3001)  # chunks of very different scales
    codec = get_codec("int8", chunk=chunk, rounding=rounding)
    st = codec.new_state(error_feedback=False, seed=3)
    y = decode(codec.encode(x, st))
    n_chunks = math.ceil(x.numel() / chunk)
    pad = torch.nn.functional.pad(x.abs(), (0, n_chunks * chunk - x.numel()))
    chunk_max = pad.view(n_chunks, chunk).amax(1).repeat_interleave(chunk)[: x.numel()]
    bound = chunk_max / 127 * (0.5 if rounding == "nearest" else 1.0)
    assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + 1e-8)
    rel = float((y - x).norm() / x.norm())
    assert rel < (0.015 if rounding == "nearest" else 0.03), rel


def test_int8_stochastic_is_unbiased():
    x = torch.full((20000,), 0.3049)
    x[0] = 1.27  # chunk scale 0.01: 0.3049 lies between the levels 0.30 and 0.31
    codec = get_codec("int8", chunk=20000, rounding="stochastic")
    y = decode(codec.encode(x, codec.new_state(error_feedback=False, seed=1)))
    levels = torch.unique(y[1:])
    assert levels.numel() == 2 and torch.allclose(levels, torch.tensor([0.30, 0.31]), atol=1e-6)
    assert abs(float(y[1:].mean()) - 0.3049) < 2e-4


def test_int8_zero_chunk():
    x = torch.zeros(100)
    x[50:] = 1.0
    y = decode(get_codec("int8", chunk=50).encode(x))
    assert torch.equal(y, x)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_the_k_largest(ratio):
    x = torch.randperm(5000).float().sub(2500) / 7  # distinct magnitudes except sign pairs
    x = x + 1e-3 * torch.arange(5000) / 5000  # break the +/- ties
    k = topk_count(x.numel(), ratio)
    p = get_codec("topk", ratio=ratio).encode(x)
    values, idx = p.tensors
    assert values.numel() == k and idx.dtype == torch.int32 and values.dtype == torch.float32
    expected = set(x.abs().argsort(descending=True)[:k].tolist())
    assert set(idx.tolist()) == expected
    y = decode(p)
    kept = torch.zeros(5000, dtype=torch.bool)
    kept[idx.long()] = True
    assert torch.equal(y[kept], x[kept]) and not y[~kept].any()


def test_topk_segments_keep_k_per_segment():
    x = _randn(1000)
    x[:100] *= 100  # the first segment dominates: a global top-k would take only from it
    p = get_codec("topk", ratio=0.05).encode(x, segments=[100, 600, 300])
    idx = p.tensors[1].long()
    assert [int(((idx >= a) & (idx < b)).sum()) for a, b in ((0, 100), (100, 700), (700, 1000))] == [5, 30, 15]
    seg = x[100:700].abs()
    assert set((idx[(idx >= 100) & (idx < 700)] - 100).tolist()) == set(seg.argsort(descending=True)[:30].tolist())
    with pytest.raises(ValueError):
        get_codec("topk").encode(x, segments=[10, 20])


def test_topk_count():
    assert topk_count(100, 0.01) == 1 and topk_count(10, 0.01) == 1
    assert topk_count(1000, 0.01) == 10 and topk_count(1001, 0.01) == 11 and topk_count(5, 1.0) == 5


@pytest.mark.parametrize("shape,rank", [((64, 48), 2), ((40, 30), 4), ((16, 3, 10), 1), ((100, 100), 3)])
def test_powersgd_exact_on_low_rank(shape, rank):
    n, m = shape[0], math.prod(shape[1:])
    a, b = _randn(n, rank, seed=1), _randn(rank, m, seed=2)
    x = (a @ b).reshape(shape)
    codec = get_codec("powersgd", rank=rank)
    p = codec.encode(x, codec.new_state(error_feedback=False))
    assert p.info["raw"] == 0 and p.nbytes == 4 * rank * (n + m)
    assert float((decode(p) - x).abs().max()) <= 1e-5 * max(1.0, float(x.abs().max()))


def test_powersgd_warm_start_converges_and_raw_fallback():
    codec = get_codec("powersgd", rank=2)
    x = _randn(80, 60)
    st = codec.new_state(error_feedback=False)
    errs = [float((decode(codec.encode(x, st)) - x).norm()) for _ in range(15)]
    best = torch.linalg.svdvals(x)[2:].norm()  # optimal rank-2 error
    assert errs[-1] <= errs[0] + 1e-4 and errs[-1] < 1.02 * float(best)
    for shape in [(50,), (3, 3), (2, 100)]:
        assert not powersgd_applies(shape, 2)
        v = _randn(*shape)
        p = codec.encode(v)
        assert p.info["raw"] == 1 and torch.equal(decode(p), v)
    # k power iterations in one call == k single-iteration calls from the same warm start
    many, st = get_codec("powersgd", rank=2, iterations=15), codec.new_state(error_feedback=False)
    for _ in range(15):
        single = codec.encode(x, st)
    torch.testing.assert_close(decode(many.encode(x, many.new_state(False))), decode(single), atol=1e-5, rtol=1e-4)
    # powersgd_vectors = "int8": what cannot be factored goes through the int8 codec, error feedback kept
    codec = get_codec("powersgd", rank=2, chunk=16, vectors="int8")
    st = codec.new_state(error_feedback=True)
    total_in, total_out = torch.zeros(50), torch.zeros(50)
    for step in range(5):
        v = _randn(50, seed=10 + step)
        p = codec.encode(v, st)
        assert p.codec == "int8" and p.nbytes == 50 + 4 * 4
        total_in, total_out = total_in + v, total_out + decode(p)
    assert torch.allclose(total_out + st.residual, total_in, atol=1e-5)
    assert codec.encode(x, codec.new_state(False)).codec == "powersgd"  # matrices unchanged
    with pytest.raises(ValueError, match="vectors"):
        get_codec("powersgd", vectors="fp16")


@pytest.mark.parametrize("name", CODECS)
def test_error_feedback_conserves_the_sum(name):
    codec = get_codec(name, ratio=0.05, rank=1, chunk=16, rounding="stochastic")
    st = codec.new_state(error_feedback=True, seed=5)
    total_in = torch.zeros(30, 20, dtype=torch.float64)
    total_out = torch.zeros_like(total_in)
    for step in range(12):
        g = _randn(30, 20, seed=100 + step) * (1 + step)
        total_in += g.double()
        total_out += decode(codec.encode(g, st)).double()
    residual = st.residual.double() if st.residual is not None else 0
    assert torch.allclose(total_out + residual, total_in, atol=1e-4, rtol=1e-5)


def test_error_feedback_helps_topk():
    """Sum of decoded top-k with feedback tracks the true sum far better than without."""
    codec = get_codec("topk", ratio=0.05)
    on, off = codec.new_state(True), codec.new_state(False)
    truth, s_on, s_off = torch.zeros(2000), torch.zeros(2000), torch.zeros(2000)
    for step in range(50):
        g = _randn(2000, seed=step) + 0.2  # a small consistent bias top-k alone never sends
        truth += g
        s_on += decode(codec.encode(g, on))
        s_off += decode(codec.encode(g, off))
    assert (s_on - truth).norm() < 0.5 * (s_off - truth).norm()


def _wire_bytes(t: torch.Tensor) -> int:
    """Bytes a transport puts on the wire for one tensor frame (raw memory, as ZeroMQ sends it)."""
    return len(memoryview(t.contiguous().view(torch.uint8).numpy()).tobytes())


@pytest.mark.parametrize("name", CODECS)
def test_payload_bytes_and_meta_round_trip(name):
    x = _randn(96, 70)
    codec = get_codec(name, ratio=0.01, rank=2, chunk=256)
    p = codec.encode(x, codec.new_state(True, seed=1))
    wire = sum(_wire_bytes(t) for t in p.tensors)
    assert nbytes(p) == p.nbytes == codec.nbytes(p) == wire
    expected = {"none": 4 * 6720, "fp16": 2 * 6720, "bf16": 2 * 6720, "int8": 6720 + 4 * 27,
                "topk": 68 * 8, "powersgd": 4 * 2 * (96 + 70)}[name]
    assert p.nbytes == expected
    meta = json.loads(json.dumps(p.meta()))
    frames = [bytes(t.contiguous().view(torch.uint8).numpy()) for t in p.tensors]
    tensors = [torch.frombuffer(bytearray(f), dtype=t.dtype).reshape(t.shape)
               for f, t in zip(frames, p.tensors, strict=True)]
    q = Payload.from_meta(meta, tensors)
    assert torch.equal(decode(q), decode(p))


def test_payload_from_meta_rejects_garbage():
    with pytest.raises(ValueError):
        Payload.from_meta({"codec": "zip", "shape": [1], "dtype": "float32"}, [])
    with pytest.raises(ValueError):
        Payload.from_meta({"codec": "none", "shape": [1], "dtype": "nonsense"}, [])


def test_safeguard_falls_back_and_recovers():
    g = LossSafeguard(factor=2.0, window=5, steps=3)
    for _ in range(5):
        assert not g.observe(1.0) and g.compressing
    assert not g.observe(1.9)
    assert g.observe(5.0) and not g.compressing and g.triggers == 1 and "running mean" in g.last_event
    for _ in range(3):
        assert not g.compressing
        g.observe(1.0)
    assert g.compressing and g.uncompressed_steps == 3
    assert g.observe(float("nan")) and g.triggers == 2
    assert not LossSafeguard(steps=0).observe(float("nan"))


def test_compressor_fallback_sends_plain_and_drops_residual():
    cfg = Config.load(overrides=["--compression.gradient=topk", "--compression.topk_ratio=0.1",
                                 "--compression.fallback_window=2", "--compression.fallback_steps=1"])
    comp = GradientCompressor.from_config(cfg.compression, seed=1)
    x = _randn(100)
    p = comp.encode("w", x)
    assert p.codec == "topk" and comp.state("w").residual is not None
    comp.observe_loss(1.0), comp.observe_loss(1.0)
    assert comp.observe_loss(3.0) and not comp.active
    assert comp.state("w").residual is None  # dropped on fallback
    p2 = comp.encode("w", x)
    assert p2.codec == "none" and torch.equal(decode(p2), x) and comp.state("w").residual is None
    comp.observe_loss(1.0)
    assert comp.active and comp.summary()["compression_fallbacks"] == 1


def test_decode_rejects_malformed_payloads():
    x = _randn(64, 48)
    good = {name: get_codec(name, ratio=0.1, chunk=100).encode(x) for name in CODECS}
    for p in good.values():
        decode(p)
    bad = [
        Payload("int8", (64, 48), torch.float32, good["int8"].tensors, {"chunk": 2**40}),
        Payload("int8", (64, 48), torch.float32, good["int8"].tensors, {}),
        Payload("topk", (64, 48), torch.float32, [good["topk"].tensors[0], torch.full((308,), 10**6).int()]),
        Payload("topk", (64, 48), torch.float32, [good["topk"].tensors[0], good["topk"].tensors[1].long()]),
        Payload("powersgd", (64, 48), torch.float32, good["powersgd"].tensors[::-1], {"raw": 0}),
        Payload("fp16", (64, 48), torch.float32, [torch.zeros(64 * 48)]),
        Payload("none", (64, 49), torch.float32, good["none"].tensors),
        Payload("none", (64, 48), torch.float32, []),
    ]
    for p in bad:
        with pytest.raises(ValueError):
            decode(p)


def test_config_rejects_compression_with_sharded_or_model_parallel():
    from paratrain.config import ConfigError

    for extra in ("--parallel.zero=2", "--parallel.tp=2"):
        with pytest.raises(ConfigError, match="compression.gradient"):
            Config.load(overrides=["--compression.gradient=int8", "--parallel.nproc=4", extra])
    Config.load(overrides=["--compression.gradient=int8", "--parallel.zero=1"])


# ---- warm-up (Deep Gradient Compression's exponentially increasing sparsity) ------------------------
def test_warmup_ratios_ramp_exponentially_to_the_target():
    assert warmup_ratios(0.01) == [0.25, 0.0625, 0.015625]
    assert warmup_ratios(0.001) == [0.25, 0.0625, 0.015625, 0.00390625]
    assert warmup_ratios(0.25) == [] and warmup_ratios(0.5) == []
    # 18 steps over 3 stages: 6 each, then the target for good
    got = [warmup_ratio(s, 18, 0.01) for s in range(20)]
    assert got == [0.25] * 6 + [0.0625] * 6 + [0.015625] * 6 + [0.01] * 2
    assert warmup_ratio(0, 0, 0.01) == 0.01 and warmup_ratio(0, 2, 0.01) == 0.25  # fewer steps than stages
    assert warmup_ratio(1, 2, 0.01) == 0.0625


def _compressor(*extra):
    cfg = Config.load(overrides=[*extra, "--compression.fallback_steps=0"])
    return GradientCompressor.from_config(cfg.compression, seed=1)


def test_compressor_topk_warmup_sends_fewer_entries_each_stage_and_conserves_the_sum():
    comp = _compressor("--compression.gradient=topk", "--compression.topk_ratio=0.01", "--compression.warmup_steps=6")
    truth, sent, sizes = torch.zeros(4000, dtype=torch.float64), torch.zeros(4000, dtype=torch.float64), []
    for step in range(9):
        g = _randn(4000, seed=step)
        p = comp.encode("w", g)
        assert comp.active and p.codec == "topk"
        sizes.append(p.tensors[0].numel())
        truth += g.double()
        sent += decode(p).double()
        comp.tick()
    assert sizes == [1000] * 2 + [250] * 2 + [63] * 2 + [40] * 3
    assert torch.allclose(sent + comp.state("w").residual.double(), truth, atol=1e-4)
    assert comp.summary()["compression_warmup_steps"] == 6


@pytest.mark.parametrize("name", ["fp16", "int8", "powersgd"])
def test_compressor_warmup_of_other_codecs_is_uncompressed(name):
    comp = _compressor(f"--compression.gradient={name}", "--compression.warmup_steps=2")
    x = _randn(32, 40)
    for _ in range(2):
        assert not comp.active
        p = comp.encode("w", x)
        assert p.codec == "none" and torch.equal(decode(p), x)
        comp.observe_loss(1.0)  # counts the step like tick()
    assert comp.active and comp.encode("w", x).codec == name


def test_compressor_without_warmup_is_unchanged():
    comp = _compressor("--compression.gradient=topk", "--compression.topk_ratio=0.25")
    assert comp.warmup_steps == 0 and comp.active and comp.current is comp.codec
    none = _compressor("--compression.gradient=none", "--compression.warmup_steps=5")
    assert none.warmup_steps == 0 and not none.active


def test_config_checks_warmup_steps():
    from paratrain.config import ConfigError

    with pytest.raises(ConfigError, match="compression.warmup_steps = -1 is below its minimum 0"):
        Config.load(overrides=["--compression.warmup_steps=-1"])
    assert Config.load(overrides=["--compression.warmup_steps=30"]).compression.warmup_steps == 30


# ---- DDP bucket rebuild: residuals follow their parameters ------------------------------------------
class _Bucket:
    def __init__(self, params):
        self.params = params

    def parameters(self):
        return self.params


class _HookState:
    def __init__(self, comp):
        self.compressor, self.layouts, self.qs = comp, {}, {}


def test_bucket_rebuild_carries_residuals_per_parameter_and_drops_stale_states():
    from paratrain.grad_compression.hooks import adopt_state, bucket_key

    comp = _compressor("--compression.gradient=topk")
    a, b, c = torch.zeros(3), torch.zeros(2), torch.zeros(4)
    state = _HookState(comp)
    first = [_Bucket([a, b]), _Bucket([c])]  # step 1: DDP's initial buckets
    for bk, res in zip(first, [torch.tensor([1., 2, 3, 4, 5]), torch.tensor([6., 7, 8, 9])], strict=True):
        adopt_state(state, bucket_key(bk), bk)
        comp.state(bucket_key(bk)).residual = res
    rebuilt = [_Bucket([c, a]), _Bucket([b])]  # after the rebuild: other groupings and order
    for bk in rebuilt:
        adopt_state(state, bucket_key(bk), bk)
    assert torch.equal(comp.state(bucket_key(rebuilt[0])).residual, torch.tensor([6., 7, 8, 9, 1, 2, 3]))
    assert torch.equal(comp.state(bucket_key(rebuilt[1])).residual, torch.tensor([4., 5]))
    assert set(comp.states) == set(state.layouts) == {bucket_key(bk) for bk in rebuilt}
    adopt_state(state, bucket_key(rebuilt[0]), rebuilt[0])  # known layout: nothing changes
    assert torch.equal(comp.state(bucket_key(rebuilt[0])).residual, torch.tensor([6., 7, 8, 9, 1, 2, 3]))
