"""The generated ``report.md``: findings computed from the numbers, figures, tables, provenance.

Nothing in the findings is hard-coded: every sentence is built from ``metrics`` (tidy
``metrics.csv``) and ``spectral`` (tidy ``spectral.csv``). Comparisons use fixed verdict
phrases so that they can be checked: ``"{a} forgot less than {b} at equal duration"``,
``"... forgot more than ..."``, ``"... forgot about as much as ..."`` or ``"mixed"``; the same
with ``"at equal learning"``, or ``"learning ranges do not overlap"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from learnforget.compose.lorahub import summary_table
from learnforget.core.io import write_text
from learnforget.evaluate.plan import GroupSpec
from learnforget.evaluate.registry import TASKS
from learnforget.report.figures.lr_sensitivity import sensitivity_data
from learnforget.report.tables import (base_value, fmt_duration, higher_is_better, infer_primary, is_base,
                                       is_full_finetuning, metric_table, panel_title, resolve_learning,
                                       run_method_types, run_methods, run_settings, spec_label)

__all__ = [
    "compare_equal_duration",
    "compare_equal_learning",
    "findings",
    "interpolate_at_level",
    "markdown_table",
    "write_report",
]

DEFAULT_TITLE = "LoRA Learns Less and Forgets Less: toy-scale reproduction"


# --------------------------------------------------------------------------- formatting


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if v is pd.NA:
        return "–"
    return str(v)


def _signed(v) -> str:
    return ("+" if v >= 0 else "−") + _fmt(abs(v))


def markdown_table(df: pd.DataFrame, *, index: bool = False, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table (no ``tabulate`` needed)."""
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]

    def cell(v):
        return _fmt(v, digits).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |"]
    aligns = []
    for c in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
        aligns.append("---:" if numeric else ":---")
    lines.append("| " + " | ".join(aligns) + " |")
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- comparisons


def _classify(diffs: Sequence[float], tol: float) -> str:
    """diffs > 0 mean "a forgot less". less / more when no difference beyond ``tol`` points the
    other way (ties allowed), same when all are within ``tol``, mixed otherwise."""
    n_less = sum(d > tol for d in diffs)
    n_more = sum(d < -tol for d in diffs)
    if n_less and n_more:
        return "mixed"
    if n_less:
        return "less"
    if n_more:
        return "more"
    return "same"


_VERDICT = {"less": "forgot less than", "more": "forgot more than", "same": "forgot about as much as"}


def compare_equal_duration(a: Mapping[float, float], b: Mapping[float, float], *, higher_better: bool = True,
                           tol: float = 0.005) -> dict | None:
    """Forgetting scores of two runs keyed by duration -> verdict at shared durations.

    Returns ``{"verdict", "durations", "a", "b", "diffs", "n_less"}`` or None if nothing is shared.
    ``diffs`` are signed so that positive means *a forgot less*.
    """
    shared = sorted(set(a) & set(b))
    shared = [d for d in shared if d > 0]
    if not shared:
        return None
    sign = 1.0 if higher_better else -1.0
    diffs = [sign * (a[d] - b[d]) for d in shared]
    return {
        "verdict": _classify(diffs, tol),
        "durations": shared,
        "a": [a[d] for d in shared],
        "b": [b[d] for d in shared],
        "diffs": diffs,
        "n_less": sum(d > tol for d in diffs),
        "n_more": sum(d < -tol for d in diffs),
    }


def interpolate_at_level(path: Sequence[tuple[float, float]], level: float):
    """Forgetting score where a run's piecewise-linear path (``(learning, forgetting)`` points
    in duration order) first reaches learning ``level``; None if it never does."""
    for (l0, f0), (l1, f1) in zip(path[:-1], path[1:]):
        lo, hi = min(l0, l1), max(l0, l1)
        if lo - 1e-12 <= level <= hi + 1e-12:
            if l1 == l0:
                return float(f0)
            t = (level - l0) / (l1 - l0)
            return float(f0 + t * (f1 - f0))
    if len(path) == 1 and abs(path[0][0] - level) <= 1e-12:
        return float(path[0][1])
    return None


