"""The static contract as an allow-list (src/lab/contract.py): resolution of chains, aliases and imports.

The red-team corpus (tests/redteam.py, run by tests/test_redteam.py) holds the attacks and honest
patches; these are the resolver's own rules.

Run: python -m pytest -q tests/lab/test_contract.py
"""
from __future__ import annotations

import time

import pytest

from src.lab.config import ContractConfig
from src.lab.contract import ContractViolation, check_files, check_source
from tests.support.helpers import REPO

CFG = ContractConfig()
P = "src/research/model.py"


@pytest.mark.parametrize("name", ["__init__.py", "model.py", "optim.py", "step.py"])
def test_the_research_files_pass_unchanged(name):
    assert check_source((REPO / "src" / "research" / name).read_text(), f"src/research/{name}", CFG) == []


def test_a_refusal_names_the_file_the_line_and_the_rule():
    src = "import torch\n\nx = 1\n_e = torch.os.environ\n"
    assert check_source(src, P, CFG) == [f"{P}:4: names torch.os, the module os, which is outside the allowed "
                                         "modules (search.contract.allowed_imports)"]


def test_a_chain_through_another_research_module_is_resolved_from_the_worktree(tmp_path):
    """`from src.research.x import name` is resolved from the patched worktree's source, not imported."""
    research = tmp_path / "src" / "research"
    research.mkdir(parents=True)
    (research / "helpers.py").write_text("import torch.serialization as ser\n\n\ndef scale(x):\n    return x\n")
    (research / "model.py").write_text("from src.research.helpers import scale, ser\n_l = ser.os\n")
    with pytest.raises(ContractViolation) as e:
        check_files(tmp_path, ["src/research/model.py", "src/research/helpers.py"], CFG)
    assert "src/research/helpers.py:1: imports torch.serialization" in str(e.value)
    assert "src/research/model.py:1: imports from" not in str(e.value)  # the research module itself is allowed


@pytest.mark.parametrize("code", [
    "import torch\nx = torch.zeros(3, dtype=torch.float32)\n",
    "import torch.nn as nn\n\n\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n",
    "from typing import Optional\nimport torch\n\n\ndef f(x: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:\n"
    "    return x\n",
    "import torch\nif torch.cuda.is_available():\n    torch.backends.cuda.matmul.allow_tf32 = True\n",
    "import torch\n\n\ndef f(x):\n    return torch._foreach_add(x, 1)\n",
    "import torch.nn.functional as F\nACTS = {'gelu': F.gelu, 'silu': F.silu}\n",
    "import math\nfrom dataclasses import dataclass, field\n\n\n@dataclass\nclass C:\n    xs: list = field(default_factory=list)\n",
])
def test_ordinary_model_code_passes(code):
    assert check_source(code, P, CFG) == []


@pytest.mark.parametrize("code, rule", [
    ("import torch\ntorch = 1\n", "rebinds torch"),
    ("import torch\nT = torch.Tensor\nT = torch.nn.Module\n", "binds T to torch.nn.Module, and elsewhere"),
    ("import math\nx = __file__\n", "uses __file__"),
    ("import torch\ntorch.manual_seed(0)\n", "torch.manual_seed"),
    ("import torch\nclass M(torch.nn.Module, metaclass=type):\n    pass\n", "metaclass"),
])
def test_rebinding_interpreter_state_and_reseeding_are_refused(code, rule):
    assert any(rule in p for p in check_source(code, P, CFG)), check_source(code, P, CFG)


def test_checking_the_research_room_takes_well_under_a_second_once_torch_is_imported():
    check_source("import torch\n", P, CFG)  # the first import of torch is the process's, not the check's
    t0 = time.process_time()  # CPU seconds of this process: a busy neighbour lengthens wall time, not this
    for name in ("model.py", "optim.py", "step.py"):
        check_source((REPO / "src" / "research" / name).read_text(), f"src/research/{name}", CFG)
    assert time.process_time() - t0 < 1.0
