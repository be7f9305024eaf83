"""Checks of a :class:`~paratrain.config.Config`: per-field types, choices and ranges, then
combinations of settings that are each valid alone but cannot work together. Each raises
:class:`ConfigError` with one line that names the problem and the fix. ``Config.validate`` runs
them all, the per-field checks first."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from paratrain.errors import ConfigError
from paratrain.overrides import suggest

if typing.TYPE_CHECKING:
    from paratrain.config import Config


# (section, key) -> the values a string key may take
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "arch"): ("gpt", "llama", "seq2seq", "bert"),
    ("data", "verify"): ("sample", "full"),
    ("data", "boundary"): ("eos", "bos", "bos_eos", "none"),
    ("data", "packing"): ("concat", "docs"),
    ("train", "optimizer"): ("adamw", "sgd", "onebit_adam"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "activation_checkpointing"): ("none", "full", "selective", "selective_op"),
    ("train", "float8"): ("none", "tensorwise", "rowwise"),
    ("train", "optim_state_dtype"): ("fp32", "bf16"),
    ("parallel", "sync"): ("allreduce", "ps"),
    ("parallel", "pp_schedule"): ("gpipe", "1f1b", "interleaved"),
    ("parallel", "backend"): ("auto", "gloo", "nccl"),
    ("ps", "mode"): ("sync", "async", "ssp"),
    ("ps", "transport"): ("tcp", "ipc"),
    ("ps", "integrity"): ("none", "mac"),
    ("ps", "placement"): ("ordered", "balanced"),
    ("ps", "optimizer"): ("", "adamw", "sgd"),
    ("compression", "gradient"): ("none", "fp16", "bf16", "int8", "topk", "powersgd"),
    ("compression", "int8_rounding"): ("nearest", "stochastic"),
    ("compression", "powersgd_vectors"): ("fp32", "int8"),
    ("compression", "powersgd_exchange"): ("allreduce", "allgather"),
}

# (section, key) -> (min, max) inclusive; None = unbounded
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("model", "n_layer"): (1, None),
    ("model", "n_head"): (1, None),
    ("model", "d_model"): (1, None),
    ("model", "d_ff"): (1, None),
    ("model", "vocab_size"): (0, None),
    ("model", "max_seq_len"): (1, None),
    ("model", "dropout"): (0.0, 0.99),
    ("model", "n_dec_layer"): (0, None),
    ("model", "n_kv_head"): (0, None),
    ("data", "seq_len"): (2, None),
    ("data", "batch_size"): (1, None),
    ("data", "val_fraction"): (0.0, 0.5),
    ("data", "num_samples"): (1, None),
    ("data", "task_len"): (1, 64),
    ("data", "mask_prob"): (0.01, 0.9),
    ("train", "steps"): (0, None),
    ("train", "lr"): (0.0, 10.0),
    ("train", "min_lr_ratio"): (0.0, 1.0),
    ("train", "momentum"): (0.0, 1.0),
    ("train", "weight_decay"): (0.0, 10.0),
    ("train", "warmup_steps"): (0, None),
    ("train", "grad_clip"): (0.0, None),
    ("train", "loss_scale"): (1.0, None),
    ("train", "loss_scale_growth_interval"): (1, None),
    ("train", "grad_accum"): (1, None),
    ("train", "eval_every"): (0, None),
    ("train", "eval_batches"): (1, None),
    ("train", "log_every"): (1, None),
    ("train", "hang_timeout_s"): (0.0, None),
    ("train", "threads"): (0, None),
    ("parallel", "nproc"): (1, 1024),
    ("parallel", "dp"): (0, None),
    ("parallel", "tp"): (1, None),
    ("parallel", "pp"): (1, None),
    ("parallel", "zero"): (0, 3),
    ("parallel", "max_restarts"): (0, 100),
    ("parallel", "microbatches"): (0, None),
    ("parallel", "virtual_stages"): (1, None),
    ("parallel", "bucket_cap_mb"): (0.001, None),
    ("ps", "servers"): (1, 64),
    ("ps", "staleness"): (0, None),
    ("ps", "port"): (0, 65535),
    ("ps", "heartbeat_s"): (0.01, None),
    ("ps", "dead_after_s"): (0.05, None),
    ("ps", "max_message_mb"): (0.001, None),
    ("compression", "topk_ratio"): (1e-6, 1.0),
    ("compression", "powersgd_rank"): (1, None),
    ("compression", "int8_chunk"): (1, None),
    ("compression", "powersgd_iterations"): (1, None),
    ("compression", "fallback_factor"): (1.0, None),
    ("compression", "fallback_window"): (1, None),
    ("compression", "fallback_steps"): (0, None),
    ("compression", "warmup_steps"): (0, None),
    ("checkpoint", "every"): (0, None),
    ("checkpoint", "keep"): (0, None),
}


def check_combinations(cfg: Config) -> None:
    """Model, data, world-size, PS and debug settings that contradict each other."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.n_head = {m.n_head} does not divide model.d_model = {m.d_model}; "
            "pick n_head so d_model / n_head is a whole number"
        )
    check_llama(cfg)
    if m.vocab_size and d.tokenizer == "byte" and m.vocab_size < 261:
        raise ConfigError(
            f"model.vocab_size = {m.vocab_size} is too small for byte tokens (need >= 261, or 0 for auto)"
        )
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {m.max_seq_len}; "
            "raise max_seq_len or shorten seq_len"
        )
    src = d.source
    known = ("stdlib", "synthetic:", "text:", "shards:", "jsonl:", "parquet:", "hf-dataset:")
    if not any(src == k or (k.endswith(":") and src.startswith(k)) for k in known):
        raise ConfigError(
            f"data.source = {src!r} is not one of 'stdlib', 'synthetic:reverse|sort|add', "
            "'text:GLOB', 'jsonl:GLOB', 'parquet:GLOB', 'hf-dataset:DIR', 'shards:DIR'"
        )
    check_data_keys(cfg)
    if src.startswith("synthetic:"):
        task = src.split(":", 1)[1]
        if task not in ("reverse", "sort", "add"):
            raise ConfigError(f"data.source = {src!r}: unknown task '{task}' (reverse | sort | add)")
        if m.arch == "bert":
            raise ConfigError("model.arch = 'bert' needs a text corpus, not a synthetic task")
    elif m.arch == "seq2seq":
        raise ConfigError(f"model.arch = 'seq2seq' needs a synthetic:* source, got {src!r}")
    world = p.nproc
    if p.dp and p.dp * p.tp * p.pp != world:
        raise ConfigError(
            f"parallel.dp * tp * pp = {p.dp} * {p.tp} * {p.pp} = {p.dp * p.tp * p.pp} "
            f"but parallel.nproc = {world}; make the product equal nproc"
        )
    if not p.dp and world % (p.tp * p.pp):
        raise ConfigError(
            f"parallel.nproc = {world} is not divisible by tp * pp = {p.tp * p.pp}"
        )
    if p.sync == "ps" and (p.tp > 1 or p.pp > 1 or p.zero):
        raise ConfigError("parallel.sync = 'ps' works with plain data parallel only (tp = pp = 1, zero = 0)")
    if p.sync == "ps" and cfg.train.precision == "fp16":
        raise ConfigError("parallel.sync = 'ps' trains in fp32 or bf16 (fp16's loss scaling would need the workers "
                          "to agree on skipped steps); set train.precision = 'bf16'")
    if cfg.debug.delay_rank >= world or cfg.debug.kill_rank >= world:
        raise ConfigError(f"debug rank is out of range for parallel.nproc = {world}")
    if p.sync == "ps" and cfg.debug.kill_server >= cfg.ps.servers:
        raise ConfigError(f"debug.kill_server = {cfg.debug.kill_server} but ps.servers = {cfg.ps.servers}")
    if cfg.ps.secret and len(cfg.ps.secret) < 16:
        raise ConfigError("ps.secret must be at least 16 characters (or empty: the launcher generates one)")
    check_layout(cfg)