def compare_equal_learning(a_path, b_path, *, base_level: float | None = None, higher_better: bool = True,
                           tol: float = 0.005, max_levels: int = 6) -> dict:
    """Compare forgetting at matched learning levels inside the overlap of the two runs'
    learning ranges (paths start at the base point when it is known).

    Returns ``{"verdict", "overlap": (lo, hi), "levels", "a", "b", "diffs"}``; verdict is
    ``"no-overlap"`` when the ranges share no learning level beyond the base model's.
    """
    la = [p[0] for p in a_path]
    lb = [p[0] for p in b_path]
    if not la or not lb:
        return {"verdict": "no-overlap", "overlap": None, "ranges": (None, None), "levels": []}
    lo, hi = max(min(la), min(lb)), min(max(la), max(lb))
    ranges = ((min(la), max(la)), (min(lb), max(lb)))
    scale = max(abs(v) for v in la + lb) or 1.0
    eps = 1e-9 * scale
    if hi - lo <= eps:
        return {"verdict": "no-overlap", "overlap": None, "ranges": ranges, "levels": []}
    cand = sorted({v for v in la[1:] + lb[1:] if lo - eps <= v <= hi + eps})
    if base_level is not None:
        cand = [v for v in cand if abs(v - base_level) > eps]
    if not cand:
        cand = [(lo + hi) / 2.0]
    if len(cand) > max_levels:
        idx = np.unique(np.linspace(0, len(cand) - 1, max_levels).round().astype(int))
        cand = [cand[i] for i in idx]
    levels, fa, fb = [], [], []
    for L in cand:
        x, y = interpolate_at_level(a_path, L), interpolate_at_level(b_path, L)
        if x is not None and y is not None:
            levels.append(L)
            fa.append(x)
            fb.append(y)
    if not levels:
        return {"verdict": "no-overlap", "overlap": None, "ranges": ranges, "levels": []}
    sign = 1.0 if higher_better else -1.0
    diffs = [sign * (x - y) for x, y in zip(fa, fb)]
    return {"verdict": _classify(diffs, tol), "overlap": (lo, hi), "ranges": ranges, "levels": levels,
            "a": fa, "b": fb, "diffs": diffs, "n_less": sum(d > tol for d in diffs),
            "n_more": sum(d < -tol for d in diffs)}


# --------------------------------------------------------------------------- findings


def _series(tab: pd.DataFrame, run: str) -> dict[float, float]:
    rows = tab[tab["run"] == run]
    return {float(d): float(v) for d, v in zip(rows["duration"], rows["value"])}


def _best(series: Mapping[float, float], higher: bool):
    items = [(d, v) for d, v in series.items() if d > 0]
    if not items:
        return None
    return (max if higher else min)(items, key=lambda kv: kv[1])  # ties: the earliest duration


def _pairs_text(durs, a, b, limit: int = 8) -> str:
    parts = [f"{fmt_duration(d)}: {_fmt(x)} vs {_fmt(y)}" for d, x, y in zip(durs, a, b)]
    if len(parts) > limit:
        parts = parts[: limit - 1] + ["…", parts[-1]]
    return "; ".join(parts)


def _learning_findings(key, runs, methods, ltab, lspec, l_hib) -> list[str]:
    """Each run's best learning score and its score at the longest duration, against the base."""
    if ltab is None:
        return [f"- **Learning**: no primary learning metric configured for {panel_title(key)}."] + [
            f"  - {run} ({methods[run]})." for run in runs]
    b = base_value(ltab)
    word = "higher" if l_hib else "lower"
    out = [f"- **Learning** ({spec_label(lspec)}, {word} is better): base model {_fmt(b)}."]
    for run in runs:
        s = _series(ltab, run)
        if not any(d > 0 for d in s):
            out.append(f"  - {run} ({methods[run]}): no learning score.")
            continue
        bd, bv = _best(s, l_hib)
        last = max(d for d in s if d > 0)
        gain = "" if b is None else f" ({_signed(s[last] - b)} vs base)"
        out.append(f"  - {run} ({methods[run]}): best {_fmt(bv)} at duration {fmt_duration(bd)}; "
                   f"at the longest duration ({fmt_duration(last)}) {_fmt(s[last])}{gain}.")
    return out


def _full_forgetting(run, method, s, fb, f_hib) -> str:
    """How far a full-finetuning run's forgetting score moved from the base's (its largest drop too)."""
    last = max(s)
    if fb is None:
        return f"  - {run}: {_fmt(s[last])} at the longest duration ({fmt_duration(last)}); no base score."
    sign = 1.0 if f_hib else -1.0
    drops = {d: sign * (fb - v) for d, v in s.items()}
    worst = max(drops, key=lambda d: (drops[d], -d))
    verb = "dropped" if drops[last] > 0 else ("rose" if drops[last] < 0 else "stayed")
    text = (f"  - {run} ({method}): {verb} from {_fmt(fb)} to {_fmt(s[last])} at the longest "
            f"duration ({fmt_duration(last)}), a change of {_signed(s[last] - fb)}")
    if drops[worst] > 0 and worst != last:
        text += f"; its largest drop was {_fmt(drops[worst])} at duration {fmt_duration(worst)}"
    return text + "."


