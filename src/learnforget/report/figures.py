"""Figures of the study (matplotlib, Agg): trade-off, learning/forgetting curves, learning-rate
sensitivity, generation diversity, spectral ranks (per layer, per module) and one matrix's spectrum.

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

from learnforget.compose.lorahub import METHOD as COMPOSE_METHOD  # noqa: E402
from learnforget.core.io import atomic_path  # noqa: E402

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
    "composite_points",
    "is_composite",
    "tradeoff",
    "tradeoff_data",
    "ci95",
    "diversity",
    "diversity_data",
    "pareto_front",
    "sensitivity",
    "sensitivity_data",
    "series_lr",
    "spectral_modules",
    "spectral_modules_data",
    "spectrum",
    "spectrum_data",
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


def is_composite(method) -> bool:
    """Rows of a composite of adapters (``compose``, learnforget.compose.lorahub): drawn on the
    trade-off figure as points of their own, left out of every per-run series."""
    return str(method) == COMPOSE_METHOD


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
    if "series" in df.columns:
        ser = df["series"].astype(object)
        df["series"] = ser.where(ser.notna() & (ser.astype(str).str.len() > 0) & (ser.astype(str) != "nan"),
                                 df["run"]).astype(str)
    else:
        df["series"] = df["run"] if "run" in df.columns else pd.Series(dtype=str)
    return df


def ci95(sd: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of ``n`` values with sample standard
    deviation ``sd`` (Student's t); NaN for a single value."""
    if n is None or n < 2 or sd is None or not np.isfinite(sd):
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def metric_table(metrics: pd.DataFrame, spec, *, errors: bool = False) -> pd.DataFrame:
    """``run, method, duration, value`` for a spec, one row per series (``run`` holds the series:
    the seeds of a setting, ``runs[].seeds``, are one series; value = their mean).

    Several specs: the mean over specs per run (only where all are present), then over seeds.
    ``errors=True`` adds ``ci`` (95% half-width over seeds; NaN for one seed) and ``n`` (seeds).
    """
    df = _clean(metrics)
    keys = ["series", "run", "method", "duration"]
    parts = []
    for task, metric in _specs(spec):
        sel = df[(df["task"] == task) & (df["metric"] == metric)]
        parts.append(sel.groupby(keys, as_index=False)["value"].mean())
    cols = ["run", "method", "duration", "value"] + (["ci", "n"] if errors else [])
    if not parts:
        return pd.DataFrame(columns=cols)
    out = parts[0]
    for i, p in enumerate(parts[1:], 1):
        out = out.merge(p, on=keys, suffixes=("", f"_{i}"))
    vcols = [c for c in out.columns if c.startswith("value")]
    out["value"] = out[vcols].mean(axis=1)
    agg = out.groupby(["series", "method", "duration"], as_index=False)["value"].agg(["mean", "std", "count"])
    agg = agg.rename(columns={"series": "run", "mean": "value", "count": "n"})
    agg["ci"] = [ci95(sd, int(n)) for sd, n in zip(agg["std"], agg["n"])]
    return agg[cols].sort_values(["run", "duration"]).reset_index(drop=True)


