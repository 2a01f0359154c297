"""Tensor (TP) and sequence (SP) parallelism for ``models.transformer.Transformer``.

PyTorch-native: DTensor ``parallelize_module`` plans, applied to the plain single-device
model (torchtitan's separation of model and plan; no parallel layers inside ``models/``).

Layout over the 1-D ``tp`` mesh (Megatron's TP, expressed as DTensor placements):

- ``tok_embeddings``: vocabulary-parallel (``RowwiseParallel`` on an ``nn.Embedding`` shards
  the vocab, weight ``Shard(0)``); its partial output is all-reduced (TP) or
  reduce-scattered onto the sequence dim (SP).
- attention: ``wq``/``wk``/``wv`` column-parallel (whole heads per rank, GQA kv heads split
  too, so ``num_heads`` and ``num_kv_heads`` must be multiples of tp), ``wo`` row-parallel.
  The attention core and RoPE run on the local heads over the full sequence; positions are
  never sharded (``Attention`` infers the local head count from the weight, see
  models/layers.py).
- multi-head latent attention (models/mla.py): ``q_b_proj`` (or ``q_proj``) and
  ``kv_b_proj`` column-parallel (whole heads), ``o_proj`` row-parallel; the down
  projections ``q_a_proj`` / ``kv_a_proj_with_mqa`` and their norms stay plain replicated
  tensors run on the full (gathered) block input, so their gradients are identical on
  every TP rank: each column-parallel up projection all-reduces its input gradient (the
  q / kv latents, ``q_lora_rank + kv_lora_rank`` floats per token instead of the hidden
  size), and the one RoPE key all local heads share sums its gradient over TP
  (``MultiHeadLatentAttention.shared_rope``). Only ``num_heads`` must divide by tp.
- dense ``FeedForward`` and MoE ``shared_experts``: ``w1``/``w3`` column-, ``w2`` row-parallel.
- ``output``: column-parallel with the logits kept sharded on the vocab dim (a ``Shard(-1)``
  DTensor), so :func:`tp_cross_entropy_sum` runs under ``loss_parallel`` and no rank ever
  materialises the full ``[tokens, vocab]`` logits. Tied embeddings use the same
  vocab-sharded weight for the head (see :func:`_make_tied_head_input_replicated`).
- Each TP region gathers its input once: a ``PrepareModuleInput`` turns the block input
  into a ``Replicate`` DTensor, so the backward of q/k/v (or w1/w3) sums their partial input
  gradients first and reduces once (all-reduce, or reduce-scatter under SP).

``sequence_parallel=True`` (Megatron SP): between TP regions the residual stream is sharded
on the sequence dim (dim 1); ``attention_norm``, ``ffn_norm`` and the final ``norm`` run
under ``SequenceParallel`` on the local tokens; the all-reduce of each row-parallel output
becomes a reduce-scatter and the entry of each TP region an all-gather.

MoE layers (folded under TP, as Megatron): each TP rank routes only its 1/tp slice of
every sequence — the chunk SP already gives it, or a chunk cut from the replicated stream
under plain TP (its output is all-gathered back). The router's statistics and capacity
are reduced over the TP group (``parallel.token_group.SeqChunkGroup``), so losses and
drops equal one process's; the routed experts then follow the expert mesh (EP, ETP, edp
gradient reduction); the shared experts are a sequence-parallel MLP over the rank's
tokens. The sequence length must be a multiple of tp.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from models.layers import FeedForward
from models.loss import lm_loss_sum, weighted_sum
from models.mamba import MambaBlock
from models.mla import MultiHeadLatentAttention
from models.moe import MoELayer
from models.mot import MoTBlock
from parallel.collectives import sum_backward
from parallel.dims import divisors
from parallel.mamba_parallel import apply_mamba_tensor_parallel
from parallel.mot_parallel import apply_mot_tensor_parallel
from parallel.token_group import SeqChunkGroup

__all__ = [
    "apply_tensor_parallel",
    "check_heads",
    "check_tensor_parallel",
    "grads_like_params",
    "tp_cross_entropy_sum",
]


def check_heads(num_heads: int, num_kv_heads: int, tp: int, max_tp: int) -> None:
    """Heads are never split and GQA kv heads never replicated: both counts must be
    multiples of ``tp`` (``max_tp`` bounds the valid sizes named in the error)."""
    for key, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if n % tp:
            valid = [d for d in range(1, max_tp + 1)
                     if num_heads % d == 0 and num_kv_heads % d == 0]
            raise ValueError(
                f"parallel.tp={tp} does not divide model.{key}={n} (valid tp: "
                f"{', '.join(map(str, valid))}); model.num_heads={num_heads} and "
                f"model.num_kv_heads={num_kv_heads} are both split across the TP ranks")


def _kv_heads(cfg) -> int:
    """Heads of k/v that TP splits: GQA's kv heads; MLA up-projects per query head."""
    return cfg.num_heads if getattr(cfg, "attention", "gqa") == "mla" else cfg.num_kv_heads


