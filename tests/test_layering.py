"""The package's imports run one way, downward through its layers, with no cycle.

Every module of ``vdn_pyro`` is parsed with :mod:`ast`; every import in it counts, at module
level or inside a function (a lazy import is still a dependency), relative ones resolved the way
Python resolves them. The graph is checked twice:

- **cycles**, between modules, and between *units*: a sub-package (its ``__init__`` with every
  module under it) or a top-level module. Importing any module of a sub-package runs the
  package's ``__init__``, which imports the rest of it, so a sub-package and what it re-exports
  count as one: ``models -> inference -> models`` is a cycle even when no single module closes it.
  A package's ``__init__`` importing its own submodules is an edge inside one unit, which is fine;
  the root package's ``__init__`` (the public API, which imports everything) is a unit of its own;
- **layers**: every unit has a rank in :data:`RANKS`, and no import may go from a lower rank to
  a higher one. Imports within one rank are allowed (the cycle check still applies).

The checker is tested on a small synthetic package and on the real graph with an edge injected,
so that a broken parser or checker cannot pass silently. The same parse checks the other
packages imported: core ``install_requires`` holds exactly what the library imports.
"""

import ast
import configparser
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vdn_pyro"

#: The layer of each unit, bottom (0) to top. A sub-package's rank covers every module under it.
RANKS = {
    # the bottom: primitives, distributions, data loading, metrics and atomic writes import nothing
    "vdn_pyro.primitives": 0,
    "vdn_pyro.distributions": 0,
    "vdn_pyro.state_space": 0,
    "vdn_pyro.data": 0,
    "vdn_pyro.metrics": 0,
    "vdn_pyro.unit_status": 0,
    "vdn_pyro.files": 0,
    # trunks, amortized posterior heads and the guide builder
    "vdn_pyro.guides": 1,
    # priors, likelihoods, Neurons, the network base, VDN, Forecaster, RecurrentVDN, baselines
    "vdn_pyro.models": 2,
    # ELBOs, fit, checkpoints, constraints, diagnostics, ArviZ, JIT, distributed training
    "vdn_pyro.inference": 3,
    # built on inference; the former home of VDN is a re-export that the library itself never uses
    "vdn_pyro.forecasting": 4,
    "vdn_pyro.config": 4,
    "vdn_pyro.plots": 4,
    "vdn_pyro.network": 4,
    # the command line and the package's public API
    "vdn_pyro.cli": 5,
    "vdn_pyro": 5,
}


# ----------------------------------------------------------------------------- the checker
def discover(package_dir, package):
    """``{module name: (path, is_package)}`` for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(Path(package_dir).rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _known(name, modules):
    """The longest prefix of a dotted name that is a module of the package, else ``None``."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name, path, is_package, modules):
    """The package's modules that module ``name`` imports, anywhere in its source.

    ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) point at ``a.b.c``;
    ``from a.b import x`` (``x`` a name) points at ``a.b``, whose ``__init__`` defines or
    re-exports it. Relative imports resolve against the module's package (a package's
    ``__init__`` is its own package). ``importlib.import_module("a.b")`` with a literal counts too.
    """
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    own_package = name if is_package else name.rpartition(".")[0]
    found = set()

    def add(target):
        target = _known(target, modules)
        if target is not None and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value)
    return found