def run_settings(metrics: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """series -> (domain, regime) for every non-base series (from its learning rows, else any
    row); a run that is not one of several seeds is its own series."""
    df = _clean(metrics)
    df = df[~df.apply(lambda r: is_base(r["run"], r.get("method")) or is_composite(r.get("method")), axis=1)] \
        if len(df) else df
    out: dict[str, tuple[str, str]] = {}
    for run, rows in df.groupby("series", sort=True):
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
    """series (and run) -> method."""
    df = _clean(metrics)
    out = {str(r): str(m) for r, m in zip(df["run"], df["method"])}
    out.update({str(r): str(m) for r, m in zip(df["series"], df["method"])})
    return out


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


def tradeoff_data(metrics: pd.DataFrame, *, learning: Mapping, forgetting, errors: bool = False) -> dict:
    """``{(domain, regime): {"base": [(x, y, 0)], series: [(x, y, duration), ...]}}``.

    x = forgetting score, y = learning metric. Each series' list starts with the base point
    (duration 0) when the base model has both numbers, then its durations in order.
    ``errors=True``: points are ``(x, y, duration, x_ci, y_ci, n_seeds)``.
    """
    if metrics is None or len(metrics) == 0 or not forgetting or not learning:
        return {}
    settings = run_settings(metrics)
    ftab = metric_table(metrics, forgetting, errors=True)
    base_x = _base_value(ftab)
    nan = float("nan")
    data = {}
    for key in sorted(set(settings.values())):
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        ltab = metric_table(metrics, lspec, errors=True)
        base_y = _base_value(ltab)
        base_pt = [(base_x, base_y, 0.0, nan, nan, 1)] if base_x is not None and base_y is not None else []
        panel = {}
        for run in sorted(r for r, k in settings.items() if k == key):
            xy = ltab[ltab["run"] == run].merge(ftab[ftab["run"] == run], on=["run", "method", "duration"],
                                                suffixes=("_y", "_x"))
            pts = [(float(a), float(b), float(d), float(ca), float(cb), int(min(na, nb)))
                   for a, b, d, ca, cb, na, nb in zip(xy["value_x"], xy["value_y"], xy["duration"], xy["ci_x"],
                                                      xy["ci_y"], xy["n_x"], xy["n_y"])]
            pts = [p for p in sorted(pts, key=lambda p: p[2]) if p[2] > 0]
            if pts:
                panel[run] = base_pt + pts
        if panel:
            if base_pt:
                panel = {"base": base_pt, **panel}
            data[key] = panel
    if not errors:
        data = {k: {r: [p[:3] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}
    return data


def pareto_front(points: Iterable[tuple[float, float]], *, x_higher: bool = True, y_higher: bool = True):
    """The points no other point beats on both axes (ties kept), sorted by x (best x last)."""
    pts = list({(float(x), float(y)) for x, y in points if np.isfinite(x) and np.isfinite(y)})
    sx, sy = (1 if x_higher else -1), (1 if y_higher else -1)

    def beats(a, b):  # a dominates b
        return sx * a[0] >= sx * b[0] and sy * a[1] >= sy * b[1] and a != b

    front = [p for p in pts if not any(beats(q, p) for q in pts)]
    return sorted(front, key=lambda p: sx * p[0])


def _shade_front(ax, front, x_higher: bool, y_higher: bool):
    """Shade the region the front dominates (what the studied runs can reach)."""
    if len(front) < 1:
        return
    # the dominated region's boundary: a staircase from the best-y point (worst x) down to the
    # best-x point; between two front points the best reachable y is the next point's
    order = sorted(front, key=lambda p: p[0], reverse=not x_higher)
    sx, sy = [], []
    for i, (x, y) in enumerate(order):
        if i:
            sx.append(order[i - 1][0])
            sy.append(y)
        sx.append(x)
        sy.append(y)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    worst_x = min(x0, x1) if x_higher else max(x0, x1)
    worst_y = min(y0, y1) if y_higher else max(y0, y1)
    poly_x = [worst_x, *sx, sx[-1], worst_x]
    poly_y = [sy[0], *sy, worst_y, worst_y]
    ax.fill(poly_x, poly_y, color="#9aa5b1", alpha=0.14, zorder=0, lw=0, label="dominated by the Pareto front")
    ax.plot(sx, sy, color="#7b8794", lw=1.0, ls="--", zorder=1)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def composite_points(metrics: pd.DataFrame, *, learning: Mapping, forgetting, keys: Iterable[tuple]) -> dict:
    """``{(domain, regime): {composite: (x, y)}}``: each composite of adapters (rows with method
    ``compose``) on every panel whose learning metric it was evaluated on; x = forgetting score,
    y = that panel's learning metric."""
    if metrics is None or len(metrics) == 0 or not forgetting or not learning:
        return {}
    df = _clean(metrics)
    df = df[df["method"].map(is_composite)]
    if df.empty:
        return {}
    ftab = metric_table(df, forgetting)
    out = {}
    for key in keys:
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        xy = metric_table(df, lspec).merge(ftab, on=["run", "method", "duration"], suffixes=("_y", "_x"))
        pts = {str(r): (float(x), float(y)) for r, x, y in zip(xy["run"], xy["value_x"], xy["value_y"])}
        if pts:
            out[key] = pts
    return out


_COMPOSITE_STYLE = dict(linestyle="none", markeredgecolor="#111111", markeredgewidth=0.9, zorder=5)
_COMPOSITE_KINDS = {"search": ("X", 11, "#2a9d8f"), "uniform": ("P", 9, "#8d99ae"), "single": ("h", 8, None)}
_COMPOSITE_COLORS = ["#e9c46a", "#f4a261", "#b5838d", "#6d597a", "#90be6d", "#577590"]


def _composite_styles(names: Iterable[str], kinds: Mapping[str, str] | None) -> dict:
    """Marker, size and colour per composite: the searched one a large X, the uniform one a
    plus, single adapters hexagons in their own colours (kinds unknown: fallback markers)."""
    styles, n = {}, 0
    for i, name in enumerate(sorted(names)):
        kind = (kinds or {}).get(name)
        marker, size, color = _COMPOSITE_KINDS.get(kind, (_FALLBACK_MARKERS[i % len(_FALLBACK_MARKERS)], 9, None))
        if color is None:
            color = _COMPOSITE_COLORS[n % len(_COMPOSITE_COLORS)]
            n += 1
        styles[name] = {"marker": marker, "markersize": size, "color": color}
    return styles


def tradeoff(metrics: pd.DataFrame, out_dir, *, learning: Mapping, forgetting, name: str = "tradeoff",
             return_data: bool = False, composites: Mapping[str, str] | None = None):
    """Paper Figure 1: learning (y) vs forgetting score (x), one panel per (domain, regime);
    one line per series through its durations (labelled), starting at the base model (star);
    95% intervals over seeds as error bars; the Pareto front of all the runs' points shaded.
    Composites of adapters (method ``compose``; ``composites``: name -> kind, search, uniform
    or single) are separate points on every panel whose learning metric they have, outside the
    front (their data: ``composite_points``)."""
    data = tradeoff_data(metrics, learning=learning, forgetting=forgetting, errors=True)
    if not data:
        return ([], {}) if return_data else []
    methods = _methods(metrics)
    styles = _run_styles(metrics, [r for p in data.values() for r in p if r != "base"], methods)
    extra = composite_points(metrics, learning=learning, forgetting=forgetting, keys=list(data))
    cstyles = _composite_styles({c for pts in extra.values() for c in pts}, composites)
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 5.2, 4.3)
        for ax, (key, panel) in zip(axes, data.items()):
            lspec = resolve_learning(learning, *key)
            for i, (run, pts) in enumerate(r for r in panel.items() if r[0] != "base"):
                st = styles[run]
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, color=st["color"], marker=st["marker"], label=_label(run, methods.get(run, "")),
                        markeredgecolor="white", markeredgewidth=0.6, zorder=3)
                xe = [0.0 if not np.isfinite(p[3]) else p[3] for p in pts]
                ye = [0.0 if not np.isfinite(p[4]) else p[4] for p in pts]
                if any(xe) or any(ye):
                    ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="none", ecolor=st["color"], elinewidth=0.9,
                                capsize=2.5, alpha=0.8, zorder=2)
                for x, y, d, *_ in pts:
                    if d > 0:
                        _annotate(ax, x, y, _fmt_dur(d), st["color"], side=i)
            if "base" in panel:
                bx, by, *_ = panel["base"][0]
                ax.plot([bx], [by], linestyle="none", label="base model", **BASE_STYLE)
            for comp, (cx, cy) in sorted(extra.get(key, {}).items()):
                ax.plot([cx], [cy], label=f"{comp} (composite)", **cstyles[comp], **_COMPOSITE_STYLE)
            x_hi, y_hi = higher_is_better(metrics, forgetting), higher_is_better(metrics, lspec)
            ax.margins(x=0.12, y=0.1)
            front = pareto_front([(p[0], p[1]) for pts in panel.values() for p in pts], x_higher=x_hi, y_higher=y_hi)
            _shade_front(ax, front, x_hi, y_hi)
            ax.set_title(_panel_title(key))
            ax.set_ylabel(_axis_label(metrics, lspec))
            ax.set_xlabel("forgetting score: " + _axis_label(metrics, forgetting, "\n(higher = remembers more)"))
            if not y_hi:
                ax.invert_yaxis()
            if not x_hi:
                ax.invert_xaxis()
            n_entries = len(ax.get_legend_handles_labels()[1])
            if n_entries > 4:  # many series or composites: below the panel, never over a point
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.34), ncol=2, fontsize=7.5)
            else:
                ax.legend(loc="best")
        fig.suptitle("Learning vs forgetting (labels: training duration)", fontsize=12, y=1.01)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    short = {k: {r: [p[:3] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}
    return (files, short) if return_data else files


# --------------------------------------------------------------------------- curves


def _curves_data(metrics, spec_for, errors: bool = False) -> dict:
    if metrics is None or len(metrics) == 0:
        return {}
    settings = run_settings(metrics)
    data = {}
    for key in sorted(set(settings.values())):
        spec = spec_for(key)
        if not spec:
            continue
        tab = metric_table(metrics, spec, errors=True)
        b = _base_value(tab)
        base_pt = [(0.0, b, float("nan"), 1)] if b is not None else []
        panel = {}
        for run in sorted(r for r, k in settings.items() if k == key):
            rows = tab[(tab["run"] == run) & (tab["duration"] > 0)].sort_values("duration")
            pts = [(float(d), float(v), float(c), int(n))
                   for d, v, c, n in zip(rows["duration"], rows["value"], rows["ci"], rows["n"])]
            if pts:
                panel[run] = base_pt + pts
        if panel:
            data[key] = ({"base": base_pt} if base_pt else {}) | panel
    if not errors:
        data = {k: {r: [p[:2] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}
    return data


def learning_curves_data(metrics: pd.DataFrame, *, learning: Mapping, errors: bool = False) -> dict:
    """``{(domain, regime): {"base": [(0, y)], series: [(duration, y), ...]}}`` (series start at
    base); ``errors=True``: ``(duration, y, ci95, n_seeds)``."""
    if not learning:
        return {}
    return _curves_data(metrics, lambda key: resolve_learning(learning, *key), errors)


def forgetting_curves_data(metrics: pd.DataFrame, *, forgetting, errors: bool = False) -> dict:
    """Same layout as ``learning_curves_data`` for the forgetting score."""
    if not forgetting:
        return {}
    return _curves_data(metrics, lambda key: forgetting, errors)


def _band(ax, pts, color):
    """95% interval over seeds as a shaded band (points ``(x, y, ci, n)``; nothing for one seed)."""
    if not any(len(p) > 2 and np.isfinite(p[2]) for p in pts):
        return
    xs = [p[0] for p in pts]
    lo = [p[1] - (p[2] if np.isfinite(p[2]) else 0.0) for p in pts]
    hi = [p[1] + (p[2] if np.isfinite(p[2]) else 0.0) for p in pts]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0, zorder=1)


def _draw_series(ax, panel, styles, methods, hline_base: bool):
    """One line per series through ``(x, y[, ci, n])`` points with its interval band, and the
    base model as a star (and a dotted line with ``hline_base``)."""
    for run, pts in panel.items():
        if run == "base":
            continue
        st = styles[run]
        _band(ax, pts, st["color"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], marker=st["marker"],
                label=_label(run, methods.get(run, "")), markeredgecolor="white", markeredgewidth=0.6)
    if "base" in panel:
        bx, by, *_ = panel["base"][0]
        if hline_base:
            ax.axhline(by, color="#555555", linestyle=":", linewidth=1.0, zorder=1)
        ax.plot([bx], [by], linestyle="none", label="base model", **BASE_STYLE)


def _plot_curves(metrics, data, spec_for, out_dir, name, title, duration_labels, hline_base: bool):
    methods = _methods(metrics)
    styles = _run_styles(metrics, [r for p in data.values() for r in p if r != "base"], methods)
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 5.0, 3.9)
        for ax, (key, panel) in zip(axes, data.items()):
            spec = spec_for(key)
            _draw_series(ax, panel, styles, methods, hline_base)
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
    data = learning_curves_data(metrics, learning=learning, errors=True)
    files = []
    if data:
        files = _plot_curves(metrics, data, lambda k: resolve_learning(learning, *k), out_dir, name,
                             "Learning: target-domain metric vs training duration", duration_labels, False)
    return (files, _short(data)) if return_data else files


def forgetting_curves(metrics: pd.DataFrame, out_dir, *, forgetting, name: str = "forgetting_curves",
                      duration_labels: Mapping[str, str] | None = None, return_data: bool = False):
    """Forgetting score vs training duration per run; the base score is a dotted line."""
    data = forgetting_curves_data(metrics, forgetting=forgetting, errors=True)
    files = []
    if data:
        files = _plot_curves(metrics, data, lambda k: forgetting, out_dir, name,
                             "Forgetting: source-domain score vs training duration", duration_labels, True)
    return (files, _short(data)) if return_data else files


def _short(data):
    return {k: {r: [p[:2] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}


# --------------------------------------------------------------------------- sensitivity


def series_lr(metrics: pd.DataFrame) -> dict[str, float]:
    """series -> learning rate (from the ``lr`` column; series without one are left out)."""
    df = _clean(metrics)
    if "lr" not in df.columns:
        return {}
    df = df.assign(lr=pd.to_numeric(df["lr"], errors="coerce")).dropna(subset=["lr"])
    return {str(k): float(v) for k, v in df.groupby("series")["lr"].first().items()}


def sensitivity_data(metrics: pd.DataFrame, *, learning: Mapping, forgetting=None, errors: bool = False) -> dict:
    """``{(domain, regime): {method: [(lr, learning, forgetting), ...]}}`` at each series' longest
    duration, for the methods trained at two or more learning rates (paper section 4.6); empty
    when the config sweeps no learning rate. ``errors=True``: ``(lr, learning, forgetting,
    learning_ci, forgetting_ci, n_seeds)``. ``forgetting`` is NaN where it was not measured."""
    if metrics is None or len(metrics) == 0 or not learning:
        return {}
    settings, lrs, methods = run_settings(metrics), series_lr(metrics), _methods(metrics)
    ftab = metric_table(metrics, forgetting, errors=True) if forgetting else None
    nan = float("nan")
    data = {}
    for key in sorted(set(settings.values())):
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        ltab = metric_table(metrics, lspec, errors=True)
        panel: dict[str, list] = {}
        for series in sorted(r for r, k in settings.items() if k == key and r in lrs):
            rows = ltab[(ltab["run"] == series) & (ltab["duration"] > 0)]
            if rows.empty:
                continue
            last = rows.loc[rows["duration"].idxmax()]
            f, fci = nan, nan
            if ftab is not None:
                fr = ftab[(ftab["run"] == series) & (ftab["duration"] == last["duration"])]
                if len(fr):
                    f, fci = float(fr["value"].iloc[0]), float(fr["ci"].iloc[0])
            panel.setdefault(methods.get(series, series), []).append(
                (lrs[series], float(last["value"]), f, float(last["ci"]), fci, int(last["n"])))
        panel = {m: sorted(pts) for m, pts in panel.items() if len({p[0] for p in pts}) >= 2}
        if panel:
            data[key] = panel
    if not errors:
        data = {k: {m: [p[:3] for p in pts] for m, pts in panel.items()} for k, panel in data.items()}
    return data


def sensitivity(metrics: pd.DataFrame, out_dir, *, learning: Mapping, forgetting=None, name: str = "sensitivity",
                return_data: bool = False):
    """Learning metric (top) and forgetting score (bottom) at the longest duration vs learning rate,
    one line per method, one column per (domain, regime); 95% intervals over seeds as error bars."""
    data = sensitivity_data(metrics, learning=learning, forgetting=forgetting, errors=True)
    if not data:
        return ([], {}) if return_data else []
    has_f = any(np.isfinite(p[2]) for panel in data.values() for pts in panel.values() for p in pts)
    nrows, ncols = (2 if has_f else 1), len(data)
    methods = sorted({m for panel in data.values() for m in panel})
    styles = _run_styles(None, methods, {m: m for m in methods})
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.7 * nrows), squeeze=False)
        for j, (key, panel) in enumerate(data.items()):
            lspec = resolve_learning(learning, *key)
            for i, (col, ci_col, spec) in enumerate(((1, 3, lspec), (2, 4, forgetting))[:nrows]):
                ax = axes[i][j]
                for method, pts in panel.items():
                    st = styles[method]
                    pts = [p for p in pts if np.isfinite(p[col])]
                    if not pts:
                        continue
                    xs, ys = [p[0] for p in pts], [p[col] for p in pts]
                    err = [p[ci_col] if np.isfinite(p[ci_col]) else 0.0 for p in pts]
                    ax.errorbar(xs, ys, yerr=err if any(err) else None, color=st["color"], marker=st["marker"],
                                label=method, markeredgecolor="white", markeredgewidth=0.6, capsize=2.5)
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
                ax.set_ylabel(_axis_label(metrics, spec) if i == 0 else
                              "forgetting score: " + _axis_label(metrics, spec))
                if not higher_is_better(metrics, spec):
                    ax.invert_yaxis()
                ax.set_title(_panel_title(key) + (" — learning" if i == 0 else " — forgetting"))
                ax.legend(loc="best")
        fig.suptitle("Learning-rate sensitivity (at the longest duration)", fontsize=12, y=1.01)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    short = {k: {m: [p[:3] for p in pts] for m, pts in panel.items()} for k, panel in data.items()}
    return (files, short) if return_data else files


# --------------------------------------------------------------------------- diversity

DIVERSITY_METRICS = (("distinct", "distinct solutions per problem"),
                     ("mean_pairwise_similarity", "mean pairwise similarity"))


def diversity_data(metrics: pd.DataFrame, *, errors: bool = False) -> dict:
    """``{(task, metric): {"base": [(0, y)], series: [(duration, y), ...]}}`` from the rows with
    role ``diversity`` (paper section 4.4); series without such rows are left out."""
    if metrics is None or len(metrics) == 0 or "role" not in metrics.columns:
        return {}
    div = metrics[metrics["role"] == "diversity"]
    data = {}
    for task in sorted(div["task"].astype(str).unique()):
        for metric, _ in DIVERSITY_METRICS:
            tab = metric_table(div, (task, metric), errors=True)
            if tab.empty:
                continue
            b = _base_value(tab)
            base_pt = [(0.0, b, float("nan"), 1)] if b is not None else []
            panel = {}
            for run in sorted(set(tab["run"]) - {"base"}):
                rows = tab[(tab["run"] == run) & (tab["duration"] > 0)].sort_values("duration")
                pts = [(float(d), float(v), float(c), int(n))
                       for d, v, c, n in zip(rows["duration"], rows["value"], rows["ci"], rows["n"])]
                if pts:
                    panel[run] = base_pt + pts
            if panel:
                data[(task, metric)] = ({"base": base_pt} if base_pt else {}) | panel
    if not errors:
        data = _short(data)
    return data


def diversity(metrics: pd.DataFrame, out_dir, *, name: str = "diversity", return_data: bool = False):
    """Generation diversity vs training duration: distinct normalised solutions per problem
    (top) and their mean pairwise similarity (bottom), one column per sampled task."""
    data = diversity_data(metrics, errors=True)
    if not data:
        return ([], {}) if return_data else []
    tasks = sorted({t for t, _ in data})
    rows = [m for m, _ in DIVERSITY_METRICS if any((t, m) in data for t in tasks)]
    methods = _methods(metrics)
    styles = _run_styles(None, [r for p in data.values() for r in p if r != "base"], methods)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(rows), len(tasks), figsize=(4.8 * len(tasks), 3.6 * len(rows)), squeeze=False)
        for i, metric in enumerate(rows):
            for j, task in enumerate(tasks):
                ax = axes[i][j]
                panel = data.get((task, metric))
                if not panel:
                    ax.set_visible(False)
                    continue
                _draw_series(ax, panel, styles, methods, hline_base=True)
                ax.set_title(task)
                ax.set_xlabel("training duration")
                ax.set_ylabel(dict(DIVERSITY_METRICS)[metric])
                durs = sorted({p[0] for pts in panel.values() for p in pts})
                if len(durs) <= 10:
                    ax.set_xticks(durs)
                    ax.set_xticklabels([_fmt_dur(d) for d in durs])
                ax.margins(x=0.06, y=0.12)
                ax.legend(loc="best")
        fig.suptitle("Generation diversity vs training duration (sampled completions per problem)",
                     fontsize=12, y=1.01)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    return (files, _short(data)) if return_data else files


# --------------------------------------------------------------------------- spectral


def _lora_rank_of(rows: pd.DataFrame):
    r = pd.to_numeric(rows["lora_rank"], errors="coerce").dropna() if "lora_rank" in rows else pd.Series([], dtype=float)
    return int(r.max()) if len(r) else None


def spectral_ranks_data(spectral: pd.DataFrame, *, groups: Mapping[str, str] | None = None,
                        lora_durations: str = "last", series: Mapping[str, str] | None = None) -> dict:
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
    if series:  # seeds of one setting: one line, the mean over seeds
        df["run"] = df["run"].map(lambda r: series.get(r, r))
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
                   series: Mapping[str, str] | None = None, return_data: bool = False):
    """Rank needed for 90% of dW's variance per layer (mean over modules): full finetuning at
    each duration (light to dark = short to long) vs LoRA runs, with the LoRA rank(s) and a
    Gaussian matrix of the same shape as horizontal references. One panel per group."""
    data = spectral_ranks_data(spectral, groups=groups, lora_durations=lora_durations, series=series)
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


