"""Spectral analysis of finetuning updates (paper section "Spectral analysis").

For every weight matrix ``W`` of the base model and ``W' = W + dW`` of a finetuned one we
take the singular values of ``W``, ``W'`` and ``dW`` and count how many singular values are
needed to explain a fraction (90 %) of the variance (sum of squared singular values).
A Gaussian matrix of the same shape (and the same Frobenius norm as ``dW``) is the
high-rank reference.

Full checkpoints are streamed one matrix at a time with ``safetensors.safe_open``; adapter
checkpoints are loaded through peft and each LoRA layer's own ``get_delta_weight`` gives
``dW`` (for variants such as DoRA, peft's ``merge_safe`` on a copy of ``W``).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch

from learnforget.core.io import atomic_path

__all__ = [
    "COLUMNS",
    "DeltaWeight",
    "analyze",
    "delta_weights",
    "effective_rank",
    "is_adapter_dir",
    "load_spectra",
    "parse_param_name",
    "rank_for_variance",
    "resolve_device",
    "resolve_checkpoint",
    "save_spectra",
]

COLUMNS = [
    "layer",
    "module",
    "shape",
    "rank90",
    "rank90_base",
    "rank90_finetuned",
    "rank90_gaussian",
    "effective_rank",
    "max_rank",
    "fraction",
    "frob_norm",
    "lora_rank",
    "name",
]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class DeltaWeight(NamedTuple):
    name: str  # parameter name in the base model, e.g. model.layers.3.self_attn.q_proj.weight
    layer: int  # transformer layer index; -1 for matrices outside the layers
    module: str  # e.g. q_proj
    W_base: torch.Tensor
    dW: torch.Tensor


# --------------------------------------------------------------------------- statistics


def _as_1d_float64(singular_values) -> np.ndarray:
    if isinstance(singular_values, torch.Tensor):
        singular_values = singular_values.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("singular values contain NaN or inf")
    return np.abs(s)


def rank_for_variance(singular_values, fraction: float = 0.9, *, rtol: float = 1e-9) -> int:
    """Smallest ``k`` with ``sum(s[:k]**2) >= fraction * sum(s**2)``; 0 for an all-zero spectrum.

    ``singular_values`` may be unsorted (they are sorted descending here). ``rtol`` is a
    relative tolerance on the threshold so that exact ties (``fraction * total`` equal to a
    partial sum up to rounding) do not cost an extra rank.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    s = np.sort(_as_1d_float64(singular_values))[::-1]
    if s.size == 0:
        return 0
    cum = np.cumsum(s * s)
    total = cum[-1]
    if total <= 0.0:
        return 0
    threshold = fraction * total * (1.0 - rtol)
    k = int(np.searchsorted(cum, threshold, side="left")) + 1
    return min(k, int(s.size))


def effective_rank(singular_values) -> float:
    """Roy & Vetterli (2007) effective rank: ``exp(H(p))`` with ``p = s / sum(s)``; 0 if all zero."""
    s = _as_1d_float64(singular_values)
    total = s.sum()
    if s.size == 0 or total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


# --------------------------------------------------------------------------- checkpoints


