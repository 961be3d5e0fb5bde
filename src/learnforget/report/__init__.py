"""The study's tables, figures and report.md."""
