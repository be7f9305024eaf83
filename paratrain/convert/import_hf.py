"""``paratrain import-hf DIR``: a local Hugging Face model directory -> a paratrain run directory
holding ``config.toml`` (the matching ``[model]``, ``checkpoint.resume = true``) and the checkpoint
``checkpoints/step_0`` in the format training writes, so ``paratrain train -c RUN/config.toml``
continues from the imported weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paratrain import checkpoint as ckpt
from paratrain.config import Config
from paratrain.hf import adapter_for, gpt2, load_hf_weights
from paratrain.hf.common import model_dir, read_config
from paratrain.models import build_model

TOKENIZER = "tokenizer.json"


def run_config(hf_dir: Path, out: Path, model_keys: dict[str, Any]) -> Config:
    """The paratrain config of an imported checkpoint (the HF tokenizer when the directory has one)."""
    data: dict[str, Any] = {"seq_len": min(Config().data.seq_len, int(model_keys["max_seq_len"]))}
    if (hf_dir / TOKENIZER).is_file():
        data["tokenizer"] = f"hf:{(hf_dir / TOKENIZER).resolve()}"
    return Config.from_dict({"run": {"name": out.name, "dir": str(out)}, "model": model_keys, "data": data,
                             "checkpoint": {"resume": True}})


def import_hf(hf_dir: str | Path, out: str | Path | None = None) -> Path:
    """Convert ``hf_dir`` into a paratrain run directory (default ``runs/<name of hf_dir>``);
    returns the checkpoint directory written."""

    d = model_dir(hf_dir)
    hf = read_config(d)
    adapter = adapter_for(hf)
    keys = adapter.model_keys(hf)
    if adapter is gpt2.ADAPTER:
        gpt2.warn_approximation(hf)
    run = Path(out) if out else Path("runs") / d.name
    cfg = run_config(d, run, keys)
    model = build_model(cfg.model, cfg.model.vocab_size, int(hf.get("pad_token_id") or 0))
    load_hf_weights(model, cfg.model, d)
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.begin(root, 0)
    ckpt.save_file(tmp, "model.pt", model.state_dict())
    ckpt.save_file(tmp, "meta.json", {"step": 0, "data": {"micro_batch": 0}, "world_size": 1,
                                      "strategy": "import-hf", "arch": adapter.arch, "hf_source": str(d)})
    final = ckpt.commit(root, 0, keep=0)
    (run / "config.toml").write_text(cfg.to_toml())
    return final


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``paratrain import-hf``."""
    p.add_argument("hf_dir", help="local Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--out", help="run directory to create (default: runs/<name of HF_DIR>)")


def main(args: argparse.Namespace) -> int:
    """Run ``paratrain import-hf``."""
    final = import_hf(args.hf_dir, args.out)
    run = final.parent.parent
    print(f"imported {args.hf_dir} -> {final}; train on: paratrain train -c {run / 'config.toml'}")
    return 0
