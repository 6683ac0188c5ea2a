"""The house's shape holds: imports point one way down the layers of docs/design.md (lazy imports included), no
package imports itself back, every package says what it is for, and no module grows past the house's size."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxlm"
# Lowest first: a module may import its own unit's modules and those of units before it (docs/design.md).
ORDER = (
    "errors config tokenizer utils cli cpu kernels lora model parallel data io generation train eval serve aot "
    "convert jaxlm"
).split()
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jaxlm"


def _imports(module: str) -> set[str]:
    """The jaxlm modules `module` imports anywhere in its body. `from X import y` imports X and, when y is a
    module, X.y (so `from . import sibling` imports the package, whose __init__ runs first)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_unit_has_a_place_in_the_order():
    units = {_unit(m) for m in MODULES}
    assert units <= set(ORDER), f"place {sorted(units - set(ORDER))} in ORDER (and in docs/design.md)"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} imports {t}" for m, ts in graph.items() for t in ts if ORDER.index(_unit(t)) > ORDER.index(_unit(m))
    )


def cycles(graph: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                found.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_imports_point_down_the_order():
    assert not upward_imports(GRAPH), "imports that point up the order:\n" + "\n".join(upward_imports(GRAPH))


def test_no_import_closes_a_circle():
    assert not cycles(GRAPH), "import cycles:\n" + "\n".join(cycles(GRAPH))


def test_the_checks_catch_an_upward_import_and_a_circle():
    """On made-up graphs: model importing generation points up; a package and its module importing each other
    (`from . import sibling` in a package whose __init__ imports that sibling) close a circle."""
    assert upward_imports({"jaxlm.model.gpt": {"jaxlm.generation.decode"}}) == [
        "jaxlm.model.gpt imports jaxlm.generation.decode"
    ]
    assert not upward_imports({"jaxlm.generation.decode": {"jaxlm.model.gpt"}})
    assert cycles({"jaxlm.data": {"jaxlm.data.sft"}, "jaxlm.data.sft": {"jaxlm.data"}}) == [
        "jaxlm.data -> jaxlm.data.sft -> jaxlm.data"
    ]
    assert "jaxlm.model.gpt" in GRAPH["jaxlm.generation.decode"]  # the walker sees a real edge (lazy ones too)


def test_every_package_says_what_it_is_for_and_what_it_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent != PACKAGE:
            assert "May import" in doc, f"{init.relative_to(ROOT)}: say what the package may import"


def test_no_module_is_over_the_house_size():
    big = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these modules (over {MAX_LINES} lines): {big}"
