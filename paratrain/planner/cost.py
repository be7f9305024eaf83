"""Step time and memory of one layout: compute, pipeline bubble, TP / PP / DP / ZeRO-3 / PS
communication and the optimizer step, on intra- or inter-node links.

Placement follows Megatron: tensor parallel innermost (inside a node), then pipeline
stages, then data-parallel replicas.  A group whose ranks fit in one node uses the node's
links (NVLink / loopback); otherwise the inter-node bandwidth per device.

Per step (``m = B / (dp b)`` micro-batches of ``b`` sequences, ``p`` stages, ``v`` chunks):

* compute: hardware FLOPs of the fullest stage / (tp * efficiency * peak);
* pipeline bubble: ``(p - 1) / (v m)`` of the pipelined time (1F1B; GPipe the same);
* TP: 4 all-reduces of ``b s h`` activations per layer per micro-batch (6 with full
  recompute); sequence parallelism trades each for an all-gather + reduce-scatter of the
  same volume;
* PP: one activation and one gradient message per micro-batch on the critical path;
* DP: ring all-reduce ``2 (n-1)/n * grad bytes / bw`` overlapped with the last backward
  (all but one bucket) where the device overlaps; ZeRO-1/2 move the same volume, ZeRO-3
  all-gathers parameters in forward and backward: 1.5x; a gradient codec replaces the
  all-reduce by its own exchange (planner/codecs.py; encode/decode compute not modelled);
* parameter server (:func:`ps_exchange_time`): each worker pushes gradients and pulls
  parameters; a round trip costs a fixed per-message time plus per-byte processing (MAC,
  decode, update, copy into the model: half on the worker, half on the servers, where each
  of ``S`` servers handles ``W/S`` of everybody's bytes in turn) plus the wire time;
* optimizer: a memory-bound pass over the parameters this rank updates;
* allocation (CPU ZeRO runs only): large buffers are fresh mmaps that page-fault;
* measured instead of modelled (``plan --measure`` on CPU, planner/probe.py): a 2-way TP
  block and an FSDP2 unit as multiples of the plain block, from two ranks running one
  block of the config's shape (collectives, DTensor dispatch and the ranks' stalls on
  shared cores included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from paratrain.planner import codecs
from paratrain.planner import memory as mem
from paratrain.planner.flops import ModelSpec, hfu, mfu
from paratrain.planner.hardware import HardwareSpec

# Communication hidden behind compute still slows it: NCCL kernels take SMs and memory
# bandwidth.  This fraction of the overlapped time is charged (documented assumption).
OVERLAP_COST = 0.15
# Elements per token per layer read + written by the two LayerNorms and two residual adds
# (forward and backward): replicated on every tensor-parallel rank unless sequence parallel.
REPLICATED_ELEMS = 22


def overlapped(comm: float, window: float, piece: float, overlap: bool) -> float:
    """Exposed time of ``comm`` seconds of communication that may hide behind ``window``
    seconds of compute, except its last ``piece`` (e.g. the final bucket)."""
    if not overlap:
        return comm
    hidden = min(comm - piece, window) if comm > piece else 0.0
    return comm - hidden + OVERLAP_COST * hidden


@dataclass(frozen=True)
class Layout:
    """One way to lay a model out on ``dp * tp * pp`` devices."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    microbatch: int = 1
    recompute: str = "none"  # none | selective | full
    sync: str = "allreduce"  # allreduce | ps
    ps_servers: int = 1
    schedule: str = "1f1b"  # 1f1b | interleaved | gpipe
    chunks: int = 1  # virtual stages per device (interleaved)
    sp: bool = True  # sequence parallelism when tp > 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True)
class Setup:
    """What the model trains with, independent of the layout."""

    global_batch: int  # sequences per optimizer step
    precision: str = "bf16"  # fp32 | bf16 | fp16
    optimizer: str = "adamw"
    flash: bool = True  # fused attention: no s^2 score tensors kept
    bucket_bytes: float = 25e6  # DDP gradient bucket
    ps_mode: str = "sync"  # sync | async | ssp (async/ssp hide pushes behind compute)
    ps_overlap: bool = True  # sync: every server's push but the last leaves during backward (ps.overlap)
    loss_parallel: bool = True  # TP keeps the logits split over the vocabulary
    tp_allreduces: int = 4  # per layer per micro-batch: Megatron's fused QKV; 6 with separate q/k/v modules
    compression: Any = None  # a [compression] section: gradient codec of the DP exchange / PS push

    @property
    def codec(self) -> str:
        return self.compression.gradient if self.compression is not None else "none"

    @property
    def elem_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass
