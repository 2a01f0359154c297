"""Checkpoints through torch.distributed.checkpoint (DCP), written atomically.

Layout under ``checkpoint.dir``::

    step_0000100/        one complete checkpoint (DCP shards + .metadata + meta.json)
    latest               text file naming the newest complete checkpoint
    .tmp-step_0000200/   a checkpoint being written (ignored by resume, replaced on retry)

A checkpoint directory only ever appears under its final name once every rank has
written its shards and rank 0 has written ``meta.json`` (the completeness marker), by a
single ``os.rename``. Existing checkpoints are never overwritten; ``keep_last`` prunes the
oldest complete ones in this directory after a newer one is complete.

Resuming (``prepare_resume``): ``checkpoint.resume=auto`` takes the newest ``step_*``
directory and refuses, naming it, when that one is incomplete or unreadable (it never
falls back silently); ``checkpoint.resume=<path>`` rolls back: the checkpoints after it in
this run's ``checkpoint.dir`` are moved to ``rolled_back/<time>/`` (never deleted). The
run's model / data / optimizer / schedule settings must equal the checkpoint's, unless
``checkpoint.allow_changes`` names the key or its section (the run's value then wins).

Nothing here unpickles arbitrary objects from a run directory: ``rng_rank<r>.pt`` holds
only tensors, ints, floats and strings and is read with ``torch.load(weights_only=True)``.
(DCP's own ``.metadata`` is a pickle that DCP loads itself; see docs/reliability.md.)

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` so they
are keyed by parameter FQN: a checkpoint written under one parallel layout loads under
another (DCP reshards).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from parallel.dims import ParallelDims
from parallel.state_dict import (
    expert_tensors_to_global,
    expert_tensors_to_local,
    placed_expert_ids,
)
from trainer.errors import CheckpointError
from trainer.guards import params_finite

# DCP warns on every single-process save/load; no_dist=True is what we mean there.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

FORMAT_VERSION = 1
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize")
_HPARAM_KEYS = ("initial_lr", "betas", "eps", "weight_decay")
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
    return [(step, path) for step, path in step_dirs(ckpt_dir) if is_complete(path)]


def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory in ``ckpt_dir`` (complete or not) as (step, path)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be resumed from (None: it looks complete and readable)."""
    missing = [n for n in (META, ".metadata") if not (path / n).is_file()]
    if missing:
        return f"{' and '.join(missing)} missing"
    try:
        read_meta(path)
    except CheckpointError as e:
        return str(e)
    return None


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh start) or a complete checkpoint path.

    ``auto`` takes the newest ``step_*`` directory; an incomplete or unreadable newest one
    is an error naming it and the older checkpoint to roll back to (never a silent fallback:
    that retrained steps and then refused to overwrite the newest one, on every restart)."""
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
        found = step_dirs(ckpt_dir)
        if not found:
            return None
        newest = found[-1][1]
        problem = _problem(newest)
        if problem is None:
            return newest
        older = [p for _, p in found[:-1] if _problem(p) is None]
        hint = (f"to roll back, pass checkpoint.resume={older[-1]} (later checkpoints are moved "
                f"to {Path(ckpt_dir) / ROLLED_BACK}/<time>/, not deleted)" if older else
                "there is no older complete checkpoint; move it away to start afresh")
        raise CheckpointError(f"newest checkpoint {newest} is unreadable ({problem}); {hint}")
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume={resume} is not a complete checkpoint "
            f"(expected {META} and .metadata inside it)"
        )
    read_meta(path)
    return path


# -- settings a checkpoint was written with ------------------------------------------------
# Compared on resume: what defines the model, the data stream and the optimizer/schedule.
# Labels and places (model.name, data.name, data.cache_dir) are not compared; nor is the
# layout (parallel.*: checkpoints reshard), logging or checkpoint cadence.
_COMPARED_SECTIONS = ("model", "data", "optim")
_COMPARED_TRAINER = ("seed", "seq_len", "global_batch_size")
_NOT_COMPARED = {"model.name", "data.name", "data.cache_dir", "model.init_from",
                 "model.moe.upcycle_from", "model.moe.upcycle_noise"}


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}"))
    return out


def _compared(config: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section in _COMPARED_SECTIONS:
        if isinstance(config.get(section), dict):
            flat.update(_flatten(config[section], section))
    trainer = config.get("trainer") or {}
    for key in _COMPARED_TRAINER:
        if key in trainer:
            flat[f"trainer.{key}"] = trainer[key]
    optim = config.get("optim") or {}
    # max_steps is the schedule's length unless optim.decay_steps sets it
    if not optim.get("decay_steps") and optim.get("decay_style") != "constant" \
            and "max_steps" in trainer:
        flat["trainer.max_steps"] = trainer["max_steps"]
    return {k: v for k, v in flat.items() if k not in _NOT_COMPARED}


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def _short(v: Any, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def config_changes(saved: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, run value) for every compared key that differs. Keys the
    checkpoint does not record (added to moefold after it was written) are not compared."""
    a, b = _compared(saved), _compared(run)
    return [(k, a[k], b[k]) for k in b if k in a and a[k] != b[k]]


