"""Reading the tidy tables: which rows are the base model, a composite or full finetuning, the
value of a metric per series and duration, the setting (domain, regime) of each series.

The figures and the report's findings share these helpers; nothing here draws. A method is
known by its *type* (``method_type``: the method registry's name, ``base`` for the base model,
``compose`` for a composite of adapters), never by the name a user gave it: a full finetuning
method named ``baseline`` is full finetuning. A table without a ``method_type`` is refused.

A metric spec is ``(task, metric)``; where a forgetting spec may be a list of specs, their mean
is the score (as the paper's mean of three benchmarks).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from learnforget.compose.lorahub import METHOD as COMPOSE_METHOD
from learnforget.train.methods import METHODS

Spec = tuple  # (task, metric)

_LOWER_IS_BETTER_HINTS = ("bits_per_byte", "perplexity", "ppl", "loss", "word_perplexity", "byte_perplexity")


# --------------------------------------------------------------------------- what a row is


def is_base(run, method_type=None) -> bool:
    """Rows of the base model (run ``base``, method type ``base``)."""
    return str(run) == "base" or (method_type is not None and str(method_type) == "base")


def is_composite(method_type) -> bool:
    """Rows of a composite of adapters (``compose``, learnforget.compose.lorahub): drawn on the
    trade-off figure as points of their own, left out of every per-run series."""
    return str(method_type) == COMPOSE_METHOD


def is_full_finetuning(method_type) -> bool:
    """Whether a method type trains every weight (the method registry says; the base model, a
    composite and an unknown type do not)."""
    method = METHODS.get(str(method_type))
    return bool(method is not None and method.full_finetuning)


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


def fmt_duration(d) -> str:
    return f"{float(d):g}"


def panel_title(key) -> str:
    """``(domain, regime)`` -> ``"domain (regime)"``."""
    dom, reg = key
    return f"{dom} ({reg})" if reg and reg not in ("nan", "None") else str(dom)


# --------------------------------------------------------------------------- tables


def clean(metrics: pd.DataFrame) -> pd.DataFrame:
    """Numbers as numbers, names as strings, a ``series`` for every row (its run where none is
    given); every row must have its ``method_type``."""
    df = metrics.reset_index(drop=True)  # concatenated tables may repeat index labels
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["duration"] = pd.to_numeric(df["duration"], errors="coerce")
    df = df.dropna(subset=["value", "duration"])
    if "method" in df.columns:  # what a method is comes from its type, never from its name
        given = df["method_type"] if "method_type" in df.columns else pd.Series(None, index=df.index, dtype=object)
        missing = df.loc[given.isna() | (given.astype(str) == ""), "run"]
        if len(missing):
            raise ValueError(f"metrics table: no method_type for run(s) {', '.join(sorted(set(map(str, missing))))} "
                             "(the method registry's type: full, lora, ...; base; compose)")
    for col in ("run", "method", "method_type", "domain", "regime", "task", "metric"):
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
    from scipy.stats import t  # lazy: scipy only where several seeds are aggregated

    return float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def metric_table(metrics: pd.DataFrame, spec, *, errors: bool = False) -> pd.DataFrame:
    """``run, method, method_type, duration, value`` for a spec, one row per series (``run``
    holds the series: the seeds of a setting, ``runs[].seeds``, are one series; value = their
    mean).

    Several specs: the mean over specs per run (only where all are present), then over seeds.
    ``errors=True`` adds ``ci`` (95% half-width over seeds; NaN for one seed) and ``n`` (seeds).
    """
    df = clean(metrics)
    keys = ["series", "run", "method", "method_type", "duration"]
    parts = []
    for task, metric in _specs(spec):
        sel = df[(df["task"] == task) & (df["metric"] == metric)]
        parts.append(sel.groupby(keys, as_index=False)["value"].mean())
    cols = ["run", "method", "method_type", "duration", "value"] + (["ci", "n"] if errors else [])
    if not parts:
        return pd.DataFrame(columns=cols)
    out = parts[0]
    for i, p in enumerate(parts[1:], 1):
        out = out.merge(p, on=keys, suffixes=("", f"_{i}"))
    vcols = [c for c in out.columns if c.startswith("value")]
    out["value"] = out[vcols].mean(axis=1)
    agg = out.groupby(["series", "method", "method_type", "duration"], as_index=False)["value"].agg(
        ["mean", "std", "count"])
    agg = agg.rename(columns={"series": "run", "mean": "value", "count": "n"})
    agg["ci"] = [ci95(sd, int(n)) for sd, n in zip(agg["std"], agg["n"])]
    return agg[cols].sort_values(["run", "duration"]).reset_index(drop=True)


def base_value(table: pd.DataFrame):
    """The base model's value in a :func:`metric_table` (None when it has none)."""
    rows = table[[is_base(r, t) for r, t in zip(table["run"], table["method_type"])]]
    return float(rows["value"].mean()) if len(rows) else None


