"""The research loop: python -m src.search (its command line is src/lab/search_cli.py).

Usage: python -m src.search agent=tpe device=cpu budget.seconds=30 search.max_experiments=10
       python -m src.search search.tag=nov26 search.resume=true
"""
if __name__ == "__main__":
    from src.lab.search_cli import cli
    cli()
