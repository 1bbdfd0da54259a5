"""Only actors/quic_adapter.py may touch aioquic's private members: an AST guard.

aioquic changes its private members without notice; the adapter pins the ones it uses
(``REQUIRED_PRIVATE_MEMBERS``, checked against aioquic by tests/test_quic_adapter.py). A use
anywhere else would escape that check, so this scans supervisor/, actors/ and telemetry/.

The private names are taken from aioquic's own source (every ``self._x`` it assigns, every
``_x`` its class bodies define), not from a hand-kept list. Flagged outside the adapter:

* ``X._x`` (or ``getattr(X, "_x")``...) with ``_x`` private in aioquic, where ``X`` is not the
  ``self``/``cls`` of one of our classes. Our classes have privates of their own with the same
  names (``_loop``, ``_tasks``...): a name the module defines on its own classes is not
  flagged, unless the adapter is known to touch it on aioquic objects (``_streams``, ``_loss``...).
* In a subclass of an aioquic class (directly, through our classes, or through the adapter's):
  ``self._x``/``super()._x`` reads or writes, and ``_x`` overrides, of a private of its aioquic
  ancestors (inherited state, or a clash that silently clobbers it).
* Private attributes of aioquic modules and ``from aioquic... import _x``.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import aioquic

from actors.quic_adapter import REQUIRED_PRIVATE_MEMBERS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("supervisor", "actors", "telemetry")
ADAPTER = "actors.quic_adapter"
AIOQUIC_ROOT = Path(aioquic.__file__).resolve().parent


def _is_private(name: str) -> bool:
    """``_x`` or ``__x``, not a dunder (``__init__`` is public protocol)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


#: Names the adapter touches on aioquic objects: flagged on any receiver but our own ``self``,
#: even where the module has a private of that name too (``self._quic._streams``).
ALWAYS_FLAGGED = frozenset(
    name for names in REQUIRED_PRIVATE_MEMBERS.values() for name in names if _is_private(name)
)


# ------------------------------------------------------------------ aioquic's private names


def _class_private_names(cls: ast.ClassDef) -> set[str]:
    """Private names a class body defines, and every ``self._x`` its methods assign."""
    names: set[str] = set()
    for item in cls.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(item.name)
        elif isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    # ``self.__x`` is stored as ``_Class__x``.
    return {
        f"_{cls.name.lstrip('_')}{n}" if n.startswith("__") else n for n in names if _is_private(n)
    }


