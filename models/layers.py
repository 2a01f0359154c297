"""Dense building blocks: RMSNorm, SwiGLU MLP, rotary embedding, GQA attention, and the
seeded initialiser every module of the model shares.

Initialisation is *per tensor*: ``Transformer.init_weights`` draws one base seed from the
current torch RNG and every parameter gets its own generator seeded from (base seed, its
fully qualified name). A pipeline stage that deleted the other layers, or a rank that holds
only some experts, therefore initialises its tensors exactly as the whole single-device
model would — the layout-independence the trainer promises.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import causal_attention, mask_from_ids  # noqa: F401 (re-exported)
from models.config import ModelConfig

Index = tuple[slice, ...]
Fill = Callable[[torch.Tensor, Index, tuple[int, ...]], None]
"""``fill(out, index, shape)``: write into the plain tensor ``out`` the elements ``index``
(one slice per dim, ``out.shape`` its lengths) of the initial value of a tensor of shape
``shape``. Every way a tensor is initialised is a ``Fill``, so a rank can fill its shard
of a tensor it never holds whole (parallel/sharded_init.py)."""
Locate = Callable[[torch.Tensor], Optional[tuple[torch.Tensor, Index, tuple[int, ...]]]]


def locate_whole(t: torch.Tensor) -> Optional[tuple[torch.Tensor, Index, tuple[int, ...]]]:
    """The default ``Locate``: a plain tensor holds all of its value (None: on meta)."""
    if t.is_meta:
        return None
    return t, tuple(slice(0, n) for n in t.shape), tuple(t.shape)


class Initializer:
    """Seeded normal/uniform/constant fills keyed by tensor name (see module docstring).

    ``locate(t)`` says which part of ``t``'s value the process holds and where: the
    default is all of it (``t`` itself); ``parallel/`` passes one that maps a DTensor to
    its local shard and that shard's index in the global tensor. A random fill draws the
    whole tensor from its own generator — directly into ``t`` when it is held whole, else
    into one temporary full tensor that the held slice is copied from (one full tensor at
    a time, never the model); a constant or computed fill writes only the slice."""

    def __init__(self, base_seed: int, std: float, out_std: float,
                 locate: Optional[Locate] = None):
        self.base_seed = base_seed
        self.std = std  # linears, embeddings, router
        self.out_std = out_std  # output projections of each block (wo, w2)
        self.locate = locate or locate_whole

    def seed(self, name: str) -> int:
        digest = hashlib.blake2b(f"{self.base_seed}:{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    # -- fills (values, independent of where they are written) --------------------
    def drawn(self, name: str, draw: Callable[[torch.Tensor, torch.Generator], None]) -> Fill:
        """A random fill: ``draw(full, generator)`` on the tensor's full shape, with the
        generator seeded from ``name``."""
        def fill(out: torch.Tensor, index: Index, shape: tuple[int, ...]) -> None:
            gen = torch.Generator(device=out.device).manual_seed(self.seed(name))
            if tuple(out.shape) == tuple(shape):  # held whole: draw in place
                draw(out, gen)
                return
            full = torch.empty(shape, dtype=out.dtype, device=out.device)
            draw(full, gen)
            out.copy_(full[index])
        return fill

    def normal(self, name: str, std: float) -> Fill:
        return self.drawn(name, lambda t, gen: t.normal_(0.0, std, generator=gen))

    def uniform(self, name: str, low: float, high: float) -> Fill:
        return self.drawn(name, lambda t, gen: t.uniform_(low, high, generator=gen))

    @staticmethod
    def constant(value: float) -> Fill:
        return lambda out, index, shape: out.fill_(value)

    @staticmethod
    def rows(row: Callable[[int], Fill]) -> Fill:
        """A tensor whose rows (dim 0) are filled independently: ``row(i)`` fills row i
        (e.g. one expert, one modality); only the held rows are generated."""
        def fill(out: torch.Tensor, index: Index, shape: tuple[int, ...]) -> None:
            r = index[0]
            for i in range(r.start, r.stop):
                row(i)(out[i - r.start], index[1:], shape[1:])
        return fill

    @staticmethod
    def narrowed(fill: Fill, dim: int, offset: int, full: int) -> Fill:
        """The slice ``offset : offset + n`` along ``dim`` of a tensor whose ``dim`` has
        ``full`` elements and whose value ``fill`` gives (expert tensor parallelism)."""
        def sub(out: torch.Tensor, index: Index, shape: tuple[int, ...]) -> None:
            if shape[dim] == full:
                fill(out, index, shape)
                return
            s = index[dim]
            index = index[:dim] + (slice(s.start + offset, s.stop + offset),) + index[dim + 1:]
            fill(out, index, shape[:dim] + (full,) + shape[dim + 1:])
        return sub

    # -- application ---------------------------------------------------------------
    @torch.no_grad()
    def apply(self, t: torch.Tensor, fill: Fill) -> None:
        """Give ``t`` (a parameter or buffer) its initial value, or the part this process
        holds (nothing on meta)."""
        where = self.locate(t)
        if where is None:
            return
        out, index, shape = where
        if out.numel():
            fill(out, index, shape)

    def normal_(self, t: torch.Tensor, name: str, std: float) -> None:
        self.apply(t, self.normal(name, std))

    def uniform_(self, t: torch.Tensor, name: str, low: float, high: float) -> None:
        self.apply(t, self.uniform(name, low, high))

    def constant_(self, t: torch.Tensor, value: float) -> None:
        self.apply(t, self.constant(value))


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing
    recomputes forwards, and where gradient hooks fire)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def recompute(on: bool, fn: Callable, *args):
    """``fn(*args)``, its activations recomputed in backward when ``on`` (and grad is on):
    non-reentrant ``torch.utils.checkpoint`` around part of a module's forward, for the
    stepped forwards of the two-batch overlap, where a wrapper around the whole block
    cannot go (parallel/activation_checkpoint.py)."""
    if not (on and torch.is_grad_enabled()):
        return fn(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def keep_fp32_apply(module: nn.Module, names: tuple[str, ...], fn, recurse: bool) -> nn.Module:
    """``Module._apply`` that moves the buffers ``names`` with the module but never changes
    their dtype (``model.to(torch.bfloat16)`` must not round an fp32 expert bias or RoPE
    table; the bias would then drift in bf16 steps — the Megatron bug class of #1482)."""
    saved = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    for n in saved:
        module._buffers[n] = None
    nn.Module._apply(module, fn, recurse)
    for n, buf in saved.items():
        new = fn(buf)
        if new.dtype != buf.dtype:
            new = buf.to(device=new.device)  # from the original: no precision lost
        module._buffers[n] = new
    return module


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dim, in fp32 (the weight is applied by the caller)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor,
                shared: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``shared``: applied to the weight first (``models.modality.Region.shared_out``: its
        gradient summed over the ranks that hold other tokens)."""
        w = self.weight if shared is None else shared(self.weight)
        return (rms_normalize(x, self.eps) * w.float()).to(x.dtype)

    def init_params(self, init: Initializer, prefix: str) -> None:
        init.constant_(self.weight, 1.0)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_params(self, init: Initializer, prefix: str) -> None:
        init.normal_(self.w1.weight, f"{prefix}.w1.weight", init.std)
        init.normal_(self.w3.weight, f"{prefix}.w3.weight", init.std)
        init.normal_(self.w2.weight, f"{prefix}.w2.weight", init.out_std)


class RotaryEmbedding(nn.Module):
    """Non-interleaved ("rotate half") RoPE with fp32 cos/sin tables up to max_seq_len."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.init_params(None, "")

    def init_params(self, init: Optional[Initializer], prefix: str) -> None:
        if self.cos.is_meta:
            return
        dev = self.cos.device
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, device=dev, dtype=torch.float64) / self.head_dim
        )
        angles = torch.outer(
            torch.arange(self.max_seq_len, device=dev, dtype=torch.float64), inv_freq
        )
        angles = torch.cat([angles, angles], dim=-1)
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(self, ("cos", "sin"), fn, recurse)

    def forward(
        self, x_BTHD: torch.Tensor, position_ids_BT: Optional[torch.Tensor]
    ) -> torch.Tensor:
        T = x_BTHD.shape[1]
        if position_ids_BT is None:
            cos, sin = self.cos[:T], self.sin[:T]  # [T, Dh], broadcast over B
        else:
            cos, sin = self.cos[position_ids_BT], self.sin[position_ids_BT]  # [B, T, Dh]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        xf = x_BTHD.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x_BTHD.dtype)


