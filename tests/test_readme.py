"""The README and the reference pages stay current: the README's two commands, its example study
config and command-line override, the generated config reference (docs/config.md), the
benchmark table of bench/README.md, and every relative link of the README and docs/."""

import re
import shlex

import yaml

from learnforget.study import config as lfconfig
from learnforget.study import reference
from workflow_utils import REPO, load_bench, planned_outputs, snakemake

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    """The text of the README's ``## title`` section."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_opens_with_the_two_commands():
    blocks = README.split("```bash\n")[1:3]
    commands = [b.split("\n```")[0].strip() for b in blocks]
    assert commands[0].startswith("python3 -m venv .venv") and "torch==2.13.0" in commands[0]
    assert "snakemake --cores 2" in commands[0]
    assert "torch==2.13.0" in commands[1] and "pytest" in commands[1] and ".[test]" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "n == 2" in ci  # CI runs the README's second command itself


def test_readme_stays_short():
    assert len(README.splitlines()) <= 200


def test_readme_study_config_validates_offline(monkeypatch, tmp_path):
    """The example of "Your own study" is a valid study: a pretrained model by hub id with its
    architecture given, so it validates with no network and nothing cached."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    block = _section("Your own study").split("```yaml\n", 1)[1].split("\n```", 1)[0]
    cfg = lfconfig.validate(yaml.safe_load(block))
    assert lfconfig.is_pretrained(cfg) and cfg["tokenizer"]["vocab_size"] == cfg["model"]["vocab_size"]
    runs = lfconfig.expand_runs(cfg)
    assert {r.method["type"] for r in runs} == {"full", "lora"}
    assert {r.dataset for r in runs} == set(cfg["data"]["hub"])  # trained on the hub dataset it names


def test_readme_config_override_reaches_the_plan(tmp_path):
    """The README's `--config` example, as a dry run: the default study planned in the new folder."""
    line = next(ln for ln in _section("Your own study").splitlines() if "--config " in ln)
    command = re.search(r"`(\.venv/bin/snakemake [^`]*--config [^`]*)`", line).group(1)
    args = shlex.split(command)[1:]
    overrides = args[args.index("--config") + 1:]
    assert "output_dir=results/seed7" in overrides
    proc = snakemake(tmp_path, REPO / "config" / "config.yaml", "-n", "--cores", "2", config=overrides)
    outputs = planned_outputs(proc, "report")
    assert outputs and all(out.startswith("results/seed7/") for out in outputs)


def test_config_reference_is_current():
    page = (REPO / reference.PAGE).read_text()
    assert page == reference.markdown(), "docs/config.md is stale: run `learnforget config-reference --output docs/config.md`"


def test_config_reference_cli_writes_the_page(tmp_path):
    from learnforget.cli import main

    assert main(["config-reference", "--output", str(tmp_path / "config.md")]) == 0
    text = (tmp_path / "config.md").read_text()
    assert text == reference.markdown() and "| `runs[].method` |" in text and "`type: lora`" in text


def test_bench_readme_table_is_the_gathered_one():
    """bench/run.py writes the same headline table into bench/results.md and bench/README.md."""
    run = load_bench("run")
    readme = (REPO / "bench" / "README.md").read_text()
    gathered = (REPO / "bench" / "results.md").read_text()
    table = run.first_table(readme[readme.index(run.TABLE_HEAD):])
    assert len(table) > 20 and table == run.first_table(gathered[gathered.index(run.TABLE_HEAD):])


def test_bench_updates_only_the_readme_table(tmp_path):
    run = load_bench("run")
    page = tmp_path / "README.md"
    page.write_text(f"# B\n\nprose\n\n{run.TABLE_HEAD}\n|---|---:|---:|---:|\n| old | 1 | 2 | 0.5x |\n\nafter\n")
    run.update_readme_table(["| new | 3 | 4 | 0.75x |", "| two | 5 | 5 | 1.00x |"], page)
    assert page.read_text() == (f"# B\n\nprose\n\n{run.TABLE_HEAD}\n|---|---:|---:|---:|\n"
                                "| new | 3 | 4 | 0.75x |\n| two | 5 | 5 | 1.00x |\n\nafter\n")


def _anchors(page) -> set[str]:
    """GitHub's anchors of a markdown page's headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    """Every relative link of the README, bench/README.md and docs/ names a file that exists, and
    a heading of it when the link has an anchor (what moved out of the README stays reachable)."""
    pages = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)]*))?\)", page.read_text()):
            if "://" in target:
                continue
            path = page.parent / target
            if not path.exists() or (anchor and anchor not in _anchors(path)):
                broken.append(f"{page.relative_to(REPO)}: {target}{'#' + anchor if anchor else ''}")
    assert not broken, broken
