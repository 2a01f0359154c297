"""The built-in corpus' samples, materialised once, so later runs skip ``megatron.core``.

Importing ``megatron.core`` (for its GPT dataset) costs ~7 s, most of a tiny run's
start-up. The built-in corpus is small: after Megatron has built a run's train/valid
datasets, every sample they hold (tokens, labels, loss mask, position ids: exactly what
``dataset[i]`` returns) is written under ``<cache>/samples/<key>/`` as ``.npy`` arrays,
the key hashing everything the samples depend on (the dataset files, the seed, sequence
length, split, sizes, document masking, megatron-core's version). A later run with the
same key memory-maps them and never imports Megatron: same samples, same order, same
values (the arrays hold them losslessly: int32 ids, 0/1 masks).

Only for datasets of at most ``MAX_TOKENS`` tokens (the cache holds each sample whole).
Written into a temp dir and renamed into place, ``meta.json`` last: a reader sees a whole
cache or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from typing import Any

import numpy as np
import torch

__all__ = ["MAX_TOKENS", "SampleArrays", "cache_key", "load", "save"]

MAX_TOKENS = 1 << 24  # ~16M tokens: ~220 MB of arrays at most
FORMAT = 1
_ARRAYS = {"tokens": np.int32, "labels": np.int32, "loss_mask": np.uint8,
           "position_ids": np.int32}


class SampleArrays:
    """A dataset view over materialised samples: ``len`` and ``[i] -> dict of tensors``
    (int64 ids, float32 loss mask, as Megatron's ``GPTDataset`` returns them)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {k: torch.from_numpy(np.array(a[i])) for k, a in self.arrays.items()}
        out["loss_mask"] = out["loss_mask"].float()
        for k in ("tokens", "labels", "position_ids"):
            out[k] = out[k].long()
        return out


def cache_key(prefixes: list[str], **settings: Any) -> str:
    """A hash of the dataset files (path, size, mtime), ``settings`` and the Megatron
    version whose sampler made the samples."""
    files = []
    for p in prefixes:
        for ext in (".bin", ".idx"):
            st = os.stat(p + ext)
            files.append([os.path.abspath(p + ext), st.st_size, st.st_mtime_ns])
    try:
        mcore = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        mcore = "?"
    src = json.dumps({"format": FORMAT, "files": files, "mcore": mcore, **settings},
                     sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _dir(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, "samples", key)


def load(cache_dir: str, key: str) -> tuple[SampleArrays, SampleArrays | None, dict] | None:
    """(train, valid or None, meta) from the cache, or None when it holds no such key."""
    d = _dir(cache_dir, key)
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        splits = {s: SampleArrays({k: np.load(os.path.join(d, f"{s}_{k}.npy"), mmap_mode="r")
                                   for k in _ARRAYS}) for s in meta["splits"]}
    except (OSError, ValueError, KeyError):
        return None  # absent or damaged: rebuild through Megatron
    return splits["train"], splits.get("valid"), meta


def save(cache_dir: str, key: str, datasets: dict[str, Any], meta: dict) -> bool:
    """Materialise ``datasets`` (name -> dataset or None) into the cache; False (nothing
    written) when they hold more than ``MAX_TOKENS`` tokens. Never raises for a busy or
    read-only cache: the run goes on without it."""
    present = {k: ds for k, ds in datasets.items() if ds is not None}
    if sum(len(ds) * len(ds[0]["tokens"]) for ds in present.values() if len(ds)) > MAX_TOKENS:
        return False
    final = _dir(cache_dir, key)
    if os.path.isfile(os.path.join(final, "meta.json")):
        return True
    tmp = None
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=os.path.dirname(final))
        for name, ds in present.items():
            samples = [ds[i] for i in range(len(ds))]
            for k, dtype in _ARRAYS.items():
                arr = np.stack([s[k].numpy() for s in samples]).astype(dtype)
                if not np.array_equal(arr, np.stack([s[k].numpy() for s in samples])):
                    return False  # not representable losslessly: no cache
                np.save(os.path.join(tmp, f"{name}_{k}.npy"), arr)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "splits": list(present)}, f)
        os.rename(tmp, final)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