def _forgetting_findings(ftab, fulls, others, methods, fspec, f_hib) -> list[str]:
    """Each run's forgetting score at its longest duration against the base's (full finetuning first)."""
    fb = base_value(ftab)
    lines = []
    for run in fulls:
        s = {d: v for d, v in _series(ftab, run).items() if d > 0}
        if s:
            lines.append(_full_forgetting(run, methods[run], s, fb, f_hib))
    for run in others:
        s = {d: v for d, v in _series(ftab, run).items() if d > 0}
        if s and fb is not None:
            last = max(s)
            lines.append(f"  - {run} ({methods[run]}): {_fmt(s[last])} at the longest duration "
                         f"({fmt_duration(last)}), a change of {_signed(s[last] - fb)} vs base.")
    if not lines:
        return []
    return [f"- **Forgetting** ({spec_label(fspec)}, {'higher' if f_hib else 'lower'} = remembers more): "
            f"base model {_fmt(fb)}."] + lines


def _equal_duration_findings(ftab, fulls, others, f_hib, tol) -> list[str]:
    """Every other run against every full-finetuning run: forgetting at the durations both have."""
    out = []
    for a in others:
        for b in fulls:
            c = compare_equal_duration(_series(ftab, a), _series(ftab, b), higher_better=f_hib, tol=tol)
            if c is None:
                out.append(f"- **Equal duration**: {a} and {b} share no duration.")
                continue
            n = len(c["durations"])
            detail = _pairs_text(c["durations"], c["a"], c["b"])
            if c["verdict"] == "mixed":
                out.append(f"- **Equal duration**: {a} vs {b}: mixed: of {n} shared durations, {a} forgot less "
                           f"at {c['n_less']} and more at {c['n_more']} (forgetting score {a} vs {b}: {detail}).")
            else:
                k = max(c["n_less"], c["n_more"])
                scope = ("the only shared duration" if n == 1 else
                         f"all {n} shared durations" if k == n or c["verdict"] == "same" else
                         f"{k} of {n} shared durations, about equal at the rest")
                out.append(f"- **Equal duration**: **{a} {_VERDICT[c['verdict']]} {b} at equal duration** "
                           f"({scope}; forgetting score {a} vs {b}: {detail}).")
    return out


def _equal_learning_finding(a, b, c, lspec) -> str:
    """The sentence of one :func:`compare_equal_learning` result of run ``a`` against run ``b``."""
    if c["verdict"] == "no-overlap":
        (ra, rb) = c["ranges"] if c["ranges"] else (None, None)
        rng = ""
        if ra and rb:
            rng = (f" ({a} spans {_fmt(ra[0])}–{_fmt(ra[1])}, {b} spans {_fmt(rb[0])}–{_fmt(rb[1])}"
                   f" in {spec_label(lspec)})")
        return (f"- **Equal learning**: {a} vs {b}: learning ranges do not overlap beyond the base "
                f"model, so forgetting cannot be compared at matched learning{rng}.")
    lo, hi = c["overlap"]
    detail = "; ".join(f"at {_fmt(L)}: {_fmt(x)} vs {_fmt(y)}" for L, x, y in zip(c["levels"], c["a"], c["b"]))
    where = (f"interpolated at matched {spec_label(lspec)} levels within the shared range "
             f"{_fmt(lo)}–{_fmt(hi)}; forgetting score {a} vs {b}: {detail}")
    if c["verdict"] == "mixed":
        return (f"- **Equal learning**: {a} vs {b}: mixed: of {len(c['levels'])} matched levels, {a} "
                f"forgot less at {c['n_less']} and more at {c['n_more']} ({where}).")
    n, k = len(c["levels"]), max(c["n_less"], c["n_more"])
    scope = "" if (k == n or c["verdict"] == "same") else f"{k} of {n} levels, about equal at the rest; "
    return f"- **Equal learning**: **{a} {_VERDICT[c['verdict']]} {b} at equal learning** ({scope}{where})."


def _equal_learning_findings(ltab, ftab, fulls, others, lspec, f_hib, tol) -> list[str]:
    """Every other run against every full-finetuning run: forgetting at matched learning levels
    along their (learning, forgetting) paths from the base model."""
    lb_, fb = base_value(ltab), base_value(ftab)
    base_pt = [(lb_, fb)] if (lb_ is not None and fb is not None) else []

    def path(run):
        ls, fs = _series(ltab, run), _series(ftab, run)
        return base_pt + [(ls[d], fs[d]) for d in sorted(set(ls) & set(fs)) if d > 0]

    return [_equal_learning_finding(a, b, compare_equal_learning(path(a), path(b), base_level=lb_,
                                                                  higher_better=f_hib, tol=tol), lspec)
            for a in others for b in fulls]


