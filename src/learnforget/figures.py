"""Figures of the study (matplotlib, Agg): trade-off, learning/forgetting curves, spectral ranks.

Every plotting function takes the tidy tables (``metrics.csv`` / ``spectral.csv`` as
DataFrames), writes ``{name}.png`` (dpi 150) and ``{name}.pdf`` atomically into ``out_dir``
and returns the list of files written; ``return_data=True`` returns ``(files, data)`` with the
plotted numbers so that tests can check data rather than pixels. A figure whose data is
missing is skipped silently (``[]``); an empty figure is never written.

Which task/metric is the primary learning metric of a domain and which is the forgetting
score is the caller's choice (``learning`` mapping, ``forgetting`` spec); nothing here knows
task names. A spec is ``(task, metric)``; the forgetting spec may also be a list of specs, in
which case their mean is the score (as the paper's mean of three benchmarks).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = [
    "STYLE",
    "forgetting_curves",
    "forgetting_curves_data",
    "higher_is_better",
    "infer_primary",
    "is_base",
    "is_full",
    "learning_curves",
    "learning_curves_data",
    "metric_table",
    "resolve_learning",
    "run_groups",
    "run_settings",
    "spectral_ranks",
    "spectral_ranks_data",
    "tradeoff",
    "tradeoff_data",
]

Spec = tuple  # (task, metric)

STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8,
    "legend.frameon": True,
    "legend.framealpha": 0.85,
    "legend.edgecolor": "#cccccc",
    "font.size": 9,
    "lines.linewidth": 1.8,
    "lines.markersize": 6,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}

_LOWER_IS_BETTER_HINTS = ("bits_per_byte", "perplexity", "ppl", "loss", "word_perplexity", "byte_perplexity")
_FULL_COLORS = ["#1d4e89", "#00798c", "#52489c", "#3d405b"]
_OTHER_COLORS = ["#e8590c", "#c9184a", "#d4a017", "#6a994e", "#9d4edd", "#8d6e63"]
_MARKERS = {"full": "o", "lora": "s", "dora": "^", "adalora": "D", "relora": "v"}
_FALLBACK_MARKERS = ["P", "X", "h", "<", ">", "p"]
BASE_STYLE = dict(marker="*", markersize=15, color="#111111", markeredgecolor="white", markeredgewidth=0.8, zorder=6)


# --------------------------------------------------------------------------- table helpers


def is_base(run, method=None) -> bool:
    return str(run) == "base" or (method is not None and str(method) == "base")


def is_full(method) -> bool:
    """Full finetuning methods (``full``, ``full_ft``, ``full-wd``, ``fft``...)."""
    m = str(method).lower()
    return m.startswith("full") or m in ("fft", "ft", "finetune", "full_finetuning")


def _as_bool(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "1.0"):
        return True
    if s in ("false", "0", "no", "0.0"):
        return False
    return None


def higher_is_better(metrics: pd.DataFrame, spec: Spec | Sequence[Spec]) -> bool:
    """Direction of a metric: the table's ``higher_is_better``, else a name heuristic."""
    specs = _specs(spec)
    task, metric = specs[0]
    if "higher_is_better" in metrics.columns:
        rows = metrics[(metrics["task"] == task) & (metrics["metric"] == metric)]
        for v in rows["higher_is_better"]:
            b = _as_bool(v)
            if b is not None:
                return b
    return not any(h in str(metric).lower() for h in _LOWER_IS_BETTER_HINTS)


def _specs(spec) -> list[tuple[str, str]]:
    if spec is None:
        return []
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(x, str) for x in spec):
        return [(spec[0], spec[1])]
    return [(str(t), str(m)) for t, m in spec]


def spec_label(spec) -> str:
    specs = _specs(spec)
    if len(specs) == 1:
        return f"{specs[0][0]} {specs[0][1]}"
    return "mean of " + ", ".join(f"{t} {m}" for t, m in specs)


