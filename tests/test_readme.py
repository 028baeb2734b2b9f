"""README.md is the front door: short, two quick-start commands CI agrees with, links that resolve.

Run: python -m pytest -q tests/test_readme.py
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def quick_start_commands(text: str) -> list[str]:
    """The shell commands of the Quick start's first code block, `\\` continuations joined, comments dropped."""
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_is_a_front_door_of_at_most_150_lines():
    assert len(README.read_text().splitlines()) <= 150


def test_quick_start_is_two_commands_that_parse_and_match_ci():
    one, two = quick_start_commands(README.read_text())
    for cmd in (one, two):
        subprocess.run(["bash", "-n", "-c", cmd], check=True)  # one command, valid shell
    assert "python prepare.py" in one and "python -m src.search" in one and one.endswith("python -m src.report")
    ci = (REPO / ".ci" / "run").read_text()
    for install in ("torch==2.13.0", "-e '.[dev]'"):
        assert install in ci and install in two
    assert two.endswith("python -m pytest -q") and ci.rstrip().endswith("python -m pytest -q")


def test_every_local_link_resolves():
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_the_contract_section_has_its_markers_in_order():
    text = README.read_text()
    assert 0 < text.index("<!-- contract:begin -->") < text.index("<!-- contract:end -->")


def test_every_repo_path_a_doc_names_exists():
    """A doc that names tests/x.py, src/y.py or bench/z.py after a move is wrong: each named file exists."""
    for doc in [README, REPO / "program.md", *sorted((REPO / "docs").glob("*.md"))]:
        for path in re.findall(r"\b((?:tests|src|bench)/[\w/]+\.py)\b", doc.read_text()):
            assert (REPO / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_readme_and_program_md_show_the_configured_contract():
    """The editable files and the allowed imports are named once, in config, and rendered into both documents."""
    from src.lab.config import SearchConfig
    from src.lab.contract import BEGIN, END, contract_markdown

    s = SearchConfig()
    want = " ".join(contract_markdown(s.editable, s.contract).split())
    for doc in (README, REPO / "program.md"):
        block = doc.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
        assert " ".join(block.split()) == want, f"{doc.name} differs from the config: run python -m src.lab.contract"