def _setting_findings(metrics, key, runs, methods, types, lspec, fspec, tol) -> list[str]:
    """The findings of one (domain, regime): learning, forgetting, and every other method
    against full finetuning (``types``: run -> method type) at equal duration and equal learning."""
    l_hib = higher_is_better(metrics, lspec) if lspec else True
    f_hib = higher_is_better(metrics, fspec) if fspec else True
    ltab = metric_table(metrics, lspec) if lspec else None
    ftab = metric_table(metrics, fspec) if fspec else None
    out = _learning_findings(key, runs, methods, ltab, lspec, l_hib)
    if ftab is None:
        return out
    fulls = [r for r in runs if is_full_finetuning(types[r])]
    others = [r for r in runs if not is_full_finetuning(types[r])]
    out += _forgetting_findings(ftab, fulls, others, methods, fspec, f_hib)
    if not fulls or not others:
        if others and not fulls:
            out.append("- No full-finetuning run in this setting: no LoRA vs full comparison.")
        return out
    out += _equal_duration_findings(ftab, fulls, others, f_hib, tol)
    if ltab is not None:
        out += _equal_learning_findings(ltab, ftab, fulls, others, lspec, f_hib, tol)
    return out


def _seed_counts(metrics) -> dict[str, int]:
    """series -> number of runs (seeds) in it."""
    if metrics is None or "series" not in metrics.columns:
        return {}
    df = metrics.dropna(subset=["series"])
    return {str(k): int(v) for k, v in df.groupby("series")["run"].nunique().items()}


def _sensitivity_findings(metrics, panel, lspec, fspec) -> list[str]:
    """The learning rate that learned most per method, and how much learning moved across the sweep."""
    if not panel or not lspec:
        return []
    hib = higher_is_better(metrics, lspec)
    out = [f"- **Learning-rate sensitivity** ({spec_label(lspec)} at the longest duration):"]
    for method, pts in sorted(panel.items()):
        best = (max if hib else min)(pts, key=lambda p: p[1])
        worst = (min if hib else max)(pts, key=lambda p: p[1])
        text = (f"  - {method}: best at lr {best[0]:g} ({_fmt(best[1])}), worst at lr {worst[0]:g} "
                f"({_fmt(worst[1])}); spread {_fmt(abs(best[1] - worst[1]))} over {len(pts)} learning rates")
        if fspec and np.isfinite(best[2]):
            text += f"; forgetting score at the best lr {_fmt(best[2])}"
        out.append(text + ".")
    spreads = {m: abs(max(p[1] for p in pts) - min(p[1] for p in pts)) for m, pts in panel.items()}
    if len(spreads) > 1:
        most = max(spreads, key=spreads.get)
        out.append(f"  - Most sensitive to the learning rate: {most} (spread {_fmt(spreads[most])}).")
    return out


