"""Decoder-only transformer (pre-norm, GQA or MLA + RoPE, SwiGLU MLP or MoE per layer).

torchtitan-style layout so parallel/ can split or wrap it: ``tok_embeddings``, ``layers``
(ModuleDict "0".."L-1"), ``norm``, ``output``; a pipeline stage deletes what it does not
own (sets it to None / removes layers) and ``forward`` passes the activations through.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, moe_layer_config, moe_layer_pattern
from models.layers import (
    Attention,
    FeedForward,
    Initializer,
    Locate,
    RMSNorm,
    RotaryEmbedding,
    output_std,
    recompute,
)
from models.mla import MultiHeadLatentAttention, mla_rope_dim
from models.moe import MoELayer
from models.steps import Steps, call_steps, interleave, run

# Prefixes added by wrappers (activation checkpointing, torch.compile, FSDP1); stripped so
# a wrapped module initialises exactly like the plain one.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, is_moe: bool, rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # model.attention: GQA (models/layers.py) or multi-head latent attention (models/mla.py)
        self.attention: nn.Module = (
            MultiHeadLatentAttention(cfg, rope) if cfg.attention == "mla" else Attention(cfg, rope)
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn: nn.Module = (
            MoELayer(cfg) if is_moe else FeedForward(cfg.hidden_size, cfg.ffn_hidden_size)
        )
        # forward_steps recomputes the attention (and a dense FFN) in backward
        # (parallel/activation_checkpoint.py, under the two-batch overlap)
        self.recompute_in_steps = False

    def forward(
        self,
        x_BTD: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = x_BTD + self.attention(self.attention_norm(x_BTD), position_ids_BT, doc_ids_BT,
                                   block_ids_BT)
        return h + self.ffn(self.ffn_norm(h))

    def forward_steps(
        self,
        x_BTD: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
    ) -> Steps[torch.Tensor]:
        """:meth:`forward` as steps (models/steps.py): pauses inside an MoE layer while
        its rows are in flight."""
        h = x_BTD + recompute(self.recompute_in_steps, self._attend, x_BTD, position_ids_BT,
                              doc_ids_BT, block_ids_BT)
        if isinstance(self.ffn, MoELayer):  # recomputes its experts itself
            return h + (yield from call_steps(self.ffn, self.ffn_norm(h)))
        return h + recompute(self.recompute_in_steps, self._mlp, h)

    def stepped_units(self) -> list[nn.Module]:
        """The parameter-holding submodules :meth:`forward_steps` calls whole, once per
        micro-batch, in call order: the attention, then the router and shared experts of
        an MoE FFN (not its routed ``experts``, which have their own sharding group) or
        the dense FFN. A pause never falls inside one of them, so a module hook that wraps a
        call (FSDP's unshard / reshard) stays valid under the two-batch overlap; the
        norms and the MoE layer's gate/mix weights are outside them."""
        ffn = self.ffn.stepped_units() if isinstance(self.ffn, MoELayer) else [self.ffn]
        return [self.attention, *ffn]

    def _attend(self, x_BTD, position_ids_BT, doc_ids_BT, block_ids_BT) -> torch.Tensor:
        return self.attention(self.attention_norm(x_BTD), position_ids_BT, doc_ids_BT,
                              block_ids_BT)

    def _mlp(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ffn_norm(h_BTD))


def forward_halves_paired(model: nn.Module, first: torch.Tensor, **kwargs: Any) -> Any:
    """``model``'s forward of a batch made of two micro-batches (its halves along dim 0)
    as one paired call (the two-batch overlap inside a pipeline stage, whose micro-batch
    is a pair: parallel/pipeline.py): the halves' outputs concatenated back."""
    def halves(t):
        return (None, None) if t is None else t.chunk(2, dim=0)

    a_args = {k: halves(v)[0] for k, v in kwargs.items()}
    b_args = {k: halves(v)[1] for k, v in kwargs.items()}
    a_first, b_first = halves(first)
    # .forward: the module call around this one has run the model's hooks already
    a, b = model.forward(a_first, **a_args, paired={"tokens_BT": b_first, **b_args})
    if isinstance(a, tuple):  # (logits, eps) of a diffusion head
        return tuple(torch.cat([x, y]) for x, y in zip(a, b))
    return torch.cat([a, b])


class Transformer(nn.Module):
    # A pipeline stage's micro-batch is a pair of micro-batches under the two-batch
    # overlap: forward then runs its halves paired (parallel/parallelize.py sets it).
    pair_halves = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rope = self._init_embedding(cfg)
        pattern = moe_layer_pattern(cfg)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(moe_layer_config(cfg, i) if is_moe else cfg, is_moe, rope)
             for i, is_moe in enumerate(pattern)}
        )
        self._init_head(cfg)

    def _init_embedding(self, cfg: ModelConfig) -> RotaryEmbedding:
        """The token embedding; returns the one fp32 RoPE table every layer shares."""
        self.cfg = cfg
        self.tie_embeddings = cfg.tie_embeddings
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        return RotaryEmbedding(mla_rope_dim(cfg), cfg.max_seq_len, cfg.rope_theta)

    def _init_head(self, cfg: ModelConfig) -> None:
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output: Optional[nn.Linear] = None
        if not cfg.tie_embeddings:
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output head on the normed hidden states (a stage without it returns them)."""
        if self.output is not None:
            return self.output(h)
        if self.tie_embeddings and self.tok_embeddings is not None:
            return F.linear(h, self.tok_embeddings.weight)
        return h

    def forward(
        self,
        tokens_BT: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
        *,
        paired: Optional[dict[str, Optional[torch.Tensor]]] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V] in the activation dtype. A stage without
        ``tok_embeddings`` takes hidden states [B, T, D] instead; one without ``norm`` /
        ``output`` returns hidden states. ``doc_ids_BT`` / ``block_ids_BT``: attention
        masks for packed documents and bidirectional blocks (models/layers.py).

        ``paired``: a second micro-batch's arguments (``tokens_BT=...`` and the same
        keywords). The two stepped forwards then run interleaved (the two-batch overlap,
        parallel/runner.py) inside this one call, and both outputs come back as a tuple:
        hooks on the model (FSDP's root unshard / reshard) wrap the pair once."""
        if paired is None and self.pair_halves:
            return forward_halves_paired(self, tokens_BT, position_ids_BT=position_ids_BT,
                                         doc_ids_BT=doc_ids_BT, block_ids_BT=block_ids_BT)
        if paired is not None:
            a, b = interleave([
                self.forward_steps(tokens_BT, position_ids_BT, doc_ids_BT, block_ids_BT),
                self.forward_steps(**paired)])
            return a, b
        return run(self._stack(tokens_BT, position_ids_BT, doc_ids_BT, block_ids_BT, False))

    def forward_steps(
        self,
        tokens_BT: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
    ) -> Steps[torch.Tensor]:
        """:meth:`forward` as steps (models/steps.py): each block's stepped forward, so
        two micro-batches can interleave (``parallel.two_batch_overlap``). The blocks'
        own module calls are bypassed (their plain forward hooks are replayed)."""
        return self._stack(tokens_BT, position_ids_BT, doc_ids_BT, block_ids_BT, True)

    def _stack(self, tokens_BT, position_ids_BT, doc_ids_BT, block_ids_BT, stepped: bool
               ) -> Steps[torch.Tensor]:
        h = self.tok_embeddings(tokens_BT) if self.tok_embeddings is not None else tokens_BT
        for layer in self.layers.values():
            if stepped:
                h = yield from call_steps(layer, h, position_ids_BT, doc_ids_BT, block_ids_BT)
            else:
                h = layer(h, position_ids_BT, doc_ids_BT, block_ids_BT)
        if self.norm is not None:
            h = self.norm(h)
        return self._logits(h)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.layers.modules() if isinstance(m, MoELayer)]

    @torch.no_grad()
    def init_weights(self, locate: Optional[Locate] = None) -> None:
        """Re-initialise every parameter and buffer from the current torch RNG (one draw:
        the base seed; each tensor then gets its own generator, see models/layers.py).
        ``locate``: which part of each tensor this process holds (``Initializer``); the
        default is all of it — parallel/sharded_init.py passes DTensor shards."""
        base_seed = int(torch.randint(0, 2**62, (1,)).item())
        init = Initializer(base_seed, self.cfg.init_std, output_std(self.cfg), locate)
        if self.tok_embeddings is not None:
            init.normal_(self.tok_embeddings.weight, "tok_embeddings.weight", init.std)
        if self.output is not None:
            init.normal_(self.output.weight, "output.weight", init.std)
        for name, module in self.named_modules():
            if module is not self and hasattr(module, "init_params"):
                module.init_params(init, canonical_name(name))
