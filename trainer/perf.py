"""Performance accounting: peak FLOP/s per device, throughput/MFU, peak memory.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s of all devices, where
the model FLOPs per token come from the model config (``models.flops``) and the peak is,
in this order:

=========================  ===========================================================
``trainer.peak_tflops`` >0  that number ("override"): use it for any device you know
known CUDA GPU              the *dense* (no 2:4 sparsity) datasheet number for the
                            matmul dtype in use, ``GPU_PEAK_TFLOPS`` below (e.g. H100
                            SXM bf16 989.5, A100 bf16 312, MI300X bf16 1307.4)
unknown GPU                 a 4096³ matmul benchmark at start-up
CPU                         a 1024³ matmul benchmark (best of several repeats, fp32 and
                            the autocast dtype), remembered across runs: the peak used is
                            the highest ever measured for this CPU model, thread count and
                            dtype (``$MOEFOLD_CACHE/cpu_peak_flops.json``)
=========================  ===========================================================

A benchmark on a busy machine reads low, which made MFU read above 100% (149-155% on a
shared CPU). Two decisions keep it honest: the remembered maximum (a noisy run can only
raise the peak), and :class:`Throughput` treats a measured peak as a lower bound of the
true one: if the run itself achieves more model FLOP/s than the measured peak, the peak is
raised to what was achieved, so a measured-peak MFU never exceeds 100%.
"""

from __future__ import annotations

import ctypes
import functools
import re
import resource
import sys
import time
from collections import deque

import torch

__all__ = [
    "GPU_PEAK_TFLOPS",
    "reuse_freed_cpu_memory",
    "Throughput",
    "gpu_peak_flops",
    "measure_matmul_flops",
    "peak_flops_per_device",
    "peak_memory",
    "reset_peak_memory",
]