def check_data_keys(cfg: Config) -> None:
    """Tokenizer spec, document packing and ``model.init_from``."""
    d, m = cfg.data, cfg.model
    tok = d.tokenizer
    if tok not in ("byte", "bpe") and not tok.startswith("hf:") and not (
            tok.startswith("bpe:") and tok[4:].isdigit() and 300 <= int(tok[4:]) <= 1 << 20):
        raise ConfigError(f"data.tokenizer = {tok!r} is not 'byte', 'bpe', 'bpe:VOCAB' (300 <= VOCAB <= 1048576) "
                          "or 'hf:PATH' (a local tokenizer.json)")
    if d.packing == "docs" and d.boundary == "none":
        raise ConfigError("data.packing = 'docs' finds documents by their boundary tokens; "
                          "set data.boundary = 'eos' (or 'bos', 'bos_eos')")
    if not d.text_field:
        raise ConfigError("data.text_field is empty; name the column that holds the text (default 'text')")
    if m.init_from:
        if not m.init_from.startswith("hf:") or len(m.init_from) == 3:
            raise ConfigError(f"model.init_from = {m.init_from!r} must be 'hf:DIR' (a local Hugging Face model dir)")
        if cfg.parallel.meta_init:
            raise ConfigError("model.init_from loads weights into a model built in memory; set "
                              "parallel.meta_init = false")
        from paratrain.hf import check_init_from  # torch and safetensors, only when init_from is set

        check_init_from(m)