def spectral_modules_data(spectral: pd.DataFrame, *, groups: Mapping[str, str] | None = None,
                          series: Mapping[str, str] | None = None) -> dict:
    """``{module: {label: [(layer, rank90)]}}`` for full finetuning at each duration and each
    adapter run at its longest, plus ``"_ref"``: ``{module: {"LoRA r": r, "Gaussian": rank}}``;
    the per-module view of :func:`spectral_ranks` (panel labels ``"group: run @ duration"``)."""
    if spectral is None or len(spectral) == 0 or "rank90" not in spectral:
        return {}
    df = spectral.reset_index(drop=True)
    for col in ("layer", "duration", "rank90"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.dropna(subset=["layer", "duration", "rank90"])
    df = df[df["layer"] >= 0]
    if df.empty:
        return {}
    df["run"] = df["run"].astype(str).map(lambda r: (series or {}).get(r, r))
    data: dict = {}
    from learnforget.train.methods import TARGET_GROUPS  # a Llama layer's linear modules, in order

    order = {m: i for i, m in enumerate(TARGET_GROUPS["all"])}
    for module, mdf in sorted(df.groupby("module"), key=lambda kv: (order.get(str(kv[0]), 99), str(kv[0]))):
        lines = {}
        for run in sorted(mdf["run"].unique()):
            rdf = mdf[mdf["run"] == run]
            r = _lora_rank_of(rdf)
            durs = sorted(rdf["duration"].unique())
            if r is not None:
                durs = durs[-1:]
            for d in durs:
                per_layer = rdf[rdf["duration"] == d].groupby("layer")["rank90"].mean().sort_index()
                prefix = f"{groups[run]}: " if groups and run in groups else ""
                label = f"{prefix}{run} @ {_fmt_dur(d)}" + (f" (r={r})" if r is not None else "")
                lines[label] = [(int(l), float(v)) for l, v in per_layer.items()]
        ref = {}
        r = _lora_rank_of(mdf)
        if r is not None:
            ref["LoRA r"] = float(r)
        if "rank90_gaussian" in mdf:
            g = pd.to_numeric(mdf["rank90_gaussian"], errors="coerce").dropna()
            if len(g):
                ref["Gaussian"] = float(g.mean())
        data[str(module)] = {"lines": lines, "ref": ref}
    return data


def spectral_modules(spectral: pd.DataFrame, out_dir, *, groups: Mapping[str, str] | None = None,
                     series: Mapping[str, str] | None = None, name: str = "spectral_modules",
                     return_data: bool = False):
    """Rank for the configured share of dW's variance per layer, one panel per module: full
    finetuning at each duration (darker = longer) vs adapter runs, the LoRA rank and the
    Gaussian baseline as references."""
    data = spectral_modules_data(spectral, groups=groups, series=series)
    if not data:
        return ([], {}) if return_data else []
    fr = pd.to_numeric(spectral.get("fraction", pd.Series([0.9])), errors="coerce").dropna()
    fraction = float(fr.iloc[0]) if len(fr) else 0.9
    labels = sorted({lab for panel in data.values() for lab in panel["lines"]})
    full_labels = [lab for lab in labels if "(r=" not in lab]
    lora_labels = [lab for lab in labels if "(r=" in lab]
    colors = {}
    runs = sorted({lab.rsplit(" @ ", 1)[0] for lab in full_labels})
    cmaps = ["Blues", "Greens", "Purples", "Greys"]
    for lab in full_labels:  # one colour family per full-finetuning run, darker = longer
        run = lab.rsplit(" @ ", 1)[0]
        same = [x for x in full_labels if x.rsplit(" @ ", 1)[0] == run]
        same.sort(key=lambda x: float(x.rsplit(" @ ", 1)[1]))
        t = 0.4 + 0.6 * same.index(lab) / max(len(same) - 1, 1)
        colors[lab] = plt.get_cmap(cmaps[runs.index(run) % len(cmaps)])(t)
    for i, lab in enumerate(lora_labels):
        colors[lab] = _OTHER_COLORS[i % len(_OTHER_COLORS)]
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 3.9, 3.3)
        for ax, (module, panel) in zip(axes, data.items()):
            for lab, pts in panel["lines"].items():
                lora = "(r=" in lab
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[lab], marker="s" if lora else "o",
                        linestyle="--" if lora else "-", label=lab, markersize=4)
            if "LoRA r" in panel["ref"]:
                ax.axhline(panel["ref"]["LoRA r"], color="#c1121f", linestyle=":", linewidth=1.3, label="LoRA rank")
            if "Gaussian" in panel["ref"]:
                ax.axhline(panel["ref"]["Gaussian"], color="#777777", linestyle="-.", linewidth=1.1,
                           label="Gaussian, same shape")
            ax.set_title(module)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"rank for {fraction:.0%} of ΔW variance")
            ax.set_ylim(bottom=0)
            layers = sorted({p[0] for pts in panel["lines"].values() for p in pts})
            if len(layers) <= 16:
                ax.set_xticks(layers)
        handles, labs = axes[0].get_legend_handles_labels()
        fig.legend(handles, labs, loc="lower center", ncol=min(4, len(labs)), fontsize=7.5,
                   bbox_to_anchor=(0.5, -0.02 - 0.025 * math.ceil(len(labs) / 4)))
        fig.suptitle("Rank of ΔW per layer and module", fontsize=12, y=1.01)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    return (files, data) if return_data else files


