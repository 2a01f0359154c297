"""Fill a (possibly sharded) model from outside weights instead of its random init:
``model.init_from=hf:<dir>`` (Hugging Face safetensors, models/hf_map.py), a moefold
safetensors export (``model.init_from=<dir>``) and sparse upcycling
(``model.moe.upcycle_from=<dense checkpoint dir | hf:<dir>>``). docs/interop.md.

The fill reuses the name-keyed initialiser of models/layers.py: ``parallelize()`` first
initialises every local shard from the seed (parallel/sharded_init.py), then runs the
model's ``init_params`` once more with an ``Initializer`` whose fills read the source
instead of drawing. The same ``locate`` (``dtensor_locate``), ``rows`` (expert
parallelism: only the held experts) and ``narrowed`` (expert tensor parallelism) give each
rank's index into each tensor, so a rank reads only its slice: safetensors files are
memory-mapped and read through ``get_slice``. Tensors the source does not have (the router
of an upcycled model) keep their seeded init.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from models.config import ModelConfig, MoEConfig, has_experts
from models.hf_map import HFRefused, check_hf_config, hf_entries, rope_rows, split_expert
from models.layers import Index, Initializer
from models.transformer import canonical_name
from parallel.sharded_init import dtensor_locate

__all__ = ["InitSourceError", "dcp_model_state", "init_from_sources", "open_source",
           "structural_diffs"]

Reader = Callable[[Index, tuple[int, ...]], torch.Tensor]
MOEFOLD_FORMAT = "moefold-safetensors-1"


class InitSourceError(ValueError):
    """A source that cannot initialise this model (one line)."""


# -- sources: init name -> reader of any slice of its value --------------------------
class _Safetensors:
    """Every tensor of the ``*.safetensors`` files of a directory, memory-mapped."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InitSourceError(f"{path} holds no *.safetensors files")
        self.where: dict[str, Any] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for k in handle.keys():
                self.where[k] = handle

    def slice(self, key: str):
        if key not in self.where:
            raise InitSourceError(f"tensor {key} is missing from the safetensors files")
        return self.where[key].get_slice(key)


def _hf_reader(files: _Safetensors, hf: str, transpose: bool, expected: tuple[int, ...],
               name: str, rope: Optional[tuple[int, int, int]] = None) -> Reader:
    sl = files.slice(hf)
    shape = tuple(sl.get_shape())
    want = tuple(reversed(expected)) if transpose else expected
    if shape != want:
        raise InitSourceError(f"{hf} has shape {list(shape)}, {name} needs {list(want)}")
    if rope is not None:  # DeepSeek's interleaved RoPE rows -> our rotate-half order
        order = torch.tensor(rope_rows(shape[0], rope))

        def read_rope(index: Index, full: tuple[int, ...]) -> torch.Tensor:
            rows = order[index[0]]  # only the held rows (a TP shard reads its heads)
            return sl[:][rows][(slice(None), *index[1:])]
        return read_rope

    def read(index: Index, full: tuple[int, ...]) -> torch.Tensor:
        if transpose:
            return sl[(index[1], index[0])].T
        return sl[index]
    return read


class HFSource:
    def __init__(self, path: Path, cfg: ModelConfig):
        try:
            hf_cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise InitSourceError(f"{path}/config.json is missing or unreadable ({e})") from None
        check_hf_config(cfg, hf_cfg)
        self.files = _Safetensors(path)
        interleave = bool(hf_cfg.get("rope_interleave", True))
        self.entries = {e.name: e for e in hf_entries(cfg, rope_interleave=interleave)}

    def get(self, name: str, shape: tuple[int, ...]) -> Optional[Reader]:
        e = self.entries.get(name)
        if e is None:
            return None
        return _hf_reader(self.files, e.hf, e.transpose, shape, name, e.rope)

    @torch.no_grad()
    def fill_buffers(self, model: nn.Module) -> None:
        """Buffers the checkpoint holds (DeepSeek-V3's expert selection bias): copied into
        the model's where it has them; without one (``model.moe.expert_bias=false``) the
        checkpoint's must be zero, or routing would differ."""
        held = {canonical_name(n): b for n, b in model.named_buffers()}
        stage = {canonical_name(n).split(".ffn.")[0] for n, _ in model.named_parameters()}
        for e in self.entries.values():
            if not e.buffer or e.name.split(".ffn.")[0] not in stage:
                continue
            value = self.files.slice(e.hf)[:]
            if e.name in held and held[e.name] is not None:
                held[e.name].copy_(value)
            elif value.abs().max() > 0:
                raise InitSourceError(f"{e.hf} is nonzero but model.moe.expert_bias=false: "
                                      "set it true to import the selection bias")


