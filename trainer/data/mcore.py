"""Megatron-Core's dataset modules (``megatron.core.datasets``, used as a library),
imported on first use: the import is slow, and noisy without TE/Apex."""

from __future__ import annotations

import logging
import warnings
from types import ModuleType
from typing import NamedTuple


class McoreDatasets(NamedTuple):
    blended_megatron_dataset_builder: ModuleType
    blended_megatron_dataset_config: ModuleType
    gpt_dataset: ModuleType
    indexed_dataset: ModuleType


def mcore_datasets() -> McoreDatasets:
    """The megatron.core.datasets modules this package uses, imported on first use."""
    mcore_log = logging.getLogger("megatron.core.datasets")
    if mcore_log.level == logging.NOTSET:  # its per-file INFO chatter, unless asked for
        mcore_log.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import (
            blended_megatron_dataset_builder,
            blended_megatron_dataset_config,
            gpt_dataset,
            indexed_dataset,
        )
    return McoreDatasets(
        blended_megatron_dataset_builder,
        blended_megatron_dataset_config,
        gpt_dataset,
        indexed_dataset,
    )
