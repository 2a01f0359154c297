"""The CUDA path made right where the CPU can check it (issue 19, GPU_CHECKLIST items 2-4,
8, 9): fp32 regions stay fp32 under autocast, the Mamba kernel switch fails loudly when
the kernels are required, FSDP2's bf16 policy and last-micro-batch gradient sync, the
grad-norm all-reduce on the grads' device, pipeline backward outside autocast and a
priming pass that does not send every token to the same experts."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from models.build import build_model
from models.config import ModelConfig


class EinsumDtypes(TorchFunctionMode):
    """Records the output dtype of every ``torch.einsum`` call."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.einsum:
            self.dtypes.append(out.dtype)
        return out


def _mom_cfg(**mamba) -> ModelConfig:
    cfg = ModelConfig(arch="mom", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, ffn_hidden_size=64, max_seq_len=32)
    cfg.mot.modalities = ["text", "image", "speech"]
    for k, v in mamba.items():
        setattr(cfg.mamba, k, v)
    return cfg


def test_mamba_scan_contractions_stay_fp32_under_cpu_bf16_autocast():
    """CPU autocast lowers einsum to bf16 as CUDA's does (checked first, so the test can
    fail); the scan's contraction must still produce fp32 and match the fp32 run."""
    from models.mamba import selective_scan, selective_scan_naive
    from models.modality import ModalityRoute

    a, c = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.einsum("btdn,btn->btd", a, c).dtype == torch.bfloat16  # the hazard
    torch.manual_seed(0)
    Bt, T, Dn, N = 2, 40, 8, 4
    u, delta = torch.randn(Bt, T, Dn), torch.rand(Bt, T, Dn) * 0.1
    A, B, C, D = -torch.rand(Dn, N) - 0.5, torch.randn(Bt, T, N), torch.randn(Bt, T, N), \
        torch.randn(Dn)
    want = selective_scan(u, delta, A, B, C, D, chunk=8)
    with torch.autocast("cpu", dtype=torch.bfloat16), EinsumDtypes() as rec:
        got = selective_scan(u, delta, A, B, C, D, chunk=8)
        naive = selective_scan_naive(u, delta, A, B, C, D)
    assert rec.dtypes and set(rec.dtypes) == {torch.float32}
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # bit-identical: no bf16 inside
    torch.testing.assert_close(naive, want, rtol=1e-5, atol=1e-5)
    # the whole mixer under autocast: its projections are bf16, every contraction fp32
    model = build_model(_mom_cfg())
    mixer = model.layers["0"].mixer
    route = ModalityRoute.build(torch.randint(0, 3, (2, 16)), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), EinsumDtypes() as rec:
        mixer(torch.randn(2, 16, 32), route)
    assert rec.dtypes and set(rec.dtypes) == {torch.float32}


def test_mamba_kernels_required_raise_and_auto_logs_once(monkeypatch, caplog):
    """kernels=cuda: a missing package is an error naming it; auto: the reference runs and
    one warning says why; torch: the kernels are never asked for."""
    from models import mamba_kernels

    monkeypatch.setattr(mamba_kernels, "load", lambda name: (None, "ImportError: no mamba_ssm"))
    mamba_kernels._announce.cache_clear()
    x = torch.empty(1, 4, 16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="kernels=cuda but mamba_ssm is not importable"):
        mamba_kernels.scan_kernel(x, "cuda")
    with caplog.at_level("INFO", logger="models.mamba_kernels"):
        assert mamba_kernels.scan_kernel(x, "auto") is None
        assert mamba_kernels.scan_kernel(x, "auto") is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "no mamba_ssm" in caplog.records[0].getMessage()
    assert mamba_kernels.scan_kernel(x, "torch") is None
    # auto leaves the conv kernel alone where its layout rule fails (channels % 8)
    assert mamba_kernels.conv_kernel(torch.empty(1, 4, 12, device="meta"), "auto") is None
    mamba_kernels._announce.cache_clear()


@pytest.mark.parametrize("overrides, world, match", [
    (["model.hidden_size=36", "parallel.tp=1"], 1, r"= 2\*36/1 = 72|OK"),
    (["model.hidden_size=38", "parallel.tp=1"], 1, r"2\*38/1 = 76 must be a multiple of 8"),
    (["model.hidden_size=64", "model.mamba.expand=1", "parallel.tp=2",
      "trainer.seq_len=160"], 2, r"1\*64/2 = 32|OK"),
    (["model.hidden_size=40", "model.mamba.expand=1", "parallel.tp=2", "model.head_dim=8",
      "trainer.seq_len=160"], 2, r"1\*40/2 = 20 must be a multiple of 8"),
    (["trainer.device=cpu"], 1, "model.mamba.kernels=cuda needs trainer.device=cuda"),
])
def test_mamba_kernels_cuda_config_checks(overrides, world, match):
    """kernels=cuda validates causal_conv1d's layout rule on the local d_inner before
    launch (auto stays lenient: it falls back to the reference)."""
    from tests.helpers import compose_config
    from trainer.config import ConfigError, validate

    common = ["model=mom_tiny", "data=digits_chameleon", "trainer.device=cuda",
              "model.head_dim=8"]
    cfg = compose_config([*common, "model.mamba.kernels=cuda", *overrides])
    if match.endswith("|OK"):
        validate(cfg, world)
    else:
        with pytest.raises(ConfigError, match=match):
            validate(cfg, world)
    validate(compose_config([*common, "model.mamba.kernels=auto", *overrides]), world)