def parse_param_name(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "q_proj")``; layer -1 outside layers."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else -1
    parts = name.split(".")
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    module = parts[-1] if parts else name
    return layer, module


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(_safetensors_files(path, required=False))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a model/adapter dir or a checkpoint dir ``runs/{run}/{duration}/`` holding ``model/``."""
    p = Path(path)
    if is_adapter_dir(p) or _is_model_dir(p):
        return p
    if (p / "model").is_dir() and (is_adapter_dir(p / "model") or _is_model_dir(p / "model")):
        return p / "model"
    raise FileNotFoundError(
        f"{p} is neither an HF model dir (config.json + *.safetensors) nor a peft adapter dir "
        "(adapter_config.json)"
    )


def _safetensors_files(path: Path, required: bool = True) -> dict[str, Path]:
    """Map tensor name -> safetensors file (handles ``model.safetensors.index.json`` shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return {k: single for k in fh.keys()}
    if required:
        raise FileNotFoundError(f"no model.safetensors (or index) in {path}")
    return {}


def _wanted(name: str, shape, include_other: bool) -> bool:
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    layer, _ = parse_param_name(name)
    return layer >= 0 or include_other


def _full_deltas(base_dir: Path, ckpt_dir: Path, include_other: bool):
    from safetensors import safe_open

    base_map = _safetensors_files(base_dir)
    ft_map = _safetensors_files(ckpt_dir)
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(p: Path):
            if p not in handles:
                handles[p] = stack.enter_context(safe_open(str(p), framework="pt"))
            return handles[p]

        missing = []
        for name in sorted(ft_map, key=_sort_key):
            if name not in base_map:
                missing.append(name)
                continue
            fh = handle(ft_map[name])
            shape = fh.get_slice(name).get_shape()
            if not _wanted(name, shape, include_other):
                continue
            W_ft = fh.get_tensor(name).to(torch.float32)
            W_base = handle(base_map[name]).get_tensor(name).to(torch.float32)
            if W_base.shape != W_ft.shape:
                raise ValueError(f"{name}: base shape {tuple(W_base.shape)} != finetuned {tuple(W_ft.shape)}")
            layer, module = parse_param_name(name)
            yield DeltaWeight(name, layer, module, W_base, W_ft - W_base), None
            del W_ft
        if any(parse_param_name(n)[0] >= 0 for n in missing):
            raise KeyError(f"tensors in {ckpt_dir} not in the base model: {missing[:5]}")


def _sort_key(name: str):
    layer, module = parse_param_name(name)
    return (layer, name)


def _strip_peft_prefix(module_name: str) -> str:
    # PeftModel -> LoraModel -> CausalLM: "base_model.model.model.layers.0.self_attn.q_proj"
    prefix = "base_model.model."
    return module_name[len(prefix):] if module_name.startswith(prefix) else module_name


@torch.no_grad()
def _adapter_deltas(base_dir: Path, ckpt_dir: Path, include_other: bool):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older peft
        ModulesToSaveWrapper = ()

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(ckpt_dir), is_trainable=False)
    model.eval()
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]

    rows = []
    for mod_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if adapter not in getattr(module, "lora_A", {}) and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            name = _strip_peft_prefix(mod_name) + ".weight"
            W = module.get_base_layer().weight
            if not _wanted(name, W.shape, include_other):
                continue
            variants = getattr(module, "lora_variant", {}) or {}
            if adapter in variants:
                # DoRA & co: peft's own merge on a copy of W (the update is not B @ A alone)
                merged = variants[adapter].merge_safe(module, adapter, W.detach().clone())
                dW = merged.to(torch.float32) - W.to(torch.float32)
            else:
                dW = module.get_delta_weight(adapter).to(torch.float32)
            if dW.shape != W.shape:  # fan_in_fan_out layers are already transposed by peft
                raise ValueError(f"{name}: delta shape {tuple(dW.shape)} != weight {tuple(W.shape)}")
            r = module.r.get(adapter) if hasattr(module, "r") else None
            rows.append((name, W.detach().to(torch.float32).clone(), dW.detach().clone(), r))
        elif ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
            # fully trained copies (modules_to_save): dW = trained copy - original
            trained = module.modules_to_save[adapter] if adapter in module.modules_to_save else None
            if trained is None or not hasattr(trained, "weight"):
                continue
            name = _strip_peft_prefix(mod_name) + ".weight"
            W = module.original_module.weight
            if not _wanted(name, W.shape, include_other):
                continue
            rows.append((name, W.detach().float().clone(), (trained.weight - W).detach().float().clone(), None))
    del model, base
    rows.sort(key=lambda r: _sort_key(r[0]))
    for name, W, dW, r in rows:
        layer, module = parse_param_name(name)
        yield DeltaWeight(name, layer, module, W, dW), (int(r) if r is not None else None)


def delta_weights(
    base_dir: str | Path, checkpoint_dir: str | Path, *, include_other: bool = False
) -> Iterator[DeltaWeight]:
    """Yield ``(name, layer, module, W_base, dW)`` (a ``DeltaWeight``) for each 2-D weight.

    ``checkpoint_dir`` is a full HF model dir or a peft adapter dir (or a checkpoint dir
    containing ``model/``). Only matrices inside the transformer layers are yielded unless
    ``include_other`` (embeddings, lm_head; layer = -1). For adapters, modules without a
    LoRA layer (dW = 0) are skipped.
    """
    for dw, _ in _iter_deltas(base_dir, checkpoint_dir, include_other):
        yield dw


def _iter_deltas(base_dir, checkpoint_dir, include_other: bool):
    """Yield ``(DeltaWeight, lora_rank or None)``."""
    base_dir = Path(base_dir)
    ckpt = resolve_checkpoint(checkpoint_dir)
    if is_adapter_dir(ckpt):
        yield from _adapter_deltas(base_dir, ckpt, include_other)
    else:
        yield from _full_deltas(base_dir, ckpt, include_other)


