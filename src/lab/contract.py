"""The static contract of the editable files: an allow-list of what research code may name.

Checked when a proposal is validated, on the files as they are after the patch, so a refused
patch costs no run. The research surface (model, optimizer, step recipe) is plain PyTorch: it
needs torch's public tensor and nn API, a few standard modules and the model/optimizer schemas,
and nothing that reaches files, the process, the clock, the environment or the interpreter.

The rules (search.contract, src/lab/config.py ContractConfig):
- modules: only those in allowed_imports may be imported or named. Every attribute chain,
  `from X import name` and alias is resolved against the installed modules, so a module an
  allowed one re-exports (torch.os, typing.sys, torch.serialization) is refused like its import;
- members: in an allowed module only the names allowed_names matches, less forbidden_attrs
  (torch.load, the RNG state, ...); no `_private` name of a library module or object;
- introspection: no dunder outside allowed_dunders (__class__, __dict__, __globals__...), no
  frame or code attribute on any object, no builtin of forbidden_names (type, vars, setattr...),
  getattr/hasattr only called, with a literal name (the one exception: `getattr(x, f.name)` over
  dataclasses.fields), never handed on as a value; no str.format field that walks attributes;
- values: a module or a library class is named, called, subclassed, checked with isinstance
  or used as an annotation, never handed on as a value (argument, default, return, container),
  so no alias through a call or a closure hides it; a name that stands for a library object is
  bound once per file (the optional-import fallback `= None` aside);
- writes: no assignment to, or deletion of, a library object's attributes (assignable aside:
  torch.backends.* settings); no Tensor subclass, metaclass or dunder hook beyond allowed_dunders
  (a __torch_function__ would intercept the harness's arithmetic on the logits).
Each refusal names the file, the line and the rule. What static analysis cannot type (an
object a library call returns) is left to the run-time sandbox (src/harness/landlock.py).

Usage: problems = check_source(text, "src/research/model.py", ContractConfig()); check_files(worktree, paths, cfg)
"""
from __future__ import annotations

import ast
import fnmatch
from collections import Counter
import importlib
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from src.lab.config import ContractConfig

REPO = Path(__file__).resolve().parents[2]
RESEARCH = "src.research"  # the research package: resolved from its source, never imported by the checker
_MISSING = object()
CLASS_TAKING = ("dataclasses.fields", "dataclasses.is_dataclass")  # calls that read a class and return no class
_FORMAT_WALK = re.compile(r"\{[^{}]*[.\[][^{}]*\}")  # "{0.__class__}", "{x[k]}": str.format attribute walks


class ContractViolation(ValueError):
    """An editable file breaks the contract; the message lists every violation with its line."""


class Refused(Exception):
    """One rule broken at one node; the checker adds the file and the line."""


@dataclass(frozen=True)
class Ref:
    """A library object a name stands for: an allowed module, or a member reached from one."""
    dotted: str  # its resolved name: F.torch.load -> torch.load
    obj: object = None  # the installed object; None: not resolvable here, judged by its name
    module: bool = False
    path_only: bool = False  # a package above an allowed module (src, src.harness): only a way through
    namespace: dict | None = field(default=None, compare=False)  # a research module: import-bound names -> Ref

    @property
    def is_class(self) -> bool:
        return isinstance(self.obj, type)