def reuse_freed_cpu_memory(limit: int = 1 << 30) -> bool:
    """Keep freed CPU tensors' memory in the process (glibc only; True if set).

    By default glibc serves blocks above a dynamic mmap threshold (at most 32 MiB) with
    mmap and unmaps them on free. A training step's large activations are then unmapped and
    page-faulted back, zero-filled, on every step. On CPU that doubles the Mamba scan's
    time (``scripts/bench_scan.py``) and costs the MoE default ~12% tokens/s. Raising the
    mmap and trim thresholds to ``limit`` makes freed blocks reusable. The process keeps
    its peak heap; memory does not grow from step to step.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): leave the allocator alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, limit))

# Dense (non-sparse) datasheet peaks in TFLOP/s per device: (bf16, fp16, tf32, fp32).
# bf16/fp16/tf32 are tensor-core (matrix-core) numbers with fp32 accumulation; fp32 is
# the plain CUDA-core/vector number (matrix-core FP32 for AMD MI250X). NVIDIA datasheets
# quote the sparse figure first; these are half of it. First matching pattern wins, so
# more specific names come first. Checked against NVIDIA/AMD datasheets.
GPU_PEAK_TFLOPS: list[tuple[str, str, tuple[float, float, float, float]]] = [
    (r"\bGB200\b", "GB200", (2500.0, 2500.0, 1250.0, 80.0)),
    (r"\bB200\b", "B200", (2250.0, 2250.0, 1125.0, 75.0)),
    (r"\bB100\b", "B100", (1750.0, 1750.0, 875.0, 60.0)),
    (r"\bGH200\b", "GH200", (989.5, 989.5, 494.7, 66.9)),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", (835.5, 835.5, 417.5, 60.0)),
    (r"\bH200\b", "H200 SXM", (989.5, 989.5, 494.7, 66.9)),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", (835.5, 835.5, 417.5, 60.0)),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe", (756.5, 756.5, 378.0, 51.2)),
    (r"\bH100\b", "H100 SXM", (989.5, 989.5, 494.7, 66.9)),
    (r"\bH800\b.*\bPCIE\b", "H800 PCIe", (756.5, 756.5, 378.0, 51.2)),
    (r"\bH800\b", "H800 SXM", (989.5, 989.5, 494.7, 66.9)),
    (r"\bH20\b", "H20", (148.0, 148.0, 74.0, 44.0)),
    (r"\bA100\b", "A100", (312.0, 312.0, 156.0, 19.5)),
    (r"\bA800\b", "A800", (312.0, 312.0, 156.0, 19.5)),
    (r"\bA30\b", "A30", (165.0, 165.0, 82.0, 10.3)),
    (r"\bA10\b", "A10", (125.0, 125.0, 62.5, 31.2)),
    (r"\bL40S\b", "L40S", (362.0, 362.0, 183.0, 91.6)),
    (r"\bL40\b", "L40", (181.0, 181.0, 90.5, 90.5)),
    (r"\bL4\b", "L4", (121.0, 121.0, 60.0, 30.3)),
    (r"\bRTX 4090\b", "RTX 4090", (165.2, 165.2, 82.6, 82.6)),
    (r"\bRTX 3090\b", "RTX 3090", (71.0, 71.0, 35.6, 35.6)),
    # Volta has no bf16/tf32 tensor cores; bf16 is emulated, so quote fp32 for it.
    (r"\bV100\b", "V100 SXM2", (15.7, 125.0, 15.7, 15.7)),
    (r"\bMI300X\b|\bMI325X\b", "MI300X/MI325X", (1307.4, 1307.4, 653.7, 163.4)),
    (r"\bMI300A\b", "MI300A", (980.6, 980.6, 490.3, 122.6)),
    (r"\bMI250X?\b", "MI250X", (383.0, 383.0, 95.7, 95.7)),
]

_COLUMN = {torch.bfloat16: 0, torch.float16: 1}


def _fp32_uses_tf32() -> bool:
    """Whether fp32 matmuls on CUDA run on TF32 tensor cores under the current settings."""
    if torch.get_float32_matmul_precision() != "highest":
        return True
    return getattr(torch.backends.cuda.matmul, "fp32_precision", "none") == "tf32"


def gpu_peak_flops(name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """Dense datasheet peak FLOP/s for a GPU named ``name`` (as CUDA reports it), or None."""
    for pattern, label, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if dtype in _COLUMN:
                col, kind = _COLUMN[dtype], str(dtype).removeprefix("torch.")
            elif _fp32_uses_tf32():
                col, kind = 2, "tf32"
            else:
                col, kind = 3, "fp32"
            return peaks[col] * 1e12, f"table: {label} dense {kind}"
    return None


@functools.cache
def _measure_cached(
    device: str, dtype: torch.dtype, n: int, threads: int, budget_s: float
) -> float:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up: thread pool, kernel selection
    sync()
    best, deadline = float("inf"), time.perf_counter() + budget_s
    for i in range(20):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() > deadline:
            break
    return 2.0 * n**3 / max(best, 1e-12)


def measure_matmul_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    budget_s: float = 0.4,
) -> float:
    """Best-of-N FLOP/s of an n³ matmul on ``device`` (cached per device/dtype/threads).

    On CPU it runs on ``torch.get_num_threads()`` threads (part of the cache key), so a
    process that changes its thread count gets a fresh measurement.
    """
    dev = torch.device(device)
    if n is None:
        n = 4096 if dev.type == "cuda" else 1024
    return _measure_cached(str(dev), dtype, n, torch.get_num_threads(), budget_s)


def peak_flops_per_device(
    device: torch.device | str, dtype: torch.dtype, override_tflops: float = 0.0
) -> tuple[float, str]:
    """Peak FLOP/s of one device for matmuls in ``dtype``, and where the number came from.

    ``override_tflops`` > 0 wins ("override"); a known CUDA GPU uses the dense datasheet
    table ("table: H100 SXM dense bfloat16"); anything else is measured ("measured: ...").
    """
    if override_tflops > 0:
        return override_tflops * 1e12, "override"
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        hit = gpu_peak_flops(name, dtype)
        if hit is not None:
            return hit
        flops = measure_matmul_flops(dev, dtype)
        return flops, f"measured: 4096^3 {_dtype_name(dtype)} matmul on unknown GPU {name!r}"
    n = 1024
    threads = torch.get_num_threads()
    # CPUs without native bf16 matmul units run bf16 far slower than fp32 while autocast
    # still leaves much of the work in fp32: take the faster of the two as the peak, so
    # MFU stays a fraction of what the device can do.
    best = max(
        ((measure_matmul_flops(dev, dt, n=n), dt) for dt in {dtype, torch.float32}),
        key=lambda fd: fd[0],
    )
    flops, remembered = _remember_cpu_peak(f"{_cpu_name()}|{threads}|{_dtype_name(dtype)}",
                                           best[0])
    return flops, (
        f"measured: {n}^3 {_dtype_name(best[1])} matmul on {dev.type}, {threads} threads"
        + (", best of earlier runs" if remembered else "")
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _remember_cpu_peak(key: str, flops: float) -> tuple[float, bool]:
    """max(flops, the highest earlier measurement under ``key``), remembered in
    ``$MOEFOLD_CACHE/cpu_peak_flops.json`` (best effort: no cache dir, no memory); True
    when an earlier run's number won."""
    import json
    import os
    import tempfile

    root = os.environ.get("MOEFOLD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "moefold")
    path = os.path.join(root, "cpu_peak_flops.json")
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    earlier = known.get(key)
    if isinstance(earlier, (int, float)) and earlier >= flops:
        return float(earlier), True
    known[key] = flops
    try:
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".cpu_peak.")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return flops, False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Throughput:
    """Tokens/s, step time and MFU per step, smoothed over a window of recent steps
    (``tokens_per_s``, ``step_time_s``; this step's own numbers are ``tokens_per_s_raw`` and
    ``step_time_s_raw``).

    ``tokens`` passed to :meth:`end_step` are the tokens the *whole world* processed in
    the step (the global batch), so ``mfu = tokens_per_s * flops_per_token /
    (peak_flops * world_size)``. The first step (warm-up: allocator, kernel selection,
    compile) is reported as-is and then left out of the window so it does not drag the
    average. The window is a ratio of sums (total tokens / total time), not a mean of
    per-step rates, so it is the true throughput over those steps.
    """

    def __init__(
        self,
        flops_per_token: float = 0.0,
        peak_flops: float = 0.0,
        world_size: int = 1,
        window: int = 20,
        peak_is_lower_bound: bool = False,
    ):
        if world_size < 1 or window < 1:
            raise ValueError(f"world_size={world_size} and window={window} must be >= 1")
        self.flops_per_token = float(flops_per_token)
        self.peak_flops = float(peak_flops)
        self.world_size = world_size
        # a measured peak: raised to what the run achieves, so MFU stays <= 100%
        self.peak_is_lower_bound = peak_is_lower_bound
        self.steps = 0
        self._t0: float | None = None
        self._window: deque[tuple[float, float]] = deque(maxlen=window)

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def end_step(self, tokens: int) -> dict[str, float]:
        if self._t0 is None:
            raise RuntimeError("Throughput.end_step() called without start_step()")
        dt = max(time.perf_counter() - self._t0, 1e-12)
        self._t0 = None
        self.steps += 1
        if self.steps == 1:
            total_tokens, total_time, n = float(tokens), dt, 1
        else:
            self._window.append((float(tokens), dt))
            total_tokens = sum(t for t, _ in self._window)
            total_time = sum(s for _, s in self._window)
            n = len(self._window)
        tokens_per_s = total_tokens / total_time
        out = {"tokens_per_s": tokens_per_s, "step_time_s": total_time / n,
               "tokens_per_s_raw": tokens / dt, "step_time_s_raw": dt}
        if self.flops_per_token > 0:
            model_flops = tokens_per_s * self.flops_per_token / self.world_size
            out["tflops_per_device"] = model_flops / 1e12
            if self.peak_flops > 0:
                if self.peak_is_lower_bound and model_flops > self.peak_flops:
                    self.peak_flops = model_flops
                out["mfu"] = model_flops / self.peak_flops
        return out


def at_flops_per_token(perf: dict[str, float], meter: Throughput, flops_per_token: float
                       ) -> dict[str, float]:
    """``perf`` (one :meth:`Throughput.end_step` result) with ``tflops_per_device`` and
    ``mfu`` recounted at ``flops_per_token`` instead of the meter's static figure: with
    null experts the trainer passes the FLOPs of the real experts the step's tokens
    picked (the static count assumes top_k, an upper bound)."""
    if meter.flops_per_token <= 0:
        return perf
    scale = flops_per_token / meter.flops_per_token
    return {k: v * scale if k in ("tflops_per_device", "mfu") else v for k, v in perf.items()}


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak memory in GiB: CUDA allocated/reserved since the last reset, else process max RSS.

    Without ``device``: CUDA if it has been initialised in this process, else CPU. The
    CPU number (``ru_maxrss``) covers the whole process lifetime and cannot be reset.
    """
    dev = _default_device(device)
    if dev.type == "cuda":
        return {
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_mem_gib": rss_bytes / 2**30}


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Reset the CUDA peak counters (no-op on CPU: max RSS cannot be reset)."""
    dev = _default_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