def _rank_findings(spectral: pd.DataFrame, runs: Sequence[str]) -> list[str]:
    if spectral is None or len(spectral) == 0:
        return []
    spectral = spectral.reset_index(drop=True)
    if "series" in spectral.columns:  # seeds of a setting: one series
        spectral = spectral.assign(run=spectral["series"].fillna(spectral["run"]))
    df = spectral[spectral["run"].astype(str).isin(runs)].copy()
    if df.empty:
        return []
    for c in ("duration", "rank90", "rank90_gaussian", "rank90_base", "rank90_finetuned", "max_rank", "lora_rank"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    out = []
    lora_ranks = {}
    for run, rdf in df.groupby("run"):
        r = rdf["lora_rank"].dropna() if "lora_rank" in rdf else pd.Series([], dtype=float)
        lora_ranks[run] = int(r.max()) if len(r) else None
    fulls = [r for r in sorted(lora_ranks) if lora_ranks[r] is None]
    adapters = [r for r in sorted(lora_ranks) if lora_ranks[r] is not None]
    ref_rank = max((lora_ranks[r] for r in adapters), default=None)
    for run in fulls:
        rdf = df[df["run"] == run]
        last = rdf["duration"].max()
        ldf = rdf[rdf["duration"] == last]
        mx = int(ldf["rank90"].max())
        text = (f"  - {run} (full finetuning): ΔW needs up to {mx} ranks for the variance fraction "
                f"(mean {_fmt(float(ldf['rank90'].mean()), 1)}, matrices up to rank {int(ldf['max_rank'].max())}) "
                f"at the longest duration ({fmt_duration(last)})")
        if ref_rank:
            text += f", {_fmt(mx / ref_rank, 1)}× the LoRA rank {ref_rank}"
        by_d = rdf.groupby("duration")["rank90"].mean()
        if len(by_d) > 1:
            trend = "grew" if by_d.iloc[-1] > by_d.iloc[0] else ("fell" if by_d.iloc[-1] < by_d.iloc[0] else "stayed")
            text += (f"; the mean rank {trend} from {_fmt(float(by_d.iloc[0]), 1)} at duration "
                     f"{fmt_duration(by_d.index[0])} to {_fmt(float(by_d.iloc[-1]), 1)} at {fmt_duration(by_d.index[-1])}")
        out.append(text + ".")
    for run in adapters:
        rdf = df[df["run"] == run]
        mx = int(rdf["rank90"].max())
        r = lora_ranks[run]
        ok = "within" if mx <= r else "ABOVE"
        out.append(f"  - {run} (LoRA r={r}): max rank {mx} over all durations and matrices ({ok} its rank {r}).")
    if "rank90_gaussian" in df and df["rank90_gaussian"].notna().any():
        g = df.groupby("module")["rank90_gaussian"].mean().mean()
        out.append(f"  - A Gaussian matrix of the same shape needs {_fmt(float(g), 1)} ranks on average "
                   f"(max {int(df['rank90_gaussian'].max())}).")
    if {"rank90_base", "rank90_finetuned"} <= set(df.columns) and fulls:
        fd = df[df["run"].isin(fulls)]
        dev = (fd["rank90_finetuned"] - fd["rank90_base"]).abs().mean()
        out.append(f"  - The spectrum of W' stays close to W's: mean |rank(W') − rank(W)| = {_fmt(float(dev), 2)} "
                   f"for full finetuning (rank of W: mean {_fmt(float(fd['rank90_base'].mean()), 1)}).")
    return out


def _complete_specs(metrics, learning, forgetting):
    """Fill what the caller left out (a domain missing from ``learning``, no ``forgetting``)
    with the most frequent (task, metric) in the table."""
    if metrics is None or len(metrics) == 0:
        return learning or {}, forgetting
    inf_l, inf_f = infer_primary(metrics)
    merged = dict(inf_l)
    for k, v in (learning or {}).items():
        merged[k] = tuple(v) if isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) else v
    if learning:  # explicit (domain, regime) keys win over the inferred per-domain entry
        for k in list(inf_l):
            if any(isinstance(kk, tuple) and kk[0] == k for kk in learning) and k not in learning:
                merged.pop(k)
    return merged, (forgetting if forgetting else inf_f)


def findings(metrics: pd.DataFrame, spectral: pd.DataFrame | None = None, *, learning: Mapping | None = None,
             forgetting=None, tol: float = 0.005) -> list[str]:
    """Markdown lines of the Findings section (one subsection per (domain, regime))."""
    if metrics is None or len(metrics) == 0:
        return ["No metrics were available."]
    learning, forgetting = _complete_specs(metrics, learning, forgetting)
    settings = run_settings(metrics)
    methods, types = run_methods(metrics), run_method_types(metrics)
    sens = sensitivity_data(metrics, learning=learning, forgetting=forgetting)
    out: list[str] = []
    seeds = _seed_counts(metrics)
    if seeds and max(seeds.values()) > 1:
        counts = sorted(set(seeds.values()))
        out += [f"*Series with several seeds ({', '.join(str(c) for c in counts)} seeds) are compared by their "
                "means; tables give the mean ± the 95% confidence interval (t distribution).*", ""]
    for key in sorted(set(settings.values())):
        runs = sorted(r for r, k in settings.items() if k == key)
        out.append(f"### {panel_title(key)}")
        out.append("")
        out.extend(_setting_findings(metrics, key, runs, methods, types, resolve_learning(learning, *key),
                                     forgetting, tol))
        out.extend(_sensitivity_findings(metrics, sens.get(key), resolve_learning(learning, *key), forgetting))
        ranks = _rank_findings(spectral, runs)
        if ranks:
            frac = None
            if spectral is not None and "fraction" in spectral:
                fr = pd.to_numeric(spectral["fraction"], errors="coerce").dropna()
                frac = float(fr.iloc[0]) if len(fr) else None
            out.append(f"- **Ranks of ΔW** (singular values for {_fmt(100 * frac, 0) if frac else 90}% of the variance):")
            out.extend(ranks)
        out.append("")
    return out


# --------------------------------------------------------------------------- tables & provenance


