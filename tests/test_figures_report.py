"""Figures (data, files, skipping) and the generated report (findings from the numbers)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from learnforget.report import figures as F
from learnforget.report import markdown as R
from learnforget.report import registry, tables

LEARNING = {"math": ("lf_math", "exact_match_strict-match"), "code": ("lf_code", "bits_per_byte")}
FORGETTING = ("lf_facts", "acc")
DURS = [1, 2, 4, 8]
RUNS = ["math-full", "math-lora-r8", "code-full", "code-lora-r8"]


def make_metrics(lora_forgets_less: bool = True, *, base_learning: bool = True, names=None) -> pd.DataFrame:
    """metrics.csv of two settings, full finetuning and LoRA in each; ``names``: the config's
    names of the methods (type -> name; by default the type's own)."""
    rows = []

    def add(run, method, domain, regime, dur, task, metric, value, role, hib):
        rows.append(dict(run=run, method=(names or {}).get(method, method), method_type=method, domain=domain,
                         regime=regime, duration=dur, task=task, metric=metric, value=value, role=role,
                         higher_is_better=hib, task_version=1))

    if base_learning:
        add("base", "base", "math", "base", 0, "lf_math", "exact_match_strict-match", 0.05, "learning", True)
        add("base", "base", "code", "base", 0, "lf_code", "bits_per_byte", 2.0, "learning", False)
    add("base", "base", "source", "base", 0, "lf_facts", "acc", 0.60, "forgetting", True)
    add("base", "base", "source", "base", 0, "lf_facts", "acc_stderr", 0.01, "other", False)
    for i, d in enumerate(reversed(DURS)):  # rows deliberately out of duration order
        i = len(DURS) - 1 - i
        add("math-full", "full", "math", "ift", d, "lf_math", "exact_match_strict-match", 0.10 + 0.08 * i, "learning", True)
        add("math-lora-r8", "lora", "math", "ift", d, "lf_math", "exact_match_strict-match", 0.07 + 0.05 * i, "learning", True)
        add("math-full", "full", "math", "ift", d, "lf_facts", "acc", 0.58 - 0.05 * i, "forgetting", True)
        fl = (0.595 - 0.02 * i) if lora_forgets_less else (0.57 - 0.07 * i)
        add("math-lora-r8", "lora", "math", "ift", d, "lf_facts", "acc", fl, "forgetting", True)
        add("code-full", "full", "code", "cpt", d, "lf_code", "bits_per_byte", 1.8 - 0.15 * i, "learning", False)
        add("code-lora-r8", "lora", "code", "cpt", d, "lf_code", "bits_per_byte", 1.9 - 0.08 * i, "learning", False)
        add("code-full", "full", "code", "cpt", d, "lf_facts", "acc", 0.59 - 0.04 * i, "forgetting", True)
        fl = (0.60 - 0.015 * i) if lora_forgets_less else (0.58 - 0.06 * i)
        add("code-lora-r8", "lora", "code", "cpt", d, "lf_facts", "acc", fl, "forgetting", True)
    return pd.DataFrame(rows)


MODS = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
        "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def make_spectral(n_layers: int = 3, names=None) -> pd.DataFrame:
    rows = []
    for run, method, r in (("math-full", "full", None), ("math-lora-r8", "lora", 8),
                           ("code-full", "full", None), ("code-lora-r8", "lora", 8)):
        for d in DURS:
            for layer in range(n_layers):
                for m, (o, i) in MODS.items():
                    mr = min(o, i)
                    rk = min(r, 3 + layer) if r else min(mr, 4 + 2 * d + layer)
                    rows.append(dict(run=run, method=(names or {}).get(method, method), method_type=method,
                                     duration=d, layer=layer, module=m, shape=f"{o} x {i}",
                                     rank90=rk, rank90_base=int(0.6 * mr), rank90_finetuned=int(0.6 * mr),
                                     rank90_gaussian=int(0.52 * mr), effective_rank=1.3 * rk, max_rank=mr,
                                     fraction=0.9, frob_norm=1.0, lora_rank=r))
    return pd.DataFrame(rows)


def _files_ok(files, out_dir):
    assert sorted(Path(f).suffix for f in files) == [".pdf", ".png"]
    for f in files:
        assert Path(f).parent == Path(out_dir) and Path(f).stat().st_size > 1000
    assert not [p for p in Path(out_dir).iterdir() if p.name.startswith(".")]  # no temp leftovers


# ----------------------------------------------------------------------------- figures


def test_tradeoff_data_and_files(tmp_path):
    files, data = F.tradeoff(make_metrics(), tmp_path, learning=LEARNING, forgetting=FORGETTING, return_data=True)
    _files_ok(files, tmp_path)
    assert set(data) == {("math", "ift"), ("code", "cpt")}
    math = data[("math", "ift")]
    assert set(math) == {"base", "math-full", "math-lora-r8"}
    assert math["base"] == [(0.60, 0.05, 0.0)]
    for run in ("math-full", "math-lora-r8"):
        pts = math[run]
        assert pts[0] == math["base"][0]  # every line starts at the base model
        assert [p[2] for p in pts] == [0.0] + [float(d) for d in DURS]
    assert math["math-full"][-1] == pytest.approx((0.43, 0.34, 8.0))
    code = data[("code", "cpt")]
    assert set(code) == {"base", "code-full", "code-lora-r8"}
    assert code["base"][0][1] == 2.0  # lower-is-better learning metric taken as is
    # config-style specs (lists, as in config.yaml) and a concatenated table with repeated index labels
    m = make_metrics()
    doubled = pd.concat([m.iloc[: len(m) // 2], m.iloc[len(m) // 2:].set_index(m.index[: len(m) - len(m) // 2])])
    assert doubled.index.has_duplicates
    same = F.tradeoff_data(doubled, learning={k: list(v) for k, v in LEARNING.items()}, forgetting=list(FORGETTING))
    assert same == data


def test_curves_data(tmp_path):
    files, data = F.learning_curves(make_metrics(), tmp_path, learning=LEARNING, return_data=True,
                                    duration_labels={"ift": "epochs", "cpt": "tokens"})
    _files_ok(files, tmp_path)
    pts = data[("math", "ift")]["math-lora-r8"]
    assert [p[0] for p in pts] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert pts[0] == (0.0, 0.05) and data[("math", "ift")]["base"] == [(0.0, 0.05)]
    assert pts[-1][1] == pytest.approx(0.22)

    files, data = F.forgetting_curves(make_metrics(), tmp_path, forgetting=FORGETTING, return_data=True)
    _files_ok(files, tmp_path)
    assert set(data[("code", "cpt")]) == {"base", "code-full", "code-lora-r8"}
    assert data[("code", "cpt")]["base"] == [(0.0, 0.60)]
    assert [p[0] for p in data[("code", "cpt")]["code-full"]] == [0.0, 1.0, 2.0, 4.0, 8.0]


def test_metric_direction():
    m = make_metrics()
    assert F.higher_is_better(m, LEARNING["code"]) is False
    assert F.higher_is_better(m, LEARNING["math"]) is True
    no_col = m.drop(columns=["higher_is_better"])
    assert F.higher_is_better(no_col, ("x", "bits_per_byte")) is False  # name heuristic
    assert F.higher_is_better(no_col, ("x", "acc")) is True


def test_spectral_ranks_data(tmp_path):
    m, s = make_metrics(), make_spectral()
    files, data = F.spectral_ranks(s, tmp_path, groups=F.run_groups(m), return_data=True)
    _files_ok(files, tmp_path)
    assert set(data) == {"math (ift)", "code (cpt)"}
    panel = data["math (ift)"]
    full = [k for k, v in panel["runs"].items() if v[2] == "full"]
    assert [panel["runs"][k][1] for k in full] == [float(d) for d in DURS]  # one line per duration
    lora = [k for k, v in panel["runs"].items() if v[2] == "lora"]
    assert len(lora) == 1 and panel["runs"][lora[0]] == ("math-lora-r8", 8.0, "lora")
    assert panel["lines"][lora[0]] == [(0, 3.0), (1, 4.0), (2, 5.0)]
    assert panel["lines"]["math-full @ 8"][0] == (0, 20.0)
    assert panel["hlines"]["LoRA rank r=8"] == 8.0
    gauss = s.groupby("module")["rank90_gaussian"].mean().mean()
    assert panel["hlines"]["Gaussian, same shape (mean)"] == pytest.approx(gauss)
    # without groups: one panel; repeated index labels (pd.concat of per-run CSVs) are fine
    assert list(F.spectral_ranks_data(s)) == ["all runs"]
    assert F.spectral_ranks_data(pd.concat([s, s.iloc[:0]]).set_index(pd.Index([0] * len(s))),
                                 groups=F.run_groups(m)) == data


def test_nothing_written_without_data(tmp_path):
    empty = make_metrics().iloc[0:0]
    base_only = make_metrics()[lambda d: d["run"] == "base"]
    out = tmp_path / "figs"
    assert F.tradeoff(empty, out, learning=LEARNING, forgetting=FORGETTING) == []
    assert F.tradeoff(base_only, out, learning=LEARNING, forgetting=FORGETTING) == []
    assert F.tradeoff(make_metrics(), out, learning={"other": ("t", "m")}, forgetting=FORGETTING) == []
    assert F.tradeoff(make_metrics(), out, learning=LEARNING, forgetting=("nope", "acc")) == []
    assert F.learning_curves(base_only, out, learning=LEARNING) == []
    assert F.forgetting_curves(make_metrics(), out, forgetting=("nope", "acc")) == []
    assert F.spectral_ranks(make_spectral().iloc[0:0], out) == []
    assert F.spectral_ranks(make_spectral().assign(layer=-1), out) == []
    assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------- report


def _write(tmp_path, metrics, spectral=None, draw=False, **kw):
    out = tmp_path / "results"
    figs = {}
    if draw:
        figs = {
            "Learning vs forgetting": F.tradeoff(metrics, out / "figures", learning=LEARNING, forgetting=FORGETTING)[0],
            "Forgetting curves": F.forgetting_curves(metrics, out / "figures", forgetting=FORGETTING)[0],
            "Missing figure": str(out / "figures" / "nope.png"),
        }
    text = R.write_report(metrics, spectral, figs, out / "report.md", config={"seed": 7, "durations": DURS},
                          provenance={"git_commit": "0123abcd", "wall_time_s": {"train": 12.5}},
                          learning=LEARNING, forgetting=FORGETTING, **kw)
    assert (out / "report.md").read_text(encoding="utf-8") == text
    return out, text


def test_report_lora_forgets_less(tmp_path):
    out, text = _write(tmp_path, make_metrics(True), make_spectral(), draw=True)
    for run in RUNS:
        assert run in text
    assert "**math-lora-r8 forgot less than math-full at equal duration**" in text
    assert "**code-lora-r8 forgot less than code-full at equal duration**" in text
    assert "forgot more than" not in text.split("## Figures")[0].replace("at equal learning", "")
    # numbers, not adjectives: forgetting scores at a shared duration and full FT's drop
    assert "8: 0.535 vs 0.430" in text
    assert "dropped from 0.600 to 0.430" in text
    assert "best 0.340 at duration 8" in text
    # equal learning on the math panel (LoRA's curve lies above full's)
    assert "**math-lora-r8 forgot less than math-full at equal learning**" in text
    # ranks: full FT max 4 + 2*8 + 2 = 22 vs LoRA rank 8
    assert "up to 22 ranks" in text and "2.8× the LoRA rank 8" in text
    assert "max rank 5 over all durations and matrices (within its rank 8)" in text
    assert "the mean rank grew" in text
    # figures linked relative to the report, and present
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert links == ["figures/tradeoff.png", "figures/forgetting_curves.png"]  # missing PNG not linked
    assert all((out / link).is_file() for link in links)
    # provenance and tables
    assert "0123abcd" in text and "seed: 7" in text and "| train | 12.5 |" in text
    assert "| math-lora-r8 | – | 0.595 | 0.575 | 0.555 | 0.535 |" in text


def test_report_lora_forgets_more(tmp_path):
    _, text = _write(tmp_path, make_metrics(False))
    assert "**math-lora-r8 forgot more than math-full at equal duration**" in text
    assert "**code-lora-r8 forgot more than code-full at equal duration**" in text
    assert "forgot less than math-full at equal duration" not in text
    assert "**math-lora-r8 forgot more than math-full at equal learning**" in text
    assert "Ranks of ΔW" not in text  # no spectral table given


def test_report_no_overlap_in_learning(tmp_path):
    m = make_metrics(True, base_learning=False)
    _, text = _write(tmp_path, m)
    # without the base point the ranges still overlap (math: LoRA 0.07-0.22, full 0.10-0.34);
    # keep only full's long runs (0.26-0.34) and LoRA's short ones (0.07-0.12): no overlap
    m2 = m[~((m["run"] == "math-full") & (m["duration"] < 4))]
    m2 = m2[~((m2["run"] == "math-lora-r8") & (m2["duration"] > 2) & (m2["task"] == "lf_math"))]
    _, text2 = _write(tmp_path, m2)
    assert "math-lora-r8 vs math-full: learning ranges do not overlap" in text2
    assert "math-lora-r8 vs math-full: learning ranges do not overlap" not in text


def test_compare_helpers():
    c = R.compare_equal_duration({1: 0.6, 2: 0.5}, {1: 0.55, 2: 0.4, 4: 0.3})
    assert c["verdict"] == "less" and c["durations"] == [1, 2]
    assert R.compare_equal_duration({1: 0.5}, {1: 0.6})["verdict"] == "more"
    assert R.compare_equal_duration({1: 0.5}, {1: 0.502})["verdict"] == "same"
    assert R.compare_equal_duration({1: 0.6, 2: 0.3}, {1: 0.5, 2: 0.4})["verdict"] == "mixed"
    assert R.compare_equal_duration({1: 0.5}, {2: 0.6}) is None
    # lower-is-better forgetting score flips the sign
    assert R.compare_equal_duration({1: 0.5}, {1: 0.6}, higher_better=False)["verdict"] == "less"
    # interpolation along a path (learning, forgetting)
    path = [(0.0, 1.0), (1.0, 0.5), (2.0, 0.0)]
    assert R.interpolate_at_level(path, 0.5) == pytest.approx(0.75)
    assert R.interpolate_at_level(path, 3.0) is None
    a = [(0.0, 1.0), (1.0, 0.9)]
    b = [(0.0, 1.0), (2.0, 0.6)]
    c = R.compare_equal_learning(a, b, base_level=0.0)
    assert c["verdict"] == "less" and c["overlap"] == (0.0, 1.0) and c["levels"] == [1.0]
    assert c["b"] == [pytest.approx(0.8)]
    assert R.compare_equal_learning([(0.0, 1.0)], [(1.0, 0.5), (2.0, 0.4)])["verdict"] == "no-overlap"


def test_markdown_table():
    df = pd.DataFrame({"run": ["a|b", "c"], "x": [0.12345, float("nan")], "n": [3, 4]})
    lines = R.markdown_table(df).splitlines()
    assert lines[0] == "| run | x | n |"
    assert lines[1] == "| :--- | ---: | ---: |"
    assert lines[2] == "| a\\|b | 0.123 | 3 |"
    assert lines[3] == "| c | – | 4 |"


# ----------------------------------------------------------------------------- seeds, sweeps, new figures


def make_seeded(n_seeds=3, lrs=(1e-4, 1e-3)):
    """math-full over seeds; math-lora swept over learning rates, each over seeds; the values
    differ by seed so that the interval is known: seed k adds 0.01 * k."""
    rows = []

    def add(run, series, method, d, task, metric, value, role, seed, lr, domain="math"):
        rows.append(dict(run=run, series=series, method=method, method_type=method, domain=domain, regime="ift", duration=d,
                         task=task, metric=metric, value=value, role=role, higher_is_better=True,
                         task_version=1, seed=seed, lr=lr))

    add("base", "base", "base", 0, "lf_math", "exact_match_strict-match", 0.05, "learning", 7, None)
    add("base", "base", "base", 0, "lf_facts", "acc", 0.60, "forgetting", 7, None, domain="source")
    for k in range(n_seeds):
        for d in (1, 2):
            add(f"math-full-s{k}", "math-full", "full", d, "lf_math", "exact_match_strict-match",
                0.2 * d + 0.01 * k, "learning", k, 5e-4)
            add(f"math-full-s{k}", "math-full", "full", d, "lf_facts", "acc", 0.6 - 0.1 * d - 0.01 * k,
                "forgetting", k, 5e-4)
            for lr in lrs:
                series = f"math-lora-lr{lr:g}"
                gain = 0.1 if lr == max(lrs) else 0.05
                add(f"{series}-s{k}", series, "lora", d, "lf_math", "exact_match_strict-match",
                    gain * d + 0.01 * k, "learning", k, lr)
                add(f"{series}-s{k}", series, "lora", d, "lf_facts", "acc", 0.6 - 0.02 * d, "forgetting", k, lr)
    return pd.DataFrame(rows)


def test_metric_table_aggregates_seeds_with_an_interval():
    from scipy.stats import t

    tab = F.metric_table(make_seeded(), LEARNING["math"], errors=True)
    row = tab[(tab["run"] == "math-full") & (tab["duration"] == 2)].iloc[0]
    vals = [0.4, 0.41, 0.42]
    assert row["value"] == pytest.approx(sum(vals) / 3)
    assert row["n"] == 3
    sd = pd.Series(vals).std()
    assert row["ci"] == pytest.approx(t.ppf(0.975, 2) * sd / 3 ** 0.5)
    base = tab[tab["run"] == "base"].iloc[0]
    assert base["n"] == 1 and pd.isna(base["ci"])
    # without a series column every run is its own series (the old behaviour)
    plain = F.metric_table(make_seeded().drop(columns=["series"]), LEARNING["math"])
    assert "math-full-s0" in set(plain["run"]) and "math-full" not in set(plain["run"])


def test_figures_draw_series_not_seeds(tmp_path):
    m = make_seeded()
    files, data = F.tradeoff(m, tmp_path, learning=LEARNING, forgetting=FORGETTING, return_data=True)
    _files_ok(files, tmp_path)
    panel = data[("math", "ift")]
    assert set(panel) == {"base", "math-full", "math-lora-lr0.0001", "math-lora-lr0.001"}
    assert panel["math-full"][-1] == pytest.approx((0.39, 0.41, 2.0))
    full = F.tradeoff_data(m, learning=LEARNING, forgetting=FORGETTING, errors=True)[("math", "ift")]["math-full"]
    assert full[-1][5] == 3 and full[-1][3] > 0 and full[-1][4] > 0  # both intervals, three seeds
    _, curves = F.learning_curves(m, tmp_path, learning=LEARNING, return_data=True)
    assert set(curves[("math", "ift")]) == set(panel)


def test_pareto_front():
    pts = [(0.6, 0.05), (0.5, 0.3), (0.55, 0.2), (0.45, 0.25), (0.4, 0.4), (0.5, 0.1)]
    assert F.pareto_front(pts) == [(0.4, 0.4), (0.5, 0.3), (0.55, 0.2), (0.6, 0.05)]
    # lower-is-better learning (bits per byte): the smallest y is best
    assert F.pareto_front([(0.6, 2.0), (0.5, 1.5), (0.55, 1.8), (0.5, 1.9)], y_higher=False) == [
        (0.5, 1.5), (0.55, 1.8), (0.6, 2.0)]


def test_sensitivity_figure_only_with_a_sweep(tmp_path):
    m = make_seeded()
    files, data = F.sensitivity(m, tmp_path, learning=LEARNING, forgetting=FORGETTING, return_data=True)
    _files_ok(files, tmp_path)
    assert list(data) == [("math", "ift")]
    assert list(data[("math", "ift")]) == ["lora"]  # full finetuning has one learning rate
    lora = data[("math", "ift")]["lora"]
    assert [p[0] for p in lora] == [1e-4, 1e-3]
    assert lora[1][1] == pytest.approx(0.21) and lora[0][1] == pytest.approx(0.11)
    assert lora[0][2] == pytest.approx(0.56)
    assert F.sensitivity(make_seeded(lrs=(1e-3,)), tmp_path / "none", learning=LEARNING) == []
    assert not (tmp_path / "none").exists()
    text = "\n".join(R.findings(m, learning=LEARNING, forgetting=FORGETTING))
    assert "lora: best at lr 0.001 (0.210), worst at lr 0.0001 (0.110)" in text


def test_diversity_data(tmp_path):
    rows = []
    for run, series, dur, distinct, sim in (("base", "base", 0, 3.0, 0.5), ("full-s1", "full", 1, 1.5, 0.9),
                                            ("full-s2", "full", 1, 2.5, 0.8), ("lora", "lora", 1, 3.0, 0.6),
                                            ("lora", "lora", 2, 2.0, 0.7)):
        for metric, v in (("distinct", distinct), ("mean_pairwise_similarity", sim), ("distinct_fraction", 0.5)):
            rows.append(dict(run=run, series=series, method=run.split("-")[0], method_type=run.split("-")[0],
                             domain="code", regime="cpt",
                             duration=dur, task="lf_humaneval", metric=metric, value=v, role="diversity"))
    m = pd.concat([make_metrics(), pd.DataFrame(rows)], ignore_index=True)
    files, data = F.diversity(m, tmp_path, return_data=True)
    _files_ok(files, tmp_path)
    assert set(data) == {("lf_humaneval", "distinct"), ("lf_humaneval", "mean_pairwise_similarity")}
    d = data[("lf_humaneval", "distinct")]
    assert d["base"] == [(0.0, 3.0)] and d["full"] == [(0.0, 3.0), (1.0, 2.0)]
    assert d["lora"] == [(0.0, 3.0), (1.0, 3.0), (2.0, 2.0)]
    assert F.diversity(make_metrics(), tmp_path / "none") == []


def test_spectrum_and_module_figures(tmp_path):
    import numpy as np

    from learnforget.analyze.spectral import save_spectra

    s = make_spectral(n_layers=3)
    s["name"] = [f"model.layers.{l}.self_attn.{m}.weight" if "proj" in m and m[0] in "qkvo"
                 else f"model.layers.{l}.mlp.{m}.weight" for l, m in zip(s["layer"], s["module"])]
    spectra = {}
    for (run, d), rows in s.groupby(["run", "duration"]):
        arrays = {}
        for name in rows["name"]:
            for kind in ("base", "finetuned", "delta", "gaussian"):
                arrays[f"{name}/{kind}"] = np.linspace(2.0, 0.1, 32) * (0.01 if kind == "delta" else 1)
        path = tmp_path / "spectra" / run / f"{d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_spectra(path, arrays)
        spectra[(run, float(d))] = path
    groups = F.run_groups(make_metrics())
    files, data = F.spectrum(s, spectra, tmp_path / "figs", module="q_proj", groups=groups, return_data=True)
    _files_ok(files, tmp_path / "figs")
    panel = data["math (ift)"]
    assert panel["matrix"] == "model.layers.1.self_attn.q_proj.weight"  # the middle layer
    kinds = panel["kinds"]
    assert sum(k == "delta" for k in kinds.values()) == len(DURS) + 1  # full at every duration + LoRA's last
    assert list(kinds.values()).count("base") == 1 and "gaussian" in kinds.values()
    assert F.spectrum(s, spectra, tmp_path / "none", layer=9) == []

    files, mods = F.spectral_modules(s, tmp_path / "mods", groups=groups, return_data=True)
    _files_ok(files, tmp_path / "mods")
    assert list(mods) == list(MODS)  # in the layer's order: attention, then MLP
    q = mods["q_proj"]
    assert q["ref"]["LoRA r"] == 8.0
    assert q["lines"]["math (ift): math-lora-r8 @ 8 (r=8)"] == [(0, 3.0), (1, 4.0), (2, 5.0)]
    assert len([k for k in q["lines"] if k.startswith("math (ift): math-full @")]) == len(DURS)


def test_report_names_every_run_of_the_config(tmp_path):
    m = make_seeded()
    runs = [{"name": r, "series": s, "method": "x", "domain": "math", "regime": "ift", "seed": 1}
            for r, s in m[["run", "series"]].drop_duplicates().itertuples(index=False) if r != "base"]
    text = R.write_report(m, None, {}, tmp_path / "report.md", config={"runs": runs, "finetune": {"lr": 1e-3},
                                                                       "durations": {"values": [1, 2], "unit": "epochs"}},
                          provenance={}, learning=LEARNING, forgetting=FORGETTING)
    for r in runs:
        assert f"| {r['name']} |" in text
    assert "mean ± the 95% confidence interval" in text
    assert "0.410 ± " in text  # math-full at duration 2: mean of 0.40, 0.41, 0.42


# ----------------------------------------------------------------------------- methods by type, not name

MISLEADING = {"full": "baseline", "lora": "fullish"}  # a full method named baseline, a LoRA named fullish


def _drawn_lines(monkeypatch, module):
    """Draw through ``module``'s save and record every panel's lines: (colour, marker, style)."""
    from matplotlib.colors import to_hex

    drawn = []
    save = module.save

    def record(fig, out_dir, name):
        drawn.append([[(to_hex(line.get_color()), line.get_marker(), line.get_linestyle()) for line in ax.get_lines()]
                      for ax in fig.axes])
        return save(fig, out_dir, name)

    monkeypatch.setattr(module, "save", record)
    return drawn


def test_methods_are_what_their_type_says_not_what_their_name_says(tmp_path, monkeypatch):
    from learnforget.report.figures import curves, learning_vs_forgetting, lr_sensitivity

    plain, named = make_metrics(), make_metrics(names=MISLEADING)
    text = {}
    for key, m, s in (("plain", plain, make_spectral()), ("named", named, make_spectral(names=MISLEADING))):
        text[key] = "\n".join(R.findings(m, s, learning=LEARNING, forgetting=FORGETTING))
    assert "**math-lora-r8 forgot less than math-full at equal duration**" in text["named"]
    assert "math-full (baseline): dropped from 0.600 to 0.430" in text["named"]
    renamed = text["named"].replace("(baseline)", "(full)").replace("(fullish)", "(lora)")
    assert renamed == text["plain"]  # the same sentences: only the names differ
    # styles: full finetuning in cool colours with circles, LoRA warm with squares, whatever the names
    types = tables.run_method_types(named)
    assert types["math-full"] == "full" and types["math-lora-r8"] == "lora"
    assert F.run_styles(RUNS, types) == F.run_styles(RUNS, tables.run_method_types(plain))
    assert F.run_styles(RUNS, types)["code-full"] == {"color": "#1d4e89", "marker": "o"}  # full first, cool
    assert F.run_styles(["baseline", "fullish"], tables.method_types_by_name(named)) == {
        "baseline": {"color": "#1d4e89", "marker": "o"}, "fullish": {"color": "#e8590c", "marker": "s"}}
    # the drawn figures: the same lines with the same colours, markers and line styles, same groupings
    tradeoff = (learning_vs_forgetting, lambda m, out: F.tradeoff(m, out, learning=LEARNING, forgetting=FORGETTING))
    for module, draw in (tradeoff, (curves, lambda m, out: F.forgetting_curves(m, out, forgetting=FORGETTING))):
        drawn = _drawn_lines(monkeypatch, module)
        draw(plain, tmp_path / "plain")
        draw(named, tmp_path / "named")
        assert len(drawn) == 2 and drawn[0] == drawn[1]
        monkeypatch.undo()
    assert F.tradeoff_data(named, learning=LEARNING, forgetting=FORGETTING) == F.tradeoff_data(
        plain, learning=LEARNING, forgetting=FORGETTING)
    assert F.run_groups(named) == F.run_groups(plain)
    assert F.spectral_ranks_data(make_spectral(names=MISLEADING), groups=F.run_groups(named)) == \
        F.spectral_ranks_data(make_spectral(), groups=F.run_groups(plain))
    # the sensitivity figure's lines are per method: a swept "fullish" LoRA is drawn as LoRA
    seeded = make_seeded().assign(method_type=lambda d: d["method"],
                                  method=lambda d: d["method"].map(lambda x: MISLEADING.get(x, x)))
    drawn = _drawn_lines(monkeypatch, lr_sensitivity)
    _, data = F.sensitivity(seeded, tmp_path / "sens", learning=LEARNING, forgetting=FORGETTING, return_data=True)
    assert list(data[("math", "ift")]) == ["fullish"]
    lines = [line for panel in drawn[0] for line in panel]  # the lines and their error bars' caps
    assert {colour for colour, _, _ in lines} == {"#e8590c"} and {"s"} <= {marker for _, marker, _ in lines}
    assert "o" not in {marker for _, marker, _ in lines}


def test_a_table_without_method_type_is_refused_not_guessed_from_names():
    m = make_metrics().drop(columns=["method_type"])
    with pytest.raises(ValueError, match="no method_type for run"):
        tables.run_method_types(m)


def test_full_finetuning_and_composites_are_asked_of_the_registry():
    assert tables.is_full_finetuning("full") and not tables.is_full_finetuning("lora")
    assert not tables.is_full_finetuning("relora") and not tables.is_full_finetuning("base")
    assert not tables.is_full_finetuning("fft")  # a name, not a registered type
    assert tables.is_composite("compose") and not tables.is_composite("lora")


# ----------------------------------------------------------------------------- the figure registry


def _tiny_config(**changes):
    import copy

    import yaml

    from learnforget.study.config import validate

    raw = yaml.safe_load((Path(__file__).parent / "tiny.yaml").read_text())
    for change in changes.values():
        change(raw)
    return validate(copy.deepcopy(raw))


def test_figure_names_follow_the_config():
    assert registry.figure_names(_tiny_config()) == [
        "tradeoff", "learning", "forgetting", "diversity", "spectral_ranks", "spectral_modules", "spectrum"]
    sweep = _tiny_config(sweep=lambda raw: raw["runs"][1].update(sweep={"lr": [1e-4, 2e-3]}))
    assert registry.figure_names(sweep)[:5] == ["tradeoff", "learning", "forgetting", "sensitivity", "diversity"]
    unsampled = _tiny_config(samples=lambda raw: raw["evaluation"]["groups"].pop("samples"))
    assert "diversity" not in registry.figure_names(unsampled)


def test_every_figure_has_a_caption_and_a_drawing_function(tmp_path):
    workflow = Path(__file__).resolve().parents[1] / "workflow"
    assert [f.name for f in registry.FIGURES] == list(registry.BY_NAME)
    for fig in registry.FIGURES:
        assert (workflow / fig.caption).is_file(), fig.caption
    inputs = registry.FigureInputs(metrics=make_metrics(), spectral=make_spectral(), learning=LEARNING,
                                   forgetting=FORGETTING, composites={}, groups=F.run_groups(make_metrics()),
                                   series={}, spectra={}, spectrum={"layer": None, "module": "q_proj"})
    drawn = {name: registry.BY_NAME[name].draw(inputs, tmp_path) for name in
             ("tradeoff", "learning", "forgetting", "spectral_ranks", "spectral_modules", "spectrum")}
    names = ("tradeoff", "learning", "forgetting", "spectral_ranks", "spectral_modules")
    assert {n: sorted(Path(f).name for f in files) for n, files in drawn.items() if files} == {
        n: [f"{n}.pdf", f"{n}.png"] for n in names}
    assert drawn["spectrum"] == []  # no spectra: no figure


def test_the_registry_keeps_matplotlib_out_of_snakemakes_process():
    import subprocess
    import sys

    code = ("import sys, learnforget.report.registry; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
