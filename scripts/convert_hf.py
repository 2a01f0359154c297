"""Export a moefold checkpoint to Hugging Face (docs/interop.md).

    python -m scripts.convert_hf export <checkpoint_dir> <out_dir> [--moefold-layout]
        [--dtype float32|bfloat16] [--max-shard-gb 5]

``checkpoint_dir``: a step directory or a checkpoint root (its ``latest``), written by any
training layout: DCP reshards it whole into this process. Writes safetensors shard(s),
``config.json`` and, when the run's data named one, its tokenizer file. A model without an
exact HF family is refused with one line (exit 2); MoT/MoM (and ``--moefold-layout``) write
the moefold layout: our flat state dict + ``config.json`` {"moefold_format", "model"}.
Import back with ``model.init_from=hf:<out_dir>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from models.config import MODALITY_ARCHS, ModelConfig
from models.hf_map import HFRefused, hf_config, hf_entries, rope_rows, split_expert
from parallel.hf_load import MOEFOLD_FORMAT, InitSourceError, dcp_model_state

__all__ = ["export", "hf_state_dict"]


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (``HFRefused`` when no family fits)."""
    out = {}
    for e in hf_entries(cfg):
        if e.buffer and e.name not in state:  # no expert bias: DeepseekV3's is zero
            out[e.hf] = torch.zeros(cfg.moe.num_experts, dtype=torch.float32)
            continue
        ex = split_expert(e.name)
        t = state[ex[0]][ex[1]] if ex else state[e.name]
        if e.rope is not None:  # our rotate-half RoPE rows -> DeepSeek's interleaved pairs
            t = t[rope_rows(t.shape[0], e.rope, to_hf=True)]
        out[e.hf] = (t.T if e.transpose else t).contiguous()
    return out


def _save_shards(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def export(ckpt: str | Path, out: str | Path, *, moefold_layout: bool = False,
           dtype: str = "float32", max_shard_gb: float = 5.0) -> str:
    """Write the export; returns the family (``llama``/``mixtral``/``qwen2_moe``/``moefold``)."""
    cfg, state, meta = dcp_model_state(Path(ckpt))
    out = Path(out)
    dt = getattr(torch, dtype)
    if moefold_layout or cfg.arch in MODALITY_ARCHS:
        tensors = {k: v.to(dt).contiguous() for k, v in state.items()}
        config = {"moefold_format": MOEFOLD_FORMAT, "model": asdict(cfg)}
        family = "moefold"
    else:
        config = hf_config(cfg)  # refuses first: nothing is written
        config["torch_dtype"] = dtype
        tensors = {k: v.to(dt) for k, v in hf_state_dict(cfg, state).items()}
        family = config["model_type"]
    out.mkdir(parents=True, exist_ok=True)
    _save_shards(tensors, out, int(max_shard_gb * 2**30))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = ((meta.get("config") or {}).get("data") or {}).get("tokenizer_model") or ""
    if tok and Path(tok).is_file():
        shutil.copy(tok, out / Path(tok).name)
    return family


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.convert_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face (or moefold) safetensors")
    e.add_argument("checkpoint_dir")
    e.add_argument("out_dir")
    e.add_argument("--moefold-layout", action="store_true",
                   help="our flat state dict + config.json instead of an HF family")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--max-shard-gb", type=float, default=5.0)
    a = p.parse_args(argv)
    try:
        family = export(a.checkpoint_dir, a.out_dir, moefold_layout=a.moefold_layout,
                        dtype=a.dtype, max_shard_gb=a.max_shard_gb)
    except (HFRefused, InitSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {a.checkpoint_dir} -> {a.out_dir} ({family})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
