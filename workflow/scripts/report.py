"""Tidy tables, figures and report.md from every evaluation and spectral analysis."""

from pathlib import Path

import pandas as pd

from learnforget.report import figures
from learnforget.train import keep
from learnforget.core import provenance
from learnforget.report import metrics as results
from learnforget.core.io import atomic_path, read_json
from learnforget.core.logs import setup
from learnforget.report.markdown import evaluation_protocol, write_report

log = setup(snakemake.log[0])
spec = snakemake.params.spec
out = snakemake.output
learning = {domain: tuple(v) for domain, v in spec["learning"].items()}
forgetting = tuple(spec["forgetting"])

metrics = results.collect(snakemake.input.evals, groups=spec["groups"])
series = {name: m["series"] for name, m in spec["runs"].items()}
spectral = pd.concat([pd.read_csv(p) for p in snakemake.input.spectral], ignore_index=True)
spectral = spectral.sort_values(["run", "duration", "layer", "module"], kind="stable").reset_index(drop=True)
spectral.insert(1, "series", spectral["run"].map(series))
training = results.training_table(Path(d) / "manifest.json" for d in snakemake.input.training)
for path, table in ((out.metrics, metrics), (out.spectral, spectral), (out.training, training)):
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)

fig_dir = Path(out.report).parent / "figures"
compose = read_json(snakemake.input.compose[0]) if snakemake.input.compose else None  # LoRAHub composites
kinds = {n: c["kind"] for n, c in (compose or {}).get("composites", {}).items()}
groups = figures.run_groups(metrics)
run_groups = {**groups, **{run: groups[s] for run, s in series.items() if s in groups}}  # runs and series
spectra = {(Path(p).parent.name, float(Path(p).stem)): p for p in snakemake.input.spectra}
choice = spec["config"]["analysis"]["spectrum"]
draw = {
    "tradeoff": lambda: figures.tradeoff(metrics, fig_dir, learning=learning, forgetting=forgetting, name="tradeoff",
                                         composites=kinds),
    "learning": lambda: figures.learning_curves(metrics, fig_dir, learning=learning, name="learning"),
    "forgetting": lambda: figures.forgetting_curves(metrics, fig_dir, forgetting=forgetting, name="forgetting"),
    "sensitivity": lambda: figures.sensitivity(metrics, fig_dir, learning=learning, forgetting=forgetting),
    "diversity": lambda: figures.diversity(metrics, fig_dir),
    "spectral_ranks": lambda: figures.spectral_ranks(spectral, fig_dir, groups=run_groups, series=series),
    "spectral_modules": lambda: figures.spectral_modules(spectral, fig_dir, groups=run_groups, series=series),
    "spectrum": lambda: figures.spectrum(spectral, spectra, fig_dir, layer=choice["layer"], module=choice["module"],
                                         groups=run_groups, series=series),
}
drawn = {}
for name in snakemake.params.figures:
    log.info("figure %s", name)
    drawn[name] = draw[name]()
missing = [name for name, files in drawn.items() if not files]
if missing:
    raise SystemExit(f"report: no data for figure(s) {', '.join(missing)}: check evaluation.groups and analysis")
pngs = {name: next(f for f in files if str(f).endswith(".png")) for name, files in drawn.items()}

results_dir = Path(out.report).parent
prov = provenance.collect(
    Path(snakemake.scriptdir).parents[1], results_dir,
    seeds={"study": spec["config"]["seed"], **{r: m["seed"] for r, m in spec["runs"].items()}},
)
n_shot = {}
for path in snakemake.input.evals:  # the shots lm-eval actually used (the base runs every task)
    if not path.endswith(".scored.json"):
        n_shot.update(read_json(path).get("n-shot") or {})
write_report(metrics, spectral, pngs, out.report, config=spec["config"], provenance=prov,
             learning=learning, forgetting=forgetting, title=None,
             protocol=evaluation_protocol(spec["groups"], n_shot), disk=keep.disk_usage(results_dir, spec["runs"]),
             compose=compose)
log.info("report: %d metric rows, %d spectral rows, figures %s", len(metrics), len(spectral), sorted(pngs))
