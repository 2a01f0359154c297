"""Where the run executes: the device, the autocast precision, the process group."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import UserError

__all__ = ["TORCH_FLOOR", "autocast_factory", "check_torch", "init_distributed", "pick_device"]

# The oldest torch with every API the code needs: FSDP2's set_gradient_divide_factor and
# set_force_sum_reduction_for_comms (pytorch#155915, first released in 2.8), which keep
# gradient reductions plain sums (gloo has no PREMUL_SUM); DeviceMesh._flatten (2.5+),
# the pipelining schedules incl. ZBV zero-bubble (2.6+). Also in pyproject.toml.
TORCH_FLOOR = (2, 8)


def check_torch(version: str | None = None) -> None:
    """UserError (one line) when ``version`` (torch's) is older than ``TORCH_FLOOR``."""
    import re

    version = str(version or torch.__version__)
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) < TORCH_FLOOR:
        need = ".".join(map(str, TORCH_FLOOR))
        raise UserError(f"torch {version} is too old: moefold needs torch>={need} (FSDP2 "
                        "set_force_sum_reduction_for_comms); pip install 'torch>=" + need + "'")


def pick_device(trainer_cfg: Any) -> torch.device:
    """``trainer.device``: auto (CUDA when available) | cpu | cuda; one GPU per local rank."""
    want = trainer_cfg.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but torch.cuda.is_available() is False")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_dtype(trainer_cfg: Any, device: torch.device) -> torch.dtype | None:
    """``trainer.precision``: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32 (None)."""
    precision = trainer_cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast_factory(device: torch.device, dtype: torch.dtype | None
                     ) -> partial[AbstractContextManager]:
    """A callable returning the forward's autocast context (a no-op for fp32)."""
    if dtype is None:
        return partial(nullcontext)
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def init_distributed(device: torch.device, timeout_s: float | None = None) -> None:
    """NCCL on CUDA, gloo on CPU: the same code path either way. An existing default
    process group (a launcher's or a test harness's) is used as it is. ``timeout_s``
    (``parallel.timeout_s``): how long a collective waits for a peer before it fails."""
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    kwargs: dict[str, Any] = {"timeout": timeout}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # torchrun --max-restarts: the workers of every attempt share the agent's store,
        # where the previous attempt's (dead) ranks left their addresses under the same
        # keys; the new group's connect would race against them (hang / refused). One
        # key prefix per attempt.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout or
                                                  timedelta(minutes=10)))
        kwargs.update(store=dist.PrefixStore(f"moefold/attempt_{restart}/", store),
                      rank=rank, world_size=world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