def describe_changes(path: Path, changes: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    """One line: the first ``limit`` differing keys and how to accept them."""
    items = [f"{k}: checkpoint {_short(x)} vs run {_short(y)}" for k, x, y in changes[:limit]]
    more = f"; (+{len(changes) - limit} more)" if len(changes) > limit else ""
    keys = [k for k, _, _ in changes]
    if len(keys) > limit:
        keys = sorted({k.split(".")[0] for k in keys})
    return (f"{path} was written with other settings: {'; '.join(items)}{more}; pass "
            f"checkpoint.allow_changes=[{','.join(keys)}] to let this run's values win, or "
            "use another run_dir")


def check_settings(path: Path, saved_config: dict[str, Any], run_config: dict[str, Any],
                   allow: list[str]) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose settings differ from the checkpoint's, except the keys (or
    sections) in ``allow``; returns the accepted changes."""
    changes = config_changes(saved_config, run_config)
    refused = [c for c in changes if not _allowed(c[0], allow)]
    if refused:
        raise CheckpointError(describe_changes(path, refused))
    return changes


# -- resume: resolve, compare, roll back -----------------------------------------------------
ROLLED_BACK = "rolled_back"


@dataclass
class Resume:
    path: Optional[Path] = None
    notes: list = None  # lines to log once the logger exists
    changes: list = None  # accepted (key, checkpoint, run) changes

    @property
    def optim_changed(self) -> bool:
        return any(k.startswith("optim.") for k, _, _ in self.changes or [])


def roll_back_after(ckpt_dir: str | Path, step: int) -> Optional[Path]:
    """Move the ``step_*`` directories after ``step`` (complete or not) in ``ckpt_dir`` to
    ``ckpt_dir/rolled_back/<time>/``; returns that directory (None if nothing moved)."""
    from trainer.run_dir import timestamp

    root = Path(ckpt_dir)
    later = [p for s, p in step_dirs(root) if s > step]
    if not later:
        return None
    dest = root / ROLLED_BACK / timestamp()
    n = 0
    while dest.exists():
        n += 1
        dest = root / ROLLED_BACK / f"{timestamp()}-{n}"
    dest.mkdir(parents=True)
    for p in later:
        os.rename(p, dest / p.name)
    _write_latest(root, step_dir_name(step))
    return dest


def prepare_resume(resume: str, ckpt_dir: str | Path, run_config: dict[str, Any],
                   allow_changes: list[str] = (), rank: int = 0) -> Resume:
    """Resolve ``checkpoint.resume``, compare its settings with ``run_config`` and, for an
    explicit older checkpoint, move the later ones of ``ckpt_dir`` aside (rank 0; then a
    barrier). Collective when a process group exists."""
    path = resolve_resume(resume, ckpt_dir)
    if path is None:
        return Resume(None, [], [])
    meta = read_meta(path)
    saved = meta.get("config") or {"model": meta.get("model", {})}
    changes = check_settings(path, saved, run_config, list(allow_changes or []))
    notes = [f"checkpoint.allow_changes: {k}: checkpoint {_short(x)} -> run {_short(y)}"
             for k, x, y in changes]
    if resume not in ("auto", "none"):
        moved = roll_back_after(ckpt_dir, int(meta.get("step", 0))) if rank == 0 else None
        if moved is not None:
            notes.append(f"rolled back to {path.name}: later checkpoints moved to {moved}; "
                         "relaunch with checkpoint.resume=auto to continue from the newest")
        _barrier()
    return Resume(path, notes, changes)


# -- RNG state: plain tensors and numbers, loaded with weights_only=True --------------------
RNG_FORMAT = 2


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python_version": int(version),
        "python_state": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": str(name),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if state.get("format") == RNG_FORMAT:
        random.setstate((state["python_version"],
                         tuple(int(x) for x in state["python_state"].tolist()),
                         state["python_gauss"]))
        np.random.set_state((state["numpy_name"],
                             state["numpy_keys"].numpy().astype(np.uint32),
                             state["numpy_pos"], state["numpy_has_gauss"],
                             state["numpy_gauss"]))
    else:  # format 1 (moefold <= 0.1): random/np.random states as their own tuples
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list[Any]:
    """What format-1 rng files need besides tensors: numpy's array reconstruction (data
    only; torch's documented allow-list for numpy arrays), nothing callable beyond it."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def load_rng_file(path: Path) -> dict[str, Any]:
    """An ``rng_rank<r>.pt`` file read with ``weights_only=True`` (a crafted pickle cannot
    run code); CheckpointError naming the file when it is corrupt or not a plain state."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 -- torch.load raises many kinds on garbage
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is corrupt or not a plain RNG state ({type(e).__name__}: {first[:200]}); "
            "move the file away to resume without it (the RNG then restarts from the seed)"
        ) from None
    if not isinstance(state, dict) or "torch" not in state:
        raise CheckpointError(f"{path} is not an RNG state (expected a dict with 'torch')")
    return state


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
        placed = placed_expert_ids(model)
        model_sd = expert_tensors_to_global(model_sd, dims, placed)
        optim_sd = expert_tensors_to_global(optim_sd, dims, placed)
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
    async_group: Any = None,
) -> Optional[Path | PendingSave]:
    """Write ``step_<N>`` atomically; returns its path. Collective over all ranks.

    Non-finite weights are never written: when a parameter on any rank holds NaN/Inf,
    nothing is saved or pruned and the result is None. ``keep_last`` never prunes the
    newest checkpoint whose ``meta.json`` says its parameters were finite.

    ``async_group`` (a process group of its own, e.g. ``dist.new_group(backend="gloo")``,
    or ``"local"`` in a single process): the state is copied to host memory now and
    written by DCP in a background thread; the result is a :class:`PendingSave` whose
    ``finish()`` (collective) waits for the write and then publishes the checkpoint
    exactly like a synchronous save (meta.json, rename, ``latest``, pruning). Until then
    only the ``.tmp-step_N`` directory exists, which resume never reads."""
    if not params_finite(model):
        return None
    final, tmp = _begin(Path(ckpt_dir), train_state.step)
    state = _app_state(model, optimizer, scheduler, train_state, dims)
    meta = dict(meta, format_version=FORMAT_VERSION, step=train_state.step,
                consumed_samples=train_state.consumed_samples, params_finite=True)
    with _write_errors(final, tmp):
        torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if async_group is not None:
            with quiet_dcp():
                future = dcp.async_save(
                    state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized(),
                    process_group=None if async_group == "local" else async_group)
            return PendingSave(final, tmp, meta, keep_last, future)
        with quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _publish(final, tmp, meta, keep_last)
    return final


@dataclass
class PendingSave:
    """A checkpoint whose shards are being written in the background (``save``)."""

    path: Path
    tmp: Path
    meta: dict[str, Any]
    keep_last: int
    future: Any

    def finish(self) -> Path:
        """Wait for this rank's write, then publish the checkpoint (collective)."""
        with _write_errors(self.path, self.tmp):
            self.future.result()
        _publish(self.path, self.tmp, self.meta, self.keep_last)
        return self.path


