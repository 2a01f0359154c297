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


def test_grad_norm_all_reduce_stays_on_the_grads_device(monkeypatch):
    """NCCL reduces device tensors only: the norm's all-reduce gets a tensor on the grads'
    device, and a rank without local gradients uses the model's device, not the CPU.
    The meta device stands in for CUDA (a CPU default would show as 'cpu')."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from parallel.data_parallel import DataParallel

    dims = SimpleNamespace(dp=2, cp=1, edp=1, ep=1, etp=1, pp=1, world_size=2)
    model = torch.nn.Linear(4, 4, device="meta")
    dp = DataParallel(model, dims, "ddp", overlap=False)  # no groups on the fake dims
    sent = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: sent.append(t.device))
    dp.clip_grad_norm_(1.0)  # no local gradients
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dp.clip_grad_norm_(1.0)
    assert sent == [torch.device("meta")] * 2


def _tiny_overrides(steps: int = 2) -> list[str]:
    return [f"trainer.max_steps={steps}", "trainer.seq_len=32", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=4", "trainer.eval_every=0", "checkpoint.every=0",
            "checkpoint.save_final=false", "logger.console=none", "logger.tensorboard=false",
            "logger.expert_load_every=0", "optim.warmup_steps=1", "optim.lr=3e-3"]


JOBS = {  # name -> overrides: dp2 runs 2 micro-batches per rank per step
    "fsdp_fp32_every": ["parallel.fsdp_grad_sync=every", "trainer.precision=fp32"],
    "fsdp_fp32_last": ["parallel.fsdp_grad_sync=last", "trainer.precision=fp32"],
    "fsdp_bf16_last": ["parallel.fsdp_grad_sync=last", "trainer.precision=bf16"],
    "pp2_bf16": ["parallel.pp=2", "parallel.pp_schedule=gpipe", "trainer.precision=bf16"],
}


def _ranks(rank: int, world: int, jobs: list, cache: str) -> dict:
    """Rank body: the jobs through the trainer with bytes counted, then the priming-input
    check of the pipeline stage (parallel.pipeline.stage_class)."""
    from contextlib import nullcontext

    import torch.distributed as dist
    from torch.distributed.pipelining._utils import extract_tensor_metas

    from parallel.pipeline import stage_class
    from scripts.bench_comm_bytes import measure_rank

    out = {"bytes": measure_rank(rank, world, jobs, cache)}
    stage = stage_class()(torch.nn.Linear(16, 16), rank, world, torch.device("cpu"),
                          group=dist.group.WORLD, autocast=nullcontext)
    meta = extract_tensor_metas((torch.zeros(2, 64, 16, requires_grad=True),))[0]
    x = stage._to_tensor(meta)
    gate = torch.nn.Linear(16, 8)
    counts = torch.bincount(gate(x.detach().reshape(-1, 16)).topk(2).indices.flatten(), minlength=8)
    out["prime"] = (x.requires_grad, float(x.std()), counts.tolist())
    return out


@pytest.mark.distributed
def test_fsdp_bf16_last_micro_batch_sync_and_pp_autocast(single_run, tmp_path, moefold_cache):
    """dp2 FSDP: bf16 all-gathers half the fp32 bytes, gradients reduce-scatter in fp32,
    only once per step with fsdp_grad_sync=last (1/micro-batches of every), at equal
    losses; PP under bf16 autocast (forward-only autocast) matches the single-process bf16
    micro-batch loop; the PP priming pass feeds spread-out inputs."""
    from tests.distributed_utils import spawn
    from tests.helpers import read_metrics

    jobs = [(n, [*_tiny_overrides(), *extra], str(tmp_path / n)) for n, extra in JOBS.items()]
    res = spawn(_ranks, 2, jobs, str(moefold_cache), timeout_s=300)
    got = res[0]["bytes"]

    def by(name, coll):
        return {d: b for (c, d), b in got[name].items() if c == coll}

    ag = {n: by(n, "all_gather_single") for n in JOBS if n.startswith("fsdp")}
    rs = {n: by(n, "reduce_scatter_single") for n in JOBS if n.startswith("fsdp")}
    assert set(ag["fsdp_fp32_last"]) == {"float32"} and set(ag["fsdp_bf16_last"]) == {"bfloat16"}
    assert ag["fsdp_bf16_last"]["bfloat16"] * 2 == ag["fsdp_fp32_last"]["float32"]
    assert all(set(r) == {"float32"} for r in rs.values())  # fp32 reduction, also in bf16
    micro = 2
    assert rs["fsdp_fp32_every"]["float32"] == micro * rs["fsdp_fp32_last"]["float32"]
    assert rs["fsdp_bf16_last"] == rs["fsdp_fp32_last"]
    every, last = (read_metrics(tmp_path / n) for n in ("fsdp_fp32_every", "fsdp_fp32_last"))
    for step in (1, 2):
        assert last[step]["loss"] == pytest.approx(every[step]["loss"], rel=1e-6)
    ref = read_metrics(single_run([*_tiny_overrides(), "trainer.precision=bf16"]))
    # PP runs the same ops under autocast as the loop (measured: equal losses); the bf16
    # FSDP policy also rounds norm / router weights to bf16 (measured: rel 1.6e-4)
    for name, rel in (("pp2_bf16", 1e-5), ("fsdp_bf16_last", 2e-3)):
        m = read_metrics(tmp_path / name)
        for step in (1, 2):
            print(f"{name} step {step}: loss {m[step]['loss']:.6f} vs single-process bf16 "
                  f"{ref[step]['loss']:.6f} (rel {m[step]['loss'] / ref[step]['loss'] - 1:+.1e})")
            assert m[step]["loss"] == pytest.approx(ref[step]["loss"], rel=rel), (name, step)
    for requires_grad, std, counts in (r["prime"] for r in res):
        assert requires_grad and 0.8 < std < 1.2
        assert max(counts) < 0.5 * sum(counts)  # zeros would send every token to 2 experts


def test_gpu_check_cpu_smoke(tmp_path):
    """scripts/gpu_check.py is not dead code: its in-process steps run at tiny sizes on
    CPU (the CUDA-only ones say SKIP) and the table is written; the training steps'
    experiment config validates (the full `bash scripts/gpu_check.sh --cpu-smoke` also
    trains them, ~2.5 minutes)."""
    from scripts import gpu_check
    from tests.helpers import compose_config
    from trainer.config import validate

    rc = gpu_check.main(["--cpu-smoke", "--only", "0", "1", "2", "3", "4", "5", "6", "7",
                         "--out", str(tmp_path)])
    md = (tmp_path / "gpu_check.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == 11, md  # "--only 2" also selects 2b and 2c, "4" 4b
    results = {r.split(" | ")[0][2:]: r.split(" | ")[1] for r in rows}
    assert rc == 0 and "FAIL" not in results.values(), md
    assert results["3 SDPA kernels + memory"] == "SKIP"  # CUDA-only
    assert results["2b expert kernels: fused / segments / padded"] == "PASS"
    assert results["7 routing on priming input"] == "PASS"
    assert results["4b two-batch stepped forward"] == "PASS"
    validate(compose_config(["experiment=gpu_check_1b"]), 1)