def import_graph(package_dir, package):
    """``{module: set of the package's modules it imports}``."""
    modules = discover(package_dir, package)
    return {name: imports_of(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def unit_of(module, ranks, package):
    """The key of :data:`RANKS` that covers ``module`` (the root key only covers the root
    ``__init__``), else ``None``."""
    if module == package:
        return package if package in ranks else None
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        key = ".".join(parts[:end])
        if key in ranks:
            return key
    return None


def strongly_connected(graph):
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def unit_graph(graph, ranks, package):
    """The graph between units (self-edges dropped)."""
    units = {}
    for module, targets in graph.items():
        source = unit_of(module, ranks, package)
        edges = units.setdefault(source, set())
        for target in targets:
            target_unit = unit_of(target, ranks, package)
            if target_unit != source:
                edges.add(target_unit)
    return units


def cycle_problems(graph, ranks, package):
    """One message per cycle between modules or between units."""
    problems = []
    for component in strongly_connected(graph):
        inside = sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in component)
        problems.append(f"import cycle between modules {component}: {', '.join(inside)}")
    units = unit_graph(graph, ranks, package)
    for component in strongly_connected(units):
        edges = [
            (a, b, unit_of(a, ranks, package), unit_of(b, ranks, package))
            for a, targets in graph.items()
            for b in targets
        ]
        inside = [(a, b, ua, ub) for a, b, ua, ub in edges if ua != ub and {ua, ub} <= set(component)]
        # name the edges that close the cycle against the layers first: they are the ones to remove
        upward = sorted(f"{a} -> {b}" for a, b, ua, ub in inside if ranks[ub] > ranks[ua])
        rest = sorted(f"{a} -> {b}" for a, b, ua, ub in inside if ranks[ub] <= ranks[ua])
        listed = f"upward {', '.join(upward)}; and " if upward else ""
        problems.append(f"import cycle between units {component}: {listed}{', '.join(rest)}")
    return problems


def upward_problems(graph, ranks, package):
    """One message per import from a lower layer to a higher one."""
    problems = []
    for module, targets in sorted(graph.items()):
        source = unit_of(module, ranks, package)
        for target in sorted(targets):
            target_unit = unit_of(target, ranks, package)
            if ranks[target_unit] > ranks[source]:
                problems.append(
                    f"upward import {module} -> {target} ({source} is layer {ranks[source]}, "
                    f"{target_unit} is layer {ranks[target_unit]})"
                )
    return problems


# ----------------------------------------------------------------------------- the package
GRAPH = import_graph(ROOT / PACKAGE, PACKAGE)


def test_every_module_has_a_layer():
    unranked = sorted(m for m in GRAPH if unit_of(m, RANKS, PACKAGE) is None)
    assert unranked == [], f"add these modules (or their sub-package) to RANKS: {unranked}"
    assert set(RANKS) <= {unit_of(m, RANKS, PACKAGE) for m in GRAPH}, "RANKS names a unit that is gone"


def test_the_whole_graph_is_read():
    """The parser sees module-level, lazy, relative and package imports of the real package."""
    expected = [
        ("vdn_pyro.inference.fit", "vdn_pyro.inference.elbo"),  # module level
        ("vdn_pyro.models.neurons", "vdn_pyro.primitives"),
        ("vdn_pyro.cli", "vdn_pyro.plots"),  # inside a function
        ("vdn_pyro.data", "vdn_pyro.data.windows"),  # from .windows import ...
        ("vdn_pyro", "vdn_pyro.models"),  # from vdn_pyro.models import (names)
    ]
    missing = [edge for edge in expected if edge[1] not in GRAPH.get(edge[0], ())]
    assert missing == []
    assert sum(len(t) for t in GRAPH.values()) > 50


def test_no_import_cycles():
    problems = cycle_problems(GRAPH, RANKS, PACKAGE)
    assert problems == [], "\n".join(problems)


def test_imports_only_run_downward():
    problems = upward_problems(GRAPH, RANKS, PACKAGE)
    assert problems == [], "\n".join(problems)


# ----------------------------------------------------------------------------- the checker, tested
def test_checker_catches_an_upward_import_injected_into_the_real_graph():
    graph = {module: set(targets) for module, targets in GRAPH.items()}
    graph["vdn_pyro.primitives"].add("vdn_pyro.models.neurons")  # neurons imports primitives
    known = set(upward_problems(GRAPH, RANKS, PACKAGE))
    injected = (
        "upward import vdn_pyro.primitives -> vdn_pyro.models.neurons (vdn_pyro.primitives is layer "
        "0, vdn_pyro.models is layer 2)"
    )
    assert [p for p in upward_problems(graph, RANKS, PACKAGE) if p not in known] == [injected]
    edge = "vdn_pyro.primitives -> vdn_pyro.models.neurons"
    cycles = cycle_problems(graph, RANKS, PACKAGE)
    assert any(c.startswith("import cycle between modules") and edge in c for c in cycles)
    assert any(c.startswith("import cycle between units") and edge in c for c in cycles)


def write_package(root, files):
    for relative, source in files.items():
        path = Path(root) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def test_checker_on_a_synthetic_package(tmp_path):
    """A package whose low layer imports its high layer lazily, through a sub-package that
    re-exports it: no single pair of modules imports each other, yet the units form a cycle."""
    write_package(
        tmp_path / "fake",
        {
            "__init__.py": "from fake.low import f\nfrom fake import high\n",
            "low.py": "def f():\n    from fake.high import g  # lazy, upward\n    return g\n",
            "high/__init__.py": "from .core import g\nfrom . import extra\n",
            "high/core.py": "import fake.low\nfrom ..low import f\n\n\ndef g():\n    return f\n",
            "high/extra.py": "import importlib\n\nmod = importlib.import_module('fake.low')\n",
            "top.py": "from fake.high import core, g\n",
        },
    )
    graph = import_graph(tmp_path / "fake", "fake")
    assert graph == {
        "fake": {"fake.low", "fake.high"},
        "fake.low": {"fake.high"},
        "fake.high": {"fake.high.core", "fake.high.extra"},
        "fake.high.core": {"fake.low"},
        "fake.high.extra": {"fake.low"},
        "fake.top": {"fake.high", "fake.high.core"},
    }
    ranks = {"fake.low": 0, "fake.high": 1, "fake.top": 2, "fake": 3}
    assert upward_problems(graph, ranks, "fake") == [
        "upward import fake.low -> fake.high (fake.low is layer 0, fake.high is layer 1)"
    ]
    cycles = cycle_problems(graph, ranks, "fake")
    assert len(cycles) == 2
    assert cycles[0].startswith(
        "import cycle between modules ['fake.high', 'fake.high.core', 'fake.high.extra', 'fake.low']"
    )
    assert cycles[1].startswith("import cycle between units ['fake.high', 'fake.low']")
    # without the lazy import the package is clean: the package's __init__ importing its own
    # submodules, and same-unit edges, are fine
    del graph["fake.low"]
    graph["fake.low"] = set()
    assert upward_problems(graph, ranks, "fake") == [] and cycle_problems(graph, ranks, "fake") == []


def test_strongly_connected_components():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}, "f": {"g"}, "g": {"f"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["f", "g"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


# ----------------------------------------------------------------------------- third-party imports
#: Distribution name -> the module it installs, where the two differ.
IMPORT_NAMES = {"pyro-ppl": "pyro", "pyyaml": "yaml", "scikit-learn": "sklearn"}


def requirements(value):
    """The import names of a setup.cfg requirement list."""
    names = set()
    for line in value.strip().splitlines():
        line = line.split("#")[0].strip()
        if line:
            dist = re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower()
            names.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return names


def third_party_imports(package_dir, package):
    """``(at_import, anywhere)``: the top-level names of the non-stdlib modules the package
    imports when it is imported (module and class bodies, also under ``if``/``try``), and
    anywhere (functions too)."""
    at_import, anywhere = set(), set()

    def names_of(node):
        if isinstance(node, ast.Import):
            return {alias.name.split(".")[0] for alias in node.names}
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return {node.module.split(".")[0]}
        return set()

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            found = names_of(child) - set(sys.stdlib_module_names) - {package}
            anywhere.update(found)
            if not lazy:
                at_import.update(found)
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for path, _ in discover(package_dir, package).values():
        visit(ast.parse(path.read_text()), lazy=False)
    return at_import, anywhere


def test_install_requires_hold_what_the_library_imports():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    core = requirements(setup["options"]["install_requires"])
    extras = {name: requirements(value) for name, value in setup["options.extras_require"].items()}
    at_import, anywhere = third_party_imports(ROOT / PACKAGE, PACKAGE)
    assert {"torch", "pyro", "names"} <= anywhere and "names" not in at_import  # the parse sees imports
    assert at_import <= core, f"imported by the library but not in install_requires: {at_import - core}"
    assert core <= anywhere, f"in install_requires but never imported: {core - anywhere}"
    lazy_only = anywhere - core
    assert lazy_only <= extras["examples"], f"imported lazily, in no extra: {lazy_only - extras['examples']}"
    assert extras["examples"] == {"sklearn", "names"} and not extras["examples"] & core
    assert extras["examples"] <= extras["test"] and extras["examples"] <= extras["dev"]