class Estimate:
    """Predicted memory and time of one layout (what the search ranks and the CLI prints)."""

    layout: Layout
    memory_bytes: float  # the fullest rank
    memory_per_stage: list[float]
    memory_parts: dict[str, float]  # of the fullest stage
    step_time_s: float
    time_parts: dict[str, float]
    model_flops: float  # per step, whole job
    hardware_flops: float
    tflops_per_gpu: float
    mfu: float
    hfu: float
    fits: bool
    dominant: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero": lay.zero, "microbatch": lay.microbatch,
                "recompute": lay.recompute, "sync": lay.sync, "schedule": lay.schedule, "chunks": lay.chunks,
                "memory_gb_per_gpu": self.memory_bytes / 1e9, "step_time_s": self.step_time_s,
                "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "hfu": self.hfu, "fits": self.fits,
                "dominant": self.dominant,
                "memory_gb_per_stage": [m / 1e9 for m in self.memory_per_stage],
                "memory_parts_gb": {k: v / 1e9 for k, v in self.memory_parts.items()},
                "time_parts_s": dict(self.time_parts)}


# paratrain's parameter server on one CPU host, fitted by benchmarks/ps_cost.py on CPU time
# (1 worker, 1 server, push + pull of 4 KB .. 16 MB, ps.integrity = "none"): the fixed cost of
# one push + reply round trip (Python header encode/decode, session checks, ZeroMQ hand-offs)
# and the processing cost per byte of push + pull (the finite check, the update, the copy into
# the model, the kernel's loopback copies).
PS_MSG_S = 0.52e-3
PS_BYTE_S = 1 / 0.93e9


def ps_exchange_time(push_bytes: float, pull_bytes: float, workers: int, servers: int, bw: float,
                     latency: float, msg_s: float = PS_MSG_S, byte_s: float = PS_BYTE_S) -> float:
    """One worker's push + pull round trip to ``servers`` servers shared by ``workers`` workers.

    Half of each cost is the worker's, half a server's.  The worker sends and reads one
    message per server in turn; servers work in parallel, each on its ``1/S`` of the keys,
    and handle every worker's share in turn (in sync mode, all of them each round), so a
    server's half of the per-byte work and its NIC carry ``W/S`` of the bytes."""
    total = push_bytes + pull_bytes
    share = workers * total / max(1, servers)
    wire = max(total, share) / bw + 2 * latency
    return msg_s * (1 + max(1, servers)) / 2 + byte_s * (total + share) / 2 + wire


