"""The research room: the only code an agent may patch (search.editable: src/research/*.py).

model.py (the GPT), optim.py (the optimizer and its schedule), step.py (one optimizer step).
The harness imports them; they import only torch, the standard math modules and the harness's
config schemas (the static contract, src/lab/contract.py).

Usage: from src.research.model import GPT, GPTConfig
"""