def check_llama(cfg: Config) -> None:
    """Grouped-query heads, rotary base and RMSNorm epsilon (read by model.arch = 'llama')."""
    m = cfg.model
    for key in ("rope_theta", "norm_eps"):
        value = getattr(m, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"model.{key} = {value} must be a finite positive number")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise ConfigError(f"model.n_kv_head = {kv} does not divide model.n_head = {m.n_head}; "
                          "each key/value head serves a whole group of query heads")
    if m.arch == "llama" and (m.d_model // m.n_head) % 2:
        raise ConfigError(f"model.d_model / n_head = {m.d_model // m.n_head} is odd; rotary embeddings "
                          "rotate pairs of head dimensions, so pick an even head size")


def check_layout(cfg: Config) -> None:
    """Tensor / pipeline / ZeRO layouts that cannot work, each rejected with a one-line reason."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    if cfg.train.float8 != "none" and p.tp > 1:
        raise ConfigError("train.float8 does not combine with parallel.tp > 1 yet; use dp / zero for float8 "
                          "or set train.float8 = \"none\"")
    if p.tp > 1:
        for key, value in (("n_head", m.n_head), ("d_ff", m.d_ff)):
            if value % p.tp:
                raise ConfigError(f"model.{key} = {value} is not divisible by parallel.tp = {p.tp}; "
                                  "tensor parallel splits it evenly across ranks")
        if m.arch == "llama" and (m.n_kv_head or m.n_head) % p.tp:
            raise ConfigError(f"model.n_kv_head = {m.n_kv_head or m.n_head} is not divisible by parallel.tp = "
                              f"{p.tp}; tensor parallel gives each rank whole key/value heads (lower tp)")
    if p.pp > 1:
        mb = p.microbatches or p.pp
        if d.batch_size % mb:
            raise ConfigError(f"data.batch_size = {d.batch_size} is not divisible by parallel.microbatches = {mb}")
        if p.pp_schedule == "1f1b" and mb < p.pp:
            raise ConfigError(f"parallel.microbatches = {mb} is below parallel.pp = {p.pp}; "
                              "1F1B needs at least one microbatch per stage")
        if p.pp_schedule == "interleaved" and mb % p.pp:
            raise ConfigError(f"parallel.microbatches = {mb} must be a multiple of parallel.pp = {p.pp} "
                              "for the interleaved schedule")
        if p.zero:
            raise ConfigError("parallel.zero > 0 with pp > 1 is not supported (stages all-reduce "
                              "gradients over dp); use zero = 0")
    if p.meta_init and (p.zero < 2 or p.tp > 1 or p.pp > 1):
        raise ConfigError(f"parallel.meta_init = true builds the parameters on the meta device and needs them "
                          f"sharded by FSDP2: set parallel.zero = 3 (or 2) with tp = pp = 1 "
                          f"(now zero = {p.zero}, tp = {p.tp}, pp = {p.pp})")
    if p.zero == 1 and p.tp > 1:
        raise ConfigError("parallel.zero = 1 works with plain data parallel only; with tp > 1 use "
                          "zero = 2 or 3 (FSDP2 on the dp axis)")
    if p.zero and cfg.dp == 1:
        raise ConfigError(f"parallel.zero = {p.zero} shards over data-parallel ranks but dp = 1; "
                          "use more processes than tp * pp")
    if p.cpu_offload and p.zero < 2:
        raise ConfigError("parallel.cpu_offload needs parallel.zero = 2 or 3 (FSDP2 offloads sharded state)")
    if cfg.train.optimizer == "onebit_adam" and (p.sync != "allreduce" or p.tp > 1 or p.pp > 1 or p.zero
                                                 or cfg.compression.gradient != "none"):
        raise ConfigError("train.optimizer = 'onebit_adam' compresses the data-parallel exchange itself: it needs "
                          "parallel.sync = 'allreduce', tp = pp = 1, zero = 0 and compression.gradient = 'none' "
                          f"(now sync = {p.sync!r}, tp = {p.tp}, pp = {p.pp}, zero = {p.zero}, "
                          f"gradient = {cfg.compression.gradient!r})")
    if cfg.compression.gradient != "none" and (p.tp > 1 or p.pp > 1 or p.zero >= 2):
        raise ConfigError(f"compression.gradient = {cfg.compression.gradient!r} compresses DDP gradients; "
                          "it needs tp = pp = 1 and zero = 0 or 1")
    c = cfg.compression
    if (c.gradient == "powersgd" and c.powersgd_iterations > 1 and p.sync == "allreduce"
            and c.powersgd_exchange == "allreduce"):
        raise ConfigError(f"compression.powersgd_iterations = {c.powersgd_iterations} needs each rank to factorize "
                          "alone: set compression.powersgd_exchange = 'allgather' (or parallel.sync = 'ps'); "
                          "the shared all-reduce exchange runs one iteration per step")


def check_model_layout(cfg: Config) -> None:
    """How paratrain's own model (``[model]``) is pipelined; skipped for a model of your own."""
    m, p = cfg.model, cfg.parallel
    if p.pp > 1:
        if m.arch not in ("gpt", "llama"):
            raise ConfigError(f"pipeline parallel splits the decoder LMs (model.arch = 'gpt' or 'llama'), "
                              f"not {m.arch!r}; use tp or zero for it")
        v = p.virtual_stages if p.pp_schedule == "interleaved" else 1
        if p.pp * v > m.n_layer:
            what = f"pp * virtual_stages = {p.pp} * {v}" if v > 1 else f"pp = {p.pp}"
            raise ConfigError(f"parallel.{what} exceeds model.n_layer = {m.n_layer}; "
                              "every pipeline stage needs at least one layer")


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> type of one config section dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(where: str, value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (an int is accepted for a float, nothing else is converted); NaN is refused."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def check_field(where: str, value: Any, choices: tuple[str, ...] | None,
                bounds: tuple[float | None, float | None]) -> None:
    """One key against its allowed values and its inclusive (min, max) range (None: unbounded)."""
    if choices is not None and value not in choices:
        opts = " | ".join(repr(c) for c in choices)
        raise ConfigError(f"{where} = {value!r} is not one of {opts}{suggest(str(value), choices)}")
    lo, hi = bounds
    if lo is not None and value < lo:
        raise ConfigError(f"{where} = {value} is below its minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} = {value} is above its maximum {hi}")


def check_finite(section: str, key: str, value: typing.Any) -> None:
    """Any float setting must be a real number: NaN and +-inf are rejected whatever the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{section}.{key} = {value} is not a finite number; give it a real value")


def check_runtime(cfg: Config) -> None:
    """What only the machine that launches can tell: run.dir must be (or become) a directory, and
    parallel.backend = "nccl" needs CUDA.  Run at launch, not in ``validate``: planning or compressing
    for a GPU cluster on a CPU machine is fine."""
    for p in (cfg.run_dir, *cfg.run_dir.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"run.dir = '{cfg.run_dir}': '{p}' is a file, not a directory; "
                              "pick another run.dir")
    if cfg.parallel.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("parallel.backend = 'nccl' needs CUDA GPUs, and torch sees none here; use "
                              "backend = 'gloo' (or 'auto', which picks gloo on CPUs)")