def _glob(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


class Library:
    """Resolves what research code names against the allow-list, looking at the installed modules."""

    def __init__(self, cfg: ContractConfig, root: Path = REPO):
        self.cfg, self.root = cfg, Path(root)
        self._research: dict[str, Ref] = {}

    def allowed(self, module: str) -> bool:
        return _glob(module, self.cfg.allowed_imports)

    def above_allowed(self, module: str) -> bool:
        return any(a.startswith(module + ".") for a in self.cfg.allowed_imports)

    def module(self, name: str, verb: str = "names the module") -> Ref:
        """The module `import name` gives; Refused outside the allow-list."""
        if self.allowed(name):
            if name == RESEARCH or name.startswith(RESEARCH + "."):
                return self.research(name)
            try:
                return Ref(name, importlib.import_module(name), module=True)
            except ImportError:  # not installed here (flex_attention on an old torch): judged by name
                return Ref(name, None, module=True)
        if self.above_allowed(name):
            return Ref(name, module=True, path_only=True)
        raise Refused(f"{verb} {name}, which is outside the allowed modules "
                      "(search.contract.allowed_imports)")

    def imported(self, node: ast.Import | ast.ImportFrom) -> list[tuple[str, Ref]]:
        """(bound name, what it stands for) of one import statement; Refused if any part is off the list."""
        out = []
        if isinstance(node, ast.Import):
            for a in node.names:
                ref = self.module(a.name, "imports")
                out.append((a.asname, ref) if a.asname else (a.name.split(".")[0], self.module(a.name.split(".")[0])))
            return out
        if node.level:
            raise Refused("uses a relative import; name the module (from src.research.model import ...)")
        base = self.module(node.module or "", "imports from")
        for a in node.names:
            if a.name == "*":
                raise Refused(f"`from {node.module} import *` hides what is used; import names explicitly")
            out.append((a.asname or a.name, self.member(base, a.name)))
        return out

    def research(self, name: str) -> Ref:
        """A research module, resolved from its source: its imports are what its attributes may reach."""
        if name not in self._research:
            self._research[name] = Ref(name, module=True, namespace={})  # an import cycle sees no names
            rel = self.root / Path(*name.split("."))
            f = rel.with_suffix(".py") if rel.with_suffix(".py").is_file() else rel / "__init__.py"
            try:
                tree = ast.parse(f.read_text())
            except (OSError, SyntaxError):
                tree = ast.Module(body=[], type_ignores=[])
            ns = {}
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    try:
                        ns.update(self.imported(node))
                    except Refused:  # that file is refused when it is checked itself
                        pass
            self._research[name] = Ref(name, module=True, namespace=ns)
        return self._research[name]

    def check_attr(self, owner: str, attr: str) -> None:
        """The rules every attribute obeys, whatever it is read from."""
        if _dunder(attr) and attr not in self.cfg.allowed_dunders:
            raise Refused(f"uses {owner}.{attr}: {attr} is introspection (allowed dunders: "
                          f"{', '.join(self.cfg.allowed_dunders)})")
        if attr in self.cfg.forbidden_value_attrs:
            raise Refused(f"uses {owner}.{attr}: frames, code objects, the MRO and file I/O are off limits")

    def member(self, ref: Ref, attr: str) -> Ref | None:
        """What `ref.attr` stands for; None: a research module's own definition (checked as code)."""
        dotted = f"{ref.dotted}.{attr}"
        self.check_attr(ref.dotted, attr)
        if ref.namespace is not None:
            if attr in ref.namespace:
                return ref.namespace[attr]
            return self.module(dotted) if self.allowed(dotted) else None
        if attr.startswith("_") and not _dunder(attr) and not any(attr.startswith(p) for p in self.cfg.allowed_private):
            raise Refused(f"uses the private {dotted}: library internals are off the allow-list")
        if ref.path_only:
            return self.module(dotted)
        try:
            obj = _MISSING if ref.obj is None else getattr(ref.obj, attr, _MISSING)
        except Exception:  # a property that fails here fails at run time too
            obj = _MISSING
        if obj is _MISSING and ref.module and self.allowed(dotted):
            return self.module(dotted)  # a submodule not imported yet
        if isinstance(obj, types.ModuleType):
            if self.allowed(obj.__name__):
                return self.module(obj.__name__)
            raise Refused(f"names {dotted}, the module {obj.__name__}, which is outside the allowed modules "
                          "(search.contract.allowed_imports)")
        if ref.module and not _glob(dotted, self.cfg.allowed_names):
            raise Refused(f"names {dotted}, which is not on the allow-list of {ref.dotted} "
                          "(search.contract.allowed_names)")
        if _glob(dotted, self.cfg.forbidden_attrs):
            raise Refused(f"uses {dotted}, which reaches files, the process, the RNG or the thread pool "
                          "(search.contract.forbidden_attrs)")
        return Ref(dotted, None if obj is _MISSING else obj)


def _const_getattr(node: ast.AST) -> tuple[ast.AST, str] | None:
    """getattr(x, "name") / hasattr(x, "name") -> (x, "name")."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


def _rebound(tree: ast.Module, names: set[str], loops: Counter) -> set[str]:
    """The names bound anywhere in the file other than as the target of a loop over dataclasses.fields(...) (an
    assignment, a parameter, a with/except/import name, a def): for those, `x.name` is whatever the code put there.
    Red team 2026-12-07 (eighth session): `for f in fields(C): pass` then `f = Box("__globals__")`; getattr(obj,
    f.name) passed as the fields() idiom."""
    stores: Counter = Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            stores[node.id] += 1
        elif isinstance(node, ast.arg):
            stores[node.arg] += 1
        elif isinstance(node, ast.ExceptHandler) and node.name:
            stores[node.name] += 1
        elif isinstance(node, ast.alias):
            stores[(node.asname or node.name).split(".")[0]] += 1
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stores[node.name] += 1
    return {n for n in names if stores[n] != loops[n]}


def _is_tensor_class(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, type) and issubclass(obj, torch.Tensor)


class _Checker(ast.NodeVisitor):
    """Two passes over one file: bind the names that stand for library objects, then judge every node."""

    def __init__(self, path: str, cfg: ContractConfig, lib: Library):
        self.path, self.cfg, self.lib = path, cfg, lib
        self.problems: list[str] = []
        self.names: dict[str, Ref] = {}  # file-wide: a name bound to a library object
        self.defining: set[int] = set()  # the Name/alias nodes that bind those names
        self.value_ok: set[int] = set()  # nodes where a module or library class may stand
        self.called: set[int] = set()  # nodes called as functions (getattr and hasattr may stand only there)
        self.field_vars: set[str] = set()  # loop variables over dataclasses.fields(...), never bound otherwise
        self.field_loops: Counter = Counter()  # how many such loops bind each
        self.memo: dict[int, Ref | None] = {}
        self.quiet = False

    def bad(self, node: ast.AST, rule: str) -> None:
        msg = f"{self.path}:{getattr(node, 'lineno', '?')}: {rule}"
        if not self.quiet and msg not in self.problems:
            self.problems.append(msg)

    def run(self, tree: ast.Module) -> list[str]:
        self.quiet = True
        self.bind(tree)
        self.field_vars -= _rebound(tree, self.field_vars, self.field_loops)
        self.quiet, self.memo = False, {}
        self.visit(tree)
        return self.problems

    # -- pass 1: what each name stands for -------------------------------------------------------
    def bind(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            self.quiet = False
            try:
                for name, ref in self.lib.imported(node):
                    self.bind_name(node, name, ref)
            except Refused as e:
                self.bad(node, str(e))
            self.quiet = True
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if self.chain(node.value):
                ref = self.resolve(node.value)
                if ref is not None:
                    self.bind_name(node.targets[0], node.targets[0].id, ref)
        elif isinstance(node, (ast.For, ast.comprehension)):
            ref = self.resolve(node.iter.func) if isinstance(node.iter, ast.Call) else None
            if ref is not None and ref.dotted == "dataclasses.fields" and isinstance(node.target, ast.Name):
                self.field_vars.add(node.target.id)
                self.field_loops[node.target.id] += 1
        for child in ast.iter_child_nodes(node):
            self.bind(child)

    def bind_name(self, node: ast.AST, name: str, ref: Ref) -> None:
        if name in self.names and self.names[name].dotted != ref.dotted:
            self.quiet, was = False, self.quiet
            self.bad(node, f"binds {name} to {ref.dotted}, and elsewhere to {self.names[name].dotted}; "
                           "use one name per library object")
            self.quiet = was
        self.names.setdefault(name, ref)
        self.defining.add(id(node))

    @staticmethod
    def chain(node: ast.AST) -> bool:
        return isinstance(node, (ast.Name, ast.Attribute)) or _const_getattr(node) is not None

    # -- resolution ------------------------------------------------------------------------------
    def resolve(self, node: ast.AST) -> Ref | None:
        """The library object `node` stands for, or None (a local, a parameter, a call result)."""
        if id(node) not in self.memo:
            self.memo[id(node)] = None
            try:
                self.memo[id(node)] = self._resolve(node)
            except Refused as e:
                self.bad(node, str(e))
        return self.memo[id(node)]

    def _resolve(self, node: ast.AST) -> Ref | None:
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        pair = (node.value, node.attr) if isinstance(node, ast.Attribute) else _const_getattr(node)
        if pair is None:
            return None
        base = self.resolve(pair[0])
        if base is None:
            self.lib.check_attr("<object>", pair[1])
            return None
        return self.lib.member(base, pair[1])

    def judge_value(self, node: ast.AST, ref: Ref | None) -> None:
        if ref is not None and (ref.module or ref.is_class) and id(node) not in self.value_ok:
            what = "the module" if ref.module else "the library class"
            self.bad(node, f"hands on {what} {ref.dotted} as a value (argument, default, return, container or "
                           "closure); name it where it is used: call it, subclass it or isinstance() it")

    def allow_values(self, *nodes: ast.AST) -> None:
        for n in nodes:
            for sub in ast.walk(n) if n is not None else ():
                if isinstance(sub, (ast.Name, ast.Attribute, ast.Tuple, ast.Subscript, ast.Constant, ast.BinOp)):
                    self.value_ok.add(id(sub))

    # -- pass 2: every node ----------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        pass  # judged in pass 1

    visit_ImportFrom = visit_Import

    def visit_Name(self, node: ast.Name) -> None:
        if _dunder(node.id) and node.id != "__name__":
            self.bad(node, f"uses {node.id}, which is interpreter state")
        elif node.id in self.cfg.forbidden_names:
            verb = "rebinds the builtin" if not isinstance(node.ctx, ast.Load) else "uses"
            self.bad(node, f"{verb} {node.id}, which reaches the process, files or introspection")
        elif node.id in ("getattr", "hasattr") and id(node) not in self.called:  # `g = getattr`, map(getattr, ...)
            self.bad(node, f"hands on the builtin {node.id} as a value (or rebinds it); call it with a literal name")
        if not isinstance(node.ctx, ast.Load):
            self.judge_binding(node, node.id)
        else:
            self.judge_value(node, self.resolve(node))

    def judge_binding(self, node: ast.AST, name: str) -> None:
        if name in self.names and id(node) not in self.defining:
            self.bad(node, f"rebinds {name}, which names {self.names[name].dotted} in this file; use another name")

    def visit_arg(self, node: ast.arg) -> None:
        self.judge_binding(node, node.arg)
        self.allow_values(node.annotation)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.value_ok.add(id(node.value))
        ref = self.resolve(node)
        if isinstance(node.ctx, ast.Load):
            self.judge_value(node, ref)
        else:
            base = self.resolve(node.value)
            dotted = f"{base.dotted}.{node.attr}" if base is not None else ""
            if base is not None and not _glob(dotted, self.cfg.assignable):
                self.bad(node, f"assigns to {dotted}, part of a library or harness module: library and harness "
                               "objects may not be rebound or changed")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self.value_ok.add(id(node.func))
        self.called.add(id(node.func))
        fn = node.func.id if isinstance(node.func, ast.Name) else None
        if fn in ("getattr", "hasattr") and node.args:
            self.value_ok.add(id(node.args[0]))
            if _const_getattr(node) is not None:
                self.judge_value(node, self.resolve(node))
            elif not self.fields_idiom(node):
                a = node.args[1] if len(node.args) > 1 else None
                if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id in self.field_loops:
                    self.bad(node, f"{fn}(x, {a.value.id}.name): {a.value.id} loops over dataclasses.fields() but is "
                                   "also bound elsewhere in the file, so its .name can be anything; give the loop "
                                   "variable a name of its own")
                else:
                    self.bad(node, f"{fn}() with a computed name; name the attribute (getattr is resolved like "
                                   "`x.name`)")
        elif fn in ("isinstance", "issubclass") and len(node.args) == 2:
            self.allow_values(node.args[1])
        elif getattr(self.resolve(node.func), "dotted", None) in CLASS_TAKING:
            self.allow_values(*node.args)
        elif (isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "format_map")
              and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
              and _FORMAT_WALK.search(node.func.value.value)):
            self.bad(node, "str.format with a field that walks attributes or items ({0.x}, {0[k]}); format values")
        self.generic_visit(node)

    def fields_idiom(self, node: ast.Call) -> bool:
        """getattr(x, f.name) for f in dataclasses.fields(...): a declared field's name, never a dunder."""
        a = node.args[1] if len(node.args) > 1 else None
        return (isinstance(a, ast.Attribute) and a.attr == "name" and isinstance(a.value, ast.Name)
                and a.value.id in self.field_vars)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        ref = self.resolve(node.value)
        if ref is not None and ref.dotted.split(".")[0] in ("typing", "collections"):
            self.allow_values(node.slice)  # Optional[torch.Tensor]: a type expression
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) and self.chain(node.value):
            self.value_ok.add(id(node.value))  # an alias, bound in pass 1 and resolved like the original
        if isinstance(node.value, ast.Constant) and node.value.value is None:
            self.defining.update(id(t) for t in node.targets)  # the optional-import fallback: X = None
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.allow_values(node.annotation)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if _dunder(node.name) and node.name not in self.cfg.allowed_dunders:
            self.bad(node, f"defines {node.name}, a hook into the interpreter or torch's dispatch "
                           f"(allowed: {', '.join(self.cfg.allowed_dunders)})")
        self.judge_binding(node, node.name)
        self.allow_values(node.returns, *node.decorator_list)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.judge_binding(node, node.name)
        self.allow_values(*node.bases, *node.decorator_list)
        for b in node.bases:
            ref = self.resolve(b)
            if ref is not None and _is_tensor_class(ref.obj):
                self.bad(node, f"subclasses {ref.dotted}: a Tensor subclass can intercept the harness's "
                               "arithmetic on the logits; return plain tensors")
        if any(k.arg == "metaclass" for k in node.keywords):
            self.bad(node, "sets a metaclass, which runs code when classes are created; use a plain class")
        self.generic_visit(node)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self.allow_values(node.type)
        if node.name:
            self.judge_binding(node, node.name)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.bad(node, "uses `global`: module state shared between calls is not allowed (keep state in the model)")


