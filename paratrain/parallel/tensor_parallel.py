"""Tensor parallel (Megatron style) as declarative DTensor plans, one per model arch.

Inside a block, attention's ``q_proj``/``k_proj``/``v_proj`` are split column-wise (each rank
owns ``n_head / tp`` heads; the model takes the local head count from the shapes) and
``out_proj`` row-wise; the FFN's ``fc1`` column-wise and ``fc2`` row-wise.  Llama's blocks
split the same way under their own names: ``q/k/v_proj`` column-wise, ``o_proj`` row-wise,
SwiGLU's ``gate_proj``/``up_proj`` column-wise and ``down_proj`` row-wise.  With grouped-query
attention ``k_proj``/``v_proj`` have ``n_kv_head`` heads, so each rank gets ``n_kv_head / tp``
of them and the ``n_head / tp`` query heads that use them (``tp`` must divide ``n_kv_head``;
the config check says so).  One all-reduce in the forward and one in the backward per
sub-layer.  The token embedding is
vocab-parallel (row-wise over the vocabulary) and the LM head column-wise over the
vocabulary; a head tied to the embedding stays tied (both are sharded on the vocab dim).

With ``loss_parallel`` the head's output stays sharded over the vocabulary and the
cross-entropy is computed without gathering the logits (``torch.distributed.tensor.parallel.
loss_parallel``).  LayerNorms, biases of row-wise layers and positions are replicated.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from paratrain.models.blocks import DecoderBlock
from paratrain.models.llama import LlamaBlock


def split_plan(prefix: str, colwise: tuple[str, ...], rowwise: tuple[str, ...]) -> dict[str, ParallelStyle]:
    """Megatron's pair: the ``colwise`` linears split over their outputs, the ``rowwise`` ones
    over their inputs (one all-reduce of the partial sums)."""
    plan: dict[str, ParallelStyle] = {f"{prefix}.{n}": ColwiseParallel() for n in colwise}
    plan.update({f"{prefix}.{n}": RowwiseParallel() for n in rowwise})
    return plan


def attention_plan(prefix: str, out: str = "out_proj") -> dict[str, ParallelStyle]:
    """Heads split across ranks: q/k/v column-wise, the output projection row-wise."""
    return split_plan(prefix, ("q_proj", "k_proj", "v_proj"), (out,))


def ffn_plan(prefix: str) -> dict[str, ParallelStyle]:
    """The MLP's hidden dimension split across ranks: up column-wise, down row-wise."""
    return split_plan(prefix, ("fc1",), ("fc2",))


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The plan of one encoder/decoder/Llama block, relative to the block."""
    if isinstance(block, LlamaBlock):
        return {**attention_plan("attn", out="o_proj"), **split_plan("ffn", ("gate_proj", "up_proj"), ("down_proj",))}
    if isinstance(block, DecoderBlock):
        return {**attention_plan("self_attn"), **attention_plan("cross_attn"), **ffn_plan("ffn")}
    return {**attention_plan("attn"), **ffn_plan("ffn")}


def embedding_plan(loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Vocab-parallel token embedding and LM head (logits gathered unless ``loss_parallel``)."""
    head = (ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) if loss_parallel
            else ColwiseParallel(output_layouts=Replicate()))
    return {"tok_emb": RowwiseParallel(input_layouts=Replicate()), "lm_head": head}


def layer_containers(model: nn.Module) -> list[tuple[str, nn.ModuleDict]]:
    """(path, ModuleDict) of the block stacks of each arch: GPT/Llama/BERT ``layers``, seq2seq
    ``encoder.layers`` and ``decoder.layers``."""
    out = []
    for path in ("layers", "encoder.layers", "decoder.layers"):
        try:
            out.append((path, model.get_submodule(path)))
        except AttributeError:
            continue
    return out


def model_plan(model: nn.Module, loss_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The whole plan for a GPT, Llama, seq2seq or BERT model (or a pipeline chunk of one).

    Modules a pipeline chunk dropped (``tok_emb``/``lm_head`` set to None, deleted layers)
    are left out, so the same function serves every stage.
    """
    plan: dict[str, ParallelStyle] = {}
    for name, style in embedding_plan(loss_parallel).items():
        if getattr(model, name, None) is not None:
            plan[name] = style
    for path, layers in layer_containers(model):
        for key, block in layers.items():
            plan.update({f"{path}.{key}.{k}": v for k, v in block_plan(block).items()})
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh, loss_parallel: bool = False,
                          plan: dict[str, ParallelStyle] | None = None) -> nn.Module:
    """Shard ``model`` in place over ``tp_mesh`` (a 1-D DeviceMesh) by ``plan`` (default: the plan of
    paratrain's models, :func:`model_plan`); re-tie a tied LM head."""
    tied = (getattr(model, "lm_head", None) is not None and getattr(model, "tok_emb", None) is not None
            and model.lm_head.weight is model.tok_emb.weight)
    plan = plan if plan is not None else model_plan(model, loss_parallel)
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # both were distributed as Shard(0) over the vocabulary: share the one DTensor again
        model.lm_head.weight = model.tok_emb.weight
    return model