def _clean(metrics: pd.DataFrame) -> pd.DataFrame:
    df = metrics.reset_index(drop=True)  # concatenated tables may repeat index labels
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["duration"] = pd.to_numeric(df["duration"], errors="coerce")
    df = df.dropna(subset=["value", "duration"])
    for col in ("run", "method", "domain", "regime", "task", "metric"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    return df


def metric_table(metrics: pd.DataFrame, spec) -> pd.DataFrame:
    """``run, method, duration, value`` for a spec (mean over duplicate rows; for several
    specs the mean over specs, only where all are present)."""
    df = _clean(metrics)
    parts = []
    for task, metric in _specs(spec):
        sel = df[(df["task"] == task) & (df["metric"] == metric)]
        parts.append(sel.groupby(["run", "method", "duration"], as_index=False)["value"].mean())
    if not parts:
        return pd.DataFrame(columns=["run", "method", "duration", "value"])
    out = parts[0]
    for i, p in enumerate(parts[1:], 1):
        out = out.merge(p, on=["run", "method", "duration"], suffixes=("", f"_{i}"))
    vcols = [c for c in out.columns if c.startswith("value")]
    out["value"] = out[vcols].mean(axis=1)
    return out[["run", "method", "duration", "value"]].sort_values(["run", "duration"]).reset_index(drop=True)


def run_settings(metrics: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """run -> (domain, regime) for every non-base run (from its learning rows, else any row)."""
    df = _clean(metrics)
    df = df[~df.apply(lambda r: is_base(r["run"], r.get("method")), axis=1)] if len(df) else df
    out: dict[str, tuple[str, str]] = {}
    for run, rows in df.groupby("run", sort=True):
        learn = rows[rows["role"] == "learning"] if "role" in rows else rows
        pick = learn if len(learn) else rows
        pick = pick[pick["domain"] != "source"] if (pick["domain"] != "source").any() else pick
        dom = Counter(pick["domain"]).most_common(1)[0][0]
        reg = Counter(pick["regime"]).most_common(1)[0][0] if "regime" in pick else ""
        out[str(run)] = (dom, reg)
    return out


def run_groups(metrics: pd.DataFrame) -> dict[str, str]:
    """run -> panel label ``"domain (regime)"`` (used to split spectral figures)."""
    return {r: _panel_title(k) for r, k in run_settings(metrics).items()}


def resolve_learning(learning: Mapping, domain: str, regime: str):
    """Look up the learning spec for ``(domain, regime)``, ``"domain/regime"`` or ``domain``."""
    if learning is None:
        return None
    for key in ((domain, regime), f"{domain}/{regime}", domain):
        if key in learning:
            return learning[key]
    return None


def infer_primary(metrics: pd.DataFrame):
    """Guess ``(learning mapping, forgetting spec)`` when the caller gives none: the most
    frequent (task, metric) among learning rows per domain / among forgetting rows."""
    df = _clean(metrics)
    df = df[~df["metric"].str.contains("stderr")]
    learning = {}
    for dom, rows in df[df["role"] == "learning"].groupby("domain"):
        if dom == "source":
            continue
        learning[dom] = Counter(zip(rows["task"], rows["metric"])).most_common(1)[0][0]
    frows = df[df["role"] == "forgetting"]
    forgetting = Counter(zip(frows["task"], frows["metric"])).most_common(1)[0][0] if len(frows) else None
    return learning, forgetting


def _dur_sort(points):
    return sorted(points, key=lambda p: p[-1])


def _fmt_dur(d) -> str:
    d = float(d)
    return f"{d:g}"


def _panel_title(key) -> str:
    dom, reg = key
    return f"{dom} ({reg})" if reg and reg not in ("nan", "None") else str(dom)


# --------------------------------------------------------------------------- styling


def _run_styles(metrics: pd.DataFrame | None, runs: Iterable[str], methods: Mapping[str, str]):
    """Stable colour/marker per run: full finetuning in cool colours, others in warm ones."""
    runs = sorted(set(runs), key=lambda r: (not is_full(methods.get(r, "")), r))
    styles, nf, no, fb = {}, 0, 0, 0
    for r in runs:
        m = str(methods.get(r, "")).lower()
        if is_full(m):
            color = _FULL_COLORS[nf % len(_FULL_COLORS)]
            nf += 1
        else:
            color = _OTHER_COLORS[no % len(_OTHER_COLORS)]
            no += 1
        marker = next((v for k, v in _MARKERS.items() if m.startswith(k)), None)
        if marker is None:
            marker = _FALLBACK_MARKERS[fb % len(_FALLBACK_MARKERS)]
            fb += 1
        styles[r] = {"color": color, "marker": marker}
    return styles


def _label(run: str, method: str) -> str:
    return run if (not method or method == run or method in run) else f"{run} ({method})"


def _methods(metrics: pd.DataFrame) -> dict[str, str]:
    df = metrics.drop_duplicates("run")
    return {str(r): str(m) for r, m in zip(df["run"], df["method"])}


def _subplots(n: int, w: float = 5.0, h: float = 4.0):
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    flat = axes.ravel().tolist()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig, out_dir, name: str) -> list[str]:
    out_dir = Path(out_dir)
    files = []
    for ext in ("png", "pdf"):
        final = out_dir / f"{name}.{ext}"
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        files.append(str(final))
    plt.close(fig)
    return files


def _axis_label(metrics, spec, extra: str = "") -> str:
    lab = spec_label(spec)
    if not higher_is_better(metrics, spec):
        return f"{lab}\n(lower is better)"
    return f"{lab}{extra}"


def _annotate(ax, x, y, text, color, side: int = 0):
    """Label a point; alternate sides (upper right / lower left) per series to limit overlaps."""
    xytext, ha, va = ((5, 4), "left", "bottom") if side % 2 == 0 else ((-5, -4), "right", "top")
    ax.annotate(text, (x, y), xytext=xytext, textcoords="offset points", fontsize=7.5, color=color,
                ha=ha, va=va, alpha=0.95, zorder=7, fontweight="bold")


# --------------------------------------------------------------------------- trade-off


def _base_value(table: pd.DataFrame):
    b = table[table.apply(lambda r: is_base(r["run"], r["method"]), axis=1)] if len(table) else table
    return float(b["value"].mean()) if len(b) else None


def tradeoff_data(metrics: pd.DataFrame, *, learning: Mapping, forgetting) -> dict:
    """``{(domain, regime): {"base": [(x, y, 0)], run: [(x, y, duration), ...]}}``.

    x = forgetting score, y = learning metric. Each run's list starts with the base point
    (duration 0) when the base model has both numbers, then its durations in order.
    """
    if metrics is None or len(metrics) == 0 or not forgetting or not learning:
        return {}
    settings = run_settings(metrics)
    ftab = metric_table(metrics, forgetting)
    base_x = _base_value(ftab)
    data = {}
    for key in sorted(set(settings.values())):
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        ltab = metric_table(metrics, lspec)
        base_y = _base_value(ltab)
        base_pt = [(base_x, base_y, 0.0)] if base_x is not None and base_y is not None else []
        panel = {}
        for run in sorted(r for r, k in settings.items() if k == key):
            xy = ltab[ltab["run"] == run].merge(ftab[ftab["run"] == run], on=["run", "method", "duration"],
                                                suffixes=("_y", "_x"))
            pts = [(float(a), float(b), float(d)) for a, b, d in zip(xy["value_x"], xy["value_y"], xy["duration"])]
            pts = [p for p in _dur_sort(pts) if p[2] > 0]
            if pts:
                panel[run] = base_pt + pts
        if panel:
            if base_pt:
                panel = {"base": base_pt, **panel}
            data[key] = panel
    return data


def tradeoff(metrics: pd.DataFrame, out_dir, *, learning: Mapping, forgetting, name: str = "tradeoff",
             return_data: bool = False):
    """Paper Figure 1: learning (y) vs forgetting score (x), one panel per (domain, regime);
    one line per run through its durations, starting at the base model (star)."""
    data = tradeoff_data(metrics, learning=learning, forgetting=forgetting)
    if not data:
        return ([], {}) if return_data else []
    methods = _methods(metrics)
    styles = _run_styles(metrics, [r for p in data.values() for r in p if r != "base"], methods)
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 5.2, 4.3)
        for ax, (key, panel) in zip(axes, data.items()):
            lspec = resolve_learning(learning, *key)
            for i, (run, pts) in enumerate(r for r in panel.items() if r[0] != "base"):
                st = styles[run]
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, color=st["color"], marker=st["marker"], label=_label(run, methods.get(run, "")),
                        markeredgecolor="white", markeredgewidth=0.6)
                for x, y, d in pts:
                    if d > 0:
                        _annotate(ax, x, y, _fmt_dur(d), st["color"], side=i)
            if "base" in panel:
                bx, by, _ = panel["base"][0]
                ax.plot([bx], [by], linestyle="none", label="base model", **BASE_STYLE)
            ax.set_title(_panel_title(key))
            ax.set_ylabel(_axis_label(metrics, lspec))
            ax.set_xlabel("forgetting score: " + _axis_label(metrics, forgetting, "\n(higher = remembers more)"))
            if not higher_is_better(metrics, lspec):
                ax.invert_yaxis()
            if not higher_is_better(metrics, forgetting):
                ax.invert_xaxis()
            ax.margins(x=0.12, y=0.1)
            ax.legend(loc="best")
        fig.suptitle("Learning vs forgetting (labels: training duration)", fontsize=12, y=1.01)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    return (files, data) if return_data else files