class Saver:
    """Periodic checkpoints of a run, synchronous or (``background=True``) written by DCP
    in a background thread over a gloo process group of their own (so the writes never
    interleave with the training's collectives). At most one write is in flight: the
    next save, ``finish()`` or a synchronous save first publishes the previous one."""

    def __init__(self, background: bool):
        self.background = background
        self.group: Any = None
        if background:
            self.group = dist.new_group(backend="gloo") if dist.is_initialized() else "local"
        self.pending: Optional[PendingSave] = None

    def save(self, *, sync: bool = False, **kwargs: Any) -> Optional[Path]:
        """``save(**kwargs)``; in the background unless ``sync`` or not ``background``.
        Returns the checkpoint's path (complete once ``finish()`` returns) or None."""
        self.finish()
        out = save(**kwargs, async_group=None if sync or not self.background else self.group)
        if isinstance(out, PendingSave):
            self.pending = out
            return out.path
        return out

    def finish(self) -> Optional[Path]:
        """Publish the write in flight, if any (collective); returns its path."""
        pending, self.pending = self.pending, None
        return pending.finish() if pending is not None else None


def _begin(root: Path, step: int) -> tuple[Path, Path]:
    """The final and temp directories of a new checkpoint (the temp one created empty)."""
    final = root / step_dir_name(step)
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
    return final, tmp