def run_settings(metrics: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """series -> (domain, regime) for every non-base series (from its learning rows, else any
    row); a run that is not one of several seeds is its own series."""
    df = clean(metrics)
    df = df[~df.apply(lambda r: is_base(r["run"], r.get("method_type")) or is_composite(r.get("method_type")),
                      axis=1)] if len(df) else df
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
    return {r: panel_title(k) for r, k in run_settings(metrics).items()}


def run_methods(metrics: pd.DataFrame) -> dict[str, str]:
    """series (and run) -> the method's name (as the config names it: for labels)."""
    df = clean(metrics)
    out = {str(r): str(m) for r, m in zip(df["run"], df["method"])}
    out.update({str(r): str(m) for r, m in zip(df["series"], df["method"])})
    return out


def run_method_types(metrics: pd.DataFrame) -> dict[str, str]:
    """series (and run) -> the method's type (what it is: for styles and comparisons)."""
    df = clean(metrics)
    out = {str(r): str(m) for r, m in zip(df["run"], df["method_type"])}
    out.update({str(r): str(m) for r, m in zip(df["series"], df["method_type"])})
    return out


def method_types_by_name(metrics: pd.DataFrame) -> dict[str, str]:
    """method name -> its type (for what is keyed by method, as the sensitivity panels)."""
    df = clean(metrics)
    return {str(m): str(t) for m, t in zip(df["method"], df["method_type"])}


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
    df = clean(metrics)
    df = df[~df["metric"].str.contains("stderr")]
    learning = {}
    for dom, rows in df[df["role"] == "learning"].groupby("domain"):
        if dom == "source":
            continue
        learning[dom] = Counter(zip(rows["task"], rows["metric"])).most_common(1)[0][0]
    frows = df[df["role"] == "forgetting"]
    forgetting = Counter(zip(frows["task"], frows["metric"])).most_common(1)[0][0] if len(frows) else None
    return learning, forgetting


def drop_intervals(data: dict) -> dict:
    """Curve data without the intervals: ``(x, y, ci, n)`` points -> ``(x, y)``."""
    return {k: {r: [p[:2] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}


def duration_curves(tab: pd.DataFrame, runs, base_value_: float | None) -> dict[str, list[tuple]]:
    """Run -> ``(duration, value, ci, n)`` points of a :func:`metric_table` (``errors=True``), each
    starting at the base model's value at duration 0 when there is one; runs without points are
    left out, and the base is ``"base"``'s own entry first."""
    base_pt = [(0.0, base_value_, float("nan"), 1)] if base_value_ is not None else []
    panel = {}
    for run in sorted(runs):
        rows = tab[(tab["run"] == run) & (tab["duration"] > 0)].sort_values("duration")
        pts = [(float(d), float(v), float(c), int(n))
               for d, v, c, n in zip(rows["duration"], rows["value"], rows["ci"], rows["n"])]
        if pts:
            panel[run] = base_pt + pts
    return (({"base": base_pt} if base_pt else {}) | panel) if panel else {}
