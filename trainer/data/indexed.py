"""Pretraining data for the trainer: Megatron-Core GPT datasets (indexed, blended) cut
into the micro-batches of one data-parallel rank (``data.source`` builtin / indexed).

The datasets come from ``megatron.core.datasets`` (used as a library): the
document/sample/shuffle indices and the blending are Megatron's. What this module adds:

- ``parse_blend``: ``data.blend`` -> (prefixes, weights).
- ``build_indexed`` -> ``PretrainData``: checks files and vocab sizes with user-facing
  errors, builds the train/valid datasets, and serves the global batch that starts at a
  given number of consumed samples (Megatron's pretraining-sampler order), so resuming
  needs nothing but ``consumed_samples``.

The tokenizer lives in ``trainer.data.tokenizer``, the on-disk datasets and the builtin
corpus in ``trainer.data.corpus``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.data import sample_cache
from trainer.data.corpus import (
    check_indexed_dataset,
    check_tokens,
    prepare_builtin_corpus,
    resolve_cache_dir,
)
from trainer.data.mcore import mcore_datasets
from trainer.data.protocol import microbatch_ranges
from trainer.data.tokenizer import Tokenizer
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


# -- blends, splits -----------------------------------------------------------------------
def parse_blend(blend: Sequence[Any]) -> tuple[list[str], list[float] | None]:
    """``["p"]``, ``["p1", "p2"]`` or ``[w1, "p1", w2, "p2"]`` -> (prefixes, weights|None)."""
    items = list(blend)
    bad = ConfigError(
        f"data.blend={items} must be [prefix, ...] or [weight1, prefix1, weight2, prefix2, ...]"
    )

    def number(x: Any) -> float | None:
        if isinstance(x, bool):
            return None
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    if not items:
        raise bad
    if all(number(x) is None for x in items):
        return [os.path.abspath(str(x)) for x in items], None
    if len(items) % 2:
        raise bad
    weights = [number(w) for w in items[0::2]]
    prefixes = items[1::2]
    if any(w is None for w in weights) or any(number(p) is not None for p in prefixes):
        raise bad
    if any(w <= 0 for w in weights):
        raise ConfigError(f"data.blend={items}: weights must be > 0")
    return [os.path.abspath(str(p)) for p in prefixes], weights


def _split_matrix(split: str) -> list[tuple[float, float] | None]:
    cfg_mod = mcore_datasets().blended_megatron_dataset_config
    bad = ConfigError(f"data.split={split!r} must be 'train,valid,test' weights, e.g. '98,2,0'")
    try:
        with np.errstate(all="ignore"):
            vector = cfg_mod.parse_and_normalize_split(str(split))
    except (AssertionError, ValueError, ZeroDivisionError):
        raise bad from None
    if not np.all(np.isfinite(vector)) or vector[0] <= 0:
        raise bad
    return cfg_mod.convert_split_vector_to_split_matrix(vector)


# -- process coordination -----------------------------------------------------------------
def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process_guard(cache_dir: str):
    """Around Megatron's builder when torch.distributed is not initialised.

    - megatron-core 0.16's BlendedDataset calls ``torch.distributed.get_rank()`` on an
      index-cache miss without checking ``is_initialized()``; report rank 0 meanwhile.
    - Independent processes sharing a cache dir must not read index files another one is
      still writing (Megatron writes them in place): hold an exclusive file lock.
    With torch.distributed initialised, Megatron's own rank-0-first + barrier applies.
    """
    import fcntl

    os.makedirs(cache_dir, exist_ok=True)
    get_rank = torch.distributed.get_rank
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        torch.distributed.get_rank = lambda group=None: 0
        try:
            yield
        finally:
            torch.distributed.get_rank = get_rank
            fcntl.flock(lock, fcntl.LOCK_UN)


def _all_ranks(flag: bool) -> bool:
    """``flag`` on every rank (True only if True everywhere): a collective when
    torch.distributed is initialised, so that all ranks take the same path."""
    if not _dist_initialized():
        return flag
    dist = torch.distributed
    device = (torch.device("cuda", torch.cuda.current_device())
              if "nccl" in str(dist.get_backend()) else torch.device("cpu"))
    missing = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(missing)
    return missing.item() == 0


def _rank0_first(fn):
    """Run ``fn`` on rank 0, barrier, then on the others (a cache hit for them)."""
    if not _dist_initialized():
        return fn()
    result = None
    if torch.distributed.get_rank() == 0:
        try:
            result = fn()
        finally:  # release the others even on error; they then fail the same way
            torch.distributed.barrier()
    else:
        torch.distributed.barrier()
        result = fn()
    return result


# -- the data object ----------------------------------------------------------------------
_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class PretrainData:
    """Train/valid GPT datasets and the micro-batch layout of one DP rank.

    Sample order is Megatron's pretraining sampler: global batch ``k`` is samples
    ``[k*G, (k+1)*G)`` of the (already shuffled) train dataset; micro-batch ``i`` of DP
    rank ``r`` holds samples ``c + (i*dp + r)*mbs ... + mbs``. Stateless: resuming needs
    only ``consumed_samples``.
    """

    tokenizer: Tokenizer
    train_dataset: Any
    valid_dataset: Any | None
    global_batch_size: int
    seq_len: int
    prefixes: list[str]
    weights: list[float] | None
    # packed documents attend only within themselves: micro-batches carry ``doc_ids``
    # (document index per token; the EOD that ends a document belongs to it)
    document_mask: bool = False

    @property
    def num_train_samples(self) -> int:
        return len(self.train_dataset)

    @property
    def num_valid_samples(self) -> int:
        return len(self.valid_dataset) if self.valid_dataset is not None else 0

    def _layout(self, start: int, mbs: int, dp_rank: int, dp_size: int) -> list[range]:
        return microbatch_ranges(start, self.global_batch_size, mbs, dp_rank, dp_size)

    def _collate(self, dataset: Any, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        samples = [dataset[int(i)] for i in indices]
        batch = {k: torch.stack([s[k] for s in samples]) for k in _KEYS}
        batch["loss_mask"] = batch["loss_mask"].float()
        for k in ("tokens", "labels", "position_ids"):
            batch[k] = batch[k].long()
        if self.document_mask:
            eod = (batch["tokens"] == self.tokenizer.eod).long()
            batch["doc_ids"] = eod.cumsum(1) - eod
        return batch

    def train_microbatches(
        self, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of the global batch starting at ``consumed_samples``."""
        end = consumed_samples + self.global_batch_size
        if consumed_samples < 0 or end > self.num_train_samples:
            raise ValueError(
                f"train samples [{consumed_samples}, {end}) are outside the "
                f"{self.num_train_samples} samples the train dataset was built for "
                "(build it with a larger train_samples)"
            )
        return [
            self._collate(self.train_dataset, r)
            for r in self._layout(consumed_samples, micro_batch_size, dp_rank, dp_size)
        ]

    def valid_microbatches(
        self, iteration: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """Micro-batches of the ``iteration``-th fixed validation global batch (wrapping)."""
        n = self.num_valid_samples
        if n == 0:
            raise ValueError("no validation dataset (data.split has no valid part)")
        start = iteration * self.global_batch_size
        return [
            self._collate(self.valid_dataset, (i % n for i in r))
            for r in self._layout(start, micro_batch_size, dp_rank, dp_size)
        ]


def _sources(cfg_data: Any, cache_dir: str, model_vocab_size: int
             ) -> tuple[list[str], list[float] | None, Tokenizer]:
    """The dataset prefixes, their blend weights and the tokenizer (the builtin corpus is
    prepared on first use)."""
    tokenizer_model = str(cfg_data.tokenizer_model or "")
    if cfg_data.source == "builtin":
        vocab = int(cfg_data.builtin_vocab_size)
        if not tokenizer_model and vocab > model_vocab_size:  # fail before building
            raise ConfigError(
                f"data tokenizer has {vocab} tokens but model.vocab_size={model_vocab_size} "
                "(data.builtin_vocab_size)"
            )
        prefix, tokenizer_model = _rank0_first(
            lambda: prepare_builtin_corpus(cache_dir, vocab, tokenizer_model or None)
        )
        prefixes, weights = [prefix], None
    elif cfg_data.source == "indexed":
        prefixes, weights = parse_blend(cfg_data.blend)
        # `data/web` finds `data/web_text_document` (what scripts/preprocess_data.py writes
        # for --output-prefix data/web) when there is no `data/web.bin`.
        prefixes = [p + "_text_document" if not os.path.exists(p + ".bin")
                    and os.path.exists(p + "_text_document.bin") else p for p in prefixes]
        if not tokenizer_model:
            raise ConfigError(
                "data.source=indexed needs data.tokenizer_model=<the sentencepiece .model or "
                "Hugging Face tokenizer.json / directory the data was tokenised with>"
            )
    else:
        raise ConfigError(f"data.source={cfg_data.source!r} is not one of 'builtin', 'indexed'")
    tokenizer = Tokenizer(tokenizer_model)
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"data tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={model_vocab_size}"
        )
    return prefixes, weights, tokenizer


