"""The README stays current: its two commands, and the config reference generated from the code."""

from learnforget.study import reference
from workflow_utils import REPO

README = (REPO / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    blocks = README.split("```bash\n")[1:3]
    commands = [b.split("\n```")[0].strip() for b in blocks]
    assert commands[0].startswith("python3 -m venv .venv") and "torch==2.13.0" in commands[0]
    assert "snakemake --cores 2" in commands[0]
    assert "torch==2.13.0" in commands[1] and "pytest" in commands[1] and ".[test]" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "n == 2" in ci  # CI runs the README's second command itself


def test_config_reference_is_current():
    generated = reference.markdown()
    assert generated.strip() in README, "README config reference is stale: run `learnforget config-reference`"
