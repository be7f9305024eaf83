"""Hardware the planner plans for: GPU spec sheets, and a CPU measured on the spot.

GPU figures are vendor spec sheets (dense 16-bit tensor-core peak, TF32 for fp32
training, HBM size and bandwidth, NVLink per direction, one InfiniBand NIC per GPU).
``efficiency`` is the fraction of peak a well-tuned Transformer layer reaches on the
device (a documented default, not a measurement; see docs/planner.md); ``reserved_bytes``
is per-process memory outside the model (CUDA context, NCCL and allocator slack).

``cpu`` is measured when asked for (:func:`paratrain.planner.calibrate.measure_cpu`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from paratrain.mfu import GPU_PEAKS

GiB = float(1 << 30)


@dataclass
class HardwareSpec:
    """One device type and the links between devices (bandwidths in bytes/s, one direction)."""

    name: str
    peak_flops: float  # per device, 16-bit (bf16/fp16) dense
    peak_flops_fp32: float  # per device, fp32 training (TF32 on A100/H100)
    memory_bytes: float  # per device
    mem_bw: float  # device memory bandwidth
    intra_bw: float  # per device inside a node (NVLink / loopback)
    inter_bw: float  # per device across nodes (InfiniBand NIC / Ethernet)
    intra_latency: float  # seconds per collective hop inside a node
    inter_latency: float
    devices_per_node: int
    efficiency: float  # achievable fraction of peak on Transformer layers
    reserved_bytes: float  # per process, outside model states and activations
    p2p_bw: float = 0.0  # point-to-point send/recv inside a node; 0: intra_bw
    overlap: bool = True  # gradient all-reduce / ZeRO-3 gathers overlap compute
    layer_overhead_s: float = 50e-6  # fixed cost per layer per micro-batch (kernel launches / dispatch)
    alloc_bw: float = 0.0  # bytes/s of fresh (page-faulted) allocations; 0: a caching allocator reuses memory
    gather_bw: float = 0.0  # all-gather / reduce-scatter bus bandwidth inside a node; 0: intra_bw
    dtensor_param_s: float = 0.0  # extra host time per DTensor parameter per step (optimizer, clip)
    tp_layer_s: float = 0.0  # extra host time of a DTensor tensor-parallel layer per micro-batch
    gather_latency: float = 0.0  # per all-gather / reduce-scatter inside a node; 0: intra_latency
    # measured by planner/probe.py on 2 ranks (0: modelled): a 2-way tensor-parallel block / an
    # FSDP2 block costs this many times the plain block with both ranks busy, everything included
    tp2_layer_factor: float = 0.0
    fsdp2_layer_factor: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)
    peak_flops_fp8: float = 0.0  # per device, dense fp8 (0: no fp8 tensor cores)

    def peak(self, precision: str) -> float:
        """Peak FLOP/s for ``fp32``, ``fp8`` (16-bit where the device has no fp8) or a 16-bit precision."""
        if precision == "fp8":
            return self.peak_flops_fp8 or self.peak_flops
        return self.peak_flops_fp32 if precision == "fp32" else self.peak_flops

    def with_(self, **kw: Any) -> HardwareSpec:
        return dataclasses.replace(self, **kw)


def _gpu(name: str, chip: str, mem: float, bw: float, nvlink: float, ib: float, eff: float) -> HardwareSpec:
    """A GPU spec; its peaks (dense bf16, TF32, fp8) come from :data:`paratrain.mfu.GPU_PEAKS`."""
    pk = GPU_PEAKS[chip]
    return HardwareSpec(name, pk["bf16"], pk["fp32"], mem, bw, nvlink, ib, intra_latency=10e-6, inter_latency=20e-6,
                        devices_per_node=8, efficiency=eff, reserved_bytes=2 * GiB, peak_flops_fp8=pk["fp8"])


GPU_SPECS: dict[str, HardwareSpec] = {  # SXM parts; NVLink per direction, one IB NIC (HDR / NDR) per GPU
    "a100-40gb": _gpu("a100-40gb", "A100", 40 * GiB, 1.555e12, 300e9, 25e9, 0.60),
    "a100-80gb": _gpu("a100-80gb", "A100", 80 * GiB, 2.039e12, 300e9, 25e9, 0.60),
    "h100": _gpu("h100", "H100", 80 * GiB, 3.35e12, 450e9, 50e9, 0.55),
    "h200": _gpu("h200", "H200", 141e9, 4.8e12, 450e9, 50e9, 0.55),  # the H100 die, 141 GB HBM3e
}
GPU_TYPES = (*GPU_SPECS, "cpu")

# Defaults for a CPU worker when nothing has been measured (a 2-core AVX-512 Xeon: ~130-165 GFLOP/s
# fp32 matmul per thread, 6-15 GB/s memory copy): used only by tests and as a fallback.
CPU_EFFICIENCY = 0.55  # fp32 Transformer step / 512^3 matmul rate, gpt-tiny on this machine
CPU_DEFAULT = HardwareSpec("cpu", peak_flops=30e9, peak_flops_fp32=150e9, memory_bytes=16 * GiB, mem_bw=10e9,
                           intra_bw=1.0e9, inter_bw=1.25e9, intra_latency=300e-6, inter_latency=500e-6,
                           devices_per_node=2, efficiency=CPU_EFFICIENCY, reserved_bytes=330e6, p2p_bw=2e9,
                           overlap=False, layer_overhead_s=0.5e-3, alloc_bw=2e9,
                           gather_bw=0.25e9, dtensor_param_s=350e-6, tp_layer_s=3e-3)


def describe(spec: HardwareSpec) -> str:
    """One line about a spec (measured values for cpu)."""
    if spec.measured:
        m = spec.measured
        return (f"cpu ({m['threads']} thread(s)/worker): matmul {m['matmul_fp32_gflops']:.0f} GFLOP/s fp32, "
                f"memory {m['mem_bw_gbs']:.1f} GB/s, gloo all-reduce {m['allreduce_bus_bw_gbs']:.2f} GB/s "
                f"+ {m['allreduce_latency_ms']:.2f} ms, baseline RSS {spec.reserved_bytes / 2**20:.0f} MiB")
    return (f"{spec.name}: {spec.peak_flops / 1e12:.0f} TFLOP/s bf16 peak at {spec.efficiency:.0%}, "
            f"{spec.memory_bytes / 1e9:.0f} GB, NVLink {spec.intra_bw / 1e9:.0f} GB/s, "
            f"inter-node {spec.inter_bw / 1e9:.0f} GB/s per GPU")


def to_json(spec: HardwareSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))