@cache
def aioquic_private_names() -> dict[str, frozenset[str]]:
    """``module.Class`` (as aioquic's source defines it) -> the class's own private names."""
    out: dict[str, frozenset[str]] = {}
    for path in sorted(AIOQUIC_ROOT.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = path.relative_to(AIOQUIC_ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                key = f"{module}.{node.name}"
                out[key] = out.get(key, frozenset()) | _class_private_names(node)
    return out


@cache
def all_aioquic_private_names() -> frozenset[str]:
    return frozenset().union(*aioquic_private_names().values())


@cache
def inherited_private_names(dotted: str) -> frozenset[str]:
    """Private names of an aioquic class and its aioquic ancestors (through re-exports too).

    Unknown (cannot be imported): every aioquic private name, to stay on the safe side.
    """
    module, _, name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        mro = cls.__mro__
    except (ImportError, AttributeError):
        return all_aioquic_private_names()
    table = aioquic_private_names()
    return frozenset().union(
        *(table.get(f"{c.__module__}.{c.__qualname__}", frozenset()) for c in mro)
    )


# ------------------------------------------------------------------ our modules


@dataclass
class Module:
    name: str
    label: str
    tree: ast.Module
    #: Local name -> the dotted name it was imported as (``QuicLogger`` ->
    #: ``aioquic.quic.logger.QuicLogger``).
    imports: dict[str, str] = field(default_factory=dict)
    #: Our class (``module.Class``) -> its ClassDef.
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)


def _imports(name: str, tree: ast.Module, is_package: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    out[alias.asname] = alias.name
                else:
                    top = alias.name.partition(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                out[alias.asname or alias.name] = f"{base}.{alias.name}"
    return out


def _dotted(module: Module, expr: ast.expr) -> str | None:
    """The dotted name an expression refers to through the module's imports and classes."""
    if isinstance(expr, ast.Name):
        if expr.id in module.imports:
            return module.imports[expr.id]
        local = f"{module.name}.{expr.id}"
        return local if local in module.classes else None
    if isinstance(expr, ast.Attribute):
        base = _dotted(module, expr.value)
        return None if base is None else f"{base}.{expr.attr}"
    return None


def _is_aioquic(dotted: str) -> bool:
    return dotted == "aioquic" or dotted.startswith("aioquic.")


def aioquic_ancestors(modules: list[Module]) -> dict[str, frozenset[str]]:
    """Our class -> the aioquic classes it derives from (directly or through our classes)."""
    bases: dict[str, list[str]] = {}
    for module in modules:
        for qual, cls in module.classes.items():
            bases[qual] = [d for b in cls.bases if (d := _dotted(module, b)) is not None]
    out: dict[str, frozenset[str]] = {qual: frozenset() for qual in bases}
    changed = True
    while changed:
        changed = False
        for qual, dotted in bases.items():
            found = frozenset(d for d in dotted if _is_aioquic(d)).union(
                *(out.get(d, frozenset()) for d in dotted)
            )
            if found != out[qual]:
                out[qual], changed = found, True
    return out


def _own_private_names(module: Module, ancestors: dict[str, frozenset[str]]) -> set[str]:
    """Private names the module's own (not aioquic-derived) classes define."""
    names: set[str] = set()
    for qual, cls in module.classes.items():
        if not ancestors[qual]:
            names |= _class_private_names(cls)
    return names


def _is_staticmethod(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in func.decorator_list)


@dataclass(frozen=True)
class Finding:
    label: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.label}:{self.line}: {self.message}"


class _Scanner(ast.NodeVisitor):
    """Visits one module, knowing which local names are the ``self``/``cls`` of which class."""

    def __init__(self, module: Module, ancestors: dict[str, frozenset[str]]) -> None:
        self.module = module
        self.ancestors = ancestors
        self.own = _own_private_names(module, ancestors)
        self.aioquic_names = all_aioquic_private_names()
        self.findings: list[Finding] = []
        #: Name bound to an instance (or the class) -> our class it belongs to.
        self.bound: dict[str, str] = {}
        self.class_stack: list[str] = []

    def flag(self, node: ast.AST, message: str) -> None:
        self.findings.append(Finding(self.module.label, getattr(node, "lineno", 0), message))

    def inherited(self, qual: str) -> frozenset[str]:
        return frozenset().union(*(inherited_private_names(d) for d in self.ancestors[qual]))

    # ---- scopes

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        qual = f"{self.module.name}.{node.name}"
        if self.ancestors.get(qual):
            inherited = self.inherited(qual)
            for item in node.body:
                name = None
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = item.name
                elif isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                    name = item.targets[0].id
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    name = item.target.id
                if name is not None and name in inherited:
                    self.flag(item, f"{node.name} overrides aioquic's private {name}")
        for outer in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(outer)
        saved = dict(self.bound)
        self.class_stack.append(qual)
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                self.visit_method(qual, item)
            else:
                self.visit(item)
        self.class_stack.pop()
        self.bound = saved

    def visit_method(self, qual: str, func: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for outer in [*func.decorator_list, *func.args.defaults, *func.args.kw_defaults]:
            if outer is not None:
                self.visit(outer)
        saved = dict(self.bound)
        args = [*func.args.posonlyargs, *func.args.args]
        for arg in args:
            self.bound.pop(arg.arg, None)
        if args and not _is_staticmethod(func):
            self.bound[args[0].arg] = qual
        for statement in func.body:
            self.visit(statement)
        self.bound = saved

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        saved = dict(self.bound)
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            self.bound.pop(arg.arg, None)
        self.generic_visit(node)
        self.bound = saved

    visit_AsyncFunctionDef = visit_FunctionDef

    # ---- accesses

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and _is_aioquic(node.module):
            parts = [*node.module.split("."), *(a.name for a in node.names)]
            private = [p for p in parts if _is_private(p)]
            if private:
                self.flag(node, f"imports aioquic's private {', '.join(private)}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_aioquic(alias.name) and any(_is_private(p) for p in alias.name.split(".")):
                self.flag(node, f"imports aioquic's private module {alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.check(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            self.check(node, node.args[0], node.args[1].value)
        self.generic_visit(node)

    def check(self, node: ast.AST, receiver: ast.expr, name: str) -> None:
        if not _is_private(name):
            return
        dotted = _dotted(self.module, receiver)
        if dotted is not None and _is_aioquic(dotted):
            self.flag(node, f"{dotted}.{name} is private to aioquic")
            return
        owner = None
        if isinstance(receiver, ast.Name):
            owner = self.bound.get(receiver.id)
        elif (
            isinstance(receiver, ast.Call)
            and isinstance(receiver.func, ast.Name)
            and receiver.func.id == "super"
            and self.class_stack
        ):
            owner = self.class_stack[-1]
        if owner is not None:
            if self.ancestors.get(owner) and name in self.inherited(owner):
                cls = owner.rpartition(".")[2]
                self.flag(node, f"{cls} (an aioquic subclass) touches inherited private {name}")
            return
        if name in self.aioquic_names and (name in ALWAYS_FLAGGED or name not in self.own):
            self.flag(node, f"{ast.unparse(receiver)}.{name}: private to aioquic")


def parse_modules(sources: dict[str, tuple[str, str, bool]]) -> list[Module]:
    """``name -> (label, source, is_package)`` parsed, with their imports and classes."""
    modules = []
    for name, (label, source, is_package) in sources.items():
        tree = ast.parse(source, filename=label)
        module = Module(name, label, tree, _imports(name, tree, is_package))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                module.classes[f"{name}.{node.name}"] = node
        modules.append(module)
    return modules


def scan(sources: dict[str, tuple[str, str, bool]]) -> list[Finding]:
    """Findings in every module but the adapter (which is parsed, for its subclasses)."""
    modules = parse_modules(sources)
    ancestors = aioquic_ancestors(modules)
    findings: list[Finding] = []
    for module in modules:
        if module.name == ADAPTER:
            continue
        scanner = _Scanner(module, ancestors)
        scanner.visit(module.tree)
        findings.extend(scanner.findings)
    return findings


def project_sources(root: Path) -> dict[str, tuple[str, str, bool]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            out[name] = (str(path.relative_to(root)), path.read_text(encoding="utf-8"), is_package)
    return out


# ------------------------------------------------------------------ tests


def test_only_the_adapter_touches_aioquic_privates() -> None:
    findings = scan(project_sources(ROOT))
    assert not findings, (
        "aioquic private members used outside actors/quic_adapter.py (add a public helper "
        "there, and the member to REQUIRED_PRIVATE_MEMBERS):\n" + "\n".join(map(str, findings))
    )


def test_aioquic_names_are_found() -> None:
    """The name table really comes from aioquic's source (an empty table passes everything)."""
    table = aioquic_private_names()
    assert "_network_paths" in table["aioquic.quic.connection.QuicConnection"]
    assert "_traces" in table["aioquic.quic.logger.QuicLogger"]
    assert "_quic" in inherited_private_names("aioquic.asyncio.QuicConnectionProtocol")
    assert {"_network_paths", "_streams", "_loss", "_events", "_traces"} <= ALWAYS_FLAGGED
    assert all_aioquic_private_names() >= ALWAYS_FLAGGED


def _scan_one(source: str, name: str = "supervisor.x") -> list[str]:
    return [str(f) for f in scan({name: ("x.py", source, False)})]


def test_guard_flags_a_connection_private() -> None:
    assert _scan_one("def f(conn):\n    return conn._network_paths\n") == [
        "x.py:2: conn._network_paths: private to aioquic"
    ]


def test_guard_flags_subclasses_getattr_imports_and_modules() -> None:
    source = """\
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic import connection
from aioquic.quic.logger import QuicLogger
from aioquic._buffer import Buffer

class Proto(QuicConnectionProtocol):
    def peek(self):
        return self._quic

class Logger(QuicLogger):
    def _traces(self):
        return []

class Deeper(Logger):
    def count(self):
        return len(super()._traces())

def f(quic, n=connection._x):
    return getattr(quic, "_loss")
"""
    assert _scan_one(source) == [
        "x.py:4: imports aioquic's private _buffer",
        "x.py:8: Proto (an aioquic subclass) touches inherited private _quic",
        "x.py:11: Logger overrides aioquic's private _traces",
        "x.py:16: Deeper (an aioquic subclass) touches inherited private _traces",
        "x.py:18: aioquic.quic.connection._x is private to aioquic",
        "x.py:19: quic._loss: private to aioquic",
    ]


def test_guard_flags_subclasses_of_the_adapters_classes() -> None:
    sources = {
        ADAPTER: (
            "actors/quic_adapter.py",
            "from aioquic.quic.logger import QuicLoggerTrace\nclass Base(QuicLoggerTrace): ...\n",
            False,
        ),
        "telemetry.q": (
            "telemetry/q.py",
            "from actors.quic_adapter import Base\n"
            "class T(Base):\n    def n(self):\n        return len(self._events)\n",
            False,
        ),
    }
    assert [str(f) for f in scan(sources)] == [
        "telemetry/q.py:4: T (an aioquic subclass) touches inherited private _events"
    ]


def test_guard_leaves_our_own_privates_alone() -> None:
    source = """\
class Actor:
    def __init__(self, loop):
        self._loop = loop
        self._tasks = set()

    def peer(self, other: "Actor"):
        return other._loop, self._tasks

def g(actor):
    return actor._loop, actor._streams
"""
    # ``_loop`` is private in aioquic too but ours here; ``_streams`` is the adapter's business.
    assert _scan_one(source) == ["x.py:10: actor._streams: private to aioquic"]
