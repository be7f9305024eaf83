"""``paratrain export-hf RUN --out DIR``: the newest checkpoint of a paratrain run (or one checkpoint
directory) -> a directory ``transformers`` loads with ``from_pretrained`` (``config.json`` +
``model.safetensors``, plus ``tokenizer.json`` when the run used an ``hf:`` tokenizer)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from paratrain import checkpoint as ckpt
from paratrain.config import Config, ConfigError
from paratrain.data.tokenizer import HFTokenizer
from paratrain.hf import adapter_for
from paratrain.hf.common import write_hf_dir


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run directory or a checkpoint directory."""

    if (path / "manifest.json").is_file():
        return path.parent.parent, path
    found = ckpt.latest(path / "checkpoints")
    if found is None:
        raise ConfigError(f"'{path}' is neither a run directory with checkpoints nor a checkpoint directory")
    return path, found


def export_hf(run_or_ckpt: str | Path, out: str | Path) -> Path:
    """Write the HF directory ``out`` from a run's newest checkpoint (or a given checkpoint)."""

    run, path = find_checkpoint(Path(run_or_ckpt))
    if not (run / "config.toml").is_file():
        raise ConfigError(f"run directory {run} has no config.toml; export needs the run's [model]")
    cfg = Config.load(run / "config.toml", ['--model.init_from=""'])  # the starting weights need not exist now
    ckpt.verify(path)
    meta = ckpt.load_file(path, "meta.json")
    if meta.get("arch") != cfg.model.arch:
        raise ConfigError(f"checkpoint {path} holds a {meta.get('arch')!r} model, not paratrain's "
                          f"{cfg.model.arch!r}; a model of your own exports with RunResult.export_safetensors")
    if not (path / "model.pt").is_file():
        raise ConfigError(f"checkpoint {path} has no model.pt (full state dict) to export")
    adapter = adapter_for(arch=cfg.model.arch)
    state = ckpt.load_file(path, "model.pt")
    vocab = int(state["tok_emb.weight"].shape[0])
    config = {**adapter.hf_config(cfg.model, vocab), "bos_token_id": None, "eos_token_id": None}
    target = Path(out)
    tok = cfg.data.tokenizer
    if tok.startswith("hf:"):

        loaded = HFTokenizer.load(tok[3:])
        config.update(bos_token_id=loaded.bos_id, eos_token_id=loaded.eos_id, pad_token_id=loaded.pad_id)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(loaded.path, target / "tokenizer.json")
    write_hf_dir(target, config, adapter.to_hf(state, cfg.model))
    return target


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``paratrain export-hf``."""
    p.add_argument("run", help="run directory (its newest checkpoint) or one checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write (config.json + model.safetensors)")


def main(args: argparse.Namespace) -> int:
    """Run ``paratrain export-hf``."""
    out = export_hf(args.run, args.out)
    print(f"exported {args.run} -> {out} (transformers: AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0
