"""The written research contract: one list in src/research/__init__.py, the same in program.md, and the harness
asks for nothing beyond it.

Run: python -m pytest -q tests/research/test_contract_doc.py
"""
import ast
import re

import src.research
from tests.support.helpers import REPO

CONTRACT_NAMES = {"GPT", "GPTConfig", "build_optimizer", "train_step"}  # what the list names from src.research


def bullets(text: str) -> list[str]:
    """The '- `...`' items of a text, each with its continuation lines, whitespace collapsed."""
    items = re.findall(r"^- (`.*?)(?=^- |^\s*$)", text, flags=re.M | re.S)
    return [" ".join(item.split()) for item in items]


def test_program_md_lists_the_same_contract_as_the_research_package():
    doc = bullets(src.research.__doc__)
    section = (REPO / "program.md").read_text().split("## The research contract", 1)[1].split("\n## ", 1)[0]
    assert len(doc) == 6 and doc == bullets(section)


def test_the_harness_and_the_lab_import_only_the_contracts_names_from_the_research_room():
    imported = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        if "research" in path.relative_to(REPO).parts[:2]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src.research"):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("src.research") for a in node.names), path
    assert imported <= CONTRACT_NAMES
    assert all(f"`{name}" in src.research.__doc__ for name in CONTRACT_NAMES)


def test_the_model_no_longer_reports_its_own_sizes():
    from src.research.model import GPT

    assert not hasattr(GPT, "param_counts") and not hasattr(GPT, "flops_per_token")
