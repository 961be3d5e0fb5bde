"""Command line of the library, for what Snakemake does not do:

- ``learnforget validate CONFIG`` checks a study config and lists its runs without running anything;
- ``learnforget plan CONFIG`` estimates each finetuning job's memory and GPUs;
- ``learnforget config-reference [--output docs/config.md]`` writes the config reference;
- ``learnforget humaneval-score SAMPLES.jsonl`` scores HumanEval samples in the sandbox.
"""

from __future__ import annotations

import argparse
import json
import sys

from learnforget import __version__
from learnforget.core import hub
from learnforget.data import sources
from learnforget.evaluate import plan as eval_plan
from learnforget.score import humaneval
from learnforget.cluster.planner import gpu_plan_for_job
from learnforget.study import config as lfconfig
from learnforget.study import reference
from learnforget.train.settings import MODES


def _load(path: str) -> dict | None:
    """The validated config, or None after printing the one-line error."""
    try:
        return lfconfig.load(path)
    except lfconfig.ConfigError as exc:
        print(f"learn-forget: {exc}", file=sys.stderr)
        return None


def _print_runs(cfg: dict, path: str) -> None:

    runs = lfconfig.expand_runs(cfg)
    print(f"{path}: valid; {len(runs)} runs, "
          f"{sum(len(r.labels) for r in runs)} checkpoints, datasets {', '.join(lfconfig.token_datasets(cfg))}")
    for r in runs:
        print(f"  {r.name}: {r.method_name} ({r.method['type']}) on {r.domain}/{r.regime}, "
              f"durations {', '.join(r.labels)} {r.unit}, lr {r.train.get('lr')}, "
              f"durations: {r.mode} ({MODES[r.mode]})")
    for name, g in eval_plan.parse_groups(cfg["evaluation"]["groups"]).items():
        metric = g.metric if isinstance(g.metric, str) or g.metric is None else "per task"
        print(f"  evaluation group {name}: {g.role}{' ' + g.domain if g.domain else ''}, "
              f"{', '.join(g.tasks)}{', metric ' + metric if metric else ''}")


def _print_sources(cfg: dict) -> None:
    """Where each hub dataset and model comes from; raises when one is unavailable."""
    found = hub.check_tasks(eval_plan.hub_tasks(cfg["evaluation"]), cfg["evaluation"]["datasets"])
    for task, src in found.items():
        print(f"  hub dataset of {task}: {src['dataset']} ({src['source']})")
    located = sources.check_available(cfg, datasets=lfconfig.token_datasets(cfg))
    for key, where in located.items():
        print(f"  {key}: {where.kind}{' ' + str(where.path) if where.path else ''}")


def _validate(args) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    _print_runs(cfg, args.config)
    try:
        _print_sources(cfg)
    except (hub.DatasetUnavailable, sources.SourceUnavailable) as exc:
        print(f"learn-forget: {exc}", file=sys.stderr)
        return 2
    if args.show:
        print(lfconfig.dump(cfg))
    return 0


def _plan(args) -> int:

    cfg = _load(args.config)
    if cfg is None:
        return 2
    gb = args.gpu_memory
    print(f"{args.config}: memory plan per finetuning job "
          f"({'GPUs of ' + format(gb, 'g') + ' GiB' if gb else 'CPU'}; FSDP {'for every method' if args.fsdp else 'for full finetuning, as the trainer does'})")
    status = 0
    for r in lfconfig.expand_runs(cfg):
        try:
            job = gpu_plan_for_job(cfg["model"], r.method, r.train, gb, vocab_size=cfg["tokenizer"]["vocab_size"],
                                   max_gpus=args.max_gpus, fsdp=True if args.fsdp else None, name=r.name,
                                   cpu_processes=cfg["resources"]["cpu_processes"])
        except ValueError as exc:
            print(f"  {r.name}: does not fit: {exc}")
            status = 1
            continue
        print(f"  {r.name}: {job['gpus']} GPU(s), host {job['mem_mb']} MiB; {job['summary']}")
    return status


def _config_reference(args) -> int:

    if args.output:
        print(f"wrote {reference.write(args.output)}")
    else:
        print(reference.markdown(), end="")
    return 0


def _humaneval_score(args) -> int:
    try:
        summary = humaneval.score_file(args.samples, ks=args.k, per_sample_out=args.out,
                                       timeout_s=args.timeout, workers=args.workers,
                                       progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"learn-forget: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learnforget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate a study config and list its runs")
    v.add_argument("config")
    v.add_argument("--show", action="store_true", help="print the config with defaults filled in")
    v.set_defaults(func=_validate)
    p = sub.add_parser("plan", help="estimate memory per finetuning job and the GPUs it needs")
    p.add_argument("config")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of one GPU in GiB (0: plan CPU jobs)")
    p.add_argument("--max-gpus", type=int, default=8)
    p.add_argument("--fsdp", action="store_true", help="shard every method with FSDP (default: full finetuning only, as the trainer does)")
    p.set_defaults(func=_plan)
    r = sub.add_parser("config-reference", help="the config reference (markdown) generated from the schema and "
                                                "the component classes: docs/config.md")
    r.add_argument("--output", metavar="PATH", default=None, help="write it here (e.g. docs/config.md) "
                                                                  "instead of printing it")
    r.set_defaults(func=_config_reference)
    h = sub.add_parser("humaneval-score", help="score HumanEval samples (JSONL of task_id, completion) "
                                               "in the sandbox; print pass@k as JSON")
    h.add_argument("samples", metavar="SAMPLES.jsonl")
    h.add_argument("--k", type=int, nargs="+", default=[1, 10, 100],
                   help="k values for pass@k (those above the fewest samples per problem are skipped)")
    h.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per sample")
    h.add_argument("--workers", type=int, default=None, help="samples run at once (default: CPU count)")
    h.add_argument("--out", metavar="PER_SAMPLE.jsonl", default=None, help="write per-sample results here")
    h.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    h.set_defaults(func=_humaneval_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
