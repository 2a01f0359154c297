"""Analytic step-time model of one training step for a folded layout (docs/planner.md).

``step_time(model_cfg, layout, hw, seq_len, global_batch_size)`` returns a
:class:`StepEstimate`: the step time in seconds, the MFU, and the breakdown (seconds per
term). Every term is per rank and per step; ``a`` = 2 bytes (bf16 activations), ``h`` the
hidden size, ``t = mbs * seq_len / cp`` the tokens of one micro-batch on one rank,
``m = gbs / (mbs * dp)`` the micro-batches per step, ``L`` this rank's layers
(``num_layers / pp``), ``L_moe`` its MoE layers. ``fwd_passes`` = 1, or 2 with full
activation recompute (every forward collective and the forward FLOPs are repeated).

- compute: ``gbs * seq_len * F * (1 + 1/3 recompute) / (W * peak * achievable)``, F the
  training FLOPs per token of ``models.flops.training_flops_per_token`` (6N + attention;
  recompute adds one forward = 2N of 6N).
- tp: TP+SP per layer 2 all-gathers + 2 reduce-scatters of ``[t, h]`` in the forward and
  as many in the backward: ``(2 fwd_passes + 2) * 2 * (tp-1)/tp * t*h*a * L * m / bw``;
  exposed fully (no TP overlap is modelled).
- cp: all-gather of K and V per attention layer (forward), reduce-scatter of their
  gradients (backward): ``(fwd_passes + 1) * (cp-1) * t * kv_width * a * L * m / bw``
  (``kv_width``: ``2*kv_heads*head_dim``, or MLA's ``heads*(qk_nope+qk_rope+v_head)``).
- ep: all-to-all dispatch + combine per MoE layer, forward and backward; the rank routes
  ``t/tp`` tokens (TP ranks split the tokens), each sent once per distinct destination rank
  other than itself: ``units = ep * (1 - C(E - E/ep, k) / C(E, k)) * (ep-1)/ep`` with dedup
  (uniform routing: every k-subset equally likely), ``k * (ep-1)/ep`` without, ``ep - 1``
  (whole token rows) for all-gather: ``bytes = 2 * (fwd_passes + 1) * t/tp * units * h*a *
  L_moe * m``; the intra-node share of the destinations goes at NVLink, the rest at the
  NIC; the two run concurrently (time = the slower). Part of it is hidden (reported in
  ``StepEstimate.hidden``, not summed): with ``parallel.overlap`` the dispatch (and its
  reverse in backward) travels while the shared experts run, so up to half of the
  exchange hides behind their compute (their share of F); with the two-batch overlap
  (``Layout.two_batch``) every exchange of a paired micro-batch travels during
  the other one's work, so it hides behind the compute of the MoE blocks
  (``F - 6 h V``, the head, times ``L_moe / L``); an odd last micro-batch runs alone.
  Exposed ``ep`` = the exchange minus what hides.
- etp: the ETP all-gather of the routed rows and the reduce-scatter of their outputs:
  ``2 * (fwd_passes + 1) * (etp-1) * t/tp * k * h*a * L_moe * m / bw``.
- dp: FSDP: reduce-scatter of the gradients (fp32, 4 B) and all-gather of the bf16 params
  (twice per step with pp = 1 and reshard after forward, once with pp > 1): dense params of
  the rank over ``dp*cp`` ranks, experts over ``edp``: ``(n-1)/n * numel * bytes / bw``;
  only ``DP_EXPOSED`` of it is exposed (the rest overlaps with compute). The two-batch
  overlap's last pair reduce-scatters twice (once per micro-batch) without PP.
- pp_bubble: ``busy * f / (1 - f)`` with ``f = parallel.pipeline.bubble_fraction`` (of
  ``m / 2`` pipeline micro-batches under the two-batch overlap, which runs pairs).
- pp_p2p: per micro-batch and virtual stage boundary one ``[t/tp(SP), h]`` send forward and
  one backward: ``2 * vpp * m * t_stream*h*a / bw``.

Not modelled: kernel efficiency of small GEMMs (micro-batch size, ETP's narrower expert
GEMMs), routing imbalance (time of the busiest expert), the optimizer step, overlap of
TP/ETP collectives with compute, the collectives' own slowdown of the kernels they run
beside (SM and memory-bandwidth contention), the pipeline's stage imbalance (embedding
and head).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from models.config import experts_per_layer, moe_layer_pattern
from models.flops import param_counts, training_flops_per_token
from parallel.pipeline import bubble_fraction

__all__ = ["ACT_BYTES", "DP_EXPOSED", "Hardware", "Layout", "StepEstimate",
           "ep_units_per_token", "ep_bytes_per_layer", "step_time"]

ACT_BYTES = 2  # bf16 activations on the wire
GRAD_BYTES = 4  # fp32 gradient reduction (Megatron's default main grads)
# Share of the FSDP/DP traffic not hidden behind compute. Megatron / FSDP2 prefetch the
# next all-gather and overlap reduce-scatter with the backward; the last bucket of the
# backward and the first gather of the step stay exposed. 0.2 is an assumption.
DP_EXPOSED = 0.2


@dataclass(frozen=True)
class Hardware:
    """Per-GPU numbers (GB/s are 1e9 bytes/s per GPU per direction)."""
    peak_flops: float  # dense bf16 FLOP/s
    achievable: float  # fraction of the peak the model's matmuls reach
    gpus_per_node: int
    intra_gbps: float
    inter_gbps: float
    memory_gib: float


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    vpp: int = 1
    pp_schedule: str = "1f1b"
    ep: int = 1
    etp: int = 1
    micro_batch_size: int = 1
    recompute: bool = False
    dispatcher: str = "alltoall"
    dedup: bool = True
    overlap: bool = True  # parallel.overlap: shared experts run while the dispatch travels
    two_batch: bool = False  # parallel.two_batch_overlap

    @property
    def dp(self) -> int:
        return self.world // (self.pp * self.cp * self.tp)

    @property
    def edp(self) -> int:
        return self.world // (self.pp * self.ep * self.etp)


@dataclass
class StepEstimate:
    step_time_s: float
    mfu: float
    breakdown: dict[str, float] = field(default_factory=dict)
    # communication hidden behind compute (seconds; not in the step time): "ep"
    hidden: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ep_units_per_token(num_experts: int, top_k: int, ep: int, dispatcher: str = "alltoall",
                       dedup: bool = True) -> float:
    """Expected rows a token is sent to *other* EP ranks in one dispatch, uniform routing."""
    if ep == 1:
        return 0.0
    if dispatcher == "allgather":
        return float(ep - 1)
    if dedup:
        E, k, El = num_experts, top_k, num_experts // ep
        distinct = ep * (1 - math.comb(E - El, k) / math.comb(E, k))
        return distinct * (ep - 1) / ep
    return top_k * (ep - 1) / ep


def ep_bytes_per_layer(tokens: int, hidden: int, units: float, elem_bytes: int = ACT_BYTES
                       ) -> float:
    """Bytes one rank sends in one MoE layer's forward dispatch + combine for ``tokens``
    routed tokens and ``units`` off-rank rows per token (measured: tests/test_planner.py
    checks ``AllToAllDispatcher.bytes_sent`` against it)."""
    return 2 * tokens * units * hidden * elem_bytes


def _span_bw(group_span: int, hw: Hardware) -> float:
    """Bandwidth of a collective over ranks ``span`` consecutive ranks wide."""
    return (hw.intra_gbps if group_span <= hw.gpus_per_node else hw.inter_gbps) * 1e9


def _layer_params(cfg: Any) -> tuple[float, float]:
    """(dense, expert) parameters of all blocks and ends, from models.flops."""
    total, _ = param_counts(cfg)
    m = cfg.moe
    expert = sum(experts_per_layer(cfg)) * 3 * cfg.hidden_size * m.expert_ffn_hidden_size
    return total - expert, expert


def cp_kv_width(cfg: Any) -> int:
    """Elements of K and V per token that CP all-gathers: ``2 * kv_heads * head_dim``
    (GQA); multi-head latent attention gathers its up-projected per-head K and V,
    ``heads * (qk_nope + qk_rope + v_head)`` (models/mla.py)."""
    if getattr(cfg, "attention", "gqa") == "mla":
        a = cfg.mla
        return cfg.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    return 2 * cfg.num_kv_heads * (cfg.head_dim or cfg.hidden_size // cfg.num_heads)


def step_time(cfg: Any, lay: Layout, hw: Hardware, seq_len: int, gbs: int) -> StepEstimate:
    """The step-time estimate of ``lay`` (module docstring)."""
    a, h, W = ACT_BYTES, cfg.hidden_size, lay.world
    m = gbs // (lay.micro_batch_size * lay.dp)
    t = lay.micro_batch_size * seq_len // lay.cp
    L = cfg.num_layers / lay.pp
    L_moe = sum(moe_layer_pattern(cfg)) / lay.pp
    fwd = 2 if lay.recompute else 1
    flops_tok = training_flops_per_token(cfg, seq_len)
    work = gbs * seq_len * flops_tok * (1 + (1 / 3 if lay.recompute else 0))
    b: dict[str, float] = {"compute": work / (W * hw.peak_flops * hw.achievable)}
    hidden: dict[str, float] = {}
    # TP (+SP): tp ranks are consecutive (tp varies fastest)
    b["tp"] = ((2 * fwd + 2) * 2 * (lay.tp - 1) / lay.tp * t * h * a * L * m
               / _span_bw(lay.tp, hw)) if lay.tp > 1 else 0.0
    b["cp"] = ((fwd + 1) * (lay.cp - 1) * t * cp_kv_width(cfg) * a * L * m
               / _span_bw(lay.cp * lay.tp, hw)) if lay.cp > 1 else 0.0
    # EP: the ep group's members are etp apart; a destination is in-node when it is
    # among the ep members inside this rank's node
    b["ep"] = 0.0
    counts = [E for E in experts_per_layer(cfg) if E]  # pyramid MoE: E differs per layer
    E, k = max(counts, default=0), cfg.moe.top_k
    if lay.ep > 1 and E:
        units = sum(ep_units_per_token(E_l, k, lay.ep, lay.dispatcher, lay.dedup)
                    for E_l in counts) / len(counts)  # mean over the MoE layers
        per_layer = ep_bytes_per_layer(t // lay.tp, h, units, a)
        total = (fwd + 1) * per_layer * L_moe * m
        in_node = max(1, min(lay.ep, hw.gpus_per_node // lay.etp))
        intra_share = (in_node - 1) / (lay.ep - 1)
        b["ep"] = max(total * intra_share / (hw.intra_gbps * 1e9),
                      total * (1 - intra_share) / (hw.inter_gbps * 1e9))
        hidden["ep"] = _ep_hidden(cfg, lay, b["ep"], b["compute"], flops_tok, m)
        b["ep"] -= hidden["ep"]
    b["etp"] = ((2 * (fwd + 1) * (lay.etp - 1) * t / lay.tp * k * h * a * L_moe * m)
                / _span_bw(lay.etp, hw)) if lay.etp > 1 and E else 0.0
    # DP / FSDP: dense shards over dp*cp (members tp apart), experts over edp
    dense, expert = _layer_params(cfg)
    gathers = 2 if lay.pp == 1 else 1
    # the two-batch overlap's last pair reduce-scatters once per micro-batch (under PP the
    # pipeline stage defers FSDP's reduction to one call after the last backward)
    reduces = 2 if lay.two_batch and lay.pp == 1 and m >= 2 else 1
    dp_s = 0.0
    for numel, n, span in ((dense / (lay.tp * lay.pp), lay.dp * lay.cp, W // lay.pp),
                           (expert / (lay.ep * lay.etp * lay.pp), lay.edp, W // lay.pp)):
        if n > 1:
            vol = (n - 1) / n * numel * (reduces * GRAD_BYTES + gathers * a)
            dp_s += vol / _span_bw(span, hw)
    b["dp"] = DP_EXPOSED * dp_s
    busy = sum(b.values())
    # under the two-batch overlap the pipeline's micro-batches are pairs
    f = bubble_fraction(lay.pp_schedule, lay.pp, m // 2 if lay.two_batch else m, lay.vpp)
    b["pp_bubble"] = busy * f / (1 - f) if f < 1 else math.inf
    t_stream = t // lay.tp if lay.tp > 1 else t
    b["pp_p2p"] = (2 * lay.vpp * m * t_stream * h * a / _span_bw(2 * W // lay.pp, hw)
                   if lay.pp > 1 else 0.0)  # neighbour stages are W/pp ranks apart
    total_s = sum(b.values())
    mfu = gbs * seq_len * flops_tok / (total_s * W * hw.peak_flops)
    return StepEstimate(step_time_s=total_s, mfu=mfu, breakdown=b, hidden=hidden)


def _ep_hidden(cfg: Any, lay: Layout, ep_s: float, compute_s: float, flops_tok: float,
               m: int) -> float:
    """Seconds of the EP exchange ``ep_s`` that travel behind compute (module docstring):
    the shared experts' share of the compute for half the exchange (``overlap``), and for
    the paired micro-batches (``two_batch``) the MoE blocks' share for all of it."""
    mo, h = cfg.moe, cfg.hidden_size
    n_moe = sum(moe_layer_pattern(cfg))
    width = mo.shared_expert_ffn_hidden_size or mo.expert_ffn_hidden_size
    n_shared = 1 if mo.residual else mo.num_shared_experts
    shared_s = compute_s * 6 * 3 * h * n_shared * width * n_moe / flops_tok
    paired = 2 * (m // 2) / m if lay.two_batch and m >= 2 else 0.0
    hid = 0.0
    if paired:
        head = 6 * h * cfg.vocab_size
        blocks_s = compute_s * max(0.0, flops_tok - head) / flops_tok * n_moe / cfg.num_layers
        hid += min(ep_s * paired, blocks_s * paired)
    if lay.overlap and n_shared:
        hid += min(ep_s * (1 - paired) / 2, shared_s * (1 - paired))
    return hid