# --------------------------------------------------------------------------- curves


def _curves_data(metrics, spec_for) -> dict:
    if metrics is None or len(metrics) == 0:
        return {}
    settings = run_settings(metrics)
    data = {}
    for key in sorted(set(settings.values())):
        spec = spec_for(key)
        if not spec:
            continue
        tab = metric_table(metrics, spec)
        b = _base_value(tab)
        base_pt = [(0.0, b)] if b is not None else []
        panel = {}
        for run in sorted(r for r, k in settings.items() if k == key):
            rows = tab[(tab["run"] == run) & (tab["duration"] > 0)].sort_values("duration")
            pts = [(float(d), float(v)) for d, v in zip(rows["duration"], rows["value"])]
            if pts:
                panel[run] = base_pt + pts
        if panel:
            data[key] = ({"base": base_pt} if base_pt else {}) | panel
    return data


def learning_curves_data(metrics: pd.DataFrame, *, learning: Mapping) -> dict:
    """``{(domain, regime): {"base": [(0, y)], run: [(duration, y), ...]}}`` (runs start at base)."""
    if not learning:
        return {}
    return _curves_data(metrics, lambda key: resolve_learning(learning, *key))


def forgetting_curves_data(metrics: pd.DataFrame, *, forgetting) -> dict:
    """Same layout as ``learning_curves_data`` for the forgetting score."""
    if not forgetting:
        return {}
    return _curves_data(metrics, lambda key: forgetting)


