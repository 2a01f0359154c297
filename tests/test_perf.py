import pytest
import torch

from trainer import perf
from trainer.perf import Throughput, gpu_peak_flops, peak_flops_per_device, peak_memory


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(perf.time, "perf_counter", c)
    return c


def _step(tp: Throughput, clock: FakeClock, seconds: float, tokens: int) -> dict:
    tp.start_step()
    clock.t += seconds
    return tp.end_step(tokens)


def test_throughput_first_step_as_is_then_window_ratio_of_sums(clock):
    tp = Throughput(window=2)
    first = _step(tp, clock, 2.0, 100)  # warm-up step, reported as-is
    assert first == pytest.approx({"tokens_per_s": 50.0, "step_time_s": 2.0,
                                   "tokens_per_s_raw": 50.0, "step_time_s_raw": 2.0})
    assert "mfu" not in first  # no flops_per_token / peak given
    # From step 2 on, the warm-up step is out of the window.
    assert _step(tp, clock, 1.0, 100) == pytest.approx({"tokens_per_s": 100.0, "step_time_s": 1.0,
                                                        "tokens_per_s_raw": 100.0,
                                                        "step_time_s_raw": 1.0})
    # Ratio of sums over the window (300 tokens / 4 s), not the mean of 100 and 66.7 tok/s;
    # the step's own rate stays under its own key.
    assert _step(tp, clock, 3.0, 200) == pytest.approx({"tokens_per_s": 75.0, "step_time_s": 2.0,
                                                        "tokens_per_s_raw": 200 / 3,
                                                        "step_time_s_raw": 3.0})
    # Window of 2: the step-2 sample falls out -> (200 + 400) / (3 + 1).
    assert _step(tp, clock, 1.0, 400)["tokens_per_s"] == pytest.approx(150.0)


def test_mfu_formula_over_the_whole_world(clock):
    tp = Throughput(flops_per_token=6e6, peak_flops=1e12, world_size=4)
    out = _step(tp, clock, 0.5, 1000)  # 2000 tok/s for the world
    assert out["tokens_per_s"] == pytest.approx(2000.0)
    # 2000 tok/s * 6 MFLOP/token over 4 devices of 1 TFLOP/s each.
    assert out["mfu"] == pytest.approx(2000 * 6e6 / (1e12 * 4))
    assert out["tflops_per_device"] == pytest.approx(2000 * 6e6 / 4 / 1e12)
    assert 0.0 < out["mfu"] < 1.0


def test_measured_peak_is_a_lower_bound(clock, tmp_path, monkeypatch):
    """A measured peak that the run itself beats is raised: MFU never reads above 100%."""
    tp = Throughput(flops_per_token=1e6, peak_flops=1e9, peak_is_lower_bound=True)
    assert _step(tp, clock, 1.0, 2000)["mfu"] == pytest.approx(1.0)  # 2 GFLOP/s achieved
    assert _step(tp, clock, 1.0, 1000)["mfu"] == pytest.approx(0.5)  # 1 of 2 GFLOP/s
    assert Throughput(flops_per_token=1e6, peak_flops=1e9).end_step  # datasheet: as is
    # the CPU peak is the best ever measured on this machine (a busy run reads low)
    monkeypatch.setenv("MOEFOLD_CACHE", str(tmp_path))
    assert perf._remember_cpu_peak("k", 5.0) == (5.0, False)
    assert perf._remember_cpu_peak("k", 3.0) == (5.0, True)
    assert perf._remember_cpu_peak("k", 7.0) == (7.0, False)


def test_end_step_without_start_is_an_error():
    with pytest.raises(RuntimeError, match="start_step"):
        Throughput().end_step(10)


def test_override_wins():
    assert peak_flops_per_device("cpu", torch.float32, 123.0) == (123e12, "override")


@pytest.mark.parametrize(
    "name,dtype,tflops,label",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5, "H100 SXM"),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5, "H100 PCIe"),
        ("NVIDIA H100 NVL", torch.float16, 835.5, "H100 NVL"),
        ("NVIDIA H200", torch.bfloat16, 989.5, "H200 SXM"),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.5, "GH200"),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0, "A100"),
        ("NVIDIA A100 80GB PCIe", torch.float32, 19.5, "A100"),
        ("NVIDIA A10", torch.bfloat16, 125.0, "A10"),
        ("NVIDIA L40S", torch.bfloat16, 362.0, "L40S"),
        ("NVIDIA L40", torch.bfloat16, 181.0, "L40"),
        ("NVIDIA L4", torch.bfloat16, 121.0, "L4"),
        ("NVIDIA B200", torch.bfloat16, 2250.0, "B200"),
        ("AMD Instinct MI300X", torch.bfloat16, 1307.4, "MI300X/MI325X"),
    ],
)
def test_gpu_table(name, dtype, tflops, label):
    flops, source = gpu_peak_flops(name, dtype)
    assert flops == pytest.approx(tflops * 1e12)
    assert source.startswith(f"table: {label} dense")


def test_gpu_table_unknown_and_tf32(monkeypatch):
    assert gpu_peak_flops("NVIDIA A10G", torch.bfloat16) is None  # not the A10
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls run as TF32
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == (
            pytest.approx(494.7e12),
            "table: H100 SXM dense tf32",
        )
    finally:
        torch.set_float32_matmul_precision(prev)


def test_cuda_device_uses_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA B200")
    flops, source = peak_flops_per_device(torch.device("cuda", 0), torch.bfloat16)
    assert flops == pytest.approx(2250e12) and source == "table: B200 dense bfloat16"


def test_cpu_measured_peak_plausible():
    flops, source = peak_flops_per_device(torch.device("cpu"), torch.float32)
    assert source.startswith("measured")
    assert f"{torch.get_num_threads()} threads" in source
    # More than 1 GFLOP/s, less than any CPU can do in fp32 on a few cores.
    assert 1e9 < flops < 1e14
    assert peak_flops_per_device("cpu", torch.float32)[0] == flops  # cached, not re-measured


def test_peak_memory_cpu_rss():
    before = peak_memory("cpu")["peak_mem_gib"]
    x = torch.ones(64, 2**20)  # 256 MiB, touched
    after = peak_memory("cpu")["peak_mem_gib"]
    assert x.sum().item() == 64 * 2**20
    assert after >= before and after >= 0.25
    perf.reset_peak_memory("cpu")  # no-op on CPU, must not fail


def test_cpu_allocator_keeps_freed_memory_on_glibc():
    import platform
    import sys

    from trainer.perf import reuse_freed_cpu_memory

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_cpu_memory() is expected