@contextlib.contextmanager
def _write_errors(final: Path, tmp: Path) -> Iterator[None]:
    """A failed write (full disk, ...) removes the temp dir and becomes one line."""
    try:
        yield
    except (CheckpointException, OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RuntimeError) and not _io_failure(e):
            raise  # a bug, not the disk: keep the traceback
        raise CheckpointError(_write_failure(final, tmp, e)) from None


def _publish(final: Path, tmp: Path, meta: dict[str, Any], keep_last: int) -> None:
    """Once every rank's shards are written: meta.json, the atomic rename, ``latest``,
    pruning (never the newest finite checkpoint)."""
    _barrier()
    if _rank() == 0:
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        root = final.parent
        _write_latest(root, final.name)
        if keep_last:
            complete = list_checkpoints(root)
            finite = [p for _, p in complete if _known_finite(p)]
            for _, old in complete[:-keep_last]:
                if not finite or old != finite[-1]:
                    shutil.rmtree(old)
    _barrier()


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
    file = Path(path) / META
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(
            f"{file} is missing or corrupt ({type(e).__name__}: {first})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} is corrupt (expected a JSON object)")
    return meta


def _errors(e: BaseException) -> Iterator[BaseException]:
    """``e``, its causes/contexts and, for DCP's CheckpointException, each rank's failure."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        for f in getattr(x, "failures", {}).values() if isinstance(x, CheckpointException) \
                else ():
            todo.append(f[0] if isinstance(f, tuple) else f)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _io_failure(e: RuntimeError) -> bool:
    """torch's file writer reports a failed write (e.g. a full disk) as a RuntimeError."""
    text = str(e)
    return any(m in text for m in ("unexpected pos", "No space left", "PytorchStreamWriter",
                                   "file write failed"))


def _write_failure(final: Path, tmp: Path, e: BaseException) -> str:
    errs = [x for x in _errors(e) if not isinstance(x, CheckpointException)] or [e]
    full = any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in errs) or any(
        "unexpected pos" in str(x) or "No space left" in str(x) for x in errs)
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    if full or (free is not None and free < (1 << 20)):
        room = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return (f"could not write checkpoint {final}: no space left on device{room}; removed "
                f"the partial {tmp.name}")
    return f"could not write checkpoint {final}: {_first_line(errs[0])}; removed {tmp.name}"


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor items (scheduler state, train
    counters, optimizer hyperparameters) are read with ``torch.load(weights_only=True)``
    instead of DCP's ``weights_only=False``: a crafted shard cannot run code on resume."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint item {read_item.dest_index.fqn} is not plain data "
                f"({str(e).strip().splitlines()[0][:200]})") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, minus the pickle
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """Keep DCP's own logging of an exception (tracebacks of every rank's failure) off the
    console: the caller turns that exception into one line."""
    names = ("dcp_logger", "torch.distributed.checkpoint", "")
    loggers = [logging.getLogger(n) if n else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    expected_model: dict[str, Any],
    dims: Optional[ParallelDims] = None,
    allow_changes: list[str] = (),
    run_optim_wins: bool = False,
) -> TrainState:
    """Load a complete checkpoint into the live objects (resharding if the layout changed).

    Model keys that differ from ``expected_model`` are refused unless in ``allow_changes``;
    ``run_optim_wins`` keeps the live optimizer's hyperparameters (lr, betas, eps, weight
    decay) instead of the checkpoint's."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version={meta.get('format_version')}, "
            f"this moefold reads {FORMAT_VERSION}"
        )
    refused = [c for c in config_changes({"model": meta.get("model", {})},
                                         {"model": expected_model})
               if not _allowed(c[0], list(allow_changes))]
    if refused:
        raise CheckpointError(describe_changes(path, refused))
    train_state = TrainState()
    state = _app_state(model, optimizer, scheduler, train_state, dims)
    # The run's own hyperparameters, for a resume that was allowed to change them.
    run_hparams = [{k: g[k] for k in _HPARAM_KEYS if k in g} for g in optimizer.param_groups]
    try:
        with quiet_dcp():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized(),
                     planner=SafeLoadPlanner())
    except CheckpointError:
        raise
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
    if run_optim_wins:  # checkpoint.allow_changes=[optim...]: the run's values win
        for group, keep in zip(optimizer.param_groups, run_hparams):
            group.update(keep)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        lrs = [base * fn(scheduler.last_epoch)
               for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        rng = load_rng_file(rng_file)
        try:
            _set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{rng_file} holds no usable RNG state "
                                  f"({_first_line(e)})") from None
    return TrainState(step=int(state["train"]["step"]),
                      consumed_samples=int(state["train"]["consumed_samples"]))