def _value_tables(metrics, learning, forgetting) -> list[str]:
    out = []
    settings = run_settings(metrics)
    for key in sorted(set(settings.values())):
        runs = sorted(r for r, k in settings.items() if k == key)
        for kind, spec in (("Learning", resolve_learning(learning, *key)), ("Forgetting", forgetting)):
            if not spec:
                continue
            tab = metric_table(metrics, spec, errors=True)
            tab = tab[tab["run"].isin(runs) | np.array([is_base(r, t) for r, t in zip(tab["run"], tab["method_type"])],
                                                       dtype=bool)]
            if tab.empty:
                continue
            if (tab["n"] > 1).any():  # mean ± 95% interval over seeds
                tab = tab.assign(value=[_fmt(v) if n < 2 else f"{_fmt(v)} ± {_fmt(c)}"
                                        for v, c, n in zip(tab["value"], tab["ci"], tab["n"])])
            wide = tab.pivot_table(index="run", columns="duration", values="value", aggfunc="first")
            order = [r for r in wide.index if is_base(r)] + [r for r in runs if r in wide.index]
            wide = wide.loc[order]
            wide.columns = [f"d={fmt_duration(c)}" for c in wide.columns]
            wide.index.name = "run"
            out.append(f"**{panel_title(key)}: {kind.lower()}, {spec_label(spec)}** "
                       f"({'higher' if higher_is_better(metrics, spec) else 'lower'} is better)")
            out.append("")
            out.append(markdown_table(wide, index=True))
            out.append("")
    return out


def _runs_table(config) -> list[str]:
    """Every run of the config: its series, method, setting, seed, learning rate and durations."""
    runs = (config or {}).get("runs") if isinstance(config, Mapping) else None
    if not runs:
        return []
    finetune = config.get("finetune") or {}
    durations = config.get("durations") or {}
    rows = []
    for r in runs:
        lr = (r.get("train") or {}).get("lr", finetune.get("lr"))
        durs = r.get("durations", durations.get("values", []))
        rows.append({"run": r["name"], "series": r.get("series") or r["name"], "method": r.get("method", ""),
                     "domain": r.get("domain", ""), "regime": r.get("regime", ""), "seed": r.get("seed", ""),
                     "lr": "" if lr is None else f"{lr:g}",
                     "durations": ", ".join(fmt_duration(d) for d in durs) + f" {r.get('unit', durations.get('unit', ''))}"})
    return ["## Runs", "", markdown_table(pd.DataFrame(rows), index=False), ""]


def _diversity_table(metrics) -> list[str]:
    """Generation diversity (paper section 4.4) per run and duration, one table per task."""
    if metrics is None or "role" not in metrics:
        return []
    div = metrics[metrics["role"] == "diversity"]
    out = []
    for task, rows in div.groupby("task", sort=True):
        wide = rows.pivot_table(index=["run", "duration"], columns="metric", values="value", aggfunc="mean")
        wide = wide.reset_index()
        wide["duration"] = [fmt_duration(d) for d in wide["duration"]]
        out += [f"**Generation diversity, {task}** (means over problems of the samples of one problem: distinct "
                "normalised solutions, their share, and mean pairwise similarity; more distinct and less "
                "similar = more diverse)", "", markdown_table(wide.set_index(["run", "duration"]), index=True), ""]
    return out


