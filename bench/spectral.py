"""Singular-value step of the spectral analysis: seconds per matrix, ours vs numpy, and a 7B estimate.

    python bench/spectral.py       # prints a markdown table and writes bench/spectral-results.md

- ours: ``learnforget.analyze.spectral._svdvals`` (``torch.linalg.svdvals`` in float32, the call
  ``analyze`` makes three times per weight matrix) on CPU, and on CUDA when torch sees a GPU
  (host-to-device copy and the copy back included, as in ``analyze``; synchronised);
- baseline: ``numpy.linalg.svd(A, compute_uv=False)`` on the same float32 matrix, on CPU, in
  the same run; ratio = numpy seconds / ours;
- shapes: 4096x4096, 4096x11008 and 11008x4096 (Llama-2-7B's attention, MLP down and MLP
  gate/up weights; LAPACK's time differs between a shape and its transpose) and 192x512 (the
  default study's); the matrices are seeded standard Gaussians, so their spectra also give the
  paper's Gaussian reference (rank for 90 % of the variance: about 2088 and 2917);
- 7B estimate: 32 layers x (4 attention matrices 4096x4096 + gate and up 11008x4096 + down
  4096x11008) x 3 svdvals (W, W + dW, dW), plus one Gaussian reference per distinct shape.

Environment: ``BENCH_REPEATS`` (best of N for the big shapes, default 1: one 4096x11008 SVD takes
tens of seconds on 2 cores; the small shape uses at least 5), ``BENCH_THREADS`` (torch and
numpy's BLAS/LAPACK threads, default ``os.cpu_count()``). Timings depend on the machine and its
load; the output records the machine.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learnforget.core.io import write_text  # noqa: E402
from learnforget.analyze.spectral import _svdvals, rank_for_variance  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "1"))
THREADS = int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1)))
SMALL_REPEATS = max(REPEATS, 5)
# torch weights are (out_features, in_features): q, k, v, o 4096x4096; gate, up 11008x4096 (tall);
# down 4096x11008 (wide). LAPACK's cost differs between a shape and its transpose, so both are timed.
SHAPES = ((192, 512), (4096, 4096), (4096, 11008), (11008, 4096))
# paper's reference: rank for 90 % of the variance of a Gaussian matrix of the shape
PAPER_GAUSSIAN_RANK90 = {(4096, 4096): 2088, (4096, 11008): 2917, (11008, 4096): 2917}
LLAMA7B_LAYERS = 32
LLAMA7B_PER_LAYER = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # matrices of each shape
SVDS_PER_MATRIX = 3  # analyze: svdvals of W, W + dW and dW


def seven_b_seconds(times: dict, *, layers: int = LLAMA7B_LAYERS, per_layer: dict = LLAMA7B_PER_LAYER,
                    per_matrix: int = SVDS_PER_MATRIX) -> float:
    """Seconds of singular values for one 7B checkpoint through ``analyze``.

    ``times``: seconds per svdvals for each shape in ``per_layer``; ``layers * per_matrix`` svdvals
    per matrix, plus one Gaussian reference per distinct shape (``analyze`` caches it by shape).
    """
    missing = [shape for shape in per_layer if shape not in times]
    if missing:
        raise KeyError(f"no time for shape(s) {missing}")
    per_layer_s = sum(n * per_matrix * times[shape] for shape, n in per_layer.items())
    return layers * per_layer_s + sum(times[shape] for shape in per_layer)


def n_svds_7b(*, layers: int = LLAMA7B_LAYERS, per_layer: dict = LLAMA7B_PER_LAYER,
              per_matrix: int = SVDS_PER_MATRIX) -> int:
    return layers * sum(per_layer.values()) * per_matrix + len(per_layer)


def fmt_duration(seconds: float) -> str:
    """Hours first: ``5400`` -> ``"1.50 h (90.0 min)"``, ``90`` -> ``"0.03 h (1.5 min)"``."""
    return f"{seconds / 3600:.2f} h ({seconds / 60:.1f} min)"


def agreement(s_ours, s_ref) -> tuple[float, float]:
    """``(max |s - s_ref| / s_ref[0], max |s - s_ref| / s_ref)`` of two spectra, sorted descending.

    The first is relative to the largest singular value (float32's accuracy scale for an SVD);
    the second is elementwise (dominated by the smallest singular values).
    """
    a = np.sort(np.asarray(s_ours, dtype=np.float64).ravel())[::-1]
    b = np.sort(np.asarray(s_ref, dtype=np.float64).ravel())[::-1]
    if a.shape != b.shape:
        raise ValueError(f"spectra differ in length: {a.size} vs {b.size}")
    if a.size == 0 or b[0] == 0:
        return 0.0, 0.0
    diff = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        elem = np.where(b > 0, diff / b, np.where(diff > 0, np.inf, 0.0))
    return float(diff.max() / b[0]), float(elem.max())


def format_seconds(s: float) -> str:
    return f"{s:.4f}" if s < 1 else f"{s:.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of the measurements: keys shape, device, ours, numpy, agree_max, agree_elem."""
    lines = ["| shape | device | ours s/matrix | numpy s/matrix (CPU) | ratio numpy/ours "
             "| max abs diff / s_max | max elementwise rel diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['device']} | {format_seconds(r['ours'])} "
                     f"| {format_seconds(r['numpy'])} | {r['numpy'] / r['ours']:.2f}x "
                     f"| {r['agree_max']:.1e} | {r['agree_elem']:.1e} |")
    return "\n".join(lines)


def extrapolation_lines(rows: list[dict]) -> list[str]:
    """One line per device with all of the 7B shapes measured: ours, and numpy for comparison."""
    out = []
    for device in dict.fromkeys(r["device"] for r in rows):
        mine = {r["shape"]: r for r in rows if r["device"] == device}
        if any(shape not in mine for shape in LLAMA7B_PER_LAYER):
            continue
        ours = seven_b_seconds({shape: r["ours"] for shape, r in mine.items()})
        base = seven_b_seconds({shape: r["numpy"] for shape, r in mine.items()})
        out.append(f"- {device}: ours {fmt_duration(ours)} per 7B checkpoint "
                   f"(numpy.linalg.svd on CPU instead: {fmt_duration(base)})")
    return out


def _log(msg: str) -> None:
    print(f"[bench/spectral] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, repeats: int, label: str, device: str = "cpu"):
    """Best wall seconds of ``repeats`` calls of ``fn()`` and the last result."""
    best, out = float("inf"), None
    for i in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        _log(f"{label}: {dt:.4f} s ({i + 1}/{repeats})")
    return best, out


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = ""
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(sorted({f"{i['internal_api']} {i.get('version') or ''}".strip()
                                 for i in threadpool_info() if i.get("user_api") == "blas"}))
    except Exception:  # pragma: no cover - informational only
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    lapack = "MKL" if torch.backends.mkl.is_available() else "its own build's LAPACK"
    load = f"; load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()} {cpu or 'unknown CPU'}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__} "
            f"({lapack}), numpy {np.__version__} ({blas or 'BLAS unknown'}); {THREADS} thread(s) for torch and "
            f"numpy{load}")


def run(devices: list[str]) -> tuple[list[dict], dict]:
    rows, ranks = [], {}
    rng = np.random.default_rng(0)
    warm = rng.standard_normal(SHAPES[0], dtype=np.float32)
    for device in devices:  # library loading, thread pools, CUDA context and cuSOLVER handles
        _svdvals(torch.from_numpy(warm), device)
    np.linalg.svd(warm, compute_uv=False)
    for shape in SHAPES:
        A = rng.standard_normal(shape, dtype=np.float32)  # seeded Gaussian, float32
        T = torch.from_numpy(A)  # a float32 CPU tensor, as analyze gets it from safetensors
        repeats = SMALL_REPEATS if shape == SHAPES[0] else REPEATS
        name = f"{shape[0]}x{shape[1]}"
        t_np, s_np = best_of(partial(np.linalg.svd, A, compute_uv=False), repeats, f"{name} numpy cpu")
        for device in devices:
            t_ours, s_ours = best_of(partial(_svdvals, T, device), repeats, f"{name} ours {device}", device)
            s_ours = s_ours.numpy()
            agree_max, agree_elem = agreement(s_ours, s_np)
            rows.append({"shape": shape, "device": device, "ours": t_ours, "numpy": t_np,
                         "agree_max": agree_max, "agree_elem": agree_elem})
            if device == "cpu":
                ranks[shape] = (rank_for_variance(s_ours, 0.9), rank_for_variance(s_np, 0.9))
        del A, T
    return rows, ranks


def rank_lines(ranks: dict) -> list[str]:
    lines = ["| Gaussian shape | rank90 (ours) | rank90 (numpy) | paper | share of max rank |",
             "|---|---:|---:|---:|---:|"]
    for shape, (r_ours, r_np) in ranks.items():
        paper = PAPER_GAUSSIAN_RANK90.get(shape)
        lines.append(f"| {shape[0]}x{shape[1]} | {r_ours} | {r_np} | {paper if paper else '-'} "
                     f"| {r_ours / min(shape):.1%} |")
    return lines


def main() -> None:
    from threadpoolctl import threadpool_limits

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with threadpool_limits(limits=THREADS):
        torch.set_num_threads(THREADS)
        _log(f"{THREADS} thread(s), devices {devices}, best of {REPEATS} (small shape: {SMALL_REPEATS})")
        rows, ranks = run(devices)
    desc = machine()
    text = "\n".join([
        "# Spectral analysis benchmark: singular values per matrix",
        "",
        "    python bench/spectral.py",
        "",
        f"Machine: {desc}; {time.strftime('%Y-%m-%d')}. Best of {REPEATS} for the 7B shapes, "
        f"of {SMALL_REPEATS} for 192x512.",
        "",
        "Ours: `learnforget.analyze.spectral._svdvals` (`torch.linalg.svdvals`, float32; on a GPU including the copies "
        "to and from it). Baseline: `numpy.linalg.svd(A, compute_uv=False)` on the same float32 Gaussian "
        "matrix on CPU, same run; ratio = numpy / ours. Agreement: largest difference of the two spectra, "
        "relative to the largest singular value and elementwise.",
        "",
        format_table(rows),
        "",
        f"## 7B checkpoint, extrapolated ({n_svds_7b()} svdvals: 32 layers x (4 attention 4096x4096 + gate and up "
        "11008x4096 + down 4096x11008) x 3 (W, W + dW, dW), + 3 Gaussian references, one per shape)",
        "",
        "Singular values only: checkpoint loading, float32 conversion and the rank statistics are extra.",
        "",
        *extrapolation_lines(rows),
        "",
        "## Gaussian reference (rank for 90 % of the variance, from the benchmark matrices' spectra)",
        "",
        *rank_lines(ranks),
        "",
    ])
    print(text)
    write_text(ROOT / "bench" / "spectral-results.md", text)


if __name__ == "__main__":
    main()
