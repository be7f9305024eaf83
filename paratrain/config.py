"""Typed run configuration: TOML file + ``--section.key=value`` overrides, validated up front.

Every section is a dataclass; every field has a default, a type and (where it matters) a
range.  ``Config.load`` reads TOML with ``tomllib``, applies overrides (values parsed as
TOML literals, bare words taken as strings) and runs ``validate()``.  Anything a user can
get wrong raises :class:`ConfigError`, which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paratrain import config_checks
from paratrain.errors import ConfigError
from paratrain.overrides import parse_override, split_overrides, suggest, toml_value

__all__ = ["Config", "ConfigError", "parse_override"]


@dataclass
class RunConfig:
    """Naming, output directory and seed of the run."""

    name: str = "gpt-tiny"  # run name; the run directory defaults to runs/<name>
    dir: str = ""  # run directory (config.toml, metrics.jsonl, summary.json, checkpoints/); empty: runs/<name>
    seed: int = 1337  # seeds model initialisation, data order and dropout on every rank
    overwrite: bool = False  # a fresh run into a dir with checkpoints clears them first (else it is refused)


@dataclass
class ModelConfig:
    """paratrain's own model (ignored when you pass a model of your own to paratrain.train)."""

    # gpt: GPT-2-style decoder LM; llama: Llama-style decoder LM (RoPE, RMSNorm, SwiGLU, GQA);
    # seq2seq: encoder-decoder (synthetic tasks); bert: masked LM
    arch: str = "gpt"
    n_layer: int = 4  # Transformer blocks (the encoder's, for seq2seq)
    n_head: int = 4  # attention heads; must divide d_model (with tp > 1, n_head and d_ff divide by tp)
    d_model: int = 128  # hidden width
    d_ff: int = 512  # feed-forward inner width (llama: the SwiGLU hidden size)
    vocab_size: int = 0  # vocabulary size; 0: taken from the data's tokenizer
    max_seq_len: int = 256  # longest sequence the model takes (>= data.seq_len)
    dropout: float = 0.0  # dropout probability in attention and feed-forward
    n_dec_layer: int = 0  # seq2seq decoder layers; 0: same as n_layer
    tie_embeddings: bool = True  # share the token embedding with the output head
    n_kv_head: int = 0  # llama: key/value heads (grouped-query attention); 0: n_head
    rope_theta: float = 10000.0  # llama: rotary position embedding base
    norm_eps: float = 1e-5  # llama: RMSNorm epsilon
    init_from: str = ""  # "hf:DIR": start from a local Hugging Face checkpoint (config.json + *.safetensors)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are batched."""

    # stdlib (Python's own sources) | synthetic:reverse|sort|add | text:GLOB | jsonl:GLOB | parquet:GLOB
    # | hf-dataset:DIR | shards:DIR (made by paratrain prepare)
    source: str = "stdlib"
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16  # micro-batch per data-parallel replica (TP/PP ranks of one replica share it)
    val_fraction: float = 0.02  # share of the corpus held out for evaluation
    # byte (256 bytes + specials) | bpe | bpe:VOCAB (trained by prepare) | hf:PATH (a local tokenizer.json);
    # shards carry their own
    tokenizer: str = "byte"
    text_field: str = "text"  # jsonl / parquet / hf-dataset sources: the column holding the text
    boundary: str = "eos"  # token(s) between documents: eos | bos | bos_eos | none
    packing: str = "concat"  # concat: windows cut across documents; docs: whole documents per window, padded
    num_samples: int = 20000  # synthetic tasks: training samples per epoch
    task_len: int = 8  # synthetic tasks: digits per operand
    mask_prob: float = 0.15  # bert masked-LM: share of tokens masked
    verify: str = "sample"  # token shards checked on open: a few shards' sha256 and sampled ids, or every shard


@dataclass
class TrainConfig:
    """The training loop: optimizer, schedule, precision, evaluation and logging."""

    steps: int = 300  # optimizer steps
    lr: float = 3e-3  # peak learning rate (after warm-up)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    optimizer: str = "adamw"  # AdamW, SGD with momentum, or onebit_adam (AdamW, 1-bit compressed momentum; plain DP)
    momentum: float = 0.9  # sgd momentum
    weight_decay: float = 0.01  # decoupled weight decay (adamw), L2 (sgd)
    warmup_steps: int = 20  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    precision: str = "fp32"  # compute dtype: fp32, bf16 autocast, fp16 autocast with dynamic loss scaling
    loss_scale: float = 65536.0  # fp16: initial dynamic loss scale
    loss_scale_growth_interval: int = 2000  # fp16: overflow-free steps before the scale doubles
    # recompute in backward: none; full (whole blocks); selective (the attention core); selective_op
    # (save matmul / attention outputs, recompute the rest)
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile each Transformer block's forward and the loss (regional compilation)
    float8: str = "none"  # none | tensorwise | rowwise: float8 matmuls via torchao (CUDA, sm >= 8.9)
    optim_state_dtype: str = "fp32"  # dtype of AdamW's moments: fp32, or bf16 to halve optimizer memory
    eval_every: int = 100  # steps between evaluations; 0 = never (a final eval still runs)
    eval_batches: int = 8  # validation batches per evaluation
    log_every: int = 10  # steps between metrics.jsonl lines
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; bitwise-repeatable where supported)
    hang_timeout_s: float = 0.0  # watchdog: a step taking longer dumps stacks and fails the run; 0 disables
    threads: int = 0  # intra-op threads per worker; 0: cores / local workers


