"""The planner: memory, step time and communication of a layout, from first principles.

``hardware`` (device specs; the CPU measured), ``flops`` (parameters, FLOPs, MFU/HFU),
``memory`` (ZeRO model states, Korthikanti activations), ``cost`` (time per step of one
layout), ``search`` (enumerate and rank layouts), ``measure`` (check against real runs),
``cli`` (``paratrain plan``).  Only ``calibrate`` and ``measure`` import torch.
"""

from __future__ import annotations

from paratrain.planner.calibrate import get_spec
from paratrain.planner.cost import Estimate, Layout, Setup, estimate
from paratrain.planner.flops import PRESETS, ModelSpec, model_flops_per_token, spec_from_config
from paratrain.planner.hardware import GPU_SPECS, HardwareSpec
from paratrain.planner.search import SearchResult
from paratrain.planner.search import search as search_layouts

__all__ = [
    "GPU_SPECS",
    "PRESETS",
    "Estimate",
    "HardwareSpec",
    "Layout",
    "ModelSpec",
    "SearchResult",
    "Setup",
    "estimate",
    "get_spec",
    "model_flops_per_token",
    "search_layouts",
    "spec_from_config",
]
