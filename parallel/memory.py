"""Per-rank memory model of a training step, from the rank's built (meta) model.

``estimate_memory(model_cfg, pcfg, tcfg, pm)`` — the model config, the parallel and
trainer configs and the ``ParallelModel`` that ``parallelize(..., materialize=False)``
built for this rank (its meta parameters carry the exact local shapes after PP, EP/ETP,
TP and FSDP) — returns a :class:`MemoryReport`. The dry run (trainer/dry_run.py) writes
it to ``memory.json``; see docs/memory.md for the formulas and their check against
measurement (tests/test_memory.py).

Precision (``tcfg.precision``; ``auto`` counts as bf16 — what a GPU run uses):

- ``fp32``: params 4 B, grads 4 B, AdamW exp_avg + exp_avg_sq 8 B per stored element;
  activations 4 B per element.
- ``bf16``: bf16 params 2 B and grads 2 B, fp32 master weights + the two fp32 Adam
  moments 12 B (Megatron's mixed precision; the trainer's autocast keeps fp32 params
  and grads instead — 4 + 4 + 8, the same 16 B per element, split differently);
  activations 2 B per element (norms, softmax statistics, the loss and the Mamba scan
  stay fp32 in either precision).

Activations are the tensors autograd saves for backward, per micro-batch, summed over
this rank's layers (formulas in :func:`layer_activation_bytes`), times the micro-batches
in flight at the pipeline's peak (``pipeline.in_flight``); with activation checkpointing
a block keeps only its input, plus one block's full activations while it is recomputed.
Buffers are the transient communication/working buffers at the peak: FSDP's unsharded
parameters and gradients, the EP dispatch buffers, the TP/SP gathered stream, the
logits and the pipeline's send/receive buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models.layers import FeedForward
from models.mamba import MambaBlock
from models.mla import MultiHeadLatentAttention
from models.moe import MoELayer
from models.mot import MoTBlock
from models.transformer import TransformerBlock
from parallel.pipeline import in_flight

__all__ = ["MemoryReport", "estimate_memory", "layer_activation_bytes", "local_numel"]

GIB = 1024 ** 3


@dataclass
class MemoryReport:
    rank: int
    world_size: int
    precision: str
    layout: str
    params_numel: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_per_microbatch_bytes: int
    microbatches_in_flight: float
    recompute_bytes: int
    activations_bytes: int
    buffers_bytes: int
    total_bytes: int
    activations_by_layer: dict[str, int] = field(default_factory=dict)
    buffers: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [("params", self.params_bytes), ("grads", self.grads_bytes),
                ("optimizer", self.optimizer_bytes), ("activations", self.activations_bytes),
                ("buffers", self.buffers_bytes), ("total", self.total_bytes)]
        head = (f"memory of rank {self.rank}/{self.world_size} ({self.layout}, "
                f"{self.precision}): {self.params_numel:,} parameter elements stored; "
                f"{self.microbatches_in_flight:g} micro-batches in flight")
        return "\n".join([head] + [f"  {k:<12} {v / GIB:10.3f} GiB" for k, v in rows])


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank stores for ``t`` (a DTensor's local shard; works on meta)."""
    return (t.to_local() if isinstance(t, DTensor) else t).numel()


def _unwrap(block: nn.Module) -> nn.Module:
    return getattr(block, "_checkpoint_wrapped_module", block)


def _precision(tcfg: Any) -> str:
    p = getattr(tcfg, "precision", "fp32")
    return "bf16" if p in ("bf16", "auto") else "fp32"


@dataclass
class _Shape:
    """What the formulas need about the rank's slice of one micro-batch."""
    a: int  # bytes per activation element
    t: int  # tokens of the micro-batch on this rank (after CP)
    tp: int
    cp: int
    sp: bool
    ep: int
    etp: int

    @property
    def t_stream(self) -> int:  # tokens of the residual stream held by this rank
        return self.t // self.tp if self.sp else self.t