def structural_diffs(a: dict, b: dict) -> list[str]:
    """Model-config keys that change the weights' meaning (not the training knobs)."""
    skip = ("name", "init_from", "max_seq_len", "init_std", "moe.upcycle_from",
            "moe.upcycle_noise", "moe.aux_loss_coeff", "moe.seq_aux_loss_coeff",
            "moe.z_loss_coeff", "moe.expert_bias_update_rate", "moe.capacity_factor",
            "moe.drop_policy", "moe.pad_to_capacity", "moe.min_capacity", "mamba.kernels",
            "mamba.scan_chunk")

    def flat(d: Any, p: str = "") -> dict:
        if not isinstance(d, dict):
            return {p: d}
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{p}.{k}" if p else k))
        return out
    fa, fb = flat(a), flat(b)
    return [f"{k}: source {fa.get(k)!r} vs model {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if k not in skip and fa.get(k) != fb.get(k)]


class FlatSource:
    """Our own FQN-keyed tensors (a moefold safetensors export or a loaded state dict)."""

    def __init__(self, get_full: Callable[[str], Optional[Any]]):
        self.get_full = get_full  # FQN -> tensor or safetensors slice, None when absent

    def get(self, name: str, shape: tuple[int, ...]) -> Optional[Reader]:
        ex = split_expert(name)
        key, e = ex if ex else (name, None)
        t = self.get_full(key)
        if t is None:
            return None

        def read(index: Index, full: tuple[int, ...]) -> torch.Tensor:
            return t[(slice(e, e + 1),) + tuple(index)][0] if e is not None else t[index]
        return read


def _moefold_export(path: Path, cfg: ModelConfig) -> FlatSource:
    meta = json.loads((path / "config.json").read_text())
    diffs = structural_diffs(meta["model"], asdict(cfg))
    if diffs:
        raise InitSourceError(f"{path} holds another model: " + "; ".join(diffs[:4]))
    files = _Safetensors(path)
    return FlatSource(lambda k: files.slice(k) if k in files.where else None)


def _step_dir(path: Path) -> Path:
    if (path / "meta.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file() and (path / latest.read_text().strip() / "meta.json").is_file():
        return path / latest.read_text().strip()
    raise InitSourceError(f"{path} is not a checkpoint (no meta.json, no latest)")


def dcp_model_state(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """A complete checkpoint's model, gathered whole into this process (any training
    layout: DCP reshards), as (config, state dict, meta.json)."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from models.build import build_model

    step = _step_dir(path)
    meta = json.loads((step / "meta.json").read_text())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              meta["model"]))
    with torch.random.fork_rng():
        model = build_model(cfg, "cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(step), no_dist=True)
    return cfg, state["model"], meta


def open_source(spec: str, cfg: ModelConfig):
    """``hf:<dir>`` -> HFSource; ``<dir>`` of a moefold export -> FlatSource."""
    if spec.startswith("hf:"):
        path = Path(spec[3:])
        if not path.is_dir():
            raise InitSourceError(f"model.init_from={spec}: {path} is not a directory")
        cfg_file = path / "config.json"
        if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("moefold_format"):
            return _moefold_export(path, cfg)
        return HFSource(path, cfg)
    path = Path(spec)
    if (path / "config.json").is_file():
        return _moefold_export(path, cfg)
    raise InitSourceError(f"model.init_from={spec}: expected hf:<dir> or a moefold export dir")


# -- sparse upcycling ---------------------------------------------------------------
def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The dense model an MoE ``cfg`` upcycles from: no experts, FFN width = expert width."""
    return replace(cfg, ffn_hidden_size=cfg.moe.expert_ffn_hidden_size, moe=MoEConfig())


def check_upcycle(cfg: ModelConfig) -> None:
    m = cfg.moe
    why = None
    if cfg.arch != "llm":
        why = f"model.arch={cfg.arch} (llm only)"
    elif not has_experts(cfg):
        why = "model.moe.num_experts=0 (nothing to upcycle into)"
    elif m.residual:
        why = "model.moe.residual=true (the dense branch would be mixed with the copied FFN's)"
    elif m.num_shared_experts:
        why = "shared experts (their output would be added to the copied FFN's)"
    elif not m.norm_topk_prob or m.topk_scaling_factor != 1.0:
        why = "norm_topk_prob=false or topk_scaling_factor!=1 (the top-k weights must sum to 1)"
    elif any(not moe for moe in _pattern(cfg)) and cfg.ffn_hidden_size != m.expert_ffn_hidden_size:
        why = (f"dense layers of width model.ffn_hidden_size={cfg.ffn_hidden_size} != "
               f"model.moe.expert_ffn_hidden_size={m.expert_ffn_hidden_size}")
    if why:
        raise InitSourceError(f"model.moe.upcycle_from: cannot upcycle exactly: {why}")


def _pattern(cfg: ModelConfig) -> list[bool]:
    from models.config import moe_layer_pattern
    return moe_layer_pattern(cfg)


class UpcycleSource:
    """Every routed expert = the dense FFN of its layer (times ``1 + noise * N(0, 1)``,
    drawn per expert from its own seeded generator); everything else = the dense model's
    tensor; the router keeps its seeded init (absent here)."""

    def __init__(self, dense, noise: float, seed: int):
        self.dense, self.noise = dense, noise
        self.seeds = Initializer(seed, 0.0, 0.0)

    def get(self, name: str, shape: tuple[int, ...]) -> Optional[Reader]:
        ex = split_expert(name)
        if ex is None:
            if ".ffn.router." in name or ".ffn.shared" in name:
                return None
            return self.dense.get(name, shape)
        key, e = ex
        layer, w = key.split(".ffn.experts.")
        inner = self.dense.get(f"{layer}.ffn.{w}.weight", tuple(reversed(shape)))
        if inner is None:
            raise InitSourceError(f"the dense source has no {layer}.ffn.{w}.weight")

        def read(index: Index, full: tuple[int, ...]) -> torch.Tensor:
            whole = tuple(slice(0, n) for n in reversed(full))
            v = inner(whole, tuple(reversed(full))).T.float()
            if self.noise:
                gen = torch.Generator().manual_seed(self.seeds.seed(f"upcycle:{name}"))
                v = v * (1 + self.noise * torch.randn(v.shape, generator=gen))
            return v[index]
        return read


def open_upcycle(spec: str, cfg: ModelConfig, seed: int) -> UpcycleSource:
    check_upcycle(cfg)
    dense = dense_config(cfg)
    if spec.startswith("hf:"):
        src = HFSource(Path(spec[3:]), dense)
    else:
        dcfg, state, _ = dcp_model_state(Path(spec))
        a, b = asdict(dcfg), asdict(dense)
        for d in (a, b):  # a dense model's moe.* settings are unused
            d["moe"] = {"num_experts": d["moe"]["num_experts"]}
        diffs = structural_diffs(a, b)
        if diffs:
            raise InitSourceError(f"model.moe.upcycle_from={spec} is not this model's dense "
                                  "counterpart: " + "; ".join(diffs[:4]))
        src = FlatSource(state.get)
    return UpcycleSource(src, cfg.moe.upcycle_noise, seed)


# -- the fill -----------------------------------------------------------------------
class _SourceInit(Initializer):
    def __init__(self, source, names: dict[int, str]):
        super().__init__(0, 0.0, 0.0, dtensor_locate)
        self.source, self.names = source, names

    def drawn(self, name, draw):
        return self._fill(name)

    def constant_(self, t, value):
        name = self.names.get(id(t))
        if name is not None:
            self.apply(t, self._fill(name))

    def _fill(self, name: str):
        readers: dict = {}

        def fill(out: torch.Tensor, index: Index, shape: tuple[int, ...]) -> None:
            if "r" not in readers:
                readers["r"] = self.source.get(name, tuple(shape))
            r = readers["r"]
            if r is not None:
                out.copy_(r(index, shape))
        return fill


@torch.no_grad()
def fill_from(model: nn.Module, source) -> None:
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    init = _SourceInit(source, names)
    for attr in ("tok_embeddings", "output"):
        mod = getattr(model, attr, None)
        if mod is not None:
            init.normal_(mod.weight, f"{attr}.weight", 0.0)
    for name, module in model.named_modules():
        if module is not model and hasattr(module, "init_params"):
            module.init_params(init, canonical_name(name))


def init_from_sources(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """The hook ``parallelize()`` calls after the seeded init when ``model.init_from`` or
    ``model.moe.upcycle_from`` is set."""
    init_from, upcycle = cfg.init_from, cfg.moe.upcycle_from
    try:
        if init_from and upcycle:
            raise InitSourceError("set model.init_from or model.moe.upcycle_from, not both")
        if cfg.arch != "llm":
            raise InitSourceError(f"model.init_from / upcycle_from: arch={cfg.arch} is not "
                                  "supported (llm only)")
        source = open_source(init_from, cfg) if init_from else open_upcycle(upcycle, cfg, seed)
    except HFRefused as e:
        raise InitSourceError(str(e)) from None
    fill_from(model, source)
    if isinstance(source, HFSource):
        source.fill_buffers(model)