# --------------------------------------------------------------------------- analysis


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"analysis.device is {device!r} but torch sees no GPU (use auto or cpu)")
    return device


def _svdvals(M: torch.Tensor, device) -> torch.Tensor:
    """Singular values (float32, descending) of one matrix. A wide matrix is transposed first:
    same values, and LAPACK's path for tall matrices is several times faster on CPU (a
    4096x11008 down_proj: bench/spectral.py)."""
    if M.ndim == 2 and M.shape[0] < M.shape[1]:
        M = M.T
    return torch.linalg.svdvals(M.to(device=device, dtype=torch.float32)).cpu()


def _gaussian_svdvals(shape: tuple[int, int], seed: int, device) -> torch.Tensor:
    """Singular values of a seeded standard Gaussian of ``shape`` scaled to unit Frobenius norm."""
    g = torch.Generator(device="cpu").manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(f"{shape[0]}x{shape[1]}".encode())) % (2**63 - 1)
    )
    G = torch.randn(shape, generator=g, dtype=torch.float32)
    s = _svdvals(G, device)
    return s / torch.linalg.vector_norm(s)


def analyze(
    base_dir: str | Path,
    checkpoint_dir: str | Path,
    *,
    fraction: float = 0.9,
    lora_rank: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    include_other: bool = False,
    spectra_path: str | Path | None = None,
    return_spectra: bool = False,
):
    """Per-matrix rank statistics of ``dW = W_ft - W_base`` (one row per weight matrix).

    Columns: ``COLUMNS`` (``rank90`` keeps its name whatever ``fraction`` is; the ``fraction``
    column says which). ``rank90_gaussian`` is the rank of a seeded Gaussian matrix of the same
    shape, scaled to the Frobenius norm of ``dW`` (the rank does not depend on the scale; the
    saved spectrum does). ``lora_rank`` is the module's adapter rank (from peft), else the
    ``lora_rank`` argument, else empty.

    ``spectra_path``: write singular values (``{name}/base``, ``/finetuned``, ``/delta``,
    ``/gaussian``) as a compressed ``.npz``. ``return_spectra``: return ``(df, spectra)``.
    """
    rows = []
    spectra: dict[str, np.ndarray] = {}
    gauss_cache: dict[tuple[int, int], torch.Tensor] = {}
    for dw, module_rank in _iter_deltas(base_dir, checkpoint_dir, include_other):
        shape = (int(dw.W_base.shape[0]), int(dw.W_base.shape[1]))
        s_base = _svdvals(dw.W_base, device)
        s_ft = _svdvals(dw.W_base + dw.dW, device)
        s_d = _svdvals(dw.dW, device)
        frob = float(torch.linalg.vector_norm(dw.dW.to(torch.float64)))
        if shape not in gauss_cache:
            gauss_cache[shape] = _gaussian_svdvals(shape, seed, device)
        s_g = gauss_cache[shape] * frob
        r = module_rank if module_rank is not None else lora_rank
        rows.append(
            {
                "layer": dw.layer,
                "module": dw.module,
                "shape": f"{shape[0]} x {shape[1]}",
                "rank90": rank_for_variance(s_d, fraction),
                "rank90_base": rank_for_variance(s_base, fraction),
                "rank90_finetuned": rank_for_variance(s_ft, fraction),
                # scale-free: computed on the unit-norm Gaussian so a zero dW keeps the reference
                "rank90_gaussian": rank_for_variance(gauss_cache[shape], fraction),
                "effective_rank": effective_rank(s_d),
                "max_rank": min(shape),
                "fraction": float(fraction),
                "frob_norm": frob,
                "lora_rank": r,
                "name": dw.name,
            }
        )
        if spectra_path is not None or return_spectra:
            spectra[f"{dw.name}/base"] = s_base.numpy()
            spectra[f"{dw.name}/finetuned"] = s_ft.numpy()
            spectra[f"{dw.name}/delta"] = s_d.numpy()
            spectra[f"{dw.name}/gaussian"] = s_g.numpy()
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["lora_rank"] = df["lora_rank"].astype("Int64")
    if spectra_path is not None:
        save_spectra(spectra_path, spectra)
    return (df, spectra) if return_spectra else df


def save_spectra(path: str | Path, spectra: dict[str, np.ndarray]) -> None:
    """Write singular values as a compressed ``.npz`` (float32), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{k: np.asarray(v, dtype=np.float32) for k, v in spectra.items()})


def load_spectra(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
