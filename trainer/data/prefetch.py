"""``Prefetcher``: the next step's micro-batches, collated one step ahead on a background
thread (and pinned, for a CUDA run, so that the copy to the device is asynchronous).

It calls the same ``fetch(consumed_samples)`` the trainer would call, with the same
argument, so the data (order, values) is exactly what the synchronous path reads; it only
moves the collation off the step's critical path. A fetch that fails raises in the step
that needs its batches, as the synchronous call would.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["Prefetcher"]

Batches = list[dict[str, torch.Tensor]]


class Prefetcher:
    def __init__(self, fetch: Callable[[int], Batches], pin_memory: bool = False,
                 enabled: bool = True):
        self.fetch, self.pin_memory, self.enabled = fetch, pin_memory, enabled
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: Optional[tuple[int, Future]] = None

    def _load(self, consumed: int) -> Batches:
        mbs = self.fetch(consumed)
        if self.pin_memory:
            mbs = [{k: v.pin_memory() for k, v in mb.items()} for mb in mbs]
        return mbs

    def get(self, consumed: int, next_consumed: Optional[int]) -> Batches:
        """The batches at ``consumed``; starts loading those at ``next_consumed`` (None:
        this is the last step)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == consumed:
            mbs = ahead[1].result()
        else:
            if ahead is not None:  # the position jumped (never in a plain run): drop it
                ahead[1].cancel()
            mbs = self._load(consumed)
        if self.enabled and next_consumed is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="moefold-data")
            self._ahead = (next_consumed, self._pool.submit(self._load, next_consumed))
        return mbs

    def close(self) -> None:
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
