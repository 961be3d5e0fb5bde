"""Evaluation through lm-eval: the task registry (lm-eval YAMLs in ``tasks/``), evaluation plans, the harness."""