def spectrum_data(spectral: pd.DataFrame, spectra: Mapping[tuple[str, float], str | os.PathLike], *,
                  layer: int | None = None, module: str = "q_proj", groups: Mapping[str, str] | None = None,
                  series: Mapping[str, str] | None = None) -> dict:
    """Singular values of one weight matrix (``layer``: None = the middle layer; ``module``):
    ``{panel: {"matrix": name, "curves": {label: array}, "kinds": {label: kind}}}`` with kinds
    ``base`` (W), ``finetuned`` (W + dW of full finetuning at its longest duration), ``delta``
    (dW of full finetuning at each duration, of adapter runs at their longest) and ``gaussian``
    (a Gaussian matrix of dW's shape and norm). ``spectra``: ``(run, duration) -> .npz`` of
    :func:`learnforget.analyze.spectral.save_spectra`. Only the first seed of a series is drawn."""
    from learnforget.analyze.spectral import load_spectra

    if spectral is None or len(spectral) == 0 or not spectra:
        return {}
    df = spectral.reset_index(drop=True)
    df["layer"] = pd.to_numeric(df["layer"], errors="coerce")
    df["duration"] = pd.to_numeric(df["duration"], errors="coerce")
    df["run"] = df["run"].astype(str)
    layers = sorted(int(v) for v in df["layer"].dropna().unique() if v >= 0)
    if not layers:
        return {}
    layer = layers[len(layers) // 2] if layer is None else int(layer)
    rows = df[(df["layer"] == layer) & (df["module"].astype(str) == module)]
    if rows.empty:
        return {}
    first_of = {}
    for run in sorted(rows["run"].unique()):
        first_of.setdefault((series or {}).get(run, run), run)
    data: dict = {}
    for ser, run in sorted(first_of.items()):
        rdf = rows[rows["run"] == run]
        lora = _lora_rank_of(rdf)
        durs = sorted(float(d) for d in rdf["duration"].unique())
        panel = data.setdefault((groups or {}).get(run, "all runs"),
                                {"matrix": str(rdf["name"].iloc[0]), "curves": {}, "kinds": {}})
        key = panel["matrix"]
        for d in durs if lora is None else durs[-1:]:
            path = spectra.get((run, d))
            if path is None or not Path(path).exists():
                continue
            sp = load_spectra(path)
            if f"{key}/delta" not in sp:
                continue
            if "W (base)" not in panel["curves"]:
                panel["curves"]["W (base)"], panel["kinds"]["W (base)"] = sp[f"{key}/base"], "base"
            label = f"ΔW {ser} @ {_fmt_dur(d)}" + (f" (r={lora})" if lora is not None else "")
            panel["curves"][label], panel["kinds"][label] = sp[f"{key}/delta"], "delta"
            if lora is None and d == durs[-1]:
                lab = f"W + ΔW {ser} @ {_fmt_dur(d)}"
                panel["curves"][lab], panel["kinds"][lab] = sp[f"{key}/finetuned"], "finetuned"
                lab = f"Gaussian, shape and norm of ΔW {ser} @ {_fmt_dur(d)}"
                panel["curves"][lab], panel["kinds"][lab] = sp[f"{key}/gaussian"], "gaussian"
    return {k: v for k, v in data.items() if any(kind == "delta" for kind in v["kinds"].values())}


def spectrum(spectral: pd.DataFrame, spectra: Mapping[tuple[str, float], str | os.PathLike], out_dir, *,
             layer: int | None = None, module: str = "q_proj", groups: Mapping[str, str] | None = None,
             series: Mapping[str, str] | None = None, name: str = "spectrum", return_data: bool = False):
    """Singular values (log scale) of one chosen matrix: W, W + dW and dW of full finetuning at
    each duration, dW of the adapter runs, and a Gaussian matrix of dW's shape and norm."""
    data = spectrum_data(spectral, spectra, layer=layer, module=module, groups=groups, series=series)
    if not data:
        return ([], {}) if return_data else []
    with plt.rc_context(STYLE):
        fig, axes = _subplots(len(data), 5.4, 4.2)
        for ax, (group, panel) in zip(axes, data.items()):
            deltas = [lab for lab, k in panel["kinds"].items() if k == "delta" and "(r=" not in lab]
            loras = [lab for lab, k in panel["kinds"].items() if k == "delta" and "(r=" in lab]
            for lab, values in panel["curves"].items():
                kind = panel["kinds"][lab]
                idx = np.arange(1, len(values) + 1)
                if kind == "base":
                    kw = dict(color="#111111", lw=2.2)
                elif kind == "finetuned":
                    kw = dict(color="#111111", lw=1.2, ls="--")
                elif kind == "gaussian":
                    kw = dict(color="#777777", lw=1.2, ls="-.")
                elif lab in loras:
                    kw = dict(color=_OTHER_COLORS[loras.index(lab) % len(_OTHER_COLORS)], lw=1.6, ls="--")
                else:
                    kw = dict(color=plt.get_cmap("Blues")(0.4 + 0.6 * deltas.index(lab) / max(len(deltas) - 1, 1)),
                              lw=1.6)
                ax.plot(idx, np.maximum(np.asarray(values, dtype=float), 1e-12), label=lab, **kw)
            ax.set_yscale("log")
            ax.set_xlabel("singular value index")
            ax.set_ylabel("singular value")
            ax.set_title(f"{group}\n{panel['matrix']}", fontsize=9.5)
            ax.legend(loc="upper right", fontsize=7)
        fig.suptitle("Spectrum of one weight matrix: W, W + ΔW and ΔW", fontsize=12, y=1.02)
        fig.tight_layout()
        files = _save(fig, out_dir, name)
    return (files, data) if return_data else files
