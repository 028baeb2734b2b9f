"""The lab: proposes, runs, decides and records experiments. It treats a run as a black box
(config and code in, a scored checkpoint out) and is never imported by the harness.

Usage: python -m src.search (src/lab/search_cli.py), python -m src.report (src/lab/report_cli.py)
"""
