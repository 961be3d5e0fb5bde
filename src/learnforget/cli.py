"""Command line: ``learnforget validate CONFIG`` checks a study config without running it."""

from __future__ import annotations

import argparse
import sys

from learnforget import config as lfconfig


def _validate(args) -> int:
    try:
        cfg = lfconfig.load(args.config)
    except lfconfig.ConfigError as exc:
        print(f"learn-forget: {exc}", file=sys.stderr)
        return 2
    runs = lfconfig.expand_runs(cfg)
    print(f"{args.config}: valid; {len(runs)} runs, "
          f"{sum(len(r.labels) for r in runs)} checkpoints, datasets {', '.join(lfconfig.token_datasets(cfg))}")
    for r in runs:
        print(f"  {r.name}: {r.method_name} ({r.method['type']}) on {r.domain}/{r.regime}, "
              f"durations {', '.join(r.labels)} {r.unit}, lr {r.train.get('lr')}, "
              f"{'continues' if r.continues else 'restarts'} between durations")
    if args.show:
        print(lfconfig.dump(cfg))
    return 0


def _config_reference(args) -> int:
    from learnforget.reference import markdown

    print(markdown(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="learnforget", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate a study config and list its runs")
    v.add_argument("config")
    v.add_argument("--show", action="store_true", help="print the config with defaults filled in")
    v.set_defaults(func=_validate)
    r = sub.add_parser("config-reference", help="print the config reference (markdown) that the README embeds")
    r.set_defaults(func=_config_reference)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
