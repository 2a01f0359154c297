"""Checkpoints through torch.distributed.checkpoint (DCP), written atomically.

Layout under ``checkpoint.dir``::

    step_0000100/        one complete checkpoint (DCP shards + .metadata + meta.json)
    latest               text file naming the newest complete checkpoint
    .tmp-step_0000200/   a checkpoint being written (ignored by resume, replaced on retry)

A checkpoint directory only ever appears under its final name once every rank has
written its shards and rank 0 has written ``meta.json`` (the completeness marker), by a
single ``os.rename``. Existing checkpoints are never overwritten; ``keep_last`` prunes the
oldest complete ones in this directory after a newer one is complete.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` so they
are keyed by parameter FQN: a checkpoint written under one parallel layout loads under
another (DCP reshards).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from parallel.dims import ParallelDims
from parallel.state_dict import expert_tensors_to_global, expert_tensors_to_local
from trainer.errors import CheckpointError
from trainer.guards import params_finite

# DCP warns on every single-process save/load; no_dist=True is what we mean there.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

FORMAT_VERSION = 1
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize")
_STEP_RE = re.compile(r"^step_(\d{7,})$")
META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / ".metadata").is_file()


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh start) or a complete checkpoint path."""
    if resume == "none":
        existing = list_checkpoints(ckpt_dir)
        if existing:
            raise CheckpointError(
                f"checkpoint.dir={ckpt_dir} already holds {existing[-1][1].name}; pass "
                "checkpoint.resume=auto to continue it, or choose another checkpoint.dir / "
                "run_dir (existing checkpoints are never overwritten)"
            )
        return None
    if resume == "auto":
        existing = list_checkpoints(ckpt_dir)
        return existing[-1][1] if existing else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume={resume} is not a complete checkpoint "
            f"(expected {META} and .metadata inside it)"
        )
    return path


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_OPTIONS = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True)


def _app_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_state: TrainState,
    dims: Optional[ParallelDims],
) -> dict[str, Any]:
    # Flattened optimizer state: every entry (moments and param-group hyperparameters) is
    # keyed by its parameter's FQN, so a rank that holds other layers than the writer
    # (another PP split or placement) finds exactly its own. Unflattened, ``param_groups``
    # is one list per rank and DCP keeps rank 0's.
    model_sd, optim_sd = get_state_dict(
        model, optimizer,
        options=_OPTIONS,
    )
    if dims is not None:  # expert-parallel slices -> global tensors, so DCP can reshard
        model_sd = expert_tensors_to_global(model_sd, dims)
        optim_sd = expert_tensors_to_global(optim_sd, dims)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": scheduler.state_dict(),
        "train": {"step": train_state.step, "consumed_samples": train_state.consumed_samples},
    }


def save(
    ckpt_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_state: TrainState,
    meta: dict[str, Any],
    keep_last: int = 0,
    dims: Optional[ParallelDims] = None,
) -> Optional[Path]:
    """Write ``step_<N>`` atomically; returns its path. Collective over all ranks.

    Non-finite weights are never written: when a parameter on any rank holds NaN/Inf,
    nothing is saved or pruned and the result is None. ``keep_last`` never prunes the
    newest checkpoint whose ``meta.json`` says its parameters were finite."""
    root = Path(ckpt_dir)
    if not params_finite(model):
        return None
    final = root / step_dir_name(train_state.step)
    if final.exists():
        raise CheckpointError(f"refusing to overwrite existing checkpoint {final}")
    tmp = root / f".tmp-{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        # A leftover temp dir is an interrupted write of ours, never a user checkpoint.
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    dcp.save(
        _app_state(model, optimizer, scheduler, train_state, dims),
        checkpoint_id=str(tmp),
        no_dist=not dist.is_initialized(),
    )
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        meta = dict(meta, format_version=FORMAT_VERSION, step=train_state.step,
                    consumed_samples=train_state.consumed_samples, params_finite=True)
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _write_latest(root, final.name)
        if keep_last:
            complete = list_checkpoints(root)
            finite = [p for _, p in complete if _known_finite(p)]
            for _, old in complete[:-keep_last]:
                if not finite or old != finite[-1]:
                    shutil.rmtree(old)
    _barrier()
    return final


def _known_finite(path: Path) -> bool:
    try:
        return json.loads((path / META).read_text()).get("params_finite") is True
    except (OSError, ValueError):
        return False


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def read_meta(path: str | Path) -> dict[str, Any]:
    try:
        with open(Path(path) / META) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(path) / META} is missing or corrupt: {e}") from None


def load(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    expected_model: dict[str, Any],
    dims: Optional[ParallelDims] = None,
) -> TrainState:
    """Load a complete checkpoint into the live objects (resharding if the layout changed)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version={meta.get('format_version')}, "
            f"this moefold reads {FORMAT_VERSION}"
        )
    saved_model = meta.get("model", {})
    diffs = [
        f"model.{k}: checkpoint {saved_model.get(k)!r} vs run {v!r}"
        for k, v in expected_model.items()
        if k != "name" and saved_model.get(k) != v
    ]
    if diffs:
        raise CheckpointError(f"{path} was written for a different model ({'; '.join(diffs)})")
    train_state = TrainState()
    state = _app_state(model, optimizer, scheduler, train_state, dims)
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except CheckpointException as e:  # derives from BaseException; str() holds tracebacks
        inner = next(iter(e.failures.values()), None)
        inner = inner[0] if isinstance(inner, tuple) else inner
        raise CheckpointError(
            f"could not read checkpoint {path}: a shard is missing or corrupt "
            f"({type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''})"
        ) from None
    except (OSError, EOFError, pickle.UnpicklingError) as e:  # unreadable files, not bugs
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"could not read checkpoint {path}: {type(e).__name__}: {first}"
        ) from None
    if dims is not None:
        state["model"] = expert_tensors_to_local(state["model"], dims)
        state["optim"] = expert_tensors_to_local(state["optim"], dims)
    # Implementation switches describe this process's layout (e.g. foreach is off when
    # DTensors and plain tensors mix), not the run: keep the live ones.
    impl = [{k: g[k] for k in _IMPL_KEYS if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_OPTIONS)
    for group, keep in zip(optimizer.param_groups, impl):
        group.update(keep)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(step=int(state["train"]["step"]),
                      consumed_samples=int(state["train"]["consumed_samples"]))
