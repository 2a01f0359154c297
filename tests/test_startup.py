"""Start-up: the builtin corpus' sample cache (no megatron.core import on a cache hit)
gives Megatron's samples exactly, in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from trainer import data as D
from trainer.config import DataConfig
from trainer.data.sample_cache import SampleArrays

REPO = Path(__file__).resolve().parents[1]
_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _build(cache: Path, seed: int, document_mask: bool) -> D.PretrainData:
    cfg = DataConfig(source="builtin", cache_dir=str(cache), document_mask=document_mask)
    return D.build_data(cfg, seq_len=24, seed=seed, global_batch_size=8, train_samples=96,
                        valid_samples=16, model_cfg=NS(vocab_size=2048))


def test_builtin_sample_cache_is_megatron_exact(moefold_cache):
    # per-document position ids: the field that differs most between samples
    seed, document_mask = 4242, True  # a key no other test writes: the first build misses
    first = _build(moefold_cache, seed, document_mask)
    assert not isinstance(first.train_dataset, SampleArrays)  # Megatron's dataset
    again = _build(moefold_cache, seed, document_mask)
    assert isinstance(again.train_dataset, SampleArrays)  # from the cache
    for a, b in ((first.train_dataset, again.train_dataset),
                 (first.valid_dataset, again.valid_dataset)):
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            x, y = a[i], b[i]
            for k in _KEYS:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)
    for c in (0, 8, 88):
        for x, y in zip(first.train_microbatches(c, 2, 1, 2), again.train_microbatches(c, 2, 1, 2),
                        strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    other = _build(moefold_cache, seed, False)  # another key: Megatron again
    assert not isinstance(other.train_dataset, SampleArrays)


def test_cache_hit_does_not_import_megatron(moefold_cache):
    _build(moefold_cache, 4242, False)  # writes the cache (a hit after the test above)
    code = ("import sys; from types import SimpleNamespace as NS; "
            "from trainer import data as D; from trainer.config import DataConfig; "
            f"d = D.build_data(DataConfig(source='builtin', cache_dir={str(moefold_cache)!r}), "
            "seq_len=24, seed=4242, global_batch_size=8, train_samples=96, valid_samples=16, "
            "model_cfg=NS(vocab_size=2048)); d.train_microbatches(0, 2, 0, 1); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_old_torch_fails_with_one_line_naming_the_floor():
    from trainer.errors import UserError
    from trainer.runtime import TORCH_FLOOR, check_torch

    need = ".".join(map(str, TORCH_FLOOR))
    with pytest.raises(UserError, match=rf"^torch 2\.7\.1\+cu126 is too old: moefold needs "
                                        rf"torch>={need} \(") as e:
        check_torch("2.7.1+cu126")
    assert "\n" not in str(e.value)
    for ok in (f"{need}.0", "2.13.0+cpu", "3.0.0a0"):
        check_torch(ok)
    check_torch()  # the installed torch
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch>={need}"' in pyproject  # the declared floor is the checked one


def test_dp_engine_auto_replicates_while_the_state_fits():
    from omegaconf import OmegaConf

    from models import build_model
    from parallel.dims import ParallelDims
    from parallel.parallelize import STATE_BYTES_PER_PARAM, choose_dp_engine
    from tests.helpers import compose_config

    cfg = compose_config(["parallel.dp_engine=auto"])
    model = build_model(OmegaConf.to_object(cfg.model), device="meta")
    state = sum(p.numel() for p in model.parameters()) * STATE_BYTES_PER_PARAM
    dims2 = ParallelDims.from_config(cfg.parallel, 2, rank=0)
    cpu = torch.device("cpu")
    roomy, tight = 8 * state / 2**30, 2 * state / 2**30  # GiB: state is 1/8, 1/2 of it
    assert choose_dp_engine(model, dims2, cpu, roomy, collective=False)[0] == "ddp"
    engine, note = choose_dp_engine(model, dims2, cpu, tight, collective=False)
    assert engine == "fsdp" and note.startswith("parallel.dp_engine=auto: fsdp (")
    dims1 = ParallelDims.from_config(cfg.parallel, 1, rank=0)  # nothing to reduce over
    assert choose_dp_engine(model, dims1, cpu, tight, collective=False)[0] == "ddp"
    # the host's memory: a tiny model replicates
    assert choose_dp_engine(model, dims2, cpu, collective=False)[0] == "ddp"


def test_prefetched_batches_train_bit_identically(single_run):
    from tests.helpers import FAST, read_metrics

    base = [*FAST, "trainer.max_steps=3", "checkpoint.save_final=false"]
    off = read_metrics(single_run([*base, "trainer.prefetch=off"]))
    on = read_metrics(single_run([*base, "trainer.prefetch=on"]))
    assert sorted(on) == sorted(off) == [1, 2, 3]
    for step in off:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert on[step][key] == off[step][key], (step, key)
