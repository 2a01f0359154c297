"""``build_data``: the one entry point from ``cfg.data`` to the run's ``TrainData``,
picking the implementation by ``data.source`` from ``BUILDERS``."""

from __future__ import annotations

from typing import Any, Protocol

from trainer.data.indexed import build_indexed
from trainer.data.multimodal import build_multimodal
from trainer.data.protocol import TrainData
from trainer.errors import ConfigError


class DataBuilder(Protocol):
    def __call__(
        self,
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
    ) -> TrainData: ...


# data.source -> builder. trainer.config.validate checks data.source against the same names.
BUILDERS: dict[str, DataBuilder] = {
    "builtin": build_indexed,  # the embedded pydoc corpus, tokenised into the cache
    "indexed": build_indexed,  # your Megatron .bin/.idx datasets (data.blend)
    "multimodal": build_multimodal,  # the embedded captioned digits (data.setting)
}


def build_data(
    data_cfg: Any,
    *,
    seq_len: int,
    seed: int,
    global_batch_size: int,
    train_samples: int,
    valid_samples: int,
    model_cfg: Any,
    rank: int = 0,
    world_size: int = 1,
) -> TrainData:
    """Build the data of a run from ``cfg.data`` (a DataConfig or its DictConfig).

    ``train_samples``/``valid_samples``: how many samples the run will read (datasets
    that are built to a size use them); ``model_cfg``: the model config (vocabulary size,
    diffusion settings), checked against the data. Works in a single process and in
    every rank of an initialised torch.distributed job.
    """
    source = data_cfg.source
    if source not in BUILDERS:
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(map(repr, BUILDERS))}")
    return BUILDERS[source](
        data_cfg,
        seq_len=seq_len,
        seed=seed,
        global_batch_size=global_batch_size,
        train_samples=train_samples,
        valid_samples=valid_samples,
        model_cfg=model_cfg,
        rank=rank,
        world_size=world_size,
    )