def _attention_bytes(attn: nn.Module, h: int, s: _Shape) -> int:
    """Input to q/k/v (the gathered stream under SP: every token), q, k, v after RoPE,
    the attention output (the input of wo, a view) and fp32 log-sum-exp per head; under
    CP the all-gathered K/V of the whole sequence are saved too."""
    if isinstance(attn, MultiHeadLatentAttention):
        return _mla_bytes(attn, h, s)
    H, Hkv = attn.num_heads // s.tp, attn.num_kv_heads // s.tp
    hd = attn.head_dim
    q, kv = H * hd, Hkv * hd
    local = s.t * (s.a * (h + 2 * q + 2 * kv) + 4 * H)
    gathered = s.t * s.cp * s.a * 2 * kv if s.cp > 1 else 0
    return local + gathered


def _mla_bytes(attn: MultiHeadLatentAttention, h: int, s: _Shape) -> int:
    """MLA: the (gathered) block input, the q and kv latents through their fp32 RMSNorms
    and the normed latents (inputs of the up projections; replicated, every TP rank holds
    them whole), q and k after RoPE (``qk_nope + qk_rope`` per local head), v and the
    attention output (``v_head`` each, ``qk`` with ``pad_v``), fp32 log-sum-exp per head;
    under CP the all-gathered K and V of the whole sequence. Assumes a fused attention
    kernel (no [T, T] probabilities saved): on CPU that needs ``model.mla.pad_v`` when
    ``v_head < qk``, else SDPA's math fallback also saves B*H*T*T floats per layer."""
    H = attn.num_heads // s.tp
    qk = attn.qk_dim
    dv = qk if attn.pad_v else attn.v_dim
    qr, kvr = attn.q_lora_rank, attn.kv_lora_rank
    latents = _norm_bytes(kvr, s.t) + s.t * s.a * kvr
    if qr:
        latents += _norm_bytes(qr, s.t) + s.t * s.a * qr
    local = s.t * (s.a * (h + 2 * H * qk + 2 * H * dv) + 4 * H) + latents
    gathered = s.t * s.cp * s.a * H * (qk + dv) if s.cp > 1 else 0
    return local + gathered


def _norm_bytes(h: int, tokens: int) -> int:
    """RMSNorm in fp32: its fp32 input, rsqrt, the normalised input (8h + 4 B/token)."""
    return tokens * (8 * h + 4)


def _ffn_bytes(h: int, ffn: int, tokens: int, a: int) -> int:
    """SwiGLU: input, w1 and w3 outputs, silu output, their product (h + 4F elements)."""
    return tokens * a * (h + 4 * ffn)


def _routed_rows(layer: MoELayer, s: _Shape) -> int:
    """Expert rows of one rank: T*k of its routed tokens, times the capacity factor when
    padded to capacity; ETP all-gathers its members' rows."""
    m = layer.moe
    rows = s.t // s.tp * m.top_k  # TP (and SP) ranks route their own 1/tp of the tokens
    if m.capacity_factor and m.capacity_factor > 0 and getattr(m, "pad_to_capacity", False):
        rows = math.ceil(rows * m.capacity_factor)
    return rows * s.etp


def _expert_swiglu_bytes(layer: MoELayer, s: _Shape) -> int:
    """The SwiGLU intermediates (w1 and w3 outputs, silu, product: 4F per row) of the routed
    experts' local FFN slice and of the shared experts (a sequence-parallel MLP over the
    rank's tokens): what a recompute of the experts drops."""
    out = s.a * _routed_rows(layer, s) * 4 * layer.experts.w1.shape[2]  # F / etp
    if layer.shared_experts is not None:
        out += s.a * s.t * 4 * _local_rows(layer.shared_experts.w1.weight)  # F_shared / tp
    return out


def _moe_bytes(layer: MoELayer, h: int, s: _Shape) -> int:
    """Router (fp32 logits/probabilities/statistics, ~3E floats + k ids and weights per
    token), the routed rows (:func:`_routed_rows`) with the expert slice's SwiGLU and the
    combine's input, the shared experts (their SwiGLU; their input gathered over TP)."""
    m = layer.moe
    t = s.t // s.tp
    routed = s.a * _routed_rows(layer, s) * 2 * h
    router = t * (4 * 3 * m.num_experts + 12 * m.top_k)
    shared = s.a * s.t * h if layer.shared_experts is not None and s.tp > 1 else 0
    return (routed + _expert_swiglu_bytes(layer, s) + router + shared + s.a * t * h
            + _ep_received_bytes(layer, h, s, t))