def _plot_curves(metrics, data, spec_for, out_dir, name, title, duration_labels, hline_base: bool):
    methods = _methods(metrics)
    styles = _run_styles(metrics, [r for p in data.values() for r in p if r != "base"], methods)
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 5.0, 3.9)
        for ax, (key, panel) in zip(axes, data.items()):
            spec = spec_for(key)
            for run, pts in panel.items():
                if run == "base":
                    continue
                st = styles[run]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], marker=st["marker"],
                        label=_label(run, methods.get(run, "")), markeredgecolor="white", markeredgewidth=0.6)
            if "base" in panel:
                bx, by = panel["base"][0]
                if hline_base:
                    ax.axhline(by, color="#555555", linestyle=":", linewidth=1.0, zorder=1)
                ax.plot([bx], [by], linestyle="none", label="base model", **BASE_STYLE)
            ax.set_title(_panel_title(key))
            ax.set_ylabel(_axis_label(metrics, spec))
            reg = key[1]
            ax.set_xlabel((duration_labels or {}).get(reg, (duration_labels or {}).get(key[0], "training duration")))
            if not higher_is_better(metrics, spec):
                ax.invert_yaxis()
            durs = sorted({p[0] for pts in panel.values() for p in pts})
            if len(durs) <= 10:
                ax.set_xticks(durs)
                ax.set_xticklabels([_fmt_dur(d) for d in durs])
            ax.margins(x=0.06, y=0.12)
            ax.legend(loc="best")
        fig.suptitle(title, fontsize=12, y=1.01)
        fig.tight_layout()
        return _save(fig, out_dir, name)