def check_tensor_parallel(model_cfg, tp: int, *, seq_len: int, sequence_parallel: bool,
                          world_size: int) -> None:
    """Raise ``ValueError`` (one line naming the keys and the valid values) when a model of
    ``model_cfg`` (``models.config.ModelConfig``) cannot be split over ``tp`` ranks: heads
    are never split (query and GQA kv head counts must be multiples of tp), the vocabulary
    is split evenly, MoE layers and SP split every sequence, Mamba splits d_inner."""
    m = model_cfg
    if sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if tp == 1:
        return
    check_heads(m.num_heads, _kv_heads(m), tp, max_tp=world_size)
    if m.vocab_size % tp:
        padded = -(-m.vocab_size // tp) * tp
        raise ValueError(
            f"model.vocab_size={m.vocab_size} is not a multiple of parallel.tp={tp}: the "
            f"vocabulary is split evenly across TP ranks; pad it (e.g. "
            f"model.vocab_size={padded}; ids past the tokenizer's are never targets)")
    if m.moe.num_experts and seq_len % tp:
        raise ValueError(f"trainer.seq_len={seq_len} must be a multiple of parallel.tp={tp}: "
                         "MoE layers split every sequence across the TP ranks")
    if sequence_parallel and seq_len % tp:
        raise ValueError(f"trainer.seq_len={seq_len} must be a multiple of parallel.tp={tp} "
                         "with parallel.sequence_parallel=true")
    if m.arch == "mom":
        di = m.mamba.expand * m.hidden_size
        if di % tp:
            raise ValueError(f"parallel.tp={tp} does not divide the Mamba d_inner={di} "
                             f"(valid: {divisors(di)})")


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool,
    src_data_rank: Optional[int] = 0,
) -> nn.Module:
    """Shard ``model`` (a ``Transformer``, or a pipeline stage of one) over the 1-D
    ``tp_mesh`` in place and return it.

    Forward input: full ``tokens [B, T]`` (and full ``position_ids``) on every TP rank;
    ``T`` must be a multiple of tp under SP. Output: logits as a ``Shard(-1)`` DTensor
    (vocab-sharded) when the stage has the head; hidden states otherwise (sequence-sharded
    local tensor ``[B, T/tp, D]`` under SP, full replicated tensor without).

    ``src_data_rank``: as in ``parallelize_module`` — weights are taken from that rank and
    scattered (0, the safe default), or ``None``: every rank cuts its shard from its own
    full copy (no communication; the copies must be identical, e.g. same seed). Meta
    tensors move nothing either way. Call before FSDP (FSDP2 then shards over dp_cp on top).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D tp mesh, got {tp_mesh.ndim}-D")
    tp = tp_mesh.size()
    check_heads(model.cfg.num_heads, _kv_heads(model.cfg), tp, max_tp=tp_mesh.size())
    sp = sequence_parallel
    _apply_ends_plan(model, tp_mesh, sp, src_data_rank)
    for block in model.layers.values():
        if isinstance(block, MoTBlock):  # per-modality projections: parallel/mot_parallel.py
            apply_mot_tensor_parallel(block, tp_mesh, sequence_parallel=sp)
        elif isinstance(block, MambaBlock):  # d_inner split: parallel/mamba_parallel.py
            apply_mamba_tensor_parallel(block, tp_mesh, sequence_parallel=sp)
        else:
            parallelize_module(block, tp_mesh, _block_plan(block, tp_mesh, sp),
                               src_data_rank=src_data_rank)
    grads_like_params(model)
    return model


def _stream(sp: bool):
    """The residual stream between TP regions: sequence-sharded local tensors (SP) or full
    tensors, identical on every TP rank (plain TP)."""
    return Shard(1) if sp else Replicate()


def _apply_ends_plan(model: nn.Module, tp_mesh: DeviceMesh, sp: bool,
                     src_data_rank: Optional[int]) -> None:
    """The embedding (vocab-parallel), the final norm (SP) and the head (vocab-sharded
    logits) of the stage, where it holds them."""
    stream = _stream(sp)
    plan: dict[str, object] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if getattr(model, "norm", None) is not None and sp:
        plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        plan["output"] = ColwiseParallel(
            input_layouts=stream, output_layouts=Shard(-1), use_local_output=False
        )
    if plan:
        parallelize_module(model, tp_mesh, plan, src_data_rank=src_data_rank)
    if sp and getattr(model, "tok_embeddings", None) is not None:
        model.register_forward_pre_hook(partial(_check_seq_len, tp_mesh.size()))
    if (
        getattr(model, "output", None) is None
        and getattr(model, "tie_embeddings", False)
        and getattr(model, "tok_embeddings", None) is not None
        and getattr(model, "norm", None) is not None
    ):
        _make_tied_head_input_replicated(model.norm, tp_mesh)


def _block_plan(block: nn.Module, tp_mesh: DeviceMesh, sp: bool) -> dict[str, object]:
    """The plan of a transformer block: attention heads split, the FFN column/row-parallel,
    or an MoE layer whose tokens are split over the TP ranks."""
    stream = _stream(sp)
    if isinstance(block.attention, MultiHeadLatentAttention):
        bplan = _mla_plan(block.attention, tp_mesh, stream)
    else:
        bplan = {
            "attention": PrepareModuleInput(  # (x, position_ids, doc_ids, block_ids)
                input_layouts=(stream, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
        }
    if sp:
        bplan["attention_norm"] = SequenceParallel()
        bplan["ffn_norm"] = SequenceParallel()
    ffn = block.ffn
    if isinstance(ffn, FeedForward):
        # One Replicate DTensor feeds every column-parallel linear of the region.
        bplan["ffn"] = PrepareModuleInput(input_layouts=(stream,),
                                          desired_input_layouts=(Replicate(),))
        bplan.update(_mlp_plan("ffn", output_layout=stream))
    elif isinstance(ffn, MoELayer):
        # Token split: each TP rank routes its own 1/tp of every sequence (under SP the
        # chunk it already holds; under plain TP cut from the replicated stream, and
        # the outputs all-gathered back). Router statistics and capacity are reduced
        # over the TP group, routed experts reduce over edp (which contains the TP
        # ranks); the router and shared-gate weights are plain tensors whose
        # gradients are summed over TP by ``SeqChunkGroup.shared_param``.
        if sp:
            bplan["ffn"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                use_local_output=True,
            )
        else:
            bplan["ffn"] = PrepareModuleInputOutput(
                input_layouts=(Replicate(),),
                desired_input_layouts=(Shard(1),),
                use_local_input=True,
                output_layouts=(Shard(1),),
                desired_output_layouts=(Replicate(),),
                use_local_output=True,
            )
        ffn.token_group = SeqChunkGroup(tp_mesh.get_group())
        if ffn.shared_experts is not None:
            # Inside the MoE layer the tokens are this rank's [B*T/tp, D] rows: the
            # shared experts are a sequence-parallel MLP over them.
            bplan["ffn.shared_experts"] = PrepareModuleInput(
                input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)
            )
            bplan.update(_mlp_plan("ffn.shared_experts", output_layout=Shard(0)))
    else:
        raise TypeError(f"apply_tensor_parallel: no TP plan for ffn {type(ffn).__name__}")
    return bplan


def _mla_plan(attn: MultiHeadLatentAttention, tp_mesh: DeviceMesh,
              stream) -> dict[str, object]:
    """MLA (module docstring): the block input gathered to a plain full tensor (its
    gradient is already full on every rank, so SP's backward only keeps the local chunk),
    the up projections column-parallel, ``o_proj`` row-parallel."""
    attn.shared_rope = partial(sum_backward, group=tp_mesh.get_group())
    q = "attention.q_b_proj" if attn.q_lora_rank else "attention.q_proj"
    return {
        "attention": PrepareModuleInput(
            input_layouts=(stream, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        q: ColwiseParallel(),
        "attention.kv_b_proj": ColwiseParallel(),
        "attention.o_proj": RowwiseParallel(output_layouts=stream),
    }


def grads_like_params(model: nn.Module) -> None:
    """Make every DTensor parameter's gradient arrive with the parameter's placements, so
    that a rank's local gradient is exactly the true gradient of its local shard (what
    the DP engines and the global grad norm read).

    DTensor leaves two cases otherwise: SP norm weights (``Replicate``) get ``Partial``
    gradients (each rank saw only its sequence chunk): redistributing all-reduces them
    over TP, as Megatron does for SP layer norms (here once per backward, D floats each).
    The vocab-parallel embedding's gradient comes back ``Replicate`` (the full [V, D]
    gradient, transiently, on every rank): redistributing keeps the local rows, no
    communication. FSDP2 replaces the parameters (and these hooks) and does the same
    redistribution itself before reducing.

    Meta parameters are skipped: ``to_empty`` swaps their storage, and a hook registered
    before it would not fire — nor would any registered after (DTensor ``swap_tensors``
    keeps the stale hook dict). ``parallelize`` calls this again once materialised.
    """
    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad and not p.is_meta:
            placements = p.placements

            def hook(grad: torch.Tensor, placements=placements) -> torch.Tensor:
                if isinstance(grad, DTensor) and grad.placements != placements:
                    return grad.redistribute(placements=placements)
                return grad

            p.register_hook(hook)


def _check_seq_len(tp: int, module: nn.Module, args) -> None:
    T = args[0].shape[1]
    if T % tp:
        raise ValueError(
            f"sequence parallelism needs the sequence length to be a multiple of tp: "
            f"got seq_len={T} with tp={tp}"
        )


def _mlp_plan(prefix: str, output_layout) -> dict[str, object]:
    return {
        f"{prefix}.w1": ColwiseParallel(),
        f"{prefix}.w3": ColwiseParallel(),
        f"{prefix}.w2": RowwiseParallel(output_layouts=output_layout),
    }


def _make_tied_head_input_replicated(norm: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Tied embeddings: ``Transformer.forward`` computes ``F.linear(h, tok_embeddings.weight)``
    with the vocab-sharded (``Shard(0)``) weight. Handing it ``h`` as a full ``Replicate``
    DTensor makes DTensor pick the column-parallel matmul: logits come out ``Shard(-1)``
    and the weight's gradient stays ``Shard(0)``, summed with the embedding's own."""

    def hook(module: nn.Module, args, out: torch.Tensor) -> DTensor:
        if isinstance(out, DTensor):  # SP: sequence-sharded -> all-gather
            return out.redistribute(placements=[Replicate()])
        return DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False)

    norm.register_forward_hook(hook)