def allreduce_time(nbytes: float, n: int, bw: float, latency: float) -> float:
    """Ring all-reduce: 2 (n-1)/n of the bytes over the slowest link, 2 (n-1) latency hops."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency


def gather_time(nbytes: float, n: int, bw: float, latency: float) -> float:
    """All-gather or reduce-scatter of a ``nbytes`` tensor: half an all-reduce."""
    return allreduce_time(nbytes, n, bw, latency) / 2


def link(group_span: int, hw: HardwareSpec, p2p: bool = False) -> tuple[float, float]:
    """(bandwidth, latency) of a group spanning ``group_span`` consecutive devices."""
    if group_span <= hw.devices_per_node:
        return (hw.p2p_bw or hw.intra_bw) if p2p else hw.intra_bw, hw.intra_latency
    return hw.inter_bw, hw.inter_latency


def stage_params(model: ModelSpec, pp: int) -> list[float]:
    """Parameters held by each pipeline stage (layers split as evenly as possible; the
    embedding on the first stage, final norm/head on the last, a tied head copy there too)."""
    n = model.total_layers
    base, extra = divmod(n, pp)
    counts = [base + (1 if i < extra else 0) for i in range(pp)]
    out: list[float] = []
    idx = 0
    for i, c in enumerate(counts):
        p = 0.0
        for j in range(idx, idx + c):
            p += model.layer_params(decoder=j >= model.n_layer)
        idx += c
        if i == 0:
            p += model.embedding_params()
        if i == pp - 1:
            p += model.head_params()
            if model.tied and pp > 1:
                p += model.vocab * model.d_model
        out.append(p)
    return out


def _layer_counts(model: ModelSpec, pp: int) -> list[int]:
    base, extra = divmod(model.total_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def estimate(model: ModelSpec, lay: Layout, setup: Setup, hw: HardwareSpec) -> Estimate:
    """Predict memory per rank and time per optimizer step of ``lay``."""
    notes: list[str] = []
    B, s, h = setup.global_batch, model.seq, model.d_model
    b, t, p, d = lay.microbatch, lay.tp, lay.pp, lay.dp
    m = max(1, B // (d * b))
    e = setup.elem_bytes
    mixed = setup.precision != "fp32"
    sp = lay.sp and t > 1
    v = lay.chunks if lay.schedule == "interleaved" else 1

    # ---- memory -------------------------------------------------------------------------------
    k = mem.optimizer_state_bytes(setup.optimizer, setup.precision)
    per_stage_params = [x / t for x in stage_params(model, p)]
    act_layer = model.activation_bytes_per_layer(s, b, t, sp, lay.recompute, e, setup.flash)
    out_act = mem.embedding_activation_bytes(s, b, h, model.vocab, t if setup.loss_parallel else 1, e)
    counts = _layer_counts(model, p)
    memory_per_stage: list[float] = []
    parts_per_stage: list[dict[str, float]] = []
    for i, psi in enumerate(per_stage_params):
        states = mem.zero_model_states(psi, d, lay.zero, k, e, e)
        if lay.sync == "ps":
            states = 2 * 4 * psi  # workers keep fp32 params + grads; servers hold the optimizer
        inflight = mem.pipeline_inflight(p - i, m, lay.schedule, v) if p > 1 else 1.0
        acts = inflight * counts[i] * act_layer
        # backward working set: the gradients of one layer's activations (same size as them),
        # plus, under full recompute, that layer's recomputed activations
        full_layer = model.activation_bytes_per_layer(s, b, t, sp, "none", e, setup.flash)
        acts += full_layer * (2 if lay.recompute == "full" else 1)
        head = out_act if i == p - 1 else 0.0
        temp = 0.0
        if lay.zero == 3 and d > 1:  # gathered params of the current and the prefetched layer
            temp = 2 * model.layer_params() / t * e
        parts = {"model_states": states, "activations": acts, "output_layer": head, "temporary": temp,
                 "reserved": hw.reserved_bytes}
        parts_per_stage.append(parts)
        memory_per_stage.append(sum(parts.values()))
    worst = max(range(p), key=lambda i: memory_per_stage[i])

    # ---- compute ------------------------------------------------------------------------------
    peak = hw.peak(setup.precision) * hw.efficiency
    layer_flops_tok = model.flops_per_token(lay.recompute) - 6.0 * model.vocab * h  # all layers
    per_layer_tok = layer_flops_tok / model.total_layers
    head_tok = 6.0 * model.vocab * h
    stage_flops_tok = [c * per_layer_tok + (head_tok if i == p - 1 else 0.0) for i, c in enumerate(counts)]
    t_mb_compute = max(stage_flops_tok) * b * s / (t * peak) + max(counts) * hw.layer_overhead_s
    # a block's forward + backward on one rank, unsplit (what the 2-rank probe factors scale)
    t_layer = per_layer_tok * b * s / peak + hw.layer_overhead_s
    probed_tp = t == 2 and hw.tp2_layer_factor > 0
    if probed_tp:
        # measured on 2 ranks (planner/probe.py): the TP block with its all-reduces, DTensor
        # dispatch and the ranks' stalls; the head stays a modelled 1/t share
        t_mb_compute = max(counts) * t_layer * hw.tp2_layer_factor + (
            max(stage_flops_tok) - max(counts) * per_layer_tok) * b * s / (t * peak)
    elif t > 1:
        # DTensor dispatch per TP block, + one for the vocab-parallel embedding / head (measured on CPU; 0 on GPUs)
        t_mb_compute += (max(counts) + 1) * hw.tp_layer_s
    if t > 1 and not sp and not probed_tp:
        # without sequence parallelism every TP rank repeats the LayerNorms and residual adds
        # (memory-bound, ~22 h elements per token per layer forward + backward), which the
        # division by t above wrongly split
        t_mb_compute += (1 - 1 / t) * max(counts) * b * s * REPLICATED_ELEMS * h * e / hw.mem_bw

    # TP: all-reduces of b s h activations per layer per micro-batch
    tp_bw, tp_lat = link(t, hw)
    n_ar = setup.tp_allreduces + (2 if lay.recompute == "full" else 0)
    t_mb_tp = max(counts) * n_ar * allreduce_time(b * s * h * e, t, tp_bw, tp_lat) if t > 1 and not probed_tp else 0.0
    t_mb = t_mb_compute + t_mb_tp
    compute = m * t_mb_compute
    tp_comm = m * t_mb_tp
    bubble = (p - 1) / v * t_mb if p > 1 else 0.0

    # PP: activation forward, gradient backward, per micro-batch on the critical path
    pp_comm = 0.0
    if p > 1:
        pp_bw, pp_lat = link(t * p, hw, p2p=True)
        msg = b * s * h * e / (t if sp else 1)
        pp_comm = 2 * (m + p - 1) * (msg / pp_bw + pp_lat)

    # DP / ZeRO / PS
    psi = per_stage_params[worst]
    dp_bw, dp_lat = link(t * p * d, hw)
    grad_bytes = psi * e
    dp_comm = zero3_comm = ps_comm = 0.0
    window = t_mb_compute * 2 / 3  # backward of the last micro-batch
    if lay.sync == "ps":
        workers, servers = lay.world, max(1, lay.ps_servers)
        # push (fp32, or the codec's payload) + fp32 pull
        push = codecs.payload_bytes(model, setup.compression) if setup.codec != "none" else 4 * psi
        # ZeroMQ over TCP: inside a node that is loopback (never NVLink), whose copy and latency
        # PS_BYTE_S / PS_MSG_S already contain; across nodes the NIC adds its wire time
        multi_node = lay.world > hw.devices_per_node
        bw, lat = (hw.inter_bw, hw.inter_latency) if multi_node else (math.inf, 0.0)
        t_ps = ps_exchange_time(push, 4 * psi, workers, servers, bw, lat)
        if setup.ps_mode == "sync":  # with ps.overlap only the last server's share waits for backward's end
            ps_comm = overlapped(t_ps, window, t_ps / servers, setup.ps_overlap and servers > 1)
        else:
            ps_comm = overlapped(t_ps, m * t_mb_compute, 0.0, True)
    elif d > 1:
        t_ar = allreduce_time(grad_bytes, d, dp_bw, dp_lat)
        if lay.zero == 3 and d == 2 and t == 1 and hw.fsdp2_layer_factor > 0:
            # measured on 2 ranks (planner/probe.py): an FSDP2 unit's gathers, reduce-scatter,
            # hooks and stalls, as a multiple of its block; the root unit counted as one block
            zero3_comm = m * (max(counts) + 1) * t_layer * max(0.0, hw.fsdp2_layer_factor - 1)
        elif lay.zero == 3:
            intra = t * p * d <= hw.devices_per_node
            g_bw = hw.gather_bw if (hw.gather_bw and intra) else dp_bw
            g_lat = hw.gather_latency if (hw.gather_latency and intra) else dp_lat
            # one all-gather per layer (+ the rest of the model) in forward and in backward,
            # one reduce-scatter per layer; each a ring of d - 1 latency hops
            n_coll = max(counts) + 1
            total = 2 * m * (gather_time(psi * e, d, g_bw, 0.0) + n_coll * (d - 1) * g_lat)
            total += gather_time(grad_bytes, d, g_bw, 0.0) + n_coll * (d - 1) * g_lat
            zero3_comm = overlapped(total, m * t_mb_compute, total / max(1, 2 * max(counts)), hw.overlap)
        elif setup.optimizer == "onebit_adam":
            # 1-bit Adam: an all-gather of one sign bit per parameter inside the optimizer step,
            # after backward (no overlap); its log2(steps) variance all-reduces are left out
            dp_comm = (d - 1) * (psi / 8 / dp_bw + dp_lat)
        else:
            if setup.codec != "none":  # compressed by the DDP hooks (plain DP: tp = pp = 1)
                comp = setup.compression
                t_ar = codecs.wire_bytes(model, comp, d) / dp_bw + codecs.collective_hops(comp, d) * dp_lat
            buckets = max(1, math.ceil(grad_bytes / setup.bucket_bytes))
            dp_comm = overlapped(t_ar, window, t_ar / buckets, hw.overlap)
    # optimizer: fp32 Adam reads p, g, m, v and writes p, m, v (28 B/param); mixed adds the master copy
    if lay.sync == "ps":  # servers apply the update, each to its 1/S of the parameters
        upd = psi / max(1, lay.ps_servers) if setup.ps_mode == "sync" else 0.0
    else:
        upd = psi / d if lay.zero >= 1 else psi
    # (bytes per parameter, extra bytes in mixed precision); 1-bit Adam also reads and writes
    # its residual and local variance
    base, master = {"sgd": (16, 4), "onebit_adam": (44, 8)}.get(setup.optimizer, (28, 8))
    opt_bytes = base + (master if mixed else 0)
    optimizer = upd * opt_bytes / hw.mem_bw + psi * e / hw.mem_bw  # + gradient-norm pass
    if hw.dtensor_param_s and ((lay.zero >= 2 and d > 1) or t > 1):
        # FSDP2 and DTensor TP parameters: every optimizer / clipping op goes through DTensor's
        # Python dispatch (measured per parameter tensor on CPU)
        dec = model.n_dec > 0 and p == 1
        n_dt = max(counts) * model.param_tensors(decoder=dec, tp_only=lay.zero < 2) + 4
        optimizer += n_dt * hw.dtensor_param_s

    # CPU ZeRO runs: paratrain's launcher sets MALLOC_MMAP_THRESHOLD_ so sharded memory is really
    # returned; then every large buffer (activations, their gradients, gathered parameters) is a
    # fresh mmap that page-faults on first touch
    alloc = 0.0
    if hw.alloc_bw and lay.zero > 0:
        full_acts = max(counts) * model.activation_bytes_per_layer(s, b, t, sp, "none", e, setup.flash)
        per_mb = 2 * (full_acts + out_act) + (2 * psi * e if lay.zero == 3 else 0.0)
        alloc = (m * per_mb + psi * e) / hw.alloc_bw

    time_parts = {"compute": compute, "bubble": bubble, "tp_comm": tp_comm, "pp_comm": pp_comm,
                  "dp_comm": dp_comm, "zero3_comm": zero3_comm, "ps_comm": ps_comm, "optimizer": optimizer,
                  "alloc": alloc}
    step = sum(time_parts.values())
    model_flops = model.flops_per_token("none") * B * s
    hw_flops = model.flops_per_token(lay.recompute) * B * s
    n = lay.world
    peak_raw = hw.peak(setup.precision)
    mem_worst = memory_per_stage[worst]
    fits = mem_worst <= hw.memory_bytes
    if not fits:
        notes.append(f"needs {mem_worst / 1e9:.1f} GB per device, has {hw.memory_bytes / 1e9:.1f} GB")
    return Estimate(layout=lay, memory_bytes=mem_worst, memory_per_stage=memory_per_stage,
                    memory_parts=parts_per_stage[worst], step_time_s=step, time_parts=time_parts,
                    model_flops=model_flops, hardware_flops=hw_flops,
                    tflops_per_gpu=model_flops / (step * n) / 1e12, mfu=mfu(model_flops, step, n, peak_raw),
                    hfu=hfu(hw_flops, step, n, peak_raw), fits=fits,
                    dominant=max(time_parts, key=lambda k_: time_parts[k_]), notes=notes)


def as_json(est: Estimate) -> dict[str, Any]:
    """The full estimate, layout included, as plain JSON data."""
    out = est.as_dict()
    out["layout"] = asdict(est.layout)
    return out
