"""What a training job cost: speed, model FLOPs utilisation against a measured peak, memory.

MFU (PaLM, appendix B) is the model FLOPs a job achieved per second divided by the peak the
device reaches. The peak is measured on the same device in the same process by timing large
matrix multiplications in the training precision (:func:`measured_peak_flops`), not taken from
a datasheet, so the ratio says how much of what the hardware can do the training loop uses.
"""

from __future__ import annotations

import resource
import time

import torch


def measured_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` square ``n x n`` matmuls (2 n^3 FLOPs each)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    best = float("inf")
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:  # the first one warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_memory_mib(device: str | torch.device = "cpu") -> dict:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "cpu_peak_rss"}


def speed(tokens: int, seconds: float, flops_per_token: float, peak_flops: float | None) -> dict:
    """tokens/s, achieved GFLOP/s and MFU of ``tokens`` trained in ``seconds``."""
    if seconds <= 0 or tokens <= 0:
        return {"tokens_per_s": None, "flops_per_token": flops_per_token, "gflops_per_s": None,
                "peak_gflops_per_s": round(peak_flops / 1e9, 3) if peak_flops else None, "mfu": None}
    tps = tokens / seconds
    achieved = tps * flops_per_token
    return {"tokens_per_s": round(tps, 1), "flops_per_token": flops_per_token,
            "gflops_per_s": round(achieved / 1e9, 3),
            "peak_gflops_per_s": round(peak_flops / 1e9, 3) if peak_flops else None,
            "mfu": round(achieved / peak_flops, 4) if peak_flops else None}