@dataclass
class ParallelConfig:
    """How the work is split across processes: data, tensor, pipeline and ZeRO parallelism."""

    nproc: int = 2  # worker processes (the world size; under torchrun taken from torchrun)
    dp: int = 0  # data-parallel degree; 0: nproc / (tp * pp)
    tp: int = 1  # tensor-parallel degree (splits heads and d_ff)
    pp: int = 1  # pipeline-parallel stages (splits the layers)
    zero: int = 0  # ZeRO stage: 0 plain DDP, 1 sharded optimizer, 2 + gradients, 3 + parameters (FSDP2)
    sync: str = "allreduce"  # gradient sync: allreduce (collectives between workers) or ps (parameter servers, [ps])
    max_restarts: int = 0  # times the local launcher restarts the workers after a failure
    pp_schedule: str = "1f1b"  # pipeline schedule: GPipe, one-forward-one-backward, or interleaved 1F1B
    microbatches: int = 0  # pipeline micro-batches per batch; 0: pp
    virtual_stages: int = 2  # pipeline chunks per rank with pp_schedule = "interleaved"
    loss_parallel: bool = False  # tp: cross-entropy on vocab-sharded logits (no gather)
    cpu_offload: bool = False  # zero = 2/3: keep sharded parameters, gradients and optimizer state on the CPU
    backend: str = "auto"  # torch.distributed backend; auto: nccl when CUDA is present, else gloo
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size
    fsdp_block: str = ""  # your own model: submodule path or class name of its repeated blocks; empty: found
    meta_init: bool = False  # zero = 2/3: build parameters on the meta device, each rank fills its shards


@dataclass
class PSConfig:
    """Parameter servers (parallel.sync = "ps"): sharding, consistency, transport and liveness."""

    servers: int = 1  # server processes; parameters are sharded across them by bytes
    mode: str = "async"  # consistency: sync (BSP), async (ASP) or ssp (stale-synchronous, bounded by staleness)
    staleness: int = 4  # ssp: how many steps the fastest worker may run ahead of the slowest
    bind: str = "127.0.0.1"  # address the servers listen on (loopback by default)
    port: int = 0  # first server port (server i listens on port + i); 0: pick free ports
    transport: str = "tcp"  # ZeroMQ transport: tcp, or ipc (Unix sockets, one host)
    # shared secret that authenticates PS connections (>= 16 chars, never written to disk); empty: generated
    secret: str = ""
    heartbeat_s: float = 0.5  # seconds between worker heartbeats
    dead_after_s: float = 5.0  # a worker silent this long is declared dead and dropped
    optimizer: str = ""  # optimizer the servers apply; empty: train.optimizer
    max_message_mb: float = 1024.0  # largest message a server accepts
    integrity: str = "none"  # none: connections authenticated once; mac: every message keyed-hashed too
    # sync / ssp: send each server's push as soon as backward has finished its gradients (not with ssp + clipping)
    overlap: bool = True
    # ordered: parameters dealt out in backward's order (overlap needs it); balanced: largest first (old checkpoints)
    placement: str = "ordered"


@dataclass
class CompressionConfig:
    """Gradient compression on the data-parallel or parameter-server exchange."""

    gradient: str = "none"  # gradient codec on the wire (docs/compression.md)
    topk_ratio: float = 0.01  # topk: share of gradient entries sent
    powersgd_rank: int = 2  # powersgd: rank of the low-rank factors
    powersgd_vectors: str = "fp32"  # how PowerSGD sends the tensors it cannot factor (biases, norms)
    powersgd_exchange: str = "allreduce"  # all-reduce of shared factors P, Q, or all-gather of each rank's own
    powersgd_iterations: int = 1  # power iterations per step; > 1 only where a sender factorizes alone
    error_feedback: bool = True  # add what compression dropped to the next step's gradient
    int8_chunk: int = 1024  # int8: elements per scale
    int8_rounding: str = "nearest"  # int8: round to nearest, or stochastically (unbiased)
    fallback_factor: float = 2.0  # send uncompressed when a loss exceeds this times the recent mean
    fallback_window: int = 20  # steps in that recent mean
    fallback_steps: int = 20  # steps sent uncompressed after a fallback; 0 disables the safeguard
    warmup_steps: int = 0  # first steps compressed less (top-k: 25% -> 6.25% -> ... -> topk_ratio; else none)


@dataclass
class CheckpointConfig:
    """When checkpoints are written and what a run resumes from."""

    every: int = 0  # steps between checkpoints; 0: only at the end (if keep > 0)
    keep: int = 2  # newest checkpoints kept; 0: none written
    resume: bool = False  # continue from the newest checkpoint in the run directory
    path: str = ""  # resume from this checkpoint dir instead of the newest in run dir


