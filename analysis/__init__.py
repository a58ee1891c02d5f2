"""Sweep CSVs -> summary tables (summary), seaborn figures (figures), report.md (report)."""
