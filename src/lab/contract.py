"""The static contract of the editable files: what research code may import, assign and call.

Checked when a proposal is validated, on the files as they are after the patch, so a refused
patch costs no run. The research surface (model, optimizer, step recipe) is plain PyTorch: it
needs no process, file system, clock, environment, introspection or dynamic import, and it must
not reach into the harness or rebind library functions. Each refusal names the file, the line
and the rule. The rules are configurable (search.contract); on by default.

Usage: problems = check_source(text, "src/research/model.py", ContractConfig()); check_files(worktree, paths, cfg)
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

from src.lab.config import ContractConfig


class ContractViolation(ValueError):
    """An editable file breaks the contract; the message lists every violation with its line."""


def _root(node: ast.AST) -> str | None:
    """The name at the root of an attribute chain: `torch.nn.functional.x` -> 'torch'."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, cfg: ContractConfig):
        self.path, self.cfg = path, cfg
        self.problems: list[str] = []
        self.modules: set[str] = set()  # local names bound to imported modules or their members

    def bad(self, node: ast.AST, rule: str) -> None:
        self.problems.append(f"{self.path}:{getattr(node, 'lineno', '?')}: {rule}")

    def allowed(self, module: str) -> bool:
        return any(module == a or module.startswith(a + ".") for a in self.cfg.allowed_imports)

    # -- imports ------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if not self.allowed(a.name):
                self.bad(node, f"imports {a.name}, which is outside the allowed imports "
                               f"({', '.join(self.cfg.allowed_imports)})")
            self.modules.add((a.asname or a.name).split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = "." * node.level + (node.module or "")
        if node.level or not self.allowed(module):
            self.bad(node, f"imports from {module or '.'}, which is outside the allowed imports "
                           f"({', '.join(self.cfg.allowed_imports)})")
        for a in node.names:
            if a.name == "*":
                self.bad(node, f"`from {module} import *` hides what is used; import names explicitly")
            self.modules.add(a.asname or a.name)

    # -- assignments into imported modules ----------------------------------------------------
    def _target(self, t: ast.AST, node: ast.AST) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._target(e, node)
        elif (isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t) in self.modules
              and not any(fnmatch.fnmatchcase(_dotted(t), p) for p in self.cfg.assignable)):
            self.bad(node, f"assigns to {_dotted(t) or _root(t)}, part of an imported module: library and harness "
                           "functions may not be rebound or changed")
        elif isinstance(t, ast.Name) and t.id in self.cfg.forbidden_names:
            self.bad(node, f"rebinds the builtin {t.id}")

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            self._target(t, node)
            if isinstance(t, ast.Name) and _root(node.value) in self.modules and not isinstance(node.value, ast.Call):
                self.modules.add(t.id)  # an alias of a module (or of one of its members) is watched like it
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._target(node.target, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._target(node.target, node)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        for t in node.targets:
            self._target(t, node)

    def visit_Global(self, node: ast.Global) -> None:
        self.bad(node, "uses `global`: module state shared between calls is not allowed (keep state in the model)")

    # -- names, attributes and calls ----------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.cfg.forbidden_names:
            self.bad(node, f"uses {node.id}, which reaches the process, files, the clock or introspection")

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func.id if isinstance(node.func, ast.Name) else None
        if fn in ("getattr", "hasattr") and node.args and _root(node.args[0]) in self.modules:
            name = node.args[1] if len(node.args) > 1 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.bad(node, f"{fn}() on an imported module with a computed name; name the attribute")
            else:  # judge it as the attribute it names
                self.visit_Attribute(ast.copy_location(ast.Attribute(node.args[0], name.value, ast.Load()), node))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        if node.attr.startswith("__") and node.attr.endswith("__") and node.attr in self.cfg.forbidden_dunders:
            self.bad(node, f"uses {node.attr}, which is introspection")
        elif _root(node) in self.modules and any(fnmatch.fnmatchcase(dotted, p) for p in self.cfg.forbidden_attrs):
            self.bad(node, f"uses {dotted}, which reaches the process, files, the clock or the environment")
        elif (_root(node) in self.modules and node.attr.startswith("_") and not node.attr.startswith("__")
              and not any(node.attr.startswith(p) for p in self.cfg.allowed_private)):
            self.bad(node, f"uses the private {dotted}; private library internals are off limits")
        self.generic_visit(node)


def check_source(text: str, path: str, cfg: ContractConfig) -> list[str]:
    """Every violation of the contract in one file's source, as 'path:line: rule'."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        return [f"{path}:{e.lineno}: does not parse ({e.msg})"]
    checker = _Checker(path, cfg)
    checker.visit(tree)
    return checker.problems


def check_files(root: Path, paths: list[str], cfg: ContractConfig) -> None:
    """Check the editable .py files among `paths` under `root`; ContractViolation listing every problem."""
    if not cfg.enabled:
        return
    problems = []
    for rel in paths:
        f = Path(root) / rel
        if rel.endswith(".py") and f.is_file():
            problems += check_source(f.read_text(), rel, cfg)
    if problems:
        raise ContractViolation("the patched files break the research-code contract (search.contract):\n  "
                                + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
