"""One timed training run: python -m src.train (the run itself is src/harness/train.py).

Usage: python -m src.train [model=small] [budget.seconds=60] [dry_run=true] ...
       python -m src.train -m optimizer.matrix_lr=0.02,0.04 [hydra/launcher=joblib]
"""
import sys

if __name__ == "__main__":
    from src.harness.train import main  # the importable module: process pools pickle its functions by reference
    sys.exit(main())