def _check_split(split: str, prefixes: list[str], valid_samples: int,
                 global_batch_size: int) -> int:
    """Check that ``data.split`` leaves train (and, when asked for, valid) documents in
    every dataset; returns the number of valid samples to build."""
    matrix = _split_matrix(split)
    valid_size = 0
    if matrix[1] is not None:
        # Always a few batches, so validation works even when the trainer asks for none.
        valid_size = max(int(valid_samples), global_batch_size)
    elif valid_samples > 0:
        raise ConfigError(f"data.split={split!r} has no validation part but validation is enabled")
    for prefix in prefixes:
        n = check_indexed_dataset(prefix)
        for name, bounds in (("train", matrix[0]), ("valid", matrix[1])):
            if bounds is not None and int(round(bounds[1] * n)) <= int(round(bounds[0] * n)):
                raise ConfigError(
                    f"data.split={split!r} leaves no {name} documents in {prefix} ({n} "
                    "documents); use more data or another split"
                )
    return valid_size


def _gpt_datasets(prefixes, weights, tokenizer, split: str, *, seed: int, seq_len: int,
                  cache_dir: str, document_mask: bool, sizes: list[int]):
    """Megatron-Core's blended GPT train/valid datasets (index caches under
    ``cache_dir/indices``)."""
    mcore = mcore_datasets()
    builder_mod, gpt_mod = mcore.blended_megatron_dataset_builder, mcore.gpt_dataset
    config = gpt_mod.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=os.path.join(cache_dir, "indices"),
        tokenizer=tokenizer,
        reset_position_ids=document_mask,  # RoPE positions restart per document
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = builder_mod.BlendedMegatronDatasetBuilder(
        gpt_mod.GPTDataset, sizes, lambda: True, config
    )
    guard = (
        contextlib.nullcontext()
        if _dist_initialized()
        else _single_process_guard(config.path_to_cache)
    )
    with guard, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Building a BlendedDataset for a single ..." etc.
        train_ds, valid_ds, _ = builder.build()
    return train_ds, valid_ds


