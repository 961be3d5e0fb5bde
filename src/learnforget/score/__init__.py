"""Scoring sampled generations: HumanEval in the sandbox, code parsing, diversity."""
