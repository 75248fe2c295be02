"""The layering of qatcli's packages, checked on every import of every module, function-level and TYPE_CHECKING
imports included: a module imports only its own package and the layers below its own, and no cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qatcli"

# Lowest first. A package (or top-level module) may import its own package and the layers strictly below.
LAYERS: list[set[str]] = [
    {"errors", "version"},
    {"config", "flags", "notices", "outputs", "progress", "run_layout", "runtime"},
    {"report"},
    {"quant"},
    {"models", "methods"},
    {"data"},
    {"evaluation"},
    {"qat", "formats"},
    {"diagnose", "exporters"},
    {"recipe"},
    {"pipeline"},
    {"commands", "api"},
    {"cli"},
    {"entry"},
    {"__main__", "__init__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The package or top-level module of ``qatcli.x.y`` (x), '__init__' for qatcli itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every qatcli module ``path`` imports, wherever in the file the import stands."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            found.add(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qatcli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (ROOT / a.name).exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qatcli"))
    return found


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in GRAPH}
    assert units <= set(LAYER_OF), f"give these a layer: {sorted(units - set(LAYER_OF))}"


def test_no_module_imports_a_module_above_or_beside_its_layer() -> None:
    wrong = []
    for module, deps in GRAPH.items():
        here = _unit(module)
        for dep in deps:
            there = _unit(dep)
            if there != here and LAYER_OF[there] >= LAYER_OF[here] and not (here == "__init__" and there == "api"):
                wrong.append(f"{module} imports {dep}")
    # the package's own __init__ loads the Python API on first use (qatcli.quantize, ...): the one allowed way up
    assert not wrong, "\n".join(wrong)


def test_quant_and_qat_import_no_format_pipeline_command_or_cli() -> None:
    forbidden = ("formats", "exporters", "pipeline", "commands", "cli", "api")
    for module, deps in GRAPH.items():
        if _unit(module) in ("quant", "qat"):
            assert not [d for d in deps if _unit(d) in forbidden], module


def test_algorithms_report_progress_through_the_callback_not_the_console() -> None:
    for module, deps in GRAPH.items():
        if _unit(module) in ("quant", "qat", "models", "data", "evaluation", "formats", "methods"):
            assert not [d for d in deps if _unit(d) == "report"], f"{module} imports report/: use qatcli.progress"


def test_no_import_cycle_between_modules() -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in GRAPH.get(node, set()):
            dep = dep if dep in GRAPH else dep.rpartition(".")[0]
            if dep == node or _unit(node) == "__init__":
                continue
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, node, dep])
            if dep in GRAPH and dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [])


def test_no_command_imports_another() -> None:
    for module, deps in GRAPH.items():
        if module.startswith("qatcli.commands."):
            assert not any(d.startswith("qatcli.commands.") for d in deps), f"{module} imports a command"