def check_source(text: str, path: str, cfg: ContractConfig, root: Path = REPO) -> list[str]:
    """Every violation of the contract in one file's source, as 'path:line: rule'.

    root: the checkout whose src/research/ files resolve `from src.research.x import name`."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        return [f"{path}:{e.lineno}: does not parse ({e.msg})"]
    return _Checker(path, cfg, Library(cfg, root)).run(tree)


def check_files(root: Path, paths: list[str], cfg: ContractConfig) -> None:
    """Check the editable .py files among `paths` under `root`; ContractViolation listing every problem."""
    if not cfg.enabled:
        return
    problems = []
    for rel in paths:
        f = Path(root) / rel
        if rel.endswith(".py") and f.is_file():
            problems += check_source(f.read_text(), rel, cfg, Path(root))
    if problems:
        raise ContractViolation("the patched files break the research-code contract (search.contract):\n  "
                                + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))


BEGIN, END = "<!-- contract:begin -->", "<!-- contract:end -->"


def contract_markdown(editable: list[str], cfg: ContractConfig) -> str:
    """What the README and program.md say an agent may change and import, rendered from the config (the one source).
    Submodules are listed under their top-level module; tests/test_readme.py fails when a document differs."""
    tops: dict[str, list[str]] = {}
    for mod in cfg.allowed_imports:
        top, _, rest = mod.partition(".")
        tops.setdefault(top, [])
        if rest:
            tops[top].append(rest)
    mods = [f"`{top}`" + (f" ({', '.join(subs)})" if subs else "") for top, subs in tops.items() if top != "__future__"]
    return (f"A code patch may touch only {', '.join(f'`{g}`' for g in editable)} (`search.editable`). Those files "
            f"may import only: {', '.join(mods)} (`search.contract.allowed_imports`; the members each may name, "
            "and the rules: `src/lab/contract.py`).")


def render_into(text: str, block: str) -> str:
    """`text` with what stands between the contract markers replaced by `block`."""
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"


if __name__ == "__main__":  # python -m src.lab.contract: render the contract into README.md and program.md
    from src.lab.config import SearchConfig
    import textwrap

    s = SearchConfig()
    block = "\n".join(textwrap.wrap(contract_markdown(s.editable, s.contract), 110, break_on_hyphens=False))
    for doc in (REPO / "README.md", REPO / "program.md"):
        doc.write_text(render_into(doc.read_text(), block))
        print(f"rendered the contract into {doc}")