def learning_curves(metrics: pd.DataFrame, out_dir, *, learning: Mapping, name: str = "learning_curves",
                    duration_labels: Mapping[str, str] | None = None, return_data: bool = False):
    """Primary learning metric vs training duration per run (base at 0), one panel per setting."""
    data = learning_curves_data(metrics, learning=learning)
    files = []
    if data:
        files = _plot_curves(metrics, data, lambda k: resolve_learning(learning, *k), out_dir, name,
                             "Learning: target-domain metric vs training duration", duration_labels, False)
    return (files, data) if return_data else files


def forgetting_curves(metrics: pd.DataFrame, out_dir, *, forgetting, name: str = "forgetting_curves",
                      duration_labels: Mapping[str, str] | None = None, return_data: bool = False):
    """Forgetting score vs training duration per run; the base score is a dotted line."""
    data = forgetting_curves_data(metrics, forgetting=forgetting)
    files = []
    if data:
        files = _plot_curves(metrics, data, lambda k: forgetting, out_dir, name,
                             "Forgetting: source-domain score vs training duration", duration_labels, True)
    return (files, data) if return_data else files


# --------------------------------------------------------------------------- spectral


def _lora_rank_of(rows: pd.DataFrame):
    r = pd.to_numeric(rows["lora_rank"], errors="coerce").dropna() if "lora_rank" in rows else pd.Series([], dtype=float)
    return int(r.max()) if len(r) else None


def spectral_ranks_data(spectral: pd.DataFrame, *, groups: Mapping[str, str] | None = None,
                        lora_durations: str = "last") -> dict:
    """``{panel: {"lines": {label: [(layer, mean rank90 over modules)]}, "hlines": {label: y},
    "runs": {label: (run, duration, kind)}}}``.

    Full finetuning (runs without ``lora_rank``) gets one line per duration; adapter runs one
    line at their longest duration (``lora_durations="all"``: every duration). Reference lines:
    each LoRA rank and the Gaussian baseline (mean over modules of ``rank90_gaussian``).
    """
    if spectral is None or len(spectral) == 0 or "rank90" not in spectral:
        return {}
    df = spectral.reset_index(drop=True)
    df["layer"] = pd.to_numeric(df["layer"], errors="coerce")
    df["duration"] = pd.to_numeric(df["duration"], errors="coerce")
    df["rank90"] = pd.to_numeric(df["rank90"], errors="coerce")
    df = df.dropna(subset=["layer", "duration", "rank90"])
    df = df[df["layer"] >= 0]
    if df.empty:
        return {}
    df["run"] = df["run"].astype(str)
    df["_group"] = df["run"].map(lambda r: (groups or {}).get(r, "all runs" if not groups else "other"))
    data = {}
    for group, gdf in sorted(df.groupby("_group"), key=lambda kv: str(kv[0])):
        lines, runs, hlines = {}, {}, {}
        run_order = sorted(gdf["run"].unique(), key=lambda r: (_lora_rank_of(gdf[gdf["run"] == r]) is not None, r))
        for run in run_order:
            rdf = gdf[gdf["run"] == run]
            r = _lora_rank_of(rdf)
            durs = sorted(rdf["duration"].unique())
            if r is not None and lora_durations == "last":
                durs = durs[-1:]
            for d in durs:
                ddf = rdf[rdf["duration"] == d]
                per_layer = ddf.groupby("layer")["rank90"].mean().sort_index()
                label = f"{run} @ {_fmt_dur(d)}" + (f" (r={r})" if r is not None else "")
                lines[label] = [(int(l), float(v)) for l, v in per_layer.items()]
                runs[label] = (run, float(d), "lora" if r is not None else "full")
            if r is not None:
                hlines.setdefault(f"LoRA rank r={r}", float(r))
        if "rank90_gaussian" in gdf:
            g = pd.to_numeric(gdf["rank90_gaussian"], errors="coerce").dropna()
            if len(g):
                hlines["Gaussian, same shape (mean)"] = float(g.groupby(gdf.loc[g.index, "module"]).mean().mean())
        if lines:
            data[group] = {"lines": lines, "hlines": hlines, "runs": runs}
    return data