def build_indexed(
    cfg_data: Any,
    *,
    seq_len: int,
    seed: int,
    global_batch_size: int,
    train_samples: int,
    valid_samples: int,
    model_cfg: Any,
    rank: int = 0,
    world_size: int = 1,
) -> PretrainData:
    """Resolve ``cfg.data`` (a DataConfig or its DictConfig; source builtin or indexed)
    into train/valid datasets. Of ``model_cfg`` only ``vocab_size`` is read.

    Works in a single process (torch.distributed not initialised) and in every rank of an
    initialised job; index caches are built by rank 0 first, the others load them.
    """
    # Every rank builds the datasets (the DP layout is chosen per call of
    # train_microbatches); with torch.distributed initialised, rank 0 builds caches first.
    del rank, world_size
    cache_dir = resolve_cache_dir(cfg_data.cache_dir)
    prefixes, weights, tokenizer = _sources(cfg_data, cache_dir, model_cfg.vocab_size)
    split = str(cfg_data.split)
    document_mask = bool(getattr(cfg_data, "document_mask", False))
    # The builtin corpus' samples come from the sample cache when a run with the same
    # settings materialised them: no megatron.core import (trainer/data/sample_cache.py).
    key = cached = None
    if cfg_data.source == "builtin":
        key = sample_cache.cache_key(
            prefixes, weights=weights, seed=seed, seq_len=seq_len, split=split,
            train_samples=int(train_samples), valid_samples=int(valid_samples),
            global_batch_size=global_batch_size, document_mask=document_mask)
        cached = sample_cache.load(cache_dir, key)
        if not _all_ranks(cached is not None):  # every rank builds, or none
            cached = None
    if cached is None:  # (a cache hit passed this check when it was written)
        valid_size = _check_split(split, prefixes, valid_samples, global_batch_size)
    for prefix in prefixes:  # ids in range, the data's recorded tokenizer (if any) is ours
        check_tokens(prefix, tokenizer, model_cfg.vocab_size)
    if cached is not None:
        train_ds, valid_ds, _ = cached
    else:
        train_ds, valid_ds = _gpt_datasets(prefixes, weights, tokenizer, split, seed=seed,
                                           seq_len=seq_len, cache_dir=cache_dir,
                                           document_mask=document_mask,
                                           sizes=[int(train_samples), valid_size, 0])
        if key is not None and (not _dist_initialized()
                                or torch.distributed.get_rank() == 0):
            sample_cache.save(cache_dir, key, {"train": train_ds, "valid": valid_ds},
                              {"seq_len": seq_len, "seed": seed, "split": split})
    data = PretrainData(
        tokenizer=tokenizer,
        train_dataset=train_ds,
        valid_dataset=valid_ds,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        prefixes=prefixes,
        weights=weights,
        document_mask=document_mask,
    )
    log.info(
        "data: %s, tokenizer %s (vocab %d); %d train / %d valid samples of %d tokens",
        ", ".join(
            f"{w:g}*{p}" if w is not None else p
            for w, p in zip(weights or [None] * len(prefixes), prefixes)
        ),
        tokenizer.model_path,
        tokenizer.vocab_size,
        data.num_train_samples,
        data.num_valid_samples,
        seq_len,
    )
    return data