def compose_section(record: Mapping | None, metrics: pd.DataFrame | None, learning: Mapping | None,
                    forgetting) -> list[str]:
    """Markdown lines of the LoRAHub section from the compose stage's record (``search.json``,
    :func:`learnforget.compose.lorahub.run`) and the composites' rows of ``metrics``: what was combined,
    the weights found, the few-shot loss of the search against the uniform combination, each
    adapter alone and the base model (verdict: ``"the search lowered the few-shot loss below the
    uniform combination's"`` or ``"... did not lower ..."``), and a table of every composite's
    weights, few-shot loss, learning metrics and forgetting score."""
    if not record or not record.get("composites"):
        return []
    comps = record["composites"]
    found = next((n for n, c in comps.items() if c["kind"] == "search"), None)
    uniform = next((n for n, c in comps.items() if c["kind"] == "uniform"), None)
    singles = {n: c for n, c in comps.items() if c["kind"] == "single"}
    t, s = record["target"], record.get("search") or {}
    adapters = ", ".join(f"{r} ({fmt_duration(record['durations'][r])} {record.get('unit', '')})".replace(" )", ")")
                         for r in record.get("runs") or record["adapters"])
    out = ["## Composing adapters (LoRAHub)", "",
           f"The adapters of {adapters} were combined with peft's add_weighted_adapter (combination "
           f"`{record['combination']}`); the weights were searched without gradients (Nelder-Mead, "
           f"{len(record.get('trace') or [])} evaluations, weights in ±{_fmt(s.get('bound'), 2)}) to minimise the "
           f"loss on {t['k']} examples of {t['domain']}/{t['split']} ({t['regime']}) plus "
           f"{_fmt(s.get('l1'), 2)} × the mean absolute weight (LoRAHub's objective).", ""]
    if found:
        c = comps[found]
        weights = ", ".join(f"{r} {c['weights'][r]:+.3f}" for r in record.get("runs") or c["weights"])
        text = f"- **{found}** (the search): weights {weights}; few-shot loss {_fmt(c['loss'])}"
        if uniform:
            u = comps[uniform]["loss"]
            verdict = "lowered" if c["loss"] < u else "did not lower"
            text += f" vs {_fmt(u)} for the uniform combination: **the search {verdict} the few-shot loss below the " \
                    "uniform combination's**"
        if singles:
            best = min(singles, key=lambda n: singles[n]["loss"])
            text += f"; the best single adapter, {singles[best]['run']}, has {_fmt(singles[best]['loss'])}"
        if record.get("base_loss") is not None:
            text += f"; the base model {_fmt(record['base_loss'])}"
        out += [text + ".", ""]
    learn = {k: v for k, v in (learning or {}).items() if isinstance(k, str)}
    table = summary_table(record, metrics, learning=learn, forgetting=forgetting)
    out += ["Every composite is evaluated like a checkpoint (every domain's learning group and the forgetting "
            "group) and drawn on the trade-off figure.", "", markdown_table(table, index=False), ""]
    return out


def evaluation_protocol(groups: Mapping[str, Mapping], n_shot: Mapping[str, Any] | None = None) -> list[str]:
    """Markdown lines stating how every task group was scored: role, tasks, metric and filter
    per task, shots (as lm-eval ran them, from ``n_shot``), limits and sampling settings."""
    rows = []
    for name in sorted(groups):
        g = GroupSpec.from_dict(groups[name])
        for task in g.tasks:
            shots = (n_shot or {}).get(task, g.shots(task))
            entry = TASKS.get(task)
            how = "-"
            if entry is not None and entry.sampled:
                how = (f"{g.samples} samples/problem, temperature {g.temperature}, top-p {g.top_p}, "
                       f"max {g.max_gen_toks} new tokens" + (", executed in the sandbox" if entry.scorer == "humaneval"
                                                              else ", parsed only"))
            rows.append({"group": name, "role": g.role + (f" ({g.domain})" if g.domain else ""), "task": task,
                         "metric": g.metric_of(task) or "all", "filter": g.filter_of(task),
                         "shots": "task default" if shots is None else shots,
                         "limit": g.limit if g.limit is not None else "config", "generation": how})
    if not rows:
        return []
    table = pd.DataFrame(rows)
    return ["A group's score is the mean of its tasks' metric; the forgetting score is the forgetting group's.",
            "", markdown_table(table, index=False), ""]


def _spectral_table(spectral) -> list[str]:
    if spectral is None or len(spectral) == 0:
        return []
    df = spectral.reset_index(drop=True)
    for c in ("duration", "rank90", "rank90_gaussian", "max_rank", "lora_rank", "effective_rank"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    agg = {"matrices": ("rank90", "size"), "mean rank90": ("rank90", "mean"), "max rank90": ("rank90", "max")}
    if "effective_rank" in df:
        agg["mean eff. rank"] = ("effective_rank", "mean")
    if "rank90_gaussian" in df:
        agg["mean Gaussian rank90"] = ("rank90_gaussian", "mean")
    agg["max possible"] = ("max_rank", "max")
    g = df.groupby(["run", "duration"], as_index=False).agg(**agg)
    if "lora_rank" in df:
        lr = df.groupby("run")["lora_rank"].max()
        g["duration"] = g["duration"].map(fmt_duration)
        g.insert(2, "LoRA rank", g["run"].map(lr).round().astype("Int64"))
    return ["**Rank of ΔW by run and duration**", "", markdown_table(g, digits=1), ""]


def _scalar(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_scalar(x) for x in v)
    return str(v)


def _dump(obj) -> str:
    try:
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False, allow_unicode=True).rstrip()
    except ImportError:  # pragma: no cover
        return json.dumps(obj, indent=2, default=str)


def _provenance(provenance: Mapping) -> list[str]:
    out = []
    scalars = {k: v for k, v in provenance.items() if not isinstance(v, Mapping)}
    if scalars:
        out.extend(f"- **{k}**: {_scalar(v)}" for k, v in scalars.items())
        out.append("")
    for k, v in provenance.items():
        if not isinstance(v, Mapping):
            continue
        out.append(f"**{k}**")
        out.append("")
        if v and all(not isinstance(x, (Mapping, list, tuple)) for x in v.values()):
            out.append(markdown_table(pd.DataFrame({"key": [str(x) for x in v], "value": [_scalar(x) for x in v.values()]})))
        else:
            out.extend(["```yaml", _dump(v), "```"])
        out.append("")
    return out


