"""The report of a research session: python -m src.report [tag] (its command line is src/lab/report_cli.py).

Usage: python -m src.report [tag] [--root outputs/research] [--no-mlflow]
"""
import sys

if __name__ == "__main__":
    from src.lab.report_cli import main
    sys.exit(main())