@dataclass
class DebugConfig:
    """Fault and straggler injection and test switches, for tests and demonstrations (-1: off)."""

    delay_rank: int = -1  # this worker sleeps delay_ms every step (a straggler)
    delay_ms: float = 0.0  # the straggler's delay per step
    kill_rank: int = -1  # this worker SIGKILLs itself at kill_at_step
    kill_at_step: int = -1  # step at which kill_rank dies
    kill_server: int = -1  # this parameter server SIGKILLs itself at kill_server_at_step
    kill_server_at_step: int = -1  # step at which kill_server dies
    hang_rank: int = -1  # this worker stops making progress at hang_at_step (watchdog test)
    hang_at_step: int = -1  # step at which hang_rank hangs
    float8_on_cpu: bool = False  # let train.float8 run on the CPU (torch's float8 matmul, slow): to test the GPU path


_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "ps": PSConfig,
    "compression": CompressionConfig,
    "checkpoint": CheckpointConfig,
    "debug": DebugConfig,
}

@dataclass
class Config:
    """The whole configuration of one run; docs/config.md lists what each key means."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def default(cls) -> Config:
        """The built-in default: a small GPT on the stdlib corpus, 2 data-parallel workers."""
        cfg = cls()
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: typing.Sequence[str] = (), *,
                  own_model: bool = True) -> Config:
        """Build from nested dicts (as TOML gives) plus overrides: ``--section.key=value``, or
        ``--section.key`` followed by the value as the next item (``own_model``: see :meth:`validate`)."""
        cfg = cls()
        items: list[tuple[str, str, Any]] = []
        for section, table in data.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section [{section}]{suggest(section, _SECTIONS)}")
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] must be a table of key = value")
            items += [(section, k, v) for k, v in table.items()]
        pairs, rest = split_overrides(overrides)
        if rest:
            raise ConfigError(f"override '{rest[0]}' must look like --section.key=value (or --section.key value)")
        items += [parse_override(o) for o in pairs]
        for section, key, value in items:
            cfg.set(section, key, value)
        cfg.validate(own_model=own_model)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
             own_model: bool = True) -> Config:
        """Load a TOML file (or the defaults when ``path`` is None) and apply overrides
        (``own_model=False``: the model will be your own, see :meth:`validate`)."""
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file '{path}' not found")
            try:
                data = tomllib.loads(p.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                  f"offset {e.start}); save it as UTF-8") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
        return cls.from_dict(data, overrides, own_model=own_model)

    def set(self, section: str, key: str, value: Any) -> None:
        """Set one key with type checking (no cross-field validation)."""
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section [{section}]{suggest(section, _SECTIONS)}")
        types = config_checks.field_types(_SECTIONS[section])
        if key not in types:
            raise ConfigError(f"unknown key {section}.{key}{suggest(key, types)}")
        setattr(getattr(self, section), key, config_checks.coerce(f"{section}.{key}", value, types[key]))

    # ---- derived values ----------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    @property
    def dp(self) -> int:
        p = self.parallel
        return p.dp or max(1, p.nproc // (p.tp * p.pp))

    # ---- validation ----------------------------------------------------------------------
    def validate(self, *, own_model: bool = True) -> None:
        """Check types, ranges, choices and combinations; raise ConfigError on the first problem.

        ``own_model=False``: the model is not built from ``[model]`` (``paratrain.train(model=...)``),
        so the checks of how paratrain's GPT is pipelined (:meth:`check_model_layout`) are skipped."""
        for section, cls in _SECTIONS.items():
            obj = getattr(self, section)
            for key, typ in config_checks.field_types(cls).items():
                value = config_checks.coerce(f"{section}.{key}", getattr(obj, key), typ)
                config_checks.check_finite(section, key, value)
                setattr(obj, key, value)
                config_checks.check_field(f"{section}.{key}", value, config_checks.CHOICES.get((section, key)),
                                          config_checks.RANGES.get((section, key), (None, None)))
        config_checks.check_combinations(self)
        self._validate_more()
        if own_model:
            self.check_model_layout()

    def check_model_layout(self) -> None:
        """How paratrain's own model (``[model]``) is pipelined; skipped for a model of your own."""
        config_checks.check_model_layout(self)

    def _validate_more(self) -> None:
        """Hook for checks owned by other subsystems (model parallel, PS, compression)."""
        for check in EXTRA_CHECKS:
            check(self)

    # ---- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in _SECTIONS}

    def to_toml(self) -> str:
        """The fully resolved config as TOML text (what goes into the run dir)."""
        lines: list[str] = []
        for section, table in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in table.items():
                if (section, key) in _SECRET_KEYS:
                    value = ""  # never written to disk; the launcher passes it through the environment
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


_SECRET_KEYS = {("ps", "secret")}

# Validators registered by subsystems: each takes a Config and raises ConfigError.
EXTRA_CHECKS: list[typing.Callable[[Config], None]] = []

