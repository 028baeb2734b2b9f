"""The harness: the fixed room. Data, the budget clock, the train loop, the scorer, evaluation,
device, tracking and provenance. An agent's patch never touches it; it never imports the lab.

Usage: python -m src.train (src/harness/train.py), python prepare.py (src/harness/prepare.py)
"""