class _VocabParallelCESum(torch.autograd.Function):
    """Masked sum of per-token cross entropy over vocab-sharded logits.

    Forward and backward both run under ``loss_parallel`` (its handlers replace log_softmax
    and nll_loss for DTensors sharded on the class dim: max/sum-exp/target-logit
    all-reduces over ``[tokens]`` vectors, never the full logits). Wrapping it in an
    autograd Function lets the caller run ``backward()`` anywhere, outside the context —
    ``loss_parallel`` alone requires the backward to happen inside it too.
    """

    @staticmethod
    def forward(ctx, logits: DTensor, labels: torch.Tensor, mask: torch.Tensor):
        leaf = logits.detach().requires_grad_(logits.requires_grad)
        with torch.enable_grad(), loss_parallel():
            x = leaf.float().flatten(0, -2)  # [N, V] fp32, still Shard(1)
            ce = F.cross_entropy(x, labels.reshape(-1), reduction="none")
            # Replicate over TP: every rank holds every token's loss.
            total = weighted_sum(ce.to_local(), labels, mask)
        ctx.leaf, ctx.total = leaf, total
        return total.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        leaf, total = ctx.leaf, ctx.total
        del ctx.leaf, ctx.total
        if not leaf.requires_grad:
            return None, None, None
        with loss_parallel():
            (g,) = torch.autograd.grad(total, leaf, grad)
        return g, None, None


def tp_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """``sum_t loss_mask[t] * CE(logits[t], labels[t])`` in fp32; the TP version of
    ``models.loss.lm_loss_sum``.

    ``logits``: ``[..., V]`` DTensor sharded on the vocab dim (``Shard(-1)`` on a 1-D tp
    mesh, what :func:`apply_tensor_parallel` returns); ``labels`` / ``loss_mask``: full
    plain tensors ``[...]`` on every TP rank (a label's value is only read through the
    mask, so masked positions may hold any id in range). Returns a plain scalar, equal on
    every TP rank; its ``backward()`` works inside or outside ``loss_parallel``. A plain
    (non-DTensor) ``logits`` falls back to the single-device formula.
    """
    if not isinstance(logits, DTensor):
        return lm_loss_sum(logits, labels, loss_mask)
    if isinstance(labels, DTensor) or isinstance(loss_mask, DTensor):
        raise TypeError("tp_cross_entropy_sum: labels and loss_mask must be plain tensors")
    return _VocabParallelCESum.apply(logits, labels, loss_mask)