def spectral_ranks(spectral: pd.DataFrame, out_dir, *, groups: Mapping[str, str] | None = None,
                   lora_durations: str = "last", fraction: float | None = None, name: str = "spectral_ranks",
                   return_data: bool = False):
    """Rank needed for 90% of dW's variance per layer (mean over modules): full finetuning at
    each duration (light to dark = short to long) vs LoRA runs, with the LoRA rank(s) and a
    Gaussian matrix of the same shape as horizontal references. One panel per group."""
    data = spectral_ranks_data(spectral, groups=groups, lora_durations=lora_durations)
    if not data:
        return ([], {}) if return_data else []
    if fraction is None and "fraction" in spectral:
        fr = pd.to_numeric(spectral["fraction"], errors="coerce").dropna()
        fraction = float(fr.iloc[0]) if len(fr) else 0.9
    fraction = 0.9 if fraction is None else fraction
    cmaps = ["Blues", "Greens", "Purples", "Greys"]
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 5.2, 5.0)
        for ax, (group, panel) in zip(axes, data.items()):
            full_runs = sorted({v[0] for v in panel["runs"].values() if v[2] == "full"})
            lora_runs = sorted({v[0] for v in panel["runs"].values() if v[2] == "lora"})
            lora_colors = {r: _OTHER_COLORS[i % len(_OTHER_COLORS)] for i, r in enumerate(lora_runs)}
            for label, pts in panel["lines"].items():
                run, d, kind = panel["runs"][label]
                if kind == "full":
                    ds = sorted(v[1] for v in panel["runs"].values() if v[0] == run)
                    cmap = plt.get_cmap(cmaps[full_runs.index(run) % len(cmaps)])
                    t = 0.45 + 0.55 * (ds.index(d) / max(len(ds) - 1, 1))
                    color, marker, ls = cmap(t), "o", "-"
                else:
                    color, marker, ls = lora_colors[run], "s", "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, linestyle=ls,
                        label=label, markeredgecolor="white", markeredgewidth=0.6)
            rank_colors = {}
            for label, (run, _, kind) in panel["runs"].items():
                if kind == "lora":
                    rank_colors.setdefault(label.rsplit("(r=", 1)[-1].rstrip(")"), lora_colors[run])
            for hl, y in panel["hlines"].items():
                if hl.startswith("Gaussian"):
                    ax.axhline(y, color="#777777", linestyle="-.", linewidth=1.2, label=hl, zorder=1)
                else:
                    color = rank_colors.get(hl.rsplit("=", 1)[-1], "#c1121f")
                    ax.axhline(y, color=color, linestyle=":", linewidth=1.4, label=hl, zorder=1)
            layers = sorted({p[0] for pts in panel["lines"].values() for p in pts})
            if len(layers) <= 16:
                ax.set_xticks(layers)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"rank for {fraction:.0%} of variance of ΔW\n(mean over modules)")
            ax.set_ylim(bottom=0)
            ax.set_title(str(group))
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7.5)
        fig.suptitle("Spectrum of the weight update ΔW = W' − W", fontsize=12, y=1.01)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    return (files, data) if return_data else files
