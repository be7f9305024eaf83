"""``paratrain compress``: load a checkpoint, prune -> fine-tune -> distill -> quantize, export, report.

Every stage is exported to OUT/<stage>.safetensors (static int8: .pt) and measured against the
original on the run's own validation data; see :mod:`paratrain.model_compression.report`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import paratrain.model_compression.distill as D
import paratrain.model_compression.export as E
import paratrain.model_compression.pruning as P
import paratrain.model_compression.quantization as Q
import paratrain.model_compression.report as R
from paratrain import checkpoint as ckpt
from paratrain.config import Config, ConfigError
from paratrain.data import DistributedBatches, build_data, val_batches
from paratrain.models import build_model

PRUNE_METHODS = ("magnitude", "nm", "ffn", "heads", "both")


@dataclass
class CompressOptions:
    """What ``paratrain compress`` does; every field has a CLI flag of the same name."""

    prune: float = 0.0  # fraction: of prunable weights (magnitude) or of neurons/heads (structured)
    prune_method: str = "magnitude"  # magnitude | nm | ffn | heads | both
    rank_by: str = "norm"  # structured ranking: norm | sensitivity
    nm: str = "2:4"
    schedule: str = "oneshot"  # magnitude only: oneshot | cubic (during the fine-tune)
    finetune_steps: int = 0  # after pruning; also the QAT steps of int8-qat
    quantize: str = "none"  # none | int8 | int8-static | int8-qat | int8-weight | int4-weight
    quantize_embeddings: bool = True  # with --quantize: store embedding tables as int8 rows
    distill: bool = False
    distill_steps: int = 200
    student_layers: int = 0  # 0: half the teacher's (unless pruned: then the pruned model is the student)
    temperature: float = 2.0
    alpha: float = 0.5
    lr: float = 0.0  # 0: a third of the run's train.lr
    batch_size: int = 0  # 0: the run's data.batch_size
    eval_batches: int = 0  # 0: the run's train.eval_batches
    calib_batches: int = 8
    repeats: int = 20
    threads: int = 1
    torchscript: bool = False
    engine: str = "auto"  # int8 engine: auto (time x86 and onednn, keep the faster) | x86 | fbgemm | onednn
    seed: int = 0

    def check(self) -> None:
        if self.prune_method not in PRUNE_METHODS:
            raise ConfigError(f"--prune-method {self.prune_method!r} is not one of {' | '.join(PRUNE_METHODS)}")
        if not 0.0 <= self.prune < 1.0:
            raise ConfigError(f"--prune {self.prune} must be a fraction in [0, 1)")
        if self.quantize not in ("none", *Q.MODES):
            raise ConfigError(f"--quantize {self.quantize!r} is not one of none | {' | '.join(Q.MODES)}")
        if self.schedule not in ("oneshot", "cubic"):
            raise ConfigError(f"--schedule {self.schedule!r} is not oneshot | cubic")
        if self.schedule == "cubic" and self.finetune_steps < 1:
            raise ConfigError("--schedule cubic prunes gradually during fine-tuning; give --finetune-steps N")
        if self.rank_by not in ("norm", "sensitivity"):
            raise ConfigError(f"--rank-by {self.rank_by!r} is not norm | sensitivity")
        for name in ("finetune_steps", "distill_steps", "student_layers", "eval_batches", "batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if self.engine != "auto" and self.engine not in torch.backends.quantized.supported_engines:
            raise ConfigError(f"--engine {self.engine!r} is not one of auto | "
                              f"{' | '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')}")
        if self.repeats < 1 or self.threads < 1 or self.calib_batches < 1:
            raise ConfigError("--repeats, --threads and --calib-batches must be at least 1")
        if not 0.0 <= self.lr < float("inf"):  # (NaN fails this too)
            raise ConfigError(f"--lr {self.lr} must be a finite learning rate >= 0 (0: train.lr / 3)")
        if self.prune_method == "nm":
            self.nm_pair()

    def nm_pair(self) -> tuple[int, int]:
        try:
            n, m = (int(x) for x in self.nm.split(":"))
        except ValueError:
            raise ConfigError(f"--nm {self.nm!r} must look like N:M, e.g. 2:4") from None
        if not 0 < n < m:
            raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
        return n, m


# ---- loading -------------------------------------------------------------------------------


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint step dir, or the newest one under a run dir (or its checkpoints/ dir)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint '{p}' does not exist")
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = ckpt.latest(root)
        if found is not None:
            return found
    raise ConfigError(f"'{p}' is neither a checkpoint (step_N/ with manifest.json) nor a run dir with checkpoints")


def _find_dcp(step_dir: Path) -> Path | None:
    for meta in sorted(step_dir.rglob(".metadata")):
        return meta.parent
    return None


def _strip(sd: dict[str, Any]) -> dict[str, Any]:
    for key in ("model", "state_dict", "app"):
        if isinstance(sd.get(key), dict) and len(sd) <= 3:
            return _strip(sd[key])
    prefixes = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
    out = {}
    for k, v in sd.items():
        for pre in prefixes:
            k = k.replace(pre, "")
        out[k] = v
    return out


def load_dcp(folder: Path) -> dict[str, Any]:
    """The full model state dict from a torch.distributed.checkpoint folder, read in this one process.

    paratrain's model-parallel checkpoints (``step_N/dcp/``) key tensors ``model.<name>`` next to
    ``optim.<name>.<state>``; only the model tensors are read. Other layouts (no ``model.`` keys)
    are read whole."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        tensors = {k: m for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
        if any(k.startswith("model.") for k in tensors):
            tensors = {k: m for k, m in tensors.items() if k.startswith("model.")}
        sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            dcp.load(sd, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except Exception as e:
        raise ckpt.CheckpointError(f"cannot read the sharded checkpoint in {folder}: {e}") from None
    return _strip({k.removeprefix("model."): v for k, v in sd.items()})


def load_checkpoint(path: Path | str, config: Path | str | None = None) -> tuple[Config, nn.Module, Path]:
    """(run config, model with the checkpoint's weights in eval mode, step dir)."""
    step_dir = resolve_checkpoint(path)
    cfg_path = Path(config) if config else step_dir.parent.parent / "config.toml"
    if not cfg_path.is_file():
        raise ConfigError(f"no run config at {cfg_path}; pass --config RUN/config.toml")
    cfg = Config.load(cfg_path)
    ckpt.verify(step_dir)
    if (step_dir / "model.pt").is_file():
        state = _strip(ckpt.load_file(step_dir, "model.pt"))
    elif (dcp := _find_dcp(step_dir)) is not None:
        state = load_dcp(dcp)
    else:
        raise ckpt.CheckpointError(f"checkpoint {step_dir} has neither model.pt nor a sharded (DCP) model folder")
    data = build_data(cfg)
    vocab = cfg.model.vocab_size or data.vocab_size
    model = build_model(cfg.model, vocab, data.pad_id)
    try:
        model.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"checkpoint {step_dir} does not fit the run's model config: "
                                   f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return cfg, model.eval(), step_dir


# ---- the pipeline --------------------------------------------------------------------------


def calibration_batches(cfg: Config, data: Any, n: int, batch_size: int, skip: int) -> list[dict[str, torch.Tensor]]:
    """Held-out batches for calibration: validation batches after the ``skip`` used for evaluation,
    or training batches when the validation split has none left."""
    held_out = val_batches(data, batch_size)[skip:skip + n]
    return held_out or _train_batches(cfg, data, n, batch_size, 2)


def _train_batches(cfg: Config, data: Any, n: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ds = data.train_dataset
    it = DistributedBatches(ds, min(batch_size, len(ds)), seed=cfg.run.seed + 7919 + seed)
    return [next(it) for _ in range(n)]


def compress(checkpoint: Path | str, out: Path | str, opts: CompressOptions,
             config: Path | str | None = None, log: Any = print) -> dict[str, Any]:
    """Run the pipeline; write OUT/report.{json,md} and the exported stages; return the report."""
    opts.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, original, step_dir = load_checkpoint(checkpoint, config)
    data = build_data(cfg)
    bs = opts.batch_size or cfg.data.batch_size
    val = val_batches(data, bs, max_batches=opts.eval_batches or cfg.train.eval_batches)
    if not val:
        raise ConfigError("the run's validation split is empty (data.val_fraction = 0); nothing to evaluate on")
    lr = opts.lr or cfg.train.lr / 3
    torch.manual_seed(opts.seed)
    stages: list[tuple[str, nn.Module, dict[str, Any]]] = [("original", original, {})]
    meta = ckpt.load_file(step_dir, "meta.json") if (step_dir / "meta.json").is_file() else {}
    steps: list[str] = [f"checkpoint {step_dir} ({cfg.model.arch}, step {meta.get('step')})"]
    current = copy.deepcopy(original)
    pruner: P.MagnitudePruner | None = None

    if opts.prune > 0 or opts.prune_method == "nm":
        log(f"pruning: {opts.prune_method} {opts.prune:g}")
        extra: dict[str, Any] = {"method": opts.prune_method}
        loss_fn = None
        if opts.prune_method in ("magnitude", "nm"):
            n, m = opts.nm_pair()
            end = int(0.75 * opts.finetune_steps) if opts.schedule == "cubic" else 0
            pruner = P.MagnitudePruner(current, opts.prune, opts.prune_method, n, m, 0, end)
            pruner.update(0)
            loss_fn = pruner.wrap_loss(grad_accum=cfg.train.grad_accum)
            steps.append(f"pruned: {opts.prune_method} {pruner.final:.0%} of the prunable weights ({opts.schedule})")
        else:
            calib = _train_batches(cfg, data, opts.calib_batches, bs, 1) if opts.rank_by == "sensitivity" else []
            extra.update(P.prune_structured(current, opts.prune, opts.prune_method, opts.rank_by, calib))
            steps.append(f"pruned: {opts.prune:.0%} of the {opts.prune_method} units by {opts.rank_by} "
                         "(physically removed)")
        if opts.finetune_steps:
            log(f"fine-tuning {opts.finetune_steps} steps")
            D.finetune(cfg, current, loss_fn, opts.finetune_steps, out / "finetune", lr, bs)
            steps.append(f"fine-tuned {opts.finetune_steps} steps at lr {lr:g} (metrics in finetune/)")
        if pruner is not None:
            pruner.update(10**9)
        extra["sparsity"] = P.weight_sparsity(current)
        stages.append(("pruned", current, extra))

    if opts.distill:
        n_layers = len(getattr(current, "layers", None) or current.encoder.layers)
        k = opts.student_layers or (n_layers if len(stages) > 1 else max(1, n_layers // 2))
        student = D.make_student(current, k) if k != n_layers else copy.deepcopy(current)
        log(f"distilling into a {k}-layer student for {opts.distill_steps} steps")
        loss: Any = D.DistillLoss(copy.deepcopy(original), opts.temperature, opts.alpha)
        keep = P.MagnitudePruner.keep_zeros(student) if pruner is not None else None
        if keep is not None:  # an unstructured-pruned student keeps its zeros
            loss = keep.wrap_loss(loss, cfg.train.grad_accum)
        D.finetune(cfg, student, loss, opts.distill_steps, out / "distill", lr, bs)
        if keep is not None:
            keep.apply()
        steps.append(f"distilled: {k}-layer student, T = {opts.temperature:g}, alpha = {opts.alpha:g}, "
                     f"{opts.distill_steps} steps (metrics in distill/)")
        current = student
        stages.append(("distilled", current, {"layers": k}))

    if opts.quantize != "none":
        log(f"quantizing: {opts.quantize}")
        mode = opts.quantize
        if mode == "int8":
            engine = opts.engine
            if engine == "auto":
                engine, timings = fastest_engine(current, R.latency_inputs(val[0], 16), opts.threads)
                steps.append("int8 engine: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items())
                             + f" at batch 16 -> {engine}")
            q = Q.quantize_dynamic_int8(current, engine_name=engine)
        elif mode == "int8-static":
            calib = calibration_batches(cfg, data, opts.calib_batches, bs, len(val))
            q = Q.quantize_static_int8(current, calib)
        elif mode == "int8-qat":
            q = copy.deepcopy(current)
            keep = P.MagnitudePruner.keep_zeros(q) if pruner is not None else None
            Q.prepare_qat(q)
            qat_loss = keep.wrap_loss(grad_accum=cfg.train.grad_accum) if keep is not None else None
            D.finetune(cfg, q, qat_loss, opts.finetune_steps or 100, out / "qat", lr / 3, bs)
            if keep is not None:
                keep.apply()
            q = Q.convert_qat(q)
        else:
            q = Q.quantize_weight_only(current, 8 if mode == "int8-weight" else 4)
        if opts.quantize_embeddings and mode != "int8-static":
            Q.quantize_embeddings_int8(q)
        steps.append(f"{mode}: " + {
            "int8": "dynamic int8 Linears (per-channel weights, per-batch activations)",
            "int8-static": f"static int8 Linears calibrated on {opts.calib_batches} held-out batches",
            "int8-qat": f"fake-quant fine-tune {opts.finetune_steps or 100} steps, then dynamic int8",
            "int8-weight": "int8 weights, fp32 compute",
            "int4-weight": "int4 weights (groups of 32), fp32 compute",
        }[mode] + ("; embedding tables stored as int8 rows" if opts.quantize_embeddings and mode != "int8-static"
                   else ""))
        stages.append((mode, q, {}))

    return measure_stages(cfg, data, val, stages, steps, out, opts, step_dir, log)


def fastest_engine(model: nn.Module, inputs: dict[str, torch.Tensor], threads: int = 1,
                   repeats: int = 7) -> tuple[str, dict[str, float]]:
    """Which quantized engine runs ``model``'s dynamic int8 copy fastest on ``inputs`` here:
    (name, median ms per engine). The answer depends on the CPU (on this project's Xeon with
    AMX, oneDNN beats the fbgemm-based x86 engine by 1.1-1.4x on the default GPT), so it is
    measured rather than assumed. Candidates: x86 and onednn, where torch supports them."""
    R.keep_freed_memory()
    names = [e for e in ("x86", "onednn") if e in torch.backends.quantized.supported_engines]
    if len(names) < 2:
        return (names[0] if names else torch.backends.quantized.engine), {}
    copies = {e: Q.quantize_dynamic_int8(model, engine_name=e) for e in names}
    timings = R.measure_latency(copies, inputs, repeats, threads)
    return min(timings, key=timings.__getitem__), timings


def _engines(models: dict[str, nn.Module]) -> str:
    """The quantized engine(s) the stages' int8 layers were packed for, e.g. "onednn"."""
    return ", ".join(sorted({e for m in models.values() if (e := getattr(m, "quant_engine", None))}))


def measure_stages(cfg: Config, data: Any, val: list, stages: list, steps: list[str], out: Path,
                   opts: CompressOptions, step_dir: Path, log: Any = print) -> dict[str, Any]:
    """Export every (name, model, extra) stage to OUT, evaluate and time them together, write the report."""
    rows = []
    for name, model, extra in stages:
        log(f"exporting and evaluating: {name}")
        files = [E.save_model(model, out / f"{name}.safetensors")]
        if opts.torchscript and name not in ("original",):
            files.append(E.export_torchscript(model, R.latency_inputs(val[0], 1), out / f"{name}.torchscript.pt"))
        rows.append(R.stage_row(name, model, files[:1], R.evaluate(model, val, data.exact_match), **extra))
        if len(files) > 1:
            rows[-1]["torchscript_file"] = files[1].name
    models = {name: model for name, model, _ in stages}
    tuned = R.keep_freed_memory()
    log(f"timing {len(models)} stage(s), {opts.repeats} repeats, {opts.threads} thread(s)")
    for size, key in ((1, "latency_ms_b1"), (16, "latency_ms_b16")):
        lat = R.measure_latency(models, R.latency_inputs(val[0], size), opts.repeats, opts.threads)
        for r in rows:
            r[key] = lat[r["name"]]
    R.finish_rows(rows, 16 * cfg.data.seq_len)
    report = {
        "checkpoint": str(step_dir), "arch": cfg.model.arch, "task": data.task, "stages": rows, "steps": steps,
        "measurement": {"repeats": opts.repeats, "threads": opts.threads, "seq_len": cfg.data.seq_len,
                        "val_batches": len(val), "val_batch_size": int(val[0]["labels"].shape[0]),
                        "exact_match": data.exact_match, "torch": torch.__version__,
                        "engine": _engines(models) or torch.backends.quantized.engine,
                        "allocator": "glibc, freed memory kept (mallopt)" if tuned else "default"},
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
    }
    R.write_report(out, report)
    return report
