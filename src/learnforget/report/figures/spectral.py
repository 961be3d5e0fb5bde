"""The spectral figures: the rank of the weight update ΔW per layer (mean over modules, and per
module) and the singular values of one chosen matrix.

Full finetuning and adapters are told apart by the table's ``lora_rank`` (the adapter's rank
from the run's method; empty for full finetuning), not by a method's name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from learnforget.analyze.spectral import load_spectra
from learnforget.report.figures.style import OTHER_COLORS, STYLE, save, subplots
from learnforget.report.registry import FigureInputs
from learnforget.report.tables import fmt_duration
from learnforget.train.methods import TARGET_GROUPS


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
                label = f"{run} @ {fmt_duration(d)}" + (f" (r={r})" if r is not None else "")
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
        fig, axes = subplots(len(data), 5.2, 5.0)
        for ax, (group, panel) in zip(axes, data.items()):
            full_runs = sorted({v[0] for v in panel["runs"].values() if v[2] == "full"})
            lora_runs = sorted({v[0] for v in panel["runs"].values() if v[2] == "lora"})
            lora_colors = {r: OTHER_COLORS[i % len(OTHER_COLORS)] for i, r in enumerate(lora_runs)}
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
        files = save(fig, out_dir, name)
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
    order = {m: i for i, m in enumerate(TARGET_GROUPS["all"])}  # a Llama layer's linear modules, in order
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
                label = f"{prefix}{run} @ {fmt_duration(d)}" + (f" (r={r})" if r is not None else "")
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
        colors[lab] = OTHER_COLORS[i % len(OTHER_COLORS)]
    with plt.rc_context(STYLE):
        fig, axes = subplots(len(data), 3.9, 3.3)
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
        files = save(fig, out_dir, name)
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
            label = f"ΔW {ser} @ {fmt_duration(d)}" + (f" (r={lora})" if lora is not None else "")
            panel["curves"][label], panel["kinds"][label] = sp[f"{key}/delta"], "delta"
            if lora is None and d == durs[-1]:
                lab = f"W + ΔW {ser} @ {fmt_duration(d)}"
                panel["curves"][lab], panel["kinds"][lab] = sp[f"{key}/finetuned"], "finetuned"
                lab = f"Gaussian, shape and norm of ΔW {ser} @ {fmt_duration(d)}"
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
        fig, axes = subplots(len(data), 5.4, 4.2)
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
                    kw = dict(color=OTHER_COLORS[loras.index(lab) % len(OTHER_COLORS)], lw=1.6, ls="--")
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
        files = save(fig, out_dir, name)
    return (files, data) if return_data else files


def draw_ranks(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``spectral_ranks`` figure."""
    return spectral_ranks(inputs.spectral, out_dir, groups=inputs.groups, series=inputs.series)


def draw_modules(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``spectral_modules`` figure."""
    return spectral_modules(inputs.spectral, out_dir, groups=inputs.groups, series=inputs.series)


def draw_spectrum(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``spectrum`` figure: the matrix of ``analysis.spectrum``."""
    return spectrum(inputs.spectral, inputs.spectra, out_dir, layer=inputs.spectrum["layer"],
                    module=inputs.spectrum["module"], groups=inputs.groups, series=inputs.series)