class Attention(nn.Module):
    """GQA self-attention with RoPE. ``attn_fn`` is the replaceable core (context
    parallelism swaps it): ``attn_fn(q [B,H,T,Dqk], k [B,Hkv,T,Dqk], v [B,Hkv,T,Dv],
    doc_ids_BT, block_ids_BT, scale=None) -> [B,H,T,Dv]`` (masks and kernels:
    :func:`models.attention.causal_attention`). ``rope`` may be shared by all layers (one
    table per model instead of one per layer)."""

    def __init__(self, cfg: ModelConfig, rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        d, hd = cfg.hidden_size, self.head_dim
        self.wq = nn.Linear(d, self.num_heads * hd, bias=False)
        self.wk = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.num_heads * hd, d, bias=False)
        self.rope = rope or RotaryEmbedding(hd, cfg.max_seq_len, cfg.rope_theta)
        self.attn_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        self.attn_fn = causal_attention

    def forward(
        self,
        x_BTD: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # Head counts come from the weights, so a TP plan that shards wq/wk/wv by heads works.
        q = self.wq(x_BTD).view(B, T, -1, self.head_dim)
        k = self.wk(x_BTD).view(B, T, -1, self.head_dim)
        v = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        q, k = self.rope(q, position_ids_BT), self.rope(k, position_ids_BT)
        out = self.attn_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           doc_ids_BT, block_ids_BT)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def init_params(self, init: Initializer, prefix: str) -> None:
        for name in ("wq", "wk", "wv"):
            init.normal_(getattr(self, name).weight, f"{prefix}.{name}.weight", init.std)
        init.normal_(self.wo.weight, f"{prefix}.wo.weight", init.out_std)


def output_std(cfg: ModelConfig) -> float:
    """Std of each block's output projections: init_std / sqrt(2 * num_layers)."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)
