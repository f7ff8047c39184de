"""The import rules of docs/ARCHITECTURE.md ("Layers"), read from the code's own imports (module level, inside
functions and under TYPE_CHECKING alike): every qlora_kit import resolves, no module imports a higher layer, and no
modules import each other in a circle."""

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Low to high: a module may import its own package and anything on a lower layer, never the same layer's other
# packages or a higher one. The root modules are the ground floor; `cli` is the top.
LAYERS = [
    {"root"},  # the modules at qlora_kit/'s top: terms, errors, typecheck, atomic, config, device
    {"quant", "lowmem", "estimate"},
    {"model"},
    {"run", "adapters", "data"},
    {"train"},
    {"infer", "export", "analysis"},
    {"measure"},
    {"cli"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
# at most 15 (a flat room grows)
ROOT_MODULES = {"terms", "errors", "typecheck", "atomic", "config", "device", "safe_yaml", "ranges"}
# `qlora-kit estimate` and the CLI's help stay fast: these import no torch
TORCH_FREE = {"qlora_kit.terms", "qlora_kit.errors", "qlora_kit.typecheck", "qlora_kit.config", "qlora_kit.safe_yaml",
              "qlora_kit.ranges", "estimate", "qlora_kit.model.hub"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted((ROOT / "qlora_kit").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    for p in sorted((ROOT / "cli").glob("*.py")):
        mods["qlora_kit.cli" + ("" if p.stem == "__init__" else "." + p.stem)] = p
    return mods


MODULES = _modules()


def _imports(module: str, path: Path):
    """(line, target module, names) for every import of qlora_kit in `module`, however deep in the code."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "qlora_kit" or base.startswith("qlora_kit."):
                yield node.lineno, base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("qlora_kit"):
                    yield node.lineno, a.name, []


def _edges() -> dict[str, set[str]]:
    """module -> the qlora_kit modules it imports (a name that is a submodule counts as that submodule)."""
    graph = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for _, base, names in _imports(m, p):
            targets = {f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES} or {base}
            graph[m] |= {t for t in targets if t != m and not m.startswith(t + ".")}
    return graph


def _part(module: str) -> str:
    """The package a module belongs to (`train` for qlora_kit.train.loop), `root` for a top-level module."""
    if module == "qlora_kit":
        return "qlora_kit"
    first = module.split(".")[1]
    return "root" if (ROOT / "qlora_kit" / f"{first}.py").is_file() else first


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _code_in_strings(path: Path):
    """Python code held in strings (subprocess probes, `python -c` commands), parsed when it parses."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "qlora_kit" in node.value:
            try:
                yield ast.parse(textwrap.dedent(node.value))
            except SyntaxError:
                pass


def test_every_module_has_a_layer():
    assert {_part(m) for m in MODULES} - {"qlora_kit"} <= set(RANK), "a new package: give it a layer in LAYERS"
    top = {m.split(".")[1] for m in MODULES if _part(m) == "root"}
    assert top == ROOT_MODULES, "a new module at the top: put it in a package, or in ROOT_MODULES on purpose"


def test_every_import_of_qlora_kit_resolves():
    """Catches an import that a move or rename left behind, even one inside a function that no test reaches."""
    sources = list(MODULES.items()) + [(None, p) for d in ("tests", "bench") for p in sorted((ROOT / d).glob("*.py"))]
    bad = []
    for module, path in sources:
        trees = [ast.parse(path.read_text()), *_code_in_strings(path)]
        package = ((module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]) if module else [])
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = (".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                            if node.level else node.module or "")
                    if not (base == "qlora_kit" or base.startswith("qlora_kit.")):
                        continue
                    if base not in MODULES:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: no module {base}")
                        continue
                    defined = _top_level_names(MODULES[base])
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {base} has no {a.name}" for a in node.names
                            if f"{base}.{a.name}" not in MODULES and a.name not in defined]
                elif isinstance(node, ast.Import):
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno}: no module {a.name}" for a in node.names
                            if a.name.startswith("qlora_kit.") and a.name not in MODULES]
    assert not bad, "\n".join(bad)


def test_no_module_imports_a_higher_layer_or_a_sibling_package():
    bad = []
    for m, targets in _edges().items():
        for t in targets:
            a, b = _part(m), _part(t)
            if a == b or b == "qlora_kit":
                continue
            if a == "qlora_kit" or RANK[b] >= RANK[a] and not (a == b == "root"):
                bad.append(f"{m} (layer {RANK.get(a)}) imports {t} (layer {RANK[b]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _edges()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("forbidden, allowed", [
    ("bitsandbytes", {"qlora_kit.quant.bnb"}),
    ("click", {m for m in MODULES if _part(m) == "cli"}),
])
def test_third_party_entry_points(forbidden, allowed):
    """bitsandbytes enters through quant/bnb.py alone, click through the CLI alone."""
    users = set()
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == forbidden or n.startswith(forbidden + ".") for n in names):
                users.add(m)
    assert users <= allowed, sorted(users - allowed)


def test_torch_free_modules_import_no_torch():
    for m, p in MODULES.items():
        if m not in TORCH_FREE and _part(m) not in TORCH_FREE:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("torch", "numpy", "transformers") for n in names), (m, names)