def disk_table(disk: pd.DataFrame | None) -> list[str]:
    """Disk used per run (learnforget.train.keep.disk_usage, bytes) as a table in MiB."""
    if disk is None or not len(disk):
        return []
    cols = {"checkpoints": "checkpoints", "resume": "resume snapshots", "evaluations": "evaluations",
            "analysis": "spectral analysis", "total": "total", "freed_by_keep_policy": "freed by the keep policy"}
    table = pd.DataFrame({"run": disk["run"].astype(str)})
    for col, label in cols.items():
        table[label] = [f"{v / 2**20:.2f}" if v is not None and not pd.isna(v) else "–" for v in disk[col]]
    return ["**Disk used per run (MiB)**", "",
            "Checkpoints include trunks; `freed by the keep policy` is the training state "
            "(`keep.optimizer_state`) dropped from superseded checkpoints, as recorded in their `dropped.json`.",
            "", markdown_table(table), ""]


def _rel(target, start_dir: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), start_dir.resolve())).as_posix()


# --------------------------------------------------------------------------- entry point


def write_report(metrics: pd.DataFrame, spectral: pd.DataFrame | None, figures: Mapping[str, str], out_md, *,
                 config: Mapping, provenance: Mapping, learning: Mapping | None = None, forgetting=None,
                 title: str | None = None, tol: float = 0.005, protocol: list[str] | None = None,
                 disk: pd.DataFrame | None = None, compose: Mapping | None = None) -> str:
    """Write ``report.md`` atomically and return its text.

    ``figures`` maps a name to a PNG path (a PDF next to it is linked too); links are relative
    to the report's folder. ``learning``/``forgetting`` are the primary metric specs (see
    ``learnforget.report.figures``); when omitted they are taken from ``config["report"]`` if present,
    else inferred from the table. ``tol``: forgetting differences up to this are "about as much".
    ``disk``: bytes per run (:func:`learnforget.train.keep.disk_usage`), a table in the provenance.
    ``compose``: the compose stage's record (``search.json``), a LoRAHub section after the findings.
    """
    out_md = Path(out_md)
    out_dir = out_md.parent
    cfg_report = (config or {}).get("report", {}) if isinstance(config, Mapping) else {}
    if learning is None and isinstance(cfg_report, Mapping) and cfg_report.get("learning"):
        learning = dict(cfg_report["learning"])
    if forgetting is None and isinstance(cfg_report, Mapping) and cfg_report.get("forgetting"):
        forgetting = cfg_report["forgetting"]
    learning, forgetting = _complete_specs(metrics, learning, forgetting)

    title = title or (config or {}).get("title") or DEFAULT_TITLE
    lines = [f"# {title}", ""]
    desc = (config or {}).get("description")
    if desc:
        lines += [str(desc), ""]
    lines += ["*Generated from `metrics.csv` and `spectral.csv`; every number below is computed, not typed.*", ""]

    lines += ["## Findings", ""]
    lines += findings(metrics, spectral, learning=learning, forgetting=forgetting, tol=tol)
    lines += compose_section(compose, metrics, learning, forgetting)
    lines += _runs_table(config)

    fig_lines = []
    for name, png in (figures or {}).items():
        if not png or not Path(png).is_file():
            continue
        rel = _rel(png, out_dir)
        fig_lines += [f"### {name}", "", f"![{name}]({rel})", ""]
        pdf = Path(png).with_suffix(".pdf")
        if pdf.is_file():
            fig_lines += [f"[PDF]({_rel(pdf, out_dir)})", ""]
    if fig_lines:
        lines += ["## Figures", ""] + fig_lines

    tables = []
    if metrics is not None and len(metrics):
        tables += _value_tables(metrics, learning or {}, forgetting)
    tables += _diversity_table(metrics)
    tables += _spectral_table(spectral)
    if tables:
        lines += ["## Key numbers", ""] + tables
    if protocol:
        lines += ["## Evaluation protocol", ""] + list(protocol)

    lines += ["## Provenance", ""]
    lines += _provenance(provenance or {})
    lines += disk_table(disk)
    if config:
        lines += ["**config**", "", "```yaml", _dump(dict(config)), "```", ""]
    text = "\n".join(lines).rstrip() + "\n"
    write_text(out_md, text)
    return text