def _ep_received_bytes(layer: MoELayer, h: int, s: _Shape, t: int) -> int:
    """EP: the token rows a rank received, kept for the expert rows' gather backward —
    all-to-all sends a token once per distinct destination rank with dedup (expected
    ``ep * (1 - C(E - E/ep, k) / C(E, k))`` of them), k times without; all-gather keeps
    every EP rank's tokens."""
    if s.ep == 1:
        return 0
    inner = getattr(layer.dispatcher, "inner", layer.dispatcher)
    m = layer.moe
    if type(inner).__name__ == "AllGatherDispatcher":
        return s.a * t * s.ep * h
    if getattr(inner, "dedup", False):
        E, k = m.num_experts, m.top_k
        units = s.ep * (1 - math.comb(E - E // s.ep, k) / math.comb(E, k))
    else:
        units = m.top_k
    return int(s.a * t * units * h)


def _local_rows(w: torch.Tensor) -> int:
    return (w.to_local() if isinstance(w, DTensor) else w).shape[0]


def _mamba_bytes(block: MambaBlock, h: int, s: _Shape) -> int:
    """The chunked reference scan recomputes its fp32 [T, d_inner, N] intermediates in
    backward (models/mamba.py ``selective_scan(recompute=True)``), keeping only its inputs;
    the projections, conv, gates, dt and those inputs take about 15 d_inner per token
    (fitted on CPU; docs/memory.md)."""
    mx = block.mixer
    di = mx.d_inner // s.tp
    scan = 0
    rest = 4 * 14.8 * di
    return int(s.t * (scan + rest)) + _norm_bytes(h, s.t_stream)


def layer_activation_bytes(block: nn.Module, model_cfg: Any, s: _Shape) -> int:
    """Bytes one micro-batch leaves saved for backward in one block (no checkpointing)."""
    block = _unwrap(block)
    h = model_cfg.hidden_size
    if isinstance(block, MambaBlock):
        return _mamba_bytes(block, h, s)
    norms = 2 * _norm_bytes(h, s.t_stream)
    if isinstance(block, MoTBlock):
        # per-modality projections: the modality-sorted copies of the input and output
        # rows (~3h per token more than a dense block), branch-output norms
        total = norms + _attention_bytes(block.attention, h, s) + s.t * s.a * 3 * h
        ffn = block.ffn
        if getattr(ffn, "moe", None) is not None and getattr(ffn, "dense", True) is False:
            return total + _moe_bytes(ffn.moe, h, s)
        w = block.ffn.w1.weight if hasattr(block.ffn, "w1") else None
        width = (w.to_local() if isinstance(w, DTensor) else w).shape[-1] if w is not None \
            else model_cfg.ffn_hidden_size // s.tp
        return total + _ffn_bytes(h, width, s.t, s.a)
    assert isinstance(block, TransformerBlock), type(block)
    total = norms + _attention_bytes(block.attention, h, s)
    if isinstance(block.ffn, MoELayer):
        return total + _moe_bytes(block.ffn, h, s)
    assert isinstance(block.ffn, FeedForward)
    return total + _ffn_bytes(h, model_cfg.ffn_hidden_size // s.tp, s.t, s.a)


def stepped_recompute_bytes(block: nn.Module, model_cfg: Any, s: _Shape) -> tuple[int, int]:
    """(kept, recomputed) bytes of one block under activation checkpointing in the
    two-batch overlap's stepped forward: the attention (with its norm) and the experts'
    SwiGLUs (routed and shared), or a dense block's FFN (with its norm), are recomputed;
    their inputs, the router, the exchanged rows and the combine's inputs are kept."""
    block = _unwrap(block)
    h = model_cfg.hidden_size
    kept = s.t_stream * s.a * h  # the block input, saved by the attention's checkpoint
    if isinstance(block, MambaBlock):  # called whole: wrapped, keeps its input
        return kept, layer_activation_bytes(block, model_cfg, s)
    attention = _norm_bytes(h, s.t_stream) + _attention_bytes(block.attention, h, s)
    if isinstance(block, MoTBlock):
        # the attention branch (with two of the three modality-sorted copies) and the
        # dense modalities' SwiGLU are recomputed; the FFN input and norm, and an MoE
        # layer's router, exchanged rows and combine inputs, are kept
        attention += s.t * s.a * 2 * h
        ffn = layer_activation_bytes(block, model_cfg, s) - attention - _norm_bytes(
            h, s.t_stream)
        moe = block.ffn.moe
        moe_kept = 0 if moe is None else _moe_bytes(moe, h, s) - _expert_swiglu_bytes(moe, s)
        return (kept + s.t_stream * s.a * h + _norm_bytes(h, s.t_stream) + moe_kept,
                max(attention, ffn))
    if not isinstance(block.ffn, MoELayer):
        ffn = _norm_bytes(h, s.t_stream) + _ffn_bytes(h, model_cfg.ffn_hidden_size // s.tp,
                                                      s.t, s.a)
        return kept + s.t_stream * s.a * h, max(attention, ffn)
    experts = _expert_swiglu_bytes(block.ffn, s)
    moe_kept = _norm_bytes(h, s.t_stream) + _moe_bytes(block.ffn, h, s) - experts
    return kept + moe_kept, max(attention, experts)


def _ends_bytes(model: nn.Module, model_cfg: Any, s: _Shape) -> dict[str, int]:
    h, V = model_cfg.hidden_size, model_cfg.vocab_size
    out = {}
    if getattr(model, "tok_embeddings", None) is not None:
        out["embedding"] = s.t * 8  # the int64 token ids
    if getattr(model, "norm", None) is not None:
        # final norm, the head's input (gathered under SP), fp32 log-softmax of the
        # (vocab-sharded) logits for the cross entropy
        out["head"] = _norm_bytes(h, s.t_stream) + s.t * s.a * h + s.t * 4 * (V // s.tp)
    return out


def _shape(model_cfg: Any, pcfg: Any, tcfg: Any, dims: Any, a: int) -> _Shape:
    return _Shape(a=a, t=tcfg.micro_batch_size * tcfg.seq_len // dims.cp, tp=dims.tp,
                  cp=dims.cp, sp=bool(pcfg.sequence_parallel), ep=dims.ep, etp=dims.etp)


def activation_bytes(model: nn.Module, model_cfg: Any, pcfg: Any, tcfg: Any, dims: Any,
                     a: int) -> tuple[dict[str, int], int]:
    """(saved bytes per micro-batch by layer, the recompute peak): all of this rank's
    blocks and ends; with activation checkpointing a block keeps only its input (under
    the two-batch overlap: what :func:`stepped_recompute_bytes` keeps)."""
    s = _shape(model_cfg, pcfg, tcfg, dims, a)
    h = model_cfg.hidden_size
    by_layer, recompute = {}, 0
    stepped = bool(getattr(pcfg, "two_batch_overlap", False))
    for name, block in model.layers.items():
        if pcfg.activation_checkpointing and stepped:
            kept, again = stepped_recompute_bytes(block, model_cfg, s)
            by_layer[f"layer {name}"] = kept
            recompute = max(recompute, again)
            continue
        full = layer_activation_bytes(block, model_cfg, s)
        if pcfg.activation_checkpointing:
            by_layer[f"layer {name}"] = s.t_stream * s.a * h
            recompute = max(recompute, full)
        else:
            by_layer[f"layer {name}"] = full
    by_layer.update(_ends_bytes(model, model_cfg, s))
    return by_layer, recompute


def _buffers(model: nn.Module, model_cfg: Any, pcfg: Any, tcfg: Any, dims: Any,
             a: int, pbytes: int, num_micro: int = 1) -> dict[str, int]:
    s = _shape(model_cfg, pcfg, tcfg, dims, a)
    h, V = model_cfg.hidden_size, model_cfg.vocab_size
    out: dict[str, int] = {}
    fsdp = pcfg.dp_engine == "fsdp" and max(dims.dp * dims.cp, dims.edp) > 1
    if fsdp:
        blocks = [sum(local_numel(p) for p in b.parameters()) for b in model.layers.values()]
        shards = max(dims.dp * dims.cp, 1)
        if dims.pp > 1:  # parameters stay gathered from the forward to the last backward
            out["fsdp_unsharded_params"] = sum(blocks) * shards * pbytes
            out["fsdp_unsharded_grads"] = max(blocks, default=0) * shards * pbytes
        else:
            # the current block and the prefetched ones (parallel.fsdp_prefetch blocks
            # ahead; FSDP2's implicit order prefetches one in backward)
            ahead = max(1, int(getattr(pcfg, "fsdp_prefetch", 1)))
            biggest = sorted(blocks, reverse=True)[: 1 + ahead]
            out["fsdp_unsharded_params"] = sum(biggest) * shards * pbytes
            if num_micro > 1 and getattr(pcfg, "fsdp_grad_sync", "last") == "last":
                # no reduce-scatter before the last micro-batch: every block keeps its
                # unsharded gradients (fp32) from the first backward to the last
                out["fsdp_unsharded_grads"] = sum(blocks) * shards * 4
            else:  # one block's gradients between its backward and its reduce-scatter
                out["fsdp_unsharded_grads"] = max(blocks, default=0) * shards * pbytes
    moe = [_unwrap(b).ffn for b in model.layers.values()
           if isinstance(getattr(_unwrap(b), "ffn", None), MoELayer)]
    if moe and dims.ep * dims.etp > 1:
        rows = s.t // s.tp * moe[0].moe.top_k * dims.etp
        # send + receive of one layer; the two-batch overlap holds a second micro-batch's
        pair = 2 if getattr(pcfg, "two_batch_overlap", False) else 1
        out["ep_dispatch"] = pair * 2 * rows * h * a
    if dims.tp > 1:
        out["tp_gather"] = s.t * h * a
    if getattr(model, "output", None) is not None or getattr(model, "norm", None) is not None:
        out["logits"] = s.t * (V // s.tp) * a
    if dims.pp > 1:  # send + receive of one pipeline micro-batch (a pair: two-batch)
        pairs = 2 if getattr(pcfg, "two_batch_overlap", False) else 1
        out["pp_p2p"] = pairs * 2 * s.t_stream * h * a
    return out


def estimate_memory(model_cfg: Any, pcfg: Any, tcfg: Any, pm: Any) -> MemoryReport:
    """The per-rank memory report of this rank's built model (see module docstring)."""
    dims, model = pm.dims, pm.model
    precision = _precision(tcfg)
    pbytes, gbytes, obytes, a = (4, 4, 8, 4) if precision == "fp32" else (2, 2, 12, 2)
    seen, numel = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            numel += local_numel(p)
    by_layer, recompute = activation_bytes(model, model_cfg, pcfg, tcfg, dims, a)
    per_mb = sum(by_layer.values())
    if pm.pp_split is not None:
        pairs = 2 if getattr(pcfg, "two_batch_overlap", False) else 1  # pairs: PP's unit
        flight = pairs * in_flight(pcfg.pp_schedule, dims.pp, dims.pp_rank,
                                   pm.num_micro // pairs, pcfg.vpp)
    elif getattr(pcfg, "two_batch_overlap", False) and pm.num_micro > 1:
        flight = 2.0  # a pair's forwards run before its one backward (parallel/runner.py)
    else:
        flight = 1.0
    acts = int(per_mb * flight) + recompute
    buffers = _buffers(model, model_cfg, pcfg, tcfg, dims, a, pbytes,
                       int(getattr(pm, "num_micro", 1) or 1))
    params, grads, opt = numel * pbytes, numel * gbytes, numel * obytes
    total = params + grads + opt + acts + sum(buffers.values())
    return MemoryReport(
        rank=dims.rank, world_size=dims.world_size, precision=precision,
        layout=dims.describe().splitlines()[0] if hasattr(dims, "describe") else "",
        params_numel=numel, params_bytes=params, grads_bytes=grads, optimizer_bytes=opt,
        activations_per_microbatch_bytes=per_mb, microbatches_in_flight=flight,
        recompute_bytes=recompute, activations_bytes=acts,
        buffers_bytes=sum(buffers.values()), total_bytes=total,
        activations_by_layer=by_layer, buffers=buffers)
